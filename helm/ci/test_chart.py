"""Wiring tests of the rendered chart: the pieces that must agree do.

Run by scripts/check-helm.sh (HELM points at the real helm binary):

    HELM=~/.cache/ringcache/tools/bin/helm python -m pytest helm/ci/test_chart.py
"""

import os
import re
import json
import subprocess
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "ringcache"
ALL_ON = Path(__file__).resolve().parent / "all-on.yaml"
HA = CHART / "values-ha.yaml"
HELM = os.environ.get("HELM", "helm")
KUBE_VERSION = "1.31.0"


# No image is published: every render names one, as a user must.
IMAGE = "registry.example.com/ringcache"


# The prometheus-operator kind a cluster with the operator serves.
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"


def render(*values, sets=(), namespace="cache", image=IMAGE, api_versions=()):
    """The chart's manifests, rendered by real helm, as a list of dicts."""
    cmd = [HELM, "template", "rc", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for api in api_versions:
        cmd += ["--api-versions", api]
    if image is not None:
        cmd += ["--set", f"image.repository={image}"]
    for v in values:
        cmd += ["-f", str(v)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class RenderError(Exception):
    pass


def one(docs, kind, component=None):
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]
    assert len(found) == 1, f"expected one {kind} {component}, found {len(found)}"
    return found[0]


def container(workload):
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def arg(c, flag):
    for a in c["args"]:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {c['args']}")


def env(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def seconds(duration):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert m, duration
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def quantity(q):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|K|M|G|T)?", str(q))
    assert m, q
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(m.group(1)) * mult[m.group(2)]


VALUE_SETS = {"default": (), "all-on": (ALL_ON,), "ha": (HA,)}


@pytest.fixture(params=list(VALUE_SETS), scope="module")
def docs(request):
    return render(*VALUE_SETS[request.param])


def test_discovery_name_and_port_match_the_headless_service_and_node_port(docs):
    nodes = one(docs, "StatefulSet", "cache-node")
    headless = one(docs, "Service", "cache-node")
    orch = one(docs, "Deployment", "orchestrator")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert nodes["spec"]["serviceName"] == headless["metadata"]["name"]
    assert nodes["spec"]["podManagementPolicy"] == "Parallel"
    host, port = arg(container(orch), "--nodes-dns").rsplit(":", 1)
    assert host == f"{headless['metadata']['name']}.cache.svc"
    node_ports = {p["name"]: p["containerPort"] for p in container(nodes)["ports"]}
    assert int(port) == node_ports["grpc"]
    assert int(arg(container(nodes), "--listen").rsplit(":", 1)[1]) == node_ports["grpc"]
    svc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert svc_port["port"] == node_ports["grpc"] and svc_port["targetPort"] == "grpc"
    # The headless Service selects exactly the node pods.
    labels = nodes["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in headless["spec"]["selector"].items())


def test_node_identity_is_the_pod_name(docs):
    c = container(one(docs, "StatefulSet", "cache-node"))
    assert arg(c, "--node-id") == "$(POD_NAME)"
    pod_name = next(e for e in c["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_probe_ports_match_container_ports(docs):
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        c = container(one(docs, kind, component))
        ports = {p["containerPort"] for p in c["ports"]}
        listen = int(arg(c, "--listen").rsplit(":", 1)[1])
        metrics = int(arg(c, "--metrics-listen").rsplit(":", 1)[1])
        # With TLS, kubelet gRPC probes (which cannot speak TLS) use the
        # plaintext health-only probe port.
        probe_listen = [a for a in c["args"] if a.startswith("--probe-listen=")]
        probe_port = int(probe_listen[0].rsplit(":", 1)[1]) if probe_listen else listen
        assert {listen, metrics, probe_port} == ports
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"]:
            assert c[probe]["grpc"]["port"] == probe_port, (component, probe)
        # Readiness follows the named service that turns NOT_SERVING on drain.
        assert c["readinessProbe"]["grpc"]["service"] == "ringcache.v1.Cache"
        assert "service" not in c["livenessProbe"]["grpc"]


def test_grace_period_outlasts_the_drain(docs):
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        w = one(docs, kind, component)
        c = container(w)
        grace = seconds(arg(c, "--shutdown-grace"))
        before_close = seconds(arg(c, "--drain-delay"))
        if component == "cache-node":
            # A stopping node hands its entries over alongside the drain.
            before_close = max(before_close, seconds(arg(c, "--park-wait")) + grace)
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > before_close + grace, component


def test_capacity_fits_the_memory_limit(docs):
    c = container(one(docs, "StatefulSet", "cache-node"))
    capacity = int(arg(c, "--capacity"))
    limit = quantity(c["resources"]["limits"]["memory"])
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
    assert 0 < capacity <= limit * 0.8, (capacity, limit)


def test_in_flight_bytes_fit_beside_the_data_in_the_memory_limit(docs):
    nodes = container(one(docs, "StatefulSet", "cache-node"))
    limit = quantity(nodes["resources"]["limits"]["memory"])
    capacity = int(arg(nodes, "--capacity"))
    budget = int(arg(nodes, "--max-in-flight-bytes"))
    records = int(arg(nodes, "--change-log-bytes")) + int(arg(nodes, "--debt-bytes"))
    # Overload is refused before it can take the pod past its limit, and one
    # maximal message (4 MiB with the default limits) still fits beside the
    # data, the change log and the debt records.
    assert 4 << 20 <= budget and capacity + records + budget < limit, (
        capacity,
        records,
        budget,
        limit,
    )
    # The binary's defaults at the chart's default memory; less when small.
    assert records == (32 << 20) + (16 << 20), records
    orch = container(one(docs, "Deployment", "orchestrator"))
    o_limit = quantity(orch["resources"]["limits"]["memory"])
    o_budget = int(arg(orch, "--max-in-flight-bytes"))
    assert 4 << 20 <= o_budget < o_limit, (o_budget, o_limit)


def test_a_rolling_update_waits_for_warm_handoff(docs):
    nodes = one(docs, "StatefulSet", "cache-node")
    assert nodes["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert nodes["spec"]["minReadySeconds"] >= 10


def test_without_an_image_the_chart_refuses_and_says_how_to_build_one():
    with pytest.raises(RenderError, match="image.repository is not set") as refused:
        render(image=None)
    assert "scripts/build-image.sh" in str(refused.value)
    assert "--set image.repository=" in str(refused.value)
    docs = render(sets=["image.tag=1.2.3"])
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        assert container(one(docs, kind, component))["image"] == f"{IMAGE}:1.2.3"
        assert container(one(render(), kind, component))["image"] == f"{IMAGE}:{app_version}"


def test_orchestrators_close_connections_after_a_maximum_age(docs):
    # Clients behind the ClusterIP Service reconnect, and so reach pods the
    # autoscaler added.
    orch = one(docs, "Deployment", "orchestrator")
    age = seconds(arg(container(orch), "--max-connection-age"))
    # Long enough that reconnects cost nothing, short enough that added
    # pods get traffic within minutes.
    assert 60 <= age <= 1800, age
    off = one(render(sets=["orchestrator.maxConnectionAge=0s"]), "Deployment", "orchestrator")
    assert arg(container(off), "--max-connection-age") == "0s"


def test_an_inconsistent_capacity_is_refused_at_template_time():
    with pytest.raises(RenderError, match="exceeds 80% of cacheNode.memory"):
        render(sets=["cacheNode.capacity=1000Mi", "cacheNode.memory=1Gi"])
    with pytest.raises(RenderError, match="cannot hold the largest entry"):
        render(sets=["cacheNode.memory=64Mi", "cacheNode.shards=64"])
    with pytest.raises(RenderError, match="schema"):
        render(sets=["cacheNode.memory=lots"])


def test_request_limits_take_quantities_like_memory():
    docs = render(sets=["limits.maxValueBytes=2Mi", "limits.maxKeyBytes=2Ki"])
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        e = env(container(one(docs, kind, component)))
        assert e["RINGCACHE_MAX_VALUE_BYTES"] == str(2 << 20)
        assert e["RINGCACHE_MAX_KEY_BYTES"] == str(2 << 10)
    plain = render(sets=["limits.maxValueBytes=65536"])
    assert env(container(one(plain, "StatefulSet", "cache-node")))["RINGCACHE_MAX_VALUE_BYTES"] == "65536"
    with pytest.raises(RenderError, match="schema"):
        render(sets=["limits.maxValueBytes=lots"])


def test_otlp_settings_reach_both_workloads():
    for docs, endpoint in [
        (render(ALL_ON), "http://rc-ringcache-jaeger:4318"),
        (render(sets=["tracing.otlpEndpoint=http://collector:4317"]), "http://collector:4317"),
    ]:
        for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
            e = env(container(one(docs, kind, component)))
            assert e["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint, component
            assert e["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
            assert "service.instance.id=$(POD_NAME)" in e["OTEL_RESOURCE_ATTRIBUTES"]
    # The demo Jaeger listens where the workloads send.
    docs = render(ALL_ON)
    jaeger = one(docs, "Service", "jaeger")
    assert {p["port"] for p in jaeger["spec"]["ports"]} >= {4317, 4318}
    # No endpoint, no exporter.
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env(container(one(render(), kind, component)))


def test_every_container_runs_restricted(docs):
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec") or (d["spec"] if d["kind"] == "Pod" else None)
        if spec is None:
            continue
        assert spec["automountServiceAccountToken"] is False, d["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert "memory" in c["resources"]["limits"], c["name"]
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


def test_network_policy_admits_only_orchestrators_to_node_grpc(docs):
    policy = one(docs, "NetworkPolicy", "cache-node")
    nodes = one(docs, "StatefulSet", "cache-node")
    orch = one(docs, "Deployment", "orchestrator")
    node_labels = nodes["spec"]["template"]["metadata"]["labels"]
    orch_labels = orch["spec"]["template"]["metadata"]["labels"]
    assert all(node_labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    grpc_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
    assert len(grpc_rules) == 1
    (peer,) = grpc_rules[0]["from"]
    selector = peer["podSelector"]["matchLabels"]
    assert all(orch_labels.get(k) == v for k, v in selector.items())
    assert not all(node_labels.get(k) == v for k, v in selector.items()), "nodes must not admit each other"
    # The orchestrators' own policy opens only their gRPC and metrics ports.
    orch_policy = one(docs, "NetworkPolicy", "orchestrator")
    ports = {p["port"] for rule in orch_policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {"grpc", "metrics"}


def test_only_orchestrators_autoscale():
    docs = render(ALL_ON)
    hpa = one(docs, "HorizontalPodAutoscaler")
    orch = one(docs, "Deployment", "orchestrator")
    assert hpa["spec"]["scaleTargetRef"]["name"] == orch["metadata"]["name"]
    assert "replicas" not in orch["spec"], "the HPA owns the replica count"
    assert not [d for d in render() if d["kind"] == "HorizontalPodAutoscaler"]


def test_service_monitors_render_only_where_the_operator_is_installed():
    # values-ha.yaml turns them on; a cluster without prometheus-operator
    # must still take the chart as shipped.
    ha = CHART / "values-ha.yaml"
    assert not [d for d in render(ha) if d["kind"] == "ServiceMonitor"]
    assert len([d for d in render(ha, api_versions=[SERVICE_MONITOR_API]) if d["kind"] == "ServiceMonitor"]) == 2
    # Off stays off, operator or not.
    assert not [d for d in render(api_versions=[SERVICE_MONITOR_API]) if d["kind"] == "ServiceMonitor"]
    # (The install notes that say the monitor was skipped are checked on a
    # real control plane: test_cluster.py, test_install_of_the_ha_values.)


PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"


def test_the_alerts_render_only_where_the_operator_is_installed_with_the_thresholds_in_values():
    assert not [d for d in render(ALL_ON) if d["kind"] == "PrometheusRule"]
    assert not [d for d in render(api_versions=[PROMETHEUS_RULE_API]) if d["kind"] == "PrometheusRule"]
    rule = one(render(ALL_ON, api_versions=[PROMETHEUS_RULE_API]), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus", "the operator's ruleSelector label"
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {
        "RingcacheNoRoutableNode",
        "RingcacheNodeEjected",
        "RingcacheWarmingStuck",
        "RingcacheRingEpochsDiffer",
        "RingcacheShedding",
        "RingcacheStoreFull",
        "RingcacheHitRatioDrop",
        "RingcacheTLSHandshakeFailures",
    }
    # all-on.yaml's thresholds, not the defaults.
    assert rules["RingcacheNodeEjected"]["for"] == "5m"
    assert "> 0.05" in rules["RingcacheShedding"]["expr"]
    for name, r in rules.items():
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
        # Scoped to the release's namespace: another release's series never
        # fire this one's alerts.
        assert 'namespace="cache"' in r["expr"], name
    # (promtool checks the rules and unit-tests each alert: check-helm.sh.)


def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar():
    assert not [d for d in render() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    cm = next(d for d in render(ALL_ON) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "ringcache"
    dashboard = json.loads(cm["data"]["ringcache.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "ringcache.json").read_text()), "the file, as kept"
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in [
        "Calls per second by method", "Errors by code", "Latency by method (p50, p99)", "Hit ratio",
        "Evictions against overwrites, expirations and deletes", "Memory against capacity", "Node states",
        "Ring epochs heard by each node", "Warm handoff", "Hot keys and relief", "Shed calls",
        "Node-call batch sizes (ops per call)", "TLS handshake failures",
    ]:
        assert wanted in titles, wanted
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert 'namespace="$namespace"' in target["expr"], (panel["title"], target["expr"])
    # (Every metric it reads is exported by the binaries:
    # integration-tests/tests/alerts.rs.)


def test_scrape_annotations_and_service_monitors_point_at_metrics_ports():
    docs = render(ALL_ON, api_versions=[SERVICE_MONITOR_API])
    for kind, component in [("StatefulSet", "cache-node"), ("Deployment", "orchestrator")]:
        w = one(docs, kind, component)
        ann = w["spec"]["template"]["metadata"]["annotations"]
        metrics = next(p["containerPort"] for p in container(w)["ports"] if p["name"] == "metrics")
        assert ann["prometheus.io/port"] == str(metrics)
        monitor = one(docs, "ServiceMonitor", component)
        service = one(docs, "Service", component)
        assert any(p["name"] == "metrics" for p in service["spec"]["ports"])
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())


def test_helm_test_round_trips_through_the_orchestrator_service(docs):
    pod = one(docs, "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = one(docs, "Service", "orchestrator")
    script = pod["spec"]["containers"][0]["args"][0]
    assert f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" in script
    assert "Cache/Set" in script and "Cache/Get" in script


def mounted_secret(workload, path):
    spec = workload["spec"]["template"]["spec"]
    c = container(workload)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"]


def test_tls_wires_certificates_names_and_mutual_tls_together():
    docs = render(ALL_ON)
    node = one(docs, "StatefulSet", "cache-node")
    orch = one(docs, "Deployment", "orchestrator")
    nc, oc = container(node), container(orch)
    certs = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Certificate"}
    # Each workload mounts the Secret its Certificate writes.
    assert mounted_secret(node, "/etc/ringcache/tls") == certs["cache-node"]["spec"]["secretName"]
    assert mounted_secret(orch, "/etc/ringcache/tls") == certs["orchestrator"]["spec"]["secretName"]
    # Orchestrators check the name node certificates carry.
    assert arg(oc, "--node-tls-server-name") in certs["cache-node"]["spec"]["dnsNames"]
    # Both from the configured issuer; the orchestrators' also for client auth.
    for c in certs.values():
        assert c["spec"]["issuerRef"]["name"] == "ringcache-ca"
    assert "client auth" in certs["orchestrator"]["spec"]["usages"]
    # Mutual TLS: nodes require client certificates, orchestrators present one.
    assert arg(nc, "--tls-client-ca") == "/etc/ringcache/tls/ca.crt"
    assert arg(oc, "--node-tls-cert") == arg(oc, "--tls-cert")
    # The Service the clients use is a name in the orchestrators' certificate.
    service = one(docs, "Service", "orchestrator")["metadata"]["name"]
    assert service in certs["orchestrator"]["spec"]["dnsNames"]


def test_tokens_come_from_the_secret_and_helm_test_uses_tls_and_a_token():
    docs = render(ALL_ON)
    orch = one(docs, "Deployment", "orchestrator")
    oc = container(orch)
    assert mounted_secret(orch, "/etc/ringcache/auth") == "ringcache-tokens"
    assert arg(oc, "--auth-tokens") == "/etc/ringcache/auth/tokens"
    pod = one(docs, "Pod", "test")
    c = pod["spec"]["containers"][0]
    script = c["args"][0]
    assert "-cacert /etc/ringcache/tls/ca.crt" in script and "-plaintext" not in script
    assert "authorization: Bearer $(cat /etc/ringcache/auth/token)" in script
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "token")
    assert token["secret"]["secretName"] == "ringcache-tokens"
    assert token["secret"]["items"] == [{"key": "test-token", "path": "token"}]


def test_tls_without_a_certificate_source_is_refused():
    with pytest.raises(RenderError, match="tls.enabled needs certificates"):
        render(sets=["tls.enabled=true"])
    with pytest.raises(RenderError, match="issuerRef.name"):
        render(sets=["tls.enabled=true", "tls.certManager.enabled=true"])
    # Existing Secrets need no cert-manager.
    docs = render(sets=["tls.enabled=true", "tls.orchestrator.existingSecret=o", "tls.cacheNode.existingSecret=n"])
    assert not [d for d in docs if d["kind"] == "Certificate"]
    assert mounted_secret(one(docs, "StatefulSet", "cache-node"), "/etc/ringcache/tls") == "n"


def test_an_umbrella_chart_may_pass_global_values():
    render(sets=("global.imageRegistry=registry.example.com", "global.storageClass=fast"))


def test_openshift_may_drop_the_fixed_user_and_group(docs):
    default = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    for w in default:
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 65532
        assert spec["containers"][0]["securityContext"]["runAsUser"] == 65532
    openshift = render(
        sets=(
            "securityContext.pod.runAsUser=null",
            "securityContext.pod.runAsGroup=null",
            "securityContext.pod.fsGroup=null",
            "securityContext.container.runAsUser=null",
            "securityContext.container.runAsGroup=null",
        )
    )
    workloads = [d for d in openshift if d["kind"] in ("StatefulSet", "Deployment")]
    assert workloads
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & pod.keys(), pod
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert not {"runAsUser", "runAsGroup"} & sc.keys(), sc
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False


def test_per_host_spread_honours_taints(docs):
    spread = [
        c
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
        for c in d["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    assert spread
    for c in spread:
        assert c["whenUnsatisfiable"] == "DoNotSchedule"
        assert c["nodeTaintsPolicy"] == "Honor", c


def test_orchestrator_resources_without_limits_still_render():
    docs = render(sets=("orchestrator.resources.limits=null",))
    orch = next(d for d in docs if d["kind"] == "Deployment")
    (c,) = orch["spec"]["template"]["spec"]["containers"]
    assert "limits" not in c["resources"]
    (budget,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--max-in-flight-bytes=")]
    # Half of the memory request (128Mi), at least one message (4 MiB).
    assert int(budget) == 64 << 20, budget
    docs = render(sets=("orchestrator.resources=null",))
    assert any(d["kind"] == "Deployment" for d in docs)


def test_the_chart_states_the_kubernetes_versions_it_supports():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.27.0-0"
    old = subprocess.run(
        [HELM, "template", "rc", str(CHART), "--kube-version", "1.26.0", "--set", f"image.repository={IMAGE}"],
        capture_output=True,
        text=True,
    )
    assert old.returncode != 0 and "kubeVersion" in old.stderr, old.stderr
