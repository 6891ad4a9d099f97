"""Fixtures of the Python SDK tests. They drive the REAL local engine: every machine is a QEMU
microVM (TCG on CI). Nothing is mocked.

The engine home is a fresh temporary directory per session (machines, disks, image cache), with
the installed guest assets of the real home (``SMOL_ASSETS``), so the tests neither see nor touch
machines of other processes. It is set before the engine starts (the first call into smol).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Callable, Iterator

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]

_real_home = os.environ.get("SMOL_HOME") or os.path.join(
    os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "smol"
)
os.environ.setdefault("SMOL_ASSETS", os.path.join(_real_home, "assets"))
_TEST_HOME = tempfile.mkdtemp(prefix="smol-py-home.")
os.environ["SMOL_HOME"] = _TEST_HOME
# The cloud is selected by this variable (SPEC §2.2); the tests that want it set it themselves.
os.environ.pop("SMOL_CLOUD_TOKEN", None)

import smol  # noqa: E402  (after the environment above)
from smol import Machine, MachineConfig  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TEST_HOME, ignore_errors=True)


def unique(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def name() -> str:
    return unique()


@pytest.fixture
def machine(name: str) -> Iterator[Machine]:
    m = Machine.create(MachineConfig(name=name))
    try:
        yield m
    finally:
        m.delete()


@pytest.fixture
def make_machine() -> Iterator[Callable[..., Machine]]:
    """Creates machines on demand; every one is deleted at the end of the test."""
    made = []

    def make(config: MachineConfig = None) -> Machine:
        config = config or MachineConfig()
        if config.name is None:
            config.name = unique()
        m = Machine.create(config)
        made.append(m)
        return m

    yield make
    for m in made:
        m.delete()


@pytest.fixture(scope="session")
def registry() -> Iterator[str]:
    """A real OCI registry on 127.0.0.1 with the test images (scripts/test-registry.sh);
    yields ``127.0.0.1:<port>``. It is stopped with the session (and by --watch if we die)."""
    out = subprocess.run(
        ["bash", str(REPO / "scripts/test-registry.sh"), "start", "--watch", str(os.getpid())],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    vals = dict(line.split("=", 1) for line in out.split() if "=" in line)
    try:
        yield f"127.0.0.1:{vals['PORT']}"
    finally:
        subprocess.run(
            ["bash", str(REPO / "scripts/test-registry.sh"), "stop", vals["DIR"]],
            capture_output=True,
            timeout=60,
        )


def eventually(check: Callable[[], bool], timeout: float = 10.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def guest_pid_alive(m: Machine, pidfile: str) -> bool:
    """Whether the guest process whose pid is in ``pidfile`` still exists (not a zombie)."""
    r = m.exec(["sh", "-c", f"p=$(cat {pidfile}); [ -d /proc/$p ] && ! grep -q '^State:.*Z' /proc/$p/status"])
    return r.exit_code == 0


def vmm_pid(name: str) -> int:
    [s] = [s for s in Machine.list() if s.name == name]
    assert s.pid, s
    return s.pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped yet) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


__all__ = ["smol", "unique", "eventually", "guest_pid_alive", "vmm_pid", "pid_alive"]
