#!/usr/bin/env bash
# A complete local chunkfs: Redis + SeaweedFS (S3) on loopback ports, a volume, a mount.
#
#   bash scripts/local-stack.sh up     # setup, start services, create + mount "demo"
#   bash scripts/local-stack.sh env    # print the export lines (source them)
#   bash scripts/local-stack.sh down   # unmount, stop the services (data is kept)
#
# Everything lives under ./.local/: services' data and state.json, env (the exports,
# mode 0600), cache/ (block cache), mnt/demo (the mount). `up` is idempotent; `down`
# then `up` brings back the same data, credentials and, when free, the same ports.
# Delete ./.local after `down` to start from scratch.
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

local_dir="$root/.local"
volume="${CHUNKFS_DEMO_VOLUME:-demo}"
capacity="${CHUNKFS_DEMO_CAPACITY:-10GiB}"
mnt="$local_dir/mnt/$volume"
cache="$local_dir/cache"
py="$root/.venv/bin/python"
chunkfs="$root/.venv/bin/chunkfs"

say() { echo "local-stack: $*" >&2; }
usage() { echo "usage: $0 up|down|env" >&2; exit 2; }

# Is anything (possibly a dead FUSE mount) mounted at $1?
mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
# A live chunkfs mount: its root inode is 1.
mount_ready() { [[ "$(stat -c %i "$1" 2>/dev/null)" == 1 ]]; }

need_venv() {
  if [[ ! -x $py ]]; then
    bash scripts/setup.sh
  fi
}

cmd_up() {
  bash scripts/setup.sh
  local exports
  exports="$("$py" -m devstack.localstack up --dir "$local_dir")"
  eval "$exports"

  if ! "$py" -c "import chunkfs.cli" 2>/dev/null; then
    say "services are up, but the chunkfs CLI (chunkfs/cli.py) is not available yet"
    exit 1
  fi

  if [[ ${CHUNKFS_SKIP_CSI_WALKTHROUGH:-} != 1 ]]; then
    say "driving the CSI plugins: a controller and two node plugins (python -m devstack.walkthrough)"
    "$py" -m devstack.walkthrough --dir "$local_dir/csi"
  fi

  local out
  if out="$("$chunkfs" volume create "$volume" --capacity "$capacity" 2>&1)"; then
    say "$out"
  elif grep -q "already exists" <<<"$out"; then
    say "volume $volume already exists"
  else
    say "creating volume $volume failed: $out"
    exit 1
  fi

  if mounted "$mnt" && ! mount_ready "$mnt"; then
    say "clearing a stale mount at $mnt (its process is gone)"
    umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
  fi
  if mounted "$mnt"; then
    say "$volume is already mounted at $mnt"
  else
    mkdir -p "$mnt" "$cache"
    "$chunkfs" mount "$volume" "$mnt" --cache-dir "$cache"
    say "mounted $volume at $mnt"
  fi

  cat >&2 <<EOF

chunkfs is running:
  volume "$volume" is mounted at $mnt (block cache: $cache)

Next:
  source $local_dir/env                           # CHUNKFS_META, CHUNKFS_STORAGE, AWS_*
  echo hello > $mnt/hello && cat $mnt/hello
  $chunkfs status $mnt
  $chunkfs volume list
  $chunkfs snapshot create $volume snap1
  bash scripts/local-stack.sh down                # unmount and stop (data is kept)
EOF
}

cmd_down() {
  need_venv
  if mounted "$mnt"; then
    if [[ -x $chunkfs ]] && "$chunkfs" umount "$mnt"; then
      say "unmounted $mnt"
    else
      say "chunkfs umount failed; detaching $mnt"
      umount -l "$mnt" 2>/dev/null || fusermount3 -uz "$mnt" 2>/dev/null || true
    fi
  fi
  "$py" -m devstack.localstack down --dir "$local_dir"
}

cmd_env() {
  need_venv
  "$py" -m devstack.localstack env --dir "$local_dir"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  *) usage ;;
esac
