#!/usr/bin/env bash
# Builds the smol guest kernel (an uncompressed PVH vmlinux) from Debian's linux-source-6.1.
# Output is cached outside the clone, keyed by the source package version, the config fragment and
# this script: $SMOL_CACHE/kernel/<key>/vmlinux. Prints the vmlinux path on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SMOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smol}
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "error: $tarball missing; install Debian's linux-source-6.1" >&2; exit 1; }
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (echo "$srcver"; cat "$here/smol.config" "$here/build.sh") | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi
work="$cache/kernel-build"
mkdir -p "$work" "$out"
src="$work/linux-source-6.1"
if [ ! -f "$work/.unpacked-$srcver" ]; then
  echo "unpacking $tarball ..." >&2
  rm -rf "$src" "$work"/.unpacked-*
  tar -xf "$tarball" -C "$work"
  touch "$work/.unpacked-$srcver"
fi
cd "$src"
make -s ARCH=x86_64 tinyconfig >&2
args=()
while read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  # shellcheck disable=SC2206
  args+=($line)
done < "$here/smol.config"
scripts/config "${args[@]}"
make -s ARCH=x86_64 olddefconfig >&2
# every enabled option must survive olddefconfig (a dropped dependency would silently remove it)
while read -r flag name _; do
  case "$flag" in
    -e) grep -q "^CONFIG_$name=y" .config || { echo "error: CONFIG_$name did not survive olddefconfig" >&2; exit 1; } ;;
    -d) ! grep -q "^CONFIG_$name=y" .config || { echo "error: CONFIG_$name still set" >&2; exit 1; } ;;
  esac
done < <(grep -E '^-[ed] ' "$here/smol.config")
echo "building kernel (about 3 minutes on 2 cores) ..." >&2
make ARCH=x86_64 -j"$(nproc)" vmlinux > "$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
cp .config "$out/config"
cp vmlinux "$out/vmlinux.tmp"
strip --strip-debug "$out/vmlinux.tmp" 2>/dev/null || true
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$out/vmlinux"
