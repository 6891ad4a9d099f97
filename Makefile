# The two commands of the README:
#   make run    set up (packages, workspace, guest kernel, agent, initramfs), then boot a microVM
#               and run `uname -a` in it
#   make test   the same set-up, then every check and test (unit, VM, CLI, Python and Node SDK
#               tests); .ci/run calls this
SHELL := /bin/bash
SMOL := target/release/smol

.PHONY: setup run test lint unit fuzz soak test-tools bench clean-cache test-python test-node test-readme test-fleet-schema test-fleet-postgres dist test-dist dist-repro

setup:
	@scripts/setup.sh

run: setup
	$(SMOL) doctor
	$(SMOL) run -- uname -a

# cargo-fuzz and cargo-deny (cargo install, cached in ~/.cargo/bin); only lint and fuzz need them
test-tools:
	@scripts/setup.sh --test-tools

lint: test-tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/deny.sh

# Every fuzz target of fuzz/ for 15 s from its checked-in corpus (docs/FUZZING.md)
fuzz: test-tools
	scripts/fuzz.sh

unit:
	cargo test --workspace --release

# Not in `make test`: 8 machines x 200 concurrent execs and file transfers for SOAK_SECONDS
# (default 180), then 0 failures and nothing leaked (processes, fds, sockets, cgroups, files);
# prints what it held (scripts/soak.sh, docs/RELIABILITY.md)
soak: setup
	scripts/soak.sh

test: setup lint unit fuzz test-python test-node test-readme test-fleet-schema test-fleet-postgres

# Fleet VM tests over PostgreSQL instead of SQLite: each test binary starts its own cluster
# (initdb + pg_ctl of Debian's postgresql, temporary directory, own port; docs/FLEET.md)
test-fleet-postgres: setup
	SMOL_FLEET_TEST_STORE=postgres SMOL_VM_TESTS=required cargo test --release -p smol-fleet \
	  --test machines --test restart --test checkpoint --test sweeper

# Schemathesis against a running `smolfleet serve` (fresh home, loopback): no 5xx, status codes
# and response bodies as openapi.json says; bounded (scripts/schemathesis.sh says how)
test-fleet-schema: setup
	scripts/schemathesis.sh

# The CLI quick start of README.md, every `$ smol ...` line as printed
test-readme: setup
	scripts/readme-cli.sh

# The Python SDK (bindings/python): pip install of the binding into target/py-venv, then pytest
# against real microVMs.
test-python: setup
	bindings/python/ci.sh

bench: setup
	cargo bench -p smolmachines --bench engine
	cargo bench -p smolmachines --bench image
	cargo bench -p smol-fleet --bench fleet

clean-cache:
	rm -rf "$${SMOL_CACHE:-$$HOME/.cache/smol}"

# The Node package (bindings/node): npm install as a user does, tsc on the seed samples, node --test
test-node: setup
	bindings/node/ci.sh

# The packages users install, in dist/ (docs/PACKAGES.md): the Python wheel, the npm tarball and
# the CLI tarball, each with the guest kernel and initramfs the set-up built
dist: setup
	scripts/dist.sh

# The packages installed and used on a debootstrap'ed Debian 12 that has only python3, nodejs,
# npm and QEMU (no cargo, no compiler, no repo): the seed samples, `smol run -- uname -a`
test-dist: setup
	scripts/test-dist.sh

# dist twice, then the same file list and asset checksums in each package
dist-repro: setup
	scripts/dist-repro.sh
