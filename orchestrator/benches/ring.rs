//! How long locating a key takes: the first owner, and the full preference
//! order (what a read or write computes), for clusters of 3 to 100 nodes.
//!
//! ```sh
//! cargo bench -p orchestrator --bench ring
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use orchestrator::ring::{NodeId, Ring};

fn bench(c: &mut Criterion) {
    let keys: Vec<String> = (0..10_000).map(|i| format!("user:{i:08}")).collect();
    let mut group = c.benchmark_group("ring");
    for nodes in [3usize, 10, 30, 100] {
        let ring = Ring::new((0..nodes).map(|i| NodeId::from(format!("cache-{i}:50061"))));
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("primary", nodes), &ring, |b, ring| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(ring.primary(&keys[i]))
            })
        });
        // What the router computes: the first few nodes in preference order.
        group.bench_with_input(BenchmarkId::new("owners_4", nodes), &ring, |b, ring| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(ring.owners(&keys[i], 4))
            })
        });
        group.bench_with_input(BenchmarkId::new("preference", nodes), &ring, |b, ring| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(ring.preference(&keys[i]))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
