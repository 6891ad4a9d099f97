"""Input hygiene (issue 10): what the guest cannot take is refused on the host with a typed
error naming the argument, before anything runs; the one validation is the core's."""

from __future__ import annotations

import pytest
from conftest import unique

import smol
from smol import ExecOptions, Machine, MachineConfig, MountSpec, ResourceSpec


def _assert_no_machine(name: str) -> None:
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


@pytest.mark.parametrize(
    "resources, message",
    [
        (ResourceSpec(cpus=65), "resources.cpus must be 1..=64, got 65"),
        (ResourceSpec(storage_gb=16385), "resources.storage_gb must be 1..=16384, got 16385"),
    ],
    ids=["cpus-65", "storage-16385"],
)
def test_ranges_are_the_cores(resources, message):
    name = unique()
    with pytest.raises(smol.InvalidConfigError) as ei:
        Machine.create(MachineConfig(name=name, resources=resources))
    assert message in str(ei.value)
    _assert_no_machine(name)


@pytest.mark.parametrize("target", ["/proc", "/sys/kernel", "/dev", "/dev/shm", "/"])
def test_mount_targets_of_the_guest_kernel_are_refused(tmp_path, target):
    name = unique()
    with pytest.raises(smol.InvalidConfigError, match="mount target"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source=str(tmp_path), target=target)]))
    _assert_no_machine(name)


def test_mount_sources_are_typed(tmp_path):
    name = unique()
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(smol.NotFoundError, match="/no/such/dir"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source="/no/such/dir", target="/w")]))
    with pytest.raises(smol.InvalidConfigError, match="not a directory"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source=str(f), target="/w")]))
    with pytest.raises(smol.InvalidConfigError, match="absolute"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source="rel", target="/w")]))
    _assert_no_machine(name)


def test_argv_env_and_timeouts(machine):
    with pytest.raises(smol.InvalidConfigError, match="argument 2 contains a NUL"):
        machine.exec(["echo", "a", "b\0c"])
    with pytest.raises(smol.InvalidConfigError, match=r"'A=B'|\"A=B\""):
        machine.exec(["env"], ExecOptions(env={"A=B": "c"}))
    with pytest.raises(smol.InvalidConfigError, match="is empty"):
        machine.exec(["env"], ExecOptions(env={"": "c"}))
    with pytest.raises(smol.InvalidConfigError, match="NUL"):
        machine.exec(["env"], ExecOptions(env={"V": "x\0y"}))
    with pytest.raises(smol.InvalidConfigError, match="NUL"):
        machine.exec_stream(["echo", "\0"])
    # a huge timeout is the longest wait, not "must be > 0"
    r = machine.exec(["sh", "-c", 'echo "$A"'], ExecOptions(env={"A": "B=c"}, timeout=1e300))
    assert (r.exit_code, r.stdout) == (0, "B=c\n")
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(smol.InvalidConfigError, match="timeout"):
            machine.exec(["true"], ExecOptions(timeout=bad))


def test_file_paths_must_be_str(machine):
    with pytest.raises(smol.InvalidConfigError, match="path must be an absolute guest path"):
        machine.write_file(None, b"x")  # type: ignore[arg-type]
    with pytest.raises(smol.InvalidConfigError, match="path must be an absolute guest path"):
        machine.read_file(None)  # type: ignore[arg-type]

