"""Ports published and unpublished on a running machine (SPEC §4.7: ports, publish, unpublish;
§5: their AsyncMachine twins), against real microVMs with guest listeners started by background
execs."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import smol
from smol import AsyncMachine, ExecOptions, PublishedPort

BG = ExecOptions(background=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(host_port: int) -> str:
    """Everything the server behind ``host_port`` sends before it closes; "" or an OSError
    while the guest listener is not up (the host side accepts, then resets)."""
    with socket.create_connection(("127.0.0.1", host_port), timeout=10) as s:
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out.decode()
            out += chunk


def _fetch_until(host_port: int, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = _fetch(host_port)
        except OSError as e:
            got = repr(e)
        if got == want:
            return
        assert time.monotonic() < deadline, f"host port {host_port}: {got!r}, want {want!r}"
        time.sleep(0.1)


def _refused(host_port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", host_port), timeout=1).close()
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_publish_read_list_endpoint_and_unpublish(machine):
    m = machine
    assert m.ports() == []
    with pytest.raises(smol.InvalidConfigError):
        m.endpoint(8080)
    assert m.exec(["nc", "-ll", "-p", "8080", "-e", "echo", "hi"], BG).pid
    assert m.exec(["nc", "-ll", "-p", "8081", "-e", "cat"], BG).pid

    # a free host port is picked
    p = m.publish(8080)
    assert isinstance(p, PublishedPort)
    assert p.guest == 8080 and p.protocol == "tcp"
    assert isinstance(p.host, int) and 0 < p.host < 65536
    assert m.ports() == [p]
    e = m.endpoint(8080, "x")
    assert e.http_url == f"http://127.0.0.1:{p.host}/x" and e.ws_url == f"ws://127.0.0.1:{p.host}/x"
    _fetch_until(p.host, "hi\n")

    # a host port of our choosing, keyword arguments
    want = _free_port()
    q = m.publish(guest=8081, host=want, protocol="tcp")
    assert q == PublishedPort(guest=8081, host=want, protocol="tcp")
    assert sorted(m.ports(), key=lambda x: x.guest) == [p, q]
    assert m.endpoint(8081).http_url == f"http://127.0.0.1:{want}"
    m.wait_until_ready(timeout_s=30, interval_s=0.2)  # readiness sees both runtime ports
    # an echo connection opened now carries on after the port is unpublished
    conn = None
    deadline = time.monotonic() + 30
    while conn is None:
        c = socket.create_connection(("127.0.0.1", want), timeout=10)
        try:
            c.sendall(b"one\n")
            if c.recv(16) == b"one\n":
                conn = c
                continue
        except OSError:
            pass
        c.close()
        assert time.monotonic() < deadline, "the guest echo listener never answered"
        time.sleep(0.1)

    # bad values are InvalidConfigError before any I/O
    for bad in (0, 65536, -1, "80", 80.0, True, None):
        with pytest.raises(smol.InvalidConfigError):
            m.publish(bad)
    for bad in (0, 65536, "80", 1.5, False):
        with pytest.raises(smol.InvalidConfigError):
            m.publish(8082, host=bad)
        with pytest.raises(smol.InvalidConfigError):
            m.unpublish(guest=bad)
        with pytest.raises(smol.InvalidConfigError):
            m.unpublish(host=bad)
    for bad in ("sctp", "TCP", "", None, 6):
        with pytest.raises(smol.InvalidConfigError):
            m.publish(8082, protocol=bad)
        with pytest.raises(smol.InvalidConfigError):
            m.unpublish(8080, protocol=bad)
    # UDP is not relayed locally
    with pytest.raises(smol.NotSupportedError) as ei:
        m.publish(8082, protocol="udp")
    assert ei.value.code == "NOT_SUPPORTED"
    # a busy host port: ours, or one another socket of this host holds
    with pytest.raises(smol.ConflictError) as ei:
        m.publish(8082, host=p.host)
    assert ei.value.code == "CONFLICT"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(smol.ConflictError):
            m.publish(8082, host=holder.getsockname()[1])
    # unpublish needs a port, and one that is published
    with pytest.raises(smol.InvalidConfigError):
        m.unpublish()
    with pytest.raises(smol.NotFoundError) as ei:
        m.unpublish(9999)
    assert ei.value.code == "NOT_FOUND"
    with pytest.raises(smol.NotFoundError):
        m.unpublish(host=_free_port())
    with pytest.raises(smol.NotFoundError):
        m.unpublish(guest=8080, host=want)  # both given: both must match
    # nothing changed by the failures
    assert sorted(m.ports(), key=lambda x: x.guest) == [p, q]

    # unpublish by guest port: the host port closes, the endpoint is gone
    m.unpublish(8080)
    assert m.ports() == [q]
    with pytest.raises(smol.InvalidConfigError):
        m.endpoint(8080)
    assert _refused(p.host), f"host port {p.host} still accepts"
    # by host port: the open connection carries on
    m.unpublish(host=want)
    assert m.ports() == []
    assert _refused(want), f"host port {want} still accepts"
    conn.sendall(b"two\n")
    assert conn.recv(16) == b"two\n"
    conn.close()

    # published again, on the same host port
    r = m.publish(8080, p.host)
    assert r == p and m.ports() == [p]
    _fetch_until(p.host, "hi\n")

    # a stopped machine publishes nothing
    m.stop()
    with pytest.raises(smol.InvalidStateError) as ei:
        m.publish(8081)
    assert ei.value.code == "INVALID_STATE"


def test_async_publish_ports_and_unpublish(machine):
    assert machine.exec(["nc", "-ll", "-p", "9090", "-e", "echo", "hi"], BG).pid

    async def main() -> None:
        am = AsyncMachine(machine)
        assert await am.ports() == []
        p = await am.publish(9090)
        assert p.guest == 9090 and p.host and p.protocol == "tcp"
        assert await am.ports() == [p]
        assert am.endpoint(9090).http_url == f"http://127.0.0.1:{p.host}"
        await asyncio.to_thread(_fetch_until, p.host, "hi\n")
        with pytest.raises(smol.InvalidConfigError):
            await am.publish(9091, protocol="sctp")
        with pytest.raises(smol.NotSupportedError):
            await am.publish(9091, protocol="udp")
        with pytest.raises(smol.ConflictError):
            await am.publish(9091, host=p.host)
        with pytest.raises(smol.InvalidConfigError):
            await am.unpublish()
        with pytest.raises(smol.NotFoundError):
            await am.unpublish(9091)
        await am.unpublish(guest=9090, host=p.host)
        assert await am.ports() == []
        assert await asyncio.to_thread(_refused, p.host)
        await am.stop()
        with pytest.raises(smol.InvalidStateError):
            await am.publish(9090)

    asyncio.run(main())
