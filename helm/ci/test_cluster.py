"""The chart on a real Kubernetes control plane (helm/ci/controlplane.py).

Run by scripts/test-k8s.sh, which builds the control plane once and points
K8S_BIN_DIR, KWOK_STAGES and HELM at it. Every check reads the objects back
from the API server (never the rendered YAML): what the controllers and the
scheduler made of the chart, what the API server defaulted, refused or
deleted.

The tests run in file order, on one release: install, upgrade, rollback,
refusals, uninstall.
"""

import os
import threading
import time
from pathlib import Path
import subprocess

import pytest

from controlplane import ControlPlane

CHART = Path(__file__).resolve().parent.parent / "ringcache"
HELM = os.environ.get("HELM", "helm")
IMAGE = "registry.example.com/ringcache"
NS = "rc"
COMPONENT = "app.kubernetes.io/component"


@pytest.fixture(scope="module")
def k8s():
    cp = ControlPlane(os.environ["K8S_BIN_DIR"], os.environ["KWOK_STAGES"]).start()
    yield cp
    cp.stop()


def helm(k8s, *args, check=True):
    out = subprocess.run([HELM, *map(str, args)], capture_output=True, text=True, env=k8s.env())
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))}:\n{out.stdout}\n{out.stderr}")
    return out


def ready(obj):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def pods(k8s, component, ns=NS):
    return k8s.get("pods", "-n", ns, "-l", f"{COMPONENT}={component}")["items"]


def container(workload):
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def arg(c, flag):
    return next(a.split("=", 1)[1] for a in c["args"] if a.startswith(flag + "="))


def wait_for(ok, what, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout}s")


def check_running(k8s, ns, nodes, orchestrators, memory):
    """Both workloads as the chart asks, every pod Running and Ready, on the
    nodes the scheduler picked. (`helm --wait` returns once a Deployment is
    within its maxUnavailable of ready: wait for all of them.)"""
    wait_for(
        lambda: k8s.get("deployment", "-n", ns, "-l", f"{COMPONENT}=orchestrator")["items"][0]["status"].get(
            "readyReplicas"
        )
        == orchestrators
        and k8s.get("statefulset", "-n", ns, "-l", f"{COMPONENT}=cache-node")["items"][0]["status"].get("readyReplicas")
        == nodes,
        f"{orchestrators} orchestrators and {nodes} nodes ready in {ns}",
        timeout=60,
    )
    sts = k8s.get("statefulset", "-n", ns, "-l", f"{COMPONENT}=cache-node")["items"][0]
    assert sts["spec"]["replicas"] == nodes
    assert sts["status"].get("readyReplicas") == nodes, sts["status"]
    assert container(sts)["image"].startswith(IMAGE + ":")
    assert container(sts)["resources"]["limits"]["memory"] == memory
    dep = k8s.get("deployment", "-n", ns, "-l", f"{COMPONENT}=orchestrator")["items"][0]
    assert dep["status"].get("readyReplicas") == orchestrators, dep["status"]
    for component, n in [("cache-node", nodes), ("orchestrator", orchestrators)]:
        ps = [p for p in pods(k8s, component, ns) if not p["metadata"].get("deletionTimestamp")]
        assert len(ps) == n, (component, [p["metadata"]["name"] for p in ps])
        for p in ps:
            assert p["status"]["phase"] == "Running" and ready(p), (p["metadata"]["name"], p["status"])
        # The hard spread: one pod of a workload per node.
        hosts = [p["spec"]["nodeName"] for p in ps]
        assert len(set(hosts)) == len(hosts), (component, hosts)
    return sts, dep


def test_install_with_defaults_makes_every_pod_ready(k8s):
    # Without an image the chart refuses, before anything reaches the API.
    refused = helm(k8s, "install", "rc", CHART, "-n", NS, "--create-namespace", check=False)
    assert refused.returncode != 0 and "image.repository is not set" in refused.stderr
    assert NS not in [n["metadata"]["name"] for n in k8s.get("namespaces")["items"]]

    helm(k8s, "install", "rc", CHART, "-n", NS, "--create-namespace", "--set", f"image.repository={IMAGE}",
         "--wait", "--timeout", "3m")
    sts, dep = check_running(k8s, NS, nodes=3, orchestrators=2, memory="1Gi")

    # What the API server defaulted and the controllers made of it.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["minReadySeconds"] == 30
    # Defaulted by the API server, not set by the chart.
    assert sts["spec"]["revisionHistoryLimit"] == 10
    assert sts["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst"
    assert arg(container(dep), "--max-connection-age") == "5m"
    assert container(sts)["securityContext"]["readOnlyRootFilesystem"] is True
    # The Service has a cluster IP and endpoints for both orchestrators;
    # the nodes' headless Service lists the three nodes (what --nodes-dns
    # resolves).
    svc = k8s.get("service", "-n", NS, "-l", f"{COMPONENT}=orchestrator")["items"][0]
    assert svc["spec"]["clusterIP"] not in ("", "None")
    for component, n in [("orchestrator", 2), ("cache-node", 3)]:
        service = k8s.get("service", "-n", NS, "-l", f"{COMPONENT}={component}")["items"][0]["metadata"]["name"]
        wait_for(
            lambda: sum(
                1
                for s in k8s.get("endpointslices", "-n", NS, "-l", f"kubernetes.io/service-name={service}")["items"]
                for e in s.get("endpoints") or []
                if e["conditions"].get("ready")
            )
            == n,
            f"{n} ready endpoints of {service}",
        )
    # The disruption controller tracks both budgets.
    for pdb in k8s.get("pdb", "-n", NS)["items"]:
        wait_for(lambda: k8s.get("pdb", "-n", NS, pdb["metadata"]["name"])["status"].get("currentHealthy", 0)
                 == k8s.get("pdb", "-n", NS, pdb["metadata"]["name"])["status"].get("expectedPods", -1),
                 f"{pdb['metadata']['name']} healthy")


def test_install_of_the_ha_values(k8s):
    ns = "rc-ha"
    # Unmodified: values-ha.yaml turns on a ServiceMonitor, a
    # prometheus-operator kind this control plane does not have, so the
    # chart must skip it by itself.
    helm(k8s, "install", "ha", CHART, "-n", ns, "--create-namespace", "-f", CHART / "values-ha.yaml",
         "--set", f"image.repository={IMAGE}", "--wait", "--timeout", "3m")
    try:
        status = helm(k8s, "status", "ha", "-n", ns).stdout
        assert "no ServiceMonitor was created" in status, status
        check_running(k8s, ns, nodes=6, orchestrators=3, memory="4Gi")
        (hpa,) = k8s.get("hpa", "-n", ns)["items"]
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
        budgets = {p["spec"].get("minAvailable") or p["spec"].get("maxUnavailable") for p in k8s.get("pdb", "-n", ns)["items"]}
        assert budgets == {1, 2}, budgets
    finally:
        helm(k8s, "uninstall", "ha", "-n", ns, "--wait")


def test_upgrade_rolls_the_nodes_one_at_a_time(k8s):
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(k8s, "cache-node")}
    # Watch the roll: never more than one of the existing nodes down
    # (updateStrategy + minReadySeconds), as the budget allows.
    worst = {"unready": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            ps = [p for p in pods(k8s, "cache-node") if p["metadata"]["name"] in before]
            down = len(before) - sum(1 for p in ps if ready(p) and not p["metadata"].get("deletionTimestamp"))
            worst["unready"] = max(worst["unready"], down)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        helm(k8s, "upgrade", "rc", CHART, "-n", NS, "--reuse-values",
             "--set", "cacheNode.replicas=4", "--set", "cacheNode.memory=2Gi",
             "--set", "cacheNode.minReadySeconds=4", "--set", "orchestrator.replicas=3",
             "--wait", "--timeout", "4m")
    finally:
        stop.set()
        watcher.join()
    sts, _ = check_running(k8s, NS, nodes=4, orchestrators=3, memory="2Gi")
    assert int(arg(container(sts), "--capacity")) == 1536 << 20  # 75% of 2Gi
    # Every pod replaced and on the new revision.
    wait_for(lambda: k8s.get("statefulset", "-n", NS, sts["metadata"]["name"])["status"].get("updatedReplicas") == 4,
             "4 updated node pods")
    sts = k8s.get("statefulset", "-n", NS, sts["metadata"]["name"])
    now = pods(k8s, "cache-node")
    assert all(p["metadata"]["labels"]["controller-revision-hash"] == sts["status"]["updateRevision"] for p in now)
    assert not set(before.values()) & {p["metadata"]["uid"] for p in now}
    assert worst["unready"] <= 1, f"{worst['unready']} nodes were down at once during the roll"
    # The replaced pods were started minReadySeconds apart, highest ordinal
    # first (creation times have one-second resolution).
    created = sorted(
        (p["metadata"]["creationTimestamp"], p["metadata"]["name"]) for p in now if p["metadata"]["name"] in before
    )
    assert [n for _, n in created] == sorted(before, reverse=True), created
    stamps = [time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) for t, _ in created]
    assert all(b - a >= 3 for a, b in zip(stamps, stamps[1:])), created


def test_the_disruption_budget_refuses_a_second_eviction(k8s):
    # What a node drain does: evict through the API. maxUnavailable 1: the
    # first eviction goes, the second is refused while the first pod is
    # not back.
    names = sorted(p["metadata"]["name"] for p in pods(k8s, "cache-node"))

    def evict(name):
        return k8s.kubectl("create", "--raw", f"/api/v1/namespaces/{NS}/pods/{name}/eviction", "-f", "-", check=False,
                           input='{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"%s","namespace":"%s"}}' % (name, NS))

    first = evict(names[0])
    assert first.returncode == 0, first.stderr
    second = evict(names[1])
    assert second.returncode != 0 and "disruption budget" in second.stderr, second.stderr
    # The StatefulSet brings the evicted pod back.
    wait_for(lambda: sum(1 for p in pods(k8s, "cache-node") if ready(p)) == 4, "the evicted node back")


def test_rollback_restores_the_first_revision(k8s):
    helm(k8s, "rollback", "rc", "1", "-n", NS, "--wait", "--timeout", "4m")
    wait_for(lambda: len(pods(k8s, "cache-node")) == 3 and len(pods(k8s, "orchestrator")) == 2, "the old sizes")
    sts, _ = check_running(k8s, NS, nodes=3, orchestrators=2, memory="1Gi")
    assert sts["spec"]["minReadySeconds"] == 30
    history = helm(k8s, "history", "rc", "-n", NS, "-o", "json").stdout
    assert '"revision":3' in history and "Rollback to 1" in history


def server_dry_run(k8s, *sets):
    """The release's manifests with `sets` changed, applied with
    `kubectl apply --dry-run=server`: the API server validates, defaults
    and admits them against the live objects, and stores nothing. (`helm
    upgrade --dry-run=server` does not send the objects to the server.)"""
    values = helm(k8s, "get", "values", "rc", "-n", NS, "-o", "yaml").stdout
    # The control plane's version (install-k8s.sh): a helm built without
    # release flags assumes Kubernetes 1.20, below the chart's kubeVersion.
    args = ["template", "rc", CHART, "-n", NS, "--kube-version", "1.34.2", "-f", "-"]
    for s in sets:
        args += ["--set", s]
    rendered = subprocess.run([HELM, *map(str, args)], input=values, capture_output=True, text=True, env=k8s.env())
    assert rendered.returncode == 0, rendered.stderr
    return k8s.kubectl("apply", "--dry-run=server", "-n", NS, "-f", "-", check=False, input=rendered.stdout)


def test_changes_the_api_server_must_refuse_are_refused(k8s):
    sts_before = k8s.get("statefulset", "-n", NS, "-l", f"{COMPONENT}=cache-node")["items"][0]
    dep_before = k8s.get("deployment", "-n", NS, "-l", f"{COMPONENT}=orchestrator")["items"][0]
    # The current values pass.
    ok = server_dry_run(k8s)
    assert ok.returncode == 0, ok.stderr
    # A new nameOverride with the objects' names pinned changes the
    # StatefulSet's and the Deployment's selectors, which are immutable:
    # valid YAML, valid schema, refused only by the API server.
    renamed = server_dry_run(k8s, "nameOverride=renamed", "fullnameOverride=rc-ringcache")
    assert renamed.returncode != 0
    assert "field is immutable" in renamed.stderr or "Forbidden" in renamed.stderr, renamed.stderr
    # A memory request above the limit: an invalid pod template.
    over = server_dry_run(k8s, "orchestrator.resources.requests.memory=1Gi")
    assert over.returncode != 0 and "must be less than or equal to memory limit" in over.stderr, over.stderr
    # And through helm for real: the upgrade fails and the objects are as
    # they were.
    failed = helm(k8s, "upgrade", "rc", CHART, "-n", NS, "--reuse-values",
                  "--set", "orchestrator.resources.requests.memory=1Gi", check=False)
    assert failed.returncode != 0 and "must be less than or equal to memory limit" in failed.stderr, failed.stderr
    sts_after = k8s.get("statefulset", "-n", NS, "-l", f"{COMPONENT}=cache-node")["items"][0]
    dep_after = k8s.get("deployment", "-n", NS, "-l", f"{COMPONENT}=orchestrator")["items"][0]
    assert sts_after["spec"] == sts_before["spec"]
    assert dep_after["spec"] == dep_before["spec"]
    assert container(dep_after)["resources"]["requests"]["memory"] == "128Mi"


def test_uninstall_leaves_nothing_behind(k8s):
    helm(k8s, "uninstall", "rc", "-n", NS, "--wait", "--timeout", "2m")
    kinds = k8s.kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").stdout.split()
    kinds = [k for k in kinds if k not in ("events", "events.events.k8s.io")]
    wait_for(lambda: not k8s.get(",".join(kinds), "-n", NS, "-l", "app.kubernetes.io/instance=rc")["items"],
             "no object of the release left", timeout=60)
    assert helm(k8s, "list", "-n", NS, "-a", "-q").stdout.strip() == ""
