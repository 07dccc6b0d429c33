#!/usr/bin/env bash
# The main job: build Fleet, start the local stack, and show that it is alive.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bash "$FLEET_REPO/deploy/local/setup.sh"
build_bins
bash "$FLEET_REPO/deploy/local/stack.sh" up
say "the local stack is up: broker 127.0.0.1:$FLEET_BROKER_PORT, redis 127.0.0.1:$FLEET_REDIS_PORT"
say "logs and pid files: $FLEET_HOME; stop it with: make down"
