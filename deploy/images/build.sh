#!/usr/bin/env bash
# Builds Fleet's container images on a Docker engine that cannot pull: each image is FROM
# scratch with the binaries built or installed on this machine, the shared libraries they load
# (found with ldd) and /etc/passwd with a non-root user.
#   fleet:local        fleet-scheduler, fleet-reaper, fleet-worker, fleetctl (release build)
#   fleet-redis:local  redis-server and redis-cli
#   fleet-tansu:local  the tansu broker
# deploy/Dockerfile builds the same fleet image where a registry is reachable. Compose and the
# Kubernetes manifests only name the images. Set FLEET_IMAGE_TAG to tag other than `local`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
cd "$FLEET_REPO"

TAG="${FLEET_IMAGE_TAG:-local}"
OUT="$FLEET_REPO/target/images"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
bash deploy/local/setup.sh
command -v strip >/dev/null || apt_install binutils

say "building the release binaries"
cargo build --release --locked --workspace --bins

# rootfs DIR: a fresh root with the users and a sticky /tmp.
rootfs() {
  rm -rf "$1" && mkdir -p "$1/etc" "$1/tmp" "$1/usr/local/bin"
  chmod 1777 "$1/tmp"
  cat >"$1/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
redis:x:999:999:redis:/data:/sbin/nologin
fleet:x:10001:10001:fleet:/nonexistent:/sbin/nologin
tansu:x:10002:10002:tansu:/nonexistent:/sbin/nologin
PASSWD
  cat >"$1/etc/group" <<'GROUP'
root:x:0:
redis:x:999:
fleet:x:10001:
tansu:x:10002:
GROUP
}

# add_binary ROOT FILE: FILE (stripped) into /usr/local/bin and its libraries at their paths.
add_binary() {
  local root="$1" file="$2" dest
  dest="$root/usr/local/bin/$(basename "$file")"
  cp "$file" "$dest"
  strip --strip-debug "$dest" 2>/dev/null || true
  ldd "$file" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    [ -e "$root$lib" ] || cp -L --parents "$lib" "$root"
  done
}

# image NAME DOCKERFILE ROOT: builds NAME:TAG from ROOT's parent as the context.
image() {
  cp "$2" "$(dirname "$3")/Dockerfile"
  # The legacy builder (no buildx here) warns about itself on every build: keep the log quiet.
  docker build -q -t "$1:$TAG" "$(dirname "$3")" >/dev/null 2>"$OUT/build.log" || {
    cat "$OUT/build.log" >&2
    die "docker build of $1:$TAG failed"
  }
  say "built $1:$TAG ($(docker image inspect -f '{{.Size}}' "$1:$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
}

root="$OUT/fleet/rootfs"
rootfs "$root"
for bin in fleet-scheduler fleet-reaper fleet-worker fleetctl; do
  add_binary "$root" "target/release/$bin"
done
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp -L --parents /etc/ssl/certs/ca-certificates.crt "$root"
image fleet deploy/images/fleet.Dockerfile "$root"

root="$OUT/redis/rootfs"
rootfs "$root"
add_binary "$root" "$(readlink -f "$(command -v redis-server)")"
mv "$root/usr/local/bin/$(basename "$(readlink -f "$(command -v redis-server)")")" "$root/usr/local/bin/redis-server"
add_binary "$root" "$(readlink -f "$(command -v redis-cli)")"
[ -f "$root/usr/local/bin/redis-cli" ] || mv "$root/usr/local/bin/$(basename "$(readlink -f "$(command -v redis-cli)")")" "$root/usr/local/bin/redis-cli"
rm -rf "$OUT/redis/data" && mkdir -p "$OUT/redis/data"
image fleet-redis deploy/images/redis.Dockerfile "$root"

root="$OUT/tansu/rootfs"
rootfs "$root"
add_binary "$root" "$TANSU_BIN"
image fleet-tansu deploy/images/tansu.Dockerfile "$root"
