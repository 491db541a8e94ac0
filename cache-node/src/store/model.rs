//! A model-based property test of the store: random sequences of sets
//! (unconditional, if-absent, compare-and-set, copies), deletes, reads and
//! clock jumps, on a store small enough to evict, checked after every step
//! against a plain map of what was last written.
//!
//! A cache may lose entries (eviction): after every step each key is read
//! back, and what the store evicted the model forgets too, so the model is
//! exact before the next step. The properties:
//!
//! - a read returns nothing, or exactly the last value written with its
//!   version — never an older one, never one that was deleted or expired;
//!   once an entry is seen gone it stays gone until written again;
//! - every successful write gets a version larger than any the key had;
//! - compare-and-set never applies on a stale version, and if-absent
//!   never overwrites a live entry;
//! - a copy is stored only with a version above the current one;
//! - the bytes held never exceed the capacity.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering::Relaxed},
    time::Duration,
};

use proptest::prelude::*;

use super::*;

const KEYS: usize = 6;
const CAPACITY: u64 = 8 * 1024;
const SHARDS: usize = 2;

#[derive(Debug, Clone)]
enum Step {
    Set {
        key: usize,
        len: usize,
        ttl_ms: Option<u64>,
    },
    IfAbsent {
        key: usize,
        len: usize,
    },
    IfPresent {
        key: usize,
        len: usize,
    },
    /// Compare-and-set with the key's current version (`stale: false`) or
    /// an older one.
    Cas {
        key: usize,
        len: usize,
        stale: bool,
    },
    /// A copy with a version relative to the key's current one.
    Copy {
        key: usize,
        len: usize,
        ahead: bool,
    },
    Delete {
        key: usize,
    },
    Get {
        key: usize,
    },
    Advance {
        ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let key = 0..KEYS;
    let len = 0usize..900;
    prop_oneof![
        3 => (key.clone(), len.clone(), proptest::option::of(1u64..500))
            .prop_map(|(key, len, ttl_ms)| Step::Set { key, len, ttl_ms }),
        1 => (key.clone(), len.clone()).prop_map(|(key, len)| Step::IfAbsent { key, len }),
        1 => (key.clone(), len.clone()).prop_map(|(key, len)| Step::IfPresent { key, len }),
        2 => (key.clone(), len.clone(), any::<bool>())
            .prop_map(|(key, len, stale)| Step::Cas { key, len, stale }),
        1 => (key.clone(), len.clone(), any::<bool>())
            .prop_map(|(key, len, ahead)| Step::Copy { key, len, ahead }),
        1 => key.clone().prop_map(|key| Step::Delete { key }),
        3 => key.prop_map(|key| Step::Get { key }),
        1 => (1u64..400).prop_map(|ms| Step::Advance { ms }),
    ]
}

/// What the model knows of one key.
#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    version: u64,
    /// Clock milliseconds; 0 = no expiry.
    expires_at: u64,
}

/// The store's contents as they must be: after every step each key is
/// read back, and an entry the store evicted is dropped from the model too
/// (a cache may lose data), so before each step the model is exact.
#[derive(Debug, Default)]
struct Model {
    entries: HashMap<usize, Entry>,
    /// The largest version each key ever had: writes must go above it.
    highest: HashMap<usize, u64>,
}

impl Model {
    fn live(&self, key: usize, now: u64) -> Option<&Entry> {
        self.entries
            .get(&key)
            .filter(|e| e.expires_at == 0 || now < e.expires_at)
    }

    fn live_version(&self, key: usize, now: u64) -> u64 {
        self.live(key, now).map_or(0, |e| e.version)
    }

    /// A write the store made with a version of its own: above every
    /// version the key had.
    fn written(&mut self, key: usize, value: Vec<u8>, version: u64, expires_at: u64) {
        let highest = self.highest.entry(key).or_default();
        assert!(
            version > *highest,
            "key {key}: version {version} is not above {highest}"
        );
        *highest = version;
        self.copied(key, value, version, expires_at);
    }

    /// A write with a version chosen elsewhere (a copy).
    fn copied(&mut self, key: usize, value: Vec<u8>, version: u64, expires_at: u64) {
        let highest = self.highest.entry(key).or_default();
        *highest = (*highest).max(version);
        self.entries.insert(
            key,
            Entry {
                value,
                version,
                expires_at,
            },
        );
    }
}

fn name(key: usize) -> String {
    format!("key-{key}")
}

fn value(key: usize, len: usize, salt: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (key as u64 + i as u64 * 31 + salt) as u8)
        .collect()
}

/// Reads every key back: what the store serves must be exactly what the
/// model holds, or nothing (evicted — then the model forgets it too).
fn check(store: &Store, model: &mut Model, now: u64, n: usize) {
    for key in 0..KEYS {
        let got = store.get(&name(key));
        match (got, model.live(key, now).cloned()) {
            (None, None) => {}
            (None, Some(_)) => {
                model.entries.remove(&key);
            }
            (Some(found), Some(e)) => {
                assert_eq!(found.version, e.version, "step {n}, key {key}: version");
                assert_eq!(&found.value[..], &e.value[..], "step {n}, key {key}: value");
            }
            (Some(found), None) => panic!(
                "step {n}, key {key}: served version {} that was deleted, expired or never written",
                found.version
            ),
        }
    }
    let stats = store.total_stats();
    assert!(
        stats.bytes_used <= CAPACITY,
        "step {n}: {} bytes held over a {CAPACITY}-byte capacity",
        stats.bytes_used
    );
}

fn run(steps: &[Step]) {
    let (clock, time): (Clock, Arc<AtomicU64>) = Clock::manual();
    let store = Store::with_clock(
        StoreConfig {
            capacity: CAPACITY,
            shards: SHARDS,
        },
        clock,
    )
    .unwrap();
    let mut model = Model::default();
    for (n, step) in steps.iter().enumerate() {
        let now = time.load(Relaxed);
        let salt = n as u64;
        match *step {
            Step::Set { key, len, ttl_ms } => {
                let v = value(key, len, salt);
                let ttl = ttl_ms.map(Duration::from_millis);
                let out = store.set(&name(key), &v, ttl, Condition::Always).unwrap();
                assert!(out.stored);
                model.written(key, v, out.version, ttl_ms.map_or(0, |t| now + t));
            }
            Step::IfAbsent { key, len } => {
                let v = value(key, len, salt);
                let current = model.live_version(key, now);
                let out = store
                    .set(&name(key), &v, None, Condition::IfAbsent)
                    .unwrap();
                assert_eq!(
                    out.stored,
                    current == 0,
                    "step {n}: if-absent over {current}"
                );
                if out.stored {
                    model.written(key, v, out.version, 0);
                } else {
                    assert_eq!(out.version, current);
                }
            }
            Step::IfPresent { key, len } => {
                let v = value(key, len, salt);
                let current = model.live_version(key, now);
                let out = store
                    .set(&name(key), &v, None, Condition::IfPresent)
                    .unwrap();
                assert_eq!(
                    out.stored,
                    current != 0,
                    "step {n}: if-present over {current}"
                );
                if out.stored {
                    assert!(out.version > current);
                    model.written(key, v, out.version, 0);
                } else {
                    assert_eq!(out.version, 0);
                }
            }
            Step::Cas { key, len, stale } => {
                let v = value(key, len, salt);
                let current = model.live_version(key, now);
                let expected = if stale {
                    model
                        .highest
                        .get(&key)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(1)
                } else {
                    current
                };
                let out = store
                    .set(&name(key), &v, None, Condition::IfVersion(expected))
                    .unwrap();
                assert_eq!(
                    out.stored,
                    expected == current,
                    "step {n}: compare-and-set with {expected}, current {current}"
                );
                if out.stored {
                    model.written(key, v, out.version, 0);
                } else {
                    assert_eq!(out.version, current);
                }
            }
            Step::Copy { key, len, ahead } => {
                let v = value(key, len, salt);
                let current = model.live_version(key, now);
                let highest = model.highest.get(&key).copied().unwrap_or(0);
                let version = if ahead {
                    highest + 1_000
                } else {
                    current.saturating_sub(1).max(1)
                };
                let out = store
                    .set(&name(key), &v, None, Condition::Replica(version))
                    .unwrap();
                assert_eq!(
                    out.stored,
                    version > current,
                    "step {n}: copy at {version}, current {current}"
                );
                if out.stored {
                    assert_eq!(out.version, version);
                    model.copied(key, v, version, 0);
                }
            }
            Step::Delete { key } => {
                let deleted = store.delete(&name(key)).unwrap();
                assert_eq!(deleted, model.live(key, now).is_some(), "step {n}: delete");
                model.entries.remove(&key);
            }
            Step::Get { key } => {
                let got = store.get(&name(key));
                let expected = model.live(key, now);
                assert_eq!(
                    got.map(|f| (f.version, f.value.to_vec())),
                    expected.map(|e| (e.version, e.value.clone())),
                    "step {n}: get"
                );
            }
            Step::Advance { ms } => {
                time.fetch_add(ms, Relaxed);
                store.reclaim_expired();
            }
        }
        check(&store, &mut model, time.load(Relaxed), n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_store_never_serves_what_it_should_not(steps in proptest::collection::vec(step(), 1..200)) {
        run(&steps);
    }
}
