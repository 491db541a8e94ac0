//! Three real cache nodes and a real orchestrator, as separate processes.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use integration_tests::{NodeProcess, TestCluster, metric_value};
use ringcache_proto::v1::{
    DeleteRequest, GetManyRequest, GetRequest, ListNodesRequest, LocateRequest, NodeState,
    SetManyRequest, SetRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;

fn set(key: &str, value: &str) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

/// The address of `key`'s first owner, as the orchestrator locates it.
async fn first_owner(
    api: &mut ringcache_proto::v1::cluster_client::ClusterClient<tonic::transport::Channel>,
    key: &str,
) -> String {
    api.locate(LocateRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner()
        .owners[0]
        .address
        .clone()
}

#[tokio::test]
async fn keys_live_exactly_where_locate_says_and_spread_by_share() {
    let cluster = TestCluster::start(3, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let mut api = cluster.orchestrator.cluster().await;
    let n = 1500;
    let entries: Vec<SetRequest> = (0..n)
        .map(|i| set(&format!("user:{i}"), &format!("v{i}")))
        .collect();
    for chunk in entries.chunks(500) {
        let r = cache
            .set_many(SetManyRequest {
                entries: chunk.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.stored && r.error.is_none()));
    }

    let nodes = api
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 3);
    let index: HashMap<String, usize> = cluster
        .node_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), i))
        .collect();
    let mut direct = Vec::new();
    for i in 0..3 {
        direct.push(cluster.node_cache(i).await);
    }
    let mut per_node = [0usize; 3];
    for i in (0..n).step_by(5) {
        let key = format!("user:{i}");
        let located = api
            .locate(LocateRequest { key: key.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(located.owners.len(), 1);
        let owner = index[&located.owners[0].address];
        assert_eq!(
            located.read_from.unwrap().address,
            located.owners[0].address
        );
        // The value is on the owner and on no other node.
        for (j, client) in direct.iter_mut().enumerate() {
            let found = client
                .get(GetRequest { key: key.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(found.found, j == owner, "{key} on node {j} (owner {owner})");
            if found.found {
                assert_eq!(found.value, format!("v{i}").as_bytes());
            }
        }
    }
    // Every key counted once by asking the nodes how many items they hold.
    for (j, node) in cluster.nodes.iter().enumerate() {
        let stats = node
            .as_ref()
            .unwrap()
            .node()
            .await
            .stats(ringcache_proto::v1::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        per_node[j] = stats.total.unwrap().items as usize;
    }
    assert_eq!(per_node.iter().sum::<usize>(), n);
    let reported: f64 = nodes.iter().map(|n| n.key_share).sum();
    assert!((reported - 1.0).abs() < 1e-9, "shares add up to {reported}");
    for (j, &count) in per_node.iter().enumerate() {
        let share = count as f64 / n as f64;
        assert!(
            (0.28..0.39).contains(&share),
            "node {j} holds {share:.3} of the keys: {per_node:?}"
        );
        // ListNodes' share is measured on the ring: it matches the share
        // of the keys the node really holds.
        let listed = nodes
            .iter()
            .find(|n| index[&n.address] == j)
            .unwrap()
            .key_share;
        assert!(
            (listed - share).abs() < 0.04,
            "node {j}: ListNodes says {listed:.4}, it holds {share:.4}"
        );
    }
}

#[tokio::test]
async fn get_many_across_all_nodes_answers_every_key_in_order() {
    let cluster = TestCluster::start(3, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let entries: Vec<SetRequest> = (0..300)
        .map(|i| set(&format!("k{i}"), &format!("value-{i}")))
        .collect();
    cache.set_many(SetManyRequest { entries }).await.unwrap();
    // Reverse order, with missing keys interleaved.
    let keys: Vec<String> = (0..400).rev().map(|i| format!("k{i}")).collect();
    let got = cache
        .get_many(GetManyRequest { keys: keys.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.results.len(), keys.len());
    for (key, r) in keys.iter().zip(&got.results) {
        let i: usize = key[1..].parse().unwrap();
        assert!(r.error.is_none(), "{key}: {:?}", r.error);
        assert_eq!(r.found, i < 300, "{key}");
        if r.found {
            assert_eq!(r.value, format!("value-{i}").as_bytes());
        }
    }
    // Every node took part.
    let page = cluster.orchestrator.process.scrape().await;
    for addr in &cluster.node_addrs {
        let calls = metric_value(
            &page,
            "ringcache_node_calls_total",
            &[&format!("node=\"{addr}\""), "code=\"OK\""],
        );
        assert!(calls.unwrap_or(0.0) >= 1.0, "no call to {addr}:\n{page}");
    }
    // Deletes go through the router too.
    let del = cache
        .delete(DeleteRequest {
            key: "k1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(del.deleted);
    assert!(
        !cache
            .get(GetRequest { key: "k1".into() })
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// Gets and Sets running against the orchestrator in the background.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// Once set, calls and failures are counted.
    strict: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(
        mut cache: ringcache_proto::v1::cache_client::CacheClient<tonic::transport::Channel>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let strict = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, strict, calls, failures) = (
                stop.clone(),
                strict.clone(),
                calls.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("load:{}", i % 200);
                    let ok = if i.is_multiple_of(2) {
                        cache.get(GetRequest { key }).await.is_ok()
                    } else {
                        cache.set(set(&key, "x")).await.is_ok()
                    };
                    if strict.load(Ordering::Relaxed) {
                        calls.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Traffic {
            stop,
            strict,
            calls,
            failures,
            task,
        }
    }

    /// Stops the traffic; returns (calls, failures) counted while strict.
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.calls.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test]
async fn with_one_replica_a_dead_nodes_keys_miss_and_no_call_fails_once_it_is_ejected() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let entries: Vec<SetRequest> = (0..300).map(|i| set(&format!("k{i}"), "v")).collect();
    cache.set_many(SetManyRequest { entries }).await.unwrap();
    let mut api = cluster.orchestrator.cluster().await;
    let mut owner = HashMap::new();
    for i in 0..300 {
        let key = format!("k{i}");
        let address = first_owner(&mut api, &key).await;
        owner.insert(key, address);
    }

    let load = Traffic::start(cluster.orchestrator.cache().await);
    let dead = cluster.node_addrs[1].clone();
    cluster.kill_node(1);
    cluster.wait_node_state(1, NodeState::Ejected).await;
    // Readiness with some nodes down: still SERVING (their keys go to the
    // next node); only no node answering makes it NOT_SERVING.
    assert_eq!(
        integration_tests::health(
            &cluster.orchestrator.process.grpc_url(),
            "ringcache.v1.Cache"
        )
        .await
        .unwrap(),
        ServingStatus::Serving
    );
    load.strict.store(true, Ordering::Relaxed);
    for i in 0..300 {
        let key = format!("k{i}");
        let r = cache
            .get(GetRequest { key: key.clone() })
            .await
            .expect("no call fails once the node is ejected")
            .into_inner();
        assert_eq!(
            r.found,
            owner[&key] != dead,
            "{key} (owner {})",
            owner[&key]
        );
    }
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let got = cache
        .get_many(GetManyRequest { keys })
        .await
        .unwrap()
        .into_inner();
    assert!(got.results.iter().all(|r| r.error.is_none()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, failures) = load.finish().await;
    assert!(calls > 10);
    assert_eq!(failures, 0, "calls failed after the node was ejected");

    // Restarted, it rejoins and takes its keys again (empty: a cache).
    cluster.restart_node(1).await;
    cluster.wait_node_state(1, NodeState::Healthy).await;
    let key = owner
        .iter()
        .find(|(_, a)| **a == dead)
        .map(|(k, _)| k.clone())
        .unwrap();
    cache.set(set(&key, "again")).await.unwrap();
    let direct = cluster
        .node_cache(1)
        .await
        .get(GetRequest { key: key.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(direct.found, "writes reach the rejoined node");
}

#[tokio::test]
async fn with_two_replicas_no_key_is_lost_when_a_node_dies() {
    let mut cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let entries: Vec<SetRequest> = (0..300)
        .map(|i| set(&format!("k{i}"), &format!("v{i}")))
        .collect();
    let written = cache
        .set_many(SetManyRequest { entries })
        .await
        .unwrap()
        .into_inner();
    // Each key is on exactly two nodes, with the same version.
    let mut copies = 0;
    for i in 0..3 {
        let mut direct = cluster.node_cache(i).await;
        for (k, w) in written.results.iter().enumerate().step_by(10) {
            let r = direct
                .get(GetRequest {
                    key: format!("k{k}"),
                })
                .await
                .unwrap()
                .into_inner();
            if r.found {
                copies += 1;
                assert_eq!(r.version, w.version, "replicas carry the primary's version");
            }
        }
    }
    assert_eq!(copies, 2 * 30);

    let load = Traffic::start(cluster.orchestrator.cache().await);
    load.strict.store(true, Ordering::Relaxed);
    cluster.kill_node(0);
    // Before and after ejection alike, every key is still there.
    for round in 0..2 {
        let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
        let got = cache
            .get_many(GetManyRequest { keys })
            .await
            .unwrap()
            .into_inner();
        for (i, r) in got.results.iter().enumerate() {
            assert!(r.error.is_none(), "round {round} k{i}: {:?}", r.error);
            assert!(r.found, "round {round}: k{i} lost");
            assert_eq!(r.value, format!("v{i}").as_bytes());
        }
        for i in (0..300).step_by(7) {
            let r = cache
                .get(GetRequest {
                    key: format!("k{i}"),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.found, "round {round}: k{i} lost");
        }
        cluster.wait_node_state(0, NodeState::Ejected).await;
    }
    let (calls, failures) = load.finish().await;
    assert!(calls > 10);
    assert_eq!(failures, 0, "no call fails with a replica left");
}

#[tokio::test]
async fn two_orchestrators_with_the_same_membership_route_identically() {
    let cluster = TestCluster::start(3, &[]).await;
    // The second one is given the nodes in another order.
    let mut reversed = cluster.node_addrs.clone();
    reversed.reverse();
    let second = TestCluster::orchestrator_for(&reversed, &[]).await;
    let mut a = cluster.orchestrator.cluster().await;
    let mut b = second.cluster().await;
    for i in 0..500 {
        let key = format!("item-{i}");
        let la = a
            .locate(LocateRequest { key: key.clone() })
            .await
            .unwrap()
            .into_inner();
        let lb = b.locate(LocateRequest { key }).await.unwrap().into_inner();
        assert_eq!(la.owners[0].id, lb.owners[0].id);
    }
    // What one writes, the other reads.
    let mut ca = cluster.orchestrator.cache().await;
    let mut cb = second.cache().await;
    for i in 0..50 {
        ca.set(set(&format!("shared-{i}"), "x")).await.unwrap();
    }
    for i in 0..50 {
        assert!(
            cb.get(GetRequest {
                key: format!("shared-{i}")
            })
            .await
            .unwrap()
            .into_inner()
            .found
        );
    }
}

#[tokio::test]
async fn a_batch_reports_the_keys_whose_node_failed_and_answers_the_rest() {
    // One node takes smaller values than the others (a misconfigured node):
    // its keys fail, and only its keys.
    let strict = NodeProcess::start(&["--max-value-bytes", "1KiB"]).await;
    let others = [NodeProcess::start(&[]).await, NodeProcess::start(&[]).await];
    let addrs: Vec<String> = std::iter::once(strict.addr())
        .chain(others.iter().map(NodeProcess::addr))
        .collect();
    let orchestrator = TestCluster::orchestrator_for(&addrs, &[]).await;
    let mut cache = orchestrator.cache().await;
    let mut api = orchestrator.cluster().await;
    let big = "x".repeat(2048);
    let entries: Vec<SetRequest> = (0..150).map(|i| set(&format!("k{i}"), &big)).collect();
    let out = cache
        .set_many(SetManyRequest { entries })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.results.len(), 150);
    let (mut failed, mut stored) = (0, 0);
    for (i, r) in out.results.iter().enumerate() {
        let owner = first_owner(&mut api, &format!("k{i}")).await;
        if owner == strict.addr() {
            let e = r.error.as_ref().expect("the strict node's keys fail");
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            assert!(
                e.message.contains(&strict.addr()),
                "names the node: {}",
                e.message
            );
            assert!(e.message.contains("--max-value-bytes"), "{}", e.message);
            assert!(!r.stored);
            failed += 1;
        } else {
            assert!(r.error.is_none() && r.stored, "k{i}: {r:?}");
            stored += 1;
        }
    }
    assert!(failed > 0 && stored > 0, "{failed} failed, {stored} stored");
    // The single-key path answers the same failure as a status.
    let key = (0..150)
        .map(|i| format!("k{i}"))
        .zip(&out.results)
        .find(|(_, r)| r.error.is_some())
        .map(|(k, _)| k)
        .unwrap();
    let status = cache.set(set(&key, &big)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn when_every_owner_is_down_the_keys_say_so() {
    let mut cluster = TestCluster::start(2, &["--eject-after", "1000000"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    cluster.kill_node(0);
    cluster.kill_node(1);
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let got = cache
        .get_many(GetManyRequest { keys })
        .await
        .unwrap()
        .into_inner();
    for r in &got.results {
        let e = r.error.as_ref().expect("every key fails");
        assert_eq!(e.code, tonic::Code::Unavailable as i32, "{e:?}");
        assert!(
            cluster.node_addrs.iter().any(|a| e.message.contains(a)),
            "names the node: {e:?}"
        );
    }
    let status = cache
        .get(GetRequest { key: "k1".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn dns_discovery_finds_nodes_by_name_and_places_them_by_node_id() {
    // `localhost` resolves through the system resolver, as a headless
    // Service's name would; the node is placed by the id it reports.
    let node = NodeProcess::start(&["--node-id", "cache-0"]).await;
    let port = node.process.grpc.port();
    let target = format!("localhost:{port}");
    let mut args = vec!["--nodes-dns", &target, "--dns-interval", "200ms"];
    args.extend_from_slice(integration_tests::FAST_HEALTH);
    let orchestrator = integration_tests::OrchestratorProcess::start(&args).await;
    let mut api = orchestrator.cluster().await;
    let nodes =
        integration_tests::wait_for_nodes(&api, Duration::from_secs(10), |n| !n.is_empty()).await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].id, "cache-0");
    assert!(nodes[0].address.ends_with(&format!(":{port}")));
    let mut cache = orchestrator.cache().await;
    cache.set(set("via-dns", "yes")).await.unwrap();
    assert!(
        node.cache()
            .await
            .get(GetRequest {
                key: "via-dns".into()
            })
            .await
            .unwrap()
            .into_inner()
            .found
    );
    let located = api
        .locate(LocateRequest {
            key: "via-dns".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(located.owners[0].id, "cache-0");
}

/// A client's own deadline running out is not the node's fault: however
/// many calls are cut short by tight client deadlines, the node stays on
/// duty. (Before, a client with a tight deadline could eject a healthy
/// node.)
#[tokio::test]
async fn tight_client_deadlines_never_eject_a_healthy_node() {
    let cluster = TestCluster::start(2, &["--eject-after", "2"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let mut cut_short = 0;
    for i in 0..300u64 {
        let mut request = tonic::Request::new(GetRequest {
            key: format!("k{i}"),
        });
        // From "already gone when it reaches a node" to "mid-call".
        request.set_timeout(Duration::from_micros(50 + (i % 10) * 100));
        if let Err(s) = cache.get(request).await {
            // DEADLINE_EXCEEDED from the orchestrator, or CANCELLED from
            // tonic's client when its own timer fired first.
            assert!(
                matches!(
                    s.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ),
                "{s:?}"
            );
            cut_short += 1;
        }
    }
    assert!(
        cut_short > 0,
        "no call ran out of time: the test shows nothing"
    );
    let nodes = cluster
        .orchestrator
        .cluster()
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    for n in &nodes {
        assert_eq!(n.state(), NodeState::Healthy, "{n:?}");
        assert_eq!(n.consecutive_failures, 0, "{n:?}");
    }
    let page = cluster.orchestrator.process.scrape().await;
    for addr in &cluster.node_addrs {
        let ejections = metric_value(
            &page,
            "ringcache_node_ejections_total",
            &[&format!("node=\"{addr}\"")],
        );
        assert_eq!(ejections.unwrap_or(0.0), 0.0, "{addr} was ejected");
    }
    // And the orchestrator still serves normally.
    assert!(cache.get(GetRequest { key: "k1".into() }).await.is_ok());
}

/// Orchestrators that disagree about the membership are visible: each
/// shows its ring epoch, and the nodes they both call report both epochs
/// (in `Node/Stats` and `ringcache_node_ring_epochs`). Orchestrators that
/// agree show the same epoch.
#[tokio::test]
async fn orchestrators_that_disagree_about_the_membership_show_on_the_nodes() {
    let cluster = TestCluster::start(3, &[]).await;
    let mut reversed = cluster.node_addrs.clone();
    reversed.reverse();
    let agreeing = TestCluster::orchestrator_for(&reversed, &[]).await;
    // One that has not heard of the third node.
    let stale = TestCluster::orchestrator_for(&cluster.node_addrs[..2], &[]).await;
    let mut epochs = Vec::new();
    for o in [&cluster.orchestrator, &agreeing, &stale] {
        let listed = o
            .cluster()
            .await
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        epochs.push(listed.epoch);
    }
    let (e1, e2, e3) = (epochs[0].clone(), epochs[1].clone(), epochs[2].clone());
    assert_eq!(e1.len(), 16, "{e1}");
    assert_eq!(e1, e2, "same identities, same epoch");
    assert_ne!(e1, e3);

    // Both call node 0 (enough keys that some land on it either way).
    for o in [&cluster.orchestrator, &stale] {
        let mut cache = o.cache().await;
        for i in 0..60 {
            cache
                .get(GetRequest {
                    key: format!("epoch-{i}"),
                })
                .await
                .unwrap();
        }
    }
    let stats = cluster.nodes[0]
        .as_ref()
        .unwrap()
        .node()
        .await
        .stats(ringcache_proto::v1::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let seen: std::collections::HashSet<String> =
        stats.ring_epochs.iter().map(|e| e.epoch.clone()).collect();
    assert_eq!(seen, [e1.clone(), e3.clone()].into(), "{stats:?}");
    assert!(stats.ring_epochs.iter().all(|e| e.calls > 0));
    let page = cluster.nodes[0].as_ref().unwrap().process.scrape().await;
    assert_eq!(
        metric_value(&page, "ringcache_node_ring_epochs", &[]),
        Some(2.0),
        "{page}"
    );
}

/// The failure a cache must never have: a key deleted (or overwritten)
/// while its owner was unreachable coming back when the owner returns.
/// The owner is frozen (SIGSTOP: sockets open, no answers) until it is
/// ejected; a delete and an overwrite go to the next node meanwhile; when
/// it answers again, neither old value is ever served.
#[tokio::test]
async fn a_key_deleted_or_overwritten_while_its_owner_was_away_never_comes_back() {
    let cluster = TestCluster::start(
        2,
        &[
            "--health-interval",
            "100ms",
            "--health-timeout",
            "100ms",
            "--eject-after",
            "2",
            "--eject-backoff",
            "300ms",
            "--node-timeout",
            "300ms",
        ],
    )
    .await;
    let mut cache = cluster.orchestrator.cache().await;
    let mut api = cluster.orchestrator.cluster().await;
    // Two keys owned by node 0.
    let mut keys = Vec::new();
    for i in 0..200 {
        let key = format!("k{i}");
        if first_owner(&mut api, &key).await == cluster.node_addrs[0] {
            keys.push(key);
        }
        if keys.len() == 2 {
            break;
        }
    }
    let (deleted, overwritten) = (keys[0].clone(), keys[1].clone());
    cache.set(set(&deleted, "old")).await.unwrap();
    cache.set(set(&overwritten, "old")).await.unwrap();

    let owner = &cluster.nodes[0].as_ref().unwrap().process;
    owner.signal("STOP");
    cluster.wait_node_state(0, NodeState::Ejected).await;
    cache
        .delete(DeleteRequest {
            key: deleted.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    cache.set(set(&overwritten, "new")).await.unwrap();
    owner.signal("CONT");
    cluster.wait_node_state(0, NodeState::Healthy).await;

    for _ in 0..20 {
        let got = cache
            .get(GetRequest {
                key: deleted.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!got.found, "a deleted key came back: {got:?}");
        let got = cache
            .get(GetRequest {
                key: overwritten.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            !got.found || got.value == "new".as_bytes(),
            "an overwritten value came back: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The owner was brought up to date, and serves its keys again.
    let page = cluster.orchestrator.process.scrape().await;
    let addr = &cluster.node_addrs[0];
    assert_eq!(
        metric_value(
            &page,
            "ringcache_pending_invalidations",
            &[&format!("node=\"{addr}\"")]
        ),
        Some(0.0),
        "{page}"
    );
    assert!(
        metric_value(
            &page,
            "ringcache_invalidations_replayed_total",
            &[&format!("node=\"{addr}\"")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{page}"
    );
    cache.set(set(&deleted, "again")).await.unwrap();
    let again = cluster
        .node_cache(0)
        .await
        .get(GetRequest { key: deleted })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.value,
        "again".as_bytes(),
        "the owner serves its key again"
    );
}

/// `SetRequest` as it was when clients could send a replica version
/// (field 6, now reserved).
#[derive(Clone, PartialEq, prost::Message)]
struct OldSetRequest {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    #[prost(uint64, tag = "6")]
    replica_version: u64,
}

/// Versions are the cluster's: a client cannot choose one. grpcurl refuses
/// the field by name; an old client that sends it by number has it ignored
/// (proto3 unknown field), and versions keep increasing.
#[tokio::test]
async fn a_client_cannot_forge_an_internal_version() {
    let cluster = TestCluster::start(2, &["--replicas", "2"]).await;
    let addr = cluster.orchestrator.addr();
    let forged = integration_tests::tools::grpcurl(
        &[
            "-plaintext",
            "-d",
            r#"{"key":"k","value":"dg==","replicaVersion":"18446744073709551615"}"#,
            &addr,
            "ringcache.v1.Cache/Set",
        ],
        None,
    );
    assert!(!forged.success, "{forged:?}");
    assert!(forged.stderr.contains("replicaVersion"), "{forged:?}");

    let mut grpc = tonic::client::Grpc::new(cluster.orchestrator.process.channel().await);
    grpc.ready().await.unwrap();
    let old: ringcache_proto::v1::SetResponse = grpc
        .unary(
            tonic::Request::new(OldSetRequest {
                key: "k".into(),
                value: b"v".to_vec(),
                replica_version: u64::MAX,
            }),
            http::uri::PathAndQuery::from_static("/ringcache.v1.Cache/Set"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(old.stored);
    assert!(
        old.version < u64::MAX / 2,
        "version {} was forged",
        old.version
    );
    let mut cache = cluster.orchestrator.cache().await;
    let next = cache.set(set("k", "w")).await.unwrap().into_inner();
    assert!(next.version > old.version, "versions never go backwards");
    for i in 0..2 {
        let r = cluster
            .node_cache(i)
            .await
            .get(GetRequest { key: "k".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.version, next.version, "node {i} holds the real version");
    }
}

/// Readiness tells the truth: an orchestrator whose nodes never answer
/// reports NOT_SERVING (liveness stays SERVING) and lists them as never
/// reached; once a node answers it reports SERVING.
#[tokio::test]
async fn readiness_reports_not_serving_until_a_node_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let nodes = format!("cache-a={address}");
    let mut args = vec!["--nodes", nodes.as_str()];
    args.extend_from_slice(integration_tests::FAST_HEALTH);
    let orchestrator =
        integration_tests::Process::start(&integration_tests::binary("orchestrator"), &args, &[]);
    let url = orchestrator.grpc_url();
    let mut api =
        ringcache_proto::v1::cluster_client::ClusterClient::new(orchestrator.channel().await);
    integration_tests::wait_for_nodes(&api, Duration::from_secs(10), |n| {
        n[0].state() == NodeState::NeverReached
    })
    .await;
    assert_eq!(
        integration_tests::health(&url, "ringcache.v1.Cache")
            .await
            .unwrap(),
        ServingStatus::NotServing
    );
    assert_eq!(
        integration_tests::health(&url, "").await.unwrap(),
        ServingStatus::Serving,
        "liveness is not readiness"
    );
    let logs = orchestrator.logs().join("\n");
    assert!(
        logs.contains("no cache node answers") && logs.contains(&address),
        "{logs}"
    );

    // The node starts: readiness follows.
    let _node = NodeProcess::start(&["--listen", &address, "--node-id", "cache-a"]).await;
    integration_tests::eventually(Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            match integration_tests::health(&url, "ringcache.v1.Cache").await {
                Ok(ServingStatus::Serving) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let nodes = api
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].id, "cache-a");
    assert_eq!(nodes[0].node_id, "cache-a", "the id the node reports");
    assert_eq!(nodes[0].state(), NodeState::Healthy);
    let page = orchestrator.scrape().await;
    assert_eq!(
        metric_value(&page, "ringcache_node_reached", &["node=\"cache-a\""]),
        Some(1.0)
    );
}

/// `GetRequest` with its key as raw bytes, to send a key that is not
/// UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGetRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

/// Refusals made while decoding name the limit or the mistake, on the
/// orchestrator and on a node alike.
#[tokio::test]
async fn undecodable_and_oversized_requests_say_what_to_fix() {
    let limits = [
        "--max-value-bytes",
        "16KiB",
        "--max-message-bytes",
        "128KiB",
    ];
    let cluster = TestCluster::start_with(1, &limits, &limits).await;
    let node_url = cluster.nodes[0].as_ref().unwrap().process.grpc_url();
    for (who, channel) in [
        ("orchestrator", cluster.orchestrator.process.channel().await),
        (
            "node",
            tonic::transport::Channel::from_shared(node_url)
                .unwrap()
                .connect()
                .await
                .unwrap(),
        ),
    ] {
        let mut cache = ringcache_proto::v1::cache_client::CacheClient::new(channel.clone());
        let entries = (0..20)
            .map(|i| set(&format!("k{i}"), &"x".repeat(10_000)))
            .collect();
        let big = cache
            .set_many(SetManyRequest { entries })
            .await
            .unwrap_err();
        assert_eq!(big.code(), tonic::Code::OutOfRange, "{who}: {big:?}");
        assert!(
            big.message().contains("--max-message-bytes"),
            "{who}: {}",
            big.message()
        );

        // An answer over the limit: RESOURCE_EXHAUSTED, and an ErrorInfo
        // telling a client not to send it again as it is (unlike a shed
        // call's OVERLOADED).
        for i in 0..20 {
            cache
                .set(set(&format!("k{i}"), &"x".repeat(10_000)))
                .await
                .unwrap();
        }
        let keys = (0..20).map(|i| format!("k{i}")).collect();
        let large = cache
            .get_many(ringcache_proto::v1::GetManyRequest { keys })
            .await
            .unwrap_err();
        assert_eq!(
            large.code(),
            tonic::Code::ResourceExhausted,
            "{who}: {large:?}"
        );
        let info = tonic_types::StatusExt::get_details_error_info(&large)
            .unwrap_or_else(|| panic!("{who}: no ErrorInfo in {large:?}"));
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (
                ringcache_proto::exhausted::TOO_LARGE,
                ringcache_proto::direct::ERROR_DOMAIN
            ),
            "{who}"
        );
        assert_eq!(
            info.metadata
                .get(ringcache_proto::exhausted::LIMIT_BYTES)
                .map(String::as_str),
            Some("131072"),
            "{who}"
        );

        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let bad = grpc
            .unary::<_, ringcache_proto::v1::GetResponse, _>(
                tonic::Request::new(RawGetRequest {
                    key: vec![b'k', 0xff, 0xfe],
                }),
                http::uri::PathAndQuery::from_static("/ringcache.v1.Cache/Get"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{who}: {bad:?}");
        assert!(bad.message().contains("UTF-8"), "{who}: {}", bad.message());
    }
}

/// A hot counter through two orchestrators at once, 50 clients: every
/// increment succeeds and counts exactly once, and every replica ends on
/// the same value.
#[tokio::test]
async fn concurrent_increments_through_two_orchestrators_count_exactly() {
    const CLIENTS: i64 = 50;
    const EACH: i64 = 20;
    let cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let second = TestCluster::orchestrator_for(&cluster.node_addrs, &["--replicas", "2"]).await;
    let entries = [cluster.orchestrator.cache().await, second.cache().await];
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut cache = entries[(c % 2) as usize].clone();
            tokio::spawn(async move {
                for _ in 0..EACH {
                    cache
                        .increment(ringcache_proto::v1::IncrementRequest {
                            key: "hits".into(),
                            delta: 1,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut cache = cluster.orchestrator.cache().await;
    let got = cache
        .get(GetRequest { key: "hits".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, (CLIENTS * EACH).to_string().as_bytes());
    let mut copies = 0;
    for i in 0..3 {
        let r = cluster
            .node_cache(i)
            .await
            .get(GetRequest { key: "hits".into() })
            .await
            .unwrap()
            .into_inner();
        if r.found {
            copies += 1;
            assert_eq!(r.value, got.value, "node {i}");
            assert_eq!(r.version, got.version, "node {i}");
        }
    }
    assert_eq!(copies, 2, "on both owners");
    // Not a counter: a clear refusal, nothing changed.
    cache.set(set("name", "ringcache")).await.unwrap();
    let refused = cache
        .increment(ringcache_proto::v1::IncrementRequest {
            key: "name".into(),
            delta: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("not a decimal"), "{refused:?}");
}

/// Touch moves a key's expiry on every owner; Exists sees keys without
/// their values.
#[tokio::test]
async fn touch_moves_the_expiry_everywhere_and_exists_sees_it() {
    let cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let mut entry = set("session", "data");
    entry.ttl = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    cache.set(entry).await.unwrap();
    let touched = cache
        .touch(ringcache_proto::v1::TouchRequest {
            key: "session".into(),
            ttl: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            return_value: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(touched.found);
    assert_eq!(touched.value, b"data".as_slice());
    let mut holders = 0;
    for i in 0..3 {
        let r = cluster
            .node_cache(i)
            .await
            .get(GetRequest {
                key: "session".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.found {
            holders += 1;
            assert_eq!(r.version, touched.version, "node {i}");
            assert!(r.ttl.unwrap().seconds < 2, "node {i}: {:?}", r.ttl);
        }
    }
    assert_eq!(holders, 2);
    let seen = cache
        .exists(ringcache_proto::v1::ExistsRequest {
            keys: vec!["session".into(), "nobody".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(seen[0].found && seen[0].value_bytes == 4 && seen[0].version == touched.version);
    assert!(!seen[1].found);
    // Expired at the touched TTL (under 2 s), not at the first one.
    integration_tests::eventually(Duration::from_secs(5), || {
        let mut cache = cache.clone();
        async move {
            let seen = cache
                .exists(ringcache_proto::v1::ExistsRequest {
                    keys: vec!["session".into()],
                })
                .await
                .unwrap()
                .into_inner()
                .results;
            if seen[0].found { Err(seen) } else { Ok(()) }
        }
    })
    .await;
}
