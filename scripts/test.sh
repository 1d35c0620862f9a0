#!/usr/bin/env bash
# Set everything up, then run the whole suite: lint, then every test.
#
#   bash scripts/test.sh                 # what CI runs (.ci/run)
#   bash scripts/test.sh tests/unit -x   # extra arguments go to pytest
#
# The tests start their own Redis and SeaweedFS on free loopback ports and stop them at
# the end; FUSE, network-namespace and permission tests need root.
set -euo pipefail

# Root is needed (FUSE mounts, apt, network namespaces). In a root shell (a fresh Debian
# has no sudo) this runs as is; from a user with sudo it re-runs itself through sudo.
if [[ $EUID -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E bash "${BASH_SOURCE[0]}" "$@"
  fi
  echo "$(basename "${BASH_SOURCE[0]}"): run as root (no sudo here)" >&2
  exit 1
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh

export PATH="$root/.venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1

echo "test: ruff check ." >&2
ruff check .

echo "test: pytest" >&2
# Exit status 5 (no tests collected) is a failure too: the suite always has tests.
exec python -m pytest -p no:cacheprovider "$@"
