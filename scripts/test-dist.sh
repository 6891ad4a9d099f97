#!/usr/bin/env bash
# `make test-dist`: the packages of `make dist` as a user installs them, on a machine that has
# only what docs/PACKAGES.md asks for.
#
#   scripts/test-dist.sh [--keep]
#
# 1. scripts/dist.sh builds the wheel, the npm tarball and the CLI tarball into dist/.
# 2. A Debian 12 root (scripts/test-dist-root.sh: debootstrap'ed, then python3, python3-venv,
#    nodejs, npm, qemu-system-x86, qemu-utils; cached under $SMOL_CACHE/test-dist keyed by that
#    list) is unpacked afresh. It has no cargo, no compiler and no repo; this machine's CA
#    certificates and apt/pip/npm client settings are copied in (fresh-machine.sh does the same),
#    /proc, /sys and /dev are mounted (with /dev/kvm where the host has it; without a usable one
#    the engine falls back to TCG by itself, and SMOL_ACCEL is passed through when set).
# 3. In the root, as root with HOME=/root and nothing of the set-up's ~/.local/share/smol:
#    - python3 -m venv, pip install of the wheel (--no-index: the wheel alone), then the seed
#      page's Python samples (scripts/test-dist-seed.py);
#    - npm install ./smolmachines-<v>.tgz into an empty project, then the seed page's TypeScript
#      samples (scripts/test-dist-seed.mts, compiled here by tsc against the installed package's
#      declarations);
#    - the CLI tarball unpacked: smol --version, smol doctor, smol run -- uname -a;
#    each one checks that the packaged assets are the ones in use and prints the version.
# TEST_DIST_PREBUILT=1 tests the packages already in dist/ instead of building them.
# Fails on the first step that does. Needs root, debootstrap, node/npm and `make setup`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
keep=0
[ "${1:-}" = "--keep" ] && keep=1
[ "$(id -u)" = 0 ] || { echo "error: the packages test needs root (chroot, mounts)" >&2; exit 1; }
step() { echo "==> [test-dist $(date +%T)] $*" >&2; }
t0=$(date +%s)
target=${CARGO_TARGET_DIR:-$repo/target}
dist=${DIST_OUT:-$repo/dist}

if [ -n "${TEST_DIST_PREBUILT:-}" ]; then
  step "the packages already in $dist (TEST_DIST_PREBUILT)"
else
  step "make dist (scripts/dist.sh)"
  DIST_OUT=$dist scripts/dist.sh
fi
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
wheel=$(ls "$dist"/smolmachines-"$version"-cp39-abi3-manylinux_*_x86_64.whl)
npmtgz="$dist/smolmachines-$version.tgz"
clitgz="$dist/smol-$version-x86_64-linux.tar.gz"
t1=$(date +%s)

step "the user's root (scripts/test-dist-root.sh)"
base=$(scripts/test-dist-root.sh)
work=$(mktemp -d /var/tmp/smol-test-dist.XXXXXX)
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
mkdir -p "$root"
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
mnt -t proc proc "$root/proc"
mnt -t sysfs sys "$root/sys"
mnt --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"
mkdir -p "$root/tmp" && chmod 1777 "$root/tmp"

# --- the packages and the samples --------------------------------------------------------------
mkdir -p "$root/root/dist" "$root/root/app"
cp "$wheel" "$npmtgz" "$clitgz" "$root/root/dist/"
cp scripts/test-dist-seed.py "$root/root/seed.py"
# the TypeScript samples: tsc here (the user's machine has no TypeScript), against the
# declarations of the package as npm installs it from the tarball
step "tsc scripts/test-dist-seed.mts against the packed smolmachines"
ts="$target/test-dist-ts"
rm -rf "$ts" && mkdir -p "$ts"
[ -x bindings/node/node_modules/.bin/tsc ] || (cd bindings/node && npm ci --silent)
printf '{ "name": "seed", "private": true, "type": "module" }\n' > "$ts/package.json"
(cd "$ts" && npm_config_audit=false npm_config_fund=false npm install --silent --offline --no-package-lock "$npmtgz")
ln -s "$repo/bindings/node/node_modules/@types" "$ts/node_modules/@types"
cp scripts/test-dist-seed.mts "$ts/seed.mts"
cat > "$ts/tsconfig.json" <<'EOF'
{ "compilerOptions": { "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext",
    "strict": true, "outDir": "out", "noEmitOnError": true, "types": ["node"] },
  "files": ["seed.mts"] }
EOF
node bindings/node/node_modules/typescript/bin/tsc -p "$ts"
cp "$ts/out/seed.mjs" "$root/root/app/seed.mjs"

cat > "$root/root/user.sh" <<EOF
set -euo pipefail
say() { echo "--> \$*"; }
for tool in cargo rustc cc gcc; do
  if command -v "\$tool" >/dev/null; then echo "error: \$tool is on the user's machine" >&2; exit 1; fi
done
test ! -e /root/.local/share/smol || { echo "error: the set-up's assets are on the user's machine" >&2; exit 1; }
say "accelerator: \$( [ -r /dev/kvm ] && [ -w /dev/kvm ] && echo '/dev/kvm present' || echo 'no /dev/kvm: TCG' )\${SMOL_ACCEL:+ (SMOL_ACCEL=\$SMOL_ACCEL)}"

say "python3 -m venv /root/venv; pip install $(basename "$wheel")"
python3 -m venv /root/venv
/root/venv/bin/pip install -q --no-index /root/dist/$(basename "$wheel")
test "\$(/root/venv/bin/python -c 'import smol; print(smol.__version__)')" = "$version"
say "the seed page's Python samples"
/root/venv/bin/python /root/seed.py

say "npm install ./$(basename "$npmtgz")"
cd /root/app
printf '{ "name": "app", "private": true, "type": "module" }\n' > package.json
npm install --no-audit --no-fund --offline /root/dist/$(basename "$npmtgz")
test "\$(node -p "require('smolmachines').version")" = "$version"
say "the seed page's TypeScript samples"
node seed.mjs

say "the CLI tarball"
mkdir -p /opt && tar -C /opt -xzf /root/dist/$(basename "$clitgz")
cd /opt/smol-$version-x86_64-linux
test "\$(./smol --version)" = "smol $version"
./smol doctor | tee /tmp/doctor.txt
grep -q '^assets: *packaged (/opt/smol-$version-x86_64-linux/assets), smol $version' /tmp/doctor.txt
./smol run -- uname -a | tee /tmp/uname.txt
grep -q '^Linux ' /tmp/uname.txt
./smolfleet --version
say "all packages work"
EOF

step "in the root: the wheel, the npm package, the CLI (no cargo, no compiler, no repo)"
t2=$(date +%s)
set +e
chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
  npm_config_update_notifier=false ${SMOL_ACCEL:+SMOL_ACCEL=$SMOL_ACCEL} \
  bash /root/user.sh 2>&1 | sed -u 's/^/    | /'
rc=${PIPESTATUS[0]}
set -e
t3=$(date +%s)
[ "$rc" = 0 ] || { step "FAILED ($rc) in the root after $((t3 - t2)) s"; exit "$rc"; }
step "passed: dist $((t1 - t0)) s, root $((t2 - t1)) s, packages in the root $((t3 - t2)) s ($((t3 - t0)) s in all)"
