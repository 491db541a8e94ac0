use std::{sync::Barrier, thread};

use super::*;

const MIB: u64 = 1 << 20;

fn store(capacity: u64, shards: usize) -> Store {
    Store::new(StoreConfig { capacity, shards }).unwrap()
}

fn manual_store(capacity: u64, shards: usize) -> (Store, Arc<AtomicU64>) {
    let (clock, time) = Clock::manual();
    (
        Store::with_clock(StoreConfig { capacity, shards }, clock).unwrap(),
        time,
    )
}

fn set(s: &Store, key: &str, value: &[u8]) -> SetOutcome {
    s.set(key, value, None, Condition::Always).unwrap()
}

#[test]
fn set_get_delete_round_trip() {
    let s = store(MIB, 4);
    assert_eq!(s.get("k"), None);
    let out = set(&s, "k", b"hello");
    assert!(out.stored);
    let found = s.get("k").unwrap();
    assert_eq!(&found.value[..], b"hello");
    assert_eq!(found.version, out.version);
    assert_eq!(found.ttl, None);
    assert!(s.delete("k").unwrap());
    assert!(!s.delete("k").unwrap());
    assert_eq!(s.get("k"), None);
    let total = s.total_stats();
    assert_eq!((total.hits, total.misses, total.items), (1, 2, 0));
}

#[test]
fn empty_values_are_values() {
    let s = store(MIB, 1);
    set(&s, "k", b"");
    assert_eq!(s.get("k").unwrap().value.len(), 0);
}

#[test]
fn every_write_gets_a_larger_version() {
    let s = store(MIB, 2);
    let mut last = 0;
    for i in 0..1000 {
        let v = set(&s, "k", format!("{i}").as_bytes()).version;
        assert!(v > last, "version {v} after {last}");
        last = v;
    }
    // Deleting and re-creating a key does not reuse versions.
    s.delete("k").unwrap();
    assert!(set(&s, "k", b"again").version > last);
}

#[test]
fn conditions() {
    let s = store(MIB, 2);
    // if_absent on a missing key writes; on a present key it does not and
    // reports the current version.
    let first = s.set("k", b"1", None, Condition::IfAbsent).unwrap();
    assert!(first.stored);
    let again = s.set("k", b"2", None, Condition::IfAbsent).unwrap();
    assert_eq!(
        again,
        SetOutcome {
            stored: false,
            version: first.version
        }
    );
    // Compare-and-set with the right version writes; with a stale one not.
    let cas = s
        .set("k", b"3", None, Condition::IfVersion(first.version))
        .unwrap();
    assert!(cas.stored && cas.version > first.version);
    let stale = s
        .set("k", b"4", None, Condition::IfVersion(first.version))
        .unwrap();
    assert_eq!(
        stale,
        SetOutcome {
            stored: false,
            version: cas.version
        }
    );
    assert_eq!(&s.get("k").unwrap().value[..], b"3");
    // Version 0 means absent.
    assert!(
        !s.set("k", b"5", None, Condition::IfVersion(0))
            .unwrap()
            .stored
    );
    assert!(
        s.set("new", b"5", None, Condition::IfVersion(0))
            .unwrap()
            .stored
    );
}

#[test]
fn ttl_expires_and_reports_remaining_time() {
    let (s, time) = manual_store(MIB, 2);
    s.set("k", b"v", Some(Duration::from_secs(10)), Condition::Always)
        .unwrap();
    time.store(4_000, Relaxed);
    assert_eq!(s.get("k").unwrap().ttl, Some(Duration::from_secs(6)));
    time.store(9_999, Relaxed);
    assert!(s.get("k").is_some());
    time.store(10_000, Relaxed);
    assert_eq!(s.get("k"), None, "expired entries read as absent");
    // An expired key is absent for conditions too.
    assert!(
        !s.delete("k").unwrap(),
        "deleting an expired key deletes nothing live"
    );
    s.set("k", b"v", Some(Duration::from_secs(1)), Condition::Always)
        .unwrap();
    time.store(11_000, Relaxed);
    assert!(s.set("k", b"w", None, Condition::IfAbsent).unwrap().stored);
    assert_eq!(s.get("k").unwrap().ttl, None);
}

#[test]
fn sub_millisecond_ttl_rounds_up() {
    let (s, time) = manual_store(MIB, 1);
    s.set(
        "k",
        b"v",
        Some(Duration::from_micros(10)),
        Condition::Always,
    )
    .unwrap();
    assert!(s.get("k").is_some());
    time.store(1, Relaxed);
    assert!(s.get("k").is_none());
}

#[test]
fn reclamation_frees_expired_entries_only() {
    let (s, time) = manual_store(MIB, 4);
    for i in 0..1000 {
        let ttl = Duration::from_millis(if i % 2 == 0 { 100 } else { 10_000 });
        s.set(&format!("k{i}"), b"value", Some(ttl), Condition::Always)
            .unwrap();
    }
    for i in 0..100 {
        set(&s, &format!("forever{i}"), b"value");
    }
    assert_eq!(s.total_stats().items, 1100);
    assert_eq!(s.reclaim_expired(), 0, "nothing is due yet");

    time.store(100, Relaxed);
    assert_eq!(s.reclaim_expired(), 500);
    let stats = s.total_stats();
    assert_eq!(stats.items, 600);
    assert_eq!(stats.expirations, 500);
    assert_eq!(s.indexed_expiries(), 500);
    // The freed entries' bytes are returned: what is left is exactly the
    // long-lived half and the entries without TTL.
    let expected: u64 = (1..1000)
        .step_by(2)
        .map(|i| Store::entry_weight(format!("k{i}").len(), 5, true))
        .chain((0..100).map(|i| Store::entry_weight(format!("forever{i}").len(), 5, false)))
        .sum();
    assert_eq!(stats.bytes_used, expected);

    time.store(10_000, Relaxed);
    assert_eq!(s.reclaim_expired(), 500);
    assert_eq!(s.total_stats().items, 100);
    assert_eq!(s.indexed_expiries(), 0);
}

#[test]
fn overwrite_and_delete_keep_the_expiry_index_exact() {
    let (s, time) = manual_store(MIB, 1);
    s.set(
        "k",
        b"v",
        Some(Duration::from_millis(50)),
        Condition::Always,
    )
    .unwrap();
    // Overwritten without TTL: the old deadline must not remove the new value.
    set(&s, "k", b"forever");
    assert_eq!(s.indexed_expiries(), 0);
    time.store(100, Relaxed);
    assert_eq!(s.reclaim_expired(), 0);
    assert_eq!(&s.get("k").unwrap().value[..], b"forever");

    s.set(
        "d",
        b"v",
        Some(Duration::from_millis(50)),
        Condition::Always,
    )
    .unwrap();
    assert_eq!(s.indexed_expiries(), 1);
    assert!(s.delete("d").unwrap());
    assert_eq!(s.indexed_expiries(), 0);
}

#[test]
fn eviction_keeps_bytes_within_capacity() {
    let capacity = 4 * MIB;
    let s = store(capacity, 8);
    let value = vec![7u8; 1000];
    // Write 20× the capacity, half of it with TTLs.
    for i in 0..80_000 {
        let ttl = (i % 2 == 0).then(|| Duration::from_secs(3600));
        s.set(&format!("key-{i}"), &value, ttl, Condition::Always)
            .unwrap();
        if i % 10_000 == 0 {
            assert!(s.total_stats().bytes_used <= capacity);
        }
    }
    let shards = s.shard_stats();
    for shard in &shards {
        assert!(
            shard.bytes_used <= shard.capacity_bytes,
            "shard over capacity: {shard:?}"
        );
    }
    let total = Store::sum(&shards);
    assert!(total.bytes_used <= capacity);
    assert_eq!(total.capacity_bytes, capacity);
    assert!(total.evictions > 60_000, "{total:?}");
    assert_eq!(total.items + total.evictions, 80_000);
    // Evicted entries leave the expiry index too: it never outgrows the cache.
    assert!(s.indexed_expiries() as u64 <= total.items);
    assert!(s.indexed_expiries() > 0);
}

#[test]
fn entry_larger_than_a_shard_is_refused() {
    let s = store(64 * 1024, 4);
    let err = s
        .set("k", &vec![0u8; 20 * 1024], None, Condition::Always)
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::EntryTooLarge {
            max_weight: 15892,
            ..
        }
    ));
    assert!(err.to_string().contains("--capacity / --shards"), "{err}");
    assert_eq!(s.total_stats().items, 0);
}

#[test]
fn an_entry_the_cache_would_not_admit_is_refused_not_claimed() {
    // Between the cache's admission limit (97% of a shard) and the whole
    // shard: quick_cache would drop it on insert.
    let s = store(64 * 1024, 4);
    let max = s.max_entry_weight();
    assert_eq!(max, 15892);
    let value_len = (max + 1 - Store::entry_weight(1, 0, false)) as usize;
    assert!(Store::entry_weight(1, value_len, false) <= s.shard_capacity());
    s.set("k", b"old", None, Condition::Always).unwrap();
    let err = s
        .set("k", &vec![0u8; value_len], None, Condition::Always)
        .unwrap_err();
    assert!(matches!(err, StoreError::EntryTooLarge { .. }));
    // The previous value is untouched, and the largest admitted entry is
    // stored and readable.
    assert_eq!(&s.get("k").unwrap().value[..], b"old");
    let out = s
        .set("k", &vec![1u8; value_len - 1], None, Condition::Always)
        .unwrap();
    assert!(out.stored);
    assert_eq!(s.get("k").unwrap().value.len(), value_len - 1);
}

#[test]
fn config_is_validated() {
    assert_eq!(
        Store::new(StoreConfig {
            capacity: MIB,
            shards: 0
        })
        .unwrap_err(),
        ConfigError::Shards(0)
    );
    assert!(matches!(
        Store::new(StoreConfig {
            capacity: 1000,
            shards: 4
        })
        .unwrap_err(),
        ConfigError::TooSmall { .. }
    ));
}

#[test]
fn keys_spread_evenly_over_shards() {
    let s = store(64 * MIB, 16);
    let mut counts = [0u32; 16];
    let n = 160_000;
    for i in 0..n {
        counts[s.shard_of(&format!("user:{i}"))] += 1;
    }
    let mean = n as f64 / 16.0;
    for (shard, &c) in counts.iter().enumerate() {
        let ratio = f64::from(c) / mean;
        assert!(
            (0.95..1.05).contains(&ratio),
            "shard {shard} holds {c} ({ratio:.3}× mean)"
        );
    }
    // The choice is deterministic.
    assert_eq!(s.shard_of("user:1"), store(64 * MIB, 16).shard_of("user:1"));
}

#[test]
fn compare_and_set_is_atomic_under_concurrent_writers() {
    let s = Arc::new(store(MIB, 4));
    set(&s, "counter", b"0");
    let threads = 8;
    let increments = 500;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let s = s.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let mut retries = 0u64;
                for _ in 0..increments {
                    loop {
                        let cur = s.get("counter").unwrap();
                        let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                        let next = (n + 1).to_string();
                        let out = s
                            .set(
                                "counter",
                                next.as_bytes(),
                                None,
                                Condition::IfVersion(cur.version),
                            )
                            .unwrap();
                        if out.stored {
                            break;
                        }
                        retries += 1;
                    }
                }
                retries
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let final_value = s.get("counter").unwrap();
    assert_eq!(
        std::str::from_utf8(&final_value.value).unwrap(),
        (threads * increments).to_string(),
        "no increment lost"
    );
}

#[test]
fn set_if_absent_has_exactly_one_winner() {
    let s = Arc::new(store(MIB, 4));
    let threads = 8;
    for round in 0..200 {
        let key = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(threads));
        let winners: usize = (0..threads)
            .map(|t| {
                let s = s.clone();
                let key = key.clone();
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    s.set(&key, format!("{t}").as_bytes(), None, Condition::IfAbsent)
                        .unwrap()
                        .stored
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(winners, 1, "round {round}");
    }
}

#[test]
fn concurrent_versions_of_one_key_are_unique_and_increasing() {
    let s = Arc::new(store(MIB, 2));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            thread::spawn(move || {
                (0..2000)
                    .map(|_| set(&s, "k", b"v").version)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        let versions = h.join().unwrap();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "each writer sees increasing versions"
        );
        all.extend(versions);
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "no version handed out twice");
}

#[test]
fn replica_writes_keep_the_given_version_and_converge_on_the_newest() {
    let s = store(MIB, 2);
    let out = s.set("k", b"v1", None, Condition::Replica(100)).unwrap();
    assert_eq!(
        out,
        SetOutcome {
            stored: true,
            version: 100
        }
    );
    assert_eq!(s.get("k").unwrap().version, 100);
    // An older replica write loses; a newer one wins.
    let old = s.set("k", b"v0", None, Condition::Replica(50)).unwrap();
    assert_eq!(
        old,
        SetOutcome {
            stored: false,
            version: 100
        }
    );
    let new = s.set("k", b"v2", None, Condition::Replica(200)).unwrap();
    assert!(new.stored);
    assert_eq!(&s.get("k").unwrap().value[..], b"v2");
    // A far-future replica version pushes local versions past it.
    s.set("k", b"v3", None, Condition::Replica(u64::MAX / 2))
        .unwrap();
    let local = set(&s, "k", b"v4");
    assert!(local.version > u64::MAX / 2);
}

#[test]
fn clear_removes_everything_and_versions_keep_growing() {
    let s = store(MIB, 4);
    // Versions grow per shard: compare with the key's own (another
    // shard's may be ahead by a few within the same microsecond).
    let mut last = 0;
    for i in 0..100 {
        let version = s
            .set(
                &format!("k{i}"),
                b"v",
                Some(Duration::from_secs(60)),
                Condition::Always,
            )
            .unwrap()
            .version;
        if i == 1 {
            last = version;
        }
    }
    assert_eq!(s.clear(), 100);
    assert_eq!(s.total_stats().items, 0);
    assert_eq!(s.total_stats().bytes_used, 0);
    assert_eq!(s.indexed_expiries(), 0);
    assert!(s.get("k1").is_none());
    let again = s.set("k1", b"w", None, Condition::Always).unwrap();
    assert!(
        again.version > last,
        "a write after a flush still gets a larger version"
    );
}

#[test]
fn scan_lists_every_live_key_once_in_pages() {
    let (s, clock) = manual_store(1 << 20, 4);
    for i in 0..100 {
        set(&s, &format!("k{i}"), b"v");
    }
    s.set(
        "gone",
        b"v",
        Some(Duration::from_millis(5)),
        Condition::Always,
    )
    .unwrap();
    clock.store(10, Relaxed);
    let mut keys = Vec::new();
    let mut cursor = Some((0, 0));
    let mut pages = 0;
    while let Some((shard, position)) = cursor {
        let page = s.scan(shard, position, 7);
        assert!(page.keys.len() <= 7);
        keys.extend(page.keys);
        cursor = page.next;
        pages += 1;
        assert!(pages < 100, "scan does not end");
    }
    keys.sort();
    let mut expected: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected, "every live key once, the expired one not");
    assert!(pages >= 100 / 7);
}

#[test]
fn scan_of_an_empty_store_ends_at_once() {
    let s = store(1 << 20, 8);
    let page = s.scan(0, 0, 10);
    assert!(page.keys.is_empty());
    assert_eq!(page.next, None);
}

#[test]
fn overwrites_and_deletes_are_not_evictions() {
    let (s, clock) = manual_store(MIB, 1);
    set(&s, "k", b"one");
    set(&s, "k", b"two");
    set(&s, "k", b"three");
    assert!(s.delete("k").unwrap());
    assert!(!s.delete("k").unwrap(), "nothing live left to delete");
    s.set("t", b"v", Some(Duration::from_millis(5)), Condition::Always)
        .unwrap();
    clock.store(10, Relaxed);
    set(&s, "t", b"after expiry");
    let total = s.total_stats();
    assert_eq!(
        (
            total.evictions,
            total.overwrites,
            total.deletes,
            total.expirations
        ),
        (0, 2, 1, 1),
        "{total:?}"
    );
}

#[test]
fn a_conditional_delete_removes_only_the_version_it_names() {
    let s = store(MIB, 2);
    assert_eq!(
        s.delete_if("k", Some(5)).unwrap(),
        DeleteOutcome {
            deleted: false,
            version: 0
        }
    );
    let v = set(&s, "k", b"v").version;
    assert_eq!(
        s.delete_if("k", Some(v + 1)).unwrap(),
        DeleteOutcome {
            deleted: false,
            version: v
        }
    );
    assert!(s.get("k").is_some());
    assert!(s.delete_if("k", Some(v)).unwrap().deleted);
    assert!(s.get("k").is_none());
}

#[test]
fn increments_count_in_decimal_text_and_refuse_what_is_not_a_counter() {
    let (s, clock) = manual_store(MIB, 2);
    let first = s
        .increment("c", 5, 10, Some(Duration::from_millis(100)))
        .unwrap();
    assert_eq!(first.value, 15, "created as initial + delta");
    let second = s.increment("c", -20, 0, None).unwrap();
    assert_eq!(second.value, -5);
    assert!(second.version > first.version);
    let got = s.get("c").unwrap();
    assert_eq!(&got.value[..], b"-5", "readable as text");
    assert!(got.ttl.is_some(), "an existing counter keeps its TTL");
    clock.store(200, Relaxed);
    assert_eq!(
        s.increment("c", 1, 0, None).unwrap().value,
        1,
        "expired: new"
    );

    set(&s, "text", b"hello");
    assert!(matches!(
        s.increment("text", 1, 0, None),
        Err(StoreError::NotAnInteger { .. })
    ));
    set(&s, "max", i64::MAX.to_string().as_bytes());
    assert!(matches!(
        s.increment("max", 1, 0, None),
        Err(StoreError::Overflow { .. })
    ));
    assert_eq!(
        &s.get("max").unwrap().value[..],
        i64::MAX.to_string().as_bytes()
    );
}

#[test]
fn concurrent_increments_are_each_applied_once() {
    // A hot counter: 8 threads on one key of one shard, many runs. Every
    // increment is applied exactly once and none is refused (the read, the
    // add and the write happen under the shard's lock).
    const THREADS: usize = 8;
    const EACH: usize = 5_000;
    for run in 0..20 {
        let s = Arc::new(store(MIB, 1));
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (s, barrier) = (s.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let mut last = 0;
                    for _ in 0..EACH {
                        let out = s.increment("n", 1, 0, None).unwrap();
                        // One thread's own increments are ordered.
                        assert!(out.value > last, "run {run}: {} after {last}", out.value);
                        last = out.value;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total = (THREADS * EACH).to_string();
        assert_eq!(
            &s.get("n").unwrap().value[..],
            total.as_bytes(),
            "run {run}"
        );
    }
}

#[test]
fn concurrent_touches_and_increments_keep_one_version_order() {
    // Touch and increment race on one key: every answer carries a version
    // no other answer has, and the last one read is the largest.
    let s = Arc::new(store(MIB, 1));
    s.set("k", b"0", None, Condition::Always).unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                (0..2_000)
                    .map(|_| {
                        if i % 2 == 0 {
                            s.increment("k", 1, 0, None).unwrap().version
                        } else {
                            s.touch("k", None).unwrap().unwrap().version
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let n = versions.len();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), n, "two updates got the same version");
    let last = s.get("k").unwrap();
    assert_eq!(Some(&last.version), versions.last());
    assert_eq!(&last.value[..], b"4000");
}

#[test]
fn touch_changes_the_ttl_and_the_version_but_not_the_value() {
    let (s, clock) = manual_store(MIB, 2);
    assert_eq!(s.touch("k", None).unwrap(), None);
    let v = s
        .set(
            "k",
            b"v",
            Some(Duration::from_millis(50)),
            Condition::Always,
        )
        .unwrap()
        .version;
    let t = s
        .touch("k", Some(Duration::from_millis(500)))
        .unwrap()
        .unwrap();
    assert!(t.version > v);
    assert_eq!(&t.value[..], b"v");
    clock.store(100, Relaxed);
    assert!(s.get("k").is_some(), "the longer TTL holds");
    let persisted = s.touch("k", None).unwrap().unwrap();
    assert_eq!(persisted.ttl, None);
    clock.store(10_000, Relaxed);
    assert!(s.get("k").is_some(), "no expiry any more");
}

#[test]
fn a_conditional_copy_loses_to_a_change_made_after_its_position() {
    let log = Arc::new(ChangeLog::new(9, MIB as usize));
    let s = store(64 * MIB, 4).with_change_log(log.clone());
    let written = set(&s, "k", b"v1");
    // A copier saw the log up to here, then read "k" elsewhere...
    let seen = log.head();
    // ...and a delete through another orchestrator landed here meanwhile.
    assert!(s.delete("k").unwrap());
    let copy = |after: u64, incarnation: u64| {
        s.set(
            "k",
            b"v1",
            None,
            Condition::ReplicaUnchanged {
                version: written.version,
                incarnation,
                after,
            },
        )
        .unwrap()
    };
    assert!(!copy(seen, 9).stored, "the delete wins over the copy");
    assert!(s.get("k").is_none());
    assert!(
        !copy(log.head(), 8).stored,
        "a position of another incarnation"
    );
    assert!(
        copy(log.head(), 9).stored,
        "nothing changed since the position"
    );
    assert_eq!(s.get("k").map(|f| f.version), Some(written.version));
    // Without a change log a conditional copy cannot be vouched for.
    let plain = store(64 * MIB, 4);
    let out = plain
        .set(
            "k",
            b"v",
            None,
            Condition::ReplicaUnchanged {
                version: 5,
                incarnation: 9,
                after: 0,
            },
        )
        .unwrap();
    assert!(!out.stored);
}

#[test]
fn a_frozen_store_refuses_every_write_and_keeps_what_it_holds() {
    let s = Arc::new(store(MIB, 4));
    set(&s, "k", b"v");
    s.set("n", b"1", None, Condition::Always).unwrap();
    // Writers racing the freeze: each write either lands before it
    // returns or is refused; none lands after.
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            thread::spawn(move || {
                let mut landed = Vec::new();
                for i in 0..20_000 {
                    let key = format!("w{t}-{i}");
                    match s.set(&key, b"x", None, Condition::Always) {
                        Ok(_) => landed.push(key),
                        Err(StoreError::Frozen) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                landed
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(2));
    s.freeze();
    let count = |s: &Store| s.scan(0, 0, usize::MAX).keys.len();
    let held = count(&s);
    let landed: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(
        held,
        landed.len() + 2,
        "every acknowledged write is there, nothing after"
    );
    assert_eq!(
        s.set("k", b"w", None, Condition::Always),
        Err(StoreError::Frozen)
    );
    assert_eq!(s.delete("k"), Err(StoreError::Frozen));
    assert_eq!(s.increment("n", 1, 0, None), Err(StoreError::Frozen));
    assert_eq!(&s.get("k").unwrap().value[..], b"v");
    assert_eq!(count(&s), held);
}
