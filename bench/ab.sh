#!/usr/bin/env bash
# Two fedport binaries against each other, for one change at a time: both run side by
# side on the same nginx h2c upstream and are driven in alternation (A, B, A, B …) with
# the same h2load flags over mTLS; prints medians and B's CPU per request ÷ A's.
#
#   bench/ab.sh BINARY_A BINARY_B [ROUNDS] [SECONDS] [CONNS] [STREAMS]
#   AB_EXTRA_B=FILE bench/ab.sh BIN BIN …   B's config has FILE appended
#   AB_SHAPE=churn bench/ab.sh A B …        one request per new mTLS connection (1,000
#                                           at once) instead of keepalive: the handshake
#   AB_IDLE_B=N bench/ab.sh BIN BIN …       N idle mTLS HTTP/2 connections held open to B
#                                           beside its load (bench/hold.py, HOLD_IDLE=1);
#                                           both listeners then allow 20,000 connections
#
# Build A from the commit before the change (`git worktree add`, same CARGO_TARGET_DIR
# keeps the dependencies). Not a test: numbers depend on the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
A=$(realpath "$1") B=$(realpath "$2") rounds=${3:-4} secs=${4:-4} conns=${5:-16} streams=${6:-16}
work=$(mktemp -d /tmp/fedport-ab.XXXXXX)
trap 'bash "$peers" stop "$work" >/dev/null 2>&1 || true; kill ${pa:-} ${pb:-} ${holder:-} 2>/dev/null; wait 2>/dev/null || true' EXIT
bash "$peers" install
. "$here/bench/lib.sh"
cd "$work"
bench_certs
up=$(port) fa=$(port) fb=$(port)
bash "$peers" upstream "$work" "$up"
for side in a:$fa b:$fb; do
  { node_toml "bench-${side%%:*}" "${side#*:}"
    [ -n "${AB_IDLE_B:-}" ] && printf 'max_connections = 20000\n'
    printf 'service = "up"\n[[service]]\nname = "up"\nprotocol = "http"\nendpoints = ["h2c://127.0.0.1:%s"]\n[[allow]]\nfrom = "spiffe://bench/client"\nto = "up"\n' "$up"
  } > "${side%%:*}.toml"
done
# AB_EXTRA_B=FILE: more config for B only (same binary on both sides measures what the
# config costs: 1,000 rules, 100 services)
[ -n "${AB_EXTRA_B:-}" ] && cat "$AB_EXTRA_B" >> b.toml
FEDPORT_LOG=warn "$A" run -c a.toml --ready-file a.ready 2>a.log & pa=$!
FEDPORT_LOG=warn "$B" run -c b.toml --ready-file b.ready 2>b.log & pb=$!
for _ in $(seq 100); do [ -s a.ready ] && [ -s b.ready ] && break; sleep 0.05; done
sleep 0.5
if [ -n "${AB_IDLE_B:-}" ]; then
  ulimit -n "$(ulimit -Hn)"
  HOLD_IDLE=1 python3 "$here/bench/hold.py" 127.0.0.1 "$fb" ca.pem client.pem client.key \
    "$AB_IDLE_B" 100000 >hold.out 2>&1 & holder=$!
  for _ in $(seq 6000); do grep -q "^held" hold.out && break; sleep 0.1; done
  sleep 5
  echo "idle connections to B: $(sed -n 's/^held //p' hold.out)" >&2
fi
for _ in $(seq "$rounds"); do
  run_shape=${AB_SHAPE:-} run A "https://127.0.0.1:$fa/" "$pa" | sed 's/^churn\t//'
  run_shape=${AB_SHAPE:-} run B "https://127.0.0.1:$fb/" "$pb" | sed 's/^churn\t//'
done >results.tsv
python3 - results.tsv "$rounds" <<'PY'
import collections, statistics as st, sys
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    f = l.rstrip("\n").split("\t")
    d[f[0]].append((float(f[1]), float(f[3]), float(f[4]), float(f[7])))
m = {k: [st.median(r[i] for r in v) for i in range(4)] for k, v in d.items()}
print(f"medians of {sys.argv[2]} alternating runs")
print(f"{'':3}{'req/s':>9}{'p99 ms':>8}{'CPU µs/req':>11}{'RSS MiB':>9}   CPU per run")
for k in "AB":
    print(f"{k:3}{m[k][0]:9.0f}{m[k][1]:8.2f}{m[k][2]:11.1f}{m[k][3]:9.1f}   {[r[2] for r in d[k]]}")
print(f"B/A: CPU per request {m['B'][2] / m['A'][2]:.2f}, req/s {m['B'][0] / m['A'][0]:.2f}")
PY
