//! Keeping a stopping node's entries: a planned restart does not empty the
//! cache, even with one copy of each key (`--replicas 1`).
//!
//! A node that gets SIGTERM reports NOT_SERVING and waits for a claim
//! (`cache_node::parking`). The health round that sees it spawns
//! [`park`], here. In order:
//!
//! 1. **Positions first.** The change-feed position of every other node
//!    is taken (only from feeds in sync) *before* the claim.
//! 2. **The claim** (`Internal/Park`). One orchestrator gets it; from then
//!    on the node refuses every data call before running it, so every
//!    orchestrator's writes, deletes and reads of its keys go to the next
//!    node of each key — and its entries cannot change any more.
//! 3. **Copies**, a page at a time, paced by `--handoff-rate`: each entry
//!    the stopping node owns (and holds no possibly stale value of) goes
//!    to the node that takes the key's writes while it is away — the
//!    first routable node after the key's owners in its preference order —
//!    with its version and TTL, conditioned on that node's position from
//!    step 1: a key changed there since (a write or a delete through any
//!    orchestrator, or a debt recorded for it) keeps what it has.
//! 4. **Debts.** Each stored copy is recorded as a debt of the stopping
//!    node on its new holder (`Owe`), published on that node's feed. So
//!    every orchestrator keeps the key off the stopping node until it is
//!    brought up to date, and whichever orchestrator sees it come back
//!    copies the entry back to it (`Cluster::catch_up`) before the holder's
//!    copy is retired.
//!
//! A copy whose debt could not be recorded is deleted again: a copy
//! nobody knows about could outlive a later change of its key.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use ringcache_proto::v1::{CopyRequest, Op, OweRequest, SetResponse, op, op_result};

use crate::{
    client::get_op,
    feeds::Position,
    handoff::CopySince,
    nodes::{Cluster, Node, Topology},
};

/// Entries asked for per message.
const PAGE: u32 = 512;

/// How long a claim waits for the other nodes' feeds to be in sync (the
/// stopping node waits `--park-wait`, 5 s by default, for a claim).
const FEED_WAIT: Duration = Duration::from_secs(2);

/// What one park did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    /// Entries the stopping node handed over.
    pub read: u64,
    /// Copies stored on their new holders, with their debts recorded.
    pub kept: u64,
    /// Entries not copied: not the node's to hand over (it does not own
    /// the key, or holds a value of it that may be stale), no node to take
    /// them, or the new holder's feed was not in sync.
    pub skipped: u64,
    /// Copies the new holder refused: the key changed there since.
    pub refused: u64,
}

/// Claims the entries of `node`, which is stopping, and keeps them on the
/// nodes that take its keys while it is away. See the module doc.
pub async fn park(cluster: Arc<Cluster>, node: Arc<Node>) {
    let topology = cluster.topology();
    let Some(stopping) = topology.nodes.iter().position(|n| n.id == node.id) else {
        return;
    };
    // 1. Positions, before the claim: every routable node's, waiting a
    // little for feeds that are not in sync (one just restarted is
    // followed again within milliseconds).
    let positions_now = || -> Vec<Option<Position>> {
        topology
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| match cluster.copy_since(n) {
                CopySince::After(p) if i != stopping => Some(p),
                _ => None,
            })
            .collect()
    };
    let until = Instant::now() + FEED_WAIT;
    let mut positions = positions_now();
    while Instant::now() < until
        && topology
            .nodes
            .iter()
            .enumerate()
            .any(|(i, n)| i != stopping && n.routable() && positions[i].is_none())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        positions = positions_now();
    }
    if positions.iter().all(Option::is_none) {
        tracing::warn!(node = %node.id, "a node is stopping, but no other node's feed is in sync: its entries cannot be kept");
        return;
    }
    // 2. The claim.
    let mut entries = match node.client.transport().park(PAGE).await {
        Ok(entries) => entries,
        Err(error) => {
            // Usually another orchestrator claimed them first.
            tracing::debug!(node = %node.id, %error, "not claiming a stopping node's entries");
            return;
        }
    };
    let replicas = cluster.settings().handoff.replicas;
    if replicas > 1 {
        // Other owners keep every key, and warm handoff brings them back:
        // nothing to hand over. Dropping the stream lets the node stop
        // now (it refuses data calls from the claim on).
        tracing::info!(node = %node.id, "a node is stopping: its keys have other owners");
        return;
    }
    let started = Instant::now();
    tracing::info!(node = %node.id, "a node is stopping: keeping its entries on the nodes that take its keys");
    let rate = cluster.settings().handoff.rate.max(1);
    let mut done = Parked::default();
    loop {
        let page = match entries.next().await {
            Ok(Some(page)) => page.entries,
            Ok(None) => break,
            Err(error) => {
                tracing::warn!(node = %node.id, %error, "the stopping node's entries stopped coming");
                break;
            }
        };
        let count = page.len();
        done.read += count as u64;
        let by_target = targets(&topology, stopping, &positions, page, &mut done);
        let calls = by_target
            .into_iter()
            .map(|(target, copies)| keep(&cluster, &topology.nodes[target], &node.id, copies));
        for (kept, refused) in futures::future::join_all(calls).await {
            done.kept += kept;
            done.refused += refused;
        }
        // Pace: --handoff-rate entries per second.
        tokio::time::sleep(Duration::from_secs_f64(count as f64 / f64::from(rate))).await;
    }
    let metrics = cluster.metrics();
    for (outcome, n) in [
        ("kept", done.kept),
        ("refused", done.refused),
        ("skipped", done.skipped),
    ] {
        metrics
            .parked_entries
            .with_label_values(&[&*node.id, outcome])
            .inc_by(n);
    }
    tracing::info!(
        node = %node.id,
        read = done.read,
        kept = done.kept,
        refused = done.refused,
        skipped = done.skipped,
        took = ?started.elapsed(),
        "the stopping node's entries are kept"
    );
}

/// Groups `page`'s entries by the node that takes each key while the
/// stopping node is away, with that node's position as the copy's
/// condition; counts the entries it leaves out in `done`.
fn targets(
    topology: &Topology,
    stopping: usize,
    positions: &[Option<Position>],
    page: Vec<CopyRequest>,
    done: &mut Parked,
) -> HashMap<usize, Vec<CopyRequest>> {
    let node = &topology.nodes[stopping];
    let mut by_target: HashMap<usize, Vec<CopyRequest>> = HashMap::new();
    for mut entry in page {
        // One copy of each key (see `park`): the key's owner, then the
        // nodes that take it while the owner is away.
        let order = topology.ring.owners(&entry.key, 1 + MAX_SKIPPED);
        let owns = order.first() == Some(&stopping);
        let target = order
            .iter()
            .skip(1)
            .copied()
            .find(|&i| i != stopping && topology.nodes[i].routable());
        let position = target.and_then(|t| positions[t]);
        match (owns && !node.pending.contains(&entry.key), target, position) {
            (true, Some(target), Some(p)) => {
                entry.unchanged_after = p.sequence;
                entry.incarnation = p.incarnation;
                by_target.entry(target).or_default().push(entry);
            }
            _ => done.skipped += 1,
        }
    }
    by_target
}

/// Nodes after a key's owners looked at for one to take it (past the
/// first, they are ejected too).
const MAX_SKIPPED: usize = 3;

/// Stores `copies` on `target` and records each stored one as a debt of
/// `owner` there; deletes again what it could not record. Returns (kept,
/// refused).
async fn keep(
    cluster: &Cluster,
    target: &Arc<Node>,
    owner: &str,
    copies: Vec<CopyRequest>,
) -> (u64, u64) {
    let timeout = cluster.settings().stack.node_timeout;
    let keys: Vec<String> = copies.iter().map(|c| c.key.clone()).collect();
    let ops = copies
        .into_iter()
        .map(|c| Op {
            op: Some(op::Op::Copy(c)),
        })
        .collect();
    let results = match target
        .client
        .call(ops, Some(Instant::now() + timeout), None)
        .await
    {
        Ok(results) => results,
        Err(error) => {
            tracing::warn!(node = %target.id, %error, "cannot keep a stopping node's entries here");
            // A lost call may still have stored some: retire them all.
            cluster
                .delete_or_record(target, keys, Some(Instant::now() + timeout))
                .await;
            return (0, 0);
        }
    };
    let stored: Vec<String> = keys
        .into_iter()
        .zip(&results)
        .filter(|(_, r)| {
            matches!(
                r.result,
                Some(op_result::Result::Copy(SetResponse { stored: true, .. }))
            )
        })
        .map(|(k, _)| k)
        .collect();
    let refused = (results.len() - stored.len()) as u64;
    if stored.is_empty() {
        return (0, refused);
    }
    let owes = stored
        .iter()
        .map(|key| Op {
            op: Some(op::Op::Owe(OweRequest {
                key: key.clone(),
                owners: vec![owner.to_owned()],
            })),
        })
        .collect();
    let recorded = target
        .client
        .call(owes, Some(Instant::now() + timeout), None)
        .await
        .unwrap_or_default();
    let mut unrecorded = Vec::new();
    for (i, key) in stored.iter().enumerate() {
        let ok = recorded
            .get(i)
            .is_some_and(|r| matches!(r.result, Some(op_result::Result::Owe(_))));
        if !ok {
            unrecorded.push(key.clone());
        }
    }
    let kept = (stored.len() - unrecorded.len()) as u64;
    if !unrecorded.is_empty() {
        cluster.debt_not_recorded(target);
        cluster
            .delete_or_record(target, unrecorded, Some(Instant::now() + timeout))
            .await;
    }
    (kept, refused)
}

/// Copies back to `owner`, which is back, the entries `holder` kept for it
/// while it was away (`keys`: the holder's debt records of `owner` for keys
/// the holder does not own), then clears them from `owner`'s pending
/// record so the replay does not delete them. A copy is stored only if the
/// key never changed on `owner` in its current incarnation (a write or a
/// delete made there since it came back wins, and a node that did not
/// restart keeps its changes of the key in its log, so its possibly stale
/// value is deleted by the replay as before). A key recorded again
/// meanwhile (a newer debt) stays pending. Returns how many were
/// restored.
pub async fn restore(
    cluster: &Cluster,
    owner: &Node,
    holder: &Node,
    keys: &[String],
    incarnation: u64,
) -> usize {
    if keys.is_empty() || incarnation == 0 {
        return 0;
    }
    let timeout = cluster.settings().stack.node_timeout;
    // Only keys whose changes while away all went to `holder` (a debt
    // recorded on another node means that node took one: restoring
    // `holder`'s value could bring back what it deleted). Generations
    // are taken before the read: a debt recorded after it moves them.
    let generations: Vec<Option<u64>> = keys
        .iter()
        .map(|k| owner.pending.owed_only_to(k, &holder.id))
        .collect();
    let wanted: Vec<(&String, u64)> = keys
        .iter()
        .zip(generations)
        .filter_map(|(key, generation)| Some((key, generation?)))
        .collect();
    if wanted.is_empty() {
        return 0;
    }
    let reads = wanted.iter().map(|(key, _)| get_op(key)).collect();
    let Ok(answers) = holder
        .client
        .call(reads, Some(Instant::now() + timeout), None)
        .await
    else {
        return 0;
    };
    let mut copies = Vec::new();
    for ((key, generation), answer) in wanted.into_iter().zip(answers) {
        let Some(op_result::Result::Get(g)) = answer.result else {
            continue;
        };
        if g.found {
            copies.push((
                key.clone(),
                generation,
                CopyRequest {
                    key: key.clone(),
                    value: g.value,
                    ttl: g.ttl,
                    version: g.version,
                    // Never changed in this incarnation.
                    unchanged_after: 0,
                    incarnation,
                },
            ));
        }
    }
    if copies.is_empty() {
        return 0;
    }
    tracing::trace!(node = %owner.id, holder = %holder.id, keys = ?copies.iter().map(|(k, _, c)| (k, c.version)).collect::<Vec<_>>(), "restoring entries");
    let ops = copies
        .iter()
        .map(|(_, _, c)| Op {
            op: Some(op::Op::Copy(c.clone())),
        })
        .collect();
    let Ok(results) = owner
        .client
        .call(ops, Some(Instant::now() + timeout), None)
        .await
    else {
        return 0;
    };
    let restored: Vec<(String, u64)> = copies
        .into_iter()
        .zip(&results)
        .filter(|((_, _, copy), r)| match &r.result {
            // Stored, or already there: another orchestrator restored the
            // same version first.
            Some(op_result::Result::Copy(s)) => s.stored || s.version == copy.version,
            _ => false,
        })
        .map(|((key, generation, _), _)| (key, generation))
        .collect();
    owner.pending.replayed(&restored);
    cluster
        .metrics()
        .parked_entries
        .with_label_values(&[&*owner.id, "restored"])
        .inc_by(restored.len() as u64);
    restored.len()
}
