//! The chart's alerts (`helm/ringcache/templates/prometheusrule.yaml`)
//! and dashboard (`helm/ringcache/dashboards/ringcache.json`) read metrics
//! the real binaries export: every metric name in an alert expression or a
//! dashboard query is on a running orchestrator's or node's `/metrics` (a
//! TLS node for the handshake counter), with the labels they group by.
//! promtool checks the rules' logic (`helm/ci/alerts_test.yaml`); this
//! checks neither is written against misspelt names.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use integration_tests::{Process, TestCluster, binary, scrape, workspace_root};
use ringcache_proto::v1::{GetRequest, SetRequest};

/// The metric names the chart file at `path` uses.
fn metrics_in(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace_root().join(path)).unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(at) = ["ringcache_", "grpc_server_", "process_"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min()
        {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// Labelled families that have no series until something happens (a
/// refill copies, a miss reads through, a stopping node is parked):
/// checked against the names the binaries register instead.
const AFTER_ACTIVITY: [&str; 3] = [
    "ringcache_handoff_copies_total",
    "ringcache_handoff_reads_total",
    "ringcache_parked_entries_total",
];

/// Each series line's name and labels, from a scrape.
fn series(page: &str) -> Vec<(String, String)> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let name_end = l.find(['{', ' ']).unwrap_or(l.len());
            let labels = l[name_end..]
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
                .map_or("", |(labels, _)| labels);
            (l[..name_end].to_owned(), labels.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_read_is_exported() {
    let alerts = metrics_in("helm/ringcache/templates/prometheusrule.yaml");
    let dashboard = metrics_in("helm/ringcache/dashboards/ringcache.json");
    assert!(alerts.len() >= 10, "{alerts:?}");
    assert!(dashboard.len() >= 20, "{dashboard:?}");
    let names: BTreeSet<String> = alerts.union(&dashboard).cloned().collect();

    let cluster = TestCluster::start(1, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;
    cache
        .set(SetRequest {
            key: "k".into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    cache.get(GetRequest { key: "k".into() }).await.unwrap();
    // A node serving TLS exports the handshake counter.
    let dir = integration_tests::fresh_temp_dir("alerts-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let tls_node = Process::start(
        &binary("cache-node"),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
        &[],
    );

    let mut exported = Vec::new();
    exported.extend(series(&scrape(cluster.orchestrator.process.metrics).await));
    exported.extend(series(
        &scrape(cluster.nodes[0].as_ref().unwrap().process.metrics).await,
    ));
    exported.extend(series(&scrape(tls_node.metrics).await));
    let registered = |name: &str| {
        ["orchestrator/src/metrics.rs", "cache-node/src/metrics.rs"]
            .iter()
            .any(|f| {
                std::fs::read_to_string(workspace_root().join(f))
                    .unwrap()
                    .contains(&format!("\"{name}\""))
            })
    };
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.iter().any(|(name, _)| name == *n))
        .filter(|n| !(AFTER_ACTIVITY.contains(&n.as_str()) && registered(n)))
        .collect();
    assert!(
        missing.is_empty(),
        "alert expressions or dashboard queries read metrics no binary exports: {missing:?}"
    );
    // The labels the alerts group and filter by.
    let has_label = |metric: &str, label: &str| {
        exported
            .iter()
            .any(|(n, labels)| n == metric && labels.contains(&format!("{label}=\"")))
    };
    assert!(has_label("ringcache_node_healthy", "node"));
    assert!(has_label("grpc_server_handled_total", "grpc_code"));
    std::fs::remove_dir_all(dir).ok();
}
