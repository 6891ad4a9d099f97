"""The exception hierarchy of smol (SPEC §8.1).

Every error of the Rust core is turned into one of these classes in a single place
(``bindings/python/src/errors.rs``), which picks the class from the core's error variant and
passes its stable ``code`` (SPEC §8.2)::

    SmolError                      .code, .message, .hint
     ├─ NotSupportedError           NOT_SUPPORTED
     ├─ InvalidConfigError          INVALID_CONFIG (also a ValueError)
     ├─ ExecutionError              COMMAND_FAILED (only from ExecResult.assert_success)
     ├─ NotFoundError               NOT_FOUND (machine, guest path, asset)
     ├─ ConflictError               CONFLICT (name taken, host port busy)
     ├─ InvalidStateError           INVALID_STATE (e.g. exec on a stopped machine)
     ├─ MachineInterruptedError     INTERRUPTED (the VM ended during the operation)
     ├─ BootFailedError             BOOT_FAILED (.log_tail)
     ├─ SmolTimeoutError            TIMEOUT
     └─ HypervisorUnavailableError  HYPERVISOR_UNAVAILABLE, KVM_UNAVAILABLE

Other codes (``STORAGE_ERROR``, ``MOUNT_ERROR``, ``IS_A_DIRECTORY``, ``PERMISSION_DENIED``,
``SMOLVM_ERROR``, ``CANCELLED``) arrive as a plain ``SmolError`` with that ``code``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

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
]


class SmolError(Exception):
    """Base class of every smol error. ``str(err)`` is the message; ``code`` is stable."""

    code: str
    message: str
    hint: Optional[str]

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
    """A machine, guest path or engine asset does not exist."""

    default_code = "NOT_FOUND"


class ConflictError(_Coded):
    """A machine with this name exists, or a host port to publish is taken."""

    default_code = "CONFLICT"


class InvalidStateError(_Coded):
    """The machine is not in a state that allows the operation (e.g. it is stopped)."""

    default_code = "INVALID_STATE"


class MachineInterruptedError(_Coded):
    """The VM stopped (crashed, was killed, or was stopped) while the operation was in flight."""

    default_code = "INTERRUPTED"


class BootFailedError(_Coded):
    """The VM did not become ready; ``log_tail`` has the end of its console and QEMU output."""

    default_code = "BOOT_FAILED"
    log_tail: str = ""


class SmolTimeoutError(_Coded):
    """A deadline passed (readiness, a wedged guest)."""

    default_code = "TIMEOUT"


class HypervisorUnavailableError(_Coded):
    """QEMU or the requested accelerator cannot be used on this host."""

    default_code = "HYPERVISOR_UNAVAILABLE"


class ExecutionError(SmolError):
    """A command exited non-zero (raised by ``ExecResult.assert_success``)."""

    def __init__(self, command: str, exit_code: int, stdout: str = "", stderr: str = "") -> None:
        message = f"command exited with code {exit_code}"
        super().__init__("COMMAND_FAILED", f"{message}: {command}" if command else message)
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


def _from_native(cls_name: str, code: str, message: str, extra: Dict[str, Any]) -> SmolError:
    """Called by the native module (errors.rs) to build the exception it picked."""
    cls = globals().get(cls_name, SmolError)
    e: SmolError
    if cls is ExecutionError:
        e = ExecutionError(
            extra.pop("command", ""),
            extra.pop("exit_code", -1),
            extra.pop("stdout", ""),
            extra.pop("stderr", ""),
        )
    elif cls is SmolError or not issubclass(cls, _Coded):
        e = SmolError(code, message)
    else:
        e = cls(message, code=code)
    for k, v in extra.items():
        setattr(e, k, v)
    return e
