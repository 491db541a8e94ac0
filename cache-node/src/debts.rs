//! Debts: keys other nodes may hold stale values of, recorded on the node
//! that took the change they missed. No gRPC in here.
//!
//! When a write or delete of a key reaches this node but not one of the
//! key's owners — the owner was ejected, or the call to it failed — the
//! orchestrator that made it records the key here against that owner
//! (an `Owe` op) before it answers its client. The record lives on the
//! node, not in the orchestrator: any orchestrator, including one started
//! after the failure, reads it (`Internal/Debts`) and deletes the keys on
//! the owner before routing to it, then settles them here
//! (`Internal/Settle`). This is mcrouter's reliable delete ("a redo log"),
//! kept where the data is.
//!
//! Each record has a sequence number, so a settlement drops only what was
//! listed: a key recorded again after the listing stays. The records are
//! bounded in bytes (`--debt-bytes`); when one owner's would go past the
//! bound, they are replaced by an *overflow* mark — everything the owner
//! holds may be stale, so it is flushed before it serves again.

use std::collections::HashMap;

use parking_lot::Mutex;

/// Bytes a record is accounted with beyond its key: the map's slot and
/// the sequence.
pub const RECORD_OVERHEAD: usize = 64;

/// The debts of one owner.
#[derive(Debug, Default)]
struct Owed {
    keys: HashMap<String, u64>,
    /// The sequence of the last record made while overflowed; `None` when
    /// not overflowed.
    overflowed: Option<u64>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    owners: HashMap<String, Owed>,
    bytes: usize,
    last: u64,
}

/// One owner's debts as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Keys, oldest record first (empty when overflowed).
    pub keys: Vec<String>,
    /// Everything the owner holds may be stale.
    pub overflowed: bool,
    /// The sequence to settle through once the keys are handled.
    pub through: u64,
    /// More records than were listed.
    pub more: bool,
}

/// The debts recorded on this node.
#[derive(Debug)]
pub struct Debts {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

impl Debts {
    /// An empty record of at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
        }
    }

    /// Records that `owner` may hold a stale value of `key`; returns the
    /// record's sequence and whether it is an overflow mark.
    pub fn record(&self, owner: &str, key: &str) -> (u64, bool) {
        let mut inner = self.inner.lock();
        inner.last += 1;
        let sequence = inner.last;
        let weight = key.len() + RECORD_OVERHEAD;
        let Inner { owners, bytes, .. } = &mut *inner;
        let owed = owners.entry(owner.to_owned()).or_default();
        if owed.overflowed.is_some() {
            owed.overflowed = Some(sequence);
            return (sequence, true);
        }
        match owed.keys.insert(key.to_owned(), sequence) {
            Some(_) => {}
            None => {
                owed.bytes += weight;
                *bytes += weight;
            }
        }
        if *bytes > self.max_bytes {
            tracing::warn!(
                owner,
                keys = owed.keys.len(),
                max_bytes = self.max_bytes,
                "too many keys recorded for a node that missed changes (--debt-bytes): it will be flushed before it serves again"
            );
            *bytes -= owed.bytes;
            owed.keys = HashMap::new();
            owed.bytes = 0;
            owed.overflowed = Some(sequence);
            return (sequence, true);
        }
        (sequence, false)
    }

    /// Up to `limit` of `owner`'s debts, oldest first.
    pub fn list(&self, owner: &str, limit: usize) -> Listed {
        let inner = self.inner.lock();
        let Some(owed) = inner.owners.get(owner) else {
            return Listed {
                keys: Vec::new(),
                overflowed: false,
                through: 0,
                more: false,
            };
        };
        if let Some(at) = owed.overflowed {
            let through = owed.keys.values().copied().max().unwrap_or(0).max(at);
            return Listed {
                keys: Vec::new(),
                overflowed: true,
                through,
                more: false,
            };
        }
        let mut records: Vec<(&String, u64)> = owed.keys.iter().map(|(k, s)| (k, *s)).collect();
        records.sort_unstable_by_key(|(_, s)| *s);
        let more = records.len() > limit;
        records.truncate(limit);
        Listed {
            through: records.last().map_or(0, |(_, s)| *s),
            keys: records.into_iter().map(|(k, _)| k.clone()).collect(),
            overflowed: false,
            more,
        }
    }

    /// Drops `owner`'s records up to sequence `through`; returns how many.
    pub fn settle(&self, owner: &str, through: u64) -> u64 {
        let mut inner = self.inner.lock();
        let Inner { owners, bytes, .. } = &mut *inner;
        let Some(owed) = owners.get_mut(owner) else {
            return 0;
        };
        let before = owed.keys.len();
        let mut freed = 0;
        owed.keys.retain(|k, s| {
            let keep = *s > through;
            if !keep {
                freed += k.len() + RECORD_OVERHEAD;
            }
            keep
        });
        owed.bytes -= freed;
        *bytes -= freed;
        let mut settled = (before - owed.keys.len()) as u64;
        if owed.overflowed.is_some_and(|at| at <= through) {
            owed.overflowed = None;
            settled += 1;
        }
        if owed.keys.is_empty() && owed.overflowed.is_none() {
            owners.remove(owner);
        }
        settled
    }

    /// Owners with debts, keys recorded, and bytes accounted.
    pub fn totals(&self) -> (usize, usize, usize) {
        let inner = self.inner.lock();
        let keys = inner.owners.values().map(|o| o.keys.len()).sum();
        (inner.owners.len(), keys, inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_listed_oldest_first_and_settled_up_to_a_sequence() {
        let d = Debts::new(1 << 20);
        let (a, _) = d.record("n1", "a");
        d.record("n1", "b");
        d.record("n2", "x");
        let listed = d.list("n1", 10);
        assert_eq!(listed.keys, ["a", "b"]);
        assert!(!listed.overflowed && !listed.more);
        // "a" is recorded again after the listing: it stays.
        let (a2, _) = d.record("n1", "a");
        assert!(a2 > a);
        assert_eq!(d.settle("n1", listed.through), 1);
        assert_eq!(d.list("n1", 10).keys, ["a"]);
        assert_eq!(d.list("n2", 10).keys, ["x"]);
        assert_eq!(d.totals().1, 2);
        d.settle("n1", u64::MAX);
        d.settle("n2", u64::MAX);
        assert_eq!(d.totals(), (0, 0, 0));
        assert_eq!(d.list("n1", 10).keys, Vec::<String>::new());
    }

    #[test]
    fn listings_are_limited_and_say_there_is_more() {
        let d = Debts::new(1 << 20);
        for i in 0..5 {
            d.record("n1", &format!("k{i}"));
        }
        let first = d.list("n1", 2);
        assert_eq!((first.keys.len(), first.more), (2, true));
        d.settle("n1", first.through);
        let rest = d.list("n1", 10);
        assert_eq!(rest.keys, ["k2", "k3", "k4"]);
        assert!(!rest.more);
    }

    #[test]
    fn an_owner_over_the_bound_is_marked_for_a_flush_until_settled() {
        let d = Debts::new(3 * (RECORD_OVERHEAD + 2));
        for i in 0..3 {
            assert!(!d.record("n1", &format!("k{i}")).1);
        }
        assert!(d.record("n1", "k3").1, "over the bound");
        let listed = d.list("n1", 10);
        assert!(listed.overflowed && listed.keys.is_empty());
        assert_eq!(d.totals().2, 0, "the keys' bytes are freed");
        // Recorded again while overflowed: a settlement of the earlier
        // listing does not clear the mark.
        let (later, overflow) = d.record("n1", "k4");
        assert!(overflow && later > listed.through);
        d.settle("n1", listed.through);
        assert!(d.list("n1", 10).overflowed);
        d.settle("n1", later);
        assert!(!d.list("n1", 10).overflowed);
        assert!(!d.record("n1", "k5").1, "room again");
    }
}
