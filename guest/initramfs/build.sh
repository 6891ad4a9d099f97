#!/usr/bin/env bash
# Builds the guest initramfs (uncompressed newc cpio): the smol agent as /init and Debian's
# busybox-static with every applet, plus /etc/passwd and friends.
# usage: build.sh <agent binary> <output.cpio> [<modules dir> <kernel release>]
# With a modules dir (the Debian cloud kernel fallback) the virtio modules are added under
# /lib/modules/<release>/ with smol.order, the load order the agent follows.
set -euo pipefail
agent=$(realpath "$1") out=$(realpath -m "$2") moddir=${3:+$(realpath "$3")} release=${4:-}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "error: $busybox missing; install Debian's busybox-static" >&2; exit 1; }
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || true
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cd "$stage"
mkdir -p bin sbin usr/bin usr/sbin etc root tmp proc sys dev run var/tmp lib
install -m 0755 "$agent" init
ln -s /init sbin/smol-agent
install -m 0755 "$busybox" bin/busybox
# every applet as a symlink, where busybox itself would install it
"$busybox" --list-full | while read -r applet; do
  [ -e "$applet" ] || [ -L "$applet" ] || ln -s /bin/busybox "$applet"
done
cat > etc/passwd <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > etc/group <<'G'
root:x:0:
tty:x:5:
nogroup:x:65534:
G
printf '127.0.0.1 localhost\n::1 localhost\n' > etc/hosts
printf 'hosts: files dns\n' > etc/nsswitch.conf
chmod 1777 tmp var/tmp
chmod 0700 root
if [ "$(id -u)" = 0 ]; then mknod -m 0600 dev/console c 5 1; fi
if [ -n "$moddir" ]; then
  dst="lib/modules/$release"
  mkdir -p "$dst"
  order=""
  for m in virtio_ring virtio virtio_mmio virtio_console virtio_blk virtio-rng virtio_net overlay fuse virtiofs; do
    f=$(find "$moddir" -name "$m.ko" -o -name "${m//-/_}.ko" | head -1)
    [ -n "$f" ] || { echo "error: module $m not found under $moddir" >&2; exit 1; }
    cp "$f" "$dst/"
    order="$order $(basename "$f")"
  done
  # virtio_net needs failover + net_failover first
  for m in failover net_failover; do
    f=$(find "$moddir" -name "$m.ko" | head -1)
    [ -n "$f" ] && cp "$f" "$dst/" && order="${order/ virtio_net.ko/ $m.ko virtio_net.ko}"
  done
  echo "$order" > "$dst/smol.order"
fi
mkdir -p "$(dirname "$out")"
find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > "$out.tmp"
mv "$out.tmp" "$out"
