#!/usr/bin/env bash
# The key of the set-up's inputs: what scripts/fresh-machine.sh proved, and what .ci/run compares
# with scripts/fresh-machine.passed to decide whether the fresh-machine check must run again.
set -euo pipefail
cd "$(dirname "$0")/.."
git ls-files -s -- scripts/setup.sh scripts/programs.txt scripts/fresh-machine.sh Makefile \
  .cargo/config.toml guest | sha256sum | cut -c1-16
