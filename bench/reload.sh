#!/usr/bin/env bash
# What a reload costs: a node with 100 services and 1,000 rules under steady h2load
# traffic (mTLS), measured twice in one run — without reloads, and while the config is
# reloaded (SIGHUP) every 250 ms. Prints the reload time (from the node's log) and the
# p99 of the traffic in each phase.
#
#   bench/reload.sh [SECONDS] [CONNECTIONS] [STREAMS_PER_CONNECTION]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
secs=${1:-10} conns=${2:-16} streams=${3:-16}
work=$(mktemp -d /tmp/fedport-bench.XXXXXX)
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill ${fp_pid:-} ${hup_pid:-} 2>/dev/null; wait 2>/dev/null || true' EXIT

bash "$peers" install
(cd "$here" && cargo build --release --quiet)
. "$here/bench/lib.sh"
cd "$work"
bench_certs
up=$(port) fp=$(port)
bash "$peers" upstream "$work" "$up"
gen() { # TIMEOUT
  node_toml bench "$fp"
  for s in $(seq 0 99); do
    printf '[[service]]\nname = "svc%s"\nprotocol = "http"\nendpoints = ["h2c://127.0.0.1:%s"]\ntimeout = "%s"\n' "$s" "$up" "$1"
  done
  for r in $(seq 999); do
    printf '[[allow]]\nfrom = "spiffe://bench/team%s/*"\nto = "svc%s"\nmethods = ["GET /v1/%s/"]\n' "$r" "$((r % 100))" "$r"
  done
  printf '[[allow]]\nfrom = "spiffe://bench/client"\nto = "*"\n'
}
gen 15s > fedport.toml
FEDPORT_LOG=info "$here/target/release/fedport" run -c fedport.toml --ready-file ready.json 2>fedport.log & fp_pid=$!
for _ in $(seq 200); do [ -s ready.json ] && break; sleep 0.05; done
sleep 0.5
run steady "https://127.0.0.1:$fp/" "$fp_pid" -H "fed-service: svc7" >"$work/steady.tsv"
( i=0; while true; do i=$((i + 1)); if [ $((i % 2)) = 0 ]; then gen 15s; else gen 14s; fi > fedport.toml.new; mv fedport.toml.new fedport.toml; kill -HUP "$fp_pid"; sleep 0.25; done ) & hup_pid=$!
run reloading "https://127.0.0.1:$fp/" "$fp_pid" -H "fed-service: svc7" >"$work/reloading.tsv"
kill "$hup_pid" 2>/dev/null; wait "$hup_pid" 2>/dev/null || true
python3 - "$work" "$secs" "$conns" "$streams" <<'PY'
import re, statistics, sys
w = sys.argv[1]
row = lambda n: open(f"{w}/{n}.tsv").read().split("\t")
took = [float(x) for x in re.findall(r"took_ms=([\d.]+)", open(f"{w}/fedport.log").read())]
refused = open(f"{w}/fedport.log").read().count("configuration refused")
s, r = row("steady"), row("reloading")
print(f"100 services, 1,000 rules; h2load -D {sys.argv[2]} -c {sys.argv[3]} -m {sys.argv[4]}, GET over mTLS")
print(f"reloads: {len(took)} ({refused} refused), time to build and swap: median {statistics.median(took):.1f} ms, max {max(took):.1f} ms")
print(f"{'phase':12}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
for name, x in (("steady", s), ("reloading", r)):
    print(f"{name:12}{float(x[1]):>10.0f}{float(x[2]):>9.2f}{float(x[3]):>9.2f}{int(x[6]):>8}")
print(f"p99 during reloads / without: {float(r[3]) / float(s[3]):.2f}")
PY
