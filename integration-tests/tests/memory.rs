//! Memory bounded by `--max-in-flight-bytes`, measured as the kernel's
//! peak resident set (VmHWM) of the real processes under a load of large
//! answers: 400 concurrent `GetMany` of 900 × 4 KiB values (3.7 MB
//! answers), through one orchestrator and straight to one node. Each test
//! prints its row of RELIABILITY.md (`cargo test -p integration-tests
//! --test memory -- --nocapture`).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use integration_tests::{NodeProcess, Process, TestCluster};
use ringcache_proto::v1::{GetManyRequest, SetRequest, cache_client::CacheClient};
use tonic::transport::Channel;

const KEYS: usize = 900;
const VALUE_BYTES: usize = 4096;
const CONCURRENT: usize = 400;
const BUDGET: &str = "128MiB";
/// Twice the budget: the budget, the process' own baseline and the
/// allocator's slack.
const PEAK_LIMIT: u64 = 256 << 20;

fn key(i: usize) -> String {
    format!("big:{i}")
}

async fn preload(cache: &mut CacheClient<Channel>) {
    let entries = (0..KEYS).map(|i| SetRequest {
        key: key(i),
        value: vec![(i % 251) as u8; VALUE_BYTES].into(),
        ..Default::default()
    });
    integration_tests::store_all(cache, entries, 100).await;
}

/// Outcomes of the load.
#[derive(Debug, Default)]
struct Outcomes {
    answered: AtomicU64,
    /// Refused by the byte budget (RESOURCE_EXHAUSTED naming the flag).
    shed: AtomicU64,
    /// Anything else: must stay 0.
    other: AtomicU64,
}

/// `CONCURRENT` tasks each sending the 900-key `GetMany` for `seconds`,
/// each on its own connection (as 400 clients would be). Returns the
/// outcomes; panics on a wrong answer.
async fn load(url: String, seconds: u64) -> Arc<Outcomes> {
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENT {
        let (outcomes, stop, keys, url) =
            (outcomes.clone(), stop.clone(), keys.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            let mut cache = CacheClient::new(channel).max_decoding_message_size(8 << 20);
            let mut backoff = Duration::from_millis(10);
            while !stop.load(Ordering::Relaxed) {
                let mut request = tonic::Request::new(GetManyRequest { keys: keys.clone() });
                request.set_timeout(Duration::from_secs(30));
                match cache.get_many(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert_eq!(r.results.len(), KEYS);
                        let (mut shed, mut failed) = (false, false);
                        for (i, r) in r.results.iter().enumerate() {
                            if let Some(e) = &r.error {
                                // A node's share shed under load is a
                                // status too; anything else is not.
                                if e.code == tonic::Code::ResourceExhausted as i32 {
                                    shed = true;
                                } else {
                                    eprintln!("key {i}: {e:?}");
                                    failed = true;
                                }
                                continue;
                            }
                            // A miss is allowed (a slow node's keys are read
                            // from the next one); a wrong value is not.
                            if r.found {
                                assert_eq!(r.value.len(), VALUE_BYTES, "key {i}");
                                assert_eq!(r.value[0], (i % 251) as u8, "key {i}");
                            }
                        }
                        let counter = match (failed, shed) {
                            (true, _) => &outcomes.other,
                            (false, true) => &outcomes.shed,
                            (false, false) => &outcomes.answered,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        backoff = Duration::from_millis(10);
                    }
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && s.message().contains("--max-in-flight-bytes") =>
                    {
                        outcomes.shed.fetch_add(1, Ordering::Relaxed);
                        // A client backing off, as the message asks:
                        // exponentially, up to half a second.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                    Err(s) => {
                        eprintln!("unexpected: {s:?}");
                        outcomes.other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    outcomes
}

fn report(what: &str, process: &Process, before: u64, outcomes: &Outcomes) -> u64 {
    let peak = process.peak_rss_bytes();
    println!(
        "RELIABILITY | {CONCURRENT} concurrent GetMany of {KEYS} × 4 KiB, --max-in-flight-bytes {BUDGET} | {what} | peak RSS {} MiB (at rest {} MiB) | {} answered, {} shed, {} other |",
        peak >> 20,
        before >> 20,
        outcomes.answered.load(Ordering::Relaxed),
        outcomes.shed.load(Ordering::Relaxed),
        outcomes.other.load(Ordering::Relaxed),
    );
    peak
}

fn check(peak: u64, outcomes: &Outcomes) {
    assert_eq!(outcomes.other.load(Ordering::Relaxed), 0);
    // Work still gets through (how much depends on the machine: this is
    // not a throughput test).
    assert!(
        outcomes.answered.load(Ordering::Relaxed) >= 10,
        "the budget must still let work through: {outcomes:?}"
    );
    assert!(
        peak <= PEAK_LIMIT,
        "peak RSS {} MiB over {} MiB",
        peak >> 20,
        PEAK_LIMIT >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_stays_within_its_byte_budget_under_large_answers() {
    // Node calls and requests may take long on a loaded machine: this test
    // is about memory, not latency.
    let cluster = TestCluster::start(
        3,
        &[
            "--max-in-flight-bytes",
            BUDGET,
            "--node-timeout",
            "10s",
            "--request-timeout",
            "30s",
        ],
    )
    .await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let before = cluster.orchestrator.process.rss_bytes();
    let outcomes = load(cluster.orchestrator.process.grpc_url(), 8).await;
    let peak = report(
        "orchestrator",
        &cluster.orchestrator.process,
        before,
        &outcomes,
    );
    check(peak, &outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stays_within_its_byte_budget_under_large_answers() {
    let node =
        NodeProcess::start(&["--max-in-flight-bytes", BUDGET, "--request-timeout", "30s"]).await;
    let mut cache = node.cache().await;
    preload(&mut cache).await;
    let before = node.process.rss_bytes();
    let outcomes = load(node.process.grpc_url(), 8).await;
    let peak = report("cache-node", &node.process, before, &outcomes);
    check(peak, &outcomes);
}

/// What the change log costs a node at its default bound
/// (`--change-log-bytes 32MiB`): two nodes take the same 600,000 writes
/// (1,000 keys overwritten 600 times, so the store stays small), one with
/// the log and one with it off; the difference of their peak resident
/// sets is the log's memory — measured, not taken from its counter. The
/// log holds about 350,000 changes at its bound (96 bytes each).
#[tokio::test]
async fn the_change_log_stays_within_its_bound() {
    let with_log = NodeProcess::start(&[]).await;
    let without = NodeProcess::start(&["--change-log-bytes", "0"]).await;
    for node in [&with_log, &without] {
        let mut cache = node.cache().await;
        for round in 0..600 {
            let entries = (0..1000).map(|i| SetRequest {
                key: format!("counter:{i}"),
                value: format!("{round}").into_bytes().into(),
                ..Default::default()
            });
            integration_tests::store_all(&mut cache, entries, 1000).await;
        }
    }
    let page = with_log.process.scrape().await;
    let logged =
        integration_tests::metric_value(&page, "ringcache_changes_log_bytes", &[]).unwrap();
    let head = integration_tests::metric_value(&page, "ringcache_changes_head", &[]).unwrap();
    let (peak_with, peak_without) = (
        with_log.process.peak_rss_bytes(),
        without.process.peak_rss_bytes(),
    );
    let cost = peak_with.saturating_sub(peak_without);
    println!(
        "RELIABILITY | change log at its default bound (32 MiB) | {head} changes made, {} MiB accounted | peak RSS {} MiB with the log, {} MiB without: the log costs {} MiB |",
        logged as u64 >> 20,
        peak_with >> 20,
        peak_without >> 20,
        cost >> 20
    );
    assert!(head >= 600_000.0, "every write is logged: {head}");
    assert!(
        logged <= (32 << 20) as f64,
        "accounted within the bound: {logged}"
    );
    assert!(
        cost <= 48 << 20,
        "the log's real memory ({} MiB) is within 1.5 × its 32 MiB bound",
        cost >> 20
    );
}
