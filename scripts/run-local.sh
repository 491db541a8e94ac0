#!/usr/bin/env bash
# Builds ringcache and runs a local cluster on this machine: an
# orchestrator and three cache nodes, each its own process, with defaults
# that just work. Ctrl-C stops them all.
#
#   scripts/run-local.sh                   # start the cluster (stays in the foreground)
#   scripts/run-local.sh stop-node N       # from another terminal: SIGTERM node N
#   scripts/run-local.sh restart-node N    # start node N again with its flags
#
# Ports (all on 127.0.0.1):
#   orchestrator  gRPC 50051, metrics 9090   <- talk to this one
#   cache nodes   gRPC 50061-50063, metrics 9091-9093
# Set NODES=5 for another number of nodes, REPLICAS=2 to keep two copies of
# each key, PORT_OFFSET=1000 to add 1000 to every port, BIN_DIR to use
# binaries built elsewhere (no build). Logs go to target/run-local/*.log;
# each process's command line is in target/run-local/*.cmd.
#
# A cache node that exits does not stop the cluster: the orchestrator
# ejects it and keeps answering, and `restart-node N` brings it back with
# the same flags (and identity). Only the orchestrator exiting, or Ctrl-C,
# stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES="${NODES:-3}"
REPLICAS="${REPLICAS:-1}"
PORT_OFFSET="${PORT_OFFSET:-0}"
LOG_DIR="${RUN_LOCAL_DIR:-target/run-local}"

# Starts the process named $1 with the command in $LOG_DIR/$1.cmd, in the
# background, logging to $LOG_DIR/$1.log; records its pid.
launch() {
  local name="$1"
  # The command is one argument per line.
  mapfile -t cmd < "$LOG_DIR/$name.cmd"
  # A session of its own: it outlives the terminal that started it (for
  # restart-node); Ctrl-C reaches it through stop() below.
  setsid "${cmd[@]}" >> "$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$LOG_DIR/$name.pid"
}

alive() {
  local pid
  pid="$(cat "$LOG_DIR/$1.pid" 2>/dev/null)" || return 1
  kill -0 "$pid" 2>/dev/null
}

case "${1:-}" in
  stop-node | restart-node)
    n="${2:?usage: scripts/run-local.sh $1 N}"
    name="node-$n"
    if [ ! -f "$LOG_DIR/$name.cmd" ]; then
      echo "no $name in $LOG_DIR: is scripts/run-local.sh running (with NODES >= $n)?" >&2
      exit 2
    fi
    if [ "$1" = stop-node ]; then
      if alive "$name"; then
        kill -TERM "$(cat "$LOG_DIR/$name.pid")"
        echo "sent SIGTERM to $name; it drains and exits"
      else
        echo "$name is not running"
      fi
      exit 0
    fi
    if alive "$name"; then
      echo "$name is still running (pid $(cat "$LOG_DIR/$name.pid")); stop it first" >&2
      exit 2
    fi
    launch "$name"
    echo "started $name again (pid $(cat "$LOG_DIR/$name.pid")): $(tr '\n' ' ' < "$LOG_DIR/$name.cmd")"
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: scripts/run-local.sh [stop-node N | restart-node N]" >&2
    exit 2
    ;;
esac

if [ -n "${BIN_DIR:-}" ]; then
  BIN="$BIN_DIR"
else
  cargo build --release --bins --locked
  BIN=target/release
fi
GRPCURL_DIR="$(scripts/install-tools.sh grpcurl 2>/dev/null | tail -n 1 || true)"
mkdir -p "$LOG_DIR"
rm -f "$LOG_DIR"/*.pid "$LOG_DIR"/*.cmd

names=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping the cluster..."
  local pids=()
  for name in "${names[@]}"; do
    pids+=("$(cat "$LOG_DIR/$name.pid" 2>/dev/null || true)")
  done
  # SIGTERM: each process drains and exits on its own.
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  done
  echo "stopped."
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

orch_port=$((50051 + PORT_OFFSET))
node_list=()
for i in $(seq 1 "$NODES"); do
  port=$((50060 + i + PORT_OFFSET))
  printf '%s\n' "$BIN/cache-node" \
    --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$((9090 + i + PORT_OFFSET))" \
    --node-id "node-$i" > "$LOG_DIR/node-$i.cmd"
  launch "node-$i"
  names+=("node-$i")
  # The entry names the node's identity, so ListNodes shows node-$i.
  node_list+=("node-$i=127.0.0.1:$port")
done

# Where this run's lines start in the orchestrator's log (the log is kept
# across runs): readiness is never read from an earlier run.
orch_log_start=$(( $(stat -c %s "$LOG_DIR/orchestrator.log" 2>/dev/null || echo 0) + 1 ))
printf '%s\n' "$BIN/orchestrator" \
  --listen "127.0.0.1:$orch_port" \
  --metrics-listen "127.0.0.1:$((9090 + PORT_OFFSET))" \
  --nodes "$(IFS=,; echo "${node_list[*]}")" \
  --replicas "$REPLICAS" > "$LOG_DIR/orchestrator.cmd"
launch orchestrator
names+=(orchestrator)

# Wait until the orchestrator answers its health check SERVING (with
# grpcurl; without it, until this run's log says it serves), or something
# died, or 60 s passed: then say so and fail.
serving() {
  if [ -n "$GRPCURL_DIR" ]; then
    "$GRPCURL_DIR/grpcurl" -plaintext -max-time 1 -d '{"service":"ringcache.v1.Cache"}' \
      "localhost:$orch_port" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'
  else
    tail -c "+$orch_log_start" "$LOG_DIR/orchestrator.log" 2>/dev/null | grep -q "orchestrator serving"
  fi
}
ready=""
for _ in $(seq 1 600); do
  if serving; then
    ready=1
    break
  fi
  for name in "${names[@]}"; do
    if ! alive "$name"; then
      echo "$name exited during start-up; the last lines of its log ($LOG_DIR/$name.log):" >&2
      tail -n 10 "$LOG_DIR/$name.log" >&2
      exit 1
    fi
  done
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "the orchestrator did not report SERVING within 60 s; the last lines of the logs in $LOG_DIR:" >&2
  for name in "${names[@]}"; do
    echo "--- $name" >&2
    tail -n 5 "$LOG_DIR/$name.log" >&2
  done
  exit 1
fi

cat <<MSG

ringcache is running: an orchestrator on localhost:$orch_port and $NODES cache nodes on
localhost:$((50061 + PORT_OFFSET))-$((50060 + NODES + PORT_OFFSET)). Metrics: http://localhost:$((9090 + PORT_OFFSET))/metrics. Logs: $LOG_DIR/.

Try it from another terminal (grpcurl is in ${GRPCURL_DIR:-"your PATH"}):

  export PATH="${GRPCURL_DIR:+$GRPCURL_DIR:}\$PATH"
  grpcurl -plaintext -d '{"key":"greeting","value":"aGVsbG8="}' localhost:$orch_port ringcache.v1.Cache/Set
  grpcurl -plaintext -d '{"key":"greeting"}' localhost:$orch_port ringcache.v1.Cache/Get
  grpcurl -plaintext -d '{"key":"greeting"}' localhost:$orch_port ringcache.v1.Cluster/Locate
  grpcurl -plaintext localhost:$orch_port ringcache.v1.Cluster/ListNodes

Stop a node with 'scripts/run-local.sh stop-node 2' (or kill it), start it
again with 'scripts/run-local.sh restart-node 2'. More examples are in the
README. Ctrl-C stops the cluster.

MSG

# Stay up until Ctrl-C or the orchestrator exits. A node that exits is
# reported (once per exit) and the cluster keeps running without it.
declare -A reported=()
while alive orchestrator; do
  for i in $(seq 1 "$NODES"); do
    if alive "node-$i"; then
      reported[$i]=""
    elif [ -z "${reported[$i]:-}" ]; then
      reported[$i]=1
      echo "node-$i exited (see $LOG_DIR/node-$i.log); the cluster keeps running without it." >&2
      echo "  start it again: scripts/run-local.sh restart-node $i" >&2
    fi
  done
  sleep 0.5
done
echo "the orchestrator exited; see $LOG_DIR/orchestrator.log" >&2
exit 1
