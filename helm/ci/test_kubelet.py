"""The chart's pods really running: a real kubelet with containerd and runc
(helm/ci/realnode.py) beside the control plane, the image built by
scripts/build-image.sh, CoreDNS as the cluster DNS, kube-proxy for the
Services. Run by scripts/test-kubelet.sh (root).
"""

import base64
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


def test_a_helm_upgrade_that_rolls_every_node_keeps_the_keys(k8s):
    """The chart's defaults (one copy of each key, two orchestrators):
    keys written before an upgrade that restarts every cache node are all
    there after it, with their values — each stopping node hands its
    entries to the others, and gets them back when it returns. Only the
    sizes are made to fit one small machine."""
    repo, tag = RINGCACHE_IMAGE.rsplit(":", 1)
    common = ["--set", f"image.repository={repo}", "--set-string", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
              "--set", "cacheNode.replicas=2", "--set", "cacheNode.memory=256Mi", "--set", "cacheNode.cpu=100m",
              "--set", "orchestrator.resources.requests.cpu=100m", "--set", "cacheNode.minReadySeconds=5"]
    helm(k8s, "install", "up", CHART, "-n", NS, "--create-namespace", *common, "--wait", "--timeout", "3m")
    wait_for(lambda: len(pods(k8s, "orchestrator")) == 2 and all(ready(p) for p in pods(k8s, "orchestrator")),
             "both orchestrators ready")
    grpcurl = Path(os.environ["GRPCURL"])
    keys = [f"kept-{i}" for i in range(300)]
    value = {k: base64.b64encode(f"value of {k}".encode()).decode() for k in keys}

    def call(method, body):
        (orch, *_) = pods(k8s, "orchestrator")
        addr = f"{orch['status']['podIP']}:50051"
        out = subprocess.run([grpcurl, "-plaintext", "-d", json.dumps(body), addr, f"ringcache.v1.Cache/{method}"],
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    call("SetMany", {"entries": [{"key": k, "value": value[k]} for k in keys]})
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(k8s, "cache-node")}

    # Any change to the node's pod template rolls the StatefulSet: here
    # an annotation, as a new image or chart version would.
    helm(k8s, "upgrade", "up", CHART, "-n", NS, *common,
         "--set-string", "cacheNode.podAnnotations.rolled=yes", "--wait", "--timeout", "5m")
    wait_for(lambda: all(ready(p) for p in pods(k8s, "cache-node"))
             and {p["metadata"]["uid"] for p in pods(k8s, "cache-node")}.isdisjoint(before.values())
             and len(pods(k8s, "cache-node")) == 2,
             "every cache node restarted and ready", timeout=180)

    # The last node's keys come back once the orchestrators have found it
    # (by DNS, every dnsInterval) and brought it up to date: wait, as a
    # client would see it, until both report both nodes at their new
    # addresses healthy.
    def caught_up():
        now = {f"{p['status'].get('podIP')}:50061" for p in pods(k8s, "cache-node")}
        for orch in pods(k8s, "orchestrator"):
            out = subprocess.run([grpcurl, "-plaintext", f"{orch['status']['podIP']}:50051", "ringcache.v1.Cluster/ListNodes"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                return False
            nodes = json.loads(out.stdout).get("nodes", [])
            if {n["address"] for n in nodes if n.get("state") == "NODE_STATE_HEALTHY"} != now:
                return False
        return True

    wait_for(caught_up, "both orchestrators serving both restarted nodes", timeout=60)
    got = call("GetMany", {"keys": keys})["results"]
    found = {k: r.get("value") for k, r in zip(keys, got) if r.get("found")}
    if len(found) != len(keys):
        # What the pods said, to tell why (the kubelet writes their logs
        # on this host).
        for log in sorted(Path("/var/log/pods").glob(f"{NS}_up-ringcache-*/*/*.log")):
            print(f"== {log}")
            for line in log.read_text(errors="replace").splitlines():
                if "hot" not in line:
                    print(line[:400])
    assert len(found) == len(keys), f"{len(keys) - len(found)} of {len(keys)} keys lost by the upgrade"
    assert all(found[k] == value[k] for k in keys)

    helm(k8s, "uninstall", "up", "-n", NS, "--wait", "--timeout", "2m")
    wait_for(lambda: not pods(k8s, "cache-node") and not pods(k8s, "orchestrator"), "the pods gone", timeout=120)
