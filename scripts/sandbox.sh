#!/usr/bin/env bash
# The README's first command: installs what building fedport needs (the etcd-client
# crate compiles etcd's protos: protoc and protobuf's well-known types), idempotently,
# then runs the sandbox federation on loopback. Arguments go to `fedport sandbox`.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "sandbox: apt-get install ${need[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
exec cargo run --release -- sandbox "$@"
