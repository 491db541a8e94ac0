//! Direct mode against the real binaries: `Cluster/WatchTopology`, the
//! nodes' refusal of a stale epoch, and the Rust client reading straight
//! from owners without ever serving a deleted value.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use integration_tests::{TestCluster, eventually, metric_value};
use ringcache_client::Client;
use ringcache_proto::{
    direct::{CURRENT_EPOCH, DIRECT_EPOCH_HEADER, STALE_EPOCH},
    v1::{GetRequest, ListNodesRequest, NodeState, WatchTopologyRequest},
};
use tonic::Code;
use tonic_types::StatusExt;

/// What the tests allow for a change to travel on a node's feed to a
/// client (measured: about a millisecond at rest).
const FEED_LATENCY: Duration = Duration::from_millis(50);

async fn direct_client(cluster: &TestCluster) -> Client {
    Client::builder(cluster.orchestrator.process.grpc_url())
        .timeout(Duration::from_secs(2))
        .direct(true)
        .connect()
        .await
        .unwrap()
}

/// Reads `key` until `count` (a counter of the client's stats) moves.
async fn read_until(client: &Client, key: &str, what: &str, count: impl Fn(&Client) -> u64) {
    eventually(Duration::from_secs(15), || async {
        let before = count(client);
        client.get(key).await.map_err(|e| e.to_string())?;
        if count(client) > before {
            Ok(())
        } else {
            Err(format!(
                "no {what}: {:?} {:?}",
                client.direct_stats(),
                client.near_cache_stats()
            ))
        }
    })
    .await;
}

/// Reads `key` until one is answered directly by its owner: the client has
/// the topology, follows every feed and has listed the debts.
async fn wait_direct(client: &Client, key: &str) {
    read_until(client, key, "direct read", |c| c.direct_stats().direct).await;
}

#[tokio::test]
async fn watch_topology_sends_the_cluster_at_once_and_again_when_a_node_is_ejected() {
    let mut cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let mut api = cluster.orchestrator.cluster().await;
    let listed = api
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut watch = api
        .watch_topology(WatchTopologyRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), watch.message())
        .await
        .expect("the first message comes at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.revision, 1);
    assert_eq!(first.epoch, listed.epoch);
    assert_eq!(first.replicas, 2);
    assert_eq!(first.placement_version, 1);
    assert!(!first.handoff);
    let ids: Vec<&str> = first.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(
        ids,
        listed
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>()
    );
    // The nodes answer from the start; the orchestrator soon calls them
    // healthy and says so.
    let mut latest = first;
    while !latest.nodes.iter().all(|n| n.state() == NodeState::Healthy) {
        latest = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a message when the nodes turn healthy")
            .unwrap()
            .unwrap();
    }

    let gone = cluster.node_addrs[1].clone();
    cluster.kill_node(1);
    let ejected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = watch.message().await.unwrap().unwrap();
            if m.nodes
                .iter()
                .any(|n| n.address == gone && n.state() == NodeState::Ejected)
            {
                break m;
            }
        }
    })
    .await
    .expect("the ejection is pushed");
    assert!(ejected.revision > latest.revision);
    assert_eq!(
        ejected.epoch, latest.epoch,
        "ejection does not change the ring"
    );
}

#[tokio::test]
async fn a_node_refuses_a_direct_read_routed_by_another_epoch_and_says_which_is_current() {
    let cluster = TestCluster::start(2, &[]).await;
    let epoch = cluster
        .orchestrator
        .cluster()
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let mut node = cluster.node_cache(0).await;
    let direct = |epoch: &str| {
        let mut request = tonic::Request::new(GetRequest { key: "k".into() });
        request
            .metadata_mut()
            .insert(DIRECT_EPOCH_HEADER, epoch.parse().unwrap());
        request
    };
    // The orchestrator's health rounds tell the node its epoch.
    eventually(Duration::from_secs(10), || {
        let mut node = node.clone();
        let request = direct(&epoch);
        async move {
            node.get(request)
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    })
    .await;
    let refused = node.get(direct("0123456789abcdef")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, STALE_EPOCH);
    assert_eq!(info.metadata[CURRENT_EPOCH], epoch);
    // An ordinary read (no epoch) is served as always.
    node.get(GetRequest { key: "k".into() }).await.unwrap();
}

#[tokio::test]
async fn direct_reads_go_to_the_owner_and_see_every_acknowledged_write_and_delete() {
    let cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let client = direct_client(&cluster).await;
    client.set("warm-up", "x").await.unwrap();
    wait_direct(&client, "warm-up").await;

    let orchestrator_gets = || async {
        let page = cluster.orchestrator.process.scrape().await;
        metric_value(
            &page,
            "ringcache_pipeline_ops_total",
            &["grpc_method=\"Get\"", "grpc_code=\"OK\""],
        )
        .unwrap_or(0.0)
    };
    let before = orchestrator_gets().await;
    let stats = client.direct_stats();
    for i in 0..200 {
        let key = format!("user:{i}");
        let value = format!("v{i}");
        let version = client.set(&key, value.clone()).await.unwrap();
        let got = client.get(&key).await.unwrap().expect("read its own write");
        assert_eq!((got.value, got.version), (value.clone().into(), version));
        client.set(&key, format!("{value}-2")).await.unwrap();
        assert_eq!(
            client.get(&key).await.unwrap().unwrap().value,
            format!("{value}-2")
        );
        assert!(client.delete(&key).await.unwrap());
        assert_eq!(client.get(&key).await.unwrap(), None, "{key} was deleted");
    }
    let after = client.direct_stats();
    let direct = after.direct - stats.direct;
    assert!(
        direct >= 550,
        "most reads go straight to the owner: {after:?}"
    );
    let through_orchestrator = orchestrator_gets().await - before;
    assert!(
        through_orchestrator <= (600 - direct) as f64,
        "the orchestrator answered {through_orchestrator} reads, the owners {direct}"
    );
}

/// The case debts exist for: an owner misses a delete — another
/// orchestrator had it ejected while it was frozen — comes back, and a
/// direct client reads the key before that orchestrator has brought it up
/// to date. The client's own orchestrator never saw the owner fail, so its
/// topology says healthy; the debt on the other owner's feed keeps the read
/// off the owner until it is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_key_is_never_read_from_an_owner_that_missed_the_delete() {
    // The client's orchestrator neither ejects the owner nor checks it
    // again soon (so it does not repair it either): only the debt keeps
    // the read off it. The other orchestrator ejects it after two failed
    // calls, and checks it again only seconds later (so the owner stays
    // behind for a while).
    let cluster = TestCluster::start(
        3,
        &[
            "--replicas",
            "2",
            "--eject-after",
            "1000",
            "--health-interval",
            "5s",
        ],
    )
    .await;
    let other = TestCluster::orchestrator_for(
        &cluster.node_addrs,
        &[
            "--replicas",
            "2",
            "--health-interval",
            "5s",
            "--hedge-delay",
            "off",
        ],
    )
    .await;
    let client = direct_client(&cluster).await;
    let writer = Client::builder(other.process.grpc_url())
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    let x = cluster.first_owner("victim").await;
    let owner = cluster.node_addrs[x].clone();
    client.set("victim", "old").await.unwrap();
    wait_direct(&client, "victim").await;

    let frozen = &cluster.nodes[x].as_ref().unwrap().process;
    frozen.signal("STOP");
    // Reads through the other orchestrator time out on the frozen owner
    // (and are answered by the other owner) until it ejects it.
    for _ in 0..2 {
        writer.get("victim").await.unwrap();
    }
    let api = other.cluster().await;
    integration_tests::wait_for_nodes(&api, Duration::from_secs(10), |nodes| {
        nodes
            .iter()
            .any(|n| n.address == owner && n.state() == NodeState::Ejected)
    })
    .await;
    // Through the orchestrator that ejected it: the delete skips the owner
    // and is recorded as its debt on the other owner.
    assert!(writer.delete("victim").await.unwrap());
    frozen.signal("CONT");
    // Another client's delete reaches this one through the other owner's
    // change feed: the guarantee starts once the feed has carried it (a
    // few milliseconds; see the README).
    tokio::time::sleep(FEED_LATENCY).await;
    let started = std::time::Instant::now();
    let mut reads = 0;
    let mut stale = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        let got = client.get("victim").await.unwrap();
        if got.is_some() {
            stale.push((reads, started.elapsed()));
        }
        reads += 1;
    }
    assert!(
        stale.is_empty(),
        "{} of {reads} reads served the deleted value, the first at {:?}: {:?}",
        stale.len(),
        stale.first(),
        client.direct_stats()
    );
    // Once the owner is up to date (the other orchestrator readmitted it
    // and settled the debt), reads go to it directly again.
    integration_tests::wait_for_nodes(&api, Duration::from_secs(10), |nodes| {
        nodes.iter().all(|n| n.state() == NodeState::Healthy)
    })
    .await;
    wait_direct(&client, "victim").await;
    assert_eq!(client.get("victim").await.unwrap(), None);
}

async fn near_client(cluster: &TestCluster) -> Client {
    Client::builder(cluster.orchestrator.process.grpc_url())
        .timeout(Duration::from_secs(2))
        .near_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap()
}

/// Reads `key` through `client` until the near cache answers it.
async fn wait_near_hit(client: &Client, key: &str) {
    read_until(client, key, "near-cache hit", |c| c.near_cache_stats().hits).await;
}

/// How long `client` took to see `key` as `want` after `since`, reading it
/// in a loop (at most 5 s).
async fn time_to_see(
    client: &Client,
    key: &str,
    want: Option<&str>,
    since: std::time::Instant,
) -> Duration {
    loop {
        let got = client.get(key).await.unwrap();
        if got.as_ref().map(|e| &e.value[..]) == want.map(str::as_bytes) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{key} still reads {got:?}, not {want:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_cache_answers_hits_locally_and_sees_every_other_clients_write_within_milliseconds()
 {
    let cluster = TestCluster::start(3, &["--replicas", "2"]).await;
    let near = near_client(&cluster).await;
    let other = Client::builder(cluster.orchestrator.process.grpc_url())
        .connect()
        .await
        .unwrap();
    near.set("k", "v0").await.unwrap();
    wait_near_hit(&near, "k").await;

    // Under load: other clients write and read other keys meanwhile, so
    // the feeds carry a stream of changes, not just ours.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for t in 0..4 {
        let (client, stop) = (other.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load-{t}-{}", ops % 500);
                client.set(&key, "x".repeat(100)).await.unwrap();
                client.get(&key).await.unwrap();
                ops += 2;
            }
            ops
        }));
    }

    // Another client writes and deletes through the orchestrator; the
    // nodes' feeds void the near cache's answer.
    let mut seen = Vec::new();
    for i in 1..=40 {
        let value = format!("v{i}");
        other.set("k", value.clone()).await.unwrap();
        seen.push(time_to_see(&near, "k", Some(&value), std::time::Instant::now()).await);
        // A hit again before the next write.
        wait_near_hit(&near, "k").await;
    }
    other.delete("k").await.unwrap();
    seen.push(time_to_see(&near, "k", None, std::time::Instant::now()).await);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ops = 0;
    for task in load {
        ops += task.await.unwrap();
    }
    seen.sort();
    eprintln!(
        "another client's write seen by the near cache after: p50 {:?}, p99 {:?}, max {:?} ({} changes, {ops} other calls meanwhile)",
        seen[seen.len() / 2],
        seen[seen.len() * 99 / 100],
        seen[seen.len() - 1],
        seen.len()
    );
    assert!(ops > 100, "the load ran: {ops} calls");

    // Its own writes: read back at once, never the cached older value.
    for i in 0..50 {
        let value = format!("own-{i}");
        near.set("own", value.clone()).await.unwrap();
        assert_eq!(near.get("own").await.unwrap().unwrap().value, value);
        assert_eq!(near.get("own").await.unwrap().unwrap().value, value);
    }
    near.delete("own").await.unwrap();
    assert_eq!(near.get("own").await.unwrap(), None);
    near.set("kept", "v").await.unwrap();
    wait_near_hit(&near, "kept").await;
    let stats = near.near_cache_stats();
    assert!(stats.hits >= 40, "{stats:?}");
    assert!(stats.entries >= 1, "{stats:?}");
    assert!(stats.bytes > 0 && stats.bytes <= 1 << 20, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_feed_is_cut_the_near_cache_answers_nothing_and_reads_stay_correct() {
    let cluster = TestCluster::start(2, &["--replicas", "1", "--eject-after", "1000"]).await;
    let near = near_client(&cluster).await;
    let other = Client::builder(cluster.orchestrator.process.grpc_url())
        .connect()
        .await
        .unwrap();
    near.set("k", "before").await.unwrap();
    wait_near_hit(&near, "k").await;
    // Freeze the node that does not own "k": its feed goes silent and is
    // lost after 3 s, so the client can no longer vouch for anything it
    // could have changed — every answer is read again.
    let owner = cluster.first_owner("k").await;
    let other_node = (owner + 1) % cluster.node_addrs.len();
    let frozen = &cluster.nodes[other_node].as_ref().unwrap().process;
    frozen.signal("STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let hits = near.near_cache_stats().hits;
    other.set("k", "during").await.unwrap();
    for _ in 0..20 {
        assert_eq!(near.get("k").await.unwrap().unwrap().value, "during");
    }
    assert_eq!(
        near.near_cache_stats().hits,
        hits,
        "no answer from the near cache while a feed is lost"
    );
    frozen.signal("CONT");
    // Followed again: hits come back, and they are current.
    wait_near_hit(&near, "k").await;
    assert_eq!(near.get("k").await.unwrap().unwrap().value, "during");
}
