#!/usr/bin/env bash
# The benchmark: builds Fleet in release mode and runs `fleet-bench`, which starts its own
# broker, Redis and Fleet services on free loopback ports, prints a table and writes
# target/bench/latest.json. Arguments go to fleet-bench (`--help` lists them). It also builds
# tansu 0.6.0 from crates.io once, for the latency run on a second broker build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FLEET_REPO"

bash deploy/local/setup.sh
if [ ! -x "$TANSU_RELEASE_BIN" ]; then
  say "building tansu 0.6.0 from crates.io into $(dirname "$(dirname "$TANSU_RELEASE_BIN")") (10 to 15 minutes, once)"
  cargo install tansu --version 0.6.0 --locked --features dynostore --root "$(dirname "$(dirname "$TANSU_RELEASE_BIN")")"
fi
say "building the release binaries"
cargo build --release --locked --workspace --bins
say "running the benchmark (a few minutes)"
FLEET_BIN_DIR="$FLEET_REPO/target/release" target/release/fleet-bench --second-broker "$TANSU_RELEASE_BIN" "$@"
