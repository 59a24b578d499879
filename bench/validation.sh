#!/usr/bin/env bash
# What message validation costs: one fedport, four services on the same upstream —
# gRPC with and without a proto schema, JSON with and without a JSON Schema — driven
# by the same h2load flags (mTLS, POST of a ~1 KiB order) in interleaved rounds.
# Prints the median req/s, p50, p99 and fedport CPU µs per request of each, and the
# ratio validated / not validated.
#
#   bench/validation.sh [SECONDS] [CONNECTIONS] [STREAMS_PER_CONNECTION] [ROUNDS]
#
# Not a test: numbers depend on the machine. Everything binds 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
secs=${1:-5} conns=${2:-16} streams=${3:-16} rounds=${4:-3}
work=$(mktemp -d /tmp/fedport-bench.XXXXXX)
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill ${fp_pid:-} 2>/dev/null; wait 2>/dev/null || true' EXIT

bash "$peers" install
(cd "$here" && cargo build --release --quiet)
. "$here/bench/lib.sh"
cd "$work"
bench_certs
python3 "$here/bench/validation/bodies.py" "$work"
up=$(port) fp=$(port)
bash "$peers" upstream "$work" "$up"
v=$here/bench/validation
{ node_toml bench "$fp"; cat <<CONF
[[service]]
name = "grpc-plain"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:$up"]
grpc_services = ["plain.Orders"]
[[service]]
name = "grpc-checked"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:$up"]
schema = { proto = ["$v/orders.proto"], strict = true }
[[service]]
name = "json-plain"
protocol = "http"
endpoints = ["h2c://127.0.0.1:$up"]
formats = ["application/json"]
[[service]]
name = "json-checked"
protocol = "http"
endpoints = ["h2c://127.0.0.1:$up"]
formats = ["application/json"]
schema = { json = { "POST /v1/orders" = "$v/order.schema.json" } }
[[allow]]
from = "spiffe://bench/client"
to = "*"
CONF
} > fedport.toml
start_fedport fedport.toml ready.json fedport.log
sleep 0.5

grpc=(-d "$work/order.grpc" -H "content-type: application/grpc" -H "te: trailers")
json=(-d "$work/order.json" -H "content-type: application/json")
for r in $(seq "$rounds"); do
  run grpc-plain "https://127.0.0.1:$fp/plain.Orders/Create" "$fp_pid" "${grpc[@]}"
  run grpc-checked "https://127.0.0.1:$fp/bench.Orders/Create" "$fp_pid" "${grpc[@]}"
  run json-plain "https://127.0.0.1:$fp/v1/orders" "$fp_pid" "${json[@]}" -H "fed-service: json-plain"
  run json-checked "https://127.0.0.1:$fp/v1/orders" "$fp_pid" "${json[@]}" -H "fed-service: json-checked"
done >"$work/results.tsv"
# every validated request was valid: a refusal would show here and in h2load's errors
curl -s "http://$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' ready.json)/metrics" \
  | grep -E '^fedport_(message_)?rejections_total' || true

python3 - "$work/results.tsv" "$secs" "$conns" "$streams" "$rounds" <<'PY'
import statistics, sys
rows = {}
for l in open(sys.argv[1]):
    f = l.rstrip("\n").split("\t")
    rows.setdefault(f[0], []).append([float(x) for x in f[1:]])
med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
print(f"h2load -D {sys.argv[2]} -c {sys.argv[3]} -m {sys.argv[4]} -t 1, POST of one ~1 KiB order, "
      f"mTLS TLS 1.3 -> fedport -> h2c upstream; median of {sys.argv[5]} interleaved rounds")
print(f"{'service':14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu µs/req':>12}{'errors':>8}")
for k in ["grpc-plain", "grpc-checked", "json-plain", "json-checked"]:
    r = med[k]
    print(f"{k:14}{r[0]:>10.0f}{r[1]:>9.2f}{r[2]:>9.2f}{r[3]:>12.1f}{r[5]:>8.0f}")
for kind in ["grpc", "json"]:
    p, c = med[f"{kind}-plain"], med[f"{kind}-checked"]
    print(f"{kind}: validated/plain req/s {c[0]/p[0]:.2f} (cost {100*(1-c[0]/p[0]):.1f}%), "
          f"p99 {c[2]/p[2]:.2f}x, cpu per request {c[3]/p[3]:.2f}x")
PY
