//! Pieces the benchmarks share: a closed-loop gRPC load generator that
//! records latencies, and CPU time of processes from `/proc`.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The benchmark binaries' command line: `--bench` (set by `cargo bench`;
/// without it `cargo test` runs a smoke pass), flags and `--name value`
/// options.
#[derive(Debug, Clone)]
pub struct Args(Vec<String>);

impl Args {
    /// This process' arguments.
    pub fn from_env() -> Self {
        Args(std::env::args().collect())
    }

    /// Whether `--name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The value after `--name`, parsed.
    pub fn value<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .and_then(|v| v.parse().ok())
    }
}

/// User + system CPU seconds of process `pid` (0 if it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // Linux reports clock ticks, 100 per second on every current system.
    ticks / 100.0
}

/// Total CPU seconds of several processes.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// What one load run measured.
#[derive(Debug, Clone, Copy)]
pub struct LoadResult {
    /// Calls that succeeded.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

impl LoadResult {
    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

/// Runs `concurrency` closed loops of `call(task, i)` for `duration` (or
/// until `max_calls` calls in all), recording each call's latency.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    duration: Duration,
    max_calls: u64,
    call: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let per_task = max_calls.div_ceil(concurrency as u64).max(1);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (call, stop) = (call.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                let mut errors = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < per_task {
                    let begin = Instant::now();
                    if call(t, i).await {
                        latencies.push(begin.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                    i += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    timer.abort();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            f64::from(all[((all.len() - 1) as f64 * p) as usize])
        }
    };
    LoadResult {
        calls: all.len() as u64,
        errors,
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}
