#!/usr/bin/env bash
# For working on the agent without touching the installed assets: builds the static agent of
# this tree and an initramfs with it at OUT (default target/dev-initramfs.cpio), and prints the
# path. Boot machines with it: SMOL_INITRD=$(scripts/dev-initramfs.sh) cargo test ...
# (scripts/setup.sh installs the same thing into the engine home for everyone.)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-$root/target/dev-initramfs.cpio}
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p smol-agent --profile release-agent --target x86_64-unknown-linux-gnu >&2
agent="$root/target/x86_64-unknown-linux-gnu/release-agent/smol-agent"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$agent" "$tmp/smol-agent"
file "$tmp/smol-agent" | grep -q 'static' || { echo "error: $agent is not statically linked" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
guest/initramfs/build.sh "$tmp/smol-agent" "$out.tmp" >&2
mv "$out.tmp" "$out"
echo "$out"
