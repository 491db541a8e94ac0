"""The chart's pods really running: a real kubelet with containerd and runc
(helm/ci/realnode.py) beside the control plane, the image built by
scripts/build-image.sh, CoreDNS as the cluster DNS, kube-proxy for the
Services. Run by scripts/test-kubelet.sh (root).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from controlplane import ControlPlane
from realnode import GRPCURL_IMAGE, NODE_NAME, RINGCACHE_IMAGE, RealNode
from test_cluster import helm, pods, ready, wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ringcache"
NS = "rc"


@pytest.fixture(scope="module")
def k8s():
    # No simulated nodes: every pod lands on the real one.
    cp = ControlPlane(os.environ["K8S_BIN_DIR"], os.environ["KWOK_STAGES"], nodes=0).start()
    node = None
    try:
        node = RealNode(cp, os.environ["K8S_BIN_DIR"], os.environ["NODE_IMAGES"], REPO).start()
        cp.node = node
        yield cp
    finally:
        if node:
            node.stop()
        cp.stop()


def test_the_charts_pods_run_pass_their_probes_and_helm_test(k8s):
    repo, tag = RINGCACHE_IMAGE.rsplit(":", 1)
    test_repo, test_tag = GRPCURL_IMAGE.rsplit(":", 1)
    helm(k8s, "install", "rc", CHART, "-n", NS, "--create-namespace",
         "--set", f"image.repository={repo}", "--set-string", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
         "--set", f"tests.image.repository={test_repo}", "--set-string", f"tests.image.tag={test_tag}",
         "--set", "cacheNode.replicas=1", "--set", "orchestrator.replicas=1", "--set", "cacheNode.memory=256Mi",
         "--wait", "--timeout", "3m")
    # Ready means the kubelet's gRPC probes passed: the node's Cache service
    # SERVING, and the orchestrator's — which it reports only once it found
    # the node through the headless Service's DNS name (CoreDNS).
    for component in ("cache-node", "orchestrator"):
        (pod,) = pods(k8s, component)
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert pod["status"]["phase"] == "Running" and ready(pod), pod["status"]
        (status,) = pod["status"]["containerStatuses"]
        assert status["restartCount"] == 0 and status["image"].endswith(RINGCACHE_IMAGE.split("/", 1)[1])

    # helm test: the chart's grpcurl pod, a Set and a Get through the
    # orchestrator Service (ClusterIP, by kube-proxy).
    out = helm(k8s, "test", "rc", "-n", NS, "--timeout", "2m")
    assert "Phase:          Succeeded" in out.stdout, out.stdout

    # From outside the cluster, straight to the orchestrator pod.
    (orch,) = pods(k8s, "orchestrator")
    grpcurl = Path(os.environ["GRPCURL"])
    addr = f"{orch['status']['podIP']}:50051"
    subprocess.run([grpcurl, "-plaintext", "-d", '{"key":"real-node","value":"aGVsbG8="}', addr, "ringcache.v1.Cache/Set"],
                   check=True, capture_output=True)
    got = subprocess.run([grpcurl, "-plaintext", "-d", '{"key":"real-node"}', addr, "ringcache.v1.Cache/Get"],
                         check=True, capture_output=True, text=True).stdout
    assert json.loads(got)["value"] == "aGVsbG8="

    # Uninstall: the pods go, their containers stop (SIGTERM, drain).
    helm(k8s, "uninstall", "rc", "-n", NS, "--wait", "--timeout", "2m")
    wait_for(lambda: not pods(k8s, "cache-node") and not pods(k8s, "orchestrator"), "the pods gone", timeout=90)
    wait_for(lambda: not k8s.node.running_tasks(), "no container left running", timeout=60)
