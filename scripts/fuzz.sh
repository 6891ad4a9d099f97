#!/usr/bin/env bash
# make fuzz: every cargo-fuzz target of fuzz/ for a bounded time (SMOL_FUZZ_SECONDS each,
# default 15: 6 targets, about 1.5 minutes) from its checked-in corpus fuzz/corpus/<target>.
# New inputs libFuzzer finds go to fuzz/target/corpus-run/<target> (never into the checked-in
# corpus); a crash, a hang (-timeout) or a leak fails the run and leaves its input in
# fuzz/artifacts/<target>/ (docs/FUZZING.md: how it becomes a regression test).
# Built with ASAN on nightly into $SMOL_CACHE/fuzz-target, outside the clone (kept between
# runs and between clones: a fresh clone rebuilds only the workspace's own crates).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${SMOL_FUZZ_SECONDS:-15}
# oci_unpack's scratch roots go here, not to /tmp
export TMPDIR="$root/fuzz/target/tmp"
rm -rf "$TMPDIR"; mkdir -p "$TMPDIR"
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^smol-fuzz$')
target_dir=${SMOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smol}/fuzz-target
mkdir -p "$target_dir"
echo "==> cargo +nightly fuzz build (ASAN; $target_dir)" >&2
cargo +nightly fuzz build --target-dir "$target_dir"
bin=$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release
failed=()
for t in $targets; do
  [ -d "fuzz/corpus/$t" ] || { echo "error: no corpus fuzz/corpus/$t" >&2; exit 1; }
  mkdir -p "fuzz/target/corpus-run/$t"
  echo "==> fuzz $t: ${secs}s from fuzz/corpus/$t ($(ls "fuzz/corpus/$t" | wc -l) seeds)" >&2
  log="fuzz/target/corpus-run/$t.log"
  mkdir -p "fuzz/artifacts/$t"
  # the binary built above, run as `cargo fuzz run` runs it (which would build again first)
  if "$bin/$t" "fuzz/target/corpus-run/$t" "fuzz/corpus/$t" -artifact_prefix="fuzz/artifacts/$t/" \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done ' "$log" | sed "s/^/    /" >&2 || true
  else
    tail -40 "$log" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: fuzz targets failed: ${failed[*]} (inputs in fuzz/artifacts/<target>/; logs in fuzz/target/corpus-run/<target>.log)" >&2
  exit 1
fi
echo "    every fuzz target ran ${secs}s without a crash" >&2
