//! The fault suite: real nodes and a real orchestrator under load from
//! this test, while nodes are restarted, killed, paused and added. Every
//! call is counted, and every answer is checked key by key against what
//! the client last wrote or deleted. Each test prints its row of
//! RELIABILITY.md (`cargo test -p integration-tests --test faults --
//! --nocapture`).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    NodeProcess, OrchestratorProcess, TestCluster, metric_value, wait_for_nodes,
};
use ringcache_proto::v1::{
    DeleteManyRequest, DeleteRequest, GetManyRequest, GetRequest, IncrementRequest, NodeState,
    SetRequest, TouchRequest, cache_client::CacheClient,
};
use tonic::transport::Channel;

/// Keys written before the faults and only read afterwards: none may be
/// lost where replicas should keep them.
const FIXED_KEYS: usize = 3000;
/// Load tasks; each owns its own mutable keys, so its model is exact.
const WORKERS: usize = 8;
/// Mutable keys per task.
const KEYS_PER_WORKER: u64 = 40;
/// A call's deadline: longer than ejection takes, so a call only fails if
/// the cluster could not answer it.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

fn fixed_key(i: usize) -> String {
    format!("fixed:{i}")
}

fn fixed_value(i: usize) -> String {
    format!("value of fixed:{i}")
}

fn with_timeout<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// How the load reaches an orchestrator: unary calls with the generated
/// client, or the Rust client's pipelines (which reconnect, and send a call
/// again only where it cannot run twice).
#[derive(Clone)]
enum Api {
    Unary(CacheClient<Channel>),
    Piped(ringcache_client::Client),
}

fn status(e: ringcache_client::Error) -> tonic::Status {
    tonic::Status::new(e.code(), e.to_string())
}

/// How the load's calls travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Unary tonic calls to the orchestrator.
    Unary,
    /// The Rust client, pipelined to the orchestrator.
    Piped,
    /// The Rust client in direct mode: reads straight to the owners.
    Direct,
}

impl Mode {
    /// How the row names it.
    fn label(self) -> &'static str {
        match self {
            Mode::Unary => "",
            Mode::Piped => ", Rust client (pipelined)",
            Mode::Direct => ", Rust client (direct reads)",
        }
    }

    async fn api(self, orchestrator: &OrchestratorProcess) -> Api {
        match self {
            Mode::Unary => Api::Unary(orchestrator.cache().await),
            Mode::Piped => Api::client(orchestrator, false).await,
            Mode::Direct => Api::client(orchestrator, true).await,
        }
    }
}

impl Api {
    /// The Rust client of `orchestrator`, with the suite's call deadline;
    /// in direct mode if `direct`.
    async fn client(orchestrator: &OrchestratorProcess, direct: bool) -> Self {
        Api::Piped(
            ringcache_client::Client::builder(orchestrator.process.grpc_url())
                .timeout(CALL_TIMEOUT)
                .pipelines(2)
                .direct(direct)
                .connect()
                .await
                .unwrap(),
        )
    }

    /// Whether `key` was found, and its value.
    async fn get(&self, key: &str) -> Result<(bool, bytes::Bytes), tonic::Status> {
        match self {
            Api::Unary(c) => {
                let r = c
                    .clone()
                    .get(with_timeout(GetRequest { key: key.into() }))
                    .await?
                    .into_inner();
                Ok((r.found, r.value))
            }
            Api::Piped(c) => Ok(c
                .get(key)
                .await
                .map_err(status)?
                .map_or((false, bytes::Bytes::new()), |e| (true, e.value))),
        }
    }

    /// Writes `value`; answers the new version.
    async fn set(&self, key: &str, value: String) -> Result<u64, tonic::Status> {
        match self {
            Api::Unary(c) => {
                let set = SetRequest {
                    key: key.into(),
                    value: value.into_bytes().into(),
                    ..Default::default()
                };
                Ok(c.clone().set(with_timeout(set)).await?.into_inner().version)
            }
            Api::Piped(c) => c.set(key, value).await.map_err(status),
        }
    }

    /// Touch with the value read: found, value, version.
    async fn touch(&self, key: &str) -> Result<(bool, bytes::Bytes, u64), tonic::Status> {
        match self {
            Api::Unary(c) => {
                let r = c
                    .clone()
                    .touch(with_timeout(TouchRequest {
                        key: key.into(),
                        ttl: None,
                        return_value: true,
                    }))
                    .await?
                    .into_inner();
                Ok((r.found, r.value, r.version))
            }
            Api::Piped(c) => Ok(c
                .touch_and_get(key, None)
                .await
                .map_err(status)?
                .map_or((false, bytes::Bytes::new(), 0), |e| {
                    (true, e.value, e.version)
                })),
        }
    }

    /// Deletes `key` (only at `version`, unless 0); whether it was deleted.
    async fn delete(&self, key: &str, version: u64) -> Result<bool, tonic::Status> {
        match self {
            Api::Unary(c) => Ok(c
                .clone()
                .delete(with_timeout(DeleteRequest {
                    key: key.into(),
                    if_version: version,
                }))
                .await?
                .into_inner()
                .deleted),
            Api::Piped(c) if version == 0 => c.delete(key).await.map_err(status),
            Api::Piped(c) => match c.compare_and_delete(key, version).await.map_err(status)? {
                ringcache_client::Written::Stored(_) => Ok(true),
                ringcache_client::Written::Refused(_) => Ok(false),
            },
        }
    }

    async fn increment(&self, key: &str) -> Result<i64, tonic::Status> {
        match self {
            Api::Unary(c) => Ok(c
                .clone()
                .increment(with_timeout(IncrementRequest {
                    key: key.into(),
                    delta: 1,
                    ..Default::default()
                }))
                .await?
                .into_inner()
                .value),
            Api::Piped(c) => c.increment(key, 1).await.map_err(status),
        }
    }

    /// Deletes `keys`; for each, whether it failed alone.
    async fn delete_many(&self, keys: &[String]) -> Result<Vec<bool>, tonic::Status> {
        match self {
            Api::Unary(c) => Ok(c
                .clone()
                .delete_many(with_timeout(DeleteManyRequest {
                    keys: keys.to_vec(),
                }))
                .await?
                .into_inner()
                .results
                .iter()
                .map(|r| r.error.is_some())
                .collect()),
            Api::Piped(c) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                Ok(c.delete_many(&keys)
                    .await
                    .map_err(status)?
                    .iter()
                    .map(Result::is_err)
                    .collect())
            }
        }
    }
}

/// What the client last did to a mutable key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Last {
    /// Never written, or deleted: a read must miss.
    Absent,
    /// Written with this value: a read must find it or miss (a cache may
    /// lose data), never find another value.
    Value(String),
    /// A write or delete failed: its outcome is unknown until the next one
    /// succeeds.
    Unknown,
}

/// Counts over a run.
#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    failed: AtomicU64,
    /// A read found a value other than the last one written.
    stale: AtomicU64,
    /// A read found a key the client had deleted.
    resurrected: AtomicU64,
    fixed_hits: AtomicU64,
    fixed_misses: AtomicU64,
    /// Failed calls of operations that are applied at most once
    /// (increments, compare-and-deletes): cut short on a node that died or
    /// froze, they are not retried elsewhere by design.
    once_only_failed: AtomicU64,
    /// The first few failures, for the assertion messages.
    failures: Mutex<Vec<String>>,
    /// The first few stale or resurrected reads: which key, what was read,
    /// when (seconds into the run), for the assertion messages.
    anomalies: Mutex<Vec<String>>,
    started: std::sync::OnceLock<std::time::Instant>,
}

impl Counts {
    fn anomaly(&self, what: String) {
        let at = self
            .started
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64();
        // Wall-clock time too, to find the moment in the processes' logs
        // (`RINGCACHE_TEST_LOG_DIR`).
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut a = self.anomalies.lock().unwrap();
        if a.len() < 10 {
            a.push(format!("{at:.2}s (unix {wall:.3}) {what}"));
        }
    }

    fn failed(&self, what: &str, status: &tonic::Status) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if matches!(what, "increment" | "delete if_version") {
            self.once_only_failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut f = self.failures.lock().unwrap();
        if f.len() < 10 {
            f.push(format!("{what}: {:?} {}", status.code(), status.message()));
        }
    }
}

/// The figures of one run.
#[derive(Debug)]
struct Report {
    calls: u64,
    failed: u64,
    stale: u64,
    resurrected: u64,
    fixed_hits: u64,
    fixed_misses: u64,
    /// Of `failed`: ops applied at most once, never retried elsewhere.
    once_only_failed: u64,
    /// The first few failures.
    failures: Vec<String>,
    /// Reads the Rust clients sent straight to an owner (direct mode).
    direct_reads: u64,
    /// The first few stale or resurrected reads, described.
    anomalies: Vec<String>,
}

impl Report {
    /// In direct mode, asserts that reads did go straight to the owners
    /// (a row whose reads all fell back to the orchestrator would measure
    /// the routed path).
    fn check_mode(&self, mode: Mode) {
        if mode == Mode::Direct {
            assert!(
                self.direct_reads * 20 >= self.calls,
                "too few reads went directly: {self:?}"
            );
        }
    }

    /// Failed calls that the cluster could have answered: all but the
    /// at-most-once ops cut short by the fault.
    fn avoidable_failures(&self) -> u64 {
        self.failed - self.once_only_failed
    }

    fn hit_ratio(&self) -> f64 {
        self.fixed_hits as f64 / (self.fixed_hits + self.fixed_misses).max(1) as f64
    }
}

/// Load on the orchestrators: half reads of the fixed keys, half reads,
/// writes and deletes of each task's own keys, each read checked against
/// the task's record of what it last wrote or deleted. With several
/// orchestrators, each call goes to one picked at random, so a key is
/// written through one and read through another.
struct Workload {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    tasks: Vec<tokio::task::JoinHandle<HashMap<String, Last>>>,
    apis: Vec<Api>,
}

impl Workload {
    fn start(cache: CacheClient<Channel>, fixed: usize) -> Self {
        Self::spread(vec![cache], fixed)
    }

    fn spread(caches: Vec<CacheClient<Channel>>, fixed: usize) -> Self {
        Self::through(caches.into_iter().map(Api::Unary).collect(), fixed)
    }

    fn through(apis: Vec<Api>, fixed: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let _ = counts.started.set(std::time::Instant::now());
        let tasks = (0..WORKERS)
            .map(|w| {
                let (stop, counts, apis) = (stop.clone(), counts.clone(), apis.clone());
                tokio::spawn(async move {
                    let mut model: HashMap<String, Last> = (0..KEYS_PER_WORKER)
                        .map(|k| (format!("w{w}:{k}"), Last::Absent))
                        .collect();
                    // xorshift: a different sequence per task, no crate.
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1);
                    let mut writes = 0u64;
                    // The version each key was last written or touched at.
                    let mut versions: HashMap<String, u64> = HashMap::new();
                    // This task's counter: (acknowledged, unknown) increments.
                    let mut counter = (0i64, 0i64);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let api = &apis[(x >> 56) as usize % apis.len()];
                        counts.calls.fetch_add(1, Ordering::Relaxed);
                        if fixed > 0 && x.is_multiple_of(2) {
                            let i = ((x >> 8) % fixed as u64) as usize;
                            match api.get(&fixed_key(i)).await {
                                Ok((found, value)) => {
                                    if !found {
                                        counts.fixed_misses.fetch_add(1, Ordering::Relaxed);
                                    } else if value == fixed_value(i).as_bytes() {
                                        counts.fixed_hits.fetch_add(1, Ordering::Relaxed);
                                    } else {
                                        counts.stale.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Err(s) => counts.failed("get fixed", &s),
                            }
                            continue;
                        }
                        let key = format!("w{w}:{}", (x >> 8) % KEYS_PER_WORKER);
                        match (x >> 32) % 20 {
                            // 45% reads, 30% writes, and 5% each of
                            // touches, compare-and-deletes, increments,
                            // DeleteMany and deletes.
                            0..9 => match api.get(&key).await {
                                Ok((found, value)) => {
                                    let what = format!("{key} (get)");
                                    check_read(&counts, &what, &model[&key], found, &value);
                                }
                                Err(s) => counts.failed("get", &s),
                            },
                            9..15 => {
                                writes += 1;
                                let value = format!("{key}#{writes}");
                                match api.set(&key, value.clone()).await {
                                    Ok(version) => {
                                        versions.insert(key.clone(), version);
                                        model.insert(key, Last::Value(value));
                                    }
                                    Err(s) => {
                                        counts.failed("set", &s);
                                        model.insert(key, Last::Unknown);
                                    }
                                }
                            }
                            15 => match api.touch(&key).await {
                                Ok((found, value, version)) => {
                                    let what = format!("{key} (touch)");
                                    check_read(&counts, &what, &model[&key], found, &value);
                                    if found {
                                        versions.insert(key, version);
                                    }
                                }
                                // A touch changes no value.
                                Err(s) => counts.failed("touch", &s),
                            },
                            16 => {
                                let version = versions.get(&key).copied().unwrap_or(1);
                                match api.delete(&key, version).await {
                                    Ok(true) => {
                                        model.insert(key, Last::Absent);
                                    }
                                    // The version moved on (or the key was
                                    // lost): nothing changed.
                                    Ok(false) => {}
                                    Err(s) => {
                                        counts.failed("delete if_version", &s);
                                        model.insert(key, Last::Unknown);
                                    }
                                }
                            }
                            17 => match api.increment(&format!("w{w}:counter")).await {
                                Ok(value) => {
                                    counter.0 += 1;
                                    check_counter(&counts, value, counter);
                                }
                                Err(s) => {
                                    counts.failed("increment", &s);
                                    counter.1 += 1;
                                }
                            },
                            18 => {
                                let other = format!("w{w}:{}", (x >> 40) % KEYS_PER_WORKER);
                                let keys = vec![key.clone(), other];
                                match api.delete_many(&keys).await {
                                    Ok(failed) => {
                                        for (k, failed) in keys.into_iter().zip(failed) {
                                            let last =
                                                if failed { Last::Unknown } else { Last::Absent };
                                            model.insert(k, last);
                                        }
                                    }
                                    Err(s) => {
                                        counts.failed("delete many", &s);
                                        for k in keys {
                                            model.insert(k, Last::Unknown);
                                        }
                                    }
                                }
                            }
                            _ => match api.delete(&key, 0).await {
                                Ok(_) => {
                                    model.insert(key, Last::Absent);
                                }
                                Err(s) => {
                                    counts.failed("delete", &s);
                                    model.insert(key, Last::Unknown);
                                }
                            },
                        }
                    }
                    model
                })
            })
            .collect();
        Workload {
            stop,
            counts,
            tasks,
            apis,
        }
    }

    /// Stops the load, then reads every mutable key once more against the
    /// record (a stale value left behind shows here even if no read hit it
    /// during the run).
    async fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut models = Vec::new();
        for t in self.tasks {
            models.push(t.await.unwrap());
        }
        let c = &self.counts;
        let direct_reads = self
            .apis
            .iter()
            .map(|api| match api {
                Api::Piped(client) => client.direct_stats().direct,
                Api::Unary(_) => 0,
            })
            .sum();
        for model in models {
            for (key, last) in model {
                // Through every orchestrator.
                for (i, api) in self.apis.iter().enumerate() {
                    let (found, value) = api
                        .get(&key)
                        .await
                        .expect("the final check's reads succeed");
                    check_read(
                        c,
                        &format!("{key} (final read, api {i})"),
                        &last,
                        found,
                        &value,
                    );
                }
            }
        }
        Report {
            calls: c.calls.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            once_only_failed: c.once_only_failed.load(Ordering::Relaxed),
            stale: c.stale.load(Ordering::Relaxed),
            resurrected: c.resurrected.load(Ordering::Relaxed),
            fixed_hits: c.fixed_hits.load(Ordering::Relaxed),
            fixed_misses: c.fixed_misses.load(Ordering::Relaxed),
            failures: c.failures.lock().unwrap().clone(),
            direct_reads,
            anomalies: c.anomalies.lock().unwrap().clone(),
        }
    }
}

/// Checks a read of a mutable key against what the client last did to it.
fn check_read(counts: &Counts, key: &str, last: &Last, found: bool, value: &[u8]) {
    match (last, found) {
        (_, false) | (Last::Unknown, _) => {}
        (Last::Absent, true) => {
            counts.resurrected.fetch_add(1, Ordering::Relaxed);
            counts.anomaly(format!(
                "resurrected: {key} read {:?} after the client deleted it",
                String::from_utf8_lossy(value)
            ));
        }
        (Last::Value(v), true) => {
            if value != v.as_bytes() {
                counts.stale.fetch_add(1, Ordering::Relaxed);
                counts.anomaly(format!(
                    "stale: {key} read {:?}, last written {v:?}",
                    String::from_utf8_lossy(value)
                ));
            }
        }
    }
}

/// Checks a counter's value against the increments made: it may have lost
/// some (a cache may lose data), but it can never hold more than every
/// acknowledged and unknown increment together — that would be one
/// applied twice.
fn check_counter(counts: &Counts, value: i64, (acked, unknown): (i64, i64)) {
    if value > acked + unknown || value < 1 {
        counts.stale.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes the fixed keys through the orchestrator.
async fn preload(cache: &mut CacheClient<Channel>) {
    let entries = (0..FIXED_KEYS).map(|i| SetRequest {
        key: fixed_key(i),
        value: fixed_value(i).into_bytes().into(),
        ..Default::default()
    });
    integration_tests::store_all(cache, entries, 500).await;
}

/// How many fixed keys are gone, read after the faults.
async fn fixed_keys_lost(cache: &mut CacheClient<Channel>) -> usize {
    let mut lost = 0;
    for chunk in (0..FIXED_KEYS).collect::<Vec<_>>().chunks(500) {
        let keys = chunk.iter().map(|&i| fixed_key(i)).collect();
        let r = cache
            .get_many(GetManyRequest { keys })
            .await
            .unwrap()
            .into_inner();
        for (&i, r) in chunk.iter().zip(&r.results) {
            assert!(r.error.is_none(), "{}: {:?}", fixed_key(i), r.error);
            if !r.found {
                lost += 1;
            } else {
                assert_eq!(r.value, fixed_value(i).as_bytes(), "{}", fixed_key(i));
            }
        }
    }
    lost
}

fn print_row(case: &str, replicas: usize, report: &Report, lost: Option<usize>) {
    println!(
        "RELIABILITY | {case} | R={replicas} | {} | {} | {} | {} | {} | {:.2}% |",
        report.calls,
        report.failed,
        report.stale,
        report.resurrected,
        lost.map_or_else(|| "—".to_owned(), |l| l.to_string()),
        report.hit_ratio() * 100.0,
    );
    for failure in &report.failures {
        println!("  failed call: {failure}");
    }
    if report.direct_reads > 0 {
        println!("  reads sent straight to an owner: {}", report.direct_reads);
    }
    for anomaly in &report.anomalies {
        println!("  {anomaly}");
    }
}

/// Quick health settings plus a drain that lets the orchestrator see a
/// stopping node before its listener closes, as a pod's preStop would.
const NODE_ARGS: &[&str] = &["--drain-delay", "500ms", "--shutdown-grace", "5s"];

/// Every node stopped (SIGTERM, drained) and started again with the same
/// identity, one at a time, each after the orchestrator has warmed the
/// previous one — what a StatefulSet rolling update does.
async fn rolling_restart(replicas: usize) -> (Report, usize, f64) {
    let r = replicas.to_string();
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", &r]).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let load = Workload::start(cluster.orchestrator.cache().await, FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        cluster.stop_node(i).await;
        cluster.restart_node(i).await;
        // As a StatefulSet waits for readiness: here, for the orchestrator
        // to have copied the node's keys back.
        cluster.wait_node_warm(i).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    let lost = fixed_keys_lost(&mut cache).await;
    print_row(
        "rolling restart (SIGTERM, same id)",
        replicas,
        &report,
        Some(lost),
    );
    let metrics = cluster.orchestrator.process.scrape().await;
    let copied: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("ringcache_handoff_copies_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!((report.stale, report.resurrected), (0, 0), "{report:?}");
    (report, lost, copied)
}

#[tokio::test]
async fn a_rolling_restart_with_two_replicas_loses_no_key_and_fails_no_call() {
    let (report, lost, copied) = rolling_restart(2).await;
    assert_eq!(lost, 0, "keys lost by the rolling restart: {report:?}");
    assert!(
        copied >= 2.0 * FIXED_KEYS as f64 / 3.0,
        "each restarted node got its keys back by handoff: {copied}"
    );
}

/// With one copy, each stopping node hands its entries to the nodes that
/// take its keys while it is away (`Internal/Park`), and gets them back
/// when it returns: a rolling restart keeps the cache.
#[tokio::test]
async fn a_rolling_restart_with_one_replica_keeps_the_keys_and_serves_nothing_stale() {
    let (report, lost, _) = rolling_restart(1).await;
    assert!(
        lost * 100 <= FIXED_KEYS,
        "more than 1% of the keys lost by the rolling restart: {lost} of {FIXED_KEYS}: {report:?}"
    );
}

async fn kill_one(replicas: usize, mode: Mode) -> (Report, usize) {
    let r = replicas.to_string();
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", &r]).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let api = mode.api(&cluster.orchestrator).await;
    let load = Workload::through(vec![api], FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_node(1);
    cluster.wait_node_state(1, NodeState::Ejected).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    let lost = fixed_keys_lost(&mut cache).await;
    let case = format!("SIGKILL of one node{}", mode.label());
    print_row(&case, replicas, &report, Some(lost));
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!((report.stale, report.resurrected), (0, 0), "{report:?}");
    (report, lost)
}

#[tokio::test]
async fn a_killed_node_with_two_replicas_fails_no_call_and_loses_no_key() {
    let (report, lost) = kill_one(2, Mode::Unary).await;
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!(lost, 0, "{report:?}");
}

#[tokio::test]
async fn a_killed_node_under_pipelined_load_with_two_replicas_fails_no_call_and_loses_no_key() {
    let (report, lost) = kill_one(2, Mode::Piped).await;
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!(lost, 0, "{report:?}");
}

#[tokio::test]
async fn a_killed_node_under_direct_reads_with_two_replicas_fails_no_call_and_loses_no_key() {
    let (report, lost) = kill_one(2, Mode::Direct).await;
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!(lost, 0, "{report:?}");
}

/// With one copy the killed node's keys are gone (misses); nothing stale
/// is served. Calls that were on its connections when it died may fail
/// (counted in the row, not asserted).
#[tokio::test]
async fn a_killed_node_with_one_replica_serves_nothing_stale() {
    let (_, lost) = kill_one(1, Mode::Unary).await;
    assert!(lost > 0);
}

/// SIGSTOP for longer than ejection takes, then SIGCONT: the paused node
/// comes back holding values that were overwritten or deleted meanwhile.
async fn pause_and_resume(replicas: usize, mode: Mode) {
    let r = replicas.to_string();
    let cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", &r]).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let load = Workload::through(vec![mode.api(&cluster.orchestrator).await], FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused = &cluster.nodes[0].as_ref().unwrap().process;
    paused.signal("STOP");
    cluster.wait_node_state(0, NodeState::Ejected).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    paused.signal("CONT");
    cluster.wait_node_state(0, NodeState::Healthy).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    let lost = (replicas > 1).then_some(fixed_keys_lost(&mut cache).await);
    print_row(
        &format!("SIGSTOP past ejection, then SIGCONT{}", mode.label()),
        replicas,
        &report,
        lost,
    );
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.stale, 0, "stale reads: {report:?}");
    assert_eq!(report.resurrected, 0, "deleted keys read back: {report:?}");
    if let Some(lost) = lost {
        assert_eq!(lost, 0, "{report:?}");
    }
}

#[tokio::test]
async fn a_paused_node_with_one_replica_serves_nothing_stale_when_it_returns() {
    pause_and_resume(1, Mode::Unary).await;
}

#[tokio::test]
async fn a_paused_node_with_two_replicas_serves_nothing_stale_when_it_returns() {
    pause_and_resume(2, Mode::Unary).await;
}

/// The same with reads straight to the owners: the paused node is read
/// directly again only once it is up to date.
#[tokio::test]
async fn a_paused_node_under_direct_reads_serves_nothing_stale_when_it_returns() {
    pause_and_resume(1, Mode::Direct).await;
    pause_and_resume(2, Mode::Direct).await;
}

/// Scale-out through `--nodes-file`: the keys that move to the new node
/// keep hitting, read through to their previous owners and copied over.
#[tokio::test]
async fn adding_a_fourth_node_keeps_the_existing_keys_hitting() {
    scale_out(Mode::Unary).await;
}

/// The same under direct reads: while the new node warms its keys are
/// read through the orchestrator, then from it directly — never a value
/// it was copied before a later write or delete.
#[tokio::test]
async fn adding_a_fourth_node_under_direct_reads_keeps_keys_hitting_and_serves_nothing_stale() {
    scale_out(Mode::Direct).await;
}

async fn scale_out(mode: Mode) {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(NodeProcess::start(NODE_ARGS).await);
    }
    let dir = integration_tests::fresh_temp_dir("faults");
    let file = dir.join("nodes");
    let list = |nodes: &[NodeProcess]| {
        nodes
            .iter()
            .map(|n| format!("{}\n", n.addr()))
            .collect::<String>()
    };
    std::fs::write(&file, list(&nodes)).unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    let mut args = vec![
        "--nodes-file",
        file_arg.as_str(),
        "--dns-interval",
        "200ms",
        "--replicas",
        "2",
    ];
    args.extend_from_slice(integration_tests::FAST_HEALTH);
    let orchestrator = OrchestratorProcess::start(&args).await;
    let mut cache = orchestrator.cache().await;
    preload(&mut cache).await;
    let load = Workload::through(vec![mode.api(&orchestrator).await], FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;

    nodes.push(NodeProcess::start(NODE_ARGS).await);
    std::fs::write(&file, list(&nodes)).unwrap();
    let api = orchestrator.cluster().await;
    wait_for_nodes(&api, Duration::from_secs(30), |listed| {
        listed.len() == 4 && listed.iter().all(|n| !n.warming)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    let lost = fixed_keys_lost(&mut cache).await;
    let case = format!("adding a 4th node (--nodes-file){}", mode.label());
    print_row(&case, 2, &report, Some(lost));
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!((report.stale, report.resurrected), (0, 0), "{report:?}");
    assert!(
        report.hit_ratio() >= 0.99,
        "hit ratio of existing keys {:.4}: {report:?}",
        report.hit_ratio()
    );
    assert_eq!(lost, 0, "{report:?}");
    // The new node holds its share now, copied by the handoff.
    let stats = nodes[3]
        .node()
        .await
        .stats(ringcache_proto::v1::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let items = stats.total.unwrap().items;
    assert!(
        items as usize >= FIXED_KEYS / 3,
        "the new node holds {items} keys"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A write made while its owner was away lands on a stand-in. When the
/// owner is back it gets the key's writes and deletes again; should it
/// fail a second time, the stand-in must not serve its old copy of a key
/// deleted in between.
#[tokio::test]
async fn a_stand_in_copy_does_not_come_back_when_the_owner_fails_again() {
    let cluster = TestCluster::start_with(3, NODE_ARGS, &["--failover-ttl", "10m"]).await;
    let mut cache = cluster.orchestrator.cache().await;
    let owner = cluster.first_owner("k").await;
    let set = |value: &str| SetRequest {
        key: "k".into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    };
    cache.set(set("before")).await.unwrap();
    let paused = &cluster.nodes[owner].as_ref().unwrap().process;

    paused.signal("STOP");
    cluster.wait_node_state(owner, NodeState::Ejected).await;
    cache.set(set("while away")).await.unwrap();
    paused.signal("CONT");
    cluster.wait_node_state(owner, NodeState::Healthy).await;

    cache
        .delete(DeleteRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The stand-in's copy is retired and deleted: no node but the owner
    // holds the key.
    wait_until_only_the_owner_holds(&cluster, owner, "k", |_| true).await;
    paused.signal("STOP");
    cluster.wait_node_state(owner, NodeState::Ejected).await;
    let got = cache
        .get(GetRequest { key: "k".into() })
        .await
        .unwrap()
        .into_inner();
    paused.signal("CONT");
    assert!(
        !got.found,
        "a deleted key came back from the stand-in: {:?}",
        String::from_utf8_lossy(&got.value)
    );
}

/// Waits until no node of `cluster` but `owner` holds a copy of `key`
/// whose value `copy` matches (a stand-in's copy retired there).
async fn wait_until_only_the_owner_holds(
    cluster: &TestCluster,
    owner: usize,
    key: &str,
    copy: impl Fn(&[u8]) -> bool,
) {
    let others: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != owner).collect();
    integration_tests::eventually(Duration::from_secs(10), || {
        let (others, copy) = (&others, &copy);
        async move {
            for &i in others {
                let held = cluster
                    .node_cache(i)
                    .await
                    .get(GetRequest { key: key.into() })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if held.found && copy(&held.value) {
                    return Err(format!("node {i} still holds a copy of {key}"));
                }
            }
            Ok(())
        }
    })
    .await;
}

/// A counter's owner is killed while it is being incremented (R=2): every
/// acknowledged increment survives on the other owner, and none is
/// applied twice (a call whose outcome is unknown may count once or not
/// at all, never more).
#[tokio::test]
async fn increments_survive_their_primary_dying_and_never_count_twice() {
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", "2"]).await;
    let primary = cluster.first_owner("counter").await;
    let mut cache = cluster.orchestrator.cache().await;
    let (mut acked, mut unknown) = (0i64, 0i64);
    let increment = async |cache: &mut CacheClient<Channel>| {
        cache
            .increment(with_timeout(ringcache_proto::v1::IncrementRequest {
                key: "counter".into(),
                delta: 1,
                ..Default::default()
            }))
            .await
    };
    for round in 0..400 {
        if round == 150 {
            cluster.kill_node(primary);
        }
        match increment(&mut cache).await {
            Ok(_) => acked += 1,
            Err(_) => unknown += 1,
        }
    }
    let value: i64 = std::str::from_utf8(
        &cache
            .get(GetRequest {
                key: "counter".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .value,
    )
    .unwrap()
    .parse()
    .unwrap();
    println!(
        "RELIABILITY | increments, SIGKILL of the counter's primary | R=2 | {} | {unknown} | value {value} for {acked} acknowledged |",
        acked + unknown
    );
    assert!(
        value >= acked && value <= acked + unknown,
        "{value} after {acked} acknowledged and {unknown} unknown"
    );
}

/// The deadline services put on a cache call: far below `--node-timeout`.
const SHORT_DEADLINE: Duration = Duration::from_millis(150);

/// The orchestrator's default health settings (the tests' quick ones
/// would hide how long ejection really takes).
const DEFAULT_HEALTH: &[&str] = &[
    "--health-interval",
    "1s",
    "--health-timeout",
    "500ms",
    "--eject-after",
    "3",
    "--eject-backoff",
    "1s",
    "--eject-max-backoff",
    "30s",
    "--node-timeout",
    "1s",
    "--connect-timeout",
    "1s",
];

/// Gets of the fixed keys with a 150 ms deadline from several tasks, each
/// call recorded with when it started and whether it failed.
struct ShortDeadlineReads {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(std::time::Instant, bool)>>>,
}

impl ShortDeadlineReads {
    fn start(cache: CacheClient<Channel>, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..tasks)
            .map(|t| {
                let (stop, mut cache) = (stop.clone(), cache.clone());
                tokio::spawn(async move {
                    let mut calls = Vec::new();
                    let mut i = t * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i + 104_729) % FIXED_KEYS;
                        let mut request = tonic::Request::new(GetRequest { key: fixed_key(i) });
                        request.set_timeout(SHORT_DEADLINE);
                        let started = std::time::Instant::now();
                        let ok = match cache.get(request).await {
                            Ok(r) => {
                                let r = r.into_inner();
                                // A miss is an answer; a wrong value is not.
                                assert!(!r.found || r.value == fixed_value(i).as_bytes());
                                true
                            }
                            Err(_) => false,
                        };
                        calls.push((started, !ok));
                    }
                    calls
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the load; every call, in start order.
    async fn finish(self) -> Vec<(std::time::Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        for t in self.tasks {
            calls.extend(t.await.unwrap());
        }
        calls.sort_by_key(|c| c.0);
        calls
    }
}

/// Failed calls and calls among those started in `[from, to)`.
fn failures_between(
    calls: &[(std::time::Instant, bool)],
    from: std::time::Instant,
    to: std::time::Instant,
) -> (usize, usize) {
    let window: Vec<_> = calls
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .collect();
    (window.iter().filter(|(_, f)| *f).count(), window.len())
}

/// Prints the failures of each 2 s window from `start`.
fn print_windows(calls: &[(std::time::Instant, bool)], start: std::time::Instant) {
    let Some(last) = calls.last().map(|c| c.0) else {
        return;
    };
    let mut from = start;
    while from < last {
        let to = from + Duration::from_secs(2);
        let (failed, total) = failures_between(calls, from, to);
        println!(
            "  {:>4.1}-{:.1} s: {failed} of {total} calls failed",
            (from - start).as_secs_f64(),
            (to - start).as_secs_f64()
        );
        from = to;
    }
}

/// A node hangs (SIGSTOP) under callers with 150 ms deadlines and the
/// orchestrator's default health settings (`--node-timeout 1s`): every
/// call to it is cut by the caller's deadline, which proves nothing about
/// the node, so the orchestrator probes it at once. It is ejected within
/// `--eject-after` × `--health-timeout` plus a deadline (1.65 s with the
/// defaults; asserted with room for a loaded machine: 3 s), and no call
/// started after that fails: with R=1 its keys miss.
#[tokio::test]
async fn a_hung_node_is_ejected_under_short_client_deadlines_and_then_no_call_fails() {
    let cluster = TestCluster::start_with(3, NODE_ARGS, DEFAULT_HEALTH).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let load = ShortDeadlineReads::start(cluster.orchestrator.cache().await, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused = &cluster.nodes[0].as_ref().unwrap().process;
    let stopped = std::time::Instant::now();
    paused.signal("STOP");
    cluster.wait_node_state(0, NodeState::Ejected).await;
    let ejected = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = load.finish().await;
    paused.signal("CONT");
    let took = ejected - stopped;
    let (failed_after, total_after) = failures_between(&calls, ejected, std::time::Instant::now());
    let (failed_before, total_before) = failures_between(&calls, stopped, ejected);
    println!(
        "RELIABILITY | SIGSTOP, 150 ms client deadlines, default health | R=1 | ejected after {:.2} s | {failed_before} of {total_before} calls failed before ejection, {failed_after} of {total_after} after |",
        took.as_secs_f64()
    );
    print_windows(&calls, stopped);
    assert!(took < Duration::from_secs(3), "ejected only after {took:?}");
    assert!(total_after > 100, "too little load: {total_after}");
    assert_eq!(failed_after, 0, "calls failed after the ejection");
}

/// Hedged reads: with R=2 and one owner hung for 12 s under callers with
/// 150 ms deadlines, reads whose first owner is the hung node are also sent
/// to their second owner after the hedge delay, so at most 1% of calls
/// fail over the whole hang — including the time before the ejection.
#[tokio::test]
async fn hedged_reads_keep_a_hung_owner_from_failing_calls() {
    let mut args = DEFAULT_HEALTH.to_vec();
    args.extend(["--replicas", "2"]);
    let cluster = TestCluster::start_with(3, NODE_ARGS, &args).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let load = ShortDeadlineReads::start(cluster.orchestrator.cache().await, 8);
    // Long enough for the hedge delay to follow the observed latency.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paused = &cluster.nodes[0].as_ref().unwrap().process;
    let stopped = std::time::Instant::now();
    paused.signal("STOP");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let resumed = std::time::Instant::now();
    let calls = load.finish().await;
    paused.signal("CONT");
    let metrics = cluster.orchestrator.process.scrape().await;
    let hedged = metric_value(&metrics, "ringcache_hedged_keys_total", &[]).unwrap_or(0.0);
    let wins = metric_value(&metrics, "ringcache_hedge_wins_total", &[]).unwrap_or(0.0);
    let (failed, total) = failures_between(&calls, stopped, resumed);
    println!(
        "RELIABILITY | SIGSTOP for 12 s, 150 ms client deadlines, hedged reads | R=2 | {failed} of {total} calls failed ({:.2}%) | {hedged} keys hedged, {wins} won |",
        failed as f64 * 100.0 / total.max(1) as f64
    );
    print_windows(&calls, stopped);
    assert!(total > 500, "too little load: {total}");
    assert!(wins > 0.0, "no hedge ever answered first");
    assert!(
        failed * 100 <= total,
        "{failed} of {total} calls failed during the hang"
    );
}

/// `n` more orchestrators over `cluster`'s nodes, with `args`.
async fn more_orchestrators(
    cluster: &TestCluster,
    n: usize,
    args: &[&str],
) -> Vec<OrchestratorProcess> {
    let mut others = Vec::new();
    for _ in 0..n {
        others.push(TestCluster::orchestrator_for(&cluster.node_addrs, args).await);
    }
    others
}

/// Waits until `o` reports the node at `address` in a state `ok` accepts.
async fn wait_node_on(
    o: &OrchestratorProcess,
    address: &str,
    ok: impl Fn(&ringcache_proto::v1::NodeInfo) -> bool,
) {
    let cluster = o.cluster().await;
    wait_for_nodes(&cluster, Duration::from_secs(30), |nodes| {
        nodes.iter().find(|n| n.address == address).is_some_and(&ok)
    })
    .await;
}

/// A rolling restart of every node under load spread over
/// `orchestrators` orchestrators, each call to one picked at random; each
/// node is restarted once every orchestrator has warmed the previous one.
/// Returns the fixed keys lost.
/// For a failure's post-mortem: each node's changes of the keys named in
/// `report`'s anomalies, as far as its feed still holds them (this
/// incarnation), and who served each key now.
async fn key_histories(cluster: &TestCluster, report: &Report) -> String {
    use ringcache_proto::v1::{ChangesRequest, StatsRequest, internal_client::InternalClient};
    let mut keys: Vec<String> = report
        .anomalies
        .iter()
        .filter_map(|a| {
            let rest = a
                .split_once("resurrected: ")
                .or_else(|| a.split_once("stale: "))?
                .1;
            Some(rest.split(' ').next()?.to_owned())
        })
        .collect();
    keys.sort();
    keys.dedup();
    let mut out = String::new();
    for addr in &cluster.node_addrs {
        let url = format!("http://{addr}");
        let Ok(mut node) = ringcache_proto::v1::node_client::NodeClient::connect(url.clone()).await
        else {
            continue;
        };
        let Ok(stats) = node.stats(StatsRequest {}).await else {
            continue;
        };
        let incarnation = stats.into_inner().incarnation;
        let Ok(mut internal) = InternalClient::connect(url).await else {
            continue;
        };
        let Ok(stream) = internal
            .changes(ChangesRequest {
                incarnation,
                after: 0,
            })
            .await
        else {
            continue;
        };
        let mut stream = stream.into_inner();
        let mut lines = Vec::new();
        while let Ok(Ok(Some(batch))) =
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        {
            if batch.gap {
                lines.push("  (gap: the start of its history is gone)".to_owned());
            }
            let mut last = 0;
            for c in batch.changes {
                last = c.sequence;
                if keys.contains(&c.key) {
                    lines.push(format!(
                        "  #{} {:?} {} version {} {}",
                        c.sequence,
                        c.kind(),
                        c.key,
                        c.version,
                        c.owner
                    ));
                }
            }
            if last >= batch.head {
                break;
            }
        }
        out.push_str(&format!("node {addr} (incarnation {incarnation}):\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

async fn rolling_restart_spread(orchestrators: usize, replicas: usize, mode: Mode) -> usize {
    let r = replicas.to_string();
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", &r]).await;
    let others = more_orchestrators(&cluster, orchestrators - 1, &["--replicas", &r]).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let mut apis = Vec::new();
    for o in std::iter::once(&cluster.orchestrator).chain(&others) {
        apis.push(mode.api(o).await);
    }
    let load = Workload::through(apis, FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        cluster.stop_node(i).await;
        cluster.restart_node(i).await;
        cluster.wait_node_warm(i).await;
        for o in &others {
            wait_node_on(o, &cluster.node_addrs[i], |n| {
                n.state() == NodeState::Healthy && !n.warming
            })
            .await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    let lost = fixed_keys_lost(&mut cache).await;
    print_row(
        &format!(
            "rolling restart, {orchestrators} orchestrators, calls spread{}",
            mode.label()
        ),
        replicas,
        &report,
        Some(lost),
    );
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    if report.stale + report.resurrected > 0 {
        println!("{}", key_histories(&cluster, &report).await);
    }
    assert_eq!((report.stale, report.resurrected), (0, 0), "{report:?}");
    if replicas > 1 {
        assert_eq!(lost, 0, "{report:?}");
    } else {
        // One copy: kept by the stopping nodes' hand-over.
        assert!(
            lost * 100 <= FIXED_KEYS,
            "more than 1% of the keys lost: {lost} of {FIXED_KEYS}: {report:?}"
        );
    }
    lost
}

#[tokio::test]
async fn a_rolling_restart_under_two_orchestrators_fails_loses_and_serves_stale_nothing() {
    rolling_restart_spread(2, 2, Mode::Unary).await;
}

/// The same through the Rust client's pipelines: the guarantees hold for
/// pipelined calls too.
#[tokio::test]
async fn a_rolling_restart_under_pipelined_load_fails_loses_and_serves_stale_nothing() {
    rolling_restart_spread(2, 2, Mode::Piped).await;
}

/// And with reads straight to the owners, each client following its own
/// orchestrator's topology.
#[tokio::test]
async fn a_rolling_restart_under_direct_reads_fails_loses_and_serves_stale_nothing() {
    rolling_restart_spread(2, 2, Mode::Direct).await;
}

#[tokio::test]
async fn a_rolling_restart_under_three_orchestrators_fails_loses_and_serves_stale_nothing() {
    rolling_restart_spread(3, 2, Mode::Unary).await;
}

/// The chart's defaults: one copy of each key, two orchestrators. Each
/// stopping node's entries are claimed by one of them and kept on the
/// nodes that take its keys; the other learns of it from the feeds. Keys
/// are kept (0 lost in 18 runs), but a few reads per run can be stale in
/// the readmission skew (README, "Known gaps"; RELIABILITY.md has the
/// figures, and the same rows without parking): run with `--ignored`.
#[tokio::test]
#[ignore = "known gap: the readmission skew between orchestrators with --replicas 1 (README, Known gaps)"]
async fn a_rolling_restart_with_one_replica_under_two_orchestrators_keeps_the_keys() {
    rolling_restart_spread(2, 1, Mode::Unary).await;
}

/// The same with reads straight to the owners.
#[tokio::test]
#[ignore = "known gap: the readmission skew between orchestrators with --replicas 1 (README, Known gaps)"]
async fn a_rolling_restart_with_one_replica_under_direct_reads_keeps_the_keys() {
    rolling_restart_spread(2, 1, Mode::Direct).await;
}

#[tokio::test]
#[ignore = "known gap: the readmission skew between orchestrators with --replicas 1 (README, Known gaps)"]
async fn a_rolling_restart_with_one_replica_under_three_orchestrators_keeps_the_keys() {
    rolling_restart_spread(3, 1, Mode::Unary).await;
}

/// SIGSTOP past ejection with one replica, under load spread over two
/// orchestrators: a key written or deleted through one while its owner
/// was away is read through the other, during the outage and after the
/// owner returns. Nothing stale, nothing deleted comes back.
#[tokio::test]
async fn a_paused_owner_under_two_orchestrators_serves_nothing_stale_when_it_returns() {
    paused_owner_two_orchestrators(Mode::Unary).await;
}

/// The same with clients that read straight from the owners, each
/// following one of the two orchestrators.
#[tokio::test]
async fn a_paused_owner_under_two_orchestrators_and_direct_reads_serves_nothing_stale() {
    paused_owner_two_orchestrators(Mode::Direct).await;
}

async fn paused_owner_two_orchestrators(mode: Mode) {
    let cluster = TestCluster::start_with(3, NODE_ARGS, &["--replicas", "1"]).await;
    let others = more_orchestrators(&cluster, 1, &["--replicas", "1"]).await;
    let b = &others[0];
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let load = Workload::through(
        vec![mode.api(&cluster.orchestrator).await, mode.api(b).await],
        FIXED_KEYS,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused = &cluster.nodes[0].as_ref().unwrap().process;
    paused.signal("STOP");
    cluster.wait_node_state(0, NodeState::Ejected).await;
    wait_node_on(b, &cluster.node_addrs[0], |n| {
        n.state() == NodeState::Ejected
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    paused.signal("CONT");
    cluster.wait_node_state(0, NodeState::Healthy).await;
    wait_node_on(b, &cluster.node_addrs[0], |n| {
        n.state() == NodeState::Healthy
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    print_row(
        &format!(
            "SIGSTOP past ejection, then SIGCONT; 2 orchestrators, calls spread{}",
            mode.label()
        ),
        1,
        &report,
        None,
    );
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.stale, 0, "stale reads: {report:?}");
    assert_eq!(report.resurrected, 0, "deleted keys read back: {report:?}");
}

/// The reproduction: R=1, two nodes, orchestrators A and B. Keys
/// are set; the owner of some freezes and is ejected; every key is
/// deleted through A; A is killed (a pod replaced by a deploy) before the
/// owner comes back. Through B — and through an orchestrator started
/// only afterwards — none of the deleted keys is served: what the owner
/// missed was recorded on the node that took the deletes, not only in
/// A's memory.
#[tokio::test]
async fn deletes_outlive_the_orchestrator_that_made_them() {
    let mut cluster = TestCluster::start_with(2, NODE_ARGS, &["--replicas", "1"]).await;
    let b = more_orchestrators(&cluster, 1, &["--replicas", "1"])
        .await
        .remove(0);
    let mut through_a = cluster.orchestrator.cache().await;
    let keys: Vec<String> = (0..64).map(|i| format!("doomed-{i}")).collect();
    let mut frozen_keys = 0;
    for k in &keys {
        through_a
            .set(SetRequest {
                key: k.clone(),
                value: b"alive".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap();
        frozen_keys += usize::from(cluster.first_owner(k).await == 0);
    }
    assert!(frozen_keys > 0);
    let frozen = &cluster.nodes[0].as_ref().unwrap().process;
    frozen.signal("STOP");
    cluster.wait_node_state(0, NodeState::Ejected).await;
    for k in &keys {
        through_a
            .delete(with_timeout(DeleteRequest {
                key: k.clone(),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    // The record is on the node that took the deletes.
    let holder = cluster.nodes[1].as_ref().unwrap();
    let recorded = metric_value(&holder.process.scrape().await, "ringcache_debts_keys", &[]);
    assert_eq!(recorded, Some(frozen_keys as f64), "debts on the holder");
    // A goes away with everything it knew.
    let a = std::mem::replace(
        &mut cluster.orchestrator,
        TestCluster::orchestrator_for(&cluster.node_addrs, &["--replicas", "1"]).await,
    );
    drop(a);
    let late = &cluster.orchestrator;
    frozen.signal("CONT");
    wait_node_on(&b, &cluster.node_addrs[0], |n| {
        n.state() == NodeState::Healthy
    })
    .await;
    cluster.wait_node_state(0, NodeState::Healthy).await;
    let mut resurrected = Vec::new();
    for o in [&b, late] {
        let mut cache = o.cache().await;
        for k in &keys {
            let r = cache
                .get(with_timeout(GetRequest { key: k.clone() }))
                .await
                .unwrap()
                .into_inner();
            if r.found {
                resurrected.push(k.clone());
            }
        }
    }
    // And by a client reading straight from the owners.
    let direct = Api::client(&b, true).await;
    for k in &keys {
        if direct.get(k).await.unwrap().0 {
            resurrected.push(format!("{k} (direct)"));
        }
    }
    println!(
        "RELIABILITY | orchestrator A killed before the owner returns (64 keys deleted through A, {frozen_keys} of them owned by the frozen node) | R=1 | read through B, a new orchestrator and a direct client: {} resurrected |",
        resurrected.len()
    );
    assert!(
        resurrected.is_empty(),
        "deleted keys served again: {resurrected:?}"
    );
    // Settled: the holder keeps no record once the owner is up to date.
    integration_tests::eventually(Duration::from_secs(10), || async {
        match metric_value(&holder.process.scrape().await, "ringcache_debts_keys", &[]) {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

/// The stand-in case across orchestrators: the owner of a key freezes, A
/// writes the key (it lands on the next node, a stand-in) and is killed.
/// The owner returns; B brings it up to date from the stand-in's debt
/// records — and deletes the stand-in's copy, which only A knew it had
/// written. A newer value is written through B, the owner freezes again:
/// a read through B must not find the stand-in's old copy.
#[tokio::test]
async fn a_stand_in_copy_written_by_a_dead_orchestrator_does_not_come_back() {
    let args = ["--failover-ttl", "10m"];
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &args).await;
    let b = more_orchestrators(&cluster, 1, &args).await.remove(0);
    let owner = cluster.first_owner("k").await;
    let set = |value: &str| SetRequest {
        key: "k".into(),
        value: value.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let mut through_a = cluster.orchestrator.cache().await;
    through_a.set(set("before")).await.unwrap();
    let paused = &cluster.nodes[owner].as_ref().unwrap().process;
    paused.signal("STOP");
    cluster.wait_node_state(owner, NodeState::Ejected).await;
    through_a
        .set(with_timeout(set("while away")))
        .await
        .unwrap();
    // A goes away; a fresh orchestrator takes its place in the harness.
    drop(std::mem::replace(
        &mut cluster.orchestrator,
        TestCluster::orchestrator_for(&cluster.node_addrs, &args).await,
    ));
    paused.signal("CONT");
    wait_node_on(&b, &cluster.node_addrs[owner], |n| {
        n.state() == NodeState::Healthy
    })
    .await;
    let mut through_b = b.cache().await;
    through_b.set(with_timeout(set("after"))).await.unwrap();
    // No node but the owner holds the key's old copy.
    wait_until_only_the_owner_holds(&cluster, owner, "k", |v| v == b"while away").await;
    paused.signal("STOP");
    wait_node_on(&b, &cluster.node_addrs[owner], |n| {
        n.state() == NodeState::Ejected
    })
    .await;
    let got = through_b
        .get(with_timeout(GetRequest { key: "k".into() }))
        .await
        .unwrap()
        .into_inner();
    paused.signal("CONT");
    assert!(
        !(got.found && got.value.as_ref() == b"while away"),
        "the stand-in's copy, written by an orchestrator that died, came back"
    );
}

/// The orchestrator is deployed again under pipelined load: SIGTERM (it
/// drains: every op it read is answered, its streams end cleanly), and a
/// new one starts on the same address. The Rust client sends the calls
/// that never ran again once the new orchestrator answers: no call fails,
/// nothing stale is served.
#[tokio::test]
async fn an_orchestrator_restart_under_pipelined_load_fails_no_call() {
    orchestrator_restart(Mode::Piped).await;
}

/// The same with direct reads: the client's topology stream ends with
/// the orchestrator; reads go through the new one until it follows again.
#[tokio::test]
async fn an_orchestrator_restart_under_direct_reads_fails_no_call() {
    orchestrator_restart(Mode::Direct).await;
}

async fn orchestrator_restart(mode: Mode) {
    let args = ["--replicas", "2", "--drain-delay", "300ms"];
    let mut cluster = TestCluster::start_with(3, NODE_ARGS, &args).await;
    let mut cache = cluster.orchestrator.cache().await;
    preload(&mut cache).await;
    let api = mode.api(&cluster.orchestrator).await;
    let load = Workload::through(vec![api], FIXED_KEYS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = cluster.orchestrator.addr();
    cluster.orchestrator.process.signal_term();
    assert!(
        cluster
            .orchestrator
            .process
            .exited(Duration::from_secs(15))
            .await
            .is_some(),
        "the orchestrator drained and exited"
    );
    let nodes = cluster.node_addrs.join(",");
    let mut restarted: Vec<&str> = vec!["--listen", &addr, "--nodes", &nodes];
    restarted.extend(integration_tests::FAST_HEALTH);
    restarted.extend(args);
    cluster.orchestrator = OrchestratorProcess::start(&restarted).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.finish().await;
    print_row(
        &format!(
            "orchestrator restarted (SIGTERM, drained, same address){}",
            mode.label()
        ),
        2,
        &report,
        None,
    );
    report.check_mode(mode);
    assert!(report.calls > 100, "{report:?}");
    assert_eq!(report.avoidable_failures(), 0, "{report:?}");
    assert_eq!((report.stale, report.resurrected), (0, 0), "{report:?}");
}
