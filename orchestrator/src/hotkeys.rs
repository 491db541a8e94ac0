//! Hot-key detection: which keys take the most reads and writes through
//! this orchestrator, in bounded memory and at a small cost per call.
//!
//! A space-saving sketch (Metwally et al.): at most [`SLOTS`] keys are
//! counted; a key not counted yet takes the slot of the least counted one
//! and inherits its count as its error bound, so every key whose true
//! count exceeds `calls / SLOTS` is guaranteed to be in the sketch. Only
//! one call in [`SAMPLE`] is counted (a hash of a shared call counter
//! picks them), so the common case costs one atomic add; counts are scaled back up when rates
//! are reported. Counting restarts every window (`--hot-key-window`); the
//! last full window is what [`HotKeys::top`] reports, so a rate is the
//! rate of the last second (by default), not of the process's life.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};

/// Keys counted at once.
pub const SLOTS: usize = 256;

/// One call in this many is counted.
pub const SAMPLE: u64 = 8;

/// splitmix64's finalizer: consecutive inputs give unrelated outputs.
#[inline]
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What a call did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read (Get, GetMany, Exists).
    Read,
    /// A write (Set, SetMany, Delete, DeleteMany, Increment, Touch).
    Write,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    reads: u64,
    writes: u64,
    /// Counts inherited from the key this one replaced: the estimate may
    /// be this much too high.
    error: u64,
}

impl Counter {
    fn total(&self) -> u64 {
        self.reads + self.writes
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    counters: HashMap<Arc<str>, Counter>,
    /// Every (total, key) a key had when counted, least first: the least
    /// counted key is the first entry whose total is still its key's
    /// (totals only grow, so the others are stale). Finding it this way
    /// costs a few heap operations instead of a scan of every slot.
    by_total: BinaryHeap<Reverse<(u64, Arc<str>)>>,
}

impl Window {
    fn new(started: Instant) -> Self {
        Self {
            started,
            counters: HashMap::with_capacity(SLOTS),
            by_total: BinaryHeap::with_capacity(2 * SLOTS),
        }
    }

    /// If this window is `len` old (or `at_once`), starts a new one at
    /// `now` and returns the finished one.
    fn end_if(&mut self, now: Instant, len: Duration, at_once: bool) -> Option<Window> {
        (at_once || now.duration_since(self.started) >= len)
            .then(|| std::mem::replace(self, Window::new(now)))
    }

    /// The least counted key and its counter.
    fn least(&mut self) -> Option<(Arc<str>, Counter)> {
        loop {
            let Reverse((total, key)) = self.by_total.peek()?;
            if let Some(c) = self.counters.get(key)
                && c.total() == *total
            {
                return Some((key.clone(), *c));
            }
            self.by_total.pop();
        }
    }

    /// Notes that `key` now has `total`; rebuilds the index once stale
    /// entries outnumber live ones three to one (bounded memory).
    fn indexed(&mut self, key: Arc<str>, total: u64) {
        self.by_total.push(Reverse((total, key)));
        if self.by_total.len() > 4 * SLOTS {
            self.by_total = self
                .counters
                .iter()
                .map(|(k, c)| Reverse((c.total(), k.clone())))
                .collect();
        }
    }
}

/// A key's estimated rates over the last full window.
#[derive(Debug, Clone, PartialEq)]
pub struct HotKey {
    /// The key.
    pub key: String,
    /// Reads per second.
    pub reads_per_second: f64,
    /// Writes per second.
    pub writes_per_second: f64,
    /// How much of the rates may be overestimation (per second).
    pub error_per_second: f64,
}

impl HotKey {
    /// Reads and writes per second.
    pub fn rate(&self) -> f64 {
        self.reads_per_second + self.writes_per_second
    }
}

/// The sketch; see the module documentation.
#[derive(Debug)]
pub struct HotKeys {
    window: Duration,
    /// Calls per second (reads + writes) from which a key counts as hot.
    threshold: f64,
    /// Hot keys in the last window, for `/metrics`.
    gauge: Option<prometheus::IntGauge>,
    calls: AtomicU64,
    current: Mutex<Window>,
    last: Mutex<Vec<HotKey>>,
    /// The hot keys of the last window, for [`HotKeys::is_hot_now`].
    hot_now: RwLock<HashSet<Box<str>>>,
    /// Whether `hot_now` has any key (so most calls skip its lock).
    any_hot: AtomicBool,
}

impl HotKeys {
    /// A sketch reporting rates over windows of `window`; keys at
    /// `threshold` calls per second or more are hot (counted in `gauge`).
    pub fn new(window: Duration, threshold: f64, gauge: Option<prometheus::IntGauge>) -> Self {
        Self {
            window: window.max(Duration::from_millis(1)),
            threshold,
            gauge,
            calls: AtomicU64::new(0),
            current: Mutex::new(Window::new(Instant::now())),
            last: Mutex::new(Vec::new()),
            hot_now: RwLock::new(HashSet::new()),
            any_hot: AtomicBool::new(false),
        }
    }

    /// Counts one access of `key` (one in [`SAMPLE`] is actually counted).
    #[inline]
    pub fn record(&self, key: &str, access: Access) {
        // Which calls are counted is decided by a hash of the call count,
        // not the count itself: a workload that repeats a cycle of keys (a
        // GetMany of 16 keys, two keys read in turn) would otherwise have
        // the same keys counted every time and the others never.
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if !mix(n).is_multiple_of(SAMPLE) {
            return;
        }
        self.count(key, access, Instant::now());
    }

    fn count(&self, key: &str, access: Access, now: Instant) {
        let mut w = self.current.lock();
        if let Some(finished) = w.end_if(now, self.window, false) {
            drop(w);
            self.publish(finished, now);
            w = self.current.lock();
        }
        let w = &mut *w;
        if !w.counters.contains_key(key) && w.counters.len() >= SLOTS {
            // Space-saving: the least counted key gives up its slot, and
            // its count becomes the newcomer's error bound.
            if let Some((k, c)) = w.least() {
                w.counters.remove(&k);
                w.counters.insert(
                    key.into(),
                    Counter {
                        reads: 0,
                        writes: 0,
                        error: c.total(),
                    },
                );
            }
        }
        let bump = |c: &mut Counter| match access {
            Access::Read => c.reads += 1,
            Access::Write => c.writes += 1,
        };
        match w.counters.get_mut(key) {
            Some(c) => bump(c),
            None => {
                let mut c = Counter::default();
                bump(&mut c);
                w.counters.insert(key.into(), c);
            }
        }
        if let Some((k, c)) = w.counters.get_key_value(key) {
            let (k, total) = (k.clone(), c.total());
            w.indexed(k, total);
        }
    }

    fn publish(&self, finished: Window, now: Instant) {
        let secs = now
            .duration_since(finished.started)
            .as_secs_f64()
            .max(f64::EPSILON);
        let scale = SAMPLE as f64 / secs;
        let mut keys: Vec<HotKey> = finished
            .counters
            .into_iter()
            .map(|(key, c)| HotKey {
                key: key.to_string(),
                reads_per_second: (c.reads + c.error) as f64 * scale,
                writes_per_second: c.writes as f64 * scale,
                error_per_second: c.error as f64 * scale,
            })
            .collect();
        keys.sort_by(|a, b| b.rate().total_cmp(&a.rate()));
        let hot: HashSet<Box<str>> = keys
            .iter()
            .filter(|k| self.is_hot(k))
            .map(|k| k.key.as_str().into())
            .collect();
        if let Some(g) = &self.gauge {
            g.set(hot.len() as i64);
        }
        self.any_hot.store(!hot.is_empty(), Ordering::Release);
        *self.hot_now.write() = hot;
        *self.last.lock() = keys;
    }

    /// Whether any key was hot in the last full window.
    #[inline]
    pub fn any_hot(&self) -> bool {
        self.any_hot.load(Ordering::Acquire)
    }

    /// Whether `key` was hot in the last full window. Cheap when no key
    /// is (one atomic load). A window with no calls since the last ends
    /// when the next call is counted.
    #[inline]
    pub fn is_hot_now(&self, key: &str) -> bool {
        self.any_hot.load(Ordering::Acquire) && self.hot_now.read().contains(key)
    }

    /// Whether `key`'s rate makes it hot.
    pub fn is_hot(&self, key: &HotKey) -> bool {
        key.rate() >= self.threshold
    }

    /// The `limit` busiest keys of the last full window, busiest first.
    /// A window with no calls since reports nothing.
    pub fn top(&self, limit: usize) -> Vec<HotKey> {
        self.roll(false);
        let last = self.last.lock();
        last.iter().take(limit).cloned().collect()
    }

    /// Ends the current window if it is over (or at once with `now`) and
    /// publishes it. Rates are counts over the window's real length: after
    /// a quiet spell they come out low, and an empty window reports
    /// nothing.
    pub fn roll(&self, at_once: bool) {
        let now = Instant::now();
        let mut w = self.current.lock();
        if let Some(finished) = w.end_if(now, self.window, at_once) {
            drop(w);
            self.publish(finished, now);
        }
    }

    /// The reporting window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Calls per second from which a key is hot.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_evicted_key_is_always_a_least_counted_one_and_the_index_stays_bounded() {
        let h = HotKeys::new(Duration::from_secs(3600), 1000.0, None);
        let start = Instant::now();
        // A skewed, shifting mix of 3 × SLOTS keys, so slots keep changing
        // hands and totals keep growing unevenly.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..50_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("k{}", (x % (3 * SLOTS as u64)) / (1 + i % 3));
            let mut w = h.current.lock();
            let full = w.counters.len() >= SLOTS && !w.counters.contains_key(key.as_str());
            let least = full.then(|| w.least()).flatten();
            let min = w.counters.values().map(Counter::total).min();
            drop(w);
            if let Some((k, c)) = least {
                assert_eq!(Some(c.total()), min, "{k} is not a least counted key");
            }
            h.count(&key, Access::Read, start);
            let w = h.current.lock();
            assert!(w.counters.len() <= SLOTS);
            assert!(w.by_total.len() <= 4 * SLOTS, "{}", w.by_total.len());
        }
    }

    #[test]
    fn a_heavy_key_among_many_light_ones_is_found_with_its_rate() {
        let h = HotKeys::new(Duration::from_secs(3600), 1000.0, None);
        let start = Instant::now();
        // 10,000 distinct light keys once each, and one key 5,000 times,
        // interleaved (counted directly: no sampling in the test).
        for i in 0..10_000u32 {
            h.count(&format!("light:{i}"), Access::Read, start);
            if i % 2 == 0 {
                h.count("hot", Access::Read, start);
            }
            if i % 10 == 0 {
                h.count("hot", Access::Write, start);
            }
        }
        let counters = h.current.lock().counters.len();
        assert!(counters <= SLOTS, "bounded: {counters}");
        let w = std::mem::replace(&mut *h.current.lock(), Window::new(start));
        h.publish(w, start + Duration::from_secs(1));
        let top = h.top(3);
        assert_eq!(top[0].key, "hot");
        // Counted directly here, so rates are scaled by SAMPLE.
        let reads = top[0].reads_per_second / SAMPLE as f64;
        let writes = top[0].writes_per_second / SAMPLE as f64;
        // (The window began a moment before `start`: allow 1%.)
        assert!((4_950.0..=5_050.0).contains(&reads), "{top:?}");
        assert!((990.0..=1_010.0).contains(&writes), "{top:?}");
        assert!(top[1].reads_per_second < top[0].reads_per_second / 10.0);
    }

    #[test]
    fn sampling_counts_about_one_call_in_sample() {
        let h = HotKeys::new(Duration::from_secs(3600), 1000.0, None);
        for _ in 0..(SAMPLE * 1000) {
            h.record("k", Access::Read);
        }
        let counted = h.current.lock().counters["k"].reads;
        assert!((900..=1100).contains(&counted), "{counted}");
    }

    #[test]
    fn keys_read_in_a_cycle_are_all_counted() {
        // 16 keys in turn (a GetMany repeated): a cycle that is a multiple
        // of SAMPLE must not hide any of them.
        let h = HotKeys::new(Duration::from_secs(3600), 1000.0, None);
        let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
        for _ in 0..1000 {
            for k in &keys {
                h.record(k, Access::Read);
            }
        }
        let counters = &h.current.lock().counters;
        for k in &keys {
            let reads = counters.get(k.as_str()).map_or(0, |c| c.reads);
            assert!((80..=170).contains(&reads), "{k}: {reads}");
        }
    }

    #[test]
    fn rates_describe_the_last_window_only() {
        let h = HotKeys::new(Duration::from_millis(20), 1000.0, None);
        for _ in 0..(SAMPLE * 10) {
            h.record("k", Access::Read);
        }
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(h.top(5).len(), 1, "the finished window is reported");
        std::thread::sleep(Duration::from_millis(50));
        assert!(h.top(5).is_empty(), "nothing since: nothing hot");
    }
}
