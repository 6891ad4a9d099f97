"""The engine's tracing events reach Python's logging (logger ``smol`` and its children)."""

from __future__ import annotations

import logging
import time

import pytest

import smol
from smol import _native


def _wait_for(caplog: pytest.LogCaptureFixture, pred, emit=None, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if emit:
            emit()
        found = [r for r in caplog.records if pred(r)]
        if found:
            return found
        time.sleep(0.1)
    return []


def test_engine_events_are_logging_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="smol")
    got = _wait_for(
        caplog,
        lambda r: r.getMessage() == "hello from the core",
        emit=lambda: _native._emit_log(logging.DEBUG, "hello from the core"),
    )
    assert got, "a debug event of the core never reached logging"
    assert got[0].name == "smol.smolmachines.test"
    assert got[0].levelno == logging.DEBUG


def test_a_quiet_logger_gets_only_what_it_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="smol")
    time.sleep(1.2)  # the forwarder reports the new level within half a second
    caplog.clear()
    _native._emit_log(logging.DEBUG, "quiet-debug")
    got = _wait_for(
        caplog,
        lambda r: r.getMessage() == "loud-warning",
        emit=lambda: _native._emit_log(logging.WARNING, "loud-warning"),
    )
    assert got and got[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.getMessage() == "quiet-debug"]


def test_a_machine_lifecycle_logs_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="smol")
    time.sleep(1.2)
    with smol.Machine.create() as m:
        m.exec(["true"])
    got = _wait_for(
        caplog, lambda r: r.name.startswith("smol.smolmachines.") and r.name != "smol.smolmachines.test"
    )
    assert got, "the engine logged nothing at debug for a create, an exec and a delete"
