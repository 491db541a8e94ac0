//! Parking: a stopping node hands its entries over before it exits.
//!
//! On SIGTERM (a planned restart: a rolling update, a drain), a node with
//! a single copy of its keys would take them with it. Instead it waits a
//! little for an orchestrator to *claim* its entries (`Internal/Park`).
//! From the claim on, the node is **parked**:
//!
//! - every data call (`Cache` methods, pipeline ops, `Internal/Apply` and
//!   `ApplyStream` batches) is refused with `UNAVAILABLE` before it runs,
//!   so callers take their reads, writes and deletes to the next node of
//!   the key — where the claimant puts the entries;
//! - so its entries cannot change any more, and the claimant reads them
//!   all, with their versions and TTLs, at its own pace.
//!
//! The node then stops once the claimant has read everything (or
//! `--shutdown-grace` passed). Only one claim is ever granted: the
//! claimant took the other nodes' feed positions *before* claiming, and a
//! second claimant could not (the node already refused writes that went
//! elsewhere meanwhile).
//!
//! No gRPC in here: the service asks [`Parking::parked`] and
//! [`Parking::claim`], the server waits with [`Parking::wait`].

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::sync::watch;

/// Where a node is in handing its entries over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Serving; not stopping.
    Serving,
    /// Stopping (SIGTERM), waiting for a claim.
    Stopping,
    /// Claimed: refusing data calls, entries being read.
    Parked,
    /// The claimant read every entry (or went away).
    Handed,
}

/// Why a claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The node is not stopping: its entries stay here.
    #[error("this node is not stopping; only a stopping node hands its entries over")]
    NotStopping,
    /// Another caller claimed them first.
    #[error("this node's entries are already claimed by another orchestrator")]
    Claimed,
    /// Parking is turned off (`--park-wait 0s`).
    #[error("this node does not hand its entries over (--park-wait 0s)")]
    Off,
}

/// How a stop went, as [`Parking::wait`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nobody claimed the entries within the wait (or parking is off).
    Unclaimed,
    /// The claimant read every entry.
    Handed,
    /// The claim was granted but the grace ran out first.
    TimedOut,
}

/// The node's parking state, shared by its services and its server.
#[derive(Debug)]
pub struct Parking {
    /// Mirrors `stage == Parked`, read by every data call.
    parked: AtomicBool,
    stage: watch::Sender<Stage>,
    /// How long a stopping node waits for a claim (`--park-wait`); zero
    /// turns parking off.
    claim_wait: Duration,
}

impl Parking {
    /// A serving node that, when it stops, waits up to `claim_wait` for a
    /// claim (zero: never parks).
    pub fn new(claim_wait: Duration) -> Self {
        Self {
            parked: AtomicBool::new(false),
            stage: watch::Sender::new(Stage::Serving),
            claim_wait,
        }
    }

    /// Whether data calls are refused: the entries were claimed.
    #[inline]
    pub fn parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// The node is stopping: a claim may come now.
    pub fn stopping(&self) {
        self.stage.send_if_modified(|s| {
            let serving = *s == Stage::Serving;
            if serving {
                *s = Stage::Stopping;
            }
            serving
        });
    }

    /// Grants the one claim on a stopping node's entries; from now on
    /// data calls are refused.
    pub fn claim(&self) -> Result<(), ClaimError> {
        if self.claim_wait.is_zero() {
            return Err(ClaimError::Off);
        }
        let mut refusal = None;
        self.stage.send_if_modified(|s| match *s {
            Stage::Stopping => {
                // Set before the stage moves, so nobody sees Parked while
                // data calls still pass.
                self.parked.store(true, Ordering::Release);
                *s = Stage::Parked;
                true
            }
            Stage::Serving => {
                refusal = Some(ClaimError::NotStopping);
                false
            }
            Stage::Parked | Stage::Handed => {
                refusal = Some(ClaimError::Claimed);
                false
            }
        });
        refusal.map_or(Ok(()), Err)
    }

    /// The claimant has read everything (or its stream ended): the node
    /// may stop. Data calls stay refused.
    pub fn handed(&self) {
        self.stage.send_if_modified(|s| {
            let parked = *s == Stage::Parked;
            if parked {
                *s = Stage::Handed;
            }
            parked
        });
    }

    /// Waits, once stopping, for a claim (up to the claim wait) and for
    /// the claimant to finish (up to `grace` from the claim).
    /// `worth_waiting` says whether anyone may claim (an orchestrator
    /// called recently); without, nobody is waited for.
    pub async fn wait(&self, grace: Duration, worth_waiting: bool) -> Outcome {
        if self.claim_wait.is_zero() || !worth_waiting {
            return Outcome::Unclaimed;
        }
        let mut stage = self.stage.subscribe();
        let claimed = tokio::time::timeout(
            self.claim_wait,
            stage.wait_for(|s| matches!(s, Stage::Parked | Stage::Handed)),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !claimed {
            return Outcome::Unclaimed;
        }
        match tokio::time::timeout(grace, stage.wait_for(|s| *s == Stage::Handed)).await {
            Ok(Ok(_)) => Outcome::Handed,
            _ => Outcome::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_claim_once_stopping_then_data_calls_are_refused() {
        let p = Parking::new(Duration::from_secs(3));
        assert_eq!(p.claim(), Err(ClaimError::NotStopping));
        assert!(!p.parked());
        p.stopping();
        assert!(!p.parked(), "stopping alone still serves");
        assert_eq!(p.claim(), Ok(()));
        assert!(p.parked());
        assert_eq!(p.claim(), Err(ClaimError::Claimed));
        p.handed();
        assert_eq!(p.stage(), Stage::Handed);
        assert!(p.parked(), "a handed node never serves again");
        assert_eq!(p.claim(), Err(ClaimError::Claimed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_waits_for_the_claimant_within_the_grace() {
        let p = std::sync::Arc::new(Parking::new(Duration::from_secs(3)));
        p.stopping();
        // Nobody claims: the stop goes on after the claim wait.
        assert_eq!(
            p.wait(Duration::from_secs(10), true).await,
            Outcome::Unclaimed
        );
        // Nobody called lately: not waited for at all.
        let idle = Parking::new(Duration::from_secs(3));
        idle.stopping();
        let started = tokio::time::Instant::now();
        assert_eq!(
            idle.wait(Duration::from_secs(10), false).await,
            Outcome::Unclaimed
        );
        assert_eq!(started.elapsed(), Duration::ZERO);

        let q = std::sync::Arc::new(Parking::new(Duration::from_secs(3)));
        q.stopping();
        let claimant = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            claimant.claim().unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            claimant.handed();
        });
        let started = tokio::time::Instant::now();
        assert_eq!(q.wait(Duration::from_secs(10), true).await, Outcome::Handed);
        assert_eq!(started.elapsed(), Duration::from_secs(3));

        // A claimant that never finishes is waited for `grace` only.
        let r = Parking::new(Duration::from_secs(3));
        r.stopping();
        r.claim().unwrap();
        assert_eq!(
            r.wait(Duration::from_secs(5), true).await,
            Outcome::TimedOut
        );
    }

    #[test]
    fn parking_can_be_turned_off() {
        let p = Parking::new(Duration::ZERO);
        p.stopping();
        assert_eq!(p.claim(), Err(ClaimError::Off));
        assert!(!p.parked());
    }
}
