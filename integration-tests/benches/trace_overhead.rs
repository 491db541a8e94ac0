//! What tracing costs: `Get` throughput and server CPU per call through the
//! orchestrator (3 cache nodes) with tracing off, on at 100% sampling and on
//! at 1%, exporting to a real Jaeger. The three set-ups are measured in
//! interleaved rounds in one run, so machine noise spreads over all of them.
//!
//! ```sh
//! cargo bench -p integration-tests --bench trace_overhead            # full run
//! cargo bench -p integration-tests --bench trace_overhead -- --rounds 5 --seconds 10
//! cargo bench -p integration-tests --bench trace_overhead -- --calibrate  # three identical set-ups
//! ```
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it makes a
//! short smoke run, so the harness cannot rot; no run asserts any timing.
//!
//! The load comes from this process: `--concurrency` tonic calls in flight
//! over 4 HTTP/2 connections. Its own cost is the same in every set-up; the
//! figure that does not depend on it is the servers' CPU time per call (user
//! + system time of the orchestrator and node processes, from /proc).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use integration_tests::{
    TestCluster,
    bench::{Args, closed_loop, cpu_seconds},
    jaeger::Jaeger,
};
use ringcache_proto::v1::{GetRequest, SetManyRequest, SetRequest, cache_client::CacheClient};
use tonic::transport::Channel;

const KEYS: usize = 10_000;

struct Options {
    /// Run three identical tracing-off set-ups: shows the noise floor.
    calibrate: bool,
    rounds: usize,
    seconds: u64,
    concurrency: usize,
}

fn options() -> Options {
    let args = Args::from_env();
    let full = args.flag("--bench");
    let value = |name: &str| args.value::<usize>(name);
    Options {
        calibrate: args.flag("--calibrate"),
        rounds: value("--rounds").unwrap_or(if full { 3 } else { 1 }),
        seconds: value("--seconds").map_or(if full { 8 } else { 1 }, |s| s as u64),
        concurrency: value("--concurrency").unwrap_or(if full { 32 } else { 4 }),
    }
}

fn server_cpu(cluster: &TestCluster) -> f64 {
    cpu_seconds(cluster.orchestrator.process.pid())
        + cluster
            .nodes
            .iter()
            .flatten()
            .map(|n| cpu_seconds(n.process.pid()))
            .sum::<f64>()
}

/// Runs Gets for `seconds` with the shared load generator; returns
/// (calls, errors).
async fn load(clients: &[CacheClient<Channel>], concurrency: usize, seconds: u64) -> (u64, u64) {
    let clients = clients.to_vec();
    let r = closed_loop(
        concurrency,
        Duration::from_secs(seconds),
        u64::MAX,
        move |t, i| {
            let mut client = clients[t % clients.len()].clone();
            async move {
                let key = format!("key:{}", (t + i as usize * 7919) % KEYS);
                client.get(GetRequest { key }).await.is_ok()
            }
        },
    )
    .await;
    (r.calls, r.errors)
}

struct Setup {
    name: &'static str,
    cluster: TestCluster,
    clients: Vec<CacheClient<Channel>>,
    ops_per_sec: Vec<f64>,
    cpu_us_per_op: Vec<f64>,
}

#[tokio::main]
async fn main() {
    let opts = options();
    let jaeger = Jaeger::start().await;
    let endpoint = jaeger.otlp_grpc.clone();
    let configs: [(&str, Vec<(&str, &str)>); 3] = if opts.calibrate {
        [
            ("off (A)", vec![]),
            ("off (B)", vec![]),
            ("off (C)", vec![]),
        ]
    } else {
        [
            ("tracing off", vec![]),
            (
                "on, 100% sampled",
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                    ("OTEL_TRACES_SAMPLER", "always_on"),
                ],
            ),
            (
                "on, 1% sampled",
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                ],
            ),
        ]
    };
    let mut setups = Vec::new();
    // Started in reverse order, then measured in table order: a set-up's
    // figures must not depend on when its processes were started.
    for (name, env) in configs.into_iter().rev() {
        let cluster = TestCluster::start_with_env(3, &[], &[], &env).await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(cluster.orchestrator.cache().await);
        }
        // Every Get is a hit.
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
            let entries = chunk
                .iter()
                .map(|i| SetRequest {
                    key: format!("key:{i}"),
                    value: vec![0x42; 100].into(),
                    ..Default::default()
                })
                .collect();
            clients[0]
                .set_many(SetManyRequest { entries })
                .await
                .unwrap();
        }
        setups.push(Setup {
            name,
            cluster,
            clients,
            ops_per_sec: vec![],
            cpu_us_per_op: vec![],
        });
    }
    setups.reverse();
    eprintln!(
        "{} rounds of {}s per set-up, {} calls in flight, 100-byte values",
        opts.rounds, opts.seconds, opts.concurrency
    );
    for round in 0..opts.rounds {
        // Each round starts with a different set-up, so no set-up always
        // runs right after another's load.
        let n = setups.len();
        for k in 0..n {
            let s = &mut setups[(round + k) % n];
            let cpu_before = server_cpu(&s.cluster);
            let start = Instant::now();
            let (calls, errors) = load(&s.clients, opts.concurrency, opts.seconds).await;
            let elapsed = start.elapsed().as_secs_f64();
            let cpu = server_cpu(&s.cluster) - cpu_before;
            assert_eq!(errors, 0, "{}: {errors} calls failed", s.name);
            s.ops_per_sec.push(calls as f64 / elapsed);
            s.cpu_us_per_op.push(cpu * 1e6 / calls.max(1) as f64);
            eprintln!(
                "round {round} {:<18} {:>9.0} calls/s {:>7.1} µs server CPU per call",
                s.name,
                calls as f64 / elapsed,
                cpu * 1e6 / calls.max(1) as f64
            );
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_ops = median(&setups[0].ops_per_sec);
    let base_cpu = median(&setups[0].cpu_us_per_op);
    println!("| set-up | Get calls/s (median) | vs off | server CPU per call | vs off |");
    println!("| --- | --- | --- | --- | --- |");
    for s in &setups {
        let ops = median(&s.ops_per_sec);
        let cpu = median(&s.cpu_us_per_op);
        println!(
            "| {} | {:.0} | {:.2}× | {:.1} µs | {:.2}× |",
            s.name,
            ops,
            ops / base_ops,
            cpu,
            cpu / base_cpu
        );
    }
}
