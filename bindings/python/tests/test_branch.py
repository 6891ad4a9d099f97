"""pause / resume and branching (SPEC §4.6, §4.8) against real microVMs: a clone has the
source's RAM and disk as of the branch, then lives on its own."""

from __future__ import annotations

import asyncio
from typing import List

import pytest

import smol
from smol import AsyncMachine, Machine, MachineConfig

from conftest import unique


def names_now() -> List[str]:
    return [s.name for s in Machine.list()]


def sh(m: Machine, script: str) -> str:
    r = m.exec(["sh", "-c", script])
    assert r.exit_code == 0, r
    return r.stdout


@pytest.fixture
def source(make_machine) -> Machine:
    return make_machine(MachineConfig(name=unique("src"), branchable=True))


def test_pause_then_exec_is_invalid_state_and_resume_goes_on(machine: Machine):
    sh(machine, "echo kept > /tmp/ram")
    machine.pause()
    assert machine.state() == "paused"
    machine.pause()  # pausing a paused machine does nothing
    with pytest.raises(smol.InvalidStateError) as e:
        machine.exec(["true"])
    assert "paused" in str(e.value)
    with pytest.raises(smol.InvalidStateError):
        machine.read_file("/tmp/ram")
    machine.resume()
    assert machine.state() == "running"
    assert sh(machine, "cat /tmp/ram") == "kept\n"


def test_a_clone_has_the_sources_ram_then_diverges(source: Machine):
    sh(source, "echo before > /tmp/mark")  # /tmp is in RAM (tmpfs)
    clone = source.branch(unique("clone"))
    try:
        assert clone.state() == "running"
        assert sh(clone, "cat /tmp/mark") == "before\n"
        assert sh(clone, "hostname").strip() == clone.name
        assert sh(source, "hostname").strip() != clone.name
        sh(source, "echo source > /tmp/after")
        sh(clone, "echo clone > /tmp/after")
        assert sh(source, "cat /tmp/after") == "source\n"
        assert sh(clone, "cat /tmp/after") == "clone\n"
        clone.write_file("/tmp/only-clone", "x")
        with pytest.raises(smol.NotFoundError):
            source.read_file("/tmp/only-clone")
    finally:
        clone.delete()
    assert clone.name not in names_now()


def test_branch_refusals_are_typed(machine: Machine, source: Machine):
    with pytest.raises(smol.InvalidStateError) as e:
        machine.branch(unique("c"))
    assert "branchable" in str(e.value)
    with pytest.raises(smol.InvalidConfigError):
        source.branch("Not A Name!")
    with pytest.raises(smol.NotSupportedError) as e:
        source.branch(unique("c"), checkpointable=True)
    assert "checkpointable" in str(e.value)
    for call in (source.branch_batch, source.fork_batch):
        with pytest.raises(smol.InvalidConfigError) as e:
            call()
        assert "count >= 1 or a non-empty names" in str(e.value)
    with pytest.raises(smol.InvalidConfigError):
        source.branch_batch(65)
    with pytest.raises(smol.InvalidConfigError):
        source.reward_fork([])
    source.pause()
    with pytest.raises(smol.InvalidStateError):
        source.branch(unique("c"))
    source.resume()


def test_branch_batch_of_three_running_clones(source: Machine):
    sh(source, "echo base > /tmp/base")
    prefix = unique("b")
    clones = source.branch_batch(3, name_prefix=prefix)
    try:
        assert [c.name for c in clones] == [f"{prefix}-{n}" for n in (1, 2, 3)]
        for c in clones:
            assert c.state() == "running"
            assert sh(c, "cat /tmp/base; hostname") == f"base\n{c.name}\n"
        listed = names_now()
        assert all(c.name in listed for c in clones)
    finally:
        for c in clones:
            c.delete()


def test_a_failed_batch_leaves_no_clone_behind(source: Machine, machine: Machine):
    first = unique("ok")
    # a bad name among the names: refused before any clone is made
    with pytest.raises(smol.InvalidConfigError):
        source.branch_batch(names=[first, "bad name!"])
    assert first not in names_now()
    # a clone that fails after others were made (its name is taken): those are deleted
    with pytest.raises(smol.ConflictError):
        source.branch_batch(names=[first, unique("ok"), machine.name])
    listed = names_now()
    assert first not in listed
    assert machine.name in listed and source.name in listed
    assert machine.state() == "running"
    assert not [n for n in listed if n.startswith("ok-")]


def test_reward_fork_runs_in_a_clone_and_leaves_nothing(source: Machine):
    sh(source, "echo 0.75 > /tmp/score")
    r = source.reward_fork(["sh", "-c", "cat /tmp/score; echo graded > /tmp/score; hostname"])
    assert r.exit_code == 0
    score, host = r.stdout.split()
    assert score == "0.75"
    assert host.startswith(f"{source.name}-rf-") and len(host) == len(source.name) + 12
    assert sh(source, "cat /tmp/score") == "0.75\n"  # the clone's write stayed in the clone
    r = source.reward_fork(["sh", "-c", "exit 3"], name="episode")
    assert r.exit_code == 3
    assert [n for n in names_now() if "-rf-" in n] == []


def test_fork_is_an_alias_and_async_machine_branches(source: Machine):
    clone = source.fork(unique("f"))
    try:
        assert sh(clone, "hostname").strip() == clone.name
    finally:
        clone.delete()

    async def main() -> None:
        a = AsyncMachine(source)
        await a.pause()
        assert await a.state() == "paused"
        await a.resume()
        [c] = await a.branch_batch(names=[unique("a")])
        try:
            assert (await c.exec(["hostname"])).stdout.strip() == c.name
        finally:
            await c.delete()

    asyncio.run(main())


def test_freeze_source_leaves_a_base_that_branches_again(source: Machine):
    sh(source, "echo base > /tmp/base")
    first = source.branch(unique("fz"), freeze_source=True)
    try:
        assert source.state() == "frozen"
        with pytest.raises(smol.InvalidStateError) as e:
            source.exec(["true"])
        assert "frozen" in str(e.value)
        more = source.branch_batch(2, name_prefix=unique("fz"))
        try:
            for c in (first, *more):
                assert sh(c, "cat /tmp/base") == "base\n"
        finally:
            for c in more:
                c.delete()
    finally:
        first.delete()
