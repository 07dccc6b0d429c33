#!/usr/bin/env bash
# Every check: formatting, lints, unit and integration tests against the real broker and Redis.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FLEET_REPO"

bash deploy/local/setup.sh
say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "building the binaries the integration tests start"
cargo build --workspace --bins --locked
say "running the doc tests"
cargo test --workspace --doc --locked --quiet
say "running the tests (unit + integration: real tansu and redis-server)"
cargo nextest run --workspace --locked --no-fail-fast
