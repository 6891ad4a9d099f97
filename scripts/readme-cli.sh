#!/usr/bin/env bash
# Runs the CLI quick start of README.md ("## The CLI": every `$ smol ...` line) exactly as
# printed, against a fresh engine home and a test registry on 127.0.0.1:5000 (the address the
# README uses). Every command must succeed; a few outputs are checked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/target/release:$PATH"
assets="${SMOL_ASSETS:-${SMOL_HOME:-$HOME/.local/share/smol}/assets}"
home=$(mktemp -d /tmp/smol-readme.XXXXXX)
export SMOL_HOME="$home" SMOL_ASSETS="$assets"
reg=""
cleanup() {
  smol machine rm worker >/dev/null 2>&1 || true
  [ -n "$reg" ] && bash "$root/scripts/test-registry.sh" stop "$reg" >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT

echo "==> test registry on 127.0.0.1:5000"
out=$(bash "$root/scripts/test-registry.sh" start --port 5000 --watch $$)
reg=$(sed -n 's/^DIR=//p' <<<"$out")

mapfile -t cmds < <(awk '/^## The CLI/{f=1;next} /^## /{f=0} f && /^    \$ smol /{sub(/^    \$ /,""); print}' "$root/README.md")
[ "${#cmds[@]}" -ge 10 ] || { echo "error: found only ${#cmds[@]} CLI lines in README.md" >&2; exit 1; }
log="$home/out"
for c in "${cmds[@]}"; do
  echo "\$ $c"
  bash -c "$c" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "error: README command failed with exit code $rc: $c" >&2; exit 1; }
done
grep -q '^Linux smol-' "$log" || { echo "error: no uname line" >&2; exit 1; }
grep -qx '1024' "$log" || { echo "error: the python image did not print 1024" >&2; exit 1; }
grep -qx 'v' "$log" || { echo "error: the file written before stop was not read back" >&2; exit 1; }
echo "ok: ${#cmds[@]} README CLI commands ran as printed"
