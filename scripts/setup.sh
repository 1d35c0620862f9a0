#!/usr/bin/env bash
# Idempotent setup on Debian 12 (as root): system packages, .venv, `pip install -e '.[dev]'`.
#
#   bash scripts/setup.sh          # as root (or: sudo bash scripts/setup.sh)
#
# apt runs only when a package is missing, pip only when pyproject.toml changed since the
# last successful install (or the install is broken). Starts no service: the tests and
# scripts/local-stack.sh start their own Redis and SeaweedFS on free loopback ports (a
# system redis-server that the Debian package may start on :6379 is not used).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { echo "setup: $*" >&2; }

# fuse3/libfuse3-dev/pkg-config/gcc/python3-dev: build and run pyfuse3; redis-server: the
# metadata engine (also run as sentinels and cluster nodes by the tests); openssl: the
# tests' throwaway TLS CA; fio: benchmarks; iproute2: network namespaces (multinode tests);
# attr: xattr tools; util-linux: mountpoint, unshare; docker.io + debootstrap: the container
# tests (tests/container) start their own dockerd and make the base image from Debian;
# git + tar: the benchmark's application workloads (bench/apps.py) and their smoke tests.
packages=(
  ca-certificates gcc pkg-config python3 python3-dev python3-venv
  fuse3 libfuse3-dev redis-server openssl fio iproute2 attr util-linux procps
  docker.io debootstrap git tar
)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  if [[ $EUID -ne 0 ]]; then
    say "missing packages: ${missing[*]}; run as root (bash scripts/setup.sh in a root shell, or sudo bash scripts/setup.sh)"
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -e /dev/fuse ]]; then
  modprobe fuse 2>/dev/null || true
  [[ -e /dev/fuse ]] || say "warning: /dev/fuse is missing; FUSE mounts will not work here"
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi

stamp=.venv/.chunkfs-setup
want="$(cat pyproject.toml <(.venv/bin/python -VV) | sha256sum | cut -d' ' -f1)"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] \
  && .venv/bin/python -m pip show -q chunkfs-csi >/dev/null 2>&1 \
  && (cd / && "$root/.venv/bin/python" -c "import pyfuse3, pytest_timeout, chunkfs") 2>/dev/null; then
  say "python environment up to date"
else
  say "pip install -e '.[dev]'"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" >"$stamp"
fi

for tool in weed redis-server; do
  if ! PATH="$root/.venv/bin:$PATH" command -v "$tool" >/dev/null; then
    say "error: $tool not found after setup"
    exit 1
  fi
done
say "ok ($root/.venv)"
