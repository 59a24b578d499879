#!/usr/bin/env bash
# fedport against the direct upstream, HAProxy and nginx, in one run, same h2load flags,
# same mTLS (the direct run is cleartext h2c: there is no proxy to terminate TLS).
# Prints req/s, p50, p99 and proxy CPU µs per request, with ratios.
#
#   bench/compare.sh [SECONDS] [CONNECTIONS] [STREAMS_PER_CONNECTION]
#
# Not a test: numbers depend on the machine. Everything binds 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
secs=${1:-10} conns=${2:-16} streams=${3:-16}
work=$(mktemp -d /tmp/fedport-bench.XXXXXX)
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill ${fp_pid:-} ${fk_pid:-} 2>/dev/null; wait 2>/dev/null || true' EXIT

bash "$peers" install
(cd "$here" && cargo build --release --quiet)
fedport=$here/target/release/fedport

. "$here/bench/lib.sh"
cd "$work"
bench_certs
up=$(port) hp=$(port) np=$(port) fp=$(port) fk=$(port)
bash "$peers" upstream "$work" "$up"
bash "$peers" start "$work" "$up" "$work/node.pem" "$work/node.key" "$work/ca.pem" "$hp" "$np"
{ node_toml bench "$fp"; cat <<CONF
service = "up"
[[service]]
name = "up"
protocol = "http"
endpoints = ["h2c://127.0.0.1:$up"]
[[allow]]
from = "spiffe://bench/client"
to = "up"
CONF
} > fedport.toml
# the same node with 1,000 rules, of which the caller's is the last
{ sed "s/127.0.0.1:$fp/127.0.0.1:$fk/" fedport.toml
  for r in $(seq 999); do printf '[[allow]]\nfrom = "spiffe://bench/team%s/*"\nto = "up"\nmethods = ["GET /v1/%s/"]\n' "$r" "$r"; done
} > fedport-1k.toml
FEDPORT_LOG=warn "$fedport" run -c fedport.toml --ready-file ready.json 2>fedport.log & fp_pid=$!
FEDPORT_LOG=warn "$fedport" run -c fedport-1k.toml --ready-file ready-1k.json 2>fedport-1k.log & fk_pid=$!
for _ in $(seq 100); do [ -s ready.json ] && [ -s ready-1k.json ] && break; sleep 0.05; done
sleep 0.5

haproxy_pid=$(pgrep -n -f "haproxy -f $work/haproxy.cfg")

{
  run direct "http://127.0.0.1:$up/" -
  run haproxy "https://127.0.0.1:$hp/" "$haproxy_pid"
  run nginx "https://127.0.0.1:$np/" -
  if [ -n "${FEDPORT_PERF:-}" ]; then # profile fedport during its run: perf.data in the work dir
    perf record -F 2000 -g -p "$fp_pid" -o "$work/perf.data" -- sleep "$((secs + 1))" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  run fedport "https://127.0.0.1:$fp/" "$fp_pid"
  [ -n "${perf_pid:-}" ] && wait "$perf_pid" && cp "$work/perf.data" "${FEDPORT_PERF_OUT:-/tmp/fedport.perf.data}"
  run fedport-1k "https://127.0.0.1:$fk/" "$fk_pid"
} >"$work/results.tsv"

python3 - "$work/results.tsv" "$secs" "$conns" "$streams" <<'PY'
import sys
rows = {l.split("\t")[0]: l.rstrip("\n").split("\t") for l in open(sys.argv[1])}
print(f"h2load -D {sys.argv[2]} -c {sys.argv[3]} -m {sys.argv[4]} -t 1, GET, 100-byte answers; proxies: mTLS TLS 1.3 + ALPN h2 -> h2c")
print(f"{'target':10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu µs/req':>12}{'done':>10}{'errors':>8}")
for k in ["direct", "haproxy", "nginx", "fedport", "fedport-1k"]:
    r = rows[k]
    print(f"{k:10}{r[1]:>10}{r[2]:>9}{r[3]:>9}{r[4]:>12}{r[5]:>10}{r[6]:>8}")
f, d, h = (float(rows[k][1]) for k in ("fedport", "direct", "haproxy"))
print(f"fedport/direct req/s: {f/d:.2f}   fedport/haproxy req/s: {f/h:.2f}   "
      f"fedport/haproxy cpu per request: {float(rows['fedport'][4])/float(rows['haproxy'][4]):.2f}")
print(f"fedport with 1,000 rules / with 1 rule, req/s: {float(rows['fedport-1k'][1])/f:.2f}")
PY
