#!/usr/bin/env bash
# `make dist-repro`: builds the packages twice (scripts/dist.sh into two scratch directories)
# and compares them: the same file list in each package, and the same checksum for every asset
# and for the manifest. Prints what differs and fails on it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
work=$(mktemp -d "${CARGO_TARGET_DIR:-$repo/target}/dist-repro.XXXXXX")
trap 'rm -rf "$work"' EXIT
for n in 1 2; do
  echo "==> [dist-repro] build $n" >&2
  DIST_OUT="$work/$n" scripts/dist.sh
done
# per package: its file list, and the sha256 of every assets/* member
listing() {
  local f=$1 d
  d=$(mktemp -d "$work/x.XXXXXX")
  case "$f" in
    *.whl) python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$f" "$d" ;;
    *) tar -C "$d" -xzf "$f" ;;
  esac
  (cd "$d" && find . -type f | LC_ALL=C sort && find . -path '*/assets/*' -type f | LC_ALL=C sort | xargs sha256sum)
  rm -rf "$d"
}
fail=0
for f in "$work/1"/*; do
  b=$(basename "$f")
  [ -f "$work/2/$b" ] || { echo "differs: $b only in the first build" >&2; fail=1; continue; }
  if ! diff <(listing "$f") <(listing "$work/2/$b") >&2; then
    echo "differs: $b (file list or asset checksums, above)" >&2; fail=1
  else
    echo "same: $b ($(listing "$f" | grep -c '  ./') asset checksums; archive bytes $(cmp -s "$f" "$work/2/$b" && echo identical || echo differ))" >&2
  fi
done
[ "$(ls "$work/1")" = "$(ls "$work/2")" ] || { echo "differs: the package names" >&2; fail=1; }
exit $fail
