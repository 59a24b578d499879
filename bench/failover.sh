#!/usr/bin/env bash
# Failover figures, from the federation tests run as they are in CI (real processes on
# loopback): the steady-load failover test N times (time until the other region
# answers after the local instance dies, and until the local instance answers again
# after it restarts; errors during it), and the impairment test once (p50/p99 across
# a link with 40 ms added each way and 2% loss each way, in network namespaces).
#
#   bench/failover.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
out=$(mktemp)
cargo test --quiet --test it --no-run 2>/dev/null
for i in $(seq "$runs"); do
  cargo test --quiet --test it federation::traffic_fails_over -- --nocapture 2>&1 | grep "requests; failover" >>"$out"
done
cargo test --quiet --test it impairment:: -- --nocapture 2>&1 | grep -E "PING RTT|noticed|impaired link" >>"$out" || true
python3 - "$out" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
def ms(s):
    v, unit = re.match(r"([\d.]+)(ms|µs|s|ns)", s).groups()
    return float(v) * {"ms": 1, "s": 1e3, "µs": 1e-3, "ns": 1e-6}[unit]
fo, back, errs = [], [], []
for l in lines:
    m = re.search(r"(\d+) requests; failover after Some\(([^)]+)\), back after Some\(([^)]+)\); idempotent errors (\d+), non-idempotent errors (\d+)", l)
    if m:
        fo.append(ms(m.group(2))); back.append(ms(m.group(3))); errs.append((int(m.group(4)), int(m.group(5))))
print(f"failover under steady load (8 callers, 20 ms service time), {len(fo)} runs:")
print(f"  time until the other region answers: median {statistics.median(fo):.0f} ms (runs: {', '.join(f'{x:.0f}' for x in fo)})")
print(f"  time until the restarted local instance answers again: median {statistics.median(back):.0f} ms (runs: {', '.join(f'{x:.0f}' for x in back)})")
print(f"  errors per run (idempotent, non-idempotent): {errs}")
for l in lines:
    if not re.search(r"requests; failover", l):
        print(l.strip())
PY
