//! Prometheus metrics about the nodes the orchestrator calls. The `node`
//! label is a ring identity, so its values are bounded by the membership;
//! a node that leaves has its series removed.

use std::sync::Arc;

use crate::hedge::HedgeMetrics;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use ringcache_common::metrics::code_name;

use crate::client::layers::{CODES, CallMetrics};

/// Latency buckets for node calls, in seconds: 50 µs to 2.5 s.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Buckets for ops per call: 1 (a lone request) to a full batch.
const OPS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Per-node call metrics and cluster gauges.
#[derive(Debug)]
pub struct ClusterMetrics {
    calls: IntCounterVec,
    latency: HistogramVec,
    ops: HistogramVec,
    routable: IntGaugeVec,
    reached: IntGaugeVec,
    /// Nodes on the ring.
    pub ring_nodes: IntGauge,
    /// Replica writes that failed, by node.
    pub replica_failures: IntCounterVec,
    /// Ejections, by node.
    pub ejections: IntCounterVec,
    /// Probes made because calls were cut short, by node and result.
    pub probes: IntCounterVec,
    /// Keys recorded for invalidation, by node.
    pub pending_invalidations: IntGaugeVec,
    /// Keys invalidated by replay, by node.
    pub invalidations_replayed: IntCounterVec,
    /// Flushes of nodes whose record overflowed, by node.
    pub flushes: IntCounterVec,
    /// Debts (`Owe` ops) a node could not be given, by node.
    pub debts_unrecorded: IntCounterVec,
    /// Read-through lookups of warm handoff, by result (hit, miss).
    pub handoff_reads: IntCounterVec,
    /// Entries copied to warming nodes, by node.
    pub handoff_copies: IntCounterVec,
    /// Copies deleted again because their key changed while copied.
    pub handoff_raced: IntCounter,
    /// A stopping node's entries, by node and outcome (kept elsewhere,
    /// refused there, skipped, restored to it when it came back).
    pub parked_entries: IntCounterVec,
    /// Keys scanned by refills.
    pub handoff_scanned: IntCounter,
    /// Nodes being refilled now.
    pub nodes_warming: IntGauge,
    /// Keys at or above the hot-key threshold in the last window.
    pub hot_keys: IntGauge,
    /// Reads answered from the near cache (hot-key relief).
    pub hot_key_relieved: IntCounter,
    /// Bytes held by the near cache.
    pub hot_key_cache_bytes: IntGauge,
    /// Hedged reads.
    pub hedge: HedgeMetrics,
    /// The nodes' change feeds as this orchestrator follows them.
    pub feeds: FeedMetrics,
}

/// How this orchestrator follows the nodes' change feeds, by node.
#[derive(Debug, Clone)]
pub struct FeedMetrics {
    /// 1 while the feed is connected and caught up.
    pub in_sync: IntGaugeVec,
    /// Changes received.
    pub changes: IntCounterVec,
    /// Times the node said changes were missed (a gap).
    pub gaps: IntCounterVec,
    /// Times the feed was lost (ended, broke, or went silent).
    pub lost: IntCounterVec,
    /// Changes the node had assigned that this orchestrator had not seen,
    /// at the last message.
    pub lag: IntGaugeVec,
}

impl ClusterMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            calls: IntCounterVec::new(
                Opts::new(
                    "ringcache_node_calls_total",
                    "Calls from this orchestrator to cache nodes (each carries one or more coalesced requests), by node and outcome.",
                ),
                &["node", "code"],
            )?,
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "ringcache_node_call_seconds",
                    "Latency of calls to cache nodes, by node.",
                )
                .buckets(BUCKETS.to_vec()),
                &["node"],
            )?,
            ops: HistogramVec::new(
                HistogramOpts::new(
                    "ringcache_node_call_ops",
                    "Operations carried per call to a cache node (above 1: requests coalesced), by node.",
                )
                .buckets(OPS_BUCKETS.to_vec()),
                &["node"],
            )?,
            routable: IntGaugeVec::new(
                Opts::new(
                    "ringcache_node_healthy",
                    "1 if the node gets calls, 0 if it is ejected.",
                ),
                &["node"],
            )?,
            reached: IntGaugeVec::new(
                Opts::new(
                    "ringcache_node_reached",
                    "1 once the node has answered this orchestrator, 0 while it never has (a wrong address, or a node not started).",
                ),
                &["node"],
            )?,
            ring_nodes: IntGauge::new("ringcache_ring_nodes", "Cache nodes on the ring.")?,
            replica_failures: IntCounterVec::new(
                Opts::new(
                    "ringcache_replica_write_failures_total",
                    "Replica writes that failed (the write itself succeeded on its first owner), by node.",
                ),
                &["node"],
            )?,
            ejections: IntCounterVec::new(
                Opts::new(
                    "ringcache_node_ejections_total",
                    "Times a node was ejected after consecutive failures.",
                ),
                &["node"],
            )?,
            probes: IntCounterVec::new(
                Opts::new(
                    "ringcache_node_probes_total",
                    "Health checks made at once because calls to a node ended without telling whether it answers (cut by their caller's deadline), by node and result (ok, failed).",
                ),
                &["node", "result"],
            )?,
            pending_invalidations: IntGaugeVec::new(
                Opts::new(
                    "ringcache_pending_invalidations",
                    "Keys a node may hold stale values of (writes or deletes that could not reach it), not routed to it until deleted there.",
                ),
                &["node"],
            )?,
            invalidations_replayed: IntCounterVec::new(
                Opts::new(
                    "ringcache_invalidations_replayed_total",
                    "Keys deleted on a node because it missed their updates while unreachable.",
                ),
                &["node"],
            )?,
            flushes: IntCounterVec::new(
                Opts::new(
                    "ringcache_node_flushes_total",
                    "Nodes flushed because they missed more updates than could be tracked (--pending-invalidation-bytes).",
                ),
                &["node"],
            )?,
            handoff_reads: IntCounterVec::new(
                Opts::new(
                    "ringcache_handoff_reads_total",
                    "Reads that missed on a warming node (joined or restarted) and were looked up on the key's other holders, by result (hit, miss).",
                ),
                &["result"],
            )?,
            handoff_copies: IntCounterVec::new(
                Opts::new(
                    "ringcache_handoff_copies_total",
                    "Entries copied to a warming node (by refill or read-through), by node.",
                ),
                &["node"],
            )?,
            parked_entries: IntCounterVec::new(
                Opts::new(
                    "ringcache_parked_entries_total",
                    "A stopping node's entries, by node and outcome: kept (copied to the node that takes the key while it is away), refused (the key changed there), skipped (not its key, possibly stale, or nowhere to go), restored (copied back when it returned).",
                ),
                &["node", "outcome"],
            )?,
            handoff_raced: IntCounter::new(
                "ringcache_handoff_raced_total",
                "Handoff copies deleted again because their key was written or deleted while it was copied.",
            )?,
            handoff_scanned: IntCounter::new(
                "ringcache_handoff_scanned_keys_total",
                "Keys scanned on other nodes to refill warming nodes.",
            )?,
            nodes_warming: IntGauge::new(
                "ringcache_nodes_warming",
                "Nodes being refilled now (joined the ring or restarted empty).",
            )?,
            hot_keys: IntGauge::new(
                "ringcache_hot_keys",
                "Keys at or above --hot-key-threshold calls per second in the last --hot-key-window (Cluster/HotKeys lists them).",
            )?,
            hot_key_relieved: IntCounter::new(
                "ringcache_hot_key_relieved_reads_total",
                "Reads of hot keys answered from this orchestrator's near cache instead of a node (hot-key relief).",
            )?,
            hot_key_cache_bytes: IntGauge::new(
                "ringcache_hot_key_cache_bytes",
                "Bytes held by the near cache of hot keys (at most --hot-key-cache-bytes).",
            )?,
            debts_unrecorded: IntCounterVec::new(
                Opts::new(
                    "ringcache_debts_unrecorded_total",
                    "Records that owners missed a change which could not be stored on the node that took it (the call failed): only this orchestrator knows of them, by holder.",
                ),
                &["node"],
            )?,
            feeds: FeedMetrics {
                in_sync: IntGaugeVec::new(
                    Opts::new(
                        "ringcache_feed_in_sync",
                        "1 while this orchestrator follows the node's change feed and has seen every change; 0 while it does not (its keys are not relieved).",
                    ),
                    &["node"],
                )?,
                changes: IntCounterVec::new(
                    Opts::new(
                        "ringcache_feed_changes_total",
                        "Changes received from the node's change feed.",
                    ),
                    &["node"],
                )?,
                gaps: IntCounterVec::new(
                    Opts::new(
                        "ringcache_feed_gaps_total",
                        "Times the node's feed said changes were missed (its log dropped them, or it restarted): everything kept of its keys was forgotten.",
                    ),
                    &["node"],
                )?,
                lost: IntCounterVec::new(
                    Opts::new(
                        "ringcache_feed_lost_total",
                        "Times the node's change feed ended, broke or went silent (it is then followed again from the last change seen).",
                    ),
                    &["node"],
                )?,
                lag: IntGaugeVec::new(
                    Opts::new(
                        "ringcache_feed_lag",
                        "Changes the node had made that this orchestrator had not yet seen, at its last feed message.",
                    ),
                    &["node"],
                )?,
            },
            hedge: HedgeMetrics {
                hedged: IntCounter::new(
                    "ringcache_hedged_keys_total",
                    "Keys read from a second owner because the first had not answered within the hedge delay (--hedge-delay).",
                )?,
                wins: IntCounter::new(
                    "ringcache_hedge_wins_total",
                    "Hedged keys whose second owner answered first.",
                )?,
                refused: IntCounter::new(
                    "ringcache_hedge_budget_exhausted_total",
                    "Keys that would have been hedged but were not, because hedges were already --hedge-budget percent of reads.",
                )?,
                delay_us: IntGauge::new(
                    "ringcache_hedge_delay_microseconds",
                    "The hedge delay in force: --hedge-delay, or the p99 latency of answered node calls.",
                )?,
            },
        };
        registry.register(Box::new(m.debts_unrecorded.clone()))?;
        registry.register(Box::new(m.feeds.in_sync.clone()))?;
        registry.register(Box::new(m.feeds.changes.clone()))?;
        registry.register(Box::new(m.feeds.gaps.clone()))?;
        registry.register(Box::new(m.feeds.lost.clone()))?;
        registry.register(Box::new(m.feeds.lag.clone()))?;
        registry.register(Box::new(m.hedge.hedged.clone()))?;
        registry.register(Box::new(m.hedge.wins.clone()))?;
        registry.register(Box::new(m.hedge.refused.clone()))?;
        registry.register(Box::new(m.hedge.delay_us.clone()))?;
        registry.register(Box::new(m.hot_keys.clone()))?;
        registry.register(Box::new(m.hot_key_relieved.clone()))?;
        registry.register(Box::new(m.hot_key_cache_bytes.clone()))?;
        registry.register(Box::new(m.handoff_reads.clone()))?;
        registry.register(Box::new(m.handoff_copies.clone()))?;
        registry.register(Box::new(m.handoff_raced.clone()))?;
        registry.register(Box::new(m.parked_entries.clone()))?;
        registry.register(Box::new(m.handoff_scanned.clone()))?;
        registry.register(Box::new(m.nodes_warming.clone()))?;
        registry.register(Box::new(m.calls.clone()))?;
        registry.register(Box::new(m.pending_invalidations.clone()))?;
        registry.register(Box::new(m.invalidations_replayed.clone()))?;
        registry.register(Box::new(m.flushes.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.ops.clone()))?;
        registry.register(Box::new(m.routable.clone()))?;
        registry.register(Box::new(m.reached.clone()))?;
        registry.register(Box::new(m.ring_nodes.clone()))?;
        registry.register(Box::new(m.replica_failures.clone()))?;
        registry.register(Box::new(m.ejections.clone()))?;
        registry.register(Box::new(m.probes.clone()))?;
        Ok(m)
    }

    /// The call metrics of `node`, resolved once for its call stack.
    pub fn call_metrics(&self, node: &str) -> CallMetrics {
        CallMetrics {
            calls: Arc::new(
                CODES.map(|code| self.calls.with_label_values(&[node, code_name(code)])),
            ),
            latency: self.latency.with_label_values(&[node]),
            ops: self.ops.with_label_values(&[node]),
        }
    }

    /// Sets whether `node` gets calls.
    pub fn set_routable(&self, node: &str, routable: bool) {
        self.routable
            .with_label_values(&[node])
            .set(i64::from(routable));
    }

    /// Records that `node` has answered (its `reached` gauge starts at 0).
    pub fn set_reached(&self, node: &str) {
        self.reached.with_label_values(&[node]).set(1);
    }

    /// Records a new node, not reached yet.
    pub fn add_node(&self, node: &str) {
        self.reached.with_label_values(&[node]).set(0);
    }

    /// Removes every series of a node that left the membership.
    pub fn forget_node(&self, node: &str) {
        let _ = self.latency.remove_label_values(&[node]);
        let _ = self.ops.remove_label_values(&[node]);
        for code in CODES {
            let _ = self.calls.remove_label_values(&[node, code_name(code)]);
        }
        let _ = self.routable.remove_label_values(&[node]);
        let _ = self.reached.remove_label_values(&[node]);
        let _ = self.replica_failures.remove_label_values(&[node]);
        let _ = self.ejections.remove_label_values(&[node]);
        for result in ["ok", "failed"] {
            let _ = self.probes.remove_label_values(&[node, result]);
        }
        let _ = self.pending_invalidations.remove_label_values(&[node]);
        let _ = self.invalidations_replayed.remove_label_values(&[node]);
        let _ = self.flushes.remove_label_values(&[node]);
        let _ = self.debts_unrecorded.remove_label_values(&[node]);
        let _ = self.handoff_copies.remove_label_values(&[node]);
        for outcome in ["kept", "refused", "skipped", "restored"] {
            let _ = self.parked_entries.remove_label_values(&[node, outcome]);
        }
        let f = &self.feeds;
        let _ = f.in_sync.remove_label_values(&[node]);
        let _ = f.changes.remove_label_values(&[node]);
        let _ = f.gaps.remove_label_values(&[node]);
        let _ = f.lost.remove_label_values(&[node]);
        let _ = f.lag.remove_label_values(&[node]);
    }
}
