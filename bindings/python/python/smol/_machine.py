"""The synchronous ``Machine`` (SPEC §4) over the native module."""

from __future__ import annotations

import atexit
import http.client
import math
import os
import threading
import urllib.error
import urllib.request
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._types import (
    CacheDiskRef,
    ConnectOptions,
    CredentialSpec,
    EgressInterceptor,
    ExecOptions,
    ExecResult,
    ImageInfo,
    MachineConfig,
    MachineSizes,
    MachineSummary,
    MountSpec,
    PortEndpoint,
    PortSpec,
    PublishedPort,
    ResourceSpec,
)
from .errors import InvalidConfigError, NotFoundError, NotSupportedError, SmolError

try:
    from . import _native
except ImportError as _e:  # pragma: no cover - a broken install
    _native = None  # type: ignore[assignment]
    _native_error: Optional[ImportError] = _e
else:
    _native_error = None

__all__ = ["Machine", "ExecStream", "LocalAvailability", "local_availability"]

#: The iterator ``Machine.exec_stream`` returns (SPEC §4.3): yields event dicts; ``kill()`` /
#: ``close()`` from any thread; a context manager; dropping it kills the command.
ExecStream = _native.ExecStream if _native is not None else object


def _need_native() -> Any:
    if _native is None:
        raise NotSupportedError(
            f"the native smol engine is not available ({_native_error}); "
            "use the cloud target or reinstall smolmachines"
        )
    return _native


# ---- argument checks (what the Rust core cannot see: Python types, unsupported fields) -------


def _int(name: str, v: Any, lo: int = 0, hi: int = (1 << 32) - 1) -> int:
    """A Python int that fits the native field (type conversion only; the core checks values)."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidConfigError(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _opt_int(name: str, v: Any, hi: int = (1 << 32) - 1) -> Optional[int]:
    return None if v is None else _int(name, v, 0, hi)


def _str_list(name: str, v: Any) -> List[str]:
    if v is None:
        return []
    if isinstance(v, (str, bytes)) or not all(isinstance(x, str) for x in v):
        raise InvalidConfigError(f"{name} must be a list of str, got {v!r}")
    return list(v)


def _guest_path(v: Any) -> str:
    """A guest path argument: a str (the core checks that it is absolute)."""
    if not isinstance(v, str):
        raise InvalidConfigError(f"path must be an absolute guest path (a str), got {v!r}")
    return v


def _protocol(v: Any) -> str:
    if not isinstance(v, str) or v not in ("tcp", "udp"):
        raise InvalidConfigError(f'protocol must be "tcp" or "udp", got {v!r}')
    return v


def _str_map(name: str, m: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if m is None:
        return {}
    if not isinstance(m, Mapping):
        raise InvalidConfigError(f"{name} must be a dict of str to str, got {type(m).__name__}")
    out = {}
    for k, v in m.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidConfigError(f"{name} must map str to str, got {k!r}: {v!r}")
        out[k] = v
    return out


def _argv(command: Any) -> List[str]:
    if isinstance(command, (str, bytes)):
        raise InvalidConfigError("command must be an argv list (not a shell string)")
    try:
        argv = list(command)
    except TypeError:
        raise InvalidConfigError(f"command must be a list of str, got {command!r}") from None
    if not all(isinstance(a, str) for a in argv):
        raise InvalidConfigError(f"command must be a list of str, got {argv!r}")
    return argv


def _conn_kwargs(conn: Optional[ConnectOptions]) -> Dict[str, Any]:
    if conn is None:
        return {}
    if isinstance(conn, Mapping):
        conn = ConnectOptions(**conn)
    if not isinstance(conn, ConnectOptions):
        raise InvalidConfigError(f"conn must be a ConnectOptions, got {type(conn).__name__}")
    if conn.egress_interceptor is not None:
        raise NotSupportedError("ConnectOptions.egress_interceptor is not supported yet")
    return {"target": conn.target, "base_url": conn.base_url, "api_key": conn.api_key}


def _create_kwargs(config: Optional[MachineConfig]) -> Dict[str, Any]:
    """The native create's keyword arguments: shapes only. Values are checked by the core's one
    validation, and a field the target cannot honour is refused by its backend
    (``NotSupportedError`` naming the field and the target)."""
    if config is None:
        config = MachineConfig()
    elif isinstance(config, Mapping):
        config = MachineConfig(**config)
    if not isinstance(config, MachineConfig):
        raise InvalidConfigError(f"config must be a MachineConfig, got {type(config).__name__}")
    r = config.resources if config.resources is not None else ResourceSpec()
    if isinstance(r, Mapping):
        r = ResourceSpec(**r)
    mounts = []
    for m in config.mounts or []:
        if isinstance(m, Mapping):
            m = MountSpec(**m)
        if not isinstance(m.source, str) or not isinstance(m.target, str):
            raise InvalidConfigError(f"mount source and target must be str, got {m!r}")
        mounts.append((m.source, m.target, bool(m.effective_read_only), bool(m.staged)))
    ports = []
    for p in config.ports or []:
        if isinstance(p, Mapping):
            p = PortSpec(**p)
        ports.append((_int("PortSpec.host", p.host, 0, 65535), _int("PortSpec.guest", p.guest, 0, 65535)))
    kw: Dict[str, Any] = {
        "name": config.name,
        "image": config.image,
        "mounts": mounts,
        "ports": ports,
        "network": r.network,
        "top_network": config.network,
        "persistent": bool(config.persistent),
        "detach": bool(config.detach),
        "labels": _str_map("labels", config.labels),
        "ready_timeout": float(config.ready_timeout_seconds),
        "wait_for_ports": bool(config.wait_for_ports),
        "allow_cidrs": _str_list("ResourceSpec.allow_cidrs", r.allow_cidrs),
        "allow_hosts": _str_list("ResourceSpec.allow_hosts", r.allow_hosts),
        "gpu": r.gpu,
        "cuda": r.cuda,
        "disk_durability": r.disk_durability,
        # SPEC §3.4: __post_init__ folded branchable / checkpoint into forkable
        "branchable": bool(config.forkable) if config.forkable or config.branchable is not None else None,
    }
    for f in ("cpus", "memory_mb", "storage_gb", "overlay_gb", "gpu_vram_mib"):
        kw[f] = _opt_int(f"ResourceSpec.{f}", getattr(r, f))
    for f in ("auto_stop_seconds", "ttl_seconds"):
        kw[f] = _opt_int(f"MachineConfig.{f}", getattr(config, f), (1 << 64) - 1)
    # The image workload (SPEC §3.4): ``command`` (else the image's Entrypoint + Cmd) launched
    # in the background at create and at every boot, with ``env`` and ``workdir``.
    if config.command is not None:
        kw["command"] = _argv(config.command)
    if config.workdir is not None:
        if not isinstance(config.workdir, str):
            raise InvalidConfigError(f"MachineConfig.workdir must be a str, got {config.workdir!r}")
        kw["workdir"] = config.workdir
    kw["env"] = _str_map("MachineConfig.env", config.env)
    if config.user is not None:
        if not isinstance(config.user, str):
            raise InvalidConfigError(f"MachineConfig.user must be a str, got {config.user!r}")
        kw["user"] = config.user
    if config.egress_interceptor is not None:
        i = config.egress_interceptor
        if isinstance(i, Mapping):
            i = EgressInterceptor(**i)
        if not isinstance(i, EgressInterceptor):
            raise InvalidConfigError(f"egress_interceptor must be an EgressInterceptor, got {type(i).__name__}")
        kw["egress_interceptor"] = (i.address, i.token)
    creds = []
    for c in config.credentials or []:
        if isinstance(c, Mapping):
            c = CredentialSpec(**c)
        if not isinstance(c, CredentialSpec):
            raise InvalidConfigError(f"credentials must be CredentialSpecs, got {type(c).__name__}")
        creds.append((c.name, c.env_var, _str_list("CredentialSpec.hosts", c.hosts), c.value,
                      None if c.methods is None else _str_list("CredentialSpec.methods", c.methods)))  # fmt: skip
    kw["credentials"] = creds
    if config.cache_disk is not None:
        d = config.cache_disk
        if isinstance(d, Mapping):
            d = CacheDiskRef(**d)
        if not isinstance(d, CacheDiskRef):
            raise InvalidConfigError(f"cache_disk must be a CacheDiskRef, got {type(d).__name__}")
        kw["cache_disk"] = (d.cache, _opt_int("CacheDiskRef.version", d.version, (1 << 64) - 1),
                            d.mount_path, bool(d.slot))  # fmt: skip
    return kw


def _seconds(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise InvalidConfigError(f"{name} must be a number of seconds > 0, got {v!r}")
    return float(v)


def _exec_kwargs(opts: Optional[ExecOptions]) -> Dict[str, Any]:
    if opts is None:
        return {}
    if isinstance(opts, Mapping):
        opts = ExecOptions(**opts)
    if not isinstance(opts, ExecOptions):
        raise InvalidConfigError(f"opts must be an ExecOptions, got {type(opts).__name__}")
    stdin = opts.stdin
    if isinstance(stdin, str):
        stdin = stdin.encode()
    elif stdin is not None:
        stdin = bytes(stdin)
        try:
            stdin.decode()
        except UnicodeDecodeError:
            raise InvalidConfigError("ExecOptions.stdin bytes must be UTF-8") from None
    t = opts.timeout
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        raise InvalidConfigError(f"timeout must be a number of seconds, got {t!r}")
    return {
        "env": _str_map("env", opts.env),
        "workdir": opts.workdir,
        "timeout": None if t is None else float(t),
        "user": opts.user,
        "stdin": stdin,
        "background": bool(opts.background),
        "output": opts.output,
    }


def _check_run(image: Any, command: Any, opts: Any) -> List[str]:
    if not isinstance(image, str):
        raise InvalidConfigError(f"image must be a str, got {image!r}")
    if getattr(opts, "user", None) is not None or (isinstance(opts, Mapping) and opts.get("user")):
        raise NotSupportedError(
            "run(image, ...) does not take a user; use exec() in a machine created from the image"
        )
    return _argv(command)


def _branch_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidConfigError(f"name must be a str, got {name!r}")
    return name


def _branch_checks(checkpointable: Any) -> None:
    """Options of ``branch`` the engine does not have yet: refused by name, never ignored."""
    if checkpointable:
        raise NotSupportedError(
            "branch(checkpointable=True) is not supported yet: a clone cannot be checkpointed"
        )


def _port_pairs(ports: Any) -> List[Tuple[int, int]]:
    """``PortSpec``s (or dicts) as the native ``[(host, guest)]``."""
    out = []
    for p in ports or []:
        if isinstance(p, Mapping):
            p = PortSpec(**p)
        if not isinstance(p, PortSpec):
            raise InvalidConfigError(f"ports must be PortSpecs, got {type(p).__name__}")
        out.append((_int("PortSpec.host", p.host, 0, 65535), _int("PortSpec.guest", p.guest, 0, 65535)))
    return out


def _result(t: Tuple[Any, ...], argv: List[str]) -> ExecResult:
    # The text is decoded once from the bytes (invalid UTF-8 becomes U+FFFD).
    code, out_b, err_b, out_cut, err_cut, timed_out, pid = t
    return ExecResult(
        exit_code=code, stdout=out_b.decode("utf-8", "replace"),
        stderr=err_b.decode("utf-8", "replace"), stdout_truncated=out_cut,
        stderr_truncated=err_cut, stdout_bytes=out_b, stderr_bytes=err_b,
        pid=pid, timed_out=timed_out, _command=argv,
    )  # fmt: skip


def _summary(r: Dict[str, Any]) -> MachineSummary:
    """A native row (mapped once, in the core's terms) as the dataclass."""
    cpus, memory_mib, storage_gib = r.pop("resources")
    ports = [PublishedPort(guest=g, host=h, protocol=p) for (g, h, p) in r.pop("ports")]
    return MachineSummary(
        **r,
        resources=MachineSizes(cpus=cpus, memory_mib=memory_mib, storage_gib=storage_gib),
        ports=ports,
    )


# ---- process-exit cleanup (SPEC §9.6) --------------------------------------------------------

# Every live handle of this process, by machine name. The engine lets one process attach to a
# machine once, so open()/connect() of a machine this process already holds share its handle.
_handles: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_live: "weakref.WeakSet[Machine]" = weakref.WeakSet()
_lock = threading.Lock()


def _held(name: str, conn: Dict[str, Any]) -> Any:
    """The native handle this process holds for ``name`` when the target is local."""
    if _need_native().Machine.resolve_target(**conn) == "cloud":
        return None
    with _lock:
        n = _handles.get(name)
    if n is not None and n.state() != "deleted":
        return n
    return None


@atexit.register
def _release_all() -> None:
    """Drops this process's handles: a non-persistent machine it created is killed and its files
    removed at once; a persistent one powers itself off (the engine's linger), a detached one
    keeps running."""
    with _lock:
        machines = list(_live)
    for m in machines:
        m._native = None


# ---- Machine ---------------------------------------------------------------------------------


class Machine:
    """A microVM sandbox (SPEC §4). Methods block, with the GIL released; a ``with`` block
    deletes the machine on exit, also when the block raised."""

    __slots__ = ("_native", "_name", "__weakref__")

    def __init__(self, *_a: Any, **_k: Any) -> None:
        raise TypeError("use Machine.create(), Machine.connect() or Machine.open()")

    @classmethod
    def _wrap(cls, native: Any) -> "Machine":
        m = cls.__new__(cls)
        m._native = native
        m._name = native.name
        with _lock:
            _live.add(m)
            _handles[m._name] = native
        return m

    @property
    def _n(self) -> Any:
        n = self._native
        if n is None:
            raise NotSupportedError("this Machine handle was released at interpreter exit")
        return n

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, config: Optional[MachineConfig] = None, conn: Optional[ConnectOptions] = None
    ) -> "Machine":
        """Creates and starts a machine; returns once it is ready. A failed create leaves
        nothing behind."""
        native = _need_native()
        kw = _create_kwargs(config)
        kw.update(_conn_kwargs(conn))
        return cls._wrap(native.Machine.create(**kw))

    @classmethod
    def connect(cls, machine_id: str, conn: Optional[ConnectOptions] = None) -> "Machine":
        """Attaches to an existing machine by name (of any process), booting it if stopped."""
        native = _need_native()
        kw = _conn_kwargs(conn)
        held = _held(machine_id, kw)
        if held is not None:
            if held.state() != "running":
                held.start()
            return cls._wrap(held)
        return cls._wrap(native.Machine.connect(machine_id, **kw))

    @classmethod
    def open(cls, machine_id: str, conn: Optional[ConnectOptions] = None) -> "Machine":
        """A handle to an existing machine without booting it (NotFoundError if missing)."""
        native = _need_native()
        kw = _conn_kwargs(conn)
        held = _held(machine_id, kw)
        if held is not None:
            return cls._wrap(held)
        return cls._wrap(native.Machine.open(machine_id, **kw))

    @classmethod
    def delete_by_name(
        cls, machine_id: str, conn: Optional[ConnectOptions] = None, drain_secs: Optional[float] = None
    ) -> None:
        """Deletes a machine without booting it; a name that does not exist is not an error."""
        if drain_secs is not None:
            raise NotSupportedError("drain_secs is not supported by the local engine yet")
        try:
            m = cls.open(machine_id, conn)
        except NotFoundError:
            return
        m.delete()

    @staticmethod
    def list(
        conn: Optional[ConnectOptions] = None, labels: Optional[Mapping[str, str]] = None
    ) -> List[MachineSummary]:
        """Every machine (of every process, locally) carrying all of ``labels``. The target
        follows the rule of SPEC §2.2 (local unless a cloud target or key is given)."""
        native = _need_native()
        rows = native.Machine.list(_str_map("labels", labels), **_conn_kwargs(conn))
        return [_summary(r) for r in rows]

    # -- identity and state ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> str:
        """The target's id: locally the name, on the cloud the server's ``mach-…``."""
        return self._n.id

    @property
    def target(self) -> str:
        """``"local"`` or ``"cloud"``: where this machine is."""
        return self._n.target

    def state(self) -> str:
        """``"created"``, ``"running"``, ``"paused"``, ``"frozen"`` (a branch base),
        ``"stopped"`` (``"deleted"`` after delete)."""
        return self._n.state()

    def url(self) -> Optional[str]:
        """Public ingress URL (cloud); always None locally."""
        return self._n.url()

    def ready(self) -> bool:
        """Whether the machine is ready (SPEC §4.2): running, and every published guest port
        has a listener behind it (a connection to its host port stays open)."""
        return self._n.ready()

    def _ready_cancellable(self, token: Any) -> bool:
        return self._n.ready(token)

    def ready_at(self) -> Optional[str]:
        """When the machine became ready (cloud, RFC 3339); always None locally."""
        return None

    def wait_until_ready(self, timeout_s: float = 120.0, interval_s: float = 1.0) -> None:
        """Polls ``ready()`` every ``interval_s`` seconds until it is true; raises
        ``SmolTimeoutError`` (code ``TIMEOUT``) after ``timeout_s`` seconds. Both must be > 0
        (``InvalidConfigError``)."""
        self._n.wait_until_ready(_seconds("timeout_s", timeout_s), _seconds("interval_s", interval_s))

    def _wait_until_ready_cancellable(self, timeout_s: float, interval_s: float, token: Any) -> None:
        self._n.wait_until_ready(
            _seconds("timeout_s", timeout_s), _seconds("interval_s", interval_s), token
        )

    # -- execution ------------------------------------------------------------------------------

    def exec(self, command: Sequence[str], opts: Optional[ExecOptions] = None) -> ExecResult:
        """Runs ``command`` (an argv list) to completion. A non-zero exit is not an exception;
        a timeout gives exit code 124 and the output so far.

        With ``ExecOptions(background=True)`` the command is started detached and the call
        returns at once: exit code 0, stdout ``pid=<n>\n`` and ``pid`` set (a program that cannot
        start gives its exit code, 127 when not found, and no pid). The command's output is
        discarded; it takes no stdin and no timeout (``InvalidConfigError``)."""
        argv = _argv(command)
        return _result(self._n.exec(argv, **_exec_kwargs(opts)), argv)

    def _exec_cancellable(
        self, command: Sequence[str], opts: Optional[ExecOptions], token: Any
    ) -> ExecResult:
        argv = _argv(command)
        return _result(self._n.exec(argv, cancel=token, **_exec_kwargs(opts)), argv)

    def run(
        self, image: str, command: Sequence[str], opts: Optional[ExecOptions] = None
    ) -> ExecResult:
        """Runs ``command`` in a container of ``image`` inside this machine (local only)."""
        argv = _check_run(image, command, opts)
        return _result(self._n.run(image, argv, **_exec_kwargs(opts)), argv)

    def _run_cancellable(
        self, image: str, command: Sequence[str], opts: Optional[ExecOptions], token: Any
    ) -> ExecResult:
        argv = _check_run(image, command, opts)
        return _result(self._n.run(image, argv, cancel=token, **_exec_kwargs(opts)), argv)

    def exec_stream(
        self, command: Sequence[str], opts: Optional[ExecOptions] = None
    ) -> "Iterator[Dict[str, Any]]":
        """Runs ``command``, yielding ``{"kind": "stdout"|"stderr", "data": str}`` as output is
        produced, then ``{"kind": "exit", "exit_code": int}`` (or ``{"kind": "error",
        "message": str, "code": str, "error": SmolError}``: ``raise ev["error"]`` raises the
        typed exception of the code). The returned ``ExecStream`` kills the command on ``kill()``,
        ``close()``, ``with``-exit or garbage collection."""
        return self._n.exec_stream(_argv(command), **_exec_kwargs(opts))

    # -- files ----------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """The bytes of the absolute guest ``path``."""
        return self._n.read_file(_guest_path(path))

    def write_file(self, path: str, data: Union[str, bytes], mode: Optional[int] = None) -> None:
        """Writes ``data`` (a str is UTF-8 encoded) to the absolute guest ``path``, creating
        parent directories, with permission ``mode`` (default 0o644)."""
        path = _guest_path(path)
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            try:
                data = bytes(memoryview(data))  # bytearray, memoryview, array...; not an int
            except TypeError:
                raise InvalidConfigError(f"data must be str or bytes, got {type(data).__name__}") from None
        if mode is not None:
            mode = _int("mode", mode, 0, 0o7777)
        self._n.write_file(path, data, mode)

    # -- images ---------------------------------------------------------------------------------

    def pull_image(self, image: str) -> ImageInfo:
        """Pulls ``image`` into the engine's image cache (local only)."""
        return ImageInfo(*self._n.pull_image(image))

    def list_images(self) -> List[ImageInfo]:
        """The images in the engine's cache (local only)."""
        return [ImageInfo(*i) for i in self._n.list_images()]

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, egress_interceptor: Any = None, wait_until_ready: bool = True) -> None:
        """Boots a stopped machine from its disk."""
        if egress_interceptor is not None:
            raise NotSupportedError("start(egress_interceptor=...) is not supported yet")
        self._n.start()

    def stop(self, drain_secs: Optional[float] = None, timeout_secs: Optional[float] = None) -> None:
        """Stops the machine (clean guest power-off); its disk stays."""
        if drain_secs is not None or timeout_secs is not None:
            raise NotSupportedError("stop(drain_secs, timeout_secs) is not supported yet")
        self._n.stop()

    def delete(self, include_usage: bool = False, drain_secs: Optional[float] = None) -> None:
        """Stops the machine and removes everything it had. Deleting twice is not an error."""
        if include_usage:
            raise NotSupportedError("delete(include_usage=True) is cloud-only")
        if drain_secs is not None:
            raise NotSupportedError("delete(drain_secs=...) is not supported yet")
        self._n.delete()

    def pause(self) -> None:
        """Stops the machine's vCPUs; it keeps its memory and reads ``"paused"``. ``exec`` and
        file operations raise ``InvalidStateError`` until ``resume()``; ``stop()`` and
        ``delete()`` work on a paused machine. Pausing a paused machine does nothing."""
        self._n.pause()

    def resume(self, wait_until_ready: bool = True) -> None:
        """Lets a paused machine go on where it was (resuming a running one does nothing)."""
        self._n.resume()
        if wait_until_ready:
            self.wait_until_ready()

    # -- branching (SPEC §4.8) ------------------------------------------------------------------

    def branch(
        self,
        name: str,
        ports: Optional[Sequence[PortSpec]] = None,
        *,
        branchable: bool = False,
        checkpointable: Optional[bool] = None,
        freeze_source: bool = False,
    ) -> "Machine":
        """A running copy-on-write clone named ``name`` of this running, branchable machine
        (``MachineConfig(branchable=True)``): the source's memory, processes, files and disk as
        of the branch instant, its own hostname (``name``) and a reseeded RNG. ``ports``
        (``PortSpec``s) are the clone's; None republishes the source's guest ports on free host
        ports. ``branchable=True`` makes the clone a branch source too. ``freeze_source=True``
        leaves the source a frozen base that can be branched again but never runs commands
        again. A source that is not branchable, or not running, raises ``InvalidStateError``."""
        _branch_checks(checkpointable)
        native = self._n.branch(
            _branch_name(name), _port_pairs(ports), branchable=bool(branchable),
            freeze_source=bool(freeze_source),
        )  # fmt: skip
        return Machine._wrap(native)

    def fork(
        self, name: str, ports: Optional[Sequence[PortSpec]] = None, *, checkpointable: bool = False
    ) -> "Machine":
        """Deprecated alias of ``branch(name, ports)``."""
        return self.branch(name, ports, checkpointable=checkpointable)

    def branch_batch(
        self,
        count: Optional[int] = None,
        *,
        names: Optional[Sequence[str]] = None,
        name_prefix: Optional[str] = None,
        ports: Optional[Sequence[PortSpec]] = None,
        freeze_source: bool = False,
    ) -> "List[Machine]":
        """Several running clones, all or nothing: ``names``, or ``count`` (1..64) clones named
        ``{name_prefix}-{n}`` with n from 1 (prefix ``"branch"`` by default); ``names`` wins
        over ``count``. When one clone fails, the clones already made are deleted and the
        error is raised. Neither ``count`` nor ``names`` raises ``InvalidConfigError``."""
        if count is not None:
            count = _int("count", count, 0, 1 << 16)
        names_list = _str_list("names", names)
        if name_prefix is not None and not isinstance(name_prefix, str):
            raise InvalidConfigError(f"name_prefix must be a str, got {name_prefix!r}")
        natives = self._n.branch_batch(
            count, names=names_list, name_prefix=name_prefix, ports=_port_pairs(ports),
            freeze_source=bool(freeze_source),
        )  # fmt: skip
        return [Machine._wrap(n) for n in natives]

    def fork_batch(
        self,
        count: Optional[int] = None,
        *,
        names: Optional[Sequence[str]] = None,
        name_prefix: Optional[str] = None,
        ports: Optional[Sequence[PortSpec]] = None,
        freeze_source: bool = False,
    ) -> "List[Machine]":
        """Deprecated alias of ``branch_batch``."""
        return self.branch_batch(
            count, names=names, name_prefix=name_prefix, ports=ports, freeze_source=freeze_source
        )

    def reward_fork(
        self, command: Sequence[str], opts: Optional[ExecOptions] = None, name: Optional[str] = None
    ) -> ExecResult:
        """Runs ``command`` in a throw-away clone named ``{name}-rf-{8 hex}`` (``name``: this
        machine's name by default) and returns its result; the clone is always deleted (a
        failed delete is logged, not raised)."""
        argv = _argv(command)
        if name is not None:
            name = _branch_name(name)
        return _result(self._n.reward_fork(argv, name=name, **_exec_kwargs(opts)), argv)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(
        self, output: Optional[Union[str, "os.PathLike[str]"]] = None, *, store: Optional[str] = None
    ) -> Dict[str, Any]:
        """A portable checkpoint of this running (or paused) branchable machine, which keeps
        running (SPEC §4.8, docs/CHECKPOINTS.md). Locally ``output`` (the ``.smolcheckpoint``
        file to write) is required (``InvalidConfigError``); returns the PortableCheckpointInfo
        dict: ``id`` (the file's absolute path), ``machine_id``, ``status`` ("available"),
        ``size_bytes``, ``arch``, ``created_at``, ``download_url``, ``path``,
        ``source_pause_ms``, ``elapsed_ms``."""
        out = None if output is None else os.fspath(output)
        return dict(self._n.checkpoint(out, store=None if store is None else os.fspath(store)))

    def checkpoints(self) -> List[Dict[str, Any]]:
        """The machine's checkpoints (cloud; locally ``NotSupportedError``)."""
        return [dict(c) for c in self._n.checkpoints()]

    @classmethod
    def restore_checkpoint(
        cls,
        checkpoint_id: Union[str, "os.PathLike[str]"],
        name: str,
        conn: Optional[ConnectOptions] = None,
        network: Optional[bool] = None,
        cache_disk: Any = None,
        *,
        keep_identity: bool = False,
    ) -> "Machine":
        """A new running machine ``name`` from a checkpoint: locally a ``.smolcheckpoint`` file,
        verified whole before anything starts (a damaged file is ``InvalidConfigError``). With
        ``conn`` None the target is inferred from the id (SPEC §4.8). The machine has the
        checkpointed memory, processes and disk, its own hostname and a reseeded RNG (unless
        ``keep_identity``, local only)."""
        if cache_disk is not None:
            raise NotSupportedError("restore_checkpoint(cache_disk=...) is not supported yet")
        native = _need_native()
        native_m = native.Machine.restore_checkpoint(
            os.fspath(checkpoint_id), _branch_name(name), conn_given=conn is not None,
            keep_identity=bool(keep_identity), network=network, **_conn_kwargs(conn),
        )  # fmt: skip
        return cls._wrap(native_m)

    @classmethod
    def restore(
        cls,
        checkpoint_id: Union[str, "os.PathLike[str]"],
        name: str,
        conn: Optional[ConnectOptions] = None,
    ) -> "Machine":
        """Alias of :meth:`restore_checkpoint`."""
        return cls.restore_checkpoint(checkpoint_id, name, conn)

    @staticmethod
    def delete_checkpoint(
        checkpoint_id: Union[str, "os.PathLike[str]"], conn: Optional[ConnectOptions] = None
    ) -> None:
        """Removes a checkpoint: locally the file (``NotFoundError`` if it is missing)."""
        native = _need_native()
        native.Machine.delete_checkpoint(
            os.fspath(checkpoint_id), conn_given=conn is not None, **_conn_kwargs(conn)
        )

    @staticmethod
    def export_checkpoint(
        source: Union[str, "os.PathLike[str]"], output: Union[str, "os.PathLike[str]"]
    ) -> int:
        """Writes the local checkpoint ``source`` (one made with ``checkpoint(output,
        store=...)``, or a standalone file) as one standalone, portable ``.smolcheckpoint``
        file ``output``, after verifying it whole. Returns the bytes written."""
        return _need_native().Machine.export_checkpoint(os.fspath(source), os.fspath(output))

    @staticmethod
    def prune_checkpoint_store(store: Union[str, "os.PathLike[str]"]) -> int:
        """Removes the chunks of the local checkpoint store ``store`` that no checkpoint still
        names. Returns the bytes freed."""
        return _need_native().Machine.prune_checkpoint_store(os.fspath(store))

    # -- ports ----------------------------------------------------------------------------------

    def ports(self) -> List[PublishedPort]:
        """The published ports, including those published at runtime."""
        return [PublishedPort(guest=g, host=h, protocol="tcp") for (h, g) in self._n.ports()]

    def publish(
        self, guest: int, host: Optional[int] = None, protocol: str = "tcp"
    ) -> PublishedPort:
        """Publishes guest port ``guest`` of the running machine on ``127.0.0.1:host``, or on a
        free host port when ``host`` is None (SPEC §4.7). Ports must be integers in 1..65535 and
        ``protocol`` "tcp" or "udp" (``InvalidConfigError``); UDP is not relayed by the local
        engine (``NotSupportedError``). A busy host port raises ``ConflictError``, a machine that
        is not running ``InvalidStateError``."""
        guest = _int("guest", guest, 1, 65535)
        if host is not None:
            host = _int("host", host, 1, 65535)
        h, g = self._n.publish(guest, host, _protocol(protocol))
        return PublishedPort(guest=g, host=h, protocol="tcp")

    def unpublish(
        self, guest: Optional[int] = None, host: Optional[int] = None, protocol: str = "tcp"
    ) -> None:
        """Stops publishing the ports matching ``guest`` and/or ``host`` (at least one is needed,
        else ``InvalidConfigError``); connections already open carry on. No published port
        matching is ``NotFoundError``."""
        if guest is not None:
            guest = _int("guest", guest, 1, 65535)
        if host is not None:
            host = _int("host", host, 1, 65535)
        protocol = _protocol(protocol)
        if guest is None and host is None:
            raise InvalidConfigError("unpublish needs a guest or a host port")
        self._n.unpublish(guest, host, protocol)

    def endpoint(self, port: int, path: Optional[str] = None) -> PortEndpoint:
        """``http://127.0.0.1:<host port>[/path]`` (and ``ws://``) of a published guest port;
        ``InvalidConfigError`` when ``port`` is not published."""
        _int("port", port, 1, 65535)
        http, ws, headers = self._n.endpoint(port, path)
        return PortEndpoint(http_url=http, ws_url=ws, headers=dict(headers))

    def request(
        self,
        port: int,
        path: Optional[str] = None,
        method: str = "GET",
        data: Optional[bytes] = None,
        timeout_s: float = 30.0,
    ) -> bytes:
        """An HTTP request to the published guest ``port`` through ``endpoint(port, path)``;
        returns the raw response body. ``InvalidConfigError`` when the port is not published;
        a connection, protocol or HTTP error (status >= 400, with ``status`` set) or a timeout
        raises ``SmolError`` with code ``NETWORK_ERROR``."""
        if not isinstance(method, str) or not method:
            raise InvalidConfigError(f"method must be a non-empty str, got {method!r}")
        if data is not None:
            if isinstance(data, str):
                data = data.encode()
            else:
                try:
                    data = bytes(memoryview(data))
                except TypeError:
                    raise InvalidConfigError(
                        f"data must be bytes or None, got {type(data).__name__}"
                    ) from None
        timeout = _seconds("timeout_s", timeout_s)
        ep = self.endpoint(port, path)
        req = urllib.request.Request(ep.http_url, data=data, method=method.upper(), headers=ep.headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = b""
            try:
                body = e.read()
            except Exception:  # noqa: BLE001 - the status is what matters
                pass
            finally:
                e.close()
            detail = body[:200].decode("utf-8", "replace").strip()
            raise SmolError(
                "NETWORK_ERROR",
                f"{method.upper()} {ep.http_url} -> HTTP {e.code} {e.reason}" + (f": {detail}" if detail else ""),
                status=e.code,
            ) from e
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise SmolError(
                "NETWORK_ERROR", f"{method.upper()} {ep.http_url} failed: {reason}"
            ) from e

    # -- context manager, repr ------------------------------------------------------------------

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.delete()

    def __repr__(self) -> str:
        n = self._native
        target = n.target if n is not None else "released"
        return f"Machine(name={self._name!r}, target={target!r})"


class LocalAvailability(tuple):
    """``(available, code, reason)`` (SPEC §3.10), with two attributes more: ``accel`` (``kvm``
    or ``tcg`` when available) and ``assets``: ``(source, dir, description)`` of the guest
    assets in use, ``source`` being ``env`` (SMOL_ASSETS), ``packaged`` (inside this installed
    package) or ``home`` (the set-up's), or ``None`` when they cannot be told."""

    def __new__(cls, available: bool, code: Optional[str], reason: Optional[str],
                accel: Optional[str] = None,
                assets: Optional[Tuple[str, str, str]] = None) -> "LocalAvailability":
        self = super().__new__(cls, (available, code, reason))
        self.accel = accel
        self.assets = assets
        return self

    @property
    def available(self) -> bool:
        return bool(self[0])

    @property
    def code(self) -> Optional[str]:
        return self[1]

    @property
    def reason(self) -> Optional[str]:
        return self[2]


def local_availability() -> LocalAvailability:
    """``(available, code, reason)``: whether this host can run local machines (SPEC §3.10);
    ``.accel`` and ``.assets`` say with which accelerator and which guest assets. Never raises."""
    if _native is None:
        return LocalAvailability(False, "RUNTIME_NOT_INSTALLED", f"the native engine is not available: {_native_error}")
    try:
        available, code, reason, accel = _native.local_availability()
        assets = _native.local_assets()
    except Exception as e:  # noqa: BLE001 - documented to never raise
        return LocalAvailability(False, "RUNTIME_NOT_INSTALLED", str(e))
    return LocalAvailability(bool(available), code, reason, accel, assets)
