"""The engine's log, forwarded to :mod:`logging`.

The Rust core logs with ``tracing``; its events reach the logger ``smol`` and its children
(``smol.smolmachines.local.machine``, ...) through a daemon thread started at import. Configure
them as any logger::

    import logging
    logging.basicConfig()
    logging.getLogger("smol").setLevel(logging.DEBUG)

The core forwards only events at or above the effective level of ``smol`` (checked every half
second), so a quiet logger costs nothing noticeable.
"""

from __future__ import annotations

import logging
import threading

from . import _native

logger = logging.getLogger("smol")
_POLL_S = 0.5
_started = False
_lock = threading.Lock()


def _forward() -> None:
    level = None
    while True:
        now = logger.getEffectiveLevel()
        if now != level:
            level = now
            _native._set_log_level(level)
        for levelno, target, message in _native._next_logs(_POLL_S):
            child = logger.getChild(target) if target and target != "smol" else logger
            if child.isEnabledFor(levelno):
                child.log(levelno, "%s", message)


def start() -> None:
    """Starts the forwarding thread (once per process)."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
        threading.Thread(target=_forward, name="smol-log", daemon=True).start()
