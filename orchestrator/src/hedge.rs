//! Hedged reads ("The Tail at Scale"; Cassandra's speculative retry;
//! gRPC's hedging policy, gRFC A6).
//!
//! With `--replicas` ≥ 2, a read whose node has not answered within the
//! hedge delay is also sent to the key's next owner, and the first answer
//! wins. A hung or slow owner then costs a read the delay, not the
//! caller's whole deadline.
//!
//! - **Delay**: `--hedge-delay`, or by default the 99th percentile of the
//!   latency of node calls that *answered* over the last few seconds
//!   (calls that never answer must not push it up), with a floor of
//!   [`MIN_DELAY`] and at most `--node-timeout`. Refreshed by
//!   [`Hedging::refresh`] every [`REFRESH`], off the request path; a read
//!   only records its latency in a log-scaled bucket (one atomic add).
//! - **Budget**: hedged keys are at most `--hedge-budget` percent of the
//!   keys read over a sliding window of about [`WINDOW`] (plus a small
//!   burst), so a cluster that is slow everywhere is not asked twice for
//!   everything.
//! - Writes are never hedged: a second copy of a write could land after a
//!   newer one.
//!
//! What is pure here (the histogram, the quantile, the budget) is tested
//! alone; the race between the two calls lives in the router.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    time::Duration,
};

use prometheus::{IntCounter, IntGauge};

/// The shortest hedge delay: below it a hedge would mostly duplicate
/// reads that were about to answer.
pub const MIN_DELAY: Duration = Duration::from_millis(2);

/// How often the delay is recomputed and the windows move.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How far back the delay and the budget look (two half-windows).
pub const WINDOW: Duration = Duration::from_secs(10);

/// Hedged keys allowed beyond the budget's percentage, so a light load
/// can still hedge.
const BURST: u64 = 20;

/// Buckets per doubling of latency.
const STEPS_PER_OCTAVE: f64 = 4.0;
/// The latency of the first bucket's upper bound, in microseconds.
const FIRST_US: f64 = 16.0;
/// 16 µs × 2^(80/4) ≈ 16.8 s: beyond any `--node-timeout`.
const BUCKETS: usize = 80;

/// The upper bound of bucket `i`, in microseconds.
fn bucket_bound_us(i: usize) -> f64 {
    FIRST_US * (i as f64 / STEPS_PER_OCTAVE).exp2()
}

/// The bucket of a latency.
fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= FIRST_US {
        return 0;
    }
    let i = ((us / FIRST_US).log2() * STEPS_PER_OCTAVE).ceil();
    // `i` is positive and finite here; the cast saturates anyway.
    (i as usize).min(BUCKETS - 1)
}

/// A log-scaled latency histogram over two half-windows: the one being
/// filled and the one before it.
#[derive(Debug)]
struct Histogram {
    halves: [[AtomicU64; BUCKETS]; 2],
    current: AtomicUsize,
}

impl Histogram {
    fn new() -> Self {
        Self {
            halves: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            current: AtomicUsize::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let half = self.current.load(Relaxed) & 1;
        self.halves[half][bucket_of(latency)].fetch_add(1, Relaxed);
    }

    /// The upper bound of the bucket holding quantile `q` over both
    /// halves; `None` with fewer than `min_samples` samples.
    fn quantile(&self, q: f64, min_samples: u64) -> Option<Duration> {
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|i| self.halves[0][i].load(Relaxed) + self.halves[1][i].load(Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total < min_samples.max(1) {
            return None;
        }
        // The rank of the quantile, at least 1.
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(bucket_bound_us(i) / 1e6));
            }
        }
        Some(Duration::from_secs_f64(bucket_bound_us(BUCKETS - 1) / 1e6))
    }

    /// Starts a new half-window, forgetting the oldest.
    fn rotate(&self) {
        let next = (self.current.load(Relaxed) + 1) & 1;
        for c in &self.halves[next] {
            c.store(0, Relaxed);
        }
        self.current.store(next, Relaxed);
    }
}

/// Hedged keys against keys read, over two half-windows.
#[derive(Debug)]
struct Budget {
    /// Hedged keys allowed per 100 keys read.
    percent: u64,
    reads: [AtomicU64; 2],
    hedges: [AtomicU64; 2],
    current: AtomicUsize,
}

impl Budget {
    fn new(percent: u64) -> Self {
        Self {
            percent,
            reads: Default::default(),
            hedges: Default::default(),
            current: AtomicUsize::new(0),
        }
    }

    fn read(&self, keys: usize) {
        let half = self.current.load(Relaxed) & 1;
        self.reads[half].fetch_add(keys as u64, Relaxed);
    }

    /// Takes `keys` hedges from the budget if it has room for them.
    fn try_take(&self, keys: usize) -> bool {
        let keys = keys as u64;
        let reads = self.reads[0].load(Relaxed) + self.reads[1].load(Relaxed);
        let hedges = self.hedges[0].load(Relaxed) + self.hedges[1].load(Relaxed);
        let allowed = reads.saturating_mul(self.percent) / 100 + BURST;
        if hedges.saturating_add(keys) > allowed {
            return false;
        }
        // Racing callers may overshoot by a few keys: a bound, not a quota.
        let half = self.current.load(Relaxed) & 1;
        self.hedges[half].fetch_add(keys, Relaxed);
        true
    }

    fn rotate(&self) {
        let next = (self.current.load(Relaxed) + 1) & 1;
        self.reads[next].store(0, Relaxed);
        self.hedges[next].store(0, Relaxed);
        self.current.store(next, Relaxed);
    }
}

/// How the hedge delay is chosen (`--hedge-delay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayPolicy {
    /// No hedging.
    Off,
    /// The observed p99 of answered node calls, at least [`MIN_DELAY`].
    Auto,
    /// A fixed delay.
    Fixed(Duration),
}

impl std::str::FromStr for DelayPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "0" => Ok(DelayPolicy::Off),
            "auto" => Ok(DelayPolicy::Auto),
            other => match humantime::parse_duration(other) {
                Ok(d) if d.is_zero() => Ok(DelayPolicy::Off),
                Ok(d) => Ok(DelayPolicy::Fixed(d)),
                Err(e) => Err(format!(
                    "{other:?} is not auto, off or a duration such as 20ms: {e}"
                )),
            },
        }
    }
}

/// Metrics of hedging.
#[derive(Debug, Clone)]
pub struct HedgeMetrics {
    /// `ringcache_hedged_keys_total`: keys sent to a second owner.
    pub hedged: IntCounter,
    /// `ringcache_hedge_wins_total`: keys the second owner answered first.
    pub wins: IntCounter,
    /// `ringcache_hedge_budget_exhausted_total`: keys not hedged because
    /// the budget was spent.
    pub refused: IntCounter,
    /// `ringcache_hedge_delay_microseconds`: the delay in force.
    pub delay_us: IntGauge,
}

/// The hedging state shared by every read of one orchestrator.
#[derive(Debug)]
pub struct Hedging {
    policy: DelayPolicy,
    /// The delay in force, in nanoseconds (read on every read).
    delay_ns: AtomicU64,
    /// The longest delay (`--node-timeout`).
    max_delay: Duration,
    latency: Histogram,
    budget: Budget,
    /// Refreshes since the last rotation.
    ticks: AtomicU64,
    metrics: Option<HedgeMetrics>,
}

/// Answered calls needed before the observed p99 replaces the initial
/// guess.
const MIN_SAMPLES: u64 = 100;

/// The delay used until enough calls have been seen.
const INITIAL_DELAY: Duration = Duration::from_millis(20);

impl Hedging {
    /// Hedging by `policy`, with at most `budget_percent` of keys read
    /// hedged, and a delay of at most `max_delay`. `None` when `policy`
    /// is [`DelayPolicy::Off`].
    pub fn new(
        policy: DelayPolicy,
        budget_percent: u64,
        max_delay: Duration,
        metrics: Option<HedgeMetrics>,
    ) -> Option<Self> {
        let initial = match policy {
            DelayPolicy::Off => return None,
            DelayPolicy::Auto => INITIAL_DELAY,
            DelayPolicy::Fixed(d) => d,
        }
        .min(max_delay);
        let hedging = Self {
            policy,
            delay_ns: AtomicU64::new(nanos(initial)),
            max_delay,
            latency: Histogram::new(),
            budget: Budget::new(budget_percent),
            ticks: AtomicU64::new(0),
            metrics,
        };
        hedging.publish(initial);
        Some(hedging)
    }

    /// How long a read waits for its node before hedging.
    #[inline]
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Relaxed))
    }

    /// `keys` keys are being read (the budget's base).
    #[inline]
    pub fn reading(&self, keys: usize) {
        self.budget.read(keys);
    }

    /// A node call answered in `latency`.
    #[inline]
    pub fn answered(&self, latency: Duration) {
        self.latency.record(latency);
    }

    /// Whether `keys` keys may be hedged now; counts them if so.
    pub fn try_hedge(&self, keys: usize) -> bool {
        let ok = self.budget.try_take(keys);
        if let Some(m) = &self.metrics {
            if ok {
                m.hedged.inc_by(keys as u64);
            } else {
                m.refused.inc_by(keys as u64);
            }
        }
        ok
    }

    /// `keys` keys were answered by their hedge first.
    pub fn won(&self, keys: usize) {
        if let Some(m) = &self.metrics {
            m.wins.inc_by(keys as u64);
        }
    }

    /// Recomputes the delay and moves the windows; call every [`REFRESH`].
    pub fn refresh(&self) {
        if self.policy == DelayPolicy::Auto
            && let Some(p99) = self.latency.quantile(0.99, MIN_SAMPLES)
        {
            let delay = p99.max(MIN_DELAY).min(self.max_delay);
            self.delay_ns.store(nanos(delay), Relaxed);
            self.publish(delay);
        }
        let half_window = (WINDOW.as_secs() / 2 / REFRESH.as_secs().max(1)).max(1);
        if self.ticks.fetch_add(1, Relaxed) + 1 >= half_window {
            self.ticks.store(0, Relaxed);
            self.latency.rotate();
            self.budget.rotate();
        }
    }

    fn publish(&self, delay: Duration) {
        if let Some(m) = &self.metrics {
            m.delay_us
                .set(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX));
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_latencies() {
        let mut last = 0;
        for us in [
            1u64, 16, 17, 100, 1_000, 10_000, 150_000, 1_000_000, 60_000_000,
        ] {
            let d = Duration::from_micros(us);
            let b = bucket_of(d);
            assert!(b >= last, "{us} µs");
            last = b;
            if b < BUCKETS - 1 {
                assert!(bucket_bound_us(b) >= us as f64, "{us} µs in bucket {b}");
                // Within a quarter octave (19%) above it.
                assert!(bucket_bound_us(b) <= (us as f64).max(FIRST_US) * 1.19 + 1e-9);
            }
        }
    }

    #[test]
    fn p99_ignores_the_fastest_99_percent() {
        let h = Histogram::new();
        for _ in 0..990 {
            h.record(Duration::from_micros(300));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(40));
        }
        let p99 = h.quantile(0.99, 100).unwrap();
        assert!(
            p99 >= Duration::from_micros(300) && p99 < Duration::from_micros(400),
            "{p99:?}"
        );
        let p999 = h.quantile(0.999, 100).unwrap();
        assert!(p999 >= Duration::from_millis(40), "{p999:?}");
        assert_eq!(h.quantile(0.99, 2_000), None, "too few samples");
    }

    #[test]
    fn rotation_forgets_the_oldest_half_window() {
        let h = Histogram::new();
        for _ in 0..200 {
            h.record(Duration::from_millis(50));
        }
        h.rotate();
        for _ in 0..200 {
            h.record(Duration::from_micros(100));
        }
        assert!(h.quantile(0.99, 100).unwrap() >= Duration::from_millis(50));
        h.rotate();
        assert!(h.quantile(0.99, 100).unwrap() < Duration::from_millis(1));
    }

    #[test]
    fn the_budget_holds_hedges_to_a_share_of_reads() {
        let b = Budget::new(10);
        b.read(1_000);
        let mut hedged = 0;
        while b.try_take(1) {
            hedged += 1;
            assert!(hedged < 10_000, "unbounded");
        }
        assert_eq!(hedged, 100 + BURST, "10% of 1000 reads, plus the burst");
        b.read(100);
        assert!(b.try_take(10), "more reads, more room");
        assert!(!b.try_take(1));
        // Two rotations later the window is empty again.
        b.rotate();
        b.rotate();
        assert!(b.try_take(BURST as usize));
        assert!(!b.try_take(1));
    }

    #[test]
    fn the_delay_follows_the_p99_of_answered_calls_within_its_bounds() {
        let h = Hedging::new(DelayPolicy::Auto, 10, Duration::from_secs(1), None).unwrap();
        assert_eq!(h.delay(), INITIAL_DELAY);
        for _ in 0..1_000 {
            h.answered(Duration::from_micros(200));
        }
        h.refresh();
        assert_eq!(h.delay(), MIN_DELAY, "floored");
        for _ in 0..1_000 {
            h.answered(Duration::from_millis(30));
        }
        h.refresh();
        let d = h.delay();
        assert!(
            d >= Duration::from_millis(30) && d < Duration::from_millis(40),
            "{d:?}"
        );
        let capped = Hedging::new(DelayPolicy::Auto, 10, Duration::from_millis(5), None).unwrap();
        for _ in 0..1_000 {
            capped.answered(Duration::from_millis(30));
        }
        capped.refresh();
        assert_eq!(
            capped.delay(),
            Duration::from_millis(5),
            "at most --node-timeout"
        );
        let fixed = Hedging::new(
            DelayPolicy::Fixed(Duration::from_millis(7)),
            10,
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        for _ in 0..1_000 {
            fixed.answered(Duration::from_millis(30));
        }
        fixed.refresh();
        assert_eq!(fixed.delay(), Duration::from_millis(7));
        assert!(Hedging::new(DelayPolicy::Off, 10, Duration::from_secs(1), None).is_none());
    }

    #[test]
    fn the_flag_parses() {
        assert_eq!("auto".parse::<DelayPolicy>(), Ok(DelayPolicy::Auto));
        assert_eq!("off".parse::<DelayPolicy>(), Ok(DelayPolicy::Off));
        assert_eq!("0s".parse::<DelayPolicy>(), Ok(DelayPolicy::Off));
        assert_eq!(
            "15ms".parse::<DelayPolicy>(),
            Ok(DelayPolicy::Fixed(Duration::from_millis(15)))
        );
        let err = "soon".parse::<DelayPolicy>().unwrap_err();
        assert!(err.contains("auto, off or a duration"), "{err}");
    }
}
