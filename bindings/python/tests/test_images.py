"""Images against a real local OCI registry (scripts/test-registry.sh): pull_image,
list_images, MachineConfig(image=...), run(image, argv)."""

from __future__ import annotations

import pytest
from conftest import eventually, unique

import smol
from smol import ExecOptions, ImageInfo, Machine, MachineConfig


def test_pull_and_list_images(machine, registry):
    ref = f"{registry}/test/busybox:latest"
    info = machine.pull_image(ref)
    assert isinstance(info, ImageInfo)
    assert info.reference == ref
    assert info.digest.startswith("sha256:") and len(info.digest) == 71
    assert (info.architecture, info.os) == ("amd64", "linux") and info.size > 0
    listed = machine.list_images()
    assert any(i.reference == ref and i.digest == info.digest for i in listed), listed
    # pulling again is served from the cache, same digest
    assert machine.pull_image(ref).digest == info.digest
    with pytest.raises(smol.NotFoundError):
        machine.pull_image(f"{registry}/library/nope:1")


def test_machine_from_image(registry):
    ref = f"{registry}/test/busybox:latest"
    cfg = MachineConfig(name=unique(), image=ref, labels={"case": "from-image"})
    with Machine.create(cfg) as m:
        # list() shows the image reference the machine was created from (SPEC §3.10)
        [s] = [s for s in Machine.list(labels={"case": "from-image"}) if s.name == m.name]
        assert s.image == ref
        r = m.exec(["sh", "-c", "echo $SMOL_FIXTURE; pwd; cat /etc/motd"])
        assert r.stdout == "busybox\n/data\nmotd from layer 3\n", r
        r = m.exec(["sh", "-c", "echo $SMOL_FIXTURE; pwd"], ExecOptions(env={"SMOL_FIXTURE": "mine"}, workdir="/tmp"))
        assert r.stdout == "mine\n/tmp\n"
    with pytest.raises(smol.NotFoundError):
        Machine.create(MachineConfig(name=unique(), image=f"{registry}/library/nope:1"))


def test_python_image(registry):
    cfg = MachineConfig(name=unique(), image=f"{registry}/library/python:3.12")
    with Machine.create(cfg) as m:
        assert m.exec(["python3", "-c", "print(2**10)"]).assert_success().stdout == "1024\n"


def test_users_of_the_image(registry):
    # SPEC §3.4 / §3.6: a workload user and per-command users, from the image's /etc/passwd.
    cfg = MachineConfig(
        name=unique(),
        image=f"{registry}/library/python:3.12",
        command=["sh", "-c", "id -un > /tmp/who; exec sleep 600"],
        user="daemon",
        workdir="/tmp",
    )
    with Machine.create(cfg) as m:
        assert eventually(lambda: m.exec(["cat", "/tmp/who"]).stdout == "daemon\n")
        r = m.exec(["sh", "-c", "echo $(id -u):$(id -g) $USER"], ExecOptions(user="nobody", workdir="/tmp"))
        assert r.stdout == "65534:65534 nobody\n", r
        assert m.exec(["id", "-u"]).stdout == "0\n"
        with pytest.raises(smol.InvalidConfigError):
            m.exec(["true"], ExecOptions(user="nosuch", workdir="/tmp"))
    with pytest.raises(smol.InvalidConfigError):
        Machine.create(MachineConfig(name=unique(), command=["true"], user="nobody"))


def test_run_image_command(machine, registry):
    # SPEC §4.3: pulls the image if needed and runs the command in a container of it.
    r = machine.run(f"{registry}/test/busybox:latest", ["sh", "-c", "echo $SMOL_FIXTURE; pwd; cat /etc/motd"])
    assert (r.exit_code, r.stdout) == (0, "busybox\n/data\nmotd from layer 3\n"), r
    r = machine.run(f"{registry}/library/python:3.12", ["python3", "-c", "print('Hello')"])
    assert r.assert_success().stdout == "Hello\n"
    r = machine.run(f"{registry}/test/busybox:latest", ["sh", "-c", "exit 4"], ExecOptions(timeout=30))
    assert r.exit_code == 4
    with pytest.raises(smol.NotSupportedError):
        machine.run(f"{registry}/test/busybox:latest", ["true"], ExecOptions(user="root"))


WORKLOAD_LOG = "/var/log/smol/workload.log"


def _wait_for(m: Machine, path: str, want: str, timeout: float = 20.0) -> str:
    """The text of guest ``path`` once it contains ``want`` (the workload runs in the
    background), or whatever it holds at the deadline."""
    got = ""

    def check() -> bool:
        nonlocal got
        try:
            got = m.read_file(path).decode(errors="replace")
        except smol.NotFoundError:
            got = ""
        return want in got

    eventually(check, timeout, 0.1)
    return got


def test_the_image_workload_runs_at_create(registry):
    # SPEC §3.4: without a command, the image's Entrypoint + Cmd (`sh -c 'cat /etc/motd'`) is
    # launched at create; its output goes to the workload log.
    ref = f"{registry}/test/busybox:latest"
    with Machine.create(MachineConfig(name=unique(), image=ref)) as m:
        assert _wait_for(m, WORKLOAD_LOG, "motd from layer 3") == "motd from layer 3\n"
    # env and workdir apply to that workload
    cfg = MachineConfig(name=unique(), image=ref, env={"SMOL_FIXTURE": "over"}, workdir="/tmp")
    with Machine.create(cfg) as m:
        assert _wait_for(m, WORKLOAD_LOG, "motd") == "motd from layer 3\n"
        # a plain exec keeps the image's own Env and WorkingDir
        assert m.exec(["sh", "-c", "echo $SMOL_FIXTURE; pwd"]).stdout == "busybox\n/data\n"


def test_own_command_with_env_and_workdir_at_create_and_every_boot(registry):
    ref = f"{registry}/test/busybox:latest"
    script = (
        'echo $$ > /root/pid; echo "$GREETING $SMOL_FIXTURE $(pwd)" >> /root/started; '
        "echo to-the-log; echo err-to-the-log >&2; exec sleep 600"
    )
    cfg = MachineConfig(
        name=unique(), image=ref, command=["sh", "-c", script], env={"GREETING": "hello"},
        workdir="/tmp",
    )  # fmt: skip
    with Machine.create(cfg) as m:
        line = "hello busybox /tmp\n"
        assert _wait_for(m, "/root/started", line) == line
        log = _wait_for(m, WORKLOAD_LOG, "err-to-the-log")
        assert sorted(log.splitlines()) == ["err-to-the-log", "to-the-log"], log
        assert "motd" not in log, "the command replaces the image's Cmd"
        r = m.exec(["sh", "-c", "kill -0 $(cat /root/pid) && echo running"])
        assert r.stdout == "running\n", "the workload keeps running"
        # relaunched at every boot
        m.stop()
        m.start()
        assert _wait_for(m, "/root/started", line * 2) == line * 2
        r = m.exec(["sh", "-c", "kill -0 $(cat /root/pid) && echo running"])
        assert r.stdout == "running\n"


def test_invalid_workloads_of_an_image_raise(registry):
    ref = f"{registry}/test/busybox:latest"
    for kw in (
        {"command": ["no-such-program"]},  # cannot start: the create fails, nothing is left
        {"workdir": "relative"},
        {"command": ["sh", "-c", "true"], "env": {"A=B": "x"}},
    ):
        name = unique()
        with pytest.raises(smol.InvalidConfigError) as ei:
            Machine.create(MachineConfig(name=name, image=ref, **kw))
        assert ei.value.code == "INVALID_CONFIG", kw
        if "command" in kw and kw["command"] == ["no-such-program"]:
            assert "no-such-program" in str(ei.value)
        assert name not in [s.name for s in Machine.list()]
    for bad in ([], [""]):
        with pytest.raises(ValueError):
            MachineConfig(image=ref, command=bad)
