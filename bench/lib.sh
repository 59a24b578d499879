# Shared by the bench scripts: certificates, free ports, and one measured h2load run.
# Source it after setting: here (the repository), work (a scratch directory), peers
# (peers.sh), secs, conns, streams.

# A federation CA, the proxies' certificate ("node") and h2load's client certificate.
bench_certs() {
  (cd "$work"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -subj /CN=bench-ca -days 2 -out ca.pem 2>/dev/null
  for n in node client; do
    openssl ecparam -name prime256v1 -genkey -noout -out $n.ec
    openssl pkcs8 -topk8 -nocrypt -in $n.ec -out $n.key
    openssl req -new -key $n.key -subj /CN=$n -out $n.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,URI:spiffe://bench/%s\nextendedKeyUsage=serverAuth,clientAuth\n' $n > $n.ext
    openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $n.ext -out $n.pem 2>/dev/null
  done)
}

# The start of a node's config: [node], [tls] with the bench certificates, and the
# `internal` listener on PORT. Further [node] lines come as EXTRA.
node_toml() { # NAME PORT [EXTRA]
  printf '[node]\nname = "%s"\nregion = "local"\n%s\n[tls]\ncert = "%s/node.pem"\nkey = "%s/node.key"\nca = "%s/ca.pem"\n[[listener]]\nname = "internal"\nbind = "127.0.0.1:%s"\n' \
    "$1" "${3:-}" "$work" "$work" "$work" "$2"
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# Starts fedport on a config and waits for its ready file; sets fp_pid.
start_fedport() { # CONFIG READY_FILE LOG
  FEDPORT_LOG=warn "${FEDPORT_BIN:-$here/target/release/fedport}" run -c "$1" --ready-file "$2" 2>"$3" & fp_pid=$!
  for _ in $(seq 100); do [ -s "$2" ] && break; sleep 0.05; done
  [ -s "$2" ] || { echo "fedport did not start:" >&2; cat "$3" >&2; exit 1; }
}

# CPU ticks (utime + stime) of a process and its children (nginx's workers).
tree_ticks() { # PID
  local t=0 c
  for c in $1 $(pgrep -P "$1" || true); do t=$((t + $(cpu_ticks "$c"))); done
  echo "$t"
}

# Resident memory of a process and its children, MiB.
tree_rss_mib() { # PID
  local kb=0 c
  for c in $1 $(pgrep -P "$1" || true); do
    kb=$((kb + $(awk '/^VmRSS:/{print $2}' "/proc/$c/status")))
  done
  awk -v kb="$kb" 'BEGIN { printf "%.1f", kb / 1024 }'
}

# One h2load run with the client certificate; prints a TSV row:
# [shape,] name, req/s, p50 ms, p99 ms, CPU µs per request of PID and its children (nan
# for -), done, errors, RSS MiB after the run (nan for -). Extra h2load arguments (-d
# FILE, -H ...) come after the URL. With run_shape=churn every request has a connection
# of its own (1,000 opened at once); otherwise -D secs -c conns -m streams. A set
# run_shape also starts the row.
run() { # NAME URL PID|- [h2load args]
  local name=$1 url=$2 pid=$3 before=0 after=0 rss=nan load; shift 3
  if [ "${run_shape:-}" = churn ]; then load=(-n 1000 -c 1000 -m 1)
  else load=(-D "$secs" --warm-up-time 1 -c "$conns" -m "$streams"); fi
  local log="$work/h2load-$name.log"
  rm -f "$log"
  [ "$pid" != - ] && before=$(tree_ticks "$pid")
  bash "$peers" h2load "$work/client.pem" "$work/client.key" "${load[@]}" \
    -t 1 --log-file "$log" "$@" "$url" >"$work/$name.out" 2>&1 \
    || { echo "h2load failed for $name:" >&2; cat "$work/$name.out" >&2; exit 1; }
  [ "$pid" != - ] && after=$(tree_ticks "$pid") && rss=$(tree_rss_mib "$pid")
  [ -n "${run_shape:-}" ] && printf '%s\t' "$run_shape"
  python3 - "$name" "$work/$name.out" "$log" "$((after - before))" "$(getconf CLK_TCK)" "$rss" <<'PY'
import re, sys
name, out, log, ticks, hz, rss = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))
done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).group(2))
errs = int(re.search(r"(\d+) failed, (\d+) errored", out).group(1))
lat = sorted(int(l.split()[2]) for l in open(log) if l.strip() and l.split()[1] == "200")
pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] / 1000.0 if lat else float("nan")
cpu = (ticks / hz * 1e6 / done) if ticks and done else float("nan")
print(f"{name}\t{rps:.0f}\t{pct(0.5):.2f}\t{pct(0.99):.2f}\t{cpu:.1f}\t{done}\t{errs}\t{rss}")
PY
}
