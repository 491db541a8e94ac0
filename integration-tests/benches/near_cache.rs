//! What a near-cache hit costs the caller: `Client::get` of a key the
//! near cache holds, against a real cluster (3 nodes and an orchestrator)
//! whose feeds keep it fresh, next to the same `get` with the near cache
//! off in direct mode (one round trip to the owner) for scale.
//!
//! ```sh
//! cargo bench -p integration-tests --bench near_cache
//! ```
//!
//! A hit completes without waiting for anything, so it is polled once on
//! this thread: the figure is the client's own work (the freshness check,
//! the cache lookup, the copy of the answer's handle), no runtime hop.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    future::Future,
    task::{Context, Poll, Waker},
    time::Duration,
};

use criterion::{Criterion, criterion_group, criterion_main};
use integration_tests::TestCluster;
use ringcache_client::Client;

/// Polls `future` once; a near-cache hit is ready at once.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_cluster, near, direct) = rt.block_on(async {
        let cluster = TestCluster::start(3, &[]).await;
        let url = cluster.orchestrator.process.grpc_url();
        let near = Client::builder(url.clone())
            .near_cache_bytes(64 << 20)
            .connect()
            .await
            .unwrap();
        let direct = Client::builder(url).direct(true).connect().await.unwrap();
        near.set("user:42", vec![7u8; 100]).await.unwrap();
        // Until the feeds are followed and the answer is kept.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while near.near_cache_stats().hits == 0 {
            near.get("user:42").await.unwrap();
            assert!(tokio::time::Instant::now() < deadline, "never a hit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (cluster, near, direct)
    });
    c.bench_function("near_cache_hit_100B", |b| {
        b.iter(|| {
            // A miss would wait for the network: only a hit is ready.
            let got = ready(near.get("user:42")).expect("a hit completes at once");
            assert!(got.unwrap().is_some());
        });
    });
    c.bench_function("direct_get_100B_one_round_trip", |b| {
        b.iter(|| rt.block_on(direct.get("user:42")).unwrap().unwrap());
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
