//! Hot keys through real processes: detection (`Cluster/HotKeys`,
//! `/metrics`) and relief (the orchestrator's near cache), with the
//! consistency the README states — writes through the same orchestrator
//! seen at once, writes through another within `--hot-key-ttl` when the
//! change feeds are off (with them, see `coherence.rs`) — and the near
//! cache's byte bound.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use integration_tests::{OrchestratorProcess, TestCluster, eventually, metric_value};
use ringcache_proto::v1::{
    DeleteRequest, GetRequest, GetResponse, HotKeysRequest, HotKeysResponse, IncrementRequest,
    SetManyRequest, SetRequest, cache_client::CacheClient, set_request,
};
use tonic::transport::Channel;

fn set(key: &str, value: &[u8]) -> SetRequest {
    SetRequest {
        key: key.into(),
        value: value.to_vec().into(),
        ..Default::default()
    }
}

async fn get(cache: &mut CacheClient<Channel>, key: &str) -> GetResponse {
    cache
        .get(GetRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn hot_keys(orchestrator: &OrchestratorProcess) -> HotKeysResponse {
    orchestrator
        .cluster()
        .await
        .hot_keys(HotKeysRequest { limit: 20 })
        .await
        .unwrap()
        .into_inner()
}

async fn metric(orchestrator: &OrchestratorProcess, name: &str) -> f64 {
    let page = orchestrator.process.scrape().await;
    metric_value(&page, name, &[]).unwrap_or(0.0)
}

/// Calls from the orchestrator to any node, over all outcomes.
async fn node_calls(orchestrator: &OrchestratorProcess) -> f64 {
    let page = orchestrator.process.scrape().await;
    page.lines()
        .filter(|l| l.starts_with("ringcache_node_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads `keys` in turn until `Cluster/HotKeys` says every one of them is
/// relieved by `orchestrator`.
async fn heat(orchestrator: &OrchestratorProcess, keys: &[&str]) {
    let mut cache = orchestrator.cache().await;
    eventually(Duration::from_secs(20), || {
        let mut cache = cache.clone();
        async move {
            for _ in 0..50 {
                for k in keys {
                    cache.get(GetRequest { key: (*k).into() }).await.unwrap();
                }
            }
            let hot = hot_keys(orchestrator).await;
            let relieved = |k: &&str| hot.keys.iter().any(|h| h.key == *k && h.relieved);
            if keys.iter().all(relieved) {
                Ok(())
            } else {
                Err(hot)
            }
        }
    })
    .await;
    // One more read of each fills the near cache if the last ones did not.
    for k in keys {
        get(&mut cache, k).await;
    }
}

/// Quick detection, so tests need few reads.
const QUICK: &[&str] = &["--hot-key-window", "200ms", "--hot-key-threshold", "50"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    QUICK.iter().copied().chain(extra.iter().copied()).collect()
}

/// A key read over and over is the first in `Cluster/HotKeys`, marked hot,
/// with its owners; `/metrics` counts it.
#[tokio::test]
async fn hot_keys_shows_the_key_taking_the_load() {
    let cluster = TestCluster::start(
        3,
        &["--hot-key-window", "300ms", "--hot-key-threshold", "50"],
    )
    .await;
    let mut cache = cluster.orchestrator.cache().await;
    cache.set(set("celebrity", b"v")).await.unwrap();
    let until = Instant::now() + Duration::from_millis(900);
    while Instant::now() < until {
        get(&mut cache, "celebrity").await;
    }
    let hot = hot_keys(&cluster.orchestrator).await;
    let first = &hot.keys[0];
    assert_eq!(first.key, "celebrity", "{hot:?}");
    assert!(first.hot && first.reads_per_second >= 50.0, "{hot:?}");
    assert_eq!(first.owners.len(), 1);
    assert_eq!(hot.threshold, 50.0);
    assert_eq!(
        hot.relief_ttl.map(|d| (d.seconds, d.nanos)),
        Some((0, 250_000_000)),
        "relief is on by default, 250 ms: {hot:?}"
    );
    let page = cluster.orchestrator.process.scrape().await;
    assert!(
        metric_value(&page, "ringcache_hot_keys", &[]).is_some_and(|v| v >= 1.0),
        "{page}"
    );
}

/// Once a key is hot, its reads are answered by the orchestrator without
/// calling a node — and every kind of write or delete through the same
/// orchestrator is seen by the very next read, although the near cache
/// would keep an answer for a minute.
#[tokio::test]
async fn a_hot_key_is_relieved_and_writes_through_the_same_orchestrator_are_seen_at_once() {
    let cluster = TestCluster::start(3, &args(&["--hot-key-ttl", "60s"])).await;
    let o = &cluster.orchestrator;
    let mut cache = o.cache().await;
    let v1 = cache
        .set(set("celebrity", b"v1"))
        .await
        .unwrap()
        .into_inner();
    cache
        .increment(IncrementRequest {
            key: "likes".into(),
            delta: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    heat(o, &["celebrity", "likes"]).await;

    // Relieved: 300 reads, (almost) no node calls.
    let (calls, relieved) = (
        node_calls(o).await,
        metric(o, "ringcache_hot_key_relieved_reads_total").await,
    );
    for _ in 0..300 {
        let r = get(&mut cache, "celebrity").await;
        assert_eq!((r.value.as_ref(), r.version), (&b"v1"[..], v1.version));
    }
    let relieved = metric(o, "ringcache_hot_key_relieved_reads_total").await - relieved;
    let calls = node_calls(o).await - calls;
    assert!(relieved >= 290.0, "{relieved} of 300 reads relieved");
    assert!(calls <= 10.0, "{calls} node calls for 300 relieved reads");

    // Every write is seen by the next read.
    let v2 = cache
        .set(set("celebrity", b"v2"))
        .await
        .unwrap()
        .into_inner();
    let r = get(&mut cache, "celebrity").await;
    assert_eq!((r.value.as_ref(), r.version), (&b"v2"[..], v2.version));

    let mut conditional = set("celebrity", b"v3");
    conditional.condition = Some(set_request::Condition::IfVersion(v2.version));
    let v3 = cache.set(conditional).await.unwrap().into_inner();
    assert!(v3.stored);
    let r = get(&mut cache, "celebrity").await;
    assert_eq!((r.value.as_ref(), r.version), (&b"v3"[..], v3.version));
    // A condition on the version the near cache served holds on the node.
    let mut stale = set("celebrity", b"lost");
    stale.condition = Some(set_request::Condition::IfVersion(v2.version));
    assert!(!cache.set(stale).await.unwrap().into_inner().stored);

    cache
        .set_many(SetManyRequest {
            entries: vec![set("celebrity", b"v4")],
        })
        .await
        .unwrap();
    assert_eq!(get(&mut cache, "celebrity").await.value.as_ref(), b"v4");

    let counted = cache
        .increment(IncrementRequest {
            key: "likes".into(),
            delta: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counted.value, 6);
    assert_eq!(get(&mut cache, "likes").await.value.as_ref(), b"6");

    cache
        .delete(DeleteRequest {
            key: "celebrity".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!get(&mut cache, "celebrity").await.found, "deleted");

    // Still relieved after all that: the misses are answered here too.
    heat(o, &["celebrity"]).await;
    let before = metric(o, "ringcache_hot_key_relieved_reads_total").await;
    assert!(!get(&mut cache, "celebrity").await.found);
    assert!(metric(o, "ringcache_hot_key_relieved_reads_total").await > before);
}

/// Without the nodes' change feeds (`--change-feeds false`), a write
/// through another orchestrator is not seen at once by one that relieves
/// the key, but within its `--hot-key-ttl`: the bound when feeds are off.
/// (With feeds, see `coherence.rs`: within milliseconds.)
#[tokio::test]
async fn without_feeds_a_write_through_another_orchestrator_is_seen_within_the_ttl() {
    // Long enough that the answer filled just before the write is still
    // fresh when the first read after it comes, even on a loaded machine.
    let ttl = Duration::from_secs(3);
    let cluster = TestCluster::start(
        3,
        &args(&["--hot-key-ttl", "3s", "--change-feeds", "false"]),
    )
    .await;
    let other = TestCluster::orchestrator_for(&cluster.node_addrs, &[]).await;
    let o = &cluster.orchestrator;
    let mut cache = o.cache().await;
    cache.set(set("flag", b"old")).await.unwrap();
    heat(o, &["flag"]).await;
    assert_eq!(get(&mut cache, "flag").await.value.as_ref(), b"old");

    let mut elsewhere = other.cache().await;
    elsewhere.set(set("flag", b"new")).await.unwrap();
    let written = Instant::now();
    let mut stale_reads = 0;
    let seen = loop {
        let r = get(&mut cache, "flag").await;
        if r.value.as_ref() == b"new" {
            break written.elapsed();
        }
        stale_reads += 1;
        assert!(
            written.elapsed() < ttl + Duration::from_secs(3),
            "still stale {:?} after the write",
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The bound is the TTL (plus this test's own scheduling): the answer
    // was filled before the write, so it is served at most `ttl` after.
    assert!(seen <= ttl + Duration::from_secs(2), "seen after {seen:?}");
    assert!(
        stale_reads > 0,
        "the other orchestrator's write was seen at once: was the key relieved?"
    );
}

/// Many hot keys with large values: the near cache stays within
/// `--hot-key-cache-bytes`, and still caches what fits.
#[tokio::test]
async fn the_near_cache_never_exceeds_its_byte_bound() {
    let bound = 64 * 1024;
    let cluster = TestCluster::start(
        3,
        &[
            "--hot-key-window",
            "200ms",
            "--hot-key-threshold",
            "20",
            "--hot-key-cache-bytes",
            "64KiB",
            "--hot-key-ttl",
            "60s",
        ],
    )
    .await;
    let o = &cluster.orchestrator;
    let mut cache = o.cache().await;
    let keys: Vec<String> = (0..24).map(|i| format!("big:{i}")).collect();
    for k in &keys {
        cache.set(set(k, &[7u8; 10_000])).await.unwrap();
    }
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    // 24 keys of 10 kB cannot all fit in 64 KiB: keep reading all of them
    // while relief is on for them, checking the bound each round.
    let mut max_seen = 0.0f64;
    for _ in 0..10 {
        for _ in 0..30 {
            for k in &key_refs {
                let r = get(&mut cache, k).await;
                assert_eq!(r.value.len(), 10_000);
            }
        }
        let bytes = metric(o, "ringcache_hot_key_cache_bytes").await;
        let hot = hot_keys(o).await;
        assert!(bytes <= bound as f64, "{bytes} bytes held");
        assert!(hot.relief_bytes <= bound, "{hot:?}");
        max_seen = max_seen.max(bytes);
    }
    assert!(max_seen > 10_000.0, "it cached something: {max_seen}");
}

/// `--hot-key-cache-bytes 0` turns relief off: hot keys are still shown,
/// never relieved, and every read reaches a node.
#[tokio::test]
async fn relief_can_be_turned_off() {
    let cluster = TestCluster::start(3, &args(&["--hot-key-cache-bytes", "0"])).await;
    let o = &cluster.orchestrator;
    let mut cache = o.cache().await;
    cache.set(set("celebrity", b"v")).await.unwrap();
    let hot = eventually(Duration::from_secs(20), || {
        let mut cache = cache.clone();
        async move {
            for _ in 0..100 {
                get(&mut cache, "celebrity").await;
            }
            let hot = hot_keys(o).await;
            match hot.keys.first() {
                Some(k) if k.hot => Ok(hot),
                _ => Err(hot),
            }
        }
    })
    .await;
    assert!(!hot.keys[0].relieved && hot.relief_ttl.is_none(), "{hot:?}");
    assert_eq!(
        metric(o, "ringcache_hot_key_relieved_reads_total").await,
        0.0
    );
}
