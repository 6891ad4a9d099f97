"""AsyncMachine (SPEC §5): awaitable I/O, many machines overlapping on one event loop,
cancellation killing the command, async exec_stream, async context manager."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import eventually, guest_pid_alive, unique

import smol
from smol import AsyncMachine, ExecOptions, Machine, MachineConfig


def test_four_creates_overlap_on_one_loop():
    async def main():
        spans = []

        async def one():
            t0 = time.monotonic()
            m = await AsyncMachine.create(MachineConfig(name=unique("async")))
            spans.append((t0, time.monotonic()))
            return m

        t0 = time.monotonic()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        machines = await asyncio.gather(*(one() for _ in range(4)))
        wall = time.monotonic() - t0
        tick.cancel()
        try:
            # every create was in flight at the same moment
            assert max(s for s, _ in spans) < min(e for _, e in spans), spans
            assert wall < sum(e - s for s, e in spans) * 0.75, (wall, spans)
            assert ticks >= wall / 0.01 * 0.5, (ticks, wall)  # the loop was never blocked
            outs = await asyncio.gather(*(m.exec(["hostname"]) for m in machines))
            assert [o.stdout for o in outs] == [f"{m.name}\n" for m in machines]
        finally:
            await asyncio.gather(*(m.delete() for m in machines))
        for m in machines:
            with pytest.raises(smol.NotFoundError):
                await AsyncMachine.open(m.name)

    asyncio.run(main())


def test_async_methods_and_context_manager():
    async def main():
        name = unique("async")
        async with await AsyncMachine.create(MachineConfig(name=name)) as m:
            assert m.name == name and m.id == name
            assert await m.state() == "running"
            assert await m.url() is None
            r = await m.exec(["sh", "-c", "echo $A; exit 2"], ExecOptions(env={"A": "b"}))
            assert (r.exit_code, r.stdout) == (2, "b\n")
            assert (await m.exec(["sleep", "5"], ExecOptions(timeout=0.5))).exit_code == 124
            await m.write_file("/root/f", b"\x00async")
            assert await m.read_file("/root/f") == b"\x00async"
            with pytest.raises(smol.NotFoundError):
                await m.read_file("/nope")
            events = [ev async for ev in m.exec_stream(["sh", "-c", "echo x; echo y >&2"])]
            assert events == [
                {"kind": "stdout", "data": "x\n"},
                {"kind": "stderr", "data": "y\n"},
                {"kind": "exit", "exit_code": 0},
            ]
            assert await m.ports() == []
            with pytest.raises(smol.InvalidConfigError):
                m.endpoint(80)
            assert name in {s.name for s in await AsyncMachine.list()}
            await m.stop()
            assert await m.state() == "stopped"
            await m.start()
            assert await m.read_file("/root/f") == b"\x00async"
            assert isinstance(m.machine, Machine)
        assert await m.state() == "deleted"
        with pytest.raises(smol.NotFoundError):
            await AsyncMachine.connect(name)

    asyncio.run(main())


def test_async_context_manager_deletes_on_exception():
    name = unique("async")

    async def main():
        async with await AsyncMachine.create(MachineConfig(name=name)):
            raise KeyError("inside")

    with pytest.raises(KeyError):
        asyncio.run(main())
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


def test_cancelling_exec_kills_the_command(machine):
    am = AsyncMachine(machine)

    async def main():
        task = asyncio.ensure_future(am.exec(["sh", "-c", "echo $$ > /tmp/apid; exec sleep 60"]))
        assert await asyncio.to_thread(
            eventually, lambda: machine.exec(["test", "-s", "/tmp/apid"]).success, 10
        )
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 1
        # wait_for too: the timeout cancels the exec, which kills it
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(am.exec(["sh", "-c", "echo $$ > /tmp/apid2; exec sleep 60"]), 1.5)

    asyncio.run(main())
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/apid"), 10)
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/apid2"), 10)
    assert machine.exec(["true"]).success


def test_async_stream_break_and_cancel_kill(machine):
    am = AsyncMachine(machine)

    async def main():
        agen = am.exec_stream(["sh", "-c", "echo $$ > /tmp/sp; while :; do echo tick; sleep 0.1; done"])
        async for ev in agen:
            assert ev == {"kind": "stdout", "data": "tick\n"}
            break
        await agen.aclose()

        async def consume():
            async for _ in am.exec_stream(["sh", "-c", "echo $$ > /tmp/sp2; exec sleep 60"]):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/sp"), 10)
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/sp2"), 10)


def test_async_background_exec_is_refused_locally(machine):
    # SPEC §5 quirk: the local async exec always attaches a cancel token, and a background
    # command cannot be cancelled; the synchronous handle starts one.
    async def main():
        m = AsyncMachine(machine)
        with pytest.raises(smol.InvalidConfigError) as ei:
            await m.exec(["sh", "-c", "touch /tmp/must-not-run"], ExecOptions(background=True))
        assert str(ei.value) == "a background command cannot be cancelled; kill its pid instead"
        assert ei.value.code == "INVALID_CONFIG"
        r = await asyncio.to_thread(
            m.machine.exec, ["sh", "-c", "exec sleep 600"], ExecOptions(background=True)
        )
        assert r.exit_code == 0 and r.pid is not None and r.stdout == f"pid={r.pid}\n"
        assert (await m.exec(["kill", "-0", str(r.pid)])).exit_code == 0
        assert (await m.exec(["test", "-e", "/tmp/must-not-run"])).exit_code == 1
        await m.exec(["kill", str(r.pid)])
        with pytest.raises(smol.InvalidConfigError):
            await m.run("busybox", ["true"], ExecOptions(background=True))

    asyncio.run(main())


def test_async_errors_are_typed():
    async def main():
        with pytest.raises(smol.InvalidConfigError):  # the cloud target without a key
            await AsyncMachine.create(None, smol.ConnectOptions(target="cloud"))
        with pytest.raises(smol.InvalidConfigError):
            await AsyncMachine.create(MachineConfig(name="bad/name"))
        with pytest.raises(smol.NotFoundError):
            await AsyncMachine.open(unique("missing"))
        await AsyncMachine.delete_by_name(unique("missing"))

    asyncio.run(main())


def test_async_checkpoint_restore_and_delete(tmp_path):
    async def main():
        out = tmp_path / "a.smolcheckpoint"
        name, restored = unique("async-ck"), unique("async-rs")
        async with await AsyncMachine.create(MachineConfig(name=name, branchable=True)) as m:
            await m.write_file("/root/f", b"kept")
            with pytest.raises(smol.InvalidConfigError):
                await m.checkpoint()
            info = await m.checkpoint(out)
            assert info["id"] == str(out) and info["size_bytes"] == out.stat().st_size
            with pytest.raises(smol.NotSupportedError):
                await m.checkpoints()
        async with await AsyncMachine.restore_checkpoint(str(out), restored) as r:
            assert isinstance(r, AsyncMachine) and r.name == restored
            assert await r.read_file("/root/f") == b"kept"
            host = await r.exec(["hostname"])
            assert host.stdout.strip() == restored
        with pytest.raises(smol.ConflictError):
            async with await AsyncMachine.restore(str(out), name) as taken:
                async with await AsyncMachine.restore(str(out), taken.name):
                    pass
        await AsyncMachine.delete_checkpoint(str(out))
        assert not out.exists()
        with pytest.raises(smol.NotFoundError):
            await AsyncMachine.delete_checkpoint(str(out))

    asyncio.run(main())
