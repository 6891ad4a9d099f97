"""The exception hierarchy of smol (SPEC §8.1).

Every error of the Rust core reaches Python through one function (``_from_native``, called by
``bindings/python/src/errors.rs``), which picks the class from the error's stable ``code``
(SPEC §8.2, §8.3) in one table (``_CLASS_BY_CODE``) and sets its typed fields::

    SmolError                      .code, .message, .hint, .status, .problem_code, .retryable,
     │                             .retry_after_s (+ the typed fields of the error, below)
     ├─ NotSupportedError           NOT_SUPPORTED, UNSUPPORTED_PLATFORM
     ├─ InvalidConfigError          INVALID_CONFIG, CONFIG_ERROR (also a ValueError)
     ├─ ExecutionError              COMMAND_FAILED (.command, .exit_code, .stdout, .stderr)
     ├─ NotFoundError               NOT_FOUND (machine, guest path, image, asset)
     ├─ ConflictError               CONFLICT (name taken: .machine; host port busy: .port)
     ├─ InvalidStateError           INVALID_STATE (.machine, .state, .operation)
     ├─ MachineInterruptedError     INTERRUPTED, MACHINE_INTERRUPTED (the VM ended during it)
     ├─ BootFailedError             BOOT_FAILED (.machine, .log_tail)
     ├─ SmolTimeoutError            TIMEOUT
     ├─ HypervisorUnavailableError  HYPERVISOR_UNAVAILABLE, KVM_UNAVAILABLE
     ├─ RuntimeNotInstalledError    RUNTIME_NOT_INSTALLED (.program, .package)
     ├─ InsufficientMemoryError     INSUFFICIENT_MEMORY (.machine, .requested_mib, .available_mib)
     ├─ UnauthorizedError           UNAUTHORIZED (no, unknown or expired API key)
     ├─ ForbiddenError              FORBIDDEN (.scope: the key lacks it)
     ├─ PaymentRequiredError        PAYMENT_REQUIRED
     ├─ RateLimitedError            RATE_LIMITED (.retry_after_s)
     └─ SmolConnectionError         CONNECTION (the service cannot be reached)

Other codes (``STORAGE_ERROR``, ``MOUNT_ERROR``, ``IS_A_DIRECTORY``, ``PERMISSION_DENIED``,
``NETWORK_ERROR``, ``SMOLVM_ERROR``, ``CANCELLED``, codes added later) arrive as a plain
``SmolError`` with that ``code``.

``status`` is the HTTP status of the error on the /v1 API (the response's for a cloud error),
``problem_code`` the problem body's ``code`` (``machine_interrupted``), ``retryable`` whether
trying again may succeed, ``retry_after_s`` how long the service asked to wait.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
    "SmolError",
    "NotSupportedError",
    "InvalidConfigError",
    "ExecutionError",
    "NotFoundError",
    "ConflictError",
    "InvalidStateError",
    "MachineInterruptedError",
    "BootFailedError",
    "SmolTimeoutError",
    "HypervisorUnavailableError",
    "RuntimeNotInstalledError",
    "InsufficientMemoryError",
    "UnauthorizedError",
    "ForbiddenError",
    "PaymentRequiredError",
    "RateLimitedError",
    "SmolConnectionError",
]


class SmolError(Exception):
    """Base class of every smol error. ``str(err)`` is the message; ``code`` is stable."""

    code: str
    message: str
    hint: Optional[str]
    status: Optional[int]
    problem_code: Optional[str]
    retryable: bool
    retry_after_s: Optional[float]

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: Optional[int] = None,
        problem_code: Optional[str] = None,
        retryable: bool = False,
        retry_after_s: Optional[float] = None,
        hint: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.problem_code = problem_code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"

    def __reduce__(self) -> Any:  # keep the attributes across pickling (multiprocessing)
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type, state: Dict[str, Any]) -> "SmolError":
    e = cls.__new__(cls)
    Exception.__init__(e, state.get("message", ""))
    e.__dict__.update(state)
    return e


class _Coded(SmolError):
    """A subclass with a default code: constructed as ``Cls(message)``."""

    default_code = "SMOLVM_ERROR"

    def __init__(self, message: str, *, code: Optional[str] = None, **kw: Any) -> None:
        super().__init__(code or self.default_code, message, **kw)


class NotSupportedError(_Coded):
    """The operation or option is not available on this target (yet)."""

    default_code = "NOT_SUPPORTED"


class InvalidConfigError(_Coded, ValueError):
    """A configuration value or argument is invalid."""

    default_code = "INVALID_CONFIG"


class NotFoundError(_Coded):
    """A machine, guest path, image or engine asset does not exist."""

    default_code = "NOT_FOUND"


class ConflictError(_Coded):
    """A machine with this name exists (``machine``), or a host port to publish is taken
    (``port``)."""

    default_code = "CONFLICT"


class InvalidStateError(_Coded):
    """The machine is not in a state that allows the operation (e.g. it is stopped)."""

    default_code = "INVALID_STATE"


class MachineInterruptedError(_Coded):
    """The VM stopped (crashed, was killed, or was stopped) while the operation was in flight.
    Code ``INTERRUPTED`` locally, ``MACHINE_INTERRUPTED`` from the cloud (SPEC §8.3)."""

    default_code = "INTERRUPTED"


class BootFailedError(_Coded):
    """The VM did not become ready; ``log_tail`` has the end of its console and QEMU output."""

    default_code = "BOOT_FAILED"
    log_tail: str = ""


class SmolTimeoutError(_Coded):
    """A deadline passed (readiness, a wedged guest, an HTTP request)."""

    default_code = "TIMEOUT"


class HypervisorUnavailableError(_Coded):
    """QEMU or the requested accelerator cannot be used on this host."""

    default_code = "HYPERVISOR_UNAVAILABLE"


class RuntimeNotInstalledError(_Coded):
    """A host program the engine runs is missing (``program``, Debian ``package``)."""

    default_code = "RUNTIME_NOT_INSTALLED"


class InsufficientMemoryError(_Coded):
    """The host (or the engine's cgroup) cannot hold the machine now: it was not started
    (``requested_mib``, ``available_mib``); retryable once other machines stop."""

    default_code = "INSUFFICIENT_MEMORY"


class UnauthorizedError(_Coded):
    """The service refused the API key: none, unknown or expired (HTTP 401)."""

    default_code = "UNAUTHORIZED"


class ForbiddenError(_Coded):
    """The API key lacks a permission (HTTP 403); ``scope`` names it when the service did."""

    default_code = "FORBIDDEN"


class PaymentRequiredError(_Coded):
    """Billing or budget refuses the request (HTTP 402)."""

    default_code = "PAYMENT_REQUIRED"


class RateLimitedError(_Coded):
    """Too many requests (HTTP 429); ``retry_after_s`` says how long to wait when known."""

    default_code = "RATE_LIMITED"


class SmolConnectionError(_Coded):
    """The service cannot be reached, or the connection dropped (DNS, connect, TLS)."""

    default_code = "CONNECTION"


class ExecutionError(SmolError):
    """A command exited non-zero (raised by ``ExecResult.assert_success``)."""

    def __init__(self, command: str, exit_code: int, stdout: str = "", stderr: str = "") -> None:
        message = f"command exited with code {exit_code}"
        super().__init__("COMMAND_FAILED", f"{message}: {command}" if command else message)
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


#: The one mapping from a stable code to its class; other codes are a plain ``SmolError``.
_CLASS_BY_CODE: Dict[str, Type[SmolError]] = {
    "NOT_SUPPORTED": NotSupportedError,
    "UNSUPPORTED_PLATFORM": NotSupportedError,
    "INVALID_CONFIG": InvalidConfigError,
    "CONFIG_ERROR": InvalidConfigError,
    "COMMAND_FAILED": ExecutionError,
    "NOT_FOUND": NotFoundError,
    "CONFLICT": ConflictError,
    "INVALID_STATE": InvalidStateError,
    "INTERRUPTED": MachineInterruptedError,
    "MACHINE_INTERRUPTED": MachineInterruptedError,
    "BOOT_FAILED": BootFailedError,
    "TIMEOUT": SmolTimeoutError,
    "HYPERVISOR_UNAVAILABLE": HypervisorUnavailableError,
    "KVM_UNAVAILABLE": HypervisorUnavailableError,
    "RUNTIME_NOT_INSTALLED": RuntimeNotInstalledError,
    "INSUFFICIENT_MEMORY": InsufficientMemoryError,
    "UNAUTHORIZED": UnauthorizedError,
    "FORBIDDEN": ForbiddenError,
    "PAYMENT_REQUIRED": PaymentRequiredError,
    "RATE_LIMITED": RateLimitedError,
    "CONNECTION": SmolConnectionError,
}

#: Keyword arguments of ``SmolError.__init__`` among the native fields.
_INIT_FIELDS = ("status", "problem_code", "retryable", "retry_after_s", "hint")


def _from_native(code: str, message: str, fields: Dict[str, Any]) -> SmolError:
    """Called by the native module (errors.rs) with an error's code, message and typed fields
    (``hint``, ``status``, ``problem_code``, ``retryable``, ``retry_after_s``, ``port``,
    ``exit_code``, ``log_tail``, ...): builds the exception of the code."""
    cls = _CLASS_BY_CODE.get(code, SmolError)
    fields = dict(fields)
    kw = {k: fields.pop(k) for k in _INIT_FIELDS if k in fields}
    e: SmolError
    if cls is ExecutionError:
        e = ExecutionError(
            fields.pop("command", ""),
            fields.pop("exit_code", -1),
            fields.pop("stdout", ""),
            fields.pop("stderr", ""),
        )
        if message:
            e.message = message
            e.args = (message,)
        for k, v in kw.items():
            setattr(e, k, v)
    elif issubclass(cls, _Coded):
        e = cls(message, code=code, **kw)
    else:
        e = SmolError(code, message, **kw)
    for k, v in fields.items():
        setattr(e, k, v)
    return e
