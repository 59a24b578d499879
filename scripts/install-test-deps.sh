#!/usr/bin/env bash
# Installs what fedport's tests and benches use, idempotently: Debian packages for the
# real clients and peers (curl, openssl, h2load, nginx, haproxy) and Python grpcio.
set -euo pipefail
need=()
for pair in curl:curl openssl:openssl h2load:nghttp2-client nginx:nginx haproxy:haproxy protoc:protobuf-compiler nft:nftables ip:iproute2 promtool:prometheus tmux:tmux redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools logrotate:logrotate systemd-analyze:systemd adduser:adduser dpkg-deb:dpkg; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
# the etcd-client crate compiles etcd's protos at build time: protoc and the well-known types
[ -e /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${need[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian starts the packaged daemons; none of them is ours to leave running
  for f in /run/nginx.pid /run/haproxy.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  pkill -x prometheus 2>/dev/null || true
  pkill -x etcd 2>/dev/null || true
  # the packaged Redis too: tests start their own on loopback ports of their own
  pkill -x redis-server 2>/dev/null || true
fi
py=${PYTHON:-python3}
if ! "$py" -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "install-test-deps: pip install prometheus_client"
  "$py" -m pip install -q --disable-pip-version-check 'prometheus_client>=0.17'
fi
if ! "$py" -c 'import h2, hyperframe, hpack' >/dev/null 2>&1; then
  echo "install-test-deps: pip install h2"
  "$py" -m pip install -q --disable-pip-version-check 'h2>=4.1'
fi
if ! "$py" -c 'import grpc' >/dev/null 2>&1; then
  echo "install-test-deps: pip install grpcio"
  "$py" -m pip install -q --disable-pip-version-check 'grpcio>=1.60'
fi
# SPIFFE bundles read by libraries nobody here wrote: py-spiffe (with PyJWT, cryptography)
if ! "$py" -c 'import spiffe, jwt, cryptography' >/dev/null 2>&1; then
  echo "install-test-deps: pip install spiffe"
  "$py" -m pip install -q --disable-pip-version-check 'spiffe>=0.3,<0.4'
fi
# the Debian package is built by cargo-deb (tests/it/package.rs)
if ! cargo deb --version >/dev/null 2>&1; then
  echo "install-test-deps: cargo install cargo-deb"
  cargo install -q --locked cargo-deb
fi
