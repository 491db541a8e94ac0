//! Whether a node should get calls: active checks and passive ejection.
//!
//! A node is ejected after `eject_after` consecutive failures — failed
//! health checks or failed calls, whichever come first — and stays ejected
//! for a backoff period that doubles with each ejection in a row (up to
//! `max_backoff`). After that, the first successful health check readmits
//! it. An ejected node stays on the ring: its keys go to their next owner
//! meanwhile, and come back when it recovers, so a flapping node does not
//! reshuffle the key space.
//!
//! The state machine is pure (times are passed in), so it is tested without
//! sleeping; [`crate::nodes`] drives it.

use std::time::{Duration, Instant};

/// Thresholds for ejection.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    /// Consecutive failures that eject a node.
    pub eject_after: u32,
    /// The first ejection's length.
    pub base_backoff: Duration,
    /// The longest ejection.
    pub max_backoff: Duration,
}

/// What the orchestrator thinks of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not checked yet: routable (optimistically), so a fresh orchestrator
    /// serves at once.
    Unknown,
    /// Answering.
    Healthy,
    /// Skipped until `until`, and then until a health check succeeds.
    Ejected {
        /// The end of the backoff.
        until: Instant,
    },
}

/// One node's health record.
#[derive(Debug, Clone)]
pub struct Health {
    state: State,
    consecutive_failures: u32,
    /// Ejections in a row without a stable healthy period between them.
    ejections: u32,
    /// When the node last became healthy.
    healthy_since: Option<Instant>,
    /// Whether it ever answered a check or a call.
    answered: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: State::Unknown,
            consecutive_failures: 0,
            ejections: 0,
            healthy_since: None,
            answered: false,
        }
    }
}

impl Health {
    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the node ever answered a check or a call (a node that never
    /// did is likely a wrong address, or not started yet).
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Failures in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Whether the node is ejected but answered its last check: it waits
    /// out its backoff (another orchestrator may already route to it).
    pub fn answering_while_ejected(&self) -> bool {
        matches!(self.state, State::Ejected { .. }) && self.consecutive_failures == 0
    }

    /// Whether calls may go to the node.
    pub fn routable(&self) -> bool {
        !matches!(self.state, State::Ejected { .. })
    }

    /// Records a successful call. Calls do not readmit an ejected node
    /// (none are sent to it); they only reset the failure count.
    pub fn call_succeeded(&mut self) {
        self.answered = true;
        if self.routable() {
            self.consecutive_failures = 0;
        }
    }

    /// Records a successful health check at `now`. Returns true if that
    /// readmitted the node.
    pub fn check_succeeded(&mut self, now: Instant, policy: &HealthPolicy) -> bool {
        self.consecutive_failures = 0;
        self.answered = true;
        match self.state {
            State::Ejected { until } if now < until => false,
            State::Ejected { .. } => {
                self.state = State::Healthy;
                self.healthy_since = Some(now);
                true
            }
            State::Unknown => {
                self.state = State::Healthy;
                self.healthy_since = Some(now);
                false
            }
            State::Healthy => {
                // A node healthy for longer than the longest backoff has
                // stopped flapping: the next ejection starts short again.
                if self
                    .healthy_since
                    .is_some_and(|since| now.duration_since(since) > policy.max_backoff)
                {
                    self.ejections = 0;
                }
                false
            }
        }
    }

    /// Records a failed call or health check at `now`. Returns true if that
    /// ejected the node.
    pub fn failed(&mut self, now: Instant, policy: &HealthPolicy) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if !self.routable() || self.consecutive_failures < policy.eject_after {
            return false;
        }
        let backoff = policy
            .base_backoff
            .saturating_mul(1u32 << self.ejections.min(16))
            .min(policy.max_backoff);
        self.ejections = self.ejections.saturating_add(1);
        self.state = State::Ejected {
            until: now + backoff,
        };
        self.healthy_since = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: HealthPolicy = HealthPolicy {
        eject_after: 3,
        base_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
    };

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let t = Instant::now();
        let mut h = Health::default();
        assert!(h.routable());
        assert!(!h.failed(t, &POLICY));
        assert!(!h.failed(t, &POLICY));
        h.call_succeeded();
        assert_eq!(h.consecutive_failures(), 0, "a success breaks the run");
        assert!(!h.failed(t, &POLICY));
        assert!(!h.failed(t, &POLICY));
        assert!(h.failed(t, &POLICY));
        assert!(!h.routable());
        assert_eq!(
            h.state(),
            State::Ejected {
                until: t + Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn readmits_on_a_check_after_the_backoff() {
        let t = Instant::now();
        let mut h = Health::default();
        for _ in 0..3 {
            h.failed(t, &POLICY);
        }
        assert!(
            !h.check_succeeded(t + Duration::from_millis(500), &POLICY),
            "still backing off"
        );
        assert!(!h.routable());
        assert!(h.check_succeeded(t + Duration::from_secs(1), &POLICY));
        assert!(h.routable());
        assert_eq!(h.state(), State::Healthy);
    }

    #[test]
    fn backoff_doubles_while_flapping_and_resets_when_stable() {
        let mut t = Instant::now();
        let mut h = Health::default();
        let eject = |h: &mut Health, t: Instant| {
            for _ in 0..3 {
                h.failed(t, &POLICY);
            }
            match h.state() {
                State::Ejected { until } => until - t,
                other => panic!("not ejected: {other:?}"),
            }
        };
        let mut backoffs = vec![];
        for _ in 0..5 {
            let b = eject(&mut h, t);
            backoffs.push(b.as_secs());
            t += b;
            assert!(h.check_succeeded(t, &POLICY));
        }
        assert_eq!(backoffs, [1, 2, 4, 8, 8], "doubles up to the maximum");
        // Healthy for longer than the maximum backoff: back to the start.
        t += Duration::from_secs(9);
        h.check_succeeded(t, &POLICY);
        assert_eq!(eject(&mut h, t).as_secs(), 1);
    }

    #[test]
    fn calls_do_not_readmit_an_ejected_node() {
        let t = Instant::now();
        let mut h = Health::default();
        for _ in 0..3 {
            h.failed(t, &POLICY);
        }
        h.call_succeeded();
        assert!(!h.routable());
    }
}
