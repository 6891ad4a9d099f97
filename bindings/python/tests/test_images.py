"""Images against a real local OCI registry (scripts/test-registry.sh): pull_image,
list_images, MachineConfig(image=...), run(image, argv)."""

from __future__ import annotations

import pytest
from conftest import unique

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
