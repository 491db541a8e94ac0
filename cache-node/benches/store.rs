//! Benchmarks of the store alone (no gRPC): get hit, get miss and set on a
//! store holding 1M entries of 100-byte values, on one thread and on all
//! threads at once.
//!
//! ```sh
//! cargo bench -p cache-node --bench store
//! ```
//!
//! The multi-threaded cases report total operations per second over all
//! threads, so throughput that grows with threads shows as a larger
//! figure than the single-threaded one.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    hint::black_box,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use cache_node::store::{Condition, Store, StoreConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const ITEMS: usize = 1_000_000;
const VALUE: [u8; 100] = [0x5a; 100];

fn key(i: usize) -> String {
    format!("key:{i:09}")
}

/// A store filled with `ITEMS` entries, and the keys (hits) plus as many
/// keys that are absent (misses).
fn filled() -> (Arc<Store>, Arc<Vec<String>>, Arc<Vec<String>>) {
    let store = Store::new(StoreConfig {
        capacity: 2 << 30,
        shards: 16,
    })
    .unwrap();
    let hits: Vec<String> = (0..ITEMS).map(key).collect();
    for k in &hits {
        store.set(k, &VALUE, None, Condition::Always).unwrap();
    }
    assert_eq!(store.total_stats().items, ITEMS as u64, "nothing evicted");
    let misses: Vec<String> = (ITEMS..2 * ITEMS).map(key).collect();
    (Arc::new(store), Arc::new(hits), Arc::new(misses))
}

/// Reads a found value's bytes, as the response encoder will: a get that
/// handed out a reference without anyone reading the bytes would flatter
/// designs that defer the memory traffic.
#[inline]
fn consume(found: Option<cache_node::store::Found>) -> u8 {
    found.map_or(0, |f| {
        f.value.first().copied().unwrap_or(0) ^ f.value.last().copied().unwrap_or(0)
    })
}

/// A cheap pseudo-random walk over the keys, so accesses do not follow
/// insertion order (which would flatter the CPU caches).
#[derive(Clone, Copy)]
struct Walk(u64);

impl Walk {
    #[inline]
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % ITEMS
    }
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns
/// the wall time, so criterion's per-iteration figure is per `threads` ops.
fn parallel(
    threads: usize,
    iters: u64,
    op: impl Fn(&mut Walk) + Send + Sync + 'static + Clone,
) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let op = op.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut walk = Walk(t as u64 * 7919 + 1);
                barrier.wait();
                for _ in 0..iters {
                    op(&mut walk);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let (store, hits, misses) = filled();
    let threads = thread::available_parallelism().map_or(2, |n| n.get());

    let mut one = c.benchmark_group("store/1-thread");
    one.throughput(Throughput::Elements(1));
    let mut walk = Walk(1);
    // What the harness itself costs: picking a key and reading its bytes
    // (a cache miss of its own over 1M keys). Subtract it from the others.
    one.bench_function("baseline_pick_key", |b| {
        b.iter(|| black_box(hits[walk.next()].as_bytes()[4]))
    });
    one.bench_function("get_hit", |b| {
        b.iter(|| black_box(consume(store.get(&hits[walk.next()]))))
    });
    // A hot set of 10k keys (about 3 MB with their entries): the common
    // case of a skewed workload, where the entries stay in CPU caches.
    one.bench_function("get_hit_hot_10k", |b| {
        b.iter(|| black_box(consume(store.get(&hits[walk.next() % 10_000]))))
    });
    one.bench_function("get_miss", |b| {
        b.iter(|| black_box(consume(store.get(&misses[walk.next()]))))
    });
    one.bench_function("set", |b| {
        b.iter(|| black_box(store.set(&hits[walk.next()], &VALUE, None, Condition::Always)))
    });
    one.finish();

    let mut all = c.benchmark_group(format!("store/{threads}-threads"));
    all.throughput(Throughput::Elements(threads as u64));
    let (s, k) = (store.clone(), hits.clone());
    all.bench_function("get_hit", move |b| {
        let (s, k) = (s.clone(), k.clone());
        b.iter_custom(move |iters| {
            let (s, k) = (s.clone(), k.clone());
            parallel(threads, iters, move |w| {
                black_box(consume(s.get(&k[w.next()])));
            })
        })
    });
    let (s, k) = (store.clone(), misses.clone());
    all.bench_function("get_miss", move |b| {
        let (s, k) = (s.clone(), k.clone());
        b.iter_custom(move |iters| {
            let (s, k) = (s.clone(), k.clone());
            parallel(threads, iters, move |w| {
                black_box(consume(s.get(&k[w.next()])));
            })
        })
    });
    let (s, k) = (store.clone(), hits.clone());
    all.bench_function("set", move |b| {
        let (s, k) = (s.clone(), k.clone());
        b.iter_custom(move |iters| {
            let (s, k) = (s.clone(), k.clone());
            parallel(threads, iters, move |w| {
                black_box(
                    s.set(&k[w.next()], &VALUE, None, Condition::Always)
                        .unwrap(),
                );
            })
        })
    });
    all.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
