#!/usr/bin/env bash
# `make dist`: the packages users install, in dist/ (or $DIST_OUT), nothing to build on the
# user's machine:
#
#   smolmachines-<v>-cp39-abi3-manylinux_<glibc>_x86_64.whl   the Python module and the assets
#   smolmachines-<v>.tgz                                       the Node package, addon and assets
#   smol-<v>-x86_64-linux.tar.gz                               smol, smolfleet and the assets
#
# The assets are smol's guest kernel and the initramfs with the agent, as the set-up built them
# ($SMOL_HOME/assets; $DIST_ASSETS overrides), plus a manifest.json (version, the agent's
# protocol generations, sha256 and size of each file) by which the engine knows them as packaged
# (crates/smolmachines/src/local/assets.rs). The agent inside the initramfs must be the one this
# tree builds: a stale initramfs is refused (run `make setup`).
#
# Reproducible enough to compare: file mtimes are SOURCE_DATE_EPOCH (the last commit's time),
# archives are sorted, owned by 0:0 and gzip'ed without a name or time (scripts/dist-repro.sh).
# Needs `make setup` first (the release CLI, the agent, the assets); maturin and auditwheel come
# from PyPI into target/dist-venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
step() { echo "==> [dist $(date +%T)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
out=${DIST_OUT:-$root/dist}
target=${CARGO_TARGET_DIR:-$root/target}
SMOL_HOME=${SMOL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/smol}
assets_src=$(realpath -m "${DIST_ASSETS:-$SMOL_HOME/assets}")
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

# --- one version -------------------------------------------------------------------------------
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no [workspace.package] version in Cargo.toml"
npm_version=$(node -p 'require("./bindings/node/package.json").version')
[ "$npm_version" = "$version" ] ||
  die "bindings/node/package.json has version $npm_version, the workspace $version: make them one"
proto_max=$(sed -n 's/^pub const PROTOCOL_VERSION: u16 = \([0-9]*\);/\1/p' crates/smol-protocol/src/lib.rs)
proto_min=$(sed -n 's/^pub const MIN_PROTOCOL_VERSION: u16 = \([0-9]*\);/\1/p' crates/smol-protocol/src/lib.rs)
[ -n "$proto_max" ] && [ -n "$proto_min" ] || die "cannot read the protocol generations of crates/smol-protocol"
step "smolmachines $version (agent protocol $proto_min..$proto_max), into $out"

stage=$(mktemp -d "$target/dist-stage.XXXXXX")
pyassets="$root/bindings/python/python/smol/assets"
cleanup() { rm -rf "$stage" "$pyassets"; }
trap cleanup EXIT

# --- the binaries (release; what the set-up and the SDK suites already built) -------------------
step "cargo build --release (smol, smolfleet, the Node addon) and the agent"
cargo build --release -q -p smol-cli -p smol-fleet -p smol-node
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p smol-agent --profile release-agent --target x86_64-unknown-linux-gnu
agent="$target/x86_64-unknown-linux-gnu/release-agent/smol-agent"

# --- the assets ---------------------------------------------------------------------------------
for f in vmlinux initramfs.cpio; do
  [ -f "$assets_src/$f" ] || die "$assets_src/$f is missing: run \`make setup\` (or set DIST_ASSETS)"
done
(cd "$stage" && cpio --quiet -i --to-stdout init < "$assets_src/initramfs.cpio") > "$stage/agent-in-initramfs"
cmp -s "$stage/agent-in-initramfs" "$agent" ||
  die "the agent in $assets_src/initramfs.cpio is not the one this tree builds ($agent): run \`make setup\`"
rm "$stage/agent-in-initramfs"
assets="$stage/assets"
mkdir -p "$assets"
cp "$assets_src/vmlinux" "$assets_src/initramfs.cpio" "$assets/"
sum() { sha256sum "$1" | cut -d' ' -f1; }
cat > "$assets/manifest.json" <<EOF
{
  "package": "smolmachines",
  "version": "$version",
  "protocol": { "min": $proto_min, "max": $proto_max },
  "files": {
    "vmlinux": { "sha256": "$(sum "$assets/vmlinux")", "size": $(stat -c %s "$assets/vmlinux") },
    "initramfs.cpio": { "sha256": "$(sum "$assets/initramfs.cpio")", "size": $(stat -c %s "$assets/initramfs.cpio") }
  }
}
EOF
chmod 0644 "$assets"/*
# a reproducible tree: fixed times, fixed modes
settle() { find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; }
mkdir -p "$out"
rm -f "$out"/smolmachines-*.whl "$out"/smolmachines-*.tgz "$out"/smol-*-x86_64-linux.tar.gz

# --- the CLI tarball ----------------------------------------------------------------------------
step "smol-$version-x86_64-linux.tar.gz"
cli="$stage/cli/smol-$version-x86_64-linux"
mkdir -p "$cli"
install -m 0755 "$target/release/smol" "$target/release/smolfleet" "$cli/"
cp -r "$assets" "$cli/assets"
cat > "$cli/README" <<EOF
smol $version for x86_64 Linux (glibc): the CLI \`smol\`, the fleet server \`smolfleet\`, and
the guest assets they find by themselves in assets/ next to them (SMOL_ASSETS overrides).

Needs only QEMU from the system: apt-get install qemu-system-x86 qemu-utils
(optional: virtiofsd for mounts, passt for networking).

    ./smol doctor
    ./smol run -- uname -a
EOF
chmod 0644 "$cli/README"
settle "$stage/cli"
tar -C "$stage/cli" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -cf - "smol-$version-x86_64-linux" | gzip -n -9 > "$out/smol-$version-x86_64-linux.tar.gz"

# --- the npm package: the addon inside the main package, no install script ----------------------
step "smolmachines-$version.tgz (npm)"
pkg="$stage/npm"
mkdir -p "$pkg"
for f in index.js index.mjs index.d.ts errors.js README.md; do cp "bindings/node/$f" "$pkg/"; done
install -m 0755 "$target/release/libsmol_node.so" "$pkg/smol.node"
cp -r "$assets" "$pkg/assets"
node -e '
const fs = require("node:fs");
const p = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
// prebuilt: nothing to run or build at install time
delete p.scripts; delete p.devDependencies;
p.files = ["index.js", "index.mjs", "index.d.ts", "errors.js", "smol.node", "assets/"];
fs.writeFileSync(process.argv[2], JSON.stringify(p, null, 2) + "\n");
' bindings/node/package.json "$pkg/package.json"
settle "$pkg"
(cd "$pkg" && npm pack --silent --pack-destination "$out" >/dev/null)
[ -f "$out/smolmachines-$version.tgz" ] || die "npm pack wrote no $out/smolmachines-$version.tgz"

# --- the Python wheel: maturin (abi3), the assets as package data -------------------------------
step "the wheel (maturin build --release)"
venv="$target/dist-venv"
if ! "$venv/bin/maturin" --version >/dev/null 2>&1 || ! "$venv/bin/auditwheel" --version >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "maturin>=1.5,<2" "auditwheel>=6"
fi
# package data: maturin packs python/smol/ whole (the directory is ignored by git and removed
# again on exit)
rm -rf "$pyassets"
cp -r "$assets" "$pyassets"
settle "$pyassets"
"$venv/bin/maturin" build --release --quiet --out "$stage/wheel" -m bindings/python/Cargo.toml >&2
rm -rf "$pyassets"
wheel=$(ls "$stage/wheel"/smolmachines-"$version"-cp39-abi3-*.whl)
show=$("$venv/bin/auditwheel" show "$wheel")
# "... is consistent with the following platform tag: "T"" or "This constrains the platform tag
# to "T"" (wrapped lines joined)
tag=$(tr '\n' ' ' <<<"$show" | grep -o 'platform tag[^"]*"[^"]*"' | head -1 | grep -o '"[^"]*"' | tr -d '"' || true)
[ -n "$tag" ] || { echo "$show" >&2; die "auditwheel names no platform tag for $wheel"; }
case "$(basename "$wheel")" in
  *"-$tag.whl") ;;
  *) echo "$show" >&2; die "$(basename "$wheel") is not tagged $tag, what auditwheel says it needs" ;;
esac
cp "$wheel" "$out/"
step "auditwheel: $(basename "$wheel") is consistent with $tag"

# --- sizes --------------------------------------------------------------------------------------
step "dist/ ($version):"
(cd "$out" && for f in smolmachines-"$version"-*.whl smolmachines-"$version".tgz smol-"$version"-x86_64-linux.tar.gz; do
  printf '    %-60s %6.1f MB\n' "$f" "$(echo "$(stat -c %s "$f") / 1000000" | bc -l)"
done) >&2
