"""exec_stream: live events (SPEC §3.9), kill from another thread, close, context manager, GC."""

from __future__ import annotations

import gc
import threading
import time

import pytest
from conftest import eventually, guest_pid_alive

import smol
from smol import ExecOptions


def test_events_in_order_live(machine):
    s = machine.exec_stream(["sh", "-c", "echo a; sleep 1; echo b >&2; sleep 0.2; echo c; exit 5"])
    assert isinstance(s, smol.ExecStream)
    seen = []
    t0 = time.monotonic()
    for ev in s:
        seen.append((round(time.monotonic() - t0, 1), ev))
    events = [ev for _, ev in seen]
    assert events == [
        {"kind": "stdout", "data": "a\n"},
        {"kind": "stderr", "data": "b\n"},
        {"kind": "stdout", "data": "c\n"},
        {"kind": "exit", "exit_code": 5},
    ]
    # "a" came before the sleep ended: the events are live, not collected at the end
    assert seen[0][0] < 0.8 < seen[1][0], seen
    assert list(s) == []  # nothing after the exit event


def test_utf8_split_across_chunks_and_options(machine):
    # 3-byte characters written in pieces that cut them in the middle
    script = "for i in 1 2 3 4 5; do printf '\\342'; sleep 0.05; printf '\\202\\254'; done; echo $X; pwd"
    events = list(machine.exec_stream(["sh", "-c", script], ExecOptions(env={"X": "y"}, workdir="/tmp")))
    assert events[-1] == {"kind": "exit", "exit_code": 0}
    assert "".join(e["data"] for e in events if e["kind"] == "stdout") == "€" * 5 + "y\n/tmp\n"
    # invalid bytes become U+FFFD, and a cut-off last character still comes out
    events = list(machine.exec_stream(["printf", "ok\\377\\342"]))
    assert "".join(e["data"] for e in events if e["kind"] == "stdout") == "ok\ufffd\ufffd"
    assert events[-1]["kind"] == "exit"


def test_stream_timeout_and_stdin(machine):
    events = list(machine.exec_stream(["sh", "-c", "cat; sleep 30"], ExecOptions(stdin="in\n", timeout=1)))
    assert events == [{"kind": "stdout", "data": "in\n"}, {"kind": "exit", "exit_code": 124}]


def _start(machine, pidfile):
    s = machine.exec_stream(["sh", "-c", f"echo $$ > {pidfile}; echo ready; exec sleep 60"])
    assert next(s) == {"kind": "stdout", "data": "ready\n"}
    assert guest_pid_alive(machine, pidfile)
    return s


def test_kill_from_another_thread_while_blocked(machine):
    s = _start(machine, "/tmp/p1")
    t0 = time.monotonic()
    threading.Timer(0.5, s.kill).start()
    with pytest.raises(StopIteration):
        next(s)  # blocked waiting for output until the other thread kills
    assert time.monotonic() - t0 < 5
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/p1"), 10)
    s.kill()  # idempotent
    s.close()
    assert list(s) == []


def test_close_and_context_manager_kill(machine):
    s = _start(machine, "/tmp/p2")
    s.close()
    assert list(s) == []
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/p2"), 10)
    with _start(machine, "/tmp/p3") as s3:
        pass
    assert list(s3) == []
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/p3"), 10)


def test_dropping_the_stream_kills(machine):
    s = _start(machine, "/tmp/p4")
    del s
    gc.collect()
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/p4"), 10)


def test_early_break_then_kill(machine):
    s = machine.exec_stream(["sh", "-c", "echo $$ > /tmp/p5; i=0; while :; do echo $i; i=$((i+1)); sleep 0.05; done"])
    got = []
    for ev in s:
        got.append(ev)
        if len(got) == 3:
            break
    s.kill()
    assert [e["kind"] for e in got] == ["stdout"] * 3
    assert eventually(lambda: not guest_pid_alive(machine, "/tmp/p5"), 10)
    assert machine.exec(["echo", "still fine"]).stdout == "still fine\n"
