"""Configuration and result dataclasses (SPEC §2.1, §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from .errors import ExecutionError, InvalidConfigError

__all__ = [
    "ResourceSpec",
    "MountSpec",
    "PortSpec",
    "CredentialSpec",
    "EgressInterceptor",
    "CacheDiskRef",
    "MachineConfig",
    "ExecOptions",
    "ConnectOptions",
    "ExecResult",
    "ImageInfo",
    "PortEndpoint",
    "PublishedPort",
    "MachineSizes",
    "MachineSummary",
    "MachineState",
]

#: A machine state string: "created", "running", "stopped" (and "deleted" after delete).
MachineState = str


@dataclass
class ResourceSpec:
    """CPU, memory, disk and network of a machine (SPEC §3.1)."""

    cpus: Optional[int] = None
    memory_mb: Optional[int] = None
    #: Egress (local default off). The guest cannot reach host loopback services, but does reach
    #: host services bound to 0.0.0.0 through the host's own address (no egress policy yet).
    network: Optional[bool] = None
    allow_cidrs: Optional[List[str]] = None
    allow_hosts: Optional[List[str]] = None
    storage_gb: Optional[int] = None
    overlay_gb: Optional[int] = None
    gpu: Optional[bool] = None
    gpu_vram_mib: Optional[int] = None
    disk_durability: Optional[str] = None
    cuda: Optional[bool] = None


@dataclass
class MountSpec:
    """A host directory mounted into the guest (SPEC §3.2; local only)."""

    source: str
    target: str
    read_only: bool = False
    readonly: Optional[bool] = None
    staged: bool = False

    @property
    def effective_read_only(self) -> bool:
        """``readonly`` (the deprecated alias) wins when it is set."""
        return self.readonly if self.readonly is not None else self.read_only


@dataclass
class PortSpec:
    """A host -> guest TCP port forward (SPEC §3.3); the host side listens on 127.0.0.1."""

    host: int
    guest: int


@dataclass
class CredentialSpec:
    """A credential substituted into HTTPS requests to ``hosts`` (SPEC §3.5): ``name`` is 1-64
    characters of ``[a-z0-9_-]``, ``hosts`` exact host names. The local engine refuses it with
    ``NotSupportedError`` for now."""

    name: str
    env_var: str
    hosts: List[str]
    value: Optional[str] = field(default=None, repr=False)
    methods: Optional[List[str]] = None


@dataclass
class EgressInterceptor:
    """Binding for intercepted egress (SPEC §3.10). Not supported locally yet."""

    address: str
    token: str = field(repr=False)


@dataclass
class CacheDiskRef:
    """A cloud cache disk attached at create (SPEC §7.3); the local engine refuses it with
    ``NotSupportedError``."""

    cache: str
    version: Optional[int] = None
    mount_path: Optional[str] = None
    slot: bool = False


@dataclass
class MachineConfig:
    """Machine configuration (SPEC §3.4).

    Every SPEC field is here and reaches the engine's core, which validates values once for
    every front end (``InvalidConfigError``, e.g. ``cpus`` 1..64, ``memory_mb`` 64..1048576,
    ``storage_gb`` 1..16384, ``branchable`` and ``forkable`` are one field). A field the target
    cannot honour is refused by it with ``NotSupportedError`` naming the field and the target.
    The local engine honours ``name, image, labels, command, mounts, ports, resources (cpus,
    memory_mb, network, storage_gb), network, persistent, detach, ready_timeout_seconds, env,
    workdir, user``; it ignores ``auto_stop_seconds``, ``ttl_seconds`` (cloud sweeps, SPEC §11;
    still checked: > 0) and ``wait_for_ports``; it refuses the rest for now (``allow_cidrs``,
    ``allow_hosts``, ``branchable``, ``credentials``, ``egress_interceptor``, ``cache_disk``,
    ``gpu``, ``cuda``, ``overlay_gb``, ``disk_durability="deferred"``, staged mounts, a host
    port 0).

    The workload (SPEC §3.4): ``command`` (a non-empty argv, else ``ValueError`` here), or else
    the image's Entrypoint + Cmd, is launched in the background at create and at every later
    boot, with ``env`` over the image's Env and in ``workdir`` (an absolute guest path; else the
    image's WorkingDir). Its output goes to the guest file ``/var/log/smol/workload.log``. A
    workload that cannot start fails create with ``InvalidConfigError``, as do ``env`` or
    ``workdir`` when there is no workload (no command and an image without one, or no image).
    """

    name: Optional[str] = None
    image: Optional[str] = None
    labels: Optional[Dict[str, str]] = None
    command: Optional[List[str]] = None
    mounts: Optional[List[MountSpec]] = None
    ports: Optional[List[PortSpec]] = None
    resources: Optional[ResourceSpec] = None
    network: Optional[bool] = None
    persistent: bool = False
    detach: bool = False
    auto_stop_seconds: Optional[int] = None
    ttl_seconds: Optional[int] = None
    ready_timeout_seconds: float = 120.0
    wait_for_ports: bool = True
    branchable: Optional[bool] = None
    forkable: bool = False
    checkpoint: bool = False
    env: Optional[Dict[str, str]] = None
    workdir: Optional[str] = None
    user: Optional[str] = None
    egress_interceptor: Optional[EgressInterceptor] = None
    credentials: Optional[List[CredentialSpec]] = None
    cache_disk: Optional[CacheDiskRef] = None

    def __post_init__(self) -> None:
        if self.command is not None and (
            isinstance(self.command, str)
            or not self.command
            or not all(isinstance(a, str) and a for a in self.command)
        ):
            raise InvalidConfigError("command must be a non-empty list of non-empty strings")
        t = self.ready_timeout_seconds
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise InvalidConfigError(f"ready_timeout_seconds must be > 0, got {t!r}")
        if self.branchable is not None:
            self.forkable = bool(self.branchable)
        elif self.checkpoint:
            self.forkable = True


@dataclass
class ExecOptions:
    """Per-command options (SPEC §3.6). ``timeout`` is in seconds and must be > 0.
    ``background=True`` starts the command detached (``ExecResult.pid``); it then takes no
    ``stdin`` and no ``timeout``."""

    env: Optional[Dict[str, str]] = None
    workdir: Optional[str] = None
    timeout: Optional[float] = None
    user: Optional[str] = None
    stdin: Optional[Union[str, bytes]] = None
    output: Optional[str] = None
    background: bool = False


@dataclass
class ConnectOptions:
    """Backend selection (SPEC §2.1). Local by default; ``target="cloud"``, an ``api_key`` or
    ``SMOL_CLOUD_TOKEN`` select the cloud (a smolfleet server at ``base_url``, else
    ``SMOL_CLOUD_URL``, else https://api.smolmachines.com). The key never appears in ``repr``."""

    target: Optional[str] = None
    base_url: Optional[str] = None
    api_key: Optional[str] = field(default=None, repr=False)
    egress_interceptor: Optional[EgressInterceptor] = None
    wait_for_ports: bool = True
    max_retries: Optional[int] = None

    def __repr__(self) -> str:
        key = None if self.api_key is None else "<redacted>"
        return (
            f"ConnectOptions(target={self.target!r}, base_url={self.base_url!r}, "
            f"api_key={key}, egress_interceptor={self.egress_interceptor!r}, "
            f"wait_for_ports={self.wait_for_ports!r}, max_retries={self.max_retries!r})"
        )


@dataclass
class ExecResult:
    """Result of a finished command (SPEC §3.7). A non-zero exit is not an exception; a timeout
    gives exit code 124 (``timed_out`` is then true). ``pid`` is the guest process id of a
    command started with ``ExecOptions(background=True)``, else None.

    Output is capped per stream: locally at 16 MiB of bytes (the core's
    ``MAX_BUFFERED_OUTPUT``), in the cloud at 1 MiB of text. Past the cap the command runs on,
    the rest of that stream is dropped and ``stdout_truncated`` / ``stderr_truncated`` is true;
    use ``exec_stream`` for more."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    pid: Optional[int] = None
    timed_out: bool = False
    _command: Optional[List[str]] = field(default=None, repr=False, compare=False)

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """stdout, then (when stderr is not empty) a newline if stdout is not empty, and stderr."""
        if not self.stderr:
            return self.stdout
        return f"{self.stdout}\n{self.stderr}" if self.stdout else self.stderr

    def assert_success(self, command: str = "") -> "ExecResult":
        """Returns self, or raises ``ExecutionError`` when the exit code is not 0. ``command``
        defaults to the argv this result came from."""
        if self.exit_code != 0:
            if not command and self._command:
                command = " ".join(self._command)
            raise ExecutionError(command, self.exit_code, self.stdout, self.stderr)
        return self


@dataclass
class ImageInfo:
    """An image in the engine's cache (SPEC §3.8)."""

    reference: str
    digest: str
    size: int
    architecture: str
    os: str


@dataclass
class PortEndpoint:
    """Where a published port is reached (SPEC §3.10)."""

    http_url: str
    ws_url: str
    headers: Dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class PublishedPort:
    """A published port (SPEC §3.10): ``host`` on 127.0.0.1 forwards to ``guest``."""

    guest: int
    host: Optional[int] = None
    protocol: str = "tcp"


@dataclass
class MachineSizes:
    """Sizes of a listed machine (SPEC §3.10): vCPUs, memory in MiB, writable disk in GiB."""

    cpus: int
    memory_mib: int
    storage_gib: Optional[int] = None


@dataclass
class MachineSummary:
    """A machine as ``Machine.list`` returns it (SPEC §3.10). Locally ``id == name``; ``pid``
    is the VMM process while it runs; ``accel`` is ``kvm`` or ``tcg``.

    ``image`` is the reference the machine was created from (None for a bare machine);
    ``detached`` says the VM outlives its process; ``created_at`` is the creation time as an
    RFC 3339 / ISO-8601 UTC string with whole seconds (``"2025-01-31T12:00:00Z"``, the form of
    the cloud's ``createdAt``; parse it with ``datetime.fromisoformat(s.replace("Z",
    "+00:00"))``); ``resources`` has the vCPUs, memory (MiB) and disk (GiB); ``ports`` lists
    the published ports (``host`` on 127.0.0.1 -> ``guest``, protocol ``"tcp"``), empty when
    none is published."""

    id: str
    name: str
    state: str
    labels: Dict[str, str] = field(default_factory=dict)
    image: Optional[str] = None
    persistent: bool = True
    detached: bool = False
    branchable: bool = False
    created_at: Optional[str] = None
    pid: Optional[int] = None
    resources: Optional[MachineSizes] = None
    ports: Optional[List[PublishedPort]] = None
    accel: Optional[str] = None
