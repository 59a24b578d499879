#!/usr/bin/env bash
# A TCP service through fedport against Redis direct and against HAProxy in mode tcp
# with TLS and a required client certificate, driven by redis-benchmark (SET and GET,
# 50 connections) in alternation: req/s, and the proxy's CPU per request, with ratios
# measured in the same run. `fedport-tunnel` is a second node's local port with no
# endpoint: each connection is carried to the first node as an HTTP/2 CONNECT stream on
# the mTLS peer link (CPU: both nodes). Not a test: numbers depend on the machine.
#
#   bench/tcp.sh [ROUNDS] [REQUESTS]
#
# FEDPORT_BIN=PATH measures another build; TUNNEL=0 leaves the tunnel row out (a build
# from before TCP services went to peers).
# Uses target/release/fedport (build it first), Debian's redis-server, redis-benchmark
# and haproxy (scripts/install-test-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-3} n=${2:-200000}
peers="$here/../shared/peers/peers.sh"
work=$(mktemp -d /tmp/fedport-tcp.XXXXXX)
trap 'kill ${rp:-} ${fp_pid:-} ${near_pid:-} ${hp:-} 2>/dev/null; wait 2>/dev/null || true' EXIT
. "$here/bench/lib.sh"
cd "$work"
bench_certs
cat node.pem node.key > node.both
r=$(port) fl=$(port) ft=$(port) h=$(port) fi=$(port) ni=$(port) nl=$(port)
redis-server --port "$r" --bind 127.0.0.1 --save "" --appendonly no >redis.log 2>&1 & rp=$!
{ node_toml bench "$fi"
  printf '[[service]]\nname = "cache"\nprotocol = "tcp"\nendpoints = ["tcp://127.0.0.1:%s"]\n' "$r"
  printf '[[listener]]\nname = "cache-local"\nrole = "local"\nbind = "127.0.0.1:%s"\nservice = "cache"\n' "$fl"
  printf '[[listener]]\nname = "cache-tls"\nbind = "127.0.0.1:%s"\nservice = "cache"\n' "$ft"
  printf '[[allow]]\nfrom = "spiffe://bench/client"\nto = "cache"\n[[allow]]\nfrom = "local"\nto = "cache"\n'
  printf '[[allow]]\nfrom = "near"\nto = "cache"\n'
  printf '[[peer]]\nname = "near"\nregion = "local"\naddress = "127.0.0.1:%s"\nidentity = "spiffe://bench/node"\nservices = []\n' "$ni"
} > fedport.toml
{ node_toml near "$ni"
  printf '[[service]]\nname = "cache"\nprotocol = "tcp"\nendpoints = []\n'
  printf '[[listener]]\nname = "cache-local"\nrole = "local"\nbind = "127.0.0.1:%s"\nservice = "cache"\n' "$nl"
  printf '[[allow]]\nfrom = "local"\nto = "cache"\n'
  printf '[[peer]]\nname = "far"\nregion = "local"\naddress = "127.0.0.1:%s"\nidentity = "spiffe://bench/node"\nservices = ["cache"]\n' "$fi"
} > near.toml
if [ "${TUNNEL:-1}" = 1 ]; then
  start_fedport near.toml near.ready near.log
  near_pid=$fp_pid
fi
start_fedport fedport.toml fedport.ready fedport.log
cat > haproxy.cfg <<EOF
global
  nbthread 2
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend cache
  bind 127.0.0.1:$h ssl crt $work/node.both ca-file $work/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend redis
backend redis
  server r 127.0.0.1:$r
EOF
haproxy -f haproxy.cfg -db >haproxy.log 2>&1 & hp=$!
sleep 1
tls=(--tls --cacert ca.pem --cert client.pem --key client.key --sni localhost)
ticks() { local t=0 p; for p in $1; do t=$((t + $(tree_ticks "$p"))); done; echo "$t"; }
measure() { # NAME "PID ..."|- PORT [TLS ARGS]
  local name=$1 pid=$2 p=$3 before=0 after=0; shift 3
  [ "$pid" != - ] && before=$(ticks "$pid")
  local out
  out=$(redis-benchmark -h 127.0.0.1 -p "$p" "$@" -t set,get -n "$n" -c 50 -q 2>/dev/null | tr '\r' '\n' | grep -E '^(SET|GET):' | tail -2)
  [ "$pid" != - ] && after=$(ticks "$pid")
  python3 - "$name" "$out" "$((after - before))" "$(getconf CLK_TCK)" "$n" <<'PY'
import re, sys
name, out, ticks, hz, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rps = [float(x) for x in re.findall(r"([\d.]+) requests per second", out)]
cpu = ticks / hz * 1e6 / (2 * n) if ticks else float("nan")
print(f"{name}\t{sum(rps) / len(rps):.0f}\t{cpu:.2f}")
PY
}
for _ in $(seq "$rounds"); do
  measure direct - "$r"
  measure fedport-local "$fp_pid" "$fl"
  measure fedport-tls "$fp_pid" "$ft" "${tls[@]}"
  measure haproxy-tls "$hp" "$h" "${tls[@]}"
  if [ "${TUNNEL:-1}" = 1 ]; then measure fedport-tunnel "$near_pid $fp_pid" "$nl"; fi
done > results.tsv
python3 - results.tsv "$rounds" "$n" <<'PY'
import collections, statistics as st, sys
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    f = l.split("\t")
    d[f[0]].append((float(f[1]), float(f[2])))
m = {k: (st.median(r[0] for r in v), st.median(r[1] for r in v)) for k, v in d.items()}
print(f"medians of {sys.argv[2]} rounds, redis-benchmark -t set,get -n {sys.argv[3]} -c 50")
print(f"{'':14} {'req/s':>9} {'CPU µs/req':>11} {'req/s ÷ direct':>15}")
for k, (rps, cpu) in m.items():
    print(f"{k:14} {rps:9.0f} {cpu:11.2f} {rps / m['direct'][0]:15.2f}")
f, h = m["fedport-tls"], m["haproxy-tls"]
print(f"fedport-tls ÷ haproxy-tls: req/s {f[0] / h[0]:.2f}, CPU per request {f[1] / h[1]:.2f}")
PY
