//! The ring epochs orchestrators call this node under.
//!
//! Every orchestrator sends the epoch of its ring (a digest of the node
//! identities on it) with each call (`ringcache-epoch` metadata). Two
//! orchestrators with different epochs route some keys to different nodes:
//! a write through one and a read through the other can miss each other.
//! That is expected for a moment while a membership change propagates
//! (DNS is re-resolved every few seconds), and a problem if it lasts. The
//! node, which every orchestrator talks to, is where it shows:
//! [`Epochs::distinct_within`] feeds a gauge, `Node/Stats` lists the
//! epochs, and a new epoch seen while another is current is logged.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How many epochs are remembered; the least recently seen is forgotten.
const REMEMBERED: usize = 8;

/// One epoch and when it was last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The epoch.
    pub epoch: u64,
    /// The last call that carried it.
    pub last: Instant,
    /// Calls that carried it.
    pub calls: u64,
}

/// The epochs seen recently, most recent first.
#[derive(Debug)]
pub struct Epochs {
    seen: Mutex<Vec<Seen>>,
    /// How long two epochs may both be current before it is logged.
    window: Duration,
}

impl Epochs {
    /// Epochs seen within `window` of each other count as current together.
    pub fn new(window: Duration) -> Self {
        Self {
            seen: Mutex::new(Vec::with_capacity(REMEMBERED)),
            window,
        }
    }

    /// Records a call that carried `epoch`, at `now`.
    pub fn record(&self, epoch: u64, now: Instant) {
        let mut seen = self.seen.lock();
        if let Some(first) = seen.first_mut()
            && first.epoch == epoch
        {
            first.last = now;
            first.calls += 1;
            return;
        }
        let entry = match seen.iter().position(|s| s.epoch == epoch) {
            Some(i) => {
                let mut s = seen.remove(i);
                s.last = now;
                s.calls += 1;
                s
            }
            None => {
                let others: Vec<String> = seen
                    .iter()
                    .filter(|s| now.saturating_duration_since(s.last) < self.window)
                    .map(|s| format!("{:016x}", s.epoch))
                    .collect();
                if !others.is_empty() {
                    tracing::warn!(
                        epoch = format!("{epoch:016x}"),
                        current = ?others,
                        "orchestrators are calling with different ring epochs: they disagree about the membership (fine for a moment during a change; check their --nodes or DNS if it lasts)"
                    );
                }
                seen.truncate(REMEMBERED - 1);
                Seen {
                    epoch,
                    last: now,
                    calls: 1,
                }
            }
        };
        seen.insert(0, entry);
    }

    /// The epochs remembered, most recently seen first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    /// How many different epochs were seen within `window` before `now`.
    pub fn distinct_within(&self, window: Duration, now: Instant) -> usize {
        self.seen
            .lock()
            .iter()
            .filter(|s| now.saturating_duration_since(s.last) < window)
            .count()
    }

    /// The window two epochs may share.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// Parses an epoch as orchestrators send it: 16 hex digits.
pub fn parse(value: &str) -> Option<u64> {
    (value.len() == 16)
        .then(|| u64::from_str_radix(value, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_epochs_first_and_counts_the_current_ones() {
        let t = Instant::now();
        let e = Epochs::new(Duration::from_secs(10));
        e.record(1, t);
        e.record(1, t + Duration::from_secs(1));
        e.record(2, t + Duration::from_secs(2));
        let seen = e.seen();
        assert_eq!(
            seen.iter().map(|s| (s.epoch, s.calls)).collect::<Vec<_>>(),
            [(2, 1), (1, 2)]
        );
        assert_eq!(
            e.distinct_within(Duration::from_secs(10), t + Duration::from_secs(3)),
            2
        );
        // Long after epoch 1's last call, only 2 is current.
        e.record(2, t + Duration::from_secs(20));
        assert_eq!(
            e.distinct_within(Duration::from_secs(10), t + Duration::from_secs(20)),
            1
        );
        // Seen again: back to the front, its count kept.
        e.record(1, t + Duration::from_secs(21));
        assert_eq!(
            e.seen()[0],
            Seen {
                epoch: 1,
                last: t + Duration::from_secs(21),
                calls: 3
            }
        );
    }

    #[test]
    fn remembers_a_bounded_number() {
        let t = Instant::now();
        let e = Epochs::new(Duration::from_secs(10));
        for i in 0..100 {
            e.record(i, t);
        }
        let seen = e.seen();
        assert_eq!(seen.len(), REMEMBERED);
        assert_eq!(seen[0].epoch, 99);
    }

    #[test]
    fn parses_sixteen_hex_digits_only() {
        assert_eq!(parse("00000000000000ff"), Some(255));
        assert_eq!(parse("ff"), None);
        assert_eq!(parse("zzzzzzzzzzzzzzzz"), None);
        assert_eq!(parse("00000000000000ff0"), None);
    }
}
