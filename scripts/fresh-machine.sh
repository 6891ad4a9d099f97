#!/usr/bin/env bash
# The fresh-machine check: the README's commands on a Debian 12 that has only a Rust toolchain.
#
#   scripts/fresh-machine.sh [--keep] [COMMAND...]      (default COMMAND: make run)
#
# Builds a clean Debian 12 minbase root with debootstrap, plus what a Rust toolchain itself needs
# (build-essential, git) and ca-certificates; binds in only this machine's Rust toolchain
# (~/.rustup and ~/.cargo/bin, read-only); copies in the machine's local CA certificates and its
# apt, pip and npm client settings (without which no registry answers here); clones the
# committed HEAD of this repo into it and runs COMMAND there under chroot, with /proc, /sys and
# /dev mounted. Nothing else of this machine is visible inside: every package the project needs
# must come from its own set-up.
#
# The debootstrap'ed base (the "fresh machine" itself, not the project's set-up) is cached as a
# tarball under $SMOL_CACHE/fresh-machine, keyed by its package list, so a rerun starts from the
# same pristine root in seconds. On success for `make run`, the key of the set-up's inputs is
# written to scripts/fresh-machine.passed: .ci/run reruns this check whenever they change.
#
# Needs root and the debootstrap package (scripts/programs.txt). Takes ~20-30 minutes on 2 cores
# (packages, the workspace, the guest kernel: everything a new user's `make run` does).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
[ $# -gt 0 ] || set -- make run
[ "$(id -u)" = 0 ] || { echo "error: the fresh-machine check needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
step() { echo "==> [fresh-machine $(date +%T)] $*" >&2; }

cache=${SMOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smol}/fresh-machine
include=build-essential,git,ca-certificates
mirror=http://deb.debian.org/debian
base_key=$(echo "bookworm minbase $include $mirror v1" | sha256sum | cut -c1-16)
base="$cache/bookworm-$base_key.tar"
work=$(mktemp -d /var/tmp/smol-fresh.XXXXXX)
root="$work/root"
mounted=()
cleanup() {
  local rc=$?
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -l "${mounted[$i]}" 2>/dev/null || echo "warning: could not unmount ${mounted[$i]}" >&2
  done
  if [ "$keep" = 1 ]; then echo "kept $root" >&2; else rm -rf --one-file-system "$work"; fi
  exit $rc
}
trap cleanup EXIT
mnt() { mount "$@"; mounted+=("${!#}"); }

t0=$(date +%s)
mkdir -p "$cache" "$root"
if [ ! -f "$base" ]; then
  step "debootstrap bookworm (minbase + $include), cached as $base"
  debootstrap --variant=minbase --include="$include" bookworm "$work/base" "$mirror" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/base" -cf "$base.tmp" . && mv "$base.tmp" "$base"
  rm -rf --one-file-system "$work/base"
fi
step "a pristine root from $base"
tar -C "$root" -xf "$base"

# --- what every machine here has, and without which no registry answers ----------------------
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$root" update-ca-certificates >/dev/null 2>&1
for f in /etc/apt/apt.conf.d/99artifact-registry /etc/apt/sources.list.d/debian.sources \
         /etc/pip.conf /etc/npmrc /usr/etc/npmrc /root/.npmrc /root/.config/pip/pip.conf; do
  [ -f "$f" ] || continue
  mkdir -p "$root$(dirname "$f")"
  cp "$f" "$root$f"
done
[ -f /etc/apt/sources.list.d/debian.sources ] && rm -f "$root/etc/apt/sources.list"
cp /etc/resolv.conf "$root/etc/resolv.conf"

# --- the Rust toolchain, and nothing else of this machine ------------------------------------
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin"
mnt --bind -o ro "$rustup_home" "$root/root/.rustup"
mount -o remount,bind,ro "$root/root/.rustup"
mnt --bind -o ro "$cargo_bin" "$root/root/.cargo/bin"
mount -o remount,bind,ro "$root/root/.cargo/bin"
mnt -t proc proc "$root/proc"
mnt -t sysfs sys "$root/sys"
mnt --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"

# --- the project, as a new user gets it: a clone of what is committed ------------------------
step "git clone $(git -C "$repo" rev-parse --short HEAD) into the root"
git clone -q --no-hardlinks "file://$repo" "$root/root/smol"
[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ] ||
  echo "warning: uncommitted changes in $repo are not part of this check" >&2

step "running: $* (log: $work/run.log while it runs)"
t1=$(date +%s)
set +e
chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt RUSTUP_AUTO_INSTALL=0 \
  bash -c 'cd /root/smol && "$@"' fresh "$@" 2>&1 | tee "$work/run.log" | sed -u 's/^/    | /'
rc=${PIPESTATUS[0]}
set -e
t2=$(date +%s)
if [ "$rc" != 0 ]; then
  cp "$work/run.log" "$cache/last-failure.log"
  step "FAILED ($rc) after $((t2 - t1)) s: $* (log kept in $cache/last-failure.log)"
  exit "$rc"
fi
step "passed: $* in $((t2 - t1)) s ($((t2 - t0)) s in all)"
if [ "$*" = "make run" ]; then
  "$repo/scripts/fresh-machine-key.sh" > "$repo/scripts/fresh-machine.passed"
  step "recorded the set-up's key in scripts/fresh-machine.passed ($(cat "$repo/scripts/fresh-machine.passed"))"
fi
