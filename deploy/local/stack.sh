#!/usr/bin/env bash
# Starts, stops or shows the local dependencies of Fleet: a tansu Kafka-API broker and a
# redis-server on loopback, with pid files and logs under $FLEET_HOME (default .fleet/).
#   stack.sh up      install what is missing, start both, create the topics, wait until healthy
#   stack.sh down    stop only the processes this script started
#   stack.sh status  show what runs
# Running `up` twice is harmless: what already runs is left alone.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

redis_pid="$FLEET_HOME/redis.pid"
broker_pid="$FLEET_HOME/broker.pid"

start_redis() {
  if pid_alive "$redis_pid"; then say "redis-server already running (pid $(cat "$redis_pid"))"; return; fi
  port_open "$FLEET_REDIS_PORT" && die "port $FLEET_REDIS_PORT is taken by another process; set FLEET_REDIS_PORT"
  mkdir -p "$FLEET_HOME/redis-data"
  say "starting redis-server on 127.0.0.1:$FLEET_REDIS_PORT (AOF on, noeviction)"
  redis-server "$FLEET_REPO/deploy/redis/fleet.conf" --port "$FLEET_REDIS_PORT" --bind 127.0.0.1 \
    --dir "$FLEET_HOME/redis-data" >"$FLEET_HOME/redis.log" 2>&1 &
  echo $! >"$redis_pid"
  wait_port "$FLEET_REDIS_PORT" redis-server "$FLEET_HOME/redis.log"
}

start_broker() {
  if pid_alive "$broker_pid"; then say "tansu already running (pid $(cat "$broker_pid"))"; return; fi
  port_open "$FLEET_BROKER_PORT" && die "port $FLEET_BROKER_PORT is taken by another process; set FLEET_BROKER_PORT"
  local url="tcp://127.0.0.1:$FLEET_BROKER_PORT"
  say "starting tansu broker on 127.0.0.1:$FLEET_BROKER_PORT (memory storage)"
  "$TANSU_BIN" broker --listener-url "$url" --advertised-listener-url "$url" \
    --storage-engine memory://tansu/ >"$FLEET_HOME/broker.log" 2>&1 &
  echo $! >"$broker_pid"
  wait_port "$FLEET_BROKER_PORT" tansu "$FLEET_HOME/broker.log"
}

case "${1:-up}" in
  up)
    bash "$FLEET_REPO/deploy/local/setup.sh"
    mkdir -p "$FLEET_HOME"
    start_redis
    start_broker
    export FLEET__KAFKA__BROKERS="127.0.0.1:$FLEET_BROKER_PORT"
    export FLEET__REDIS__URL="redis://127.0.0.1:$FLEET_REDIS_PORT"
    say "creating topics ($FLEET_PARTITIONS partitions each)"
    "$(fleet_bin fleetctl)" topics create --partitions "$FLEET_PARTITIONS"
    "$(fleet_bin fleetctl)" ping --wait 10
    ;;
  down)
    stop_pid "$broker_pid" tansu
    stop_pid "$redis_pid" redis-server
    ;;
  status)
    for p in "$redis_pid:redis-server" "$broker_pid:tansu"; do
      if pid_alive "${p%%:*}"; then echo "${p#*:}: running (pid $(cat "${p%%:*}"))"; else echo "${p#*:}: stopped"; fi
    done
    ;;
  *) die "usage: stack.sh up|down|status" ;;
esac
