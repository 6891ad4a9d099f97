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

# --- test tools (`scripts/setup.sh --test-tools`: make lint / make fuzz; `make run` never
# needs them) ------------------------------------------------------------------------------
# cargo-fuzz and cargo-deny from crates.io, cached in ~/.cargo/bin: installed when the one there
# is not the pinned version, then every tool checked whatever was there before.
if [ "${1:-}" = "--test-tools" ]; then
  tools=("cargo-fuzz 0.13.2 fuzz" "cargo-deny 0.20.2 deny")
  for t in "${tools[@]}"; do
    read -r crate version sub <<<"$t"
    if ! cargo "$sub" --version 2>/dev/null | grep -qwF "$version"; then
      step "cargo install --locked $crate@$version"
      cargo install --locked -q "$crate@$version"
    fi
  done
  bad=()
  for t in "${tools[@]}"; do
    read -r crate version sub <<<"$t"
    cargo "$sub" --version 2>/dev/null | grep -qwF "$version" || bad+=("$crate $version (cargo install --locked $crate@$version)")
  done
  rustup run nightly rustc --version >/dev/null 2>&1 || bad+=("a nightly toolchain for cargo fuzz (rustup toolchain install nightly)")
  if [ ${#bad[@]} -gt 0 ]; then
    printf '  missing: %s\n' "${bad[@]}" >&2
    echo "error: the test tools are not usable" >&2; exit 1
  fi
  exit 0
fi

# --- system packages -------------------------------------------------------------------------
# Every package of scripts/programs.txt, asked for in one apt call: apt keeps, upgrades or
# downgrades what the machine has as it must, and may remove nothing (--no-remove). What counts
# is the check after it: every program of the list present and runnable.
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
programs="$root/scripts/programs.txt"
rows() { grep -vE '^[[:space:]]*(#|$)' "$programs"; }
pkgs=()
for alts in $(rows | awk '{print $2}' | sort -u); do
  IFS='|' read -r -a alt <<<"$alts"
  want=${alt[0]}
  # `a|b`: b already provides the program (NodeSource's nodejs bundles npm, and Debian's npm
  # cannot be installed beside it); b is asked for as well, so apt keeps it
  for b in "${alt[@]:1}"; do
    dpkg-query -W -f='${Status}' "$b" 2>/dev/null | grep -q "install ok installed" && want=$b
  done
  pkgs+=("$want")
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# QEMU's packages come from one build: a qemu-utils of another version (a backport) Breaks
# Debian's qemu-system-common, and apt would remove it to install QEMU. Ask for the version of
# qemu-system-x86 that apt installs.
qemu_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
need_apt=${#missing[@]}
[ "$(qemu_version qemu-utils)" = "$(qemu_version qemu-system-x86)" ] || need_apt=1
if [ "$need_apt" -gt 0 ]; then
  step "apt-get install (missing: ${missing[*]:-none})"
  $sudo apt-get update -qq
  qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  [ -n "$qv" ] && [ "$qv" != "(none)" ] || { echo "error: apt knows no qemu-system-x86 (apt-get update?)" >&2; exit 1; }
  req=()
  for p in "${pkgs[@]}"; do
    case "$p" in qemu-utils|qemu-system-x86|qemu-system-common) req+=("$p=$qv") ;; *) req+=("$p") ;; esac
  done
  mkdir -p "$SMOL_CACHE"
  log="$SMOL_CACHE/apt-install.log"
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-remove --allow-downgrades \
      -o Dpkg::Progress-Fancy=0 "${req[@]}" >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "error: apt-get install failed (whole log: $log)" >&2; exit 1
  fi
  grep -E '^(Unpacking|Setting up) ' "$log" | grep -c '^Setting up' | sed 's/^/    packages set up: /' >&2
  grep -E 'downgraded|upgraded, ' "$log" | sed 's/^/    /' >&2 || true
fi

# Verify every program of the list, whatever apt did.
step "checking every program of scripts/programs.txt"
bad=()
while read -r prog alts role args; do
  if [[ $prog == /* ]]; then
    [ -e "$prog" ] || { bad+=("$prog (${alts%%|*}, $role): missing"); continue; }
    [ "$args" = "-" ] && continue
    bin=$prog
  else
    bin=$(command -v "$prog" || true)
    [ -n "$bin" ] || { bad+=("$prog (${alts%%|*}, $role): not on PATH"); continue; }
    [ "$args" = "-" ] && continue
  fi
  # shellcheck disable=SC2086 # the version argument may be several words
  "$bin" $args >/dev/null 2>&1 </dev/null || bad+=("$prog (${alts%%|*}, $role): \`$bin $args\` fails")
done < <(rows)
if [ ${#bad[@]} -gt 0 ]; then
  printf '  missing: %s\n' "${bad[@]}" >&2
  echo "error: the set-up installed its packages but these programs are not usable; try" >&2
  echo "  $sudo apt-get install $(printf '%s\n' "${bad[@]}" | sed -E 's/^[^(]*\(([^,]*),.*/\1/' | sort -u | tr '\n' ' ')" >&2
  exit 1
fi
# The fleet's PostgreSQL tests run initdb and the server as the `postgres` user (postgresql-common
# makes it when the package is installed).
id -u postgres >/dev/null 2>&1 || {
  echo "error: the postgresql package is installed but there is no \`postgres\` user; try" >&2
  echo "  $sudo apt-get install --reinstall postgresql-common" >&2; exit 1; }
echo "    all $(rows | wc -l) programs present; $(qemu-system-x86_64 --version | head -1)" >&2

# --- workspace -------------------------------------------------------------------------------
step "building the workspace (release)"
cargo build --release -q -p smol-cli
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
