#!/usr/bin/env bash
# The user's machine of `make test-dist`: a Debian 12 minbase root made with debootstrap that
# holds only what the packages' install instructions (README, docs/PACKAGES.md) ask a user for:
# python3, python3-venv, nodejs, npm, qemu-system-x86, qemu-utils (installed by apt, without
# recommends) and ca-certificates. No cargo, no compiler, no repo.
#
#   scripts/test-dist-root.sh        prints the path of the cached root tarball (builds it once)
#
# The tarball is cached under $SMOL_CACHE/test-dist keyed by its package list and mirror, so a
# rerun (CI) takes it as it is. Needs root and debootstrap (scripts/programs.txt).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "error: building the test root needs root (debootstrap)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
cache=${SMOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smol}/test-dist
packages="python3 python3-venv nodejs npm qemu-system-x86 qemu-utils"
mirror=http://deb.debian.org/debian
key=$(echo "bookworm minbase ca-certificates + $packages $mirror v2" | sha256sum | cut -c1-16)
tarball="$cache/bookworm-user-$key.tar"
[ -f "$tarball" ] && { echo "$tarball"; exit 0; }

mkdir -p "$cache"
work=$(mktemp -d /var/tmp/smol-dist-root.XXXXXX)
root="$work/root"
mounted=()
cleanup() {
  local rc=$?
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
  exit $rc
}
trap cleanup EXIT
echo "==> debootstrap bookworm (minbase + ca-certificates), then apt-get install $packages; cached as $tarball" >&2
# debootstrap's own dependency order cannot configure npm's node-* packages: the base is
# minimal, and apt inside it installs the user's packages as a user would
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# this machine's apt client settings (without which no registry answers here), for the install
# only: the cached root keeps Debian's own sources
saved=()
for f in /etc/apt/apt.conf.d/99artifact-registry /etc/apt/sources.list.d/debian.sources; do
  [ -f "$f" ] || continue
  mkdir -p "$root$(dirname "$f")"; cp "$f" "$root$f"; saved+=("$f")
done
[ -f /etc/apt/sources.list.d/debian.sources ] && mv "$root/etc/apt/sources.list" "$work/sources.list"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
chroot "$root" update-ca-certificates >/dev/null 2>&1
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"; mounted+=("$root/proc")
if ! chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages" \
    > "$work/apt.log" 2>&1; then
  tail -30 "$work/apt.log" >&2; echo "error: apt-get install in the test root failed" >&2; exit 1
fi
umount "$root/proc"; mounted=()
chroot "$root" apt-get clean
rm -rf "$root/var/lib/apt/lists/"*
for f in "${saved[@]}"; do rm -f "$root$f"; done
[ -f "$work/sources.list" ] && mv "$work/sources.list" "$root/etc/apt/sources.list"
tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
echo "$tarball"
