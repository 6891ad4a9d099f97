#!/usr/bin/env bash
# cargo deny (deny.toml) in make lint: licenses, bans (duplicate versions: a skip list of those
# there are today, any new one is an error) and sources are checked for real, offline, from
# Cargo.lock and the registry's cached metadata. Advisories need the RustSec advisory database,
# a git repository on GitHub that this machine and CI cannot reach: they are checked only when
# a copy is already in $CARGO_HOME/advisory-dbs (cargo deny fetch where GitHub is reachable),
# else skipped with a line saying so (docs/FUZZING.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# cargo deny reads every crate of Cargo.lock, those of other platforms too (windows-sys, ...),
# which no build here downloads: on a fresh machine they are not in the registry's cache yet.
# Fetch them (crates.io); where that fails, check from what is cached.
if ! fetched=$(cargo fetch --locked 2>&1); then
  echo "cargo deny: cargo fetch --locked failed (is crates.io reachable?); checking offline from the cache:" >&2
  echo "$fetched" | tail -3 >&2
fi
cargo deny --offline check licenses bans sources
echo "cargo deny: $(grep -c '{ crate = ' deny.toml) older versions of crates are known duplicates (deny.toml's bans.skip, each with its reason); any other duplicate is an error" >&2
dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if compgen -G "$dbs/*/crates" >/dev/null; then
  cargo deny check --disable-fetch advisories
else
  echo "cargo deny: advisories NOT checked: no RustSec advisory database in $dbs (github.com/RustSec/advisory-db is not reachable from here; run \`cargo deny fetch\` where it is)" >&2
fi
