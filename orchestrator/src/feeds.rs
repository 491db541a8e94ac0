//! Following the nodes' change feeds (`Internal/Changes`).
//!
//! Every node publishes each change it applies — whoever sent it: this
//! orchestrator, another one, or a client calling the node directly. A
//! [`follow`] task per node reads that feed and hands every changed key to
//! a [`ChangeSink`] (the near cache of hot-key relief, which forgets the
//! key), so a write through any orchestrator reaches every orchestrator's
//! relief within the feed's latency instead of after `--hot-key-ttl`.
//!
//! # In sync, or not
//!
//! A node's [`FeedState`] is *in sync* while its feed is connected and this
//! orchestrator has seen every change the node had made as of its last
//! message. It is not in sync:
//!
//! - until the first message arrives, and while the feed is re-read after a
//!   break (the task resumes after the last change it saw);
//! - when the feed went silent for [`SILENCE`] (the node sends a heartbeat
//!   every second: a silent feed is a lost one, even if no connection
//!   error says so);
//! - while catching up on a backlog.
//!
//! Relief serves a key only while the feeds of every node that could have
//! taken its writes are in sync (see `Router::relievable`): what is not
//! seen cannot be invalidated. When the node says the position is gone (a
//! *gap*: its log dropped changes this orchestrator had not read, or it
//! restarted), the sink forgets everything ([`ChangeSink::all_changed`])
//! before the feed counts as in sync again.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ringcache_common::server::AbortOnDrop;
use ringcache_proto::v1::{ChangeKind, ChangesResponse};

use crate::{
    client::transport::Transport,
    metrics::FeedMetrics,
    nodes::{Cluster, Node},
};

/// A feed with no message for this long is lost: the node sends a
/// heartbeat every second.
pub const SILENCE: Duration = Duration::from_secs(3);

/// The first wait before following a lost feed again; it doubles up to
/// [`MAX_BACKOFF`] while attempts fail.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often [`supervise`] compares its followers with the membership.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

/// What is done with the changes a feed brings.
pub trait ChangeSink: Send + Sync + 'static {
    /// `key` changed on some node.
    fn changed(&self, key: &str);
    /// Any key may have changed (a gap, a flush).
    fn all_changed(&self);
    /// Node `holder` recorded (as record `sequence`) that node `owner` may
    /// hold a stale value of `key` (`None`: of any key).
    fn owed(&self, owner: &str, key: Option<&str>, holder: &str, sequence: u64) {
        let _ = (owner, key, holder, sequence);
    }
    /// Node `holder` dropped its records of `owner`'s debts up to
    /// `through`: some orchestrator brought the owner up to date on them.
    fn settled(&self, owner: &str, holder: &str, through: u64) {
        let _ = (owner, holder, through);
    }
}

/// What an orchestrator does with the feeds: relief forgets changed keys
/// (if relief is on), and the cluster records debts (routing skips the
/// key on its owner until it is deleted there) and, after a gap, reads
/// every node's debts again.
#[derive(Debug)]
pub struct OrchestratorSink {
    /// The cluster the feeds' nodes belong to.
    pub cluster: Arc<Cluster>,
    /// Hot-key relief's near cache, if relief is on.
    pub near: Option<Arc<crate::nearcache::NearCache>>,
}

impl ChangeSink for OrchestratorSink {
    fn changed(&self, key: &str) {
        if let Some(near) = &self.near {
            near.invalidate(key);
        }
    }

    fn all_changed(&self) {
        if let Some(near) = &self.near {
            near.invalidate_all();
        }
        self.cluster.feed_gap();
    }

    fn owed(&self, owner: &str, key: Option<&str>, holder: &str, sequence: u64) {
        self.cluster.owed(owner, key, holder, sequence);
    }

    fn settled(&self, owner: &str, holder: &str, through: u64) {
        self.cluster.settled(owner, holder, through);
    }
}

/// Whether this orchestrator is in step with one node's feed.
#[derive(Debug, Default)]
pub struct FeedState {
    in_sync: AtomicBool,
    /// The node said it keeps no change log (`--change-log-bytes 0`).
    refused: AtomicBool,
    /// The last change seen, while in sync.
    position: parking_lot::Mutex<Position>,
}

impl FeedState {
    /// Whether every change the node made, as of its last message, has
    /// been handed to the sink, and the feed is still connected.
    #[inline]
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Acquire)
    }

    /// Where this orchestrator is in the node's feed, if in sync: every
    /// change the node makes from now on has a later position. (Warm
    /// handoff takes it before reading a value to copy to the node: the
    /// node refuses the copy if the key changed there after it.)
    pub fn position(&self) -> Option<Position> {
        let position = *self.position.lock();
        self.in_sync().then_some(position)
    }

    /// Whether the node refused to be followed because it keeps no change
    /// log (`--change-log-bytes 0`): its changes will not be seen.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    fn set(&self, in_sync: bool, position: Option<Position>) {
        if let Some(p) = position {
            *self.position.lock() = p;
        }
        self.in_sync.store(in_sync, Ordering::Release);
    }
}

/// Where a follower is in a node's feed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The node's incarnation (0: never read).
    pub incarnation: u64,
    /// The last sequence seen.
    pub sequence: u64,
}

impl Position {
    /// Applies one feed message: hands its changes to `sink` and moves on.
    /// Returns whether the follower has now seen every change the node had
    /// made when it sent the message.
    /// `holder` is the node the feed comes from.
    pub fn apply(
        &mut self,
        message: &ChangesResponse,
        holder: &str,
        sink: &dyn ChangeSink,
    ) -> bool {
        let fresh = self.incarnation == 0;
        // A gap, or another incarnation than the one followed: changes were
        // missed.
        if message.gap || (!fresh && message.incarnation != self.incarnation) {
            sink.all_changed();
            self.sequence = message.head;
        } else if fresh && message.changes.is_empty() {
            // Followed from the node's end (nothing asked before).
            self.sequence = message.head;
        }
        self.incarnation = message.incarnation;
        for change in &message.changes {
            if change.kind == ChangeKind::Flush as i32 {
                sink.all_changed();
            } else if change.kind == ChangeKind::Owed as i32 {
                let key = (!change.key.is_empty()).then_some(change.key.as_str());
                sink.owed(&change.owner, key, holder, change.version);
            } else if change.kind == ChangeKind::Settled as i32 {
                // Another orchestrator (or this one) brought the owner up
                // to date on those records: they need no replay here.
                sink.settled(&change.owner, holder, change.version);
            } else {
                sink.changed(&change.key);
            }
            self.sequence = change.sequence;
        }
        self.sequence >= message.head
    }
}

/// Follows `node`'s feed for as long as the task runs, handing changes to
/// `sink` and keeping `node`'s [`FeedState`] (and `metrics`) current.
pub async fn follow(node: Arc<Node>, sink: Arc<dyn ChangeSink>, metrics: FeedMetrics) {
    let id = node.id.to_string();
    let in_sync = metrics.in_sync.with_label_values(&[&id]);
    let changes = metrics.changes.with_label_values(&[&id]);
    let gaps = metrics.gaps.with_label_values(&[&id]);
    let lost = metrics.lost.with_label_values(&[&id]);
    let lag = metrics.lag.with_label_values(&[&id]);
    let state = node.feed();
    let transport: Transport = node.client.transport().clone();
    let mut position = Position::default();
    let mut backoff = MIN_BACKOFF;
    loop {
        let why = match transport
            .changes(position.incarnation, position.sequence)
            .await
        {
            Ok(mut feed) => loop {
                match tokio::time::timeout(SILENCE, feed.next()).await {
                    Ok(Ok(Some(message))) => {
                        backoff = MIN_BACKOFF;
                        state.refused.store(false, Ordering::Release);
                        if message.gap {
                            gaps.inc();
                            tracing::info!(node = %id, "the node's feed has a gap: forgetting what was kept of its keys");
                        }
                        changes.inc_by(message.changes.len() as u64);
                        let caught_up = position.apply(&message, &id, &*sink);
                        lag.set(
                            i64::try_from(message.head.saturating_sub(position.sequence))
                                .unwrap_or(i64::MAX),
                        );
                        state.set(caught_up, Some(position));
                        in_sync.set(i64::from(caught_up));
                    }
                    Ok(Ok(None)) => break "the node ended it".to_owned(),
                    Ok(Err(e)) => break e.to_string(),
                    Err(_) => break format!("no message within {SILENCE:?}"),
                }
            },
            Err(e) => {
                if let crate::client::CallError::Refused(s) = &e
                    && s.code() == tonic::Code::FailedPrecondition
                {
                    state.refused.store(true, Ordering::Release);
                }
                e.to_string()
            }
        };
        if state.in_sync() {
            lost.inc();
            tracing::debug!(node = %id, %why, "lost the node's change feed; following it again");
        }
        state.set(false, None);
        in_sync.set(0);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps one [`follow`] task per node of `cluster`'s topology: starts one
/// for each node that joins (or whose address changed), stops those of
/// nodes that left.
pub async fn supervise(cluster: Arc<Cluster>, sink: Arc<dyn ChangeSink>) {
    cluster.feeds_followed();
    let metrics = cluster.metrics().feeds.clone();
    let mut followers: HashMap<usize, (Arc<Node>, AbortOnDrop)> = HashMap::new();
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let topology = cluster.topology();
        let current: HashMap<usize, &Arc<Node>> = topology
            .nodes
            .iter()
            .map(|n| (Arc::as_ptr(n) as usize, n))
            .collect();
        followers.retain(|k, _| current.contains_key(k));
        for (k, node) in current {
            followers.entry(k).or_insert_with(|| {
                let task = tokio::spawn(follow(node.clone(), sink.clone(), metrics.clone()));
                (node.clone(), AbortOnDrop(task))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use ringcache_proto::v1::Change;

    use super::*;

    #[derive(Default)]
    struct Seen {
        keys: Mutex<Vec<String>>,
        all: Mutex<usize>,
    }

    impl ChangeSink for Seen {
        fn changed(&self, key: &str) {
            self.keys.lock().push(key.to_owned());
        }
        fn all_changed(&self) {
            *self.all.lock() += 1;
        }
    }

    fn message(incarnation: u64, gap: bool, changes: &[(u64, &str)], head: u64) -> ChangesResponse {
        ChangesResponse {
            incarnation,
            gap,
            changes: changes
                .iter()
                .map(|&(sequence, key)| Change {
                    sequence,
                    kind: ChangeKind::Set as i32,
                    key: key.to_owned(),
                    version: 1,
                    owner: String::new(),
                })
                .collect(),
            head,
        }
    }

    #[test]
    fn a_position_follows_changes_and_knows_when_it_is_caught_up() {
        let seen = Seen::default();
        let mut p = Position::default();
        // The first message, from the node's end.
        assert!(p.apply(&message(9, false, &[], 40), "n", &seen));
        assert_eq!(
            p,
            Position {
                incarnation: 9,
                sequence: 40
            }
        );
        // A backlog in two messages: not caught up after the first.
        assert!(!p.apply(&message(9, false, &[(41, "a"), (42, "b")], 44), "n", &seen));
        assert!(p.apply(&message(9, false, &[(43, "c"), (44, "a")], 44), "n", &seen));
        assert_eq!(*seen.keys.lock(), ["a", "b", "c", "a"]);
        // A heartbeat at the same head.
        assert!(p.apply(&message(9, false, &[], 44), "n", &seen));
        assert_eq!(*seen.all.lock(), 0);
    }

    #[test]
    fn a_gap_or_a_new_incarnation_forgets_everything() {
        let seen = Seen::default();
        let mut p = Position {
            incarnation: 9,
            sequence: 10,
        };
        assert!(p.apply(&message(9, true, &[], 500), "n", &seen));
        assert_eq!(*seen.all.lock(), 1);
        assert_eq!(p.sequence, 500);
        // The node restarted: its answer is from another incarnation.
        assert!(p.apply(&message(11, true, &[], 3), "n", &seen));
        assert_eq!(*seen.all.lock(), 2);
        assert_eq!(
            p,
            Position {
                incarnation: 11,
                sequence: 3
            }
        );
        // A flush forgets everything too.
        let mut flush = message(11, false, &[(4, "")], 4);
        flush.changes[0].kind = ChangeKind::Flush as i32;
        assert!(p.apply(&flush, "n", &seen));
        assert_eq!(*seen.all.lock(), 3);
        assert!(seen.keys.lock().is_empty());
    }
}
