#!/usr/bin/env bash
# One-time (and idempotent) set-up of a Debian host for smol: system packages, the workspace, the
# guest kernel, the agent, the initramfs, and the Debian cloud kernel fallback. Heavy artifacts are
# cached outside the clone ($SMOL_CACHE, default ~/.cache/smol) keyed by their inputs; the engine
# reads the installed assets from $SMOL_HOME/assets (default ~/.local/share/smol/assets).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SMOL_CACHE=${SMOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smol}
SMOL_HOME=${SMOL_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/smol}
assets="$SMOL_HOME/assets"
step() { echo "==> $*" >&2; }
command -v cargo >/dev/null || {
  echo "error: cargo not found; install a Rust toolchain (rustup, or Debian's cargo) first" >&2; exit 1; }

# --- system packages -------------------------------------------------------------------------
pkgs=(qemu-system-x86 qemu-utils e2fsprogs passt dnsmasq-base iproute2 docker-registry skopeo umoci erofs-utils debootstrap zstd jq apache2-utils zlib1g-dev pkg-config linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio
      busybox-static lz4 kmod file nodejs python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- workspace -------------------------------------------------------------------------------
step "building the workspace (release)"
cargo build --release --workspace --exclude smol-agent -q
step "building the guest agent (static)"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -q -p smol-agent --profile release-agent --target x86_64-unknown-linux-gnu
agent="$root/target/x86_64-unknown-linux-gnu/release-agent/smol-agent"
file "$agent" | grep -q 'static' || { echo "error: $agent is not statically linked" >&2; exit 1; }

# --- guest kernel (about 3 minutes the first time, cached) -----------------------------------
step "guest kernel"
vmlinux=$(guest/kernel/build.sh)

# --- Debian cloud kernel fallback (SMOL_KERNEL=cloud) ----------------------------------------
step "Debian cloud kernel (fallback)"
resolve_cloud() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
cloudpkg=$(resolve_cloud)
if [ -z "$cloudpkg" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && cloudpkg=$(resolve_cloud)
fi
[ -n "$cloudpkg" ] || { echo "error: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
cloudver=$(apt-cache policy "$cloudpkg" | awk '/Candidate:/{print $2}')
clouddir="$SMOL_CACHE/cloud-kernel/$cloudpkg-$cloudver"
if [ ! -f "$clouddir/vmlinux" ]; then
  rm -rf "$clouddir.tmp"; mkdir -p "$clouddir.tmp"
  (cd "$clouddir.tmp" && apt-get download -q "$cloudpkg=$cloudver" 2>/dev/null && dpkg-deb -x ./*.deb root)
  bz=$(ls "$clouddir.tmp"/root/boot/vmlinuz-*)
  # the bzImage carries an LZ4 (legacy format) kernel; extract the PVH-bootable ELF
  off=$(grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -1 | cut -d: -f1)
  tail -c +"$((off + 1))" "$bz" | lz4 -dc > "$clouddir.tmp/vmlinux" 2>/dev/null || true
  file "$clouddir.tmp/vmlinux" | grep -q ELF || { echo "error: could not extract the cloud vmlinux" >&2; exit 1; }
  ls "$clouddir.tmp"/root/lib/modules > "$clouddir.tmp/release"
  mv "$clouddir.tmp" "$clouddir"
fi
cloudrel=$(cat "$clouddir/release")

# --- initramfs (rebuilt when the agent, busybox or the script change) ------------------------
step "initramfs"
key=$( (sha256sum "$agent" /bin/busybox guest/initramfs/build.sh; echo "$cloudrel") | sha256sum | cut -c1-16)
initrd="$SMOL_CACHE/initramfs/$key/initramfs.cpio"
initrd_cloud="$SMOL_CACHE/initramfs/$key/initramfs-cloud.cpio"
if [ ! -f "$initrd_cloud" ]; then
  guest/initramfs/build.sh "$agent" "$initrd"
  guest/initramfs/build.sh "$agent" "$initrd_cloud" "$clouddir/root/lib/modules/$cloudrel" "$cloudrel"
fi

# --- install into the engine's home ----------------------------------------------------------
mkdir -p "$assets/cloud"
install_file() { cmp -s "$1" "$2" 2>/dev/null || { cp "$1" "$2.tmp" && mv "$2.tmp" "$2"; }; }
install_file "$vmlinux" "$assets/vmlinux"
install_file "$initrd" "$assets/initramfs.cpio"
install_file "$clouddir/vmlinux" "$assets/cloud/vmlinux"
install_file "$initrd_cloud" "$assets/cloud/initramfs.cpio"
step "assets ready in $assets"
