//! What hot-key detection costs per call: `HotKeys::record` over a uniform
//! key space (the sketch's worst case: almost every counted call misses
//! the sketch and evicts a slot) and over one hot key.
//!
//! ```sh
//! cargo bench -p orchestrator --bench hotkeys
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use orchestrator::hotkeys::{Access, HotKeys};

fn bench(c: &mut Criterion) {
    let keys: Vec<String> = (0..100_000).map(|i| format!("user:{i:08}")).collect();
    let mut group = c.benchmark_group("hotkeys");
    let uniform = HotKeys::new(Duration::from_secs(1), 1000.0, None);
    let mut i = 0;
    group.bench_function("record_uniform", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            uniform.record(black_box(&keys[i]), Access::Read);
        })
    });
    let skewed = HotKeys::new(Duration::from_secs(1), 1000.0, None);
    group.bench_function("record_one_hot_key", |b| {
        b.iter(|| skewed.record(black_box("celebrity"), Access::Read))
    });
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
