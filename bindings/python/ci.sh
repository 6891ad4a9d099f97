#!/usr/bin/env bash
# CI for the Python SDK: builds and installs the module the way users do (pip install of this
# directory; pip fetches maturin and maturin builds the Rust extension), then runs the pytest
# suite against the real local engine (QEMU microVMs). Needs `make setup` (scripts/setup.sh)
# first: QEMU, the guest kernel and initramfs, python3 with venv.
#
#   bindings/python/ci.sh [pytest args...]
#
# The virtual environment lives in target/py-venv (ignored by git; PY_VENV overrides).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=${PY_VENV:-$root/target/py-venv}
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  echo "==> creating $venv ($("$python" --version))" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
echo "==> pip install ./bindings/python pytest" >&2
"$venv/bin/pip" install -q ./bindings/python pytest
"$venv/bin/python" -c 'import smol; print("smol", smol.__version__, "local_availability:", smol.local_availability())'
# the fleet server the cloud tests (tests/test_cloud.py) start on loopback
echo "==> cargo build --release -p smol-fleet (smolfleet, for the cloud tests)" >&2
cargo build --release -p smol-fleet
export SMOLFLEET=${SMOLFLEET:-${CARGO_TARGET_DIR:-$root/target}/release/smolfleet}
echo "==> pytest bindings/python/tests" >&2
exec "$venv/bin/python" -m pytest bindings/python/tests -q -rfE --durations=8 "$@"
