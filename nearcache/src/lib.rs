//! A near cache: answers kept close to whoever reads them, bounded in
//! bytes and in age, and voided by writes — in the orchestrator for hot
//! keys (hot-key relief), and in clients that cache locally.
//!
//! An answer is kept for the cache's `ttl` at most (its maximum age), and
//! never past the key's own expiry; the cache holds at most `capacity`
//! bytes (keys, values and bookkeeping, as weighed by [`weight`]) and
//! evicts to stay within it (quick_cache's CLOCK-Pro).
//!
//! # Consistency
//!
//! Whoever owns the cache invalidates a key once a write or delete of it
//! has been answered ([`NearCache::invalidate`]) — its own writes at once,
//! others' as the nodes' change feeds report them — so a writer that saw
//! its write acknowledged never reads the older value back. A read that
//! fills the cache could race such a write (it read the old value from
//! the node, the write's invalidation ran, then the fill stored the old
//! value): a fill takes a [`Ticket`] — the invalidation count of the key's
//! stripe — before it reads, and stores its answer only if the count has
//! not moved since. The check and the store run under the stripe's lock,
//! as does an invalidation's count and removal, so one runs wholly before
//! the other: an old answer is either refused or removed before the write
//! is acknowledged, never visible after. Two fills can also race each
//! other (both read before any change was seen, the one that read the
//! older version stores last): a fill never replaces a servable answer
//! with a larger version, since versions only grow.
//!
//! What the owner cannot see (a feed lost, a gap in it) it answers by
//! voiding what may have changed unseen: everything
//! ([`NearCache::invalidate_all`]), or the keys a node could have changed
//! ([`NearCache::invalidate_matching`]); fills that read before are
//! refused too. A *generation* ([`NearCache::with_generation`]) voids
//! answers read under another routing.

use std::{
    hash::BuildHasher,
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::Mutex;
use quick_cache::{Weighter, sync::Cache};

/// Invalidation counters; a key's is picked by its hash.
const STRIPES: usize = 1024;

/// Bytes an entry costs beyond its key and value (the entry, the cache's
/// slot, the allocation headers).
pub const ENTRY_OVERHEAD: u64 = 96;

/// A cached answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Whether the key held a live value.
    pub found: bool,
    /// Its value (empty when not found).
    pub value: Bytes,
    /// Its version (0 when not found).
    pub version: u64,
    /// When the key itself expires; `None` if it has no expiry.
    pub expires: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    /// Until when this answer may be served.
    fresh_until: Instant,
    /// The generation its read was routed under.
    routing: u64,
}

/// Bytes an entry of `key_len` and `value_len` bytes costs in the cache.
pub fn weight(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + ENTRY_OVERHEAD
}

#[derive(Debug, Clone, Copy)]
struct EntryWeighter;

impl Weighter<Box<str>, Entry> for EntryWeighter {
    fn weight(&self, key: &Box<str>, entry: &Entry) -> u64 {
        weight(key.len(), entry.answer.value.len())
    }
}

/// Shards of the cache. quick_cache splits the byte capacity between
/// them and refuses an entry heavier than a shard's share, so an answer
/// larger than a quarter of the capacity is not kept; four shards keep
/// reads on many cores from contending on one lock.
const SHARDS: usize = 4;

fn entries(capacity: u64) -> Cache<Box<str>, Entry, EntryWeighter> {
    // quick_cache sizes its tables from an estimate of the entries held.
    let estimated = usize::try_from(capacity / (ENTRY_OVERHEAD + 256))
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 20);
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(estimated)
        .weight_capacity(capacity)
        .shards(SHARDS)
        .build();
    match options {
        Ok(o) => Cache::with_options(o, EntryWeighter, Default::default(), Default::default()),
        Err(_) => Cache::with_weighter(estimated, capacity, EntryWeighter),
    }
}

/// What a read saw of a key's stripe before it went to the nodes.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    stripe: usize,
    seen: u64,
    /// The routing generation when it was taken.
    routing: u64,
}

/// The near cache; see the module documentation.
pub struct NearCache {
    entries: Cache<Box<str>, Entry, EntryWeighter>,
    /// Invalidations per stripe; a fill's check-and-store and an
    /// invalidation's count-and-remove hold the lock.
    stripes: Box<[Mutex<u64>]>,
    hasher: foldhash::fast::FixedState,
    ttl: Duration,
    capacity: u64,
    /// Told the bytes held whenever they change (a gauge).
    observer: Option<Box<dyn Fn(u64) + Send + Sync>>,
    /// Moves whenever routing changes (a node ejected or readmitted, the
    /// membership changed): an answer read under another routing is not
    /// served, as the node it came from may no longer be the one that
    /// gets the key's writes.
    routing: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("entries", &self.entries.len())
            .field("bytes", &self.entries.weight())
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl NearCache {
    /// A cache of at most `capacity` bytes keeping answers for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            entries: entries(capacity),
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hasher: foldhash::fast::FixedState::with_seed(0x6e65_6172),
            ttl,
            capacity,
            observer: None,
            routing: Default::default(),
        }
    }

    /// Serves only answers read under the current value of `generation`
    /// (the cluster's routing generation).
    pub fn with_generation(
        mut self,
        generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.routing = generation;
        self
    }

    fn routing(&self) -> u64 {
        self.routing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Tells `observer` the bytes held whenever they change (to keep a
    /// gauge).
    pub fn with_observer(mut self, observer: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    fn changed(&self) {
        if let Some(o) = &self.observer {
            o(self.entries.weight());
        }
    }

    fn stripe(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    /// The answer cached for `key` if it is still fresh, with the key's
    /// own time left.
    pub fn get(&self, key: &str, now: Instant) -> Option<Answer> {
        let entry = self.entries.get(key)?;
        let expired = entry.answer.expires.is_some_and(|e| e <= now);
        if entry.fresh_until <= now || expired || entry.routing != self.routing() {
            if self.entries.remove(key).is_some() {
                self.changed();
            }
            return None;
        }
        Some(entry.answer)
    }

    /// Taken before reading `key` from the nodes, to [`NearCache::fill`]
    /// with what they answered.
    pub fn ticket(&self, key: &str) -> Ticket {
        let stripe = self.stripe(key);
        Ticket {
            stripe,
            seen: *self.stripes[stripe].lock(),
            routing: self.routing(),
        }
    }

    /// Keeps `answer` for `key`, read after `ticket` was taken, unless a
    /// write or delete of a key of its stripe ended since, or a newer
    /// answer is held (two fills raced: the slower one read earlier).
    pub fn fill(&self, key: &str, ticket: Ticket, answer: Answer, now: Instant) {
        {
            let stripe = self.stripes[ticket.stripe].lock();
            if *stripe != ticket.seen {
                return;
            }
            // Versions only grow, so a held answer with a larger one was
            // read later. (One read before a delete the held answer came
            // after cannot be held: the delete voided every fill that read
            // before it.)
            if self.entries.peek(key).is_some_and(|held| {
                held.answer.found
                    && held.answer.version > answer.version
                    && held.fresh_until > now
                    && held.answer.expires.is_none_or(|e| e > now)
                    && held.routing == ticket.routing
            }) {
                return;
            }
            self.entries.insert(
                key.into(),
                Entry {
                    answer,
                    fresh_until: now + self.ttl,
                    routing: ticket.routing,
                },
            );
        }
        self.changed();
    }

    /// A write or delete of `key` has been answered by the nodes: the
    /// cached answer, and any fill that read before now, are void.
    pub fn invalidate(&self, key: &str) {
        let removed = {
            let mut stripe = self.stripes[self.stripe(key)].lock();
            *stripe = stripe.wrapping_add(1);
            self.entries.remove(key).is_some()
        };
        if removed {
            self.changed();
        }
    }

    /// Every cached answer, and every fill that read before now, are void
    /// (a node's feed had a gap, or a node was flushed).
    pub fn invalidate_all(&self) {
        // Each stripe's count moves under its lock, as in `invalidate`:
        // a fill that checked its stripe before stored an answer that
        // `clear` removes; one that checks after is refused.
        for stripe in &*self.stripes {
            let mut count = stripe.lock();
            *count = count.wrapping_add(1);
        }
        self.entries.clear();
        self.changed();
    }

    /// The answers of keys `drop` names, and every fill that read before
    /// now, are void (a node's feed had a gap, was lost or restarted: the
    /// keys it could have changed unseen).
    pub fn invalidate_matching(&self, drop: impl Fn(&str) -> bool) {
        // As `invalidate_all`: counts move first, so a fill that read
        // before is refused whichever key it is.
        for stripe in &*self.stripes {
            let mut count = stripe.lock();
            *count = count.wrapping_add(1);
        }
        self.entries.retain(|key, _| !drop(key));
        self.changed();
    }

    /// Whether `key` has an answer cached (fresh or not yet evicted).
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Bytes held now, as [`weight`] counts them.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    /// Answers held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most bytes it holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How long an answer is served.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_voids_everything_and_fills_that_read_before_it() {
        let c = NearCache::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        c.fill("a", c.ticket("a"), answer(b"1", 1), now);
        c.fill("b", c.ticket("b"), answer(b"2", 2), now);
        let before = c.ticket("c");
        c.invalidate_all();
        assert!(c.get("a", now).is_none() && c.get("b", now).is_none());
        c.fill("c", before, answer(b"3", 3), now);
        assert!(c.get("c", now).is_none(), "a fill that read before the gap");
        c.fill("c", c.ticket("c"), answer(b"3", 3), now);
        assert!(c.get("c", now).is_some());
    }

    #[test]
    fn of_two_racing_fills_the_older_answer_never_replaces_the_newer() {
        let c = NearCache::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        // Both read before any change was seen; the one that read v1 was
        // slower to fill.
        let (slow, fast) = (c.ticket("k"), c.ticket("k"));
        c.fill("k", fast, answer(b"new", 2), now);
        c.fill("k", slow, answer(b"old", 1), now);
        assert_eq!(c.get("k", now).unwrap().version, 2);
        let absent = Answer {
            found: false,
            value: Bytes::new(),
            version: 0,
            expires: None,
        };
        c.fill("k", c.ticket("k"), absent, now);
        assert_eq!(c.get("k", now).unwrap().version, 2);
        // A newer answer does replace it.
        c.fill("k", c.ticket("k"), answer(b"newer", 3), now);
        assert_eq!(c.get("k", now).unwrap().version, 3);
    }

    #[test]
    fn answers_read_under_another_routing_are_not_served() {
        let routing = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(5));
        let c = NearCache::new(1 << 20, Duration::from_secs(60)).with_generation(routing.clone());
        let now = Instant::now();
        c.fill("k", c.ticket("k"), answer(b"v", 1), now);
        assert!(c.get("k", now).is_some());
        let t = c.ticket("k");
        // A node was readmitted: the answer came from the node standing in.
        routing.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        assert!(c.get("k", now).is_none());
        c.fill("k", t, answer(b"v", 1), now);
        assert!(
            c.get("k", now).is_none(),
            "read before the change, filled after"
        );
        c.fill("k", c.ticket("k"), answer(b"v", 1), now);
        assert!(c.get("k", now).is_some());
    }

    fn answer(value: &'static [u8], version: u64) -> Answer {
        Answer {
            found: true,
            value: Bytes::from_static(value),
            version,
            expires: None,
        }
    }

    #[test]
    fn a_node_scoped_void_drops_only_the_keys_named_and_every_fill_in_flight() {
        let c = NearCache::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        c.fill("a:1", c.ticket("a:1"), answer(b"1", 1), now);
        c.fill("b:1", c.ticket("b:1"), answer(b"2", 2), now);
        let before = c.ticket("b:2");
        c.invalidate_matching(|k| k.starts_with("a:"));
        assert!(c.get("a:1", now).is_none());
        assert!(c.get("b:1", now).is_some(), "kept");
        c.fill("b:2", before, answer(b"3", 3), now);
        assert!(c.get("b:2", now).is_none(), "read before the void");
    }

    #[test]
    fn a_filled_answer_is_served_until_its_ttl() {
        let c = NearCache::new(1 << 20, Duration::from_millis(100));
        let now = Instant::now();
        let t = c.ticket("k");
        c.fill("k", t, answer(b"v", 3), now);
        let got = c.get("k", now + Duration::from_millis(99)).unwrap();
        assert_eq!((got.value.as_ref(), got.version), (&b"v"[..], 3));
        assert!(c.get("k", now + Duration::from_millis(100)).is_none());
        assert!(!c.contains("k"), "a stale answer is dropped when seen");
    }

    #[test]
    fn an_answer_is_not_served_past_the_keys_own_expiry() {
        let c = NearCache::new(1 << 20, Duration::from_secs(10));
        let now = Instant::now();
        let mut a = answer(b"v", 1);
        a.expires = Some(now + Duration::from_millis(5));
        c.fill("k", c.ticket("k"), a, now);
        assert!(c.get("k", now + Duration::from_millis(4)).is_some());
        assert!(c.get("k", now + Duration::from_millis(5)).is_none());
    }

    #[test]
    fn an_invalidation_removes_the_answer() {
        let c = NearCache::new(1 << 20, Duration::from_secs(10));
        let now = Instant::now();
        c.fill("k", c.ticket("k"), answer(b"old", 1), now);
        c.invalidate("k");
        assert!(c.get("k", now).is_none());
    }

    #[test]
    fn a_fill_that_read_before_an_invalidation_is_dropped() {
        let c = NearCache::new(1 << 20, Duration::from_secs(10));
        let now = Instant::now();
        // The read took its ticket, then a write ended before the fill.
        let t = c.ticket("k");
        c.invalidate("k");
        c.fill("k", t, answer(b"old", 1), now);
        assert!(c.get("k", now).is_none());
        // A read after the write fills.
        c.fill("k", c.ticket("k"), answer(b"new", 2), now);
        assert_eq!(c.get("k", now).unwrap().version, 2);
    }

    #[test]
    fn racing_fills_and_invalidations_never_leave_an_old_answer() {
        // Threads fill "k" with the version they read before their ticket
        // was taken; the writer bumps the version, then invalidates. After
        // every write ends, the cache must not hold a version older than it.
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let c = Arc::new(NearCache::new(1 << 20, Duration::from_secs(10)));
        let version = Arc::new(AtomicU64::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (c, version, stop) = (c.clone(), version.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let t = c.ticket("k");
                        let v = version.load(Ordering::SeqCst);
                        c.fill("k", t, answer(b"v", v), Instant::now());
                    }
                })
            })
            .collect();
        for _ in 0..20_000 {
            let v = version.fetch_add(1, Ordering::SeqCst) + 1;
            c.invalidate("k");
            if let Some(a) = c.get("k", Instant::now()) {
                assert!(a.version >= v, "served {} after {v} was written", a.version);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bytes() {
        let capacity = 64 * 1024;
        let c = NearCache::new(capacity, Duration::from_secs(10));
        let now = Instant::now();
        static VALUE: [u8; 1000] = [7; 1000];
        for i in 0..1000 {
            let key = format!("key:{i}");
            c.fill(&key, c.ticket(&key), answer(&VALUE, 1), now);
            assert!(c.bytes() <= capacity, "{} > {capacity}", c.bytes());
        }
        assert!(c.len() > 10, "it still caches: {}", c.len());
    }
}
