"""Portable checkpoints (SPEC §4.8, docs/CHECKPOINTS.md) against real microVMs: a
``.smolcheckpoint`` file of a running branchable machine restores into a new machine with its
memory and disk, its own hostname; damaged files and bad arguments are typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

import smol
from smol import Machine, MachineConfig

from conftest import unique


def sh(m: Machine, script: str) -> str:
    r = m.exec(["sh", "-c", script])
    assert r.exit_code == 0, r
    return r.stdout.strip()


@pytest.fixture
def source(make_machine) -> Machine:
    return make_machine(MachineConfig(name=unique("ck"), branchable=True))


def test_a_checkpoint_restores_memory_and_disk_under_a_new_name(source: Machine, tmp_path: Path):
    sh(source, "head -c 100000 /dev/urandom > /dev/shm/r; echo disk > /root/d")
    want = sh(source, "sha256sum /dev/shm/r /root/d")
    out = tmp_path / "a.smolcheckpoint"
    info = source.checkpoint(str(out))
    assert info["id"] == str(out) == info["path"]
    assert info["status"] == "available"
    assert info["machine_id"] == source.name
    assert info["size_bytes"] == out.stat().st_size
    assert source.state() == "running"
    name = unique("ckr")
    restored = Machine.restore_checkpoint(str(out), name)
    try:
        assert sh(restored, "sha256sum /dev/shm/r /root/d") == want
        assert sh(restored, "hostname") == name
        with pytest.raises(smol.ConflictError):
            Machine.restore(out, name)
    finally:
        restored.delete()
    Machine.delete_checkpoint(str(out))
    assert not out.exists()
    with pytest.raises(smol.NotFoundError):
        Machine.delete_checkpoint(str(out))


def test_bad_arguments_and_damaged_files_are_typed_errors(source: Machine, tmp_path: Path):
    with pytest.raises(smol.InvalidConfigError):
        source.checkpoint()
    out = tmp_path / "b.smolcheckpoint"
    source.checkpoint(out)
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.smolcheckpoint"
    bad.write_bytes(bytes(data))
    name = unique("ckbad")
    with pytest.raises(smol.InvalidConfigError) as e:
        Machine.restore_checkpoint(str(bad), name)
    assert "sha256" in str(e.value)
    assert name not in [s.name for s in Machine.list(smol.ConnectOptions(target="local"))]
    with pytest.raises(smol.NotFoundError):
        Machine.restore_checkpoint(str(tmp_path / "missing.smolcheckpoint"), unique("ckm"))


def test_checkpoints_into_a_store_restore_export_and_prune(source: Machine, tmp_path: Path):
    sh(source, "head -c 4000000 /dev/urandom > /dev/shm/r; echo disk > /root/d")
    want = sh(source, "sha256sum /dev/shm/r /root/d")
    store = tmp_path / "store"
    a, b = tmp_path / "a.smolcheckpoint", tmp_path / "b.smolcheckpoint"
    first = source.checkpoint(str(a), store=str(store))
    second = source.checkpoint(str(b), store=store)
    assert first["size_bytes"] == a.stat().st_size < 1 << 20
    assert second["reused_bytes"] >= 4_000_000
    exported = tmp_path / "x.smolcheckpoint"
    n = Machine.export_checkpoint(a, exported)
    assert n == exported.stat().st_size > 4_000_000
    with pytest.raises(smol.InvalidConfigError):
        Machine.export_checkpoint(a, exported)  # never overwrites
    name = unique("cks")
    restored = Machine.restore_checkpoint(str(exported), name)
    try:
        assert sh(restored, "sha256sum /dev/shm/r /root/d") == want
    finally:
        restored.delete()
    assert Machine.prune_checkpoint_store(store) == 0
    Machine.delete_checkpoint(str(a))
    Machine.delete_checkpoint(str(b))
    assert Machine.prune_checkpoint_store(str(store)) > 4_000_000
    with pytest.raises(smol.NotFoundError):
        Machine.prune_checkpoint_store(str(tmp_path / "no-store"))
