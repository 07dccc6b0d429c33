#!/usr/bin/env bash
# The main job: build Fleet, start the local stack (tansu + redis-server), run a scheduler, a
# reaper and 3 workers, submit a mixed workload with live progress, print a summary read from
# Redis, then drain the Fleet services. The broker and Redis keep running for inspection
# (`redis-cli -p 16379`); `make down` stops them.
#   DEMO_TASKS (5000)  DEMO_WORKERS (3)  FLEET_HTTP_PORT (8080: API, dashboard, metrics)
#   DEMO_KEEP=1 keeps the services running after the summary (Ctrl-C drains them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tasks="${DEMO_TASKS:-5000}"
workers="${DEMO_WORKERS:-3}"

bash "$FLEET_REPO/deploy/local/setup.sh"
build_bins
bash "$FLEET_REPO/deploy/local/stack.sh" up

export FLEET__KAFKA__BROKERS="127.0.0.1:$FLEET_BROKER_PORT"
export FLEET__REDIS__URL="redis://127.0.0.1:$FLEET_REDIS_PORT"
# Local timings: quick recovery and group joins, so the demo reacts fast.
export FLEET__KAFKA__SESSION_TIMEOUT_MS=6000 FLEET__KAFKA__HEARTBEAT_INTERVAL_MS=1000
export FLEET__LEASE__LEASE_MS=6000 FLEET__LEASE__HEARTBEAT_MS=2000 FLEET__LEASE__REAPER_INTERVAL_MS=1000
export FLEET__TASKS__RETRY_BASE_MS=200 FLEET__TASKS__RETRY_CAP_MS=2000
export FLEET__LOG__FORMAT=json RUST_LOG="${RUST_LOG:-warn}"
http_port="${FLEET_HTTP_PORT:-8080}"

pids=()
start() { # start NAME BINARY [VAR=VALUE...]
  local name="$1" bin="$2"; shift 2
  env "$@" "$(fleet_bin "$bin")" >"$FLEET_HOME/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$FLEET_HOME/$name.pid"
}
stop_services() {
  [ ${#pids[@]} -eq 0 ] && return
  say "draining the Fleet services (SIGTERM)"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -f "$FLEET_HOME"/scheduler.pid "$FLEET_HOME"/reaper.pid "$FLEET_HOME"/worker-*.pid
  pids=()
}
trap stop_services EXIT

say "starting fleet-scheduler, fleet-reaper and $workers fleet-worker replicas (logs in $FLEET_HOME)"
# Local development only: the API takes requests without a token.
start scheduler fleet-scheduler "FLEET__HTTP__LISTEN=127.0.0.1:$http_port" FLEET__HTTP__INSECURE_NO_AUTH=true
start reaper fleet-reaper "FLEET__HTTP__LISTEN=127.0.0.1:$((http_port + 1))"
for i in $(seq 1 "$workers"); do
  start "worker-$i" fleet-worker "FLEET__WORKER__ID=demo-worker-$i" "FLEET__HTTP__LISTEN=127.0.0.1:$((http_port + 1 + i))"
done
say "dashboard: http://127.0.0.1:$http_port/  API: http://127.0.0.1:$http_port/v1/stats  metrics: /metrics on ports $http_port-$((http_port + 1 + workers))"

"$(fleet_bin fleetctl)" demo --tasks "$tasks"
if [ "${DEMO_KEEP:-0}" = 1 ]; then
  say "services keep running (DEMO_KEEP=1); Ctrl-C drains them"
  wait "${pids[@]}" || true
fi
stop_services
trap - EXIT
say "done. Inspect a task: $(fleet_bin fleetctl) status <id>; counts: fleetctl stats; stop the stack: make down"
