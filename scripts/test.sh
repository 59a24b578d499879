#!/usr/bin/env bash
# The one test command: installs what the tests use (idempotent), then checks format
# and lints, then runs every test against real processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
command -v rustfmt >/dev/null && cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --lib --bins --tests 2>&1
