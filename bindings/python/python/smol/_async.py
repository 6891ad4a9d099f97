"""``AsyncMachine`` (SPEC §5): every I/O method awaitable, over the synchronous ``Machine``.

Blocking calls run in ``asyncio.to_thread`` (the native calls release the GIL, so many machines
overlap on one event loop). Cancelling the task awaiting ``exec`` or ``run`` kills the command:
the call carries a native cancel token that is fired on cancellation, which drops the core's
operation (the agent kills the command's process group). ``exec_stream`` is an async generator
that pulls each event in a worker thread; ``break`` (once the generator is collected),
cancellation or ``aclose()`` kill the command.

SPEC §5 quirk: because ``exec`` always attaches a cancel token, ``await m.exec(cmd,
ExecOptions(background=True))`` raises ``InvalidConfigError("a background command cannot be
cancelled; kill its pid instead")``. Start background commands with the synchronous handle, e.g.
``await asyncio.to_thread(m.machine.exec, cmd, ExecOptions(background=True))``.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Union

from ._machine import Machine, _need_native
from ._types import (
    ConnectOptions,
    ExecOptions,
    ExecResult,
    ImageInfo,
    MachineConfig,
    MachineSummary,
    PortEndpoint,
    PublishedPort,
)

__all__ = ["AsyncMachine"]


async def _cancellable(fn: Any, *args: Any) -> Any:
    token = _need_native().CancelToken()
    try:
        return await asyncio.to_thread(fn, *args, token)
    except asyncio.CancelledError:
        token.cancel()
        raise


def _next_event(stream: Any) -> Optional[Dict[str, Any]]:
    return next(stream, None)


class AsyncMachine:
    """A ``Machine`` whose I/O methods are coroutines. ``async with await
    AsyncMachine.create(...) as m:`` deletes the machine on exit."""

    __slots__ = ("_m",)

    def __init__(self, machine: Machine) -> None:
        if not isinstance(machine, Machine):
            raise TypeError("AsyncMachine wraps a Machine; use await AsyncMachine.create()")
        self._m = machine

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    async def create(
        cls, config: Optional[MachineConfig] = None, conn: Optional[ConnectOptions] = None
    ) -> "AsyncMachine":
        return cls(await asyncio.to_thread(Machine.create, config, conn))

    @classmethod
    async def connect(cls, machine_id: str, conn: Optional[ConnectOptions] = None) -> "AsyncMachine":
        return cls(await asyncio.to_thread(Machine.connect, machine_id, conn))

    @classmethod
    async def open(cls, machine_id: str, conn: Optional[ConnectOptions] = None) -> "AsyncMachine":
        return cls(await asyncio.to_thread(Machine.open, machine_id, conn))

    @staticmethod
    async def list(
        conn: Optional[ConnectOptions] = None, labels: Optional[Mapping[str, str]] = None
    ) -> List[MachineSummary]:
        return await asyncio.to_thread(Machine.list, conn, labels)

    @staticmethod
    async def delete_by_name(machine_id: str, conn: Optional[ConnectOptions] = None) -> None:
        await asyncio.to_thread(Machine.delete_by_name, machine_id, conn)

    # -- identity -------------------------------------------------------------------------------

    @property
    def machine(self) -> Machine:
        """The synchronous handle."""
        return self._m

    @property
    def name(self) -> str:
        return self._m.name

    @property
    def id(self) -> str:
        return self._m.id

    async def state(self) -> str:
        return await asyncio.to_thread(self._m.state)

    async def url(self) -> Optional[str]:
        return self._m.url()

    async def ready(self) -> bool:
        """Like ``Machine.ready``; cancelling the awaiting task abandons the probe."""
        return await _cancellable(self._m._ready_cancellable)

    async def ready_at(self) -> Optional[str]:
        """Always None locally (SPEC §4.2)."""
        return self._m.ready_at()

    async def wait_until_ready(self, timeout_s: float = 120.0, interval_s: float = 1.0) -> None:
        """Like ``Machine.wait_until_ready``; cancelling the awaiting task stops the wait."""
        await _cancellable(self._m._wait_until_ready_cancellable, timeout_s, interval_s)

    # -- execution ------------------------------------------------------------------------------

    async def exec(self, command: Sequence[str], opts: Optional[ExecOptions] = None) -> ExecResult:
        """Like ``Machine.exec``; cancelling the awaiting task kills the command. A background
        command (``ExecOptions(background=True)``) cannot be cancelled, so it is refused with
        ``InvalidConfigError`` (SPEC §5); use ``self.machine.exec`` in a thread for one."""
        return await _cancellable(self._m._exec_cancellable, command, opts)

    async def run(
        self, image: str, command: Sequence[str], opts: Optional[ExecOptions] = None
    ) -> ExecResult:
        return await _cancellable(self._m._run_cancellable, image, command, opts)

    async def exec_stream(
        self, command: Sequence[str], opts: Optional[ExecOptions] = None
    ) -> AsyncIterator[Dict[str, Any]]:
        """``async for ev in m.exec_stream([...])``: the events of ``Machine.exec_stream``."""
        stream = await asyncio.to_thread(self._m.exec_stream, command, opts)
        try:
            while True:
                ev = await asyncio.to_thread(_next_event, stream)
                if ev is None:
                    return
                yield ev
        finally:
            stream.kill()

    # -- files, images --------------------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self._m.read_file, path)

    async def write_file(
        self, path: str, data: Union[str, bytes], mode: Optional[int] = None
    ) -> None:
        await asyncio.to_thread(self._m.write_file, path, data, mode)

    async def pull_image(self, image: str) -> ImageInfo:
        return await asyncio.to_thread(self._m.pull_image, image)

    async def list_images(self) -> List[ImageInfo]:
        return await asyncio.to_thread(self._m.list_images)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, egress_interceptor: Any = None, wait_until_ready: bool = True) -> None:
        await asyncio.to_thread(self._m.start, egress_interceptor, wait_until_ready)

    async def stop(
        self, drain_secs: Optional[float] = None, timeout_secs: Optional[float] = None
    ) -> None:
        await asyncio.to_thread(self._m.stop, drain_secs, timeout_secs)

    async def delete(self, include_usage: bool = False, drain_secs: Optional[float] = None) -> None:
        await asyncio.to_thread(self._m.delete, include_usage, drain_secs)

    async def pause(self) -> None:
        await asyncio.to_thread(self._m.pause)

    async def resume(self, wait_until_ready: bool = True) -> None:
        await asyncio.to_thread(self._m.resume, wait_until_ready)

    # -- branching (like ``Machine``'s, in a worker thread) ------------------------------------

    async def branch(self, name: str, ports: Any = None, **kw: Any) -> "AsyncMachine":
        return AsyncMachine(await asyncio.to_thread(lambda: self._m.branch(name, ports, **kw)))

    async def fork(self, name: str, ports: Any = None, **kw: Any) -> "AsyncMachine":
        return AsyncMachine(await asyncio.to_thread(lambda: self._m.fork(name, ports, **kw)))

    async def branch_batch(self, count: Optional[int] = None, **kw: Any) -> "List[AsyncMachine]":
        clones = await asyncio.to_thread(lambda: self._m.branch_batch(count, **kw))
        return [AsyncMachine(c) for c in clones]

    async def fork_batch(self, count: Optional[int] = None, **kw: Any) -> "List[AsyncMachine]":
        clones = await asyncio.to_thread(lambda: self._m.fork_batch(count, **kw))
        return [AsyncMachine(c) for c in clones]

    async def reward_fork(
        self, command: Sequence[str], opts: Optional[ExecOptions] = None, name: Optional[str] = None
    ) -> ExecResult:
        return await asyncio.to_thread(self._m.reward_fork, command, opts, name)

    # -- portable checkpoints (like ``Machine``'s, in a worker thread) -------------------------

    async def checkpoint(self, output: Any = None, *, store: Optional[str] = None) -> Dict[str, Any]:
        return await asyncio.to_thread(lambda: self._m.checkpoint(output, store=store))

    async def checkpoints(self) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self._m.checkpoints)

    @classmethod
    async def restore_checkpoint(
        cls, checkpoint_id: Any, name: str, conn: Optional[ConnectOptions] = None, *a: Any, **kw: Any
    ) -> "AsyncMachine":
        return cls(
            await asyncio.to_thread(
                lambda: Machine.restore_checkpoint(checkpoint_id, name, conn, *a, **kw)
            )
        )

    @classmethod
    async def restore(
        cls, checkpoint_id: Any, name: str, conn: Optional[ConnectOptions] = None
    ) -> "AsyncMachine":
        return cls(await asyncio.to_thread(Machine.restore, checkpoint_id, name, conn))

    @staticmethod
    async def delete_checkpoint(checkpoint_id: Any, conn: Optional[ConnectOptions] = None) -> None:
        await asyncio.to_thread(Machine.delete_checkpoint, checkpoint_id, conn)

    @staticmethod
    async def export_checkpoint(source: Any, output: Any) -> int:
        return await asyncio.to_thread(Machine.export_checkpoint, source, output)

    @staticmethod
    async def prune_checkpoint_store(store: Any) -> int:
        return await asyncio.to_thread(Machine.prune_checkpoint_store, store)

    async def ports(self) -> List[PublishedPort]:
        return self._m.ports()

    async def publish(
        self, guest: int, host: Optional[int] = None, protocol: str = "tcp"
    ) -> PublishedPort:
        """Like ``Machine.publish``, in a worker thread."""
        return await asyncio.to_thread(self._m.publish, guest, host, protocol)

    async def unpublish(
        self, guest: Optional[int] = None, host: Optional[int] = None, protocol: str = "tcp"
    ) -> None:
        """Like ``Machine.unpublish``, in a worker thread."""
        await asyncio.to_thread(self._m.unpublish, guest, host, protocol)

    def endpoint(self, port: int, path: Optional[str] = None) -> PortEndpoint:
        """Synchronous (it only builds a URL)."""
        return self._m.endpoint(port, path)

    async def request(
        self,
        port: int,
        path: Optional[str] = None,
        method: str = "GET",
        data: Optional[bytes] = None,
        timeout_s: float = 30.0,
    ) -> bytes:
        """Like ``Machine.request``, in a worker thread."""
        return await asyncio.to_thread(self._m.request, port, path, method, data, timeout_s)

    # -- async context manager ------------------------------------------------------------------

    async def __aenter__(self) -> "AsyncMachine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.delete()

    def __repr__(self) -> str:
        return f"AsyncMachine(name={self.name!r}, target='local')"
