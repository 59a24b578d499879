#!/usr/bin/env bash
# fedport against the direct upstream, HAProxy, nginx and Envoy, in one run: same h2load flags,
# same mTLS (the direct run is cleartext h2c: there is no proxy to terminate TLS), in
# interleaved rounds (the order rotates each round), medians over the rounds.
#
#   bench/compare.sh [SECONDS] [CONNECTIONS] [STREAMS_PER_CONNECTION] [ROUNDS]
#
# Four shapes of load:
#   keepalive  GET over long-lived connections, CONNECTIONS × STREAMS in flight
#   post       POST of a 100-byte body, the same concurrency
#   grpc       POST of a 5-byte-framed 100-byte message, content-type application/grpc,
#              te: trailers, the same concurrency
#   churn      one request per connection (1,000 connections opened at once): the mTLS
#              handshake dominates
#   large      POST of a 1,000,000-byte body (just under nginx's default 1m body limit,
#              which both the shared upstream and the nginx proxy keep), 4 × 4 in flight
#   stream     a server-streaming gRPC call: a 105-byte request, an answer of 1,000
#              gRPC messages of 100 bytes (105,000 bytes) and grpc-status 0 in trailers,
#              4 × 4 in flight; a second upstream of this script's own (nginx serving
#              the framed messages) with a second HAProxy, nginx, Envoy and fedport
#              listener in front of it
# For each: req/s, p50, p99 (h2load's per-request log), proxy CPU µs per request
# (utime+stime of the proxy's processes ÷ requests), proxy RSS after the run, and ratios
# to direct and to each peer. Before any load, each proxy's memory per open connection:
# its RSS with HOLD (default 1,000) mTLS HTTP/2 connections held open at a trickle
# (bench/hold.py: one GET each, then one every 2 s) less its RSS before, ÷ HOLD.
# FEDPORT_PERF=1 records a perf profile of fedport's first
# keepalive run. Not a test: numbers depend on the machine. Everything binds 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
peers=${FEDPORT_PEERS:-$here/../shared/peers/peers.sh}
secs=${1:-5} conns=${2:-16} streams=${3:-16} rounds=${4:-3} hold=${HOLD:-1000}
work=$(mktemp -d /tmp/fedport-bench.XXXXXX)
# nginx's workers run as an unprivileged user: they must reach the files served and the
# temporary files a large body is spooled to (mktemp makes the directory 0700; the keys
# in it stay 0600)
chmod 755 "$work"
trap 'for d in "$work" "$work/envoy" "$work/s" "$work/s/envoy"; do bash "$peers" stop "$d" >/dev/null 2>&1 || true; done; kill ${fp_pid:-} 2>/dev/null; wait 2>/dev/null || true' EXIT

bash "$peers" install
(cd "$here" && cargo build --release --quiet)

. "$here/bench/lib.sh"
cd "$work"
bench_certs
up=$(port) hp=$(port) np=$(port) ep=$(port) fp=$(port)
bash "$peers" upstream "$work" "$up"
bash "$peers" start "$work" "$up" "$work/node.pem" "$work/node.key" "$work/ca.pem" "$hp" "$np"
bash "$peers" envoy "$work/envoy" "$up" "$work/node.pem" "$work/node.key" "$work/ca.pem" "$ep" 2
# the streaming upstream: 1,000 framed 100-byte messages, served for a POST (nginx serves
# a static file only for GET and HEAD: error_page turns the 405 into the file), with the
# gRPC status in trailers
sup=$(port) shp=$(port) snp=$(port) sep=$(port) sfp=$(port)
mkdir -p "$work/s/www" "$work/s/tmp"
python3 -c 'import sys; m = b"\0" + (100).to_bytes(4, "big") + b"m" * 100; sys.stdout.buffer.write(m * 1000)' >"$work/s/www/stream"
cat >"$work/s/upstream.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/s/upstream.pid;
error_log $work/s/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $work/s/tmp/body; proxy_temp_path $work/s/tmp/proxy;
  fastcgi_temp_path $work/s/tmp/fcgi; uwsgi_temp_path $work/s/tmp/uwsgi; scgi_temp_path $work/s/tmp/scgi;
  keepalive_requests 1000000000; keepalive_timeout 600s; http2_max_concurrent_streams 512;
  server {
    listen 127.0.0.1:$sup http2;
    root $work/s/www;
    default_type application/grpc;
    error_page 405 =200 \$uri;
    location / { try_files /stream =404; add_trailer grpc-status 0 always; }
  }
}
CONF
nginx -c "$work/s/upstream.conf" >"$work/s/upstream.log" 2>&1 & echo $! >>"$work/pids"
bash "$peers" start "$work/s" "$sup" "$work/node.pem" "$work/node.key" "$work/ca.pem" "$shp" "$snp"
bash "$peers" envoy "$work/s/envoy" "$sup" "$work/node.pem" "$work/node.key" "$work/ca.pem" "$sep" 2
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$sep) 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$ep) 2>/dev/null && break; sleep 0.1; done
{ node_toml bench "$fp"; cat <<CONF
service = "up"
[[service]]
name = "up"
protocol = "http"
endpoints = ["h2c://127.0.0.1:$up"]
[[listener]]
name = "stream"
bind = "127.0.0.1:$sfp"
service = "stream"
[[service]]
name = "stream"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:$sup"]
[[allow]]
from = "spiffe://bench/client"
to = "up"
[[allow]]
from = "spiffe://bench/client"
to = "stream"
CONF
} > fedport.toml
start_fedport fedport.toml ready.json fedport.log
sleep 0.5
haproxy_pid=$(pgrep -n -f "haproxy -f $work/haproxy.cfg")
nginx_pid=$(pgrep -n -f "nginx -c $work/nginx.conf")
envoy_pid=$(pgrep -o -f "envoy -c $work/envoy/envoy.yaml")
printf '\0\0\0\0\144%0100d' 0 > grpc.bin
printf '%0100d' 0 > post.bin
python3 -c 'import sys; sys.stdout.write("x" * 1000000)' > large.bin

declare -A url pid
url[direct]="http://127.0.0.1:$up/"; pid[direct]=-
url[haproxy]="https://127.0.0.1:$hp/"; pid[haproxy]=$haproxy_pid
url[nginx]="https://127.0.0.1:$np/"; pid[nginx]=$nginx_pid
url[envoy]="https://127.0.0.1:$ep/"; pid[envoy]=$envoy_pid
url[fedport]="https://127.0.0.1:$fp/"; pid[fedport]=$fp_pid
targets=(direct haproxy nginx envoy fedport)
declare -A surl
surl[direct]="http://127.0.0.1:$sup/"; surl[haproxy]="https://127.0.0.1:$shp/"
surl[nginx]="https://127.0.0.1:$snp/"; surl[envoy]="https://127.0.0.1:$sep/"
surl[fedport]="https://127.0.0.1:$sfp/"
spid() { # the process serving the streaming shape for target T
  case $1 in
    direct) echo - ;;
    haproxy) pgrep -n -f "haproxy -f $work/s/haproxy.cfg" ;;
    nginx) pgrep -n -f "nginx -c $work/s/nginx.conf" ;;
    envoy) pgrep -o -f "envoy -c $work/s/envoy/envoy.yaml" ;;
    fedport) echo "$fp_pid" ;;
  esac
}

# memory per open connection, on fresh processes (after load, allocators keep memory)
for t in haproxy nginx envoy fedport; do
  port=${url[$t]#https://127.0.0.1:}; port=${port%/}
  before=$(tree_rss_mib "${pid[$t]}")
  python3 "$here/bench/hold.py" 127.0.0.1 "$port" ca.pem client.pem client.key "$hold" 6 >"hold-$t.out" 2>&1 &
  holder=$!
  for _ in $(seq 600); do grep -q '^held' "hold-$t.out" && break; sleep 0.1; done
  sleep 2
  held=$(sed -n 's/^held //p' "hold-$t.out")
  after=$(tree_rss_mib "${pid[$t]}")
  wait "$holder" || true
  printf 'mem\t%s\t%s\t%s\t%s\n' "$t" "${held:-0}" "$before" "$after"
done >"$work/memory.tsv"

for r in $(seq "$rounds"); do
  for i in 0 1 2 3 4; do
    t=${targets[$(((i + r) % 5))]}
    if [ "$r" = 1 ] && [ "$t" = fedport ] && [ -n "${FEDPORT_PERF:-}" ]; then
      perf record -F 2000 -g -p "$fp_pid" -o "$work/perf.data" -- sleep "$((secs + 1))" >/dev/null 2>&1 &
      perf_pid=$!
    fi
    run_shape=keepalive run "$t" "${url[$t]}" "${pid[$t]}"
    [ -n "${perf_pid:-}" ] && wait "$perf_pid" && cp "$work/perf.data" "${FEDPORT_PERF_OUT:-/tmp/fedport.perf.data}" && perf_pid=
    run_shape=post run "$t" "${url[$t]}" "${pid[$t]}" -d post.bin
    run_shape=grpc run "$t" "${url[$t]}" "${pid[$t]}" -d grpc.bin -H 'content-type: application/grpc' -H 'te: trailers'
    run_shape=churn run "$t" "${url[$t]}" "${pid[$t]}"
    conns=4 streams=4 run_shape=large run "$t" "${url[$t]}" "${pid[$t]}" -d large.bin
    conns=4 streams=4 run_shape=stream run "$t" "${surl[$t]}" "$(spid "$t")" -d grpc.bin -H 'content-type: application/grpc' -H 'te: trailers'
  done
done >"$work/results.tsv"

python3 - "$work/results.tsv" "$secs" "$conns" "$streams" "$rounds" "$work/memory.tsv" <<'PY'
import statistics as st, sys, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    f = l.rstrip("\n").split("\t")
    rows[(f[0], f[1])].append([float(x) if x != "nan" else float("nan") for x in f[2:]])
secs, conns, streams, rounds = sys.argv[2:6]
med = lambda k, i: st.median(r[i] for r in rows[k]) if rows.get(k) else float("nan")
print(f"proxies: TLS 1.3 + client certificate + ALPN h2 -> h2c upstream (nginx, 100-byte answers); "
      f"medians of {rounds} interleaved rounds")
for shape, flags in [("keepalive", f"-D {secs} -c {conns} -m {streams}, GET"),
                     ("post", f"-D {secs} -c {conns} -m {streams}, POST 100 bytes"),
                     ("grpc", f"-D {secs} -c {conns} -m {streams}, POST application/grpc 105 bytes"),
                     ("churn", "-n 1000 -c 1000 -m 1: one request per connection"),
                     ("large", f"-D {secs} -c 4 -m 4, POST 1,000,000 bytes"),
                     ("stream", f"-D {secs} -c 4 -m 4, gRPC server-streaming: 1,000 messages of 100 bytes per call")]:
    print(f"\n## {shape}: h2load {flags}")
    print(f"{'target':9}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU µs/req':>11}{'RSS MiB':>9}"
          f"{'÷direct':>9}{'CPU ÷haproxy':>13}{'CPU ÷envoy':>11}{'errors':>8}")
    d = med((shape, "direct"), 0)
    for t in ["direct", "haproxy", "nginx", "envoy", "fedport"]:
        k = (shape, t)
        rps, p50, p99, cpu, errs, rss = (med(k, i) for i in (0, 1, 2, 3, 5, 6))
        ch, ce = cpu / med((shape, "haproxy"), 3), cpu / med((shape, "envoy"), 3)
        print(f"{t:9}{rps:9.0f}{p50:8.2f}{p99:8.2f}{cpu:11.1f}{rss:9.1f}{rps/d:9.2f}{ch:13.2f}{ce:11.2f}{errs:8.0f}")
    f, h, e = (med((shape, t), 0) for t in ("fedport", "haproxy", "envoy"))
    add = lambda t: med((shape, t), 2) - med((shape, "direct"), 2)
    print(f"fedport req/s ÷ haproxy {f/h:.2f}, ÷ envoy {f/e:.2f}, ÷ direct {f/d:.2f}; added p99 vs direct: "
          + ", ".join(f"{t} {add(t):+.2f} ms" for t in ("fedport", "haproxy", "nginx", "envoy")))
print("\n## memory per open mTLS HTTP/2 connection (held open at a trickle)")
print(f"{'target':9}{'held':>6}{'RSS before MiB':>16}{'RSS held MiB':>14}{'KiB/conn':>10}")
for l in open(sys.argv[6]):
    _, t, held, before, after = l.split()
    held, before, after = int(held), float(before), float(after)
    per = (after - before) * 1024 / held if held else float("nan")
    print(f"{t:9}{held:6d}{before:16.1f}{after:14.1f}{per:10.1f}")
PY
