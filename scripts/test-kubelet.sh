#!/usr/bin/env bash
# The chart's pods running for real: the control plane of scripts/test-k8s.sh
# plus a real node — kubelet and kube-proxy built from the Kubernetes module,
# containerd, runc and the CNI bridge plugin from Debian, CoreDNS built from
# its module — running the image scripts/build-image.sh makes. The test
# (helm/ci/test_kubelet.py) installs the chart, waits for the kubelet's gRPC
# probes, runs `helm test`, calls the orchestrator pod with grpcurl and
# uninstalls. Needs root (containers, a bridge, iptables). About 2 minutes
# once the tools are built.
#
#   scripts/test-kubelet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $(id -u) -eq 0 ]] || { echo "test-kubelet: run as root" >&2; exit 1; }
scripts/install-debs.sh image
scripts/install-debs.sh node
K8S_BIN_DIR="$(scripts/install-k8s.sh | tail -n 1)"
TOOLS="$(dirname "$K8S_BIN_DIR")"
HELM="$(scripts/install-tools.sh helm grpcurl | tail -n 1)/helm"
VENV="$TOOLS/venv"
if [[ ! -x "$VENV/bin/pytest" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check pytest==8.4.2 pyyaml==6.0.3
fi
# The binaries the image is built from.
cargo build --locked --bins --quiet

K8S_BIN_DIR="$K8S_BIN_DIR" KWOK_STAGES="$TOOLS/kwok-stages" NODE_IMAGES="$TOOLS/node-images" \
  HELM="$HELM" GRPCURL="$(dirname "$HELM")/grpcurl" \
  "$VENV/bin/python" -m pytest -v -p no:cacheprovider helm/ci/test_kubelet.py
