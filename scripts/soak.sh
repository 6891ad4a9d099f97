#!/usr/bin/env bash
# make soak: the soak test of docs/RELIABILITY.md, bounded by SOAK_SECONDS (default 180).
# 8 machines (SOAK_MACHINES), 200 operations in flight (SOAK_CONCURRENCY), execs and file
# transfers both ways; then 0 failures and no leaked processes, fds, sockets, cgroups or files.
# It is an ignored test of crates/smolmachines/tests/soak.rs, run alone and in release.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SOAK_SECONDS=${SOAK_SECONDS:-180}
# the VM tests' hang guard (tests/common.rs), past the soak's own time
export SMOL_TEST_DEADLINE=${SMOL_TEST_DEADLINE:-$((SOAK_SECONDS + 900))}
exec cargo test --release -p smolmachines --test soak -- --ignored --nocapture --test-threads=1
