"""Per-call overhead of the Python binding: ``exec(["true"])`` from Python against the same call
made from Rust, on the same machine in the same run.

The Rust figure comes from ``smol._native.Machine.bench_exec``: a loop in Rust that awaits
``smolmachines::Machine::exec(["true"])`` on the binding's runtime and times each call, so both
sides drive the same VM through the same core; the difference is what the binding adds
(argument conversion, releasing and taking the GIL, entering the runtime, building the
``ExecResult``). Rounds alternate between the two sides so that drift of the VM (TCG) hits both.

    target/py-venv/bin/python bindings/python/bench.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time

from smol import Machine, MachineConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200, help="calls per side per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with Machine.create(MachineConfig()) as m:
        native = m._native
        for _ in range(50):  # warm up both paths
            m.exec(["true"])
        native.bench_exec(50)
        py, rs = [], []
        for _ in range(args.rounds):
            for _ in range(args.calls):
                t = time.perf_counter()
                m.exec(["true"])
                py.append(time.perf_counter() - t)
            rs.extend(native.bench_exec(args.calls))
        accel = next((s.accel for s in Machine.list() if s.name == m.name), "?")

    py_med, rs_med = statistics.median(py), statistics.median(rs)
    print(f"exec(['true']) per call, {len(py)} calls per side, one machine ({accel}):")
    print(f"  Python  median {py_med * 1e6:8.1f} us   p90 {statistics.quantiles(py, n=10)[8] * 1e6:8.1f} us")
    print(f"  Rust    median {rs_med * 1e6:8.1f} us   p90 {statistics.quantiles(rs, n=10)[8] * 1e6:8.1f} us")
    print(f"  binding overhead {(py_med - rs_med) * 1e6:+.1f} us per call")
    print(f"  ratio Python/Rust {py_med / rs_med:.3f}x (target <= 1.1x)")


if __name__ == "__main__":
    main()
