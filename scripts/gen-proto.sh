#!/usr/bin/env bash
# Generate the Python gRPC stubs of the CSI spec from proto/csi.proto.
#
#   scripts/gen-proto.sh [OUTDIR]      (default: csi/v1)
#
# Writes csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py. The output depends only on
# proto/csi.proto and the grpcio-tools version, so regenerating with the same
# grpcio-tools changes nothing (tests/csi/test_stubs_uptodate.py checks that).
# protoc writes `import csi_pb2` into the grpc module; it is rewritten to a relative
# import so that the stubs work as the package `csi.v1`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/csi/v1}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Run from proto/ so that the descriptor's file name is exactly "csi.proto".
(cd "$root/proto" && "$python" -m grpc_tools.protoc -I. \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" csi.proto)

sed -i 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' "$tmp/csi_pb2_grpc.py"
grep -q '^from \. import csi_pb2 as csi__pb2$' "$tmp/csi_pb2_grpc.py" \
  || { echo "gen-proto: could not rewrite the csi_pb2 import in csi_pb2_grpc.py" >&2; exit 1; }

mkdir -p "$out"
for f in csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py; do
  install -m 0644 "$tmp/$f" "$out/$f"
done
echo "gen-proto: wrote $out/{csi_pb2.py,csi_pb2.pyi,csi_pb2_grpc.py}" >&2
