#!/usr/bin/env bash
# What watching costs: three fedport nodes, identical but for their monitoring —
# per-request metrics on (the default), per-request metrics off, and metrics on with a
# full JSON access log (one line per request, to a file) — driven with the same h2load
# flags in interleaved rounds against the same upstream. Prints medians and ratios.
#
#   bench/observability.sh [SECONDS] [CONNECTIONS] [STREAMS_PER_CONNECTION] [ROUNDS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
secs=${1:-5} conns=${2:-16} streams=${3:-16} rounds=${4:-3}
work=$(mktemp -d /tmp/fedport-bench.XXXXXX)
pids=()
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT

bash "$peers" install
(cd "$here" && cargo build --release --quiet)
. "$here/bench/lib.sh"
cd "$work"
bench_certs
up=$(port)
bash "$peers" upstream "$work" "$up"
declare -A portof pidof
for variant in metrics no-metrics access-log; do
  p=$(port); portof[$variant]=$p
  extra=""
  [ "$variant" = no-metrics ] && extra="request_metrics = false"
  [ "$variant" = access-log ] && extra="access_log = true"
  { node_toml "bench-$variant" "$p" "$extra"; cat <<CONF
service = "up"
[[service]]
name = "up"
protocol = "http"
endpoints = ["h2c://127.0.0.1:$up"]
[[allow]]
from = "spiffe://bench/client"
to = "up"
CONF
  } > "$variant.toml"
  FEDPORT_LOG=info "$here/target/release/fedport" --log-format json run -c "$variant.toml" --ready-file "$variant.ready" 2>"$variant.fedport.log" &
  pidof[$variant]=$!; pids+=($!)
done
for _ in $(seq 100); do [ -s metrics.ready ] && [ -s no-metrics.ready ] && [ -s access-log.ready ] && break; sleep 0.05; done
sleep 0.5
for r in $(seq "$rounds"); do
  for variant in metrics no-metrics access-log; do
    run "$variant" "https://127.0.0.1:${portof[$variant]}/" "${pidof[$variant]}"
  done
done >"$work/results.tsv"
lines=$(grep -c '"target":"fedport::access"' access-log.fedport.log || true)
python3 - "$work/results.tsv" "$secs" "$conns" "$streams" "$rounds" "$lines" <<'PY'
import statistics, sys
rows = {}
for l in open(sys.argv[1]):
    f = l.rstrip("\n").split("\t")
    rows.setdefault(f[0], []).append([float(x) for x in f[1:]])
med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
print(f"h2load -D {sys.argv[2]} -c {sys.argv[3]} -m {sys.argv[4]} -t 1, GET, mTLS -> fedport -> h2c upstream; median of {sys.argv[5]} interleaved rounds")
print(f"{'variant':14}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu µs/req':>12}")
for k in ["no-metrics", "metrics", "access-log"]:
    r = med[k]
    print(f"{k:14}{r[0]:>10.0f}{r[1]:>9.2f}{r[2]:>9.2f}{r[3]:>12.1f}")
base = med["no-metrics"]
for k in ["metrics", "access-log"]:
    r = med[k]
    print(f"{k} / no-metrics: req/s {r[0]/base[0]:.3f}, cpu per request {r[3]/base[3]:.2f}x")
print(f"access log lines written: {sys.argv[6]}")
PY
