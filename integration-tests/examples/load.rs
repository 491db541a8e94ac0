//! Drives `Get` load at a running server, for profiling:
//!
//! ```sh
//! cargo run --release -p integration-tests --example load -- 127.0.0.1:50051 10 32
//! ```
//!
//! Arguments: address, seconds (default 10), calls in flight (default 32).
//! Prints calls per second and latency percentiles.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use integration_tests::bench::closed_loop;
use ringcache_proto::v1::{GetRequest, cache_client::CacheClient};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let concurrency: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let client = CacheClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let r = closed_loop(
        concurrency,
        Duration::from_secs(seconds),
        u64::MAX,
        move |t, i| {
            let mut c = client.clone();
            async move {
                c.get(GetRequest {
                    key: format!("key:{}", (t as u64 * 7919 + i) % 10_000),
                })
                .await
                .is_ok()
            }
        },
    )
    .await;
    println!(
        "{:.0} calls/s, {} errors, p50 {:.0} µs, p99 {:.0} µs",
        r.rate(),
        r.errors,
        r.p50_us,
        r.p99_us
    );
}
