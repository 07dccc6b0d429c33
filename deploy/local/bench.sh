#!/usr/bin/env bash
# The benchmark: builds Fleet in release mode and runs `fleet-bench`, which starts its own
# broker, Redis and Fleet services on free loopback ports, prints a table and writes
# target/bench/latest.json. Arguments go to fleet-bench (`--help` lists them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FLEET_REPO"

bash deploy/local/setup.sh
say "building the release binaries"
cargo build --release --locked --workspace --bins
say "running the benchmark (a few minutes)"
FLEET_BIN_DIR="$FLEET_REPO/target/release" target/release/fleet-bench "$@"
