"""The cloud target of the Python SDK against a real fleet: the ``smolfleet`` binary built by
cargo (``cargo build --release -p smol-fleet``; ci.sh does it; ``SMOLFLEET`` names another),
started here on 127.0.0.1 over a fresh home, its bootstrap admin key read from its stdout,
stopped at the end. Its machines are real VMs of its local engine; images come from the test
registry (scripts/test-registry.sh).

Two parts: the ``Machine`` API on ``ConnectOptions(target="cloud", base_url=..., api_key=...)``
(create, exec, exec_stream over SSE, a 1 MiB binary file byte-exact, stop, connect, exec that
starts the machine again, delete, typed errors from the server, a bad key), then the seed
page's Python samples (shared/seed/machine-api.txt, as in test_seed.py) in cloud mode. Samples
that need what the cloud target or the fleet lacks yet are skipped with the reason.

Without a built smolfleet the module skips with a message (``SMOL_VM_TESTS=required`` fails).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Iterator, NamedTuple

import pytest
from conftest import REPO, unique

import smol
from smol import AsyncMachine, ConnectOptions, ExecOptions, Machine, MachineConfig, MountSpec, ResourceSpec


class Fleet(NamedTuple):
    url: str
    key: str
    home: str


def _smolfleet_binary() -> pathlib.Path:
    named = os.environ.get("SMOLFLEET")
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    candidates = [pathlib.Path(named)] if named else [target / "release" / "smolfleet", target / "debug" / "smolfleet"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    why = f"no smolfleet binary ({', '.join(map(str, candidates))}): cargo build --release -p smol-fleet"
    if os.environ.get("SMOL_VM_TESTS") == "required":
        pytest.fail(f"the fleet is required (SMOL_VM_TESTS=required) but {why}")
    pytest.skip(why)


def _delete_all(f: Fleet) -> None:
    """Deletes every machine of the fleet's tenant (they are detached VMs that outlive the
    server otherwise)."""
    conn = ConnectOptions(target="cloud", base_url=f.url, api_key=f.key)
    for s in Machine.list(conn):
        try:
            Machine.open(s.name, conn).delete()
        except smol.NotFoundError:
            pass


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    binary = _smolfleet_binary()
    home = tempfile.mkdtemp(prefix="sfpy", dir="/tmp")  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("SMOL_CLOUD_TOKEN", "SMOL_CLOUD_URL")}
    env.setdefault("SMOL_LOG", "warn")
    log = open(os.path.join(home, "smolfleet.log"), "wb")
    proc = subprocess.Popen(
        [str(binary), "serve", "--listen", "127.0.0.1:0", "--home", home],
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
    )
    # the bootstrap key line comes first, then the address; both within a minute
    lines: list = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    url = key = None
    while time.monotonic() < deadline and proc.poll() is None and not (url and key):
        text = "".join(lines)
        m = re.search(r"^listening on (http://\S+)$", text, re.M)
        k = re.search(r"^bootstrap admin key .*: (smk_\S+)$", text, re.M)
        url, key = (m and m.group(1)), (k and k.group(1))
        time.sleep(0.05)
    if not (url and key):
        proc.kill()
        proc.wait()
        log.close()
        err = pathlib.Path(home, "smolfleet.log").read_text(errors="replace")
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"smolfleet did not print its key and address: {''.join(lines)!r}\n{err}")
    f = Fleet(url=url, key=key, home=home)
    try:
        yield f
    finally:
        try:
            _delete_all(f)
        finally:
            proc.send_signal(signal.SIGINT)  # its ctrl-c: a clean shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cloud(fleet: Fleet) -> ConnectOptions:
    return ConnectOptions(target="cloud", base_url=fleet.url, api_key=fleet.key)


@pytest.fixture
def image(registry: str) -> str:
    # Debian minbase + python3 (sleep, nproc, whoami, mkdir: the busybox fixture lacks them)
    return f"{registry}/library/python:3.12"


# ---- the Machine API on the cloud target ----------------------------------------------------


def test_create_exec_stream_files_stop_connect_exec_delete(cloud, image, fleet):
    name = unique("cloud")
    m = Machine.create(MachineConfig(name=name, image=image, labels={"suite": "py-cloud"}), cloud)
    try:
        assert m.name == name
        assert m.id.startswith("mach-"), m.id
        assert m.target == "cloud" and repr(m) == f"Machine(name={name!r}, target='cloud')"
        assert m.state() == "running"
        assert m.ready() is True
        assert m.url() is None  # the fleet has no ingress yet: MachineInfo.url is null

        r = m.exec(
            ["sh", "-c", "echo $GREETING; cat; echo err >&2; exit 3"],
            ExecOptions(env={"GREETING": "hi"}, stdin="from stdin", workdir="/tmp"),
        )
        assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\nfrom stdin", "err\n"), r
        assert r.stdout_bytes == b"hi\nfrom stdin"
        r = m.exec(["sleep", "30"], ExecOptions(timeout=1))
        assert r.exit_code == 124, r

        events = list(m.exec_stream(["sh", "-c", "echo one; echo two >&2; exit 4"]))
        assert events[-1] == {"kind": "exit", "exit_code": 4}, events
        out = "".join(e["data"] for e in events if e["kind"] == "stdout")
        err = "".join(e["data"] for e in events if e["kind"] == "stderr")
        assert (out, err) == ("one\n", "two\n"), events

        data = bytes((i * 7 + i // 256) % 256 for i in range(1 << 20))
        path = "/root/dir with space/a?b#c.bin"
        assert m.exec(["mkdir", "-p", "/root/dir with space"]).exit_code == 0
        m.write_file(path, data)
        assert m.read_file(path) == data
        with pytest.raises(smol.NotFoundError):
            m.read_file("/root/missing")

        listed = Machine.list(cloud, labels={"suite": "py-cloud"})
        assert [s.name for s in listed] == [name], listed
        assert Machine.list(cloud, labels={"suite": "other"}) == []

        m.stop()
        assert m.state() == "stopped"
        again = Machine.connect(name, cloud)
        assert again.name == name
        r = again.exec(["sh", "-c", 'test -f "$1" && echo present', "sh", path])  # starts it
        assert (r.exit_code, r.stdout) == (0, "present\n"), r
        assert again.state() == "running"
        assert again.read_file(path) == data

        with pytest.raises(smol.ConflictError) as e:
            Machine.create(MachineConfig(name=name, image=image), cloud)
        assert e.value.code == "CONFLICT"
    finally:
        m.delete()
    assert m.state() == "deleted"
    with pytest.raises(smol.NotFoundError) as e:
        Machine.open(name, cloud)
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(smol.NotFoundError):
        again.exec(["true"])


def test_a_bad_key_is_unauthorized_typed_and_creates_nothing(fleet, cloud, image):
    bad = ConnectOptions(target="cloud", base_url=fleet.url, api_key="smk_not_a_key_of_this_fleet")
    with pytest.raises(smol.UnauthorizedError) as e:
        Machine.create(MachineConfig(image=image), bad)
    assert e.value.code == "UNAUTHORIZED"
    assert "401" in str(e.value) and "smk_not_a_key" not in str(e.value), e.value
    for call in (lambda: Machine.list(bad), lambda: Machine.connect("mach-x", bad)):
        with pytest.raises(smol.UnauthorizedError):
            call()
    assert Machine.list(cloud) == []  # the failed create left nothing
    # a key passed only through SMOL_CLOUD_TOKEN is taken (and selects the cloud, SPEC 2.2)
    os.environ["SMOL_CLOUD_TOKEN"] = fleet.key
    try:
        assert isinstance(Machine.list(ConnectOptions(base_url=fleet.url)), list)
    finally:
        del os.environ["SMOL_CLOUD_TOKEN"]


def test_refusals_are_typed_before_any_request(cloud, image, tmp_path):
    with pytest.raises(smol.InvalidConfigError):
        Machine.create(MachineConfig(), cloud)  # the cloud needs an image
    with pytest.raises(smol.NotSupportedError):
        Machine.create(MachineConfig(image=image, mounts=[MountSpec(source=str(tmp_path), target="/w")]), cloud)


def test_async_machine_on_the_cloud(cloud, image):
    async def main() -> None:
        async with await AsyncMachine.create(MachineConfig(image=image), cloud) as m:
            assert await m.state() == "running"
            assert (await m.exec(["echo", "async"])).stdout == "async\n"
            evs = [e async for e in m.exec_stream(["sh", "-c", "echo s; exit 5"])]
            assert evs[-1] == {"kind": "exit", "exit_code": 5}, evs
            await m.write_file("/root/a", b"\x00\xff")
            assert await m.read_file("/root/a") == b"\x00\xff"
        assert await m.state() == "deleted"

    asyncio.run(main())


# ---- the seed page's Python samples in cloud mode (as test_seed.py runs them locally) --------


def test_seed_basic_creation_and_lifecycle(cloud, image):
    machine = Machine.create(MachineConfig(image=image), cloud)
    try:
        s = machine.state()
        assert s == "running"
        url = machine.url()
        assert url is None  # "https://…" when the fleet has ingress (not yet)
        result = machine.exec(["ls", "-la", "/"])
        assert result.exit_code == 0 and "proc" in result.stdout
        result = machine.exec(
            ["long-running-task"],
            ExecOptions(
                timeout=60,  # seconds
                env={"MY_VAR": "value"},
                workdir="/tmp",
            ),
        )
        assert result.exit_code == 127
        machine.stop()
        assert machine.state() == "stopped"
    finally:
        machine.delete()
    assert machine.state() == "deleted"


def test_seed_creation_with_configuration(cloud, image):
    # The sample's mount (a host directory) is refused on the cloud target (SPEC 11): the rest
    # of the sample runs, its files written through the API instead of the mount.
    config = MachineConfig(
        name=unique("configured-machine"),
        image=image,
        resources=ResourceSpec(cpus=2, memory_mb=1024),
    )
    machine = Machine.create(config, cloud)
    try:
        assert machine.exec(["nproc"]).stdout == "2\n"
        machine.exec(["mkdir", "-p", "/workspace"])
        machine.write_file("/workspace/script.py", 'print("hi")')
        machine.write_file("/workspace/run.sh", "#!/bin/sh\necho hi\n", 0o755)
        assert machine.read_file("/workspace/script.py") == b'print("hi")'
        assert machine.exec(["/workspace/run.sh"]).stdout == "hi\n"
        machine.exec(["sh", "-c", "printf '\\001\\002' > /tmp/out.bin"])
        data = machine.read_file("/tmp/out.bin")
        assert data == b"\x01\x02"
        again = Machine.connect(machine.name, cloud)
        assert again.exec(["echo", "same"]).stdout == "same\n"
    finally:
        machine.delete()


def test_seed_mounts_are_refused_on_the_cloud(cloud, image, tmp_path):
    with pytest.raises(smol.NotSupportedError) as e:
        Machine.create(MachineConfig(image=image, mounts=[MountSpec(source=str(tmp_path), target="/workspace")]), cloud)
    assert "mount" in str(e.value).lower(), e.value


def test_seed_cloud_sample(fleet, registry):
    # the sample as written, with the fleet's address and key and the test registry's python
    machine = Machine.create(
        MachineConfig(image=f"{registry}/library/python:3.12", resources=ResourceSpec(cpus=2, memory_mb=1024)),
        ConnectOptions(target="cloud", api_key=fleet.key, base_url=fleet.url),
    )
    try:
        print(machine.url())  # public ingress URL (cloud): None until the fleet has ingress
        assert machine.exec(["python3", "-c", "print('Hello')"]).stdout == "Hello\n"
    finally:
        machine.delete()


def test_seed_exec_stream_sample(cloud, image, capsys):
    with Machine.create(MachineConfig(image=image), cloud) as machine:
        for ev in machine.exec_stream(["sh", "-c", "echo Collecting numpy; echo warn >&2; exit 0"]):
            if ev["kind"] in ("stdout", "stderr"):
                print(ev["data"], end="")
            elif ev["kind"] == "exit":
                print("exit", ev["exit_code"])
    out = capsys.readouterr().out
    assert "Collecting numpy\n" in out and "warn\n" in out and out.endswith("exit 0\n")


def test_seed_context_manager_sample(cloud, image):
    name = unique("worker")
    with Machine.create(MachineConfig(name=name, image=image), cloud) as machine:
        assert machine.exec(["whoami"]).stdout == "root\n"
    with pytest.raises(smol.NotFoundError):
        Machine.open(name, cloud)


def test_seed_images_and_run_samples_are_local_only(cloud, image):
    """SPEC §4.5 and run(): images are local only; on the cloud each is NotSupportedError
    naming the call, and the machine goes on working."""
    with Machine.create(MachineConfig(image=image), cloud) as machine:
        with pytest.raises(smol.NotSupportedError, match="pull_image"):
            machine.pull_image(image)
        with pytest.raises(smol.NotSupportedError):
            machine.list_images()
        with pytest.raises(smol.NotSupportedError, match="run"):
            machine.run(image, ["true"])
        assert machine.exec(["echo", "still"]).stdout == "still\n"


def test_seed_fork_sample(cloud, image):
    """The seed page's fork(): a forkable golden on the cloud, forked into a running clone that
    has its files and a hostname of its own."""
    golden = Machine.create(MachineConfig(image=image, forkable=True), cloud)
    clone = None
    try:
        golden.write_file("/root/warm.txt", "warm")
        clone = golden.fork(unique("clone"))
        assert clone.target == "cloud" and clone.state() == "running"
        assert clone.read_file("/root/warm.txt") == b"warm"
        # its own hostname (the fleet's engine names a machine by its id)
        assert clone.exec(["hostname"]).stdout != golden.exec(["hostname"]).stdout
    finally:
        if clone is not None:
            clone.delete()
        golden.delete()


def test_checkpoint_restore_and_delete_on_the_cloud(cloud, image):
    """checkpoint() / checkpoints() / restore_checkpoint() / delete_checkpoint() through the
    core's cloud target: the fleet keeps the checkpoint, a restore is a new running machine with
    the checkpointed disk and memory (a tmpfs file), a taken name is Conflict, another call after
    the delete is NotFound."""
    src = Machine.create(MachineConfig(image=image, branchable=True), cloud)
    restored = None
    try:
        src.write_file("/root/disk.txt", "before")
        assert src.exec(["sh", "-c", "echo in-ram > /dev/shm/ram"]).exit_code == 0
        with pytest.raises(smol.InvalidConfigError):
            src.checkpoint("/tmp/not-on-the-cloud.smolcheckpoint")
        ck = src.checkpoint()
        assert ck["id"].startswith("ckpt-"), ck
        assert (ck["status"], ck["machine_id"]) == ("ready", src.id), ck
        assert ck["size_bytes"] > 0 and ck["download_url"] is None, ck
        assert [c["id"] for c in src.checkpoints()] == [ck["id"]]
        src.write_file("/root/disk.txt", "after")

        name = unique("restored")
        restored = Machine.restore_checkpoint(ck["id"], name, cloud)
        assert (restored.target, restored.name) == ("cloud", name)
        assert restored.state() == "running"
        assert restored.read_file("/root/disk.txt") == b"before"
        assert restored.exec(["cat", "/dev/shm/ram"]).stdout == "in-ram\n"
        with pytest.raises(smol.ConflictError):
            Machine.restore(ck["id"], name, cloud)
        restored.delete()
        restored = None
        Machine.delete_checkpoint(ck["id"], cloud)
        with pytest.raises(smol.NotFoundError):
            Machine.restore(ck["id"], unique("late"), cloud)
        with pytest.raises(smol.NotFoundError):
            Machine.delete_checkpoint(ck["id"], cloud)
    finally:
        if restored is not None:
            restored.delete()
        src.delete()
