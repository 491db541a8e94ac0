//! Keys a node may hold stale values of, until they are invalidated there.
//!
//! When a write or delete of a key cannot reach one of the key's owners —
//! the owner is ejected and skipped, or the call to it failed — that owner
//! may still hold the value from before. Serving it later would bring back
//! a deleted key or an overwritten value. So the orchestrator records the
//! key against the owner ([`Pending::record`]), and until the record is
//! cleared:
//!
//! - routing treats the owner as unavailable for that key (reads and
//!   writes go to the next node, as during the outage);
//! - every `--health-interval`, while the node answers its health check,
//!   the recorded keys are deleted there (a replay of `Delete` ops), and
//!   cleared from the record once the node confirmed them — unless the key
//!   was recorded again meanwhile (a generation number tells).
//!
//! The record is bounded in bytes. If it overflows, it is dropped and the
//! whole node is marked stale ([`Pending::overflowed`]): it serves no key
//! until it has been flushed (`Internal/Flush`). A cache may lose data; it
//! must never serve data it was told to drop.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use parking_lot::Mutex;

/// Per-entry bytes counted beyond the key: the map's slot and the
/// generation.
const ENTRY_OVERHEAD: usize = 48;

/// The keys one node must invalidate before it serves them again.
#[derive(Debug)]
pub struct Pending {
    inner: Mutex<Inner>,
    /// Whether anything is pending, so routing checks a flag, not a lock,
    /// in the common case.
    any: AtomicBool,
    max_bytes: usize,
}

/// One pending key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// Moved every time the key is recorded again.
    generation: u64,
    /// The one debt record (holder, sequence) the key is pending for;
    /// `None` when this orchestrator recorded it itself, or several
    /// holders did: only a replay clears it then.
    owed: Option<(String, u64)>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<String, Record>,
    bytes: usize,
    next_generation: u64,
    /// The record overflowed: every key may be stale; flush the node.
    overflowed: bool,
    /// Debt records on other nodes this record holds (by holder: the last
    /// sequence seen), settled there once everything is replayed.
    marks: HashMap<String, u64>,
}

/// Keys to invalidate, as taken for a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Nothing is pending.
    Nothing,
    /// Delete these keys (with the generation they were taken at).
    Keys(Vec<(String, u64)>),
    /// The record overflowed: flush the node.
    Flush,
}

impl Pending {
    /// An empty record holding at most `max_bytes` of keys.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            any: AtomicBool::new(false),
            max_bytes,
        }
    }

    /// Records that the node may hold a stale value of `key`.
    pub fn record(&self, key: &str) {
        self.insert(key, None);
    }

    fn insert(&self, key: &str, owed: Option<(&str, u64)>) {
        let mut inner = self.inner.lock();
        self.any.store(true, Ordering::Release);
        if inner.overflowed {
            return;
        }
        inner.next_generation += 1;
        let generation = inner.next_generation;
        match inner.keys.get_mut(key) {
            Some(record) => {
                record.generation = generation;
                record.owed = match (record.owed.take(), owed) {
                    // The same holder's newer record stands for both.
                    (Some((h, s)), Some((holder, sequence))) if h == holder => {
                        Some((h, s.max(sequence)))
                    }
                    _ => None,
                };
            }
            None => {
                inner.keys.insert(
                    key.to_owned(),
                    Record {
                        generation,
                        owed: owed.map(|(h, s)| (h.to_owned(), s)),
                    },
                );
                inner.bytes += key.len() + ENTRY_OVERHEAD;
            }
        }
        if inner.bytes > self.max_bytes {
            tracing::warn!(
                keys = inner.keys.len(),
                max_bytes = self.max_bytes,
                "too many keys to invalidate on a node (--pending-invalidation-bytes): it will be flushed before it serves again"
            );
            inner.keys = HashMap::new();
            inner.bytes = 0;
            inner.overflowed = true;
        }
    }

    /// Records a debt read from node `holder`'s records (record
    /// `sequence`): the node may hold a stale value of `key`, or of any
    /// key (`None`: the holder's record of it overflowed).
    pub fn record_owed(&self, key: Option<&str>, holder: &str, sequence: u64) {
        match key {
            Some(key) => self.insert(key, Some((holder, sequence))),
            None => {
                let mut inner = self.inner.lock();
                self.any.store(true, Ordering::Release);
                inner.keys = HashMap::new();
                inner.bytes = 0;
                inner.overflowed = true;
            }
        }
        let mut inner = self.inner.lock();
        let mark = inner.marks.entry(holder.to_owned()).or_insert(0);
        *mark = (*mark).max(sequence);
    }

    /// Node `holder` dropped its debt records of this node up to
    /// `through` (some orchestrator brought this node up to date on
    /// them): keys pending for those records alone are cleared. Returns
    /// how many.
    pub fn settled(&self, holder: &str, through: u64) -> usize {
        let mut inner = self.inner.lock();
        let before = inner.keys.len();
        let mut freed = 0;
        inner.keys.retain(|key, record| {
            let done = record
                .owed
                .as_ref()
                .is_some_and(|(h, s)| h == holder && *s <= through);
            if done {
                freed += key.len() + ENTRY_OVERHEAD;
            }
            !done
        });
        inner.bytes -= freed;
        if inner.marks.get(holder).is_some_and(|&m| m <= through) {
            inner.marks.remove(holder);
        }
        self.settle(&inner);
        before - inner.keys.len()
    }

    /// The generation `key` is pending at, if it is pending for debt
    /// records of `holder` alone — then `holder` took every change of it
    /// the node missed that this record knows of, so its value is the
    /// one to restore. `None` otherwise (not pending, recorded by this
    /// orchestrator, or by several holders). Handed to
    /// [`Pending::replayed`] once the node holds that value.
    pub fn owed_only_to(&self, key: &str, holder: &str) -> Option<u64> {
        self.inner
            .lock()
            .keys
            .get(key)
            .filter(|r| r.owed.as_ref().is_some_and(|(h, _)| h == holder))
            .map(|r| r.generation)
    }

    /// Once nothing is left to replay: the debt records to settle on their
    /// holders (holder, last sequence), taken. Empty while keys are left.
    pub fn take_marks(&self) -> Vec<(String, u64)> {
        let mut inner = self.inner.lock();
        if inner.overflowed || !inner.keys.is_empty() {
            return Vec::new();
        }
        inner.marks.drain().collect()
    }

    /// Whether the node may hold a stale value of `key`.
    #[inline]
    pub fn contains(&self, key: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let inner = self.inner.lock();
        inner.overflowed || inner.keys.contains_key(key)
    }

    /// Whether the whole node must be flushed before it serves again.
    pub fn overflowed(&self) -> bool {
        self.any.load(Ordering::Acquire) && self.inner.lock().overflowed
    }

    /// Keys pending now.
    pub fn len(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// What to replay next: up to `max` keys, or a flush.
    pub fn take(&self, max: usize) -> Replay {
        let inner = self.inner.lock();
        if inner.overflowed {
            Replay::Flush
        } else if inner.keys.is_empty() {
            Replay::Nothing
        } else {
            Replay::Keys(
                inner
                    .keys
                    .iter()
                    .take(max)
                    .map(|(k, r)| (k.clone(), r.generation))
                    .collect(),
            )
        }
    }

    /// The node confirmed these keys deleted: clear them, unless one was
    /// recorded again since it was taken.
    pub fn replayed(&self, keys: &[(String, u64)]) {
        let mut inner = self.inner.lock();
        for (key, generation) in keys {
            if inner.keys.get(key).map(|r| r.generation) == Some(*generation) {
                inner.keys.remove(key);
                inner.bytes -= key.len() + ENTRY_OVERHEAD;
            }
        }
        self.settle(&inner);
    }

    /// The node was flushed: it holds nothing that can be stale.
    pub fn flushed(&self) {
        let mut inner = self.inner.lock();
        inner.overflowed = false;
        self.settle(&inner);
    }

    fn settle(&self, inner: &Inner) {
        if !inner.overflowed && inner.keys.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }
}

/// Keys a node holds as a stand-in: writes it took while the keys' owners
/// were away. While they stay away it serves them; once every owner is
/// back it must not (it gets no more writes of them), so the health checker
/// moves them to the node's [`Pending`] record, which deletes them there.
/// Bounded like [`Pending`]; past the bound, keys are no longer tracked and
/// their copies live until `--failover-ttl` (their TTL cap).
#[derive(Debug)]
pub struct StandIns {
    inner: Mutex<StandInner>,
    any: AtomicBool,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct StandInner {
    keys: HashMap<String, ()>,
    bytes: usize,
}

impl StandIns {
    /// An empty record of at most `max_bytes` of keys.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(StandInner::default()),
            any: AtomicBool::new(false),
            max_bytes,
        }
    }

    /// Records that the node took a write of `key` for its owners.
    pub fn record(&self, key: &str) {
        let mut inner = self.inner.lock();
        if inner.keys.contains_key(key) {
            return;
        }
        if inner.bytes + key.len() + ENTRY_OVERHEAD > self.max_bytes {
            tracing::warn!(
                keys = inner.keys.len(),
                "too many stand-in writes to track on a node: the rest live until --failover-ttl"
            );
            return;
        }
        inner.bytes += key.len() + ENTRY_OVERHEAD;
        inner.keys.insert(key.to_owned(), ());
        self.any.store(true, Ordering::Release);
    }

    /// Whether the node holds a stand-in copy of `key`.
    #[inline]
    pub fn contains(&self, key: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.inner.lock().keys.contains_key(key)
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// Removes and returns the keys `done` says are no longer needed.
    pub fn take_where(&self, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
        let mut inner = self.inner.lock();
        let taken: Vec<String> = inner.keys.keys().filter(|k| done(k)).cloned().collect();
        for k in &taken {
            inner.keys.remove(k);
            inner.bytes -= k.len() + ENTRY_OVERHEAD;
        }
        if inner.keys.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_ins_are_kept_until_taken_and_bounded() {
        let s = StandIns::new(ENTRY_OVERHEAD * 3 + 6);
        assert!(s.is_empty() && !s.contains("a"));
        for k in ["a", "b", "c", "d"] {
            s.record(k);
        }
        assert!(s.contains("a") && s.contains("c"));
        assert!(!s.contains("d"), "past the bound: not tracked");
        let mut taken = s.take_where(|k| k != "b");
        taken.sort();
        assert_eq!(taken, ["a", "c"]);
        assert!(s.contains("b") && !s.contains("a"));
        s.take_where(|_| true);
        assert!(s.is_empty());
        s.record("d");
        assert!(s.contains("d"), "room again");
    }

    #[test]
    fn records_until_replayed_and_keeps_what_was_recorded_again() {
        let p = Pending::new(1 << 20);
        assert!(p.is_empty() && !p.contains("a"));
        p.record("a");
        p.record("b");
        assert!(p.contains("a") && p.contains("b") && !p.contains("c"));
        let Replay::Keys(mut taken) = p.take(10) else {
            panic!("keys expected")
        };
        taken.sort();
        assert_eq!(taken.len(), 2);
        // "b" is written around the node again while the replay runs.
        p.record("b");
        p.replayed(&taken);
        assert!(!p.contains("a"));
        assert!(p.contains("b"), "recorded again after it was taken");
        let Replay::Keys(taken) = p.take(10) else {
            panic!("keys expected")
        };
        p.replayed(&taken);
        assert!(p.is_empty());
        assert_eq!(p.take(10), Replay::Nothing);
    }

    #[test]
    fn an_overflowing_record_marks_the_whole_node_until_flushed() {
        let p = Pending::new(200);
        for i in 0..10 {
            p.record(&format!("key-{i}"));
        }
        assert!(p.overflowed());
        assert!(p.contains("never-recorded"), "every key may be stale");
        assert_eq!(p.len(), 0, "the record itself is dropped");
        assert_eq!(p.take(10), Replay::Flush);
        p.flushed();
        assert!(p.is_empty() && !p.contains("key-1"));
    }

    #[test]
    fn debts_read_from_holders_are_settled_only_once_replayed() {
        let p = Pending::new(1 << 20);
        p.record_owed(Some("a"), "n2", 5);
        p.record_owed(Some("b"), "n2", 7);
        p.record_owed(Some("c"), "n3", 2);
        assert!(p.contains("a") && p.take_marks().is_empty());
        let Replay::Keys(taken) = p.take(10) else {
            panic!("keys expected")
        };
        p.replayed(&taken);
        let mut marks = p.take_marks();
        marks.sort();
        assert_eq!(marks, [("n2".to_owned(), 7), ("n3".to_owned(), 2)]);
        assert!(p.take_marks().is_empty(), "taken once");
        // An overflowed holder record flushes the whole node first.
        p.record_owed(None, "n2", 9);
        assert!(p.contains("anything") && p.take_marks().is_empty());
        assert_eq!(p.take(10), Replay::Flush);
        p.flushed();
        assert_eq!(p.take_marks(), [("n2".to_owned(), 9)]);
    }

    #[test]
    fn takes_at_most_the_batch() {
        let p = Pending::new(1 << 20);
        for i in 0..50 {
            p.record(&format!("k{i}"));
        }
        match p.take(20) {
            Replay::Keys(k) => assert_eq!(k.len(), 20),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod settle_tests {
    use super::*;

    #[test]
    fn a_settlement_elsewhere_clears_only_keys_pending_for_those_records_alone() {
        let p = Pending::new(1 << 20);
        p.record_owed(Some("parked"), "b", 5);
        p.record_owed(Some("later"), "b", 9);
        p.record_owed(Some("two-holders"), "b", 3);
        p.record_owed(Some("two-holders"), "c", 4);
        p.record("mine");
        p.record_owed(Some("mine"), "b", 2);
        // Restoring from b is right only where b took every change.
        assert!(p.owed_only_to("parked", "b").is_some());
        assert!(p.owed_only_to("parked", "c").is_none());
        assert!(p.owed_only_to("two-holders", "b").is_none());
        assert!(p.owed_only_to("mine", "b").is_none());
        // b settled through 5: its records up to 5 were handled.
        assert_eq!(p.settled("b", 5), 1);
        assert!(!p.contains("parked"));
        assert!(p.contains("later"), "recorded after what was settled");
        assert!(p.contains("two-holders"), "c's record is not settled");
        assert!(p.contains("mine"), "this orchestrator's own record");
        assert_eq!(p.settled("b", 100), 1);
        assert!(!p.contains("later"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_key_recorded_again_after_its_generation_was_taken_stays() {
        let p = Pending::new(1 << 20);
        p.record_owed(Some("k"), "b", 1);
        let generation = p.owed_only_to("k", "b").unwrap();
        p.record_owed(Some("k"), "b", 2);
        p.replayed(&[("k".to_owned(), generation)]);
        assert!(p.contains("k"), "a newer debt of the same holder");
        let generation = p.owed_only_to("k", "b").unwrap();
        p.replayed(&[("k".to_owned(), generation)]);
        assert!(p.is_empty());
    }
}
