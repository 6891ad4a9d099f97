"""Problem+json bodies (RFC 9457, SPEC §10.1) become the typed exceptions of SPEC §8 through the
core's ``Error::from_problem`` (``smol._native._error_from_problem``): the class of the code,
the same code and the typed fields a local error of that kind has. No VM needed."""

from __future__ import annotations

import json
import pickle
from typing import Any, Dict, Optional

import pytest

import smol
from smol import _native


def from_problem(status: int, body: Any, retry_after: Optional[str] = None) -> smol.SmolError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    e = _native._error_from_problem(status, raw, retry_after)
    assert isinstance(e, smol.SmolError), repr(e)
    return e


def ours(status: int, code: str, kind: str, detail: str, **fields: Any) -> Dict[str, Any]:
    """A body the way the core's Error::to_problem writes it."""
    return {
        "type": f"urn:smolmachines:problem:{code}",
        "title": code,
        "status": status,
        "detail": detail,
        "code": code,
        "kind": kind,
        **fields,
    }


def test_port_conflict_keeps_port_status_and_hint() -> None:
    e = from_problem(
        409,
        ours(409, "conflict", "portUnavailable", "host port 8080 cannot be published: in use",
             port=8080, reason="in use", retryable=False),
    )
    assert type(e) is smol.ConflictError
    assert (e.code, e.port, e.status, e.problem_code) == ("CONFLICT", 8080, 409, "conflict")
    assert str(e) == "host port 8080 cannot be published: in use"
    assert e.hint and "port" in e.hint
    assert e.retryable is False and e.retry_after_s is None


def test_boot_failed_carries_the_log_tail() -> None:
    e = from_problem(
        500,
        ours(500, "boot_failed", "bootFailed", 'machine "m" failed to boot: no agent',
             machine="m", reason="no agent", logTail="Kernel panic"),
    )
    assert type(e) is smol.BootFailedError
    assert (e.code, e.machine, e.log_tail) == ("BOOT_FAILED", "m", "Kernel panic")
    assert str(e) == 'machine "m" failed to boot: no agent'


def test_command_failed_is_an_execution_error_with_its_fields() -> None:
    e = from_problem(
        500,
        ours(500, "command_failed", "commandFailed", "command exited with code 3: false",
             command="false", exitCode=3, stdout="o", stderr="e"),
    )
    assert type(e) is smol.ExecutionError
    assert (e.code, e.exit_code, e.command, e.stdout, e.stderr) == ("COMMAND_FAILED", 3, "false", "o", "e")
    assert str(e) == "command exited with code 3: false"


def test_interrupted_local_and_cloud() -> None:
    e = from_problem(
        503,
        ours(503, "machine_interrupted", "interrupted", 'machine "m" stopped during the operation: SIGKILL',
             machine="m", reason="SIGKILL", retryable=True),
    )
    assert type(e) is smol.MachineInterruptedError
    assert (e.code, e.machine, e.retryable, e.problem_code) == ("INTERRUPTED", "m", True, "machine_interrupted")
    # the cloud's own body: SPEC §8.3's code
    c = from_problem(503, {"type": "about:blank", "status": 503, "detail": "interrupted",
                           "code": "machine_interrupted", "retryable": True})
    assert type(c) is smol.MachineInterruptedError
    assert (c.code, c.retryable, c.status) == ("MACHINE_INTERRUPTED", True, 503)


def test_cloud_codes_from_any_body() -> None:
    e = from_problem(401, b"")
    assert type(e) is smol.UnauthorizedError and e.code == "UNAUTHORIZED" and e.status == 401
    e = from_problem(401, {"code": "unknown_key", "error": "unknown API key"})
    assert type(e) is smol.UnauthorizedError and "unknown API key" in str(e)
    e = from_problem(403, b"missing scope: machine:exec")
    assert type(e) is smol.ForbiddenError
    assert (e.code, e.scope) == ("FORBIDDEN", "machine:exec")
    e = from_problem(402, {"type": "about:blank", "title": "Payment Required", "status": 402,
                           "code": "payment_required"})
    assert type(e) is smol.PaymentRequiredError and e.code == "PAYMENT_REQUIRED"
    e = from_problem(429, b"slow down", retry_after="5")
    assert type(e) is smol.RateLimitedError
    assert (e.code, e.retry_after_s, e.retryable) == ("RATE_LIMITED", 5.0, True)
    e = from_problem(404, b"machine not found")
    assert type(e) is smol.NotFoundError and e.code == "NOT_FOUND" and "machine not found" in str(e)


def test_unknown_and_non_json_bodies_map_by_status() -> None:
    e = from_problem(502, b"<html>bad gateway</html>")
    assert type(e) is smol.SmolError
    assert (e.code, e.status, e.retryable, str(e)) == ("SMOLVM_ERROR", 502, True, "<html>bad gateway</html>")
    e = from_problem(422, {"detail": "quota exceeded", "code": "quota_exceeded"})
    assert type(e) is smol.SmolError
    assert (e.code, e.problem_code, e.retryable) == ("SMOLVM_ERROR", "quota_exceeded", False)
    e = from_problem(409, b"machine name already exists")
    assert type(e) is smol.ConflictError and e.code == "CONFLICT"


def test_runtime_not_installed_names_program_and_package() -> None:
    e = from_problem(
        503,
        ours(503, "runtime_not_installed", "programMissing",
             "qemu-img is needed to create a machine but it is not installed (Debian package qemu-utils)",
             program="qemu-img", package="qemu-utils", neededFor="to create a machine",
             reason="it is not installed"),
    )
    assert type(e) is smol.RuntimeNotInstalledError
    assert (e.code, e.program, e.package) == ("RUNTIME_NOT_INSTALLED", "qemu-img", "qemu-utils")
    assert e.hint and "apt-get install qemu-utils" in e.hint


def test_insufficient_memory_says_what_was_asked_and_what_is_free() -> None:
    e = from_problem(
        503,
        ours(503, "insufficient_memory", "insufficientMemory",
             'machine "w" needs 640 MiB of host memory but 300 MiB is available: cgroup',
             machine="w", requestedMib=640, availableMib=300, reason="cgroup"),
    )
    assert type(e) is smol.InsufficientMemoryError
    assert (e.code, e.machine, e.requested_mib, e.available_mib) == ("INSUFFICIENT_MEMORY", "w", 640, 300)
    assert e.retryable and e.hint and "smaller machine" in e.hint


def test_errors_raise_and_pickle_with_their_fields() -> None:
    e = from_problem(409, ours(409, "conflict", "portUnavailable", "busy", port=81, reason="busy"))
    with pytest.raises(smol.ConflictError) as ei:
        raise e
    assert ei.value.port == 81
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is smol.ConflictError
    assert (back.code, back.port, back.status, str(back)) == ("CONFLICT", 81, 409, str(e))


def test_every_new_class_is_exported() -> None:
    for name in ("UnauthorizedError", "ForbiddenError", "PaymentRequiredError", "RateLimitedError",
                 "SmolConnectionError", "RuntimeNotInstalledError"):
        cls = getattr(smol, name)
        assert issubclass(cls, smol.SmolError) and name in smol.__all__
