#!/usr/bin/env bash
# Instructions per request of one fedport binary under callgrind: one worker, an nginx
# h2c upstream, N keepalive GETs over mTLS (h2load -c 4 -m 16) after 2,000 to warm up.
# Deterministic where wall-clock ratios are not: compare two binaries' totals ÷ N.
#
#   bench/callgrind.sh BINARY OUT [N]     (OUT.1 is the profile; callgrind_annotate reads it)
#
# Needs valgrind. Not a test.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
BIN=$(realpath "$1") OUT=$(realpath -m "$2") N=${3:-20000}
command -v valgrind >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
work=$(mktemp -d /tmp/fedport-cg.XXXXXX)
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill ${pa:-} 2>/dev/null; wait 2>/dev/null || true' EXIT
bash "$peers" install
. "$here/bench/lib.sh"
cd "$work"; bench_certs
up=$(port) fa=$(port)
bash "$peers" upstream "$work" "$up"
{ node_toml "bench-a" "$fa" 'workers = 1'
  printf 'service = "up"\n[[service]]\nname = "up"\nprotocol = "http"\nendpoints = ["h2c://127.0.0.1:%s"]\n[[allow]]\nfrom = "spiffe://bench/client"\nto = "up"\n' "$up"
} > a.toml
FEDPORT_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN" run -c a.toml --ready-file a.ready 2>a.log & pa=$!
for _ in $(seq 600); do [ -s a.ready ] && break; sleep 0.1; done
sleep 1
bash "$peers" h2load "$work/client.pem" "$work/client.key" -n 2000 -c 4 -m 16 "https://127.0.0.1:$fa/" >/dev/null 2>&1
callgrind_control -z >/dev/null 2>&1 || true
bash "$peers" h2load "$work/client.pem" "$work/client.key" -n "$N" -c 4 -m 16 "https://127.0.0.1:$fa/" | grep -E "requests:"
callgrind_control -d >/dev/null 2>&1 || true
sleep 1
kill -INT $pa; wait $pa 2>/dev/null || true
total=$(callgrind_annotate "$OUT.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions per request: $((total / N))"
