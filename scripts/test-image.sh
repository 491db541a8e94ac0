#!/usr/bin/env bash
# Builds the container image (scripts/build-image.sh) and runs it for real
# with podman, as a cluster would: a cache node and an orchestrator, each
# from the image, read-only root filesystem, the image's own user. Checks,
# from outside the containers (the image has no shell):
#
#   - each container process runs as uid/gid 65532, not root;
#   - its root filesystem is mounted read-only;
#   - the image holds no shell;
#   - health is SERVING and a Set then Get through the orchestrator
#     container answers, with the real grpcurl;
#   - `podman stop` (SIGTERM) drains both and they exit 0.
#
#   scripts/test-image.sh [--bin-dir DIR]   # default: target/debug (built)
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=""
[[ "${1:-}" == "--bin-dir" ]] && bin_dir="$2"
if [[ -z "$bin_dir" ]]; then
  cargo build --locked --bins --quiet
  bin_dir="target/debug"
fi
scripts/install-debs.sh image
GRPCURL="$(scripts/install-tools.sh grpcurl | tail -n 1)/grpcurl"

work="$(mktemp -d)"
name="ringcache-image-test-$$"
cleanup() {
  podman rm -f "$name-node" "$name-orch" >/dev/null 2>&1 || true
  podman rmi -f "localhost/$name:test" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "test-image: FAIL: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "==> building the image from $bin_dir"
ref="$(scripts/build-image.sh --bin-dir "$bin_dir" --out "$work/oci" --tag test | tail -n 1)"
# Into podman's store, under a name of its own.
image="localhost/$name:test"
skopeo copy --quiet "$ref" "containers-storage:$image"

# podman raises RLIMIT_NOFILE/NPROC by default, which needs
# CAP_SYS_RESOURCE; give the limits this machine has instead.
limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
# The host's network, so the test reaches the containers on 127.0.0.1
# without a CNI setup; everything else (pid, mount, ipc, uts) is the
# container's own.
run=(podman run --detach --read-only --network host "${limits[@]}")

node_port="$(free_port)" node_metrics="$(free_port)"
orch_port="$(free_port)" orch_metrics="$(free_port)"

echo "==> starting a cache node and an orchestrator from the image"
"${run[@]}" --name "$name-node" "$image" \
  --listen "127.0.0.1:$node_port" --metrics-listen "127.0.0.1:$node_metrics" \
  --capacity 64MiB --drain-delay 1s --shutdown-grace 5s >/dev/null
"${run[@]}" --name "$name-orch" --entrypoint /usr/local/bin/orchestrator "$image" \
  --listen "127.0.0.1:$orch_port" --metrics-listen "127.0.0.1:$orch_metrics" \
  --nodes "127.0.0.1:$node_port" --drain-delay 1s --shutdown-grace 5s >/dev/null

wait_serving() {
  local addr="$1" service="$2" i
  for i in $(seq 1 100); do
    if "$GRPCURL" -plaintext -d "{\"service\":\"$service\"}" "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then
      return 0
    fi
    sleep 0.2
  done
  podman logs "$name-node" >&2 || true
  podman logs "$name-orch" >&2 || true
  fail "$addr never reported $service SERVING"
}
wait_serving "127.0.0.1:$node_port" ringcache.v1.Cache
wait_serving "127.0.0.1:$orch_port" ringcache.v1.Cache

for c in node orch; do
  pid="$(podman inspect --format '{{.State.Pid}}' "$name-$c")"
  uid="$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
  gid="$(awk '/^Gid:/ {print $2}' "/proc/$pid/status")"
  # Field 5 of mountinfo is the mount point, field 6 its options.
  root_opts="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | tail -n 1)"
  echo "$c: pid $pid, uid $uid, gid $gid, root filesystem mounted $root_opts"
  [[ "$uid" == 65532 && "$gid" == 65532 ]] || fail "$c runs as $uid:$gid, not 65532:65532"
  [[ ",$root_opts," == *",ro,"* ]] || fail "$c's root filesystem is not read-only ($root_opts)"
done

mnt="$(podman image mount "$image")"
for sh in bin/sh bin/bash usr/bin/sh usr/bin/bash bin/busybox; do
  [[ ! -e "$mnt/$sh" ]] || fail "the image holds a shell: /$sh"
done
echo "image: no shell; files: $(cd "$mnt" && find . -type f | sort | tr '\n' ' ')"
podman image unmount "$image" >/dev/null

echo "==> grpcurl through the orchestrator container"
"$GRPCURL" -plaintext -d '{"key":"image-test","value":"aGVsbG8="}' "127.0.0.1:$orch_port" ringcache.v1.Cache/Set
got="$("$GRPCURL" -plaintext -d '{"key":"image-test"}' "127.0.0.1:$orch_port" ringcache.v1.Cache/Get)"
echo "$got"
grep -q '"value": "aGVsbG8="' <<<"$got" || fail "Get did not return the value Set"

echo "==> podman stop (SIGTERM), then the exit codes"
for c in orch node; do
  podman stop --time 30 "$name-$c" >/dev/null
  code="$(podman inspect --format '{{.State.ExitCode}}' "$name-$c")"
  echo "$c: exit code $code after SIGTERM"
  [[ "$code" == 0 ]] || { podman logs "$name-$c" >&2; fail "$c exited $code on SIGTERM"; }
  podman logs "$name-$c" 2>&1 | grep -q "draining" || fail "$c did not drain on SIGTERM"
done
echo "test-image: OK"
