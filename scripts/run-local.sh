#!/usr/bin/env bash
# Builds ringcache and runs a local cache node on this machine, with
# defaults that just work. Stop it with Ctrl-C.
#
#   scripts/run-local.sh
#
# Ports: gRPC on localhost:50061, Prometheus metrics on localhost:9091.
# Extra arguments are passed to the cache node (see cache-node --help).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins --locked
GRPCURL_DIR="$(scripts/install-tools.sh grpcurl 2>/dev/null | tail -n 1 || true)"

cat <<MSG

ringcache cache node starting on localhost:50061 (metrics: http://localhost:9091/metrics)
Try it from another terminal (grpcurl is in ${GRPCURL_DIR:-"your PATH"}):

  export PATH="${GRPCURL_DIR:+$GRPCURL_DIR:}\$PATH"
  grpcurl -plaintext localhost:50061 list
  grpcurl -plaintext -d '{"key":"greeting","value":"aGVsbG8="}' localhost:50061 ringcache.v1.Cache/Set
  grpcurl -plaintext -d '{"key":"greeting"}' localhost:50061 ringcache.v1.Cache/Get

Ctrl-C stops it.

MSG

exec target/release/cache-node \
  --listen 127.0.0.1:50061 \
  --metrics-listen 127.0.0.1:9091 \
  "$@"
