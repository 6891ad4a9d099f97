#!/usr/bin/env bash
# Schemathesis (property-based tests generated from the OpenAPI document) against a real
# `smolfleet serve`: a fresh temporary home, a loopback port, the bootstrap admin key it prints.
# Checks: no 5xx (not_a_server_error), status codes and response bodies as the document says
# (status_code_conformance, response_schema_conformance). Bounded: SCHEMATHESIS_EXAMPLES cases
# per operation (default 25), a fixed seed (SCHEMATHESIS_SEED, default 1), and the whole run
# killed after SCHEMATHESIS_TIMEOUT seconds (default 600).
# SMOLFLEET=path tests that binary instead of building target/release/smolfleet.
#
# Three runs against one server:
# 1. every operation but createMachine, no machine existing: validation, auth, scopes, 404s;
# 2. createMachine (POST /v1/machines) with schema-violating bodies only (negative mode): a
#    valid body makes the server pull an arbitrary image reference (registries on the internet)
#    and boot a microVM per case;
# 3. one real machine (the busybox fixture of scripts/test-registry.sh on 127.0.0.1) as the
#    `id` of getMachine, exec, execStream, readFile, writeFile (SCHEMATHESIS_VM=0 skips it).
#    start / stop / delete are left to runs 1 and the VM tests: each case would power the
#    machine off or on (seconds under TCG) or end it for the cases after it.
# Any machine a case still made is deleted at the end.
#
# Usage: scripts/schemathesis.sh   (make test-fleet-schema; the venv is target/schemathesis)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

VERSION=4.32.5
venv=target/schemathesis/venv
examples=${SCHEMATHESIS_EXAMPLES:-25}
seed=${SCHEMATHESIS_SEED:-1}
budget=${SCHEMATHESIS_TIMEOUT:-600}
say() { echo "==> schemathesis: $*" >&2; }
die() { echo "schemathesis.sh: $*" >&2; exit 1; }

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $VERSION"; then
    say "installing schemathesis $VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv; scripts/setup.sh installs it)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$VERSION" \
        || die "pip install schemathesis==$VERSION failed"
fi

# SMOLFLEET=path runs that binary instead of building target/release/smolfleet
smolfleet=${SMOLFLEET:-}
if [ -z "$smolfleet" ]; then
    cargo build --release --quiet -p smol-fleet --bin smolfleet
    smolfleet=$root/target/release/smolfleet
fi
home=$(mktemp -d /tmp/sfs.XXXXXX)
out="$home/serve.out"
server=""
base=""
key=""
cleanup() {
    local rc=$?
    if [ -n "$base" ] && [ -n "$key" ]; then
        # machines a case made (none expected): deleted through the API
        BASE=$base KEY=$key python3 - <<'PY' || echo "schemathesis.sh: cleaning up machines failed" >&2
import json, os, sys, urllib.request
base, key = os.environ["BASE"], os.environ["KEY"]
def call(method, path):
    req = urllib.request.Request(base + path, method=method, headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()
for m in json.loads(call("GET", "/v1/machines")):
    print(f"schemathesis.sh: deleting machine {m['id']} that a case created", file=sys.stderr)
    call("DELETE", "/v1/machines/" + m["id"])
PY
    fi
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill -INT "$server" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server" 2>/dev/null && echo "schemathesis.sh: the server ignored SIGINT; killed" >&2
        wait "$server" 2>/dev/null || true
    fi
    if [ "$rc" != 0 ] && [ -f "$home/serve.log" ]; then
        echo "--- the server's log (last 40 lines) ---" >&2
        tail -n 40 "$home/serve.log" >&2
    fi
    cd "$root"
    rm -rf "$home"
    if [ -n "${regdir:-}" ]; then
        bash "$root/scripts/test-registry.sh" stop "$regdir" || echo "schemathesis.sh: stopping the registry failed" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT

SMOL_LOG=${SMOL_LOG:-info} "$smolfleet" serve --home "$home/fleet" --listen 127.0.0.1:0 \
    >"$out" 2>"$home/serve.log" &
server=$!
for _ in $(seq 300); do
    grep -q '^listening on ' "$out" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || die "smolfleet serve exited: $(cat "$home/serve.log")"
    sleep 0.1
done
base=$(sed -n 's/^listening on //p' "$out")
key=$(sed -n 's/^bootstrap admin key (shown once, store it now): //p' "$out")
[ -n "$base" ] || die "smolfleet serve did not say where it listens within 30 s"
[ -n "$key" ] || die "smolfleet serve printed no bootstrap admin key: $(cat "$out")"
say "server at $base; $examples cases per operation, seed $seed, at most $budget s"

common=(
    -H "Authorization: Bearer $key"
    --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,response_schema_conformance}"
    --max-examples "$examples"
    --seed "$seed"
    --request-timeout 60
    --workers 2
    --suppress-health-check too_slow,filter_too_much
    --no-color
    --generation-database none
)
# run from the server's temporary home: schemathesis keeps a cache (.schemathesis/) in its
# working directory and looks for a schemathesis.toml there and above
sm="$PWD/$venv/bin/schemathesis"
cd "$home"
start=$SECONDS
timeout --kill-after 10 "$budget" "$sm" run "$base/openapi.json" "${common[@]}" \
    --phases examples,coverage,fuzzing \
    --exclude-operation-id createMachine
left=$((budget - (SECONDS - start)))
[ "$left" -gt 10 ] || die "no time left for createMachine (SCHEMATHESIS_TIMEOUT=$budget)"
timeout --kill-after 10 "$left" "$sm" run "$base/openapi.json" "${common[@]}" \
    --phases examples,fuzzing --mode negative \
    --include-operation-id createMachine

if [ "${SCHEMATHESIS_VM:-1}" = 0 ]; then
    say "passed (SCHEMATHESIS_VM=0: no run against a real machine)"
    exit 0
fi
reg=$(bash "$root/scripts/test-registry.sh" start --watch $$) || die "scripts/test-registry.sh start failed"
regdir=$(sed -n 's/^DIR=//p' <<<"$reg")
regport=$(sed -n 's/^PORT=//p' <<<"$reg")
[ -n "$regport" ] || die "no PORT= from scripts/test-registry.sh: $reg"
id=$(BASE=$base KEY=$key IMAGE="127.0.0.1:$regport/test/busybox:latest" python3 - <<'PY'
import json, os, urllib.request
body = json.dumps({"source": {"type": "image", "reference": os.environ["IMAGE"]}}).encode()
req = urllib.request.Request(os.environ["BASE"] + "/v1/machines", data=body, method="POST",
    headers={"Authorization": "Bearer " + os.environ["KEY"], "Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    print(json.load(r)["id"])
PY
) || die "creating the machine for run 3 failed"
say "run 3 against machine $id"
printf '[parameters]\n"path.id" = "%s"\n' "$id" >"$home/machine.toml"
left=$((budget - (SECONDS - start)))
[ "$left" -gt 10 ] || die "no time left for the run against a machine (SCHEMATHESIS_TIMEOUT=$budget)"
timeout --kill-after 10 "$left" "$sm" --config-file "$home/machine.toml" run "$base/openapi.json" \
    "${common[@]}" --phases examples,coverage,fuzzing \
    --include-operation-id getMachine --include-operation-id exec \
    --include-operation-id execStream --include-operation-id readFile \
    --include-operation-id writeFile \
    --report har --report-har-path "$home/machine.har"
# what the cases reached: status codes per operation (a run of only 404s / 422s tests little)
python3 - "$home/machine.har" <<'PY' || echo "schemathesis.sh: cannot read the HAR report" >&2
import collections, json, re, sys
seen = collections.defaultdict(collections.Counter)
for e in json.load(open(sys.argv[1]))["log"]["entries"]:
    path = re.sub(r"/v1/machines/[^/]+", "/v1/machines/{id}", e["request"]["url"].split("?")[0])
    path = re.sub(r"/files/.*", "/files/{path}", re.sub(r"^https?://[^/]+", "", path))
    seen[f'{e["request"]["method"]} {path}'][e["response"]["status"]] += 1
for op, st in sorted(seen.items()):
    print(f"  {op:<45} " + ", ".join(f"{k}: {v}" for k, v in sorted(st.items())), file=sys.stderr)
PY
say "passed"
