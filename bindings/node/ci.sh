#!/usr/bin/env bash
# CI for the Node package `smolmachines` (make test-node). Installs it the way a user does
# (`npm install <checkout>/bindings/node` into a scratch project, which builds the addon), runs the
# README's TypeScript quick start there, then the declarations check (`tsc --noEmit` on the seed
# page's samples) and the `node --test` suites against the real local engine; one of them,
# test/seed.test.mjs, compiles the seed samples with tsc (test/seed/samples.mts, into the ignored
# test/seed/.build) and executes them.
# Needs: node >= 18 and npm (Debian: nodejs npm; `make setup` installs them), cargo,
# and the engine set up (make setup).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
step() { echo "==> $*" >&2; }

command -v npm >/dev/null && command -v node >/dev/null || {
  echo "error: node and npm are needed (scripts/programs.txt; \`make setup\` installs Debian's nodejs and npm)" >&2
  exit 1; }
node -e 'if (+process.versions.node.split(".")[0] < 18) { console.error("node >= 18 needed, found " + process.version); process.exit(1) }'
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

# --- install as a user does, into a scratch project (ignored: under target/) ----------------------
smoke="$root/target/node-smoke"
step "npm install $root/bindings/node (into $smoke; builds the addon)"
rm -rf "$smoke"
mkdir -p "$smoke"
# allowScripts: newer npm runs a dependency's install script only when the project allows it
printf '{ "name": "smol-node-smoke", "private": true, "type": "module", "allowScripts": { "smolmachines": true } }\n' \
  > "$smoke/package.json"
(cd "$smoke" && npm install --foreground-scripts "$root/bindings/node")
test -f "$here/smol.node" || { echo "error: npm install did not build smol.node" >&2; exit 1; }

step "README quick start (the TypeScript sample of the top-level README, as printed, as ESM)"
awk '/^```ts$/{f=1;next} /^```$/{f=0} f' "$root/README.md" > "$smoke/quickstart.mjs"
test -s "$smoke/quickstart.mjs" || { echo "error: no ts sample in README.md" >&2; exit 1; }
out=$(cd "$smoke" && node quickstart.mjs)
echo "$out"
grep -q '^Linux ' <<<"$out" || { echo "error: the quick start printed no uname line" >&2; exit 1; }
grep -qx 'hi' <<<"$out" && grep -q "kind: 'exit'" <<<"$out" || { echo "error: the quick start did not print the file and the exit event" >&2; exit 1; }
(cd "$smoke" && node -e "const s = require('smolmachines'); if (typeof s.Machine.create !== 'function' || !s.Machine.localAvailability().available) process.exit(1)")

# --- dev dependencies (typescript, @types/node) from the lockfile ---------------------------------
step "npm ci in bindings/node (dev dependencies)"
(cd "$here" && npm ci --foreground-scripts)

step "tsc --noEmit on the seed samples"
(cd "$here" && node_modules/.bin/tsc --noEmit -p test/types)

# the fleet server the cloud tests (test/cloud.test.mjs) start on loopback
step "cargo build --release -p smol-fleet (smolfleet, for the cloud tests)"
(cd "$root" && cargo build --release -p smol-fleet)
export SMOLFLEET=${SMOLFLEET:-${CARGO_TARGET_DIR:-$root/target}/release/smolfleet}

step "node --test (with the seed samples compiled by tsc and executed: test/seed.test.mjs)"
cd "$here"
node --test test/*.test.mjs
