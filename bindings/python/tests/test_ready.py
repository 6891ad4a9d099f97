"""Readiness (SPEC §4.2: ready, ready_at, wait_until_ready) and Machine.request (SPEC §4.7),
sync and async, against real microVMs with a published port."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import smol
from smol import AsyncMachine, ExecOptions, MachineConfig, PortSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_waits_for_a_guest_listener_on_the_published_port(make_machine):
    m = make_machine(MachineConfig(ports=[PortSpec(host=_free_port(), guest=8080)]))
    assert m.state() == "running"
    assert m.ready_at() is None
    # running, but nothing listens on guest port 8080 yet (the host side accepts and resets)
    assert m.ready() is False
    t0 = time.monotonic()
    with pytest.raises(smol.SmolTimeoutError) as ei:
        m.wait_until_ready(timeout_s=1.5, interval_s=0.2)
    assert ei.value.code == "TIMEOUT"
    assert 1.0 < time.monotonic() - t0 < 15
    for bad in ({"timeout_s": 0}, {"interval_s": -1}, {"timeout_s": "5"}, {"interval_s": float("nan")}):
        with pytest.raises(smol.InvalidConfigError):
            m.wait_until_ready(**bad)

    # a guest listener on 8080: ready
    r = m.exec(["nc", "-ll", "-p", "8080", "-e", "cat"], ExecOptions(background=True))
    assert r.exit_code == 0 and r.pid
    m.wait_until_ready(timeout_s=30, interval_s=0.2)
    assert m.ready() is True
    m.wait_until_ready()  # already ready: returns at once

    async def async_side() -> None:
        am = AsyncMachine(m)
        assert await am.ready() is True
        assert await am.ready_at() is None
        await am.wait_until_ready(timeout_s=10, interval_s=0.2)
        with pytest.raises(smol.InvalidConfigError):
            await am.wait_until_ready(timeout_s=0)

    asyncio.run(async_side())

    # a stopped machine is not ready
    m.stop()
    assert m.ready() is False
    with pytest.raises(smol.SmolTimeoutError):
        m.wait_until_ready(timeout_s=0.5, interval_s=0.1)


def test_a_machine_without_ports_is_ready_when_running(machine):
    assert machine.ready() is True
    machine.wait_until_ready(timeout_s=5)

    async def cancelled_wait() -> None:
        # cancelling an async wait stops it (the native cancel token fires)
        am = AsyncMachine(machine)
        assert await am.ready() is True
        machine.stop()
        task = asyncio.ensure_future(am.wait_until_ready(timeout_s=60, interval_s=0.1))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 5

    asyncio.run(cancelled_wait())
    assert machine.ready() is False


def test_request_through_the_endpoint(make_machine):
    m = make_machine(MachineConfig(ports=[PortSpec(host=_free_port(), guest=8080)]))
    # not published: the endpoint's InvalidConfigError
    with pytest.raises(smol.InvalidConfigError):
        m.request(9999)
    # published, but nothing listens in the guest: NETWORK_ERROR
    with pytest.raises(smol.SmolError) as ei:
        m.request(8080, "index.html", timeout_s=5)
    assert ei.value.code == "NETWORK_ERROR" and type(ei.value) is smol.SmolError
    for bad in ({"timeout_s": 0}, {"method": ""}, {"data": 5}):
        with pytest.raises(smol.InvalidConfigError):
            m.request(8080, **bad)

    m.write_file("/srv/index.html", b"hello from the guest\n\x00\xff")
    m.write_file("/srv/sub/page.txt", "a page")
    r = m.exec(["httpd", "-f", "-p", "8080", "-h", "/srv"], ExecOptions(background=True))
    assert r.exit_code == 0 and r.pid
    m.wait_until_ready(timeout_s=30, interval_s=0.2)

    body = m.request(8080)  # "/" serves index.html
    assert body == b"hello from the guest\n\x00\xff"
    assert m.request(8080, "index.html") == body
    assert m.request(8080, "/sub/page.txt", method="get") == b"a page"
    # an HTTP error status is a NETWORK_ERROR carrying the status
    with pytest.raises(smol.SmolError) as ei:
        m.request(8080, "missing.html")
    assert ei.value.code == "NETWORK_ERROR" and ei.value.status == 404

    async def async_side() -> None:
        am = AsyncMachine(m)
        assert await am.request(8080, "sub/page.txt") == b"a page"
        with pytest.raises(smol.InvalidConfigError):
            await am.request(9999)

    asyncio.run(async_side())

    # the server gone: NETWORK_ERROR again
    m.exec(["kill", str(r.pid)]).assert_success()
    deadline = time.monotonic() + 15
    while True:
        try:
            m.request(8080, timeout_s=5)
        except smol.SmolError as e:
            assert e.code == "NETWORK_ERROR"
            break
        assert time.monotonic() < deadline, "the guest server still answers after kill"
        time.sleep(0.2)
