"""smol: microVM sandboxes you can embed in a program.

    from smol import Machine
    with Machine.create() as m:
        print(m.exec(["uname", "-a"]).stdout)

The API is the smolmachines ``Machine`` API (module ``smol``): synchronous ``Machine`` and
``AsyncMachine``, dataclass configs, typed errors. It runs on the embedded local engine (QEMU
microVMs driven by the Rust core inside this process; no daemon).
"""

from . import _log
from ._async import AsyncMachine
from ._machine import ExecStream, LocalAvailability, Machine, local_availability
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
    MachineState,
    MachineSummary,
    MountSpec,
    PortEndpoint,
    PortSpec,
    PublishedPort,
    ResourceSpec,
)
from . import errors
from .errors import (
    BootFailedError,
    ConflictError,
    ExecutionError,
    ForbiddenError,
    HypervisorUnavailableError,
    InvalidConfigError,
    InvalidStateError,
    MachineInterruptedError,
    NotFoundError,
    NotSupportedError,
    PaymentRequiredError,
    RateLimitedError,
    RuntimeNotInstalledError,
    InsufficientMemoryError,
    SmolConnectionError,
    SmolError,
    SmolTimeoutError,
    UnauthorizedError,
)

try:
    from ._native import __version__
except ImportError:  # pragma: no cover - a broken install
    __version__ = "0.0.0"

__all__ = [
    "Machine",
    "AsyncMachine",
    "ExecStream",
    "local_availability",
    "LocalAvailability",
    "CacheDiskRef",
    "ConnectOptions",
    "CredentialSpec",
    "EgressInterceptor",
    "ExecOptions",
    "ExecResult",
    "ImageInfo",
    "MachineConfig",
    "MachineSizes",
    "MachineState",
    "MachineSummary",
    "MountSpec",
    "PortEndpoint",
    "PortSpec",
    "PublishedPort",
    "ResourceSpec",
    *errors.__all__,
    "__version__",
]

_log.start()
