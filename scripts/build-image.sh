#!/usr/bin/env bash
# Build the chunkfs-csi image (one image for every role) from this checkout.
#
#   bash scripts/build-image.sh [TAG]        # default TAG: chunkfs-csi:dev
#
# Works wherever `docker` does and honours DOCKER_HOST. BuildKit is used (DOCKER_BUILDKIT=1).
# Environment:
#   DOCKER          the docker CLI to use (default: docker)
#   BASE_IMAGE      the base image (default: debian:bookworm-slim, as in the Dockerfile)
#   PIP_CA_BUNDLE   a CA bundle file that pip inside the build must trust (a
#                   TLS-intercepting proxy); passed as a BuildKit secret, never stored
#   BUILD_NETWORK   network of the build's RUN steps (e.g. host where no bridge exists)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="${1:-chunkfs-csi:dev}"
docker_cli="${DOCKER:-docker}"

args=(build --tag "$tag" --file "$root/Dockerfile")
args+=(--build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")")
args+=(--build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if rev="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null)"; then
  if [[ -n "$(git -C "$root" status --porcelain -- chunkfs csi pyproject.toml Dockerfile 2>/dev/null)" ]]; then
    rev="$rev-dirty"
  fi
  args+=(--build-arg "REVISION=$rev")
fi
[[ -n "${BASE_IMAGE:-}" ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[[ -n "${PIP_CA_BUNDLE:-}" ]] && args+=(--secret "id=pip-ca,src=$PIP_CA_BUNDLE")
[[ -n "${BUILD_NETWORK:-}" ]] && args+=(--network "$BUILD_NETWORK")

echo "build-image: $docker_cli ${args[*]} $root" >&2
DOCKER_BUILDKIT=1 "$docker_cli" "${args[@]}" "$root"
echo "build-image: built $tag" >&2
