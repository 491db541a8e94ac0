//! Warm handoff: a node that joins the ring, or restarts empty, gets the
//! keys it owns copied to it from their other holders, so a deploy or a
//! scale-out does not empty the cache.
//!
//! Three parts:
//!
//! - **Detection.** A node added to a ring that already had members is
//!   warming from the start. Every health round also asks each node for its
//!   incarnation (a number its process picks at start, `Node/Stats`): a
//!   node whose incarnation changed was restarted, and is empty.
//! - **Refill.** A warming node is filled in the background: every other
//!   node (and every node of the previous membership, during the handoff
//!   window) is scanned (`Internal/Scan`), the keys the warming node owns
//!   are read from a holder that owns them now or owned them before the
//!   membership changed, and copied to it with their versions
//!   (`Internal/Apply` copy ops: a node keeps the newer of two versions).
//!   Paced by `--handoff-rate` keys scanned per second.
//! - **Read-through.** Until the window (`--handoff-window`) ends, a read
//!   that misses on a warming node, or on a node that did not own the key
//!   under the previous membership, is answered from the key's other
//!   holders, and what they hold is copied back.
//!
//! # Never resurrecting a delete
//!
//! Copying races with the client's writes and deletes: a copy may read a
//! value from one node just before a delete removes it everywhere, then
//! store it on the warming node just after the delete passed there. So
//! every write and delete is recorded in [`Mutations`] while it runs, and
//! after a copy is stored, every copied key that was written or deleted
//! since the copy read it is deleted again on the node it was copied to
//! (the copy is wasted, never stale). The record is this orchestrator's:
//! writes made through another orchestrator are not seen (see the README's
//! guarantees).
//!
//! Holders under the previous membership stop getting writes once the
//! membership changes, so during the window writes and deletes also delete
//! the key on them (the router's "shadow" deletes): a read-through never
//! finds a value there that was overwritten or deleted since.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ringcache_proto::v1::{CopyRequest, GetResponse, GetResult, Op, SetResponse, op, op_result};

use crate::{
    client::{CallError, get_op},
    nodes::{Cluster, Node, Previous, Topology},
    ring::Preference,
};

/// Read-through copies running at once; beyond it, a read-through answers
/// without copying.
pub const COPY_SLOTS: usize = 64;

/// How warm handoff runs.
#[derive(Debug, Clone, Copy)]
pub struct HandoffSettings {
    /// How long after a node joins or restarts (or the membership changes)
    /// misses read through to the keys' other holders.
    pub window: Duration,
    /// Keys scanned per second while refilling a node.
    pub rate: u32,
    /// Copies of a key each write makes (`--replicas`): who owns a key.
    pub replicas: usize,
    /// How long after this orchestrator readmits a node (or sees it
    /// restarted) its reads prefer the key's other owners: the read
    /// fence. Another orchestrator may still hold the node away for up to
    /// one health round and write around it; the debts it records reach
    /// this one on the feeds within milliseconds after that. One health
    /// interval + health timeout + node timeout.
    pub read_fence: Duration,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(300),
            rate: 50_000,
            replicas: 1,
            read_fence: Duration::from_millis(2500),
        }
    }
}

/// One node's warm-up state.
#[derive(Debug, Default)]
pub struct Warmth {
    /// The incarnation last seen; 0 before the first.
    incarnation: AtomicU64,
    /// Misses on the node read through until then.
    until: Mutex<Option<Instant>>,
    /// A refill is wanted (set when warming starts, taken when it runs).
    refill_wanted: AtomicBool,
    /// A refill is running.
    refilling: AtomicBool,
    /// The incarnation it was last seen restarting as (0: never).
    restarted_as: AtomicU64,
}

impl Warmth {
    /// Starts warming: misses read through for `window`, and a refill is
    /// wanted.
    pub fn start(&self, window: Duration) {
        *self.until.lock() = Some(Instant::now() + window);
        self.refill_wanted.store(true, Ordering::Release);
    }

    /// Whether misses on the node read through to other holders now.
    pub fn reads_through(&self, now: Instant) -> bool {
        self.until.lock().is_some_and(|until| now < until)
    }

    /// Whether the node is being filled (or is about to be).
    pub fn warming(&self) -> bool {
        self.refill_wanted.load(Ordering::Acquire) || self.refilling.load(Ordering::Acquire)
    }

    /// The incarnation last seen; 0 before the first.
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Records the incarnation a health round saw; true if the node had
    /// been seen before with another one (it restarted, empty).
    pub fn saw_incarnation(&self, incarnation: u64) -> bool {
        if incarnation == 0 {
            return false;
        }
        let before = self.incarnation.swap(incarnation, Ordering::AcqRel);
        let restarted = before != 0 && before != incarnation;
        if restarted {
            self.restarted_as.store(incarnation, Ordering::Release);
        }
        restarted
    }

    /// The incarnation the node is warmed in, if it is warmed because it
    /// restarted (empty) and misses on it still read through: every copy
    /// to it is then stored only if its key never changed in that
    /// incarnation (see [`crate::nodes::Cluster::copy_since`]).
    pub fn restarted_as(&self, now: Instant) -> Option<u64> {
        let restarted = self.restarted_as.load(Ordering::Acquire);
        (restarted != 0 && restarted == self.incarnation() && self.reads_through(now))
            .then_some(restarted)
    }

    /// Takes the wish for a refill: true if one is wanted and none runs,
    /// in which case the caller runs it and calls [`Warmth::refilled`].
    pub fn take_refill(&self) -> bool {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return false;
        }
        if self.refill_wanted.swap(false, Ordering::AcqRel) {
            true
        } else {
            self.refilling.store(false, Ordering::Release);
            false
        }
    }

    /// A refill ended.
    pub fn refilled(&self) {
        self.refilling.store(false, Ordering::Release);
    }
}

/// Most keys [`Mutations`] tracks at once. Beyond it, copies made while it
/// is full are treated as raced (deleted again after being stored).
const MAX_TRACKED: usize = 100_000;

/// Writes and deletes in progress or recently finished, so a copy can tell
/// whether a key changed while it was being copied. See the module
/// documentation.
#[derive(Debug, Default)]
pub struct Mutations {
    inner: Arc<Mutex<Tracked>>,
}

#[derive(Debug, Default)]
struct Tracked {
    /// Ticks at every copy start and every mutation end.
    seq: u64,
    /// Copies running.
    copies: usize,
    /// key → (mutations running, `seq` when the last one ended).
    keys: HashMap<Box<str>, (u32, u64)>,
    /// Mutations running that could not be tracked (the map was full).
    untracked: u32,
    /// `seq` when the last untracked mutation ended.
    untracked_end: u64,
}

/// A mutation of a key, recorded while it lives.
#[derive(Debug)]
pub struct Mutation<'a> {
    mutations: &'a Mutations,
    key: Option<Box<str>>,
}

/// A copy in progress: keys changed after it started are
/// [`Copying::raced`].
#[derive(Debug)]
pub struct Copying {
    tracked: Arc<Mutex<Tracked>>,
    start: u64,
}

impl Mutations {
    /// Records that `key` is being written or deleted until the returned
    /// guard drops.
    pub fn begin(&self, key: &str) -> Mutation<'_> {
        let mut t = self.inner.lock();
        let t = &mut *t;
        let tracked = if let Some(entry) = t.keys.get_mut(key) {
            entry.0 += 1;
            true
        } else if t.keys.len() < MAX_TRACKED {
            t.keys.insert(key.into(), (1, 0));
            true
        } else {
            t.untracked += 1;
            false
        };
        Mutation {
            mutations: self,
            key: tracked.then(|| key.into()),
        }
    }

    /// Starts a copy: reads made from now on may race mutations, which
    /// [`Copying::raced`] then reports.
    pub fn copying(&self) -> Copying {
        let mut t = self.inner.lock();
        t.seq += 1;
        t.copies += 1;
        Copying {
            tracked: self.inner.clone(),
            start: t.seq,
        }
    }

    /// Keys tracked now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.inner.lock().keys.len()
    }
}

impl Drop for Mutation<'_> {
    fn drop(&mut self) {
        let mut t = self.mutations.inner.lock();
        t.seq += 1;
        let seq = t.seq;
        let keep = t.copies > 0;
        match self.key.take() {
            Some(key) => {
                let remove = match t.keys.get_mut(&key) {
                    Some(entry) => {
                        entry.0 = entry.0.saturating_sub(1);
                        entry.1 = seq;
                        entry.0 == 0 && !keep
                    }
                    None => false,
                };
                if remove {
                    t.keys.remove(&key);
                }
            }
            None => {
                t.untracked = t.untracked.saturating_sub(1);
                t.untracked_end = seq;
            }
        }
    }
}

impl Copying {
    /// Whether `key` was being written or deleted at any time since this
    /// copy started (or may have been: untracked mutations count for every
    /// key).
    pub fn raced(&self, key: &str) -> bool {
        let t = self.tracked.lock();
        if t.untracked > 0 || t.untracked_end >= self.start {
            return true;
        }
        t.keys
            .get(key)
            .is_some_and(|&(running, ended)| running > 0 || ended >= self.start)
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        let mut t = self.tracked.lock();
        t.copies = t.copies.saturating_sub(1);
        if t.copies == 0 {
            // Nobody needs finished mutations any more.
            t.keys.retain(|_, (running, _)| *running > 0);
        }
    }
}

/// A key and what a holder answered for it.
type Entry = (String, GetResponse);

/// A key's owners under `topo` (ring indexes).
fn owners(topo: &Topology, key: &str, replicas: usize) -> Preference {
    topo.ring.owners(key, replicas)
}

/// Whether `node` may hand `key` over: it owns it now (and holds no value
/// of it that may be stale), or owned it before the membership changed (its
/// copy is then kept current by the router's shadow deletes).
fn may_supply(
    topo: &Topology,
    previous: Option<&Previous>,
    key: &str,
    replicas: usize,
    node: &Node,
) -> bool {
    if node.pending.contains(key) {
        return false;
    }
    let owns = |t: &Topology| {
        owners(t, key, replicas)
            .iter()
            .any(|&i| t.nodes[i].id == node.id)
    };
    owns(topo) || previous.is_some_and(|p| owns(&p.topology))
}

/// Nodes that may hold `key` for `target` (which missed it), best first:
/// its other current owners, then its owners under the previous
/// membership. At most `max`.
pub fn holders(
    topo: &Topology,
    previous: Option<&Previous>,
    key: &str,
    replicas: usize,
    target: &Node,
    max: usize,
) -> Vec<Arc<Node>> {
    let mut found: Vec<Arc<Node>> = Vec::new();
    let now = Instant::now();
    if target.warmth.reads_through(now) {
        for &i in &owners(topo, key, replicas) {
            let n = &topo.nodes[i];
            // Not one whose reads are fenced: it may hold a value another
            // orchestrator deleted around it a moment ago.
            if n.id != target.id && n.usable_for(key) && !n.read_fenced() {
                found.push(n.clone());
            }
        }
    }
    if let Some(p) = previous {
        let before = owners(&p.topology, key, replicas);
        // Only a key that moved to `target`: if it owned the key before,
        // it has it (unless it restarted, covered above).
        if !before.iter().any(|&i| p.topology.nodes[i].id == target.id) {
            for &i in &before {
                let n = &p.topology.nodes[i];
                if !found.iter().any(|f| f.id == n.id) && !n.pending.contains(key) {
                    found.push(n.clone());
                }
            }
        }
    }
    found.truncate(max);
    found
}

/// What a copy to a node must not outlive: changes of its key on the
/// node after the value was read elsewhere (a delete through any
/// orchestrator). Taken before the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopySince {
    /// The node's change feed position then: the node stores the copy
    /// only if the key has not changed there since.
    After(crate::feeds::Position),
    /// Feeds are followed but the node's was not in sync: no copy (it
    /// could not be vouched for).
    Unknown,
    /// Feeds are not followed (`--change-feeds false`): copies are
    /// conditioned only on this orchestrator's own writes.
    Unconditional,
}

/// Stores `entries` (read from their holders after `copying` started and
/// `since` was taken) on `target` with their versions, then deletes there
/// again every key that was written or deleted through this orchestrator
/// since `copying` started. Returns how many copies were stored.
pub async fn copy_to(
    cluster: &Cluster,
    target: &Node,
    entries: Vec<Entry>,
    copying: &Copying,
    since: CopySince,
) -> Result<usize, CallError> {
    if entries.is_empty() || since == CopySince::Unknown {
        return Ok(0);
    }
    let (incarnation, unchanged_after) = match since {
        CopySince::After(p) => (p.incarnation, p.sequence),
        _ => (0, 0),
    };
    let timeout = cluster.settings().stack.node_timeout;
    tracing::trace!(node = %target.id, ?since, keys = ?entries.iter().map(|(k, g)| (k, g.version)).collect::<Vec<_>>(), "copying entries to a node");
    let ops = entries
        .iter()
        .map(|(key, g)| Op {
            op: Some(op::Op::Copy(CopyRequest {
                key: key.clone(),
                value: g.value.clone(),
                ttl: g.ttl,
                version: g.version,
                unchanged_after,
                incarnation,
            })),
        })
        .collect();
    let result = target
        .client
        .call(ops, Some(Instant::now() + timeout), None)
        .await;
    // Whatever the outcome (a lost call may still have been applied):
    // keys that changed meanwhile must not keep the copy.
    let raced: Vec<String> = entries
        .iter()
        .map(|(k, _)| k)
        .filter(|k| copying.raced(k))
        .cloned()
        .collect();
    if !raced.is_empty() {
        cluster.metrics().handoff_raced.inc_by(raced.len() as u64);
        cluster
            .delete_or_record(target, raced, Some(Instant::now() + timeout))
            .await;
    }
    let stored = result?
        .iter()
        .filter(|r| {
            matches!(
                r.result,
                Some(op_result::Result::Copy(SetResponse { stored: true, .. }))
            )
        })
        .count();
    cluster
        .metrics()
        .handoff_copies
        .with_label_values(&[&*target.id])
        .inc_by(stored as u64);
    Ok(stored)
}

/// Answers `misses` (items of `results` that missed on `served_by`) from
/// their other holders, and copies what is found back in the background.
pub async fn read_through(
    cluster: &Arc<Cluster>,
    topo: &Topology,
    keys: &[String],
    results: &mut [GetResult],
    served_by: &[Option<usize>],
    deadline: Option<Instant>,
) {
    let replicas = cluster.settings().handoff.replicas;
    let previous = cluster.previous();
    // (item, node that missed, holders to try)
    let mut wanted: Vec<(usize, usize, Vec<Arc<Node>>)> = Vec::new();
    // Each target's feed position before the holders are read.
    let mut since: HashMap<usize, CopySince> = HashMap::new();
    for (i, r) in results.iter().enumerate() {
        let (false, None, Some(n)) = (r.found, &r.error, served_by[i]) else {
            continue;
        };
        let h = holders(
            topo,
            previous.as_deref(),
            &keys[i],
            replicas,
            &topo.nodes[n],
            2,
        );
        if !h.is_empty() {
            since
                .entry(n)
                .or_insert_with(|| cluster.copy_since(&topo.nodes[n]));
            wanted.push((i, n, h));
        }
    }
    if wanted.is_empty() {
        return;
    }
    let copying = cluster.mutations.copying();
    let mut copies: HashMap<usize, Vec<Entry>> = HashMap::new();
    for rank in 0..2 {
        let mut groups: HashMap<&str, (Arc<Node>, Vec<usize>)> = HashMap::new();
        for (w, (_, _, h)) in wanted.iter().enumerate() {
            if let Some(node) = h.get(rank) {
                groups
                    .entry(&*node.id)
                    .or_insert_with(|| (node.clone(), Vec::new()))
                    .1
                    .push(w);
            }
        }
        if groups.is_empty() {
            break;
        }
        let calls = groups.into_values().map(|(node, ws)| {
            let ops = ws.iter().map(|&w| get_op(&keys[wanted[w].0])).collect();
            async move { (ws, node.client.call(ops, deadline, None).await) }
        });
        let mut found_now = Vec::new();
        for (ws, answer) in futures::future::join_all(calls).await {
            let Ok(answers) = answer else { continue };
            for (w, a) in ws.into_iter().zip(answers) {
                if let Some(op_result::Result::Get(g)) = a.result
                    && g.found
                {
                    found_now.push((w, g));
                }
            }
        }
        for (w, g) in found_now {
            let (item, n, _) = &mut wanted[w];
            results[*item] = GetResult {
                found: true,
                value: g.value.clone(),
                version: g.version,
                ttl: g.ttl,
                error: None,
            };
            copies.entry(*n).or_default().push((keys[*item].clone(), g));
            // Answered: no further rank for it.
            wanted[w].2.clear();
        }
    }
    let hits: usize = copies.values().map(Vec::len).sum();
    let metrics = cluster.metrics();
    metrics
        .handoff_reads
        .with_label_values(&["hit"])
        .inc_by(hits as u64);
    metrics
        .handoff_reads
        .with_label_values(&["miss"])
        .inc_by((wanted.len() - hits) as u64);
    if copies.is_empty() {
        return;
    }
    // Copy back off the request's path, within a bound.
    let Ok(slot) = cluster.copy_slots.clone().try_acquire_owned() else {
        return;
    };
    let cluster = cluster.clone();
    let targets: Vec<(Arc<Node>, Vec<Entry>, CopySince)> = copies
        .into_iter()
        .map(|(n, entries)| {
            let since = since.get(&n).copied().unwrap_or(CopySince::Unknown);
            (topo.nodes[n].clone(), entries, since)
        })
        .collect();
    tokio::spawn(async move {
        for (target, entries, since) in targets {
            if let Err(error) = copy_to(&cluster, &target, entries, &copying, since).await {
                tracing::debug!(node = %target.id, %error, "read-through copy failed");
            }
        }
        drop(copying);
        drop(slot);
    });
}

/// What one refill did.
#[derive(Debug, Default)]
struct Refilled {
    scanned: u64,
    wanted: u64,
    copied: u64,
}

/// How long a refill waits for the target's change feed to be in sync
/// (just after a restart it is followed again within milliseconds).
const FEED_WAIT: Duration = Duration::from_secs(10);

/// The target's feed position to condition copies on (see [`CopySince`]),
/// waiting up to [`FEED_WAIT`] for its feed to be in sync; `None` if it is
/// not by then.
async fn copy_position(cluster: &Cluster, target: &Node) -> Option<CopySince> {
    let until = Instant::now() + FEED_WAIT;
    loop {
        match cluster.copy_since(target) {
            CopySince::Unknown if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            CopySince::Unknown => return None,
            since => return Some(since),
        }
    }
}

/// Fills `target` (which joined or restarted) with the keys it owns, from
/// every other node; see the module documentation.
pub async fn refill(cluster: Arc<Cluster>, target: Arc<Node>) {
    let started = Instant::now();
    cluster.metrics().nodes_warming.inc();
    tracing::info!(node = %target.id, "warm handoff: refilling the node");
    let outcome = run_refill(&cluster, &target).await;
    cluster.metrics().nodes_warming.dec();
    target.warmth.refilled();
    cluster.topology_changed();
    match outcome {
        Ok(done) => tracing::info!(
            node = %target.id,
            scanned = done.scanned,
            owned = done.wanted,
            copied = done.copied,
            took = ?started.elapsed(),
            "warm handoff: node refilled"
        ),
        Err(reason) => tracing::warn!(node = %target.id, %reason, "warm handoff: refill stopped"),
    }
}

async fn run_refill(cluster: &Cluster, target: &Arc<Node>) -> Result<Refilled, String> {
    let mut done = Refilled::default();
    let settings = cluster.settings().handoff;
    if settings.rate == 0 {
        return Ok(done);
    }
    let topo = cluster.topology();
    let Some(t) = topo.nodes.iter().position(|n| Arc::ptr_eq(n, target)) else {
        return Err("the node left the ring".into());
    };
    let previous = cluster.previous();
    let mut sources: Vec<Arc<Node>> = topo
        .nodes
        .iter()
        .filter(|n| !Arc::ptr_eq(n, target))
        .cloned()
        .collect();
    if let Some(p) = &previous {
        sources.extend(
            p.topology
                .nodes
                .iter()
                .filter(|n| !topo.nodes.iter().any(|c| c.id == n.id))
                .cloned(),
        );
    }
    let timeout = cluster.settings().stack.node_timeout;
    let page_keys = u32::try_from(cluster.settings().batch.max_ops).unwrap_or(u32::MAX);
    for source in sources {
        let mut cursor = (0u32, 0u64);
        loop {
            if cluster.topology().epoch != topo.epoch {
                // Who owns what changed: start over on the new membership.
                if cluster
                    .topology()
                    .nodes
                    .iter()
                    .any(|n| Arc::ptr_eq(n, target))
                {
                    cluster.start_warming(target);
                }
                return Err("the membership changed; refilling again".into());
            }
            let page = match source
                .client
                .transport()
                .scan(cursor, page_keys, timeout)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(node = %target.id, source = %source.id, %error, "warm handoff: cannot scan a node; skipping it");
                    break;
                }
            };
            done.scanned += page.keys.len() as u64;
            cluster
                .metrics()
                .handoff_scanned
                .inc_by(page.keys.len() as u64);
            let wanted: Vec<String> = page
                .keys
                .iter()
                .filter(|k| {
                    owners(&topo, k, settings.replicas).contains(&t)
                        && may_supply(&topo, previous.as_deref(), k, settings.replicas, &source)
                })
                .cloned()
                .collect();
            done.wanted += wanted.len() as u64;
            if !wanted.is_empty() {
                let copying = cluster.mutations.copying();
                let Some(since) = copy_position(cluster, target).await else {
                    // Refilled at a later round, once its feed is followed.
                    cluster.start_warming(target);
                    return Err(format!(
                        "the node's change feed has not been in sync for {FEED_WAIT:?}: its copies cannot be vouched for"
                    ));
                };
                let ops = wanted.iter().map(|k| get_op(k)).collect();
                match source
                    .client
                    .call(ops, Some(Instant::now() + timeout), None)
                    .await
                {
                    Ok(answers) => {
                        let entries: Vec<Entry> = wanted
                            .into_iter()
                            .zip(answers)
                            .filter_map(|(k, a)| match a.result {
                                Some(op_result::Result::Get(g)) if g.found => Some((k, g)),
                                _ => None,
                            })
                            .collect();
                        match copy_to(cluster, target, entries, &copying, since).await {
                            Ok(n) => done.copied += n as u64,
                            Err(error) => {
                                return Err(format!("copying to the node failed: {error}"));
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(node = %target.id, source = %source.id, %error, "warm handoff: cannot read from a node; skipping it");
                        break;
                    }
                }
            }
            // Pace the scan: --handoff-rate keys per second.
            let pause = Duration::from_secs_f64(page.keys.len() as f64 / f64::from(settings.rate));
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if page.done {
                break;
            }
            cursor = (page.next_shard, page.next_position);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mutation_running_when_a_copy_starts_races_it() {
        let m = Mutations::default();
        let delete = m.begin("k");
        let copy = m.copying();
        assert!(copy.raced("k"));
        drop(delete);
        assert!(copy.raced("k"), "it ended after the copy read");
        assert!(!copy.raced("other"));
    }

    #[test]
    fn a_mutation_that_ended_before_the_copy_started_does_not_race_it() {
        let m = Mutations::default();
        drop(m.begin("k"));
        let copy = m.copying();
        assert!(!copy.raced("k"));
        // One that starts afterwards does.
        let write = m.begin("k");
        assert!(copy.raced("k"));
        drop(write);
        assert!(copy.raced("k"));
    }

    #[test]
    fn finished_mutations_are_forgotten_once_no_copy_needs_them() {
        let m = Mutations::default();
        drop(m.begin("a"));
        assert_eq!(m.tracked(), 0, "no copy running: nothing kept");
        let copy = m.copying();
        drop(m.begin("b"));
        assert_eq!(m.tracked(), 1);
        let running = m.begin("c");
        drop(copy);
        assert_eq!(m.tracked(), 1, "only the running one is left");
        drop(running);
        assert_eq!(m.tracked(), 0);
    }

    #[test]
    fn when_full_every_key_counts_as_raced() {
        let m = Mutations::default();
        let copy = m.copying();
        let held: Vec<_> = (0..MAX_TRACKED)
            .map(|i| m.begin(&format!("k{i}")))
            .collect();
        assert!(!copy.raced("zzz"));
        let extra = m.begin("zzz-untracked");
        assert!(copy.raced("anything"), "an untracked mutation is running");
        drop(extra);
        assert!(copy.raced("anything"), "it ended after the copy started");
        drop(held);
        let later = m.copying();
        assert!(!later.raced("anything"));
    }

    #[test]
    fn incarnations_tell_a_restart_from_a_first_sighting() {
        let w = Warmth::default();
        assert!(!w.saw_incarnation(7), "first sighting");
        assert!(!w.saw_incarnation(7));
        assert!(w.saw_incarnation(8), "restarted");
        assert!(!w.saw_incarnation(0), "unknown is ignored");
    }

    #[test]
    fn one_refill_at_a_time_and_only_when_wanted() {
        let w = Warmth::default();
        assert!(!w.take_refill());
        assert!(!w.warming());
        w.start(Duration::from_secs(60));
        assert!(w.warming());
        assert!(w.reads_through(Instant::now()));
        assert!(w.take_refill());
        assert!(w.warming(), "running");
        w.start(Duration::from_secs(60));
        assert!(!w.take_refill(), "one is running");
        w.refilled();
        assert!(w.take_refill(), "wanted again meanwhile");
        w.refilled();
        assert!(!w.warming());
        assert!(!w.reads_through(Instant::now() + Duration::from_secs(61)));
    }
}
