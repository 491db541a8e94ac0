//! The node's change feed: a bounded log of every change applied to the
//! store, numbered per incarnation, that subscribers (orchestrators) read
//! from a position and then follow live. No gRPC in here.
//!
//! # Why
//!
//! Changes are published where they happen. An orchestrator that keeps
//! answers for hot keys learns of a write made through any other
//! orchestrator, or straight to the node, within the feed's latency —
//! instead of when its own copy expires. (Redis's client tracking and
//! Hazelcast's invalidation events do the same; the position and the gap
//! follow etcd's watch: resume from a revision, or be told it is gone.)
//!
//! # Positions and gaps
//!
//! Each change gets the next sequence number (1, 2, 3...) of the log's
//! incarnation, a random number chosen at every start of the process. A
//! subscriber remembers `(incarnation, last sequence seen)` and resumes
//! from there. When the log no longer holds what came after that position
//! — it dropped the oldest changes to stay within its byte bound, or the
//! position is from another incarnation (the node restarted) — the reader
//! is told so ([`Read::Gap`]) and continues from the current end: it must
//! assume that any key may have changed.
//!
//! # Cost
//!
//! [`ChangeLog::append`] is called by the store under the key's shard
//! lock, so the log's order is the order in which each key's changes were
//! applied. It takes the log's own lock for a push (the key is a
//! `CompactString`: short keys are copied inline, without an allocation)
//! and wakes readers only if one is waiting (one atomic load otherwise).
//! Readers copy out batches under the lock and encode outside it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use compact_str::CompactString;
use parking_lot::Mutex;

/// What kind of operation made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A value stored by a client's write.
    Set,
    /// A key deleted (or a delete of a key that was not there).
    Delete,
    /// A counter incremented.
    Increment,
    /// A TTL changed.
    Touch,
    /// A copy from another node stored with that node's version.
    Copy,
    /// Every entry removed.
    Flush,
    /// A debt recorded: another node (the change's owner) may hold a stale
    /// value of the key. The key's value here did not change.
    Owed,
    /// An owner's debts settled through a record sequence (the change's
    /// version): it is up to date on them. No key changed.
    Settled,
}

/// One change, as readers get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its sequence number in the log's incarnation.
    pub sequence: u64,
    /// What changed it.
    pub kind: ChangeKind,
    /// The key (empty for [`ChangeKind::Flush`]).
    pub key: CompactString,
    /// The key's version after the change (0 after a delete or a flush);
    /// for [`ChangeKind::Owed`], the debt record's sequence.
    pub version: u64,
    /// For [`ChangeKind::Owed`]: the node that owes the key; for
    /// [`ChangeKind::Settled`], the node whose debts were settled.
    pub owner: Option<Box<str>>,
}

/// What a reader gets from [`ChangeLog::read_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The changes after the position asked for (possibly none), and the
    /// last sequence assigned so far.
    Changes {
        /// In sequence order, without holes.
        changes: Vec<Change>,
        /// The last sequence assigned (0: none yet).
        head: u64,
    },
    /// The position asked for is gone: changes after it were dropped, or
    /// it is from another incarnation. Continue after `head`.
    Gap {
        /// The last sequence assigned: the position to continue from.
        head: u64,
    },
}

/// Bytes a logged change is accounted with beyond a key too long to be
/// stored inline: its 48-byte slot in the ring buffer (key, version, kind,
/// owner) and the slack of a buffer that grows by doubling (up to twice
/// that).
pub const ENTRY_OVERHEAD: usize = 96;

/// When the change filter cannot rule a key out, [`ChangeLog::changed_after`]
/// looks through at most this many changes for it.
pub const MAX_SCAN: u64 = 65_536;

/// Buckets of the change filter ([`ChangeLog::changed_after`]): 2 MiB of
/// sequences. A copy is refused when another key of its bucket changed
/// since its position too — a lost copy, never a wrong one.
const FILTER_BUCKETS: usize = 1 << 18;

/// A `CompactString` keeps keys up to this long inline.
const INLINE_KEY: usize = 24;

/// Bytes one change is accounted with.
fn weight(key: &str, owner: Option<&str>) -> usize {
    ENTRY_OVERHEAD
        + if key.len() > INLINE_KEY { key.len() } else { 0 }
        + owner.map_or(0, |o| o.len() + 16)
}

#[derive(Debug)]
struct Logged {
    kind: ChangeKind,
    key: CompactString,
    version: u64,
    owner: Option<Box<str>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The changes held, oldest first; `entries[i]` has sequence
    /// `first + i`.
    entries: VecDeque<Logged>,
    /// The sequence of `entries[0]` (or of the next change when empty).
    first: u64,
    /// Bytes accounted to `entries`.
    bytes: usize,
    /// The change filter: for each bucket of key hashes, the sequence of
    /// the last change of a key in it (a debt recorded for it counts), for
    /// the whole incarnation — not only the changes still held.
    last_change: Box<[u64]>,
    /// The sequence of the last flush (a change of every key).
    last_flush: u64,
}

/// The filter bucket of `key`.
fn bucket(key: &str) -> usize {
    use std::hash::BuildHasher;
    static HASHER: foldhash::fast::FixedState =
        foldhash::fast::FixedState::with_seed(0x6368_616e_6765_7321);
    // The low bits of a 64-bit hash: the bucket count is a power of two.
    (HASHER.hash_one(key) as usize) & (FILTER_BUCKETS - 1)
}

/// The change log of one node process.
#[derive(Debug)]
pub struct ChangeLog {
    incarnation: u64,
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// Readers waiting for a change; appends wake them only when there are
    /// any.
    waiting: AtomicUsize,
    wake: tokio::sync::Notify,
    /// Subscribers' positions, for their lag.
    readers: Mutex<HashMap<u64, Arc<AtomicU64>>>,
    next_reader: AtomicU64,
    /// Readers told their position was gone.
    gaps: AtomicU64,
}

impl ChangeLog {
    /// An empty log of incarnation `incarnation` holding at most
    /// `max_bytes` of changes (the oldest are dropped beyond it).
    pub fn new(incarnation: u64, max_bytes: usize) -> Self {
        Self {
            incarnation,
            max_bytes,
            inner: Mutex::new(Inner {
                first: 1,
                entries: VecDeque::new(),
                bytes: 0,
                last_change: vec![0; FILTER_BUCKETS].into_boxed_slice(),
                last_flush: 0,
            }),
            waiting: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(1),
            gaps: AtomicU64::new(0),
        }
    }

    /// The incarnation its sequences belong to.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The byte bound (`--change-log-bytes`).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Appends a change of `key` (which the caller cloned before taking its
    /// shard lock) and wakes waiting readers. Returns its sequence.
    pub fn append(&self, kind: ChangeKind, key: CompactString, version: u64) -> u64 {
        self.append_with(kind, key, version, true)
    }

    /// [`ChangeLog::append`], marking the key in the change filter only
    /// if `filtered` (a copy that only filled in what the node lacked is
    /// not: a later such copy is ordered by its version, and marking it
    /// would refuse other keys of its bucket).
    pub fn append_with(
        &self,
        kind: ChangeKind,
        key: CompactString,
        version: u64,
        filtered: bool,
    ) -> u64 {
        self.push(
            Logged {
                kind,
                key,
                version,
                owner: None,
            },
            filtered,
        )
    }

    /// Appends a debt record: `owner` may hold a stale value of `key`
    /// (record `sequence` of the node's debts).
    pub fn append_owed(&self, owner: &str, key: &str, sequence: u64) -> u64 {
        self.push(
            Logged {
                kind: ChangeKind::Owed,
                key: CompactString::from(key),
                version: sequence,
                owner: Some(owner.into()),
            },
            true,
        )
    }

    /// Appends that `owner`'s debt records up to `through` were settled:
    /// it has been brought up to date on those keys.
    pub fn append_settled(&self, owner: &str, through: u64) -> u64 {
        self.push(
            Logged {
                kind: ChangeKind::Settled,
                key: CompactString::default(),
                version: through,
                owner: Some(owner.into()),
            },
            false,
        )
    }

    fn push(&self, logged: Logged, filtered: bool) -> u64 {
        let sequence = {
            let mut inner = self.inner.lock();
            let sequence = inner.first + inner.entries.len() as u64;
            match logged.kind {
                ChangeKind::Flush => inner.last_flush = sequence,
                ChangeKind::Settled => {}
                // An overflowed debt record (no key) changes no value here.
                _ if logged.key.is_empty() || !filtered => {}
                _ => inner.last_change[bucket(&logged.key)] = sequence,
            }
            inner.bytes += weight(&logged.key, logged.owner.as_deref());
            inner.entries.push_back(logged);
            while inner.bytes > self.max_bytes {
                let Some(old) = inner.entries.pop_front() else {
                    break;
                };
                inner.bytes -= weight(&old.key, old.owner.as_deref());
                inner.first += 1;
            }
            sequence
        };
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake.notify_waiters();
        }
        sequence
    }

    /// Whether `key` may have changed after change `after` of incarnation
    /// `incarnation`: true if it did (a write, a delete, a copy, or a debt
    /// recorded for it: another node missed a change this one took), and
    /// whenever the log cannot tell (another incarnation, a position it
    /// never assigned). A flush counts as a change of every key. Answered
    /// from the change filter in constant time, for any position of this
    /// incarnation — `after = 0` asks whether the key changed at all since
    /// the process started. When another key of its bucket changed since,
    /// the changes still held are looked through (at most [`MAX_SCAN`]);
    /// beyond them it answers yes: false positives only.
    pub fn changed_after(&self, key: &str, incarnation: u64, after: u64) -> bool {
        let inner = self.inner.lock();
        let head = inner.first + inner.entries.len() as u64 - 1;
        if incarnation != self.incarnation || after > head {
            return true;
        }
        if inner.last_flush > after {
            return true;
        }
        if inner.last_change[bucket(key)] <= after {
            return false;
        }
        // The bucket changed: this key, or another of it. Where the log
        // still holds every change since, and not too many, the changes
        // tell exactly; otherwise it may have.
        if after.saturating_add(1) < inner.first || head - after > MAX_SCAN {
            return true;
        }
        let skip = usize::try_from(after + 1 - inner.first).unwrap_or(usize::MAX);
        inner.entries.iter().skip(skip).any(|e| match e.kind {
            ChangeKind::Settled | ChangeKind::Flush => false,
            _ => e.key == key,
        })
    }

    /// The last sequence assigned (0: none yet).
    pub fn head(&self) -> u64 {
        let inner = self.inner.lock();
        inner.first + inner.entries.len() as u64 - 1
    }

    /// Changes held and the bytes accounted to them.
    pub fn len_and_bytes(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.entries.len(), inner.bytes)
    }

    /// Readers told their position was gone, so far.
    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// Up to `max` changes (and at most about `max_bytes` of keys) after
    /// position `(incarnation, after)`, or a gap.
    pub fn read_after(&self, incarnation: u64, after: u64, max: usize, max_bytes: usize) -> Read {
        let inner = self.inner.lock();
        let head = inner.first + inner.entries.len() as u64 - 1;
        if incarnation != self.incarnation || after > head || after.saturating_add(1) < inner.first
        {
            drop(inner);
            self.gaps.fetch_add(1, Ordering::Relaxed);
            return Read::Gap { head };
        }
        // `after + 1 >= first` and `after <= head`: the offset is within
        // the buffer (or at its end).
        let skip = usize::try_from(after + 1 - inner.first).unwrap_or(usize::MAX);
        let mut bytes = 0;
        let changes = inner
            .entries
            .iter()
            .enumerate()
            .skip(skip)
            .take(max)
            .take_while(|(_, e)| {
                bytes += e.key.len() + 16;
                bytes <= max_bytes || bytes == e.key.len() + 16
            })
            .map(|(i, e)| Change {
                sequence: inner.first + i as u64,
                kind: e.kind,
                key: e.key.clone(),
                version: e.version,
                owner: e.owner.clone(),
            })
            .collect();
        Read::Changes { changes, head }
    }

    /// Waits until a change after `after` is appended, or `timeout`
    /// passes. Returns at once if there is one already.
    pub async fn wait_after(&self, after: u64, timeout: Duration) {
        let notified = self.wake.notified();
        tokio::pin!(notified);
        // Registered before the check, so an append between the check and
        // the wait still wakes this reader.
        notified.as_mut().enable();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if self.head() > after {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }

    /// Registers a reader: its position is kept for [`ChangeLog::max_lag`]
    /// until the returned guard is dropped.
    pub fn reader(self: &Arc<Self>, position: u64) -> Reader {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let at = Arc::new(AtomicU64::new(position));
        self.readers.lock().insert(id, at.clone());
        Reader {
            log: self.clone(),
            id,
            at,
        }
    }

    /// Readers now.
    pub fn readers(&self) -> usize {
        self.readers.lock().len()
    }

    /// How many changes the furthest-behind reader has yet to read.
    pub fn max_lag(&self) -> u64 {
        let head = self.head();
        self.readers
            .lock()
            .values()
            .map(|p| head.saturating_sub(p.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0)
    }
}

/// Decrements the waiting count when a wait ends, however it ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A registered reader's position (see [`ChangeLog::reader`]).
#[derive(Debug)]
pub struct Reader {
    log: Arc<ChangeLog>,
    id: u64,
    at: Arc<AtomicU64>,
}

impl Reader {
    /// The reader has read up to `sequence`.
    pub fn read_to(&self, sequence: u64) {
        self.at.store(sequence, Ordering::Relaxed);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.log.readers.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> CompactString {
        CompactString::from(s)
    }

    fn changes(read: Read) -> Vec<(u64, String)> {
        match read {
            Read::Changes { changes, .. } => changes
                .into_iter()
                .map(|c| (c.sequence, c.key.to_string()))
                .collect(),
            Read::Gap { head } => panic!("unexpected gap at {head}"),
        }
    }

    #[test]
    fn reads_resume_after_a_position_in_order() {
        let log = ChangeLog::new(7, 1 << 20);
        assert_eq!(log.head(), 0);
        assert_eq!(
            log.read_after(7, 0, 10, 1 << 20),
            Read::Changes {
                changes: vec![],
                head: 0
            }
        );
        for k in ["a", "b", "c"] {
            log.append(ChangeKind::Set, key(k), 1);
        }
        assert_eq!(log.head(), 3);
        assert_eq!(
            changes(log.read_after(7, 0, 10, 1 << 20)),
            [(1, "a".into()), (2, "b".into()), (3, "c".into())]
        );
        assert_eq!(
            changes(log.read_after(7, 2, 10, 1 << 20)),
            [(3, "c".into())]
        );
        assert_eq!(changes(log.read_after(7, 3, 10, 1 << 20)), []);
        assert_eq!(changes(log.read_after(7, 0, 2, 1 << 20)).len(), 2, "max");
    }

    #[test]
    fn a_position_that_is_gone_is_a_gap() {
        // Room for two changes of short keys.
        let log = ChangeLog::new(7, 2 * ENTRY_OVERHEAD);
        for k in ["a", "b", "c", "d"] {
            log.append(ChangeKind::Delete, key(k), 0);
        }
        assert_eq!(log.len_and_bytes(), (2, 2 * ENTRY_OVERHEAD));
        // "c" and "d" are held: resuming after 2 works, after 1 does not.
        assert_eq!(
            changes(log.read_after(7, 2, 10, 1 << 20)),
            [(3, "c".into()), (4, "d".into())]
        );
        assert_eq!(log.read_after(7, 1, 10, 1 << 20), Read::Gap { head: 4 });
        assert_eq!(
            log.read_after(8, 4, 10, 1 << 20),
            Read::Gap { head: 4 },
            "another incarnation"
        );
        assert_eq!(
            log.read_after(7, 9, 10, 1 << 20),
            Read::Gap { head: 4 },
            "a future position"
        );
        assert_eq!(log.gaps(), 3);
    }

    #[test]
    fn long_keys_count_their_bytes_and_batches_stop_at_the_byte_limit() {
        let long = "k".repeat(1000);
        let log = ChangeLog::new(1, 10 * (ENTRY_OVERHEAD + 1000));
        for _ in 0..20 {
            log.append(ChangeKind::Set, key(&long), 1);
        }
        assert_eq!(log.len_and_bytes().0, 10);
        let Read::Changes { changes, head } = log.read_after(1, 10, 100, 3000) else {
            panic!("gap")
        };
        assert_eq!(head, 20);
        assert_eq!(changes.len(), 2, "3000 bytes hold two 1000-byte keys");
        let Read::Changes { changes, .. } = log.read_after(1, 10, 100, 10) else {
            panic!("gap")
        };
        assert_eq!(changes.len(), 1, "one change even if it alone is over");
    }

    #[test]
    fn a_key_changed_after_a_position_is_known_and_unknown_positions_count_as_changed() {
        let log = ChangeLog::new(3, 3 * ENTRY_OVERHEAD);
        log.append(ChangeKind::Set, key("a"), 1);
        log.append(ChangeKind::Delete, key("b"), 0);
        assert!(log.changed_after("a", 3, 0));
        assert!(!log.changed_after("a", 3, 1), "not since its own change");
        assert!(log.changed_after("b", 3, 1));
        assert!(!log.changed_after("never", 3, 0));
        assert!(log.changed_after("never", 4, 2), "another incarnation");
        // A debt recorded for a key counts as a change of it (another
        // node missed a change this one took); a settlement does not.
        log.append_owed("n9", "c", 1);
        assert!(log.changed_after("c", 3, 2));
        assert!(!log.changed_after("never", 3, 2));
        // Wrapped: "a" (1) and "b" (2) dropped from the log. The filter
        // still knows which keys changed since any position: since the
        // start of the incarnation (0) too.
        log.append(ChangeKind::Set, key("d"), 1);
        log.append(ChangeKind::Set, key("e"), 1);
        assert!(
            log.changed_after("a", 3, 0),
            "changed, though no longer held"
        );
        assert!(log.changed_after("b", 3, 0));
        assert!(!log.changed_after("never", 3, 0));
        assert!(!log.changed_after("a", 3, 3));
        assert!(log.changed_after("a", 3, 6), "a position never assigned");
        // A flush changes every key.
        log.append(ChangeKind::Flush, CompactString::default(), 0);
        assert!(log.changed_after("never", 3, 5));
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_append_and_reports_lag() {
        let log = Arc::new(ChangeLog::new(1, 1 << 20));
        let reader = log.reader(0);
        assert_eq!(log.readers(), 1);
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move {
                log.wait_after(0, Duration::from_secs(30)).await;
                log.head()
            })
        };
        tokio::task::yield_now().await;
        log.append(ChangeKind::Increment, key("n"), 5);
        let head = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap_or_else(|_| panic!("the reader was not woken"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(head, 1);
        assert_eq!(log.max_lag(), 1);
        reader.read_to(1);
        assert_eq!(log.max_lag(), 0);
        drop(reader);
        assert_eq!(log.readers(), 0);
        // With a change already there, no wait.
        tokio::time::timeout(
            Duration::from_secs(10),
            log.wait_after(0, Duration::from_secs(30)),
        )
        .await
        .unwrap_or_else(|_| panic!("waited for a change that was there"));
    }

    #[test]
    fn concurrent_appends_get_distinct_sequences_without_holes() {
        let log = Arc::new(ChangeLog::new(1, 1 << 24));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        log.append(ChangeKind::Set, key(&format!("{t}-{i}")), 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap_or_else(|_| panic!("a writer panicked"));
        }
        let Read::Changes { changes, head } = log.read_after(1, 0, 10_000, usize::MAX) else {
            panic!("gap")
        };
        assert_eq!(head, 4000);
        assert!(
            changes
                .iter()
                .enumerate()
                .all(|(i, c)| c.sequence == i as u64 + 1)
        );
    }
}
