"""The GIL is released during blocking calls: Python threads driving machines run in parallel,
and Python code keeps running while a call waits. Ctrl-C interrupts a waiting call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from smol import ExecOptions, Machine, MachineConfig
from conftest import unique


def test_two_threads_two_machines_in_parallel():
    machines = {}
    spans = {}
    errors = []

    def drive(key: str) -> None:
        try:
            t0 = time.monotonic()
            m = Machine.create(MachineConfig(name=unique()))
            machines[key] = m
            r = m.exec(["sh", "-c", "sleep 2; echo done"])
            assert r.stdout == "done\n"
            spans[key] = (t0, time.monotonic())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(k,)) for k in ("a", "b")]
    ticks = 0
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # meanwhile this thread keeps running Python code: it would stall if a call held the GIL
    while any(t.is_alive() for t in threads):
        ticks += 1
        time.sleep(0.001)
    wall = time.monotonic() - t0
    try:
        assert not errors, errors
        (a0, a1), (b0, b1) = spans["a"], spans["b"]
        # the two create+exec spans overlap in wall time, and together take well under the sum
        assert max(a0, b0) < min(a1, b1), spans
        assert wall < (a1 - a0) + (b1 - b0) - 1.0, (wall, spans)
        assert ticks > 500, ticks  # ~2 s at 1 ms per tick, minus scheduling
    finally:
        for m in machines.values():
            m.delete()


def test_python_runs_during_one_long_exec(machine):
    done = threading.Event()
    result = {}

    def run() -> None:
        result["r"] = machine.exec(["sleep", "2"])
        done.set()

    threading.Thread(target=run).start()
    n = 0
    t0 = time.monotonic()
    while not done.is_set():
        n += 1  # pure Python work, needs the GIL
    elapsed = time.monotonic() - t0
    assert result["r"].exit_code == 0 and elapsed > 1.5
    assert n > 100_000, n


def test_concurrent_execs_on_one_machine(machine):
    out = [None] * 8

    def run(i: int) -> None:
        out[i] = machine.exec(["sh", "-c", f"sleep 1; echo {i}"]).stdout

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [f"{i}\n" for i in range(8)]
    assert time.monotonic() - t0 < 6  # not 8 x 1 s in a row


def test_ctrl_c_interrupts_a_waiting_exec_and_kills_the_command():
    script = textwrap.dedent(
        """
        import time
        from smol import Machine
        with Machine.create() as m:
            print(m.name, flush=True)
            try:
                m.exec(["sh", "-c", "echo $$ > /tmp/pid; exec sleep 60"])
            except KeyboardInterrupt:
                t = time.monotonic()
                r = m.exec(["sh", "-c", "for i in $(seq 50); do [ -d /proc/$(cat /tmp/pid) ] || exit 0; sleep 0.1; done; exit 1"])
                print("interrupted", r.exit_code, flush=True)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ.copy(),
    )  # fmt: skip
    try:
        first = p.stdout.readline()
        assert first.startswith("smol-"), (first, p.stderr.read() if p.poll() is not None else "")
        time.sleep(1.0)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert "interrupted 0" in out, (out, err)
        assert p.returncode == 0, err
        assert time.monotonic() - t0 < 15
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_exec_timeout_option_in_threads(machine):
    rs = []
    ts = [threading.Thread(target=lambda: rs.append(machine.exec(["sleep", "9"], ExecOptions(timeout=1)))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [r.exit_code for r in rs] == [124, 124, 124]
