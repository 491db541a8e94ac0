//! The chart's alerts (`helm/ringcache/templates/prometheusrule.yaml`)
//! read metrics the real binaries export: every metric name in an alert
//! expression is on a running orchestrator's or node's `/metrics` (a TLS
//! node for the handshake counter), with the labels the alerts group by.
//! promtool checks the rules' logic (`helm/ci/alerts_test.yaml`); this
//! checks they are not written against misspelt names.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use integration_tests::{Process, TestCluster, binary, scrape, workspace_root};
use ringcache_proto::v1::{GetRequest, SetRequest};

/// The metric names the alert expressions use.
fn alert_metrics() -> BTreeSet<String> {
    let template = std::fs::read_to_string(
        workspace_root().join("helm/ringcache/templates/prometheusrule.yaml"),
    )
    .unwrap();
    let mut names = BTreeSet::new();
    for line in template.lines() {
        let mut rest = line;
        while let Some(at) = rest
            .find("ringcache_")
            .or_else(|| rest.find("grpc_server_"))
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
async fn every_metric_the_alerts_read_is_exported() {
    let names = alert_metrics();
    assert!(names.len() >= 10, "{names:?}");

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
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.iter().any(|(name, _)| name == *n))
        .collect();
    assert!(
        missing.is_empty(),
        "alert expressions read metrics no binary exports: {missing:?}"
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
