#!/usr/bin/env bash
# Builds ringcache and runs a local cluster on this machine: an
# orchestrator and three cache nodes, each its own process, with defaults
# that just work. Ctrl-C stops them all.
#
#   scripts/run-local.sh
#
# Ports (all on 127.0.0.1):
#   orchestrator  gRPC 50051, metrics 9090   <- talk to this one
#   cache nodes   gRPC 50061-50063, metrics 9091-9093
# Set NODES=5 for another number of nodes, REPLICAS=2 to keep two copies of
# each key. Logs go to target/run-local/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES="${NODES:-3}"
REPLICAS="${REPLICAS:-1}"
LOG_DIR="target/run-local"

cargo build --release --bins --locked
GRPCURL_DIR="$(scripts/install-tools.sh grpcurl 2>/dev/null | tail -n 1 || true)"
mkdir -p "$LOG_DIR"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping the cluster..."
  # SIGTERM: each process drains and exits on its own.
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  echo "stopped."
}
trap stop INT TERM EXIT

node_list=()
for i in $(seq 1 "$NODES"); do
  port=$((50060 + i))
  target/release/cache-node \
    --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$((9090 + i))" \
    --node-id "node-$i" \
    > "$LOG_DIR/node-$i.log" 2>&1 &
  pids+=($!)
  node_list+=("127.0.0.1:$port")
done

target/release/orchestrator \
  --listen 127.0.0.1:50051 \
  --metrics-listen 127.0.0.1:9090 \
  --nodes "$(IFS=,; echo "${node_list[*]}")" \
  --replicas "$REPLICAS" \
  > "$LOG_DIR/orchestrator.log" 2>&1 &
pids+=($!)

# Wait until the orchestrator logs that it is serving (or something died).
for _ in $(seq 1 100); do
  grep -q "orchestrator serving" "$LOG_DIR/orchestrator.log" 2>/dev/null && break
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a process exited during start-up; its logs are in $LOG_DIR:" >&2
      tail -n 5 "$LOG_DIR"/*.log >&2
      exit 1
    fi
  done
  sleep 0.1
done

cat <<MSG

ringcache is running: an orchestrator on localhost:50051 and $NODES cache nodes on
localhost:50061-$((50060 + NODES)). Metrics: http://localhost:9090/metrics. Logs: $LOG_DIR/.

Try it from another terminal (grpcurl is in ${GRPCURL_DIR:-"your PATH"}):

  export PATH="${GRPCURL_DIR:+$GRPCURL_DIR:}\$PATH"
  grpcurl -plaintext -d '{"key":"greeting","value":"aGVsbG8="}' localhost:50051 ringcache.v1.Cache/Set
  grpcurl -plaintext -d '{"key":"greeting"}' localhost:50051 ringcache.v1.Cache/Get
  grpcurl -plaintext -d '{"key":"greeting"}' localhost:50051 ringcache.v1.Cluster/Locate
  grpcurl -plaintext localhost:50051 ringcache.v1.Cluster/ListNodes

More examples are in the README. Ctrl-C stops the cluster.

MSG

# Stay up until Ctrl-C, or until any process exits on its own.
wait -n "${pids[@]}"
echo "a process exited unexpectedly; see $LOG_DIR/" >&2
exit 1
