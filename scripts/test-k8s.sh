#!/usr/bin/env bash
# The Helm chart on a real Kubernetes control plane: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok (simulated nodes that
# run the pods' lifecycle, not their containers), all built from the Go
# module proxy and cached by scripts/install-k8s.sh (10-20 minutes the
# first time on 2 cores; seconds after). The tests (helm/ci/test_cluster.py)
# install the chart with its default and HA values, upgrade, roll back,
# check what the API server refuses, and uninstall, reading every result
# back from the API.
#
#   scripts/test-k8s.sh
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_BIN_DIR="$(scripts/install-k8s.sh | tail -n 1)"
HELM="$(scripts/install-tools.sh helm | tail -n 1)/helm"
# pytest and PyYAML from the virtualenv scripts/check-helm.sh keeps.
VENV="$(dirname "$K8S_BIN_DIR")/venv"
if [[ ! -x "$VENV/bin/pytest" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check pytest==8.4.2 pyyaml==6.0.3
fi
command -v openssl >/dev/null || { echo "test-k8s: openssl is needed (apt-get install openssl)" >&2; exit 1; }

echo "==> the chart on a real control plane (Kubernetes $("$K8S_BIN_DIR/kube-apiserver" --version | awk '{print $2}'))"
K8S_BIN_DIR="$K8S_BIN_DIR" KWOK_STAGES="$(dirname "$K8S_BIN_DIR")/kwok-stages" HELM="$HELM" \
  "$VENV/bin/python" -m pytest -v -p no:cacheprovider helm/ci/test_cluster.py
