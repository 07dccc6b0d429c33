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
say "cargo doc -D warnings (broken or private doc links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
say "building the binaries the integration tests start"
cargo build --workspace --bins --locked
say "running the doc tests"
cargo test --workspace --doc --locked --quiet
if docker_answers; then
  command -v docker-compose >/dev/null || apt_install docker-compose
  say "a Docker engine answers: building the images for the container tests"
  bash deploy/images/build.sh
  filter=()
else
  say "NO Docker engine answers (docker info failed): the container tests" \
    "(integration-tests/tests/it/containers.rs) are NOT run"
  filter=(-E 'not test(/^containers::/)')
fi
say "running the tests (unit + integration: real tansu and redis-server; containers)"
cargo nextest run --workspace --locked --no-fail-fast "${filter[@]}"
