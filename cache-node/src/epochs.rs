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

/// How recently an orchestrator must have called with an epoch for the
/// node to vouch for a direct read made with it. Orchestrators call every
/// node at least once per health round (`Node/Stats`, every
/// `--health-interval`, 1 s by default); an epoch not heard for this long
/// belongs to orchestrators that stopped or moved on.
pub const VOUCH_WINDOW: Duration = Duration::from_secs(10);

/// Why a direct read was not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The orchestrators call with another epoch than the client's: its
    /// topology is stale (or ahead of theirs).
    Stale {
        /// The client's epoch.
        client: u64,
        /// The orchestrators' epoch.
        current: u64,
    },
    /// No orchestrator called within [`VOUCH_WINDOW`] (the node just
    /// started, was frozen, or is cut off from them).
    Unvouched,
    /// Orchestrators call with different epochs: a membership change is
    /// under way, and keys may be on either ring's owners.
    Disagreeing {
        /// The epochs heard within the window, most recent first.
        epochs: Vec<u64>,
    },
}

impl Epochs {
    /// Whether a direct read routed by `epoch` may be served: exactly one
    /// epoch was heard from orchestrators within [`VOUCH_WINDOW`], and it
    /// is `epoch`.
    pub fn vouch(&self, epoch: u64, now: Instant) -> Result<(), Refusal> {
        let seen = self.seen.lock();
        let mut current = seen
            .iter()
            .filter(|s| now.saturating_duration_since(s.last) < VOUCH_WINDOW)
            .map(|s| s.epoch);
        match (current.next(), current.next()) {
            (Some(only), None) if only == epoch => Ok(()),
            (Some(only), None) => Err(Refusal::Stale {
                client: epoch,
                current: only,
            }),
            (None, _) => Err(Refusal::Unvouched),
            (Some(first), Some(second)) => {
                let mut epochs = vec![first, second];
                epochs.extend(current);
                Err(Refusal::Disagreeing { epochs })
            }
        }
    }
}

impl From<Refusal> for tonic::Status {
    /// `FAILED_PRECONDITION` with a `google.rpc.ErrorInfo`: reason
    /// `STALE_EPOCH` (metadata `current_epoch`) or `CANNOT_VOUCH`.
    fn from(refusal: Refusal) -> Self {
        use ringcache_proto::direct::{
            CANNOT_VOUCH, CURRENT_EPOCH, ERROR_DOMAIN, STALE_EPOCH, format_epoch,
        };
        use tonic_types::{ErrorDetails, StatusExt};
        let (reason, metadata, message) = match refusal {
            Refusal::Stale { client, current } => (
                STALE_EPOCH,
                vec![(CURRENT_EPOCH.to_owned(), format_epoch(current))],
                format!(
                    "direct read refused: it was routed by ring epoch {}, the orchestrators use {}; refresh the topology and read through an orchestrator",
                    format_epoch(client),
                    format_epoch(current)
                ),
            ),
            Refusal::Unvouched => (
                CANNOT_VOUCH,
                Vec::new(),
                format!(
                    "direct read refused: no orchestrator has called this node within {VOUCH_WINDOW:?}, so it cannot vouch that it is the key's owner and up to date; read through an orchestrator"
                ),
            ),
            Refusal::Disagreeing { epochs } => (
                CANNOT_VOUCH,
                Vec::new(),
                format!(
                    "direct read refused: orchestrators call this node with different ring epochs ({}), a membership change is under way; read through an orchestrator",
                    epochs
                        .iter()
                        .map(|e| format_epoch(*e))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        tonic::Status::with_error_details(
            tonic::Code::FailedPrecondition,
            message,
            ErrorDetails::with_error_info(
                reason,
                ERROR_DOMAIN,
                metadata
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
        )
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
    fn vouches_only_for_the_one_epoch_orchestrators_use_now() {
        let t = Instant::now();
        let e = Epochs::new(Duration::from_secs(30));
        assert_eq!(e.vouch(1, t), Err(Refusal::Unvouched));
        e.record(1, t);
        assert_eq!(e.vouch(1, t + Duration::from_secs(1)), Ok(()));
        assert_eq!(
            e.vouch(2, t + Duration::from_secs(1)),
            Err(Refusal::Stale {
                client: 2,
                current: 1
            })
        );
        // A second epoch while the first is current: a change under way.
        e.record(2, t + Duration::from_secs(2));
        assert_eq!(
            e.vouch(2, t + Duration::from_secs(3)),
            Err(Refusal::Disagreeing { epochs: vec![2, 1] })
        );
        // Once the old epoch is no longer heard, the new one is vouched.
        e.record(2, t + Duration::from_secs(11));
        assert_eq!(e.vouch(2, t + Duration::from_secs(13)), Ok(()));
        // Nobody heard for the window (a frozen node): nothing is vouched.
        assert_eq!(
            e.vouch(2, t + Duration::from_secs(11) + VOUCH_WINDOW),
            Err(Refusal::Unvouched)
        );
    }

    #[test]
    fn a_refusal_carries_the_current_epoch_in_its_details() {
        use tonic_types::StatusExt;
        let status = tonic::Status::from(Refusal::Stale {
            client: 1,
            current: 0xab,
        });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, ringcache_proto::direct::STALE_EPOCH);
        assert_eq!(info.metadata["current_epoch"], "00000000000000ab");
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
