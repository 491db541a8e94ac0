//! `ringcache.v1.Cache` routed to the owning nodes, and
//! `ringcache.v1.Cluster`.
//!
//! # Routing
//!
//! A key's preference order is every node sorted by its rendezvous score
//! (see [`crate::ring`]). Its owners are the first `--replicas` nodes of
//! that order. Ejected nodes are skipped, so while an owner is ejected its
//! keys are read from and written to the next node in the order.
//!
//! - **Reads** go to the first routable node. If the call fails because
//!   the node is in trouble (unavailable, timed out), the keys are retried
//!   on the next routable node, up to `max(replicas, 2)` nodes in all. With
//!   one replica the next node usually answers "not found": a miss, not an
//!   error.
//! - **Writes** go to the first routable node (the primary) with the
//!   client's condition. A primary that fails is replaced by the next node —
//!   after any node failure for unconditional writes (repeating them is
//!   harmless), only after UNAVAILABLE (the write certainly did not happen)
//!   for conditional ones. Once the primary has
//!   stored an entry, it is copied to the other owners with the primary's
//!   version (`replica_version`), in parallel, before the reply. The
//!   **acknowledgement rule**: a write succeeds when its primary stored it;
//!   a replica that fails is counted (`ringcache_replica_write_failures_total`)
//!   and logged, and a later read that falls back to it sees a miss or an
//!   older value.
//! - **Deletes** go to every owner in parallel; `deleted` is true if any
//!   owner deleted the key. A delete fails only if every owner failed.
//! - **Batches** are split by node, sent in parallel, and reassembled in
//!   the caller's order. A node that fails affects only its own keys, whose
//!   results carry an `error` after the fallback has been tried. A group of
//!   one key is sent as a single-key call.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Arc,
    time::Instant,
};

use futures::{StreamExt, future::join_all, stream::FuturesUnordered};
use ringcache_common::{
    deadline::deadline,
    inflight_bytes::CallBytes,
    pipeline::{PipelineStream, Pipelines},
    telemetry,
    validate::{RequestLimits, to_proto_duration},
};
use ringcache_proto::v1::{
    CopyRequest, DeleteManyRequest, DeleteManyResponse, DeleteRequest, DeleteResponse,
    DeleteResult, ExistsRequest, ExistsResponse, GetManyRequest, GetManyResponse, GetRequest,
    GetResponse, GetResult, HotKey, HotKeysRequest, HotKeysResponse, IncrementRequest,
    IncrementResponse, KeyError, KeyInfo, ListNodesRequest, ListNodesResponse, LocateRequest,
    LocateResponse, NodeInfo, NodeState, Op, OpResult, OweRequest, PipelineRequest, SetManyRequest,
    SetManyResponse, SetRequest, SetResponse, SetResult, Topology as TopologyMessage, TouchRequest,
    TouchResponse, WatchTopologyRequest, cache_server::Cache,
    cluster_server::Cluster as ClusterApi, op, op_result, set_request,
};
use tonic::{Code, Request, Response, Status};

use crate::{
    answers::{AnswerEstimate, HeldAnswer},
    client::{CallError, delete_op, get_op},
    handoff,
    health::State,
    hedge::Hedging,
    hotkeys::{Access, HotKeys},
    nearcache::{self, NearCache},
    nodes::{Cluster, Node, Topology},
    ring::Preference,
};

/// How long a stand-in copy lives unless `--failover-ttl` says otherwise.
pub const DEFAULT_FAILOVER_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes a `GetResult` costs on the wire beyond its value.
const RESULT_FRAMING: usize = crate::answers::FRAMING as usize;

/// Routes `ringcache.v1.Cache` calls to cache nodes.
#[derive(Debug, Clone)]
pub struct Router {
    cluster: Arc<Cluster>,
    limits: RequestLimits,
    replicas: usize,
    max_message_bytes: usize,
    failover_ttl: std::time::Duration,
    hot: Arc<HotKeys>,
    /// Hot-key relief (`None`: off).
    relief: Option<Relief>,
    /// Hedged reads (`None`: off).
    hedging: Option<Arc<Hedging>>,
    /// What reads' answers are expected to take, held against
    /// `--max-in-flight-bytes` before the nodes are asked.
    answers: Arc<AnswerEstimate>,
    /// Serves `Pipeline` streams: each op enters this router as its unary
    /// call would (same routing, coalescing, limits).
    pipelines: Pipelines,
}

/// Hot-key relief: the near cache and what it counts.
#[derive(Debug, Clone)]
struct Relief {
    near: Arc<NearCache>,
    /// Reads answered from `near`.
    relieved: Option<prometheus::IntCounter>,
    /// `near` is kept fresh by the nodes' change feeds: a key is relieved
    /// only while the feeds that could carry its changes are in sync.
    fed: bool,
}

/// A write or delete of one key in progress: counted by the hot-key
/// sketch and recorded for warm handoff (a copy must not keep what it read
/// before it) while it runs; when it ends, whatever the nodes answered,
/// the key's near-cache answer is void.
struct Writing<'a> {
    _mutation: handoff::Mutation<'a>,
    near: Option<&'a NearCache>,
    key: &'a str,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Some(near) = self.near {
            near.invalidate(self.key);
        }
    }
}

/// The first node of `pref` usable for `key` that this request has not
/// seen fail; if none is routable, the first not seen to fail that holds
/// no value of `key` it may have missed an update of (every node may be
/// ejected after an outage: trying beats refusing, serving stale does not).
fn choose(topo: &Topology, key: &str, pref: &[usize], failed: &[bool]) -> Option<usize> {
    pref.iter()
        .copied()
        .find(|&i| !failed[i] && topo.nodes[i].usable_for(key))
        .or_else(|| {
            pref.iter()
                .copied()
                .find(|&i| !failed[i] && !topo.nodes[i].pending.contains(key))
        })
}

/// How much of a key's preference order a request computes: enough for
/// every attempt even if all the currently ejected nodes come first. (A
/// request that still runs out computes the full order: see [`target`].)
fn prefix_len(topo: &Topology, replicas: usize) -> usize {
    let ejected = topo.nodes.iter().filter(|n| !n.routable()).count();
    (replicas.max(2) + 1 + ejected).min(topo.nodes.len())
}

/// Moves the key's owners (the first `replicas` of `pref`) whose reads are
/// fenced ([`Node::fence_reads`]) behind its other owners, keeping their
/// order otherwise: the first usable one answers reads and is the primary
/// of writes (which reach every owner all the same). Nodes past the
/// owners stay where they are: a fenced owner is still a better read than
/// a node that only stands in for the owners.
fn fence_order(topo: &Topology, pref: &mut Preference, replicas: usize) {
    let owners = replicas.min(pref.len());
    pref[..owners].sort_by_key(|&i| topo.nodes[i].read_fenced());
}

/// Up to `n` nodes of `pref` usable for `key` and not seen to fail, in
/// order.
fn usable_owners(
    topo: &Topology,
    key: &str,
    pref: &[usize],
    failed: &[bool],
    n: usize,
) -> Preference {
    pref.iter()
        .copied()
        .filter(|&i| !failed[i] && topo.nodes[i].usable_for(key))
        .take(n)
        .collect()
}

/// The node to try next for `key`, as [`choose`] picks it, extending
/// `pref` (a prefix of the key's preference order) to the full order when
/// no usable node is left in the prefix.
fn target(topo: &Topology, key: &str, pref: &mut Preference, failed: &[bool]) -> Option<usize> {
    let usable = |p: &Preference| {
        p.iter()
            .copied()
            .find(|&i| !failed[i] && topo.nodes[i].usable_for(key))
    };
    if let Some(n) = usable(pref) {
        return Some(n);
    }
    if pref.len() < topo.nodes.len() {
        *pref = topo.ring.preference(key);
    }
    choose(topo, key, pref, failed)
}

/// Pending items grouped by the node to try next, in node order. Items
/// with no node left to try are not grouped (they keep their last error).
fn group<'k>(
    topo: &Topology,
    pending: &mut Vec<usize>,
    key: impl Fn(usize) -> &'k str,
    prefs: &mut [Preference],
    failed: &[bool],
) -> BTreeMap<usize, Vec<usize>> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for item in pending.drain(..) {
        if let Some(node) = target(topo, key(item), &mut prefs[item], failed) {
            groups.entry(node).or_default().push(item);
        }
    }
    groups
}

/// A failed node call as the per-key error of each key it carried.
fn call_error(node: &Node, error: &CallError) -> KeyError {
    let status = error.to_status(&node.id);
    KeyError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

fn no_nodes() -> Status {
    Status::unavailable("no cache node is known (check --nodes, --nodes-file or --nodes-dns)")
}

fn no_nodes_error() -> KeyError {
    let status = no_nodes();
    KeyError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// A routed call that came back without the result of its key: a bug, said
/// as one rather than answered as "not found" or "not stored".
fn missing_result(method: &str) -> Status {
    tracing::error!(method, "routing returned no result for the key");
    Status::internal(format!(
        "{method}: routing returned no result for the key (a bug in the orchestrator; please report it)"
    ))
}

fn status_of(error: KeyError) -> Status {
    Status::new(Code::from_i32(error.code), error.message)
}

/// The span of the request being served, if it is recorded (sampled):
/// node calls made for it then get CLIENT spans under it.
fn sampled_span() -> Option<tracing::Span> {
    if !telemetry::tracing_enabled() {
        return None;
    }
    let span = tracing::Span::current();
    (!span.is_none()).then_some(span)
}

/// A node's answer to an op that was not of the kind asked for, or an
/// error it gave for that op alone.
fn op_error(node: &Node, result: Option<op_result::Result>, expected: &str) -> KeyError {
    match result {
        Some(op_result::Result::Error(e)) => KeyError {
            code: e.code,
            message: format!("node {}: {}", node.id, e.message),
        },
        other => KeyError {
            code: Code::Internal as i32,
            message: format!(
                "node {} answered a {expected} with {}",
                node.id,
                match other {
                    None => "nothing",
                    Some(_) => "an answer of another kind",
                }
            ),
        },
    }
}

/// `Get` ops for `items` of `keys`.
fn get_ops(keys: &[String], items: &[usize]) -> Vec<Op> {
    items.iter().map(|&i| get_op(&keys[i])).collect()
}

/// A node's answers to `Get` ops.
fn get_results(node: &Node, results: Vec<OpResult>) -> Vec<GetResult> {
    results.into_iter().map(|r| get_result(node, r)).collect()
}

fn get_result(node: &Node, r: OpResult) -> GetResult {
    match r.result {
        Some(op_result::Result::Get(g)) => GetResult {
            found: g.found,
            value: g.value,
            version: g.version,
            ttl: g.ttl,
            error: None,
        },
        other => GetResult::failed(op_error(node, other, "get")),
    }
}

/// What the near cache keeps of a node's answer `r`, read at `now`.
fn near_answer(r: &GetResult, now: Instant) -> nearcache::Answer {
    // A TTL a node reported is valid (non-negative, bounded); one that does
    // not fit an `Instant` is treated as no expiry.
    let expires = r.ttl.and_then(|t| {
        let d =
            std::time::Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
        now.checked_add(d)
    });
    nearcache::Answer {
        found: r.found,
        value: r.value.clone(),
        version: r.version,
        expires,
    }
}

/// A near-cache answer as a read result at `now`: the key's time left is
/// counted from its expiry.
fn relieved_result(a: nearcache::Answer, now: Instant) -> GetResult {
    GetResult {
        found: a.found,
        value: a.value,
        version: a.version,
        ttl: a
            .expires
            .map(|e| to_proto_duration(e.saturating_duration_since(now))),
        error: None,
    }
}

fn set_result(node: &Node, r: OpResult) -> SetResult {
    match r.result {
        Some(op_result::Result::Set(s) | op_result::Result::Copy(s)) => SetResult {
            stored: s.stored,
            version: s.version,
            error: None,
            missed: Vec::new(),
        },
        other => SetResult::failed(op_error(node, other, "set")),
    }
}

/// A batch result type that can carry a per-key error.
trait KeyResult: Sized {
    /// A result saying this key failed with `error`.
    fn failed(error: KeyError) -> Self;
}

impl KeyResult for GetResult {
    fn failed(error: KeyError) -> Self {
        GetResult {
            error: Some(error),
            ..Default::default()
        }
    }
}

impl KeyResult for SetResult {
    fn failed(error: KeyError) -> Self {
        SetResult {
            error: Some(error),
            ..Default::default()
        }
    }
}

/// Debts to record (`Owe` ops), by the node that holds them: each key
/// with the owners that missed its change.
#[derive(Default)]
struct Debts {
    by_holder: BTreeMap<usize, Vec<(String, Vec<String>)>>,
}

impl Debts {
    /// `owner` missed the change of `key` that node `holder` took.
    fn add(&mut self, holder: usize, key: &str, owner: &Node) {
        let owes = self.by_holder.entry(holder).or_default();
        match owes.iter_mut().find(|(k, _)| k == key) {
            Some((_, owners)) => owners.push(owner.id.to_string()),
            None => owes.push((key.to_owned(), vec![owner.id.to_string()])),
        }
    }
}

/// What a primary stored for an op that is then copied to the other
/// owners.
struct Stored {
    value: bytes::Bytes,
    ttl: Option<prost_types::Duration>,
    version: u64,
}

/// What [`Router::route`] found out, item by item.
struct Routed<R> {
    /// The answers, in item order.
    results: Vec<R>,
    /// The node that answered each item.
    served_by: Vec<Option<usize>>,
    /// Each item's preference order (as far as it was computed).
    prefs: Vec<Preference>,
    /// Nodes that failed during the request.
    failed: Vec<bool>,
}

/// [`Routed`] while results are still being filled in.
struct Routing<R> {
    results: Vec<Option<R>>,
    served_by: Vec<Option<usize>>,
    prefs: Vec<Preference>,
    failed: Vec<bool>,
}

impl<R: KeyResult> Routing<R> {
    /// Fills every unanswered item with `error(item)`.
    fn finish_with(self, error: impl Fn(usize) -> KeyError) -> Routed<R> {
        Routed {
            results: self
                .results
                .into_iter()
                .enumerate()
                .map(|(i, r)| r.unwrap_or_else(|| R::failed(error(i))))
                .collect(),
            served_by: self.served_by,
            prefs: self.prefs,
            failed: self.failed,
        }
    }
}

impl Router {
    /// A router over `cluster`, writing `replicas` copies of each key.
    pub fn new(
        cluster: Arc<Cluster>,
        limits: RequestLimits,
        replicas: usize,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            cluster,
            limits,
            replicas: replicas.max(1),
            max_message_bytes,
            failover_ttl: DEFAULT_FAILOVER_TTL,
            hot: Arc::new(HotKeys::new(
                std::time::Duration::from_secs(1),
                1000.0,
                None,
            )),
            relief: None,
            hedging: None,
            answers: Arc::new(AnswerEstimate::new(
                limits.max_value_bytes,
                max_message_bytes,
            )),
            pipelines: Pipelines::default(),
        }
    }

    /// Serves `Pipeline` streams with `pipelines` (depth, deadlines,
    /// metrics, drain).
    pub fn with_pipelines(mut self, pipelines: Pipelines) -> Self {
        self.pipelines = pipelines;
        self
    }

    /// Hedges reads (with two or more replicas): see [`crate::hedge`].
    pub fn with_hedging(mut self, hedging: Arc<Hedging>) -> Self {
        self.hedging = Some(hedging);
        self
    }

    /// Relieves hot keys: their reads are answered from `near` while its
    /// answers are fresh; `relieved` counts them.
    pub fn with_relief(
        mut self,
        near: Arc<NearCache>,
        relieved: Option<prometheus::IntCounter>,
    ) -> Self {
        self.relief = Some(Relief {
            near,
            relieved,
            fed: false,
        });
        self
    }

    /// Relief is kept fresh by the nodes' change feeds
    /// ([`crate::feeds`]): a key is relieved only while
    /// [`Router::relievable`] says its changes would be seen.
    pub fn with_fed_relief(mut self) -> Self {
        if let Some(r) = &mut self.relief {
            r.fed = true;
        }
        self
    }

    /// Whether every change of `key` would reach this orchestrator through
    /// the change feeds now: the feeds of its owners and of the next node
    /// (which takes its writes while an owner is away) are in sync.
    fn relievable(&self, topo: &Topology, key: &str) -> bool {
        let watched = (self.replicas + 1).min(topo.nodes.len());
        watched > 0
            && topo
                .ring
                .owners(key, watched)
                .iter()
                .all(|&i| topo.nodes[i].feed().in_sync())
    }

    /// Starts a write or delete of `key` (see [`Writing`]).
    fn writing<'a>(&'a self, key: &'a str) -> Writing<'a> {
        self.hot.record(key, Access::Write);
        Writing {
            _mutation: self.cluster.mutations.begin(key),
            near: self.relief.as_ref().map(|r| &*r.near),
            key,
        }
    }

    /// Counts calls per key in `hot` (`Cluster/HotKeys`).
    pub fn with_hot_keys(mut self, hot: Arc<HotKeys>) -> Self {
        self.hot = hot;
        self
    }

    /// Stand-in copies (writes that land on a node that does not own the
    /// key, while its owners are away) live at most `ttl`.
    pub fn with_failover_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.failover_ttl = ttl;
        self
    }

    /// Routes `count` items (keys or entries) to nodes: groups them by the
    /// node to try, sends each group with `send`, and retries the items of a
    /// group whose failure `retryable` accepts on their next node, up to
    /// `max(replicas, 2)` nodes per item. Answers in item order, with the
    /// node that answered each item; items that found no node carry their
    /// last error.
    async fn route<'k, R, F, Fut>(
        &self,
        topo: &Topology,
        count: usize,
        key: impl Fn(usize) -> &'k str + Copy,
        retryable: fn(&CallError) -> bool,
        send: F,
    ) -> Routed<R>
    where
        R: KeyResult,
        F: Fn(usize, Vec<usize>) -> Fut,
        Fut: Future<Output = (usize, Vec<usize>, Result<Vec<R>, CallError>)>,
    {
        let k = prefix_len(topo, self.replicas);
        let mut routed = Routing {
            results: (0..count).map(|_| None).collect(),
            served_by: vec![None; count],
            prefs: (0..count).map(|i| topo.ring.owners(key(i), k)).collect(),
            failed: vec![false; topo.nodes.len()],
        };
        if topo.nodes.iter().any(|n| n.read_fenced()) {
            for pref in &mut routed.prefs {
                fence_order(topo, pref, self.replicas);
            }
        }
        if topo.nodes.is_empty() {
            let e = no_nodes_error();
            return routed.finish_with(|_| e.clone());
        }
        let mut last_error: Vec<Option<KeyError>> = vec![None; count];
        let mut pending: Vec<usize> = (0..count).collect();
        let attempts = self.replicas.max(2).min(topo.nodes.len());
        for attempt in 0..attempts {
            let groups = group(topo, &mut pending, key, &mut routed.prefs, &routed.failed);
            let calls = groups.into_iter().map(|(n, items)| send(n, items));
            for (n, items, result) in join_all(calls).await {
                let node = &topo.nodes[n];
                let result = result.and_then(|answers| {
                    if answers.len() == items.len() {
                        Ok(answers)
                    } else {
                        Err(CallError::Refused(Status::internal(format!(
                            "answered {} results for {} items",
                            answers.len(),
                            items.len()
                        ))))
                    }
                });
                match result {
                    Ok(answers) => {
                        for (item, answer) in items.into_iter().zip(answers) {
                            routed.results[item] = Some(answer);
                            routed.served_by[item] = Some(n);
                        }
                    }
                    Err(error) if retryable(&error) && attempt + 1 < attempts => {
                        routed.failed[n] = true;
                        let e = call_error(node, &error);
                        for &item in &items {
                            last_error[item] = Some(e.clone());
                        }
                        pending.extend(items);
                    }
                    Err(error) => {
                        let e = call_error(node, &error);
                        for item in items {
                            routed.results[item] = Some(R::failed(e.clone()));
                        }
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        let unanswered = no_nodes_error();
        routed.finish_with(|i| last_error[i].clone().unwrap_or_else(|| unanswered.clone()))
    }

    /// Reads `keys`, answering each in order: hot keys from the near
    /// cache while it holds a fresh answer (relief), the others from the
    /// nodes.
    async fn read(&self, keys: &[String], deadline: Option<Instant>) -> Vec<GetResult> {
        for k in keys {
            self.hot.record(k, Access::Read);
        }
        // No hot key, no relief: one atomic load on the common path.
        match &self.relief {
            Some(relief) if self.hot.any_hot() => self.read_relieved(relief, keys, deadline).await,
            _ => self.read_nodes(keys, deadline).await,
        }
    }

    /// [`Router::read`] with relief: answers what the near cache holds,
    /// reads the rest from the nodes, and keeps the nodes' answers for hot
    /// keys.
    async fn read_relieved(
        &self,
        relief: &Relief,
        keys: &[String],
        deadline: Option<Instant>,
    ) -> Vec<GetResult> {
        let near = &*relief.near;
        let now = Instant::now();
        let topology = relief.fed.then(|| self.cluster.topology());
        // With feeds, a key whose changes this orchestrator might not see
        // is neither answered from nor kept in the near cache.
        let allowed = |k: &str| topology.as_ref().is_none_or(|t| self.relievable(t, k));
        let mut results: Vec<Option<GetResult>> = Vec::with_capacity(keys.len());
        let mut fills = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if !allowed(k) {
                results.push(None);
                continue;
            }
            let cached = near.get(k, now);
            if cached.is_none() && self.hot.is_hot_now(k) {
                // Taken before the nodes are asked: see `NearCache::fill`.
                fills.push((i, near.ticket(k)));
            }
            results.push(cached.map(|a| relieved_result(a, now)));
        }
        let relieved = results.iter().filter(|r| r.is_some()).count();
        if relieved > 0 {
            if let Some(c) = &relief.relieved {
                c.inc_by(relieved as u64);
            }
            if let Some(span) = sampled_span() {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                span.set_attribute("ringcache.relieved_keys", relieved as i64);
            }
        }
        if relieved == keys.len() {
            return results.into_iter().flatten().collect();
        }
        let fetched = if relieved == 0 {
            self.read_nodes(keys, deadline).await
        } else {
            let missing: Vec<String> = keys
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            self.read_nodes(&missing, deadline).await
        };
        let mut fetched = fetched.into_iter();
        let mut out: Vec<GetResult> = results
            .into_iter()
            .map(|r| {
                r.or_else(|| fetched.next()).unwrap_or_else(|| {
                    GetResult::failed(KeyError {
                        code: Code::Internal as i32,
                        message: "the nodes' answers were fewer than the keys read (a bug in the orchestrator)".to_owned(),
                    })
                })
            })
            .collect();
        let now = Instant::now();
        for (i, ticket) in fills {
            let r = &mut out[i];
            if r.error.is_none() {
                near.fill(&keys[i], ticket, near_answer(r, now), now);
            }
        }
        out
    }

    /// Reads `keys` from the nodes, answering each in order.
    async fn read_nodes(&self, keys: &[String], deadline: Option<Instant>) -> Vec<GetResult> {
        let topology = self.cluster.topology();
        let topo = &*topology;
        let parent = sampled_span();
        let hedging = self.hedging.as_deref().filter(|_| self.replicas >= 2);
        if let Some(h) = hedging {
            h.reading(keys.len());
        }
        let send = |n: usize, items: Vec<usize>| {
            let ops = get_ops(keys, &items);
            let parent = parent.clone();
            async move {
                let result = match hedging {
                    Some(h) => {
                        self.read_hedged(topo, n, keys, &items, ops, deadline, parent, h)
                            .await
                    }
                    None => {
                        let node = &topo.nodes[n];
                        node.client
                            .call(ops, deadline, parent)
                            .await
                            .map(|results| get_results(node, results))
                    }
                };
                (n, items, result)
            }
        };
        // Any failure that blames the node: the next owner may answer.
        let mut routed = self
            .route(
                topo,
                keys.len(),
                |i| keys[i].as_str(),
                CallError::is_node_fault,
                send,
            )
            .await;
        // A node that joined or restarted may not have the keys yet: answer
        // its misses from their other holders (warm handoff).
        if self.cluster.handoff_active() {
            handoff::read_through(
                &self.cluster,
                topo,
                keys,
                &mut routed.results,
                &routed.served_by,
                deadline,
            )
            .await;
        }
        routed.results
    }

    /// Reads `items` of `keys` from node `n`, hedged: if `n` has not
    /// answered within the hedge delay, each key is also read from its next
    /// usable owner (budget permitting), and each key takes the first
    /// answer. Fails only if `n` fails and the hedges did not answer every
    /// key (the caller then tries the next node, as for any read).
    #[allow(clippy::too_many_arguments)]
    async fn read_hedged(
        &self,
        topo: &Topology,
        n: usize,
        keys: &[String],
        items: &[usize],
        ops: Vec<Op>,
        deadline: Option<Instant>,
        parent: Option<tracing::Span>,
        hedging: &Hedging,
    ) -> Result<Vec<GetResult>, CallError> {
        let node = &topo.nodes[n];
        let started = Instant::now();
        let primary = node.client.call(ops, deadline, parent.clone());
        tokio::pin!(primary);
        let answered = |result: Result<Vec<OpResult>, CallError>| {
            if result.is_ok() {
                hedging.answered(started.elapsed());
            }
            result.map(|results| get_results(node, results))
        };
        if let Ok(result) = tokio::time::timeout(hedging.delay(), &mut primary).await {
            return answered(result);
        }
        // Each key's next usable owner, as positions in `items` by node.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (pos, &item) in items.iter().enumerate() {
            let key = keys[item].as_str();
            let next = topo
                .ring
                .owners(key, self.replicas)
                .iter()
                .copied()
                .find(|&j| j != n && topo.nodes[j].usable_for(key) && !topo.nodes[j].read_fenced());
            if let Some(j) = next {
                groups.entry(j).or_default().push(pos);
            }
        }
        let hedged: usize = groups.values().map(Vec::len).sum();
        if hedged == 0 || !hedging.try_hedge(hedged) {
            return answered(primary.await);
        }
        if let Some(span) = &parent {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.set_attribute("ringcache.hedged_keys", hedged as i64);
        }
        let mut hedges: FuturesUnordered<_> = groups
            .into_iter()
            .map(|(j, positions)| {
                let other = &topo.nodes[j];
                let ops = positions.iter().map(|&p| get_op(&keys[items[p]])).collect();
                let call = other.client.call(ops, deadline, parent.clone());
                async move {
                    let result = call.await.map(|results| get_results(other, results));
                    (positions, result)
                }
            })
            .collect();
        let mut answers: Vec<Option<GetResult>> = vec![None; items.len()];
        let mut missing = items.len();
        let mut won = 0;
        let mut primary_error = None;
        loop {
            tokio::select! {
                result = &mut primary, if primary_error.is_none() => match result {
                    Ok(results) => {
                        hedging.won(won);
                        return answered(Ok(results));
                    }
                    Err(e) => primary_error = Some(e),
                },
                Some((positions, result)) = hedges.next(), if !hedges.is_empty() => {
                    if let Ok(results) = result
                        && results.len() == positions.len()
                    {
                        for (p, r) in positions.into_iter().zip(results) {
                            if answers[p].is_none() {
                                answers[p] = Some(r);
                                missing -= 1;
                                won += 1;
                            }
                        }
                    }
                    if missing == 0 {
                        hedging.won(won);
                        return Ok(answers.into_iter().flatten().collect());
                    }
                }
                else => break,
            }
        }
        hedging.won(won);
        Err(primary_error.unwrap_or_else(|| {
            CallError::Lost("neither the node nor its hedges answered".to_owned())
        }))
    }

    /// Nodes that held `key` under the previous membership and no longer
    /// own it, during the handoff window: they get no more writes, so every
    /// write or delete of `key` deletes it there (a read that misses on the
    /// new owner may read through to them).
    fn shadows(&self, topo: &Topology, key: &str) -> Vec<Arc<Node>> {
        let Some(previous) = self.cluster.previous() else {
            return Vec::new();
        };
        let now: Preference = topo.ring.owners(key, self.replicas);
        previous
            .topology
            .ring
            .owners(key, self.replicas)
            .iter()
            .map(|&i| &previous.topology.nodes[i])
            .filter(|n| !now.iter().any(|&c| topo.nodes[c].id == n.id))
            .cloned()
            .collect()
    }

    /// Deletes `keys` on their shadows ([`Router::shadows`]); a shadow that
    /// cannot be reached has them recorded for invalidation.
    async fn delete_on_shadows<'k>(
        &self,
        topo: &Topology,
        keys: impl Iterator<Item = &'k str>,
        deadline: Option<Instant>,
    ) {
        let mut by_node: HashMap<&str, (Arc<Node>, Vec<String>)> = HashMap::new();
        let shadows: Vec<(String, Vec<Arc<Node>>)> = keys
            .map(|k| (k.to_owned(), self.shadows(topo, k)))
            .filter(|(_, s)| !s.is_empty())
            .collect();
        for (key, nodes) in &shadows {
            for node in nodes {
                by_node
                    .entry(&*node.id)
                    .or_insert_with(|| (node.clone(), Vec::new()))
                    .1
                    .push(key.clone());
            }
        }
        let calls = by_node.into_values().map(|(node, keys)| async move {
            self.cluster.delete_or_record(&node, keys, deadline).await;
        });
        join_all(calls).await;
    }

    /// Runs `ops` on `node` and answers them as writes.
    async fn send_writes(
        node: &Node,
        ops: Vec<Op>,
        deadline: Option<Instant>,
        parent: Option<tracing::Span>,
    ) -> Result<Vec<SetResult>, CallError> {
        let results = node.client.call(ops, deadline, parent).await?;
        Ok(results.into_iter().map(|r| set_result(node, r)).collect())
    }

    /// Writes `entries`: each to its primary with its condition, then to
    /// the other owners with the primary's version.
    async fn write(&self, entries: &[SetRequest], deadline: Option<Instant>) -> Vec<SetResult> {
        let topology = self.cluster.topology();
        let topo = &*topology;
        let parent = sampled_span();
        // While it runs, a copy of these keys (warm handoff) must not keep
        // what it read before.
        let _writing: Vec<_> = entries.iter().map(|e| self.writing(&e.key)).collect();
        // Phase 1: primaries. A batch of unconditional writes is retried on
        // the next node after any failure that blames the node: writing the
        // same value again is harmless whether or not the first node
        // applied it. A batch with conditions is retried only when the
        // call provably never reached the node: otherwise the condition
        // may already have been consumed there.
        let unconditional = entries.iter().all(|e| {
            matches!(
                e.condition,
                None | Some(
                    set_request::Condition::IfAbsent(false)
                        | set_request::Condition::IfPresent(false)
                )
            )
        });
        let retryable: fn(&CallError) -> bool = if unconditional {
            CallError::is_node_fault
        } else {
            |e| e.is_node_fault() && !e.may_have_applied()
        };
        // Each entry's owners: a write that lands elsewhere (its owners
        // are away) is a stand-in, kept only --failover-ttl.
        let owners: Vec<Preference> = entries
            .iter()
            .map(|e| topo.ring.owners(&e.key, self.replicas))
            .collect();
        let send = |n: usize, items: Vec<usize>| {
            let ops = items
                .iter()
                .map(|&i| {
                    let mut entry = entries[i].clone();
                    if !owners[i].contains(&n) {
                        entry.ttl = Some(self.stand_in_ttl(entry.ttl.as_ref()));
                    }
                    Op {
                        op: Some(op::Op::Set(entry)),
                    }
                })
                .collect();
            let parent = parent.clone();
            async move {
                let result = Self::send_writes(&topo.nodes[n], ops, deadline, parent).await;
                (n, items, result)
            }
        };
        let routed = self
            .route(
                topo,
                entries.len(),
                |i| entries[i].key.as_str(),
                retryable,
                send,
            )
            .await;
        let missed = self
            .replicate(topo, entries, &owners, &routed, deadline, parent)
            .await;
        let mut results = routed.results;
        for (r, m) in results.iter_mut().zip(missed) {
            r.missed = m;
        }
        results
    }

    /// After the primaries stored `entries` (as `routed` says): copies to
    /// the other owners with the primary's version, records stand-ins and
    /// owners that missed the write for invalidation, and deletes the keys
    /// on their previous owners during a handoff window. Answers, entry by
    /// entry, the identities of the owners that missed the write.
    async fn replicate(
        &self,
        topo: &Topology,
        entries: &[SetRequest],
        owners: &[Preference],
        routed: &Routed<SetResult>,
        deadline: Option<Instant>,
        parent: Option<tracing::Span>,
    ) -> Vec<Vec<String>> {
        let mut missed = vec![Vec::new(); entries.len()];
        // Phase 2: replicas, with the primary's version. `holders`: the
        // replicas that stored each key's copy.
        let mut holders: HashMap<String, Vec<usize>> = HashMap::new();
        {
            let mut copies: BTreeMap<usize, Vec<Op>> = BTreeMap::new();
            for (i, entry) in entries.iter().enumerate() {
                let (
                    Some(p),
                    SetResult {
                        stored: true,
                        version,
                        ..
                    },
                ) = (routed.served_by[i], &routed.results[i])
                else {
                    continue;
                };
                let mut targets: Vec<usize> = usable_owners(
                    topo,
                    &entry.key,
                    &routed.prefs[i],
                    &routed.failed,
                    self.replicas + 1,
                )
                .into_iter()
                .filter(|&n| n != p)
                .take(self.replicas - 1)
                .collect();
                // Owners this orchestrator still holds ejected that answer
                // their checks: another orchestrator may read from them
                // already, so they get the copy too.
                let answering: Vec<usize> = owners[i]
                    .iter()
                    .copied()
                    .filter(|&o| {
                        o != p
                            && !targets.contains(&o)
                            && !routed.failed[o]
                            && topo.nodes[o].writable_while_ejected(&entry.key)
                    })
                    .collect();
                targets.extend(answering);
                for n in targets {
                    let ttl = if owners[i].contains(&n) {
                        entry.ttl
                    } else {
                        Some(self.stand_in_ttl(entry.ttl.as_ref()))
                    };
                    copies.entry(n).or_default().push(Op {
                        op: Some(op::Op::Copy(CopyRequest {
                            key: entry.key.clone(),
                            value: entry.value.clone(),
                            ttl,
                            version: *version,
                            ..Default::default()
                        })),
                    });
                }
            }
            let calls = copies.into_iter().map(|(n, ops)| {
                let parent = parent.clone();
                async move {
                    let node = &topo.nodes[n];
                    let keys: Vec<String> = ops
                        .iter()
                        .filter_map(|op| match &op.op {
                            Some(op::Op::Copy(c)) => Some(c.key.clone()),
                            _ => None,
                        })
                        .collect();
                    (n, keys, node.client.call(ops, deadline, parent).await)
                }
            });
            for (n, keys, result) in join_all(calls).await {
                match result {
                    Ok(results) => {
                        for (key, r) in keys.into_iter().zip(results) {
                            if matches!(r.result, Some(op_result::Result::Copy(_))) {
                                holders.entry(key).or_default().push(n);
                            }
                        }
                    }
                    Err(error) => self.cluster.replica_failed(&topo.nodes[n], &error),
                }
            }
        }

        // Owners that did not get a write may hold an older value: record
        // the key against them — here, and on the primary that took the
        // write (a debt, which outlives this orchestrator) — so they do
        // not serve it until it has been deleted there. Nodes that took
        // it for its owners (stand-ins) are recorded too: once the owners
        // are back, they must drop it.
        let mut debts = Debts::default();
        for (i, entry) in entries.iter().enumerate() {
            let (Some(p), true) = (routed.served_by[i], routed.results[i].stored) else {
                continue;
            };
            let got = holders.get(entry.key.as_str());
            for &n in std::iter::once(&p).chain(got.into_iter().flatten()) {
                if !owners[i].contains(&n) {
                    topo.nodes[n].stand_ins.record(&entry.key);
                }
            }
            for &o in &owners[i] {
                if o != p && !got.is_some_and(|g| g.contains(&o)) {
                    self.cluster.invalidate_later(&topo.nodes[o], &entry.key);
                    debts.add(p, &entry.key, &topo.nodes[o]);
                    missed[i].push(topo.nodes[o].id.to_string());
                }
            }
        }
        self.record_debts(topo, debts, deadline).await;
        if self.cluster.previous().is_some() {
            let written = entries
                .iter()
                .zip(&routed.results)
                .filter(|(_, r)| r.stored)
                .map(|(e, _)| e.key.as_str());
            self.delete_on_shadows(topo, written, deadline).await;
        }
        missed
    }

    /// Runs `op` on `key`'s primary ([`Router::on_primary`]: applied once),
    /// reads its answer with `answer` (`None`: not the kind expected), and
    /// copies what the primary stored, if anything, to the other owners.
    /// Answers the reply and the owners that missed the change.
    async fn once_then_copied<T>(
        &self,
        key: &str,
        op: op::Op,
        deadline: Option<Instant>,
        answer: impl FnOnce(op_result::Result) -> Option<(T, Option<Stored>)>,
    ) -> Result<(T, Vec<String>), Status> {
        let _writing = self.writing(key);
        let topology = self.cluster.topology();
        let topo = &*topology;
        let kind = match &op {
            op::Op::Increment(_) => "increment",
            op::Op::Touch(_) => "touch",
            _ => "op",
        };
        let (n, result) = self
            .on_primary(topo, key, op, deadline)
            .await
            .map_err(status_of)?;
        let Some((reply, stored)) = result.clone().and_then(answer) else {
            return Err(status_of(op_error(&topo.nodes[n], result, kind)));
        };
        if let Some(stored) = stored {
            let entry = SetRequest {
                key: key.to_owned(),
                value: stored.value,
                ttl: stored.ttl,
                condition: None,
            };
            let missed = self
                .replicate_one(topo, &entry, n, stored.version, deadline)
                .await;
            return Ok((reply, missed));
        }
        Ok((reply, Vec::new()))
    }

    /// [`Router::replicate`] for one entry that node `n` stored with
    /// `version` (the result of an increment or a touch).
    async fn replicate_one(
        &self,
        topo: &Topology,
        entry: &SetRequest,
        n: usize,
        version: u64,
        deadline: Option<Instant>,
    ) -> Vec<String> {
        let owners = vec![topo.ring.owners(&entry.key, self.replicas)];
        let routed = Routed {
            results: vec![SetResult {
                stored: true,
                version,
                error: None,
                missed: Vec::new(),
            }],
            served_by: vec![Some(n)],
            prefs: vec![
                topo.ring
                    .owners(&entry.key, prefix_len(topo, self.replicas)),
            ],
            failed: vec![false; topo.nodes.len()],
        };
        self.replicate(
            topo,
            std::slice::from_ref(entry),
            &owners,
            &routed,
            deadline,
            sampled_span(),
        )
        .await
        .pop()
        .unwrap_or_default()
    }

    /// Deletes `key` on every usable owner (or, with none, the node
    /// standing in), on nodes holding a stand-in copy and on its previous
    /// owners; owners it cannot reach are recorded for invalidation. When
    /// no owner answers, each through a node fault, the next node takes
    /// the delete (and the owners' debt). True if a node removed a live
    /// value; an error only if no owner nor that next node could be
    /// reached. Answers the owners the delete missed too.
    async fn remove(
        &self,
        key: &str,
        deadline: Option<Instant>,
    ) -> Result<(bool, Vec<String>), KeyError> {
        let topo = self.cluster.topology();
        let pref = topo.ring.preference(key);
        let none_failed = vec![false; topo.nodes.len()];
        let owners: Preference = pref.iter().copied().take(self.replicas).collect();
        let mut targets = usable_owners(&topo, key, &owners, &none_failed, self.replicas);
        if targets.is_empty() {
            targets.extend(choose(&topo, key, &pref, &none_failed));
        }
        if targets.is_empty() {
            return Err(no_nodes_error());
        }
        // Owners this orchestrator still holds ejected that answer their
        // checks: another orchestrator may read from them already.
        for &o in &owners {
            if !targets.contains(&o) && topo.nodes[o].writable_while_ejected(key) {
                targets.push(o);
            }
        }
        // Nodes holding a stand-in copy (written while the owners were
        // away) get the delete too: they serve the key if the owners fail.
        let owner_targets = targets.len();
        for (n, node) in topo.nodes.iter().enumerate() {
            if !targets.contains(&n) && node.routable() && node.stand_ins.contains(key) {
                targets.push(n);
            }
        }
        let parent = sampled_span();
        let calls = targets.iter().map(|&n| {
            topo.nodes[n]
                .client
                .call(vec![delete_op(key.to_owned())], deadline, parent.clone())
        });
        let mut deleted = false;
        let mut first_error = None;
        let mut any_ok = false;
        let mut faults_only = true;
        let mut reached: Preference = Preference::new();
        let mut missed_stand_ins = Vec::new();
        for (t, (&n, result)) in targets.iter().zip(join_all(calls).await).enumerate() {
            let node = &topo.nodes[n];
            if t >= owner_targets {
                // A stand-in: not part of the answer; if it missed the
                // delete, it must not serve the key until deleted there.
                if result.is_err() {
                    self.cluster.invalidate_later(node, key);
                    missed_stand_ins.push(n);
                }
                continue;
            }
            if result.is_ok() {
                reached.push(n);
            }
            let answer = result
                .map_err(|e| {
                    faults_only &= e.is_node_fault();
                    call_error(node, &e)
                })
                .and_then(|mut results| match results.pop().and_then(|r| r.result) {
                    Some(op_result::Result::Delete(d)) => Ok(d.deleted),
                    other => Err(op_error(node, other, "delete")),
                });
            match answer {
                Ok(d) => {
                    any_ok = true;
                    deleted |= d;
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        // No owner answered, each through a fault of its own (it is
        // restarting, say, and not ejected yet): as an unconditional write
        // does, the delete goes to the next node instead — a delete may run
        // twice — which then holds the owners' debt (below), so they drop
        // the key before they serve it again.
        if !any_ok && faults_only && first_error.is_some() {
            let mut failed = vec![false; topo.nodes.len()];
            for &t in &targets {
                failed[t] = true;
            }
            if let Some(n) = choose(&topo, key, &pref, &failed) {
                let node = &topo.nodes[n];
                let answer = node
                    .client
                    .call(vec![delete_op(key.to_owned())], deadline, parent.clone())
                    .await;
                if let Ok(Some(op_result::Result::Delete(d))) =
                    answer.map(|mut r| r.pop().and_then(|r| r.result))
                {
                    any_ok = true;
                    deleted |= d.deleted;
                    reached.push(n);
                }
            }
        }
        // Owners the delete did not reach may still hold the key: record it
        // against them — here, and as a debt on a node the delete reached —
        // so they do not serve it until it is deleted there.
        let mut debts = Debts::default();
        let mut missed = Vec::new();
        for &o in &owners {
            if !reached.contains(&o) {
                self.cluster.invalidate_later(&topo.nodes[o], key);
                missed.push(topo.nodes[o].id.to_string());
                if let Some(&holder) = reached.first() {
                    debts.add(holder, key, &topo.nodes[o]);
                }
            }
        }
        for &n in &missed_stand_ins {
            if let Some(&holder) = reached.first() {
                debts.add(holder, key, &topo.nodes[n]);
            }
        }
        self.record_debts(&topo, debts, deadline).await;
        self.delete_on_shadows(&topo, std::iter::once(key), deadline)
            .await;
        match (any_ok, first_error) {
            (false, Some(error)) => Err(error),
            _ => Ok((deleted, missed)),
        }
    }

    /// A compare-and-delete on the key's primary (the first usable owner).
    async fn delete_if(
        &self,
        req: &DeleteRequest,
        deadline: Option<Instant>,
    ) -> Result<DeleteResponse, KeyError> {
        let topo = self.cluster.topology();
        let op = op::Op::Delete(req.clone());
        let (n, answer) = self.on_primary(&topo, &req.key, op, deadline).await?;
        match answer {
            Some(op_result::Result::Delete(d)) => Ok(d),
            other => Err(op_error(&topo.nodes[n], other, "delete")),
        }
    }

    /// Runs `op` on the key's primary (the first usable owner). An op that
    /// must happen once (a conditional delete, an increment) moves to the
    /// next node only when the call provably never reached the first
    /// (otherwise it may have been applied); a touch after any node fault.
    /// Answers which node ran it.
    async fn on_primary(
        &self,
        topo: &Topology,
        key: &str,
        op: op::Op,
        deadline: Option<Instant>,
    ) -> Result<(usize, Option<op_result::Result>), KeyError> {
        // A touch may run twice (it sets the same TTL again): it moves on
        // after any node fault, as an unconditional write does.
        let retryable: fn(&CallError) -> bool = match op {
            op::Op::Touch(_) => CallError::is_node_fault,
            _ => |e| e.is_node_fault() && !e.may_have_applied(),
        };
        let mut pref = topo.ring.owners(key, prefix_len(topo, self.replicas));
        // The op runs on what the primary holds (a touch answers its value,
        // an increment adds to it): not on a fenced owner's.
        fence_order(topo, &mut pref, self.replicas);
        let mut failed = vec![false; topo.nodes.len()];
        let mut last = no_nodes_error();
        for _ in 0..self.replicas.max(2) {
            let Some(n) = target(topo, key, &mut pref, &failed) else {
                break;
            };
            let node = &topo.nodes[n];
            let call = Op {
                op: Some(op.clone()),
            };
            match node.client.call(vec![call], deadline, sampled_span()).await {
                Ok(mut results) => return Ok((n, results.pop().and_then(|r| r.result))),
                Err(e) if retryable(&e) => {
                    failed[n] = true;
                    last = call_error(node, &e);
                }
                Err(e) => return Err(call_error(node, &e)),
            }
        }
        Err(last)
    }

    /// Records `debts` on the nodes holding them (`Owe` ops), before the
    /// client is answered: whichever orchestrator later brings the owners
    /// back reads them there. A holder that cannot be reached leaves the
    /// debt in this orchestrator's record alone (counted).
    async fn record_debts(&self, topo: &Topology, debts: Debts, deadline: Option<Instant>) {
        if debts.by_holder.is_empty() {
            return;
        }
        let calls = debts.by_holder.into_iter().map(|(holder, owes)| async move {
            let node = &topo.nodes[holder];
            let ops = owes
                .into_iter()
                .map(|(key, owners)| Op {
                    op: Some(op::Op::Owe(OweRequest { key, owners })),
                })
                .collect();
            if let Err(error) = node.client.call(ops, deadline, None).await {
                tracing::warn!(holder = %node.id, %error, "cannot record on a node that others missed a change; only this orchestrator knows");
                self.cluster.debt_not_recorded(node);
            }
        });
        join_all(calls).await;
    }

    /// The TTL of a stand-in copy: the write's own, capped at
    /// `--failover-ttl`. A node that is not among a key's owners holds it
    /// only while they are away; when they return it is not updated, so
    /// its copy must not outlive the failover by much.
    fn stand_in_ttl(&self, ttl: Option<&prost_types::Duration>) -> prost_types::Duration {
        let cap = to_proto_duration(self.failover_ttl);
        match ttl {
            Some(t) if (t.seconds, t.nanos) < (cap.seconds, cap.nanos) => *t,
            _ => cap,
        }
    }

    fn node_info(&self, topo: &Topology, index: usize) -> NodeInfo {
        let node = &topo.nodes[index];
        let (state, failures) = node.health();
        NodeInfo {
            id: node.id.to_string(),
            address: node.address.clone(),
            state: match state {
                State::Unknown => NodeState::Unknown,
                State::Healthy => NodeState::Healthy,
                State::Ejected { .. } if !node.answered() => NodeState::NeverReached,
                State::Ejected { .. } => NodeState::Ejected,
            } as i32,
            key_share: topo.shares.get(index).copied().unwrap_or(0.0),
            consecutive_failures: failures,
            warming: node.warmth.warming(),
            node_id: node.reported_id().unwrap_or_default(),
            // Fenced reads go to the other owners: so should a client's.
            reads_through: node.warmth.reads_through(Instant::now()) || node.read_fenced(),
        }
    }

    /// What `Cluster/WatchTopology` reports now (its revision left 0).
    fn topology_message(&self) -> TopologyMessage {
        let topo = self.cluster.topology();
        TopologyMessage {
            epoch: format!("{:016x}", topo.epoch),
            replicas: u32::try_from(self.replicas).unwrap_or(u32::MAX),
            placement_version: crate::ring::PLACEMENT_VERSION,
            nodes: (0..topo.nodes.len())
                .map(|i| NodeInfo {
                    // Counts that move with every call would make a message
                    // of every failure: watchers get states, not counts.
                    consecutive_failures: 0,
                    ..self.node_info(&topo, i)
                })
                .collect(),
            handoff: self.cluster.previous().is_some(),
            revision: 0,
        }
    }
}

/// How often a `WatchTopology` stream looks again without being woken:
/// what changes with time alone (a read-through window ending) is seen
/// within it.
const TOPOLOGY_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// The `WatchTopology` response stream.
pub type TopologyStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<TopologyMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Cache for Router {
    type PipelineStream = PipelineStream;

    /// Each op runs through the unary handler below, so it takes the same
    /// route as its unary call (see `ringcache_common::pipeline`).
    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        self.pipelines.serve(self.clone(), request)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let deadline = deadline(&request);
        let call_bytes = request.extensions().get::<CallBytes>().cloned();
        let req = request.into_inner();
        self.limits.check_key(|| "key".to_owned(), &req.key)?;
        let held = HeldAnswer::reserve(call_bytes.as_ref(), &self.answers, 1)?;
        let mut results = self.read(std::slice::from_ref(&req.key), deadline).await;
        let r = results.pop().ok_or_else(|| missing_result("Get"))?;
        held.settle(&self.answers, 1, (r.value.len() + RESULT_FRAMING) as u64);
        if let Some(error) = r.error {
            return Err(status_of(error));
        }
        Ok(Response::new(GetResponse {
            found: r.found,
            value: r.value,
            version: r.version,
            ttl: r.ttl,
        }))
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_set("", &req)?;
        let mut results = self.write(std::slice::from_ref(&req), deadline).await;
        let r = results.pop().ok_or_else(|| missing_result("Set"))?;
        if let Some(error) = r.error {
            return Err(status_of(error));
        }
        Ok(Response::new(SetResponse {
            stored: r.stored,
            version: r.version,
            missed: r.missed,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_key(|| "key".to_owned(), &req.key)?;
        let _deleting = self.writing(&req.key);
        if req.if_version != 0 {
            // Compare-and-delete: decided by the primary alone; the other
            // copies follow only if it deleted.
            let answer = self.delete_if(&req, deadline).await.map_err(status_of)?;
            if !answer.deleted {
                return Ok(Response::new(answer));
            }
        }
        let (deleted, missed) = self.remove(&req.key, deadline).await.map_err(status_of)?;
        Ok(Response::new(DeleteResponse {
            deleted: deleted || req.if_version != 0,
            version: 0,
            missed,
        }))
    }

    async fn increment(
        &self,
        request: Request<IncrementRequest>,
    ) -> Result<Response<IncrementResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_key_ttl(&req.key, req.ttl.as_ref())?;
        // Applied once (it would count twice), then copied as a write.
        let (mut counted, missed) = self
            .once_then_copied(
                &req.key,
                op::Op::Increment(req.clone()),
                deadline,
                |r| match r {
                    op_result::Result::Increment(r) => {
                        let stored = Stored {
                            value: r.value.to_string().into_bytes().into(),
                            ttl: r.ttl,
                            version: r.version,
                        };
                        Some((r, Some(stored)))
                    }
                    _ => None,
                },
            )
            .await?;
        counted.missed = missed;
        Ok(Response::new(counted))
    }

    async fn touch(
        &self,
        request: Request<TouchRequest>,
    ) -> Result<Response<TouchResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_key_ttl(&req.key, req.ttl.as_ref())?;
        // The primary answers the value too, so the new TTL and version
        // can be copied to the other owners as a write.
        let (mut touched, missed) = self
            .once_then_copied(
                &req.key,
                op::Op::Touch(req.clone()),
                deadline,
                |r| match r {
                    op_result::Result::Touch(t) => {
                        let stored = t.found.then(|| Stored {
                            value: t.value.clone(),
                            ttl: t.ttl,
                            version: t.version,
                        });
                        Some((t, stored))
                    }
                    _ => None,
                },
            )
            .await?;
        if !req.return_value {
            touched.value = bytes::Bytes::new();
        }
        touched.missed = missed;
        Ok(Response::new(touched))
    }

    async fn exists(
        &self,
        request: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_keys(&req.keys)?;
        // Read as GetMany (with its fallback and handoff); the values stay
        // here.
        let results = self
            .read(&req.keys, deadline)
            .await
            .into_iter()
            .map(|r| KeyInfo {
                found: r.found,
                version: r.version,
                ttl: r.ttl,
                value_bytes: r.value.len() as u64,
                error: r.error,
            })
            .collect();
        Ok(Response::new(ExistsResponse { results }))
    }

    async fn delete_many(
        &self,
        request: Request<DeleteManyRequest>,
    ) -> Result<Response<DeleteManyResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_keys(&req.keys)?;
        let _deleting: Vec<_> = req.keys.iter().map(|k| self.writing(k)).collect();
        // Each key as a delete of its own, all at once: the per-node
        // coalescing turns them into one call per node.
        let results = join_all(req.keys.iter().map(|k| self.remove(k, deadline)))
            .await
            .into_iter()
            .map(|r| match r {
                Ok((deleted, missed)) => DeleteResult {
                    deleted,
                    error: None,
                    missed,
                },
                Err(error) => DeleteResult {
                    deleted: false,
                    error: Some(error),
                    missed: Vec::new(),
                },
            })
            .collect();
        Ok(Response::new(DeleteManyResponse { results }))
    }

    async fn get_many(
        &self,
        request: Request<GetManyRequest>,
    ) -> Result<Response<GetManyResponse>, Status> {
        let deadline = deadline(&request);
        let call_bytes = request.extensions().get::<CallBytes>().cloned();
        let req = request.into_inner();
        self.limits.check_keys(&req.keys)?;
        // Held before the nodes are asked: refused here, not after the
        // answers have taken the memory.
        let held = HeldAnswer::reserve(call_bytes.as_ref(), &self.answers, req.keys.len())?;
        let results = self.read(&req.keys, deadline).await;
        let size: usize = results.iter().map(|r| r.value.len() + RESULT_FRAMING).sum();
        held.settle(&self.answers, req.keys.len(), size as u64);
        if size > self.max_message_bytes {
            return Err(ringcache_common::exhausted::too_large(
                format!(
                    "response would be about {size} bytes, over the {}-byte limit (--max-message-bytes); ask for fewer keys per call",
                    self.max_message_bytes
                ),
                self.max_message_bytes,
            ));
        }
        Ok(Response::new(GetManyResponse { results }))
    }

    async fn set_many(
        &self,
        request: Request<SetManyRequest>,
    ) -> Result<Response<SetManyResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        self.limits.check_entries(&req.entries)?;
        let results = self.write(&req.entries, deadline).await;
        Ok(Response::new(SetManyResponse { results }))
    }
}

#[tonic::async_trait]
impl ClusterApi for Router {
    type WatchTopologyStream = TopologyStream;

    /// One task per stream: it sends the topology when it differs from
    /// the last message, woken by the cluster's topology events or every
    /// [`TOPOLOGY_RECHECK`]; it ends when the client leaves, or with
    /// `UNAVAILABLE` when the orchestrator drains.
    async fn watch_topology(
        &self,
        _: Request<WatchTopologyRequest>,
    ) -> Result<Response<TopologyStream>, Status> {
        let router = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TopologyMessage, Status>>(1);
        tokio::spawn(async move {
            let mut events = router.cluster.topology_events();
            let closed = router.pipelines.closed();
            tokio::pin!(closed);
            let mut last: Option<TopologyMessage> = None;
            let mut revision = 0u64;
            loop {
                events.mark_unchanged();
                let now = router.topology_message();
                if last.as_ref() != Some(&now) {
                    revision += 1;
                    let message = TopologyMessage {
                        revision,
                        ..now.clone()
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = &mut closed => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the orchestrator is draining: watch the topology on another one",
                            )))
                            .await;
                        return;
                    }
                    _ = events.changed() => {}
                    () = tokio::time::sleep(TOPOLOGY_RECHECK) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let topo = self.cluster.topology();
        Ok(Response::new(ListNodesResponse {
            nodes: (0..topo.nodes.len())
                .map(|i| self.node_info(&topo, i))
                .collect(),
            replicas: u32::try_from(self.replicas).unwrap_or(u32::MAX),
            epoch: format!("{:016x}", topo.epoch),
        }))
    }

    async fn hot_keys(
        &self,
        request: Request<HotKeysRequest>,
    ) -> Result<Response<HotKeysResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 10,
            n => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(crate::hotkeys::SLOTS),
        };
        let topo = self.cluster.topology();
        let keys = self
            .hot
            .top(limit)
            .into_iter()
            .map(|k| HotKey {
                hot: self.hot.is_hot(&k),
                relieved: self.relief.is_some() && self.hot.is_hot_now(&k.key),
                owners: topo
                    .ring
                    .owners(&k.key, self.replicas)
                    .iter()
                    .map(|&i| topo.nodes[i].id.to_string())
                    .collect(),
                key: k.key,
                reads_per_second: k.reads_per_second,
                writes_per_second: k.writes_per_second,
                error_per_second: k.error_per_second,
            })
            .collect();
        Ok(Response::new(HotKeysResponse {
            keys,
            window: Some(to_proto_duration(self.hot.window())),
            threshold: self.hot.threshold(),
            relief_ttl: self
                .relief
                .as_ref()
                .map(|r| to_proto_duration(r.near.ttl())),
            relief_bytes: self.relief.as_ref().map_or(0, |r| r.near.bytes()),
        }))
    }

    async fn locate(
        &self,
        request: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let req = request.into_inner();
        self.limits.check_key(|| "key".to_owned(), &req.key)?;
        let topo = self.cluster.topology();
        let pref = topo.ring.preference(&req.key);
        let none_failed = vec![false; topo.nodes.len()];
        Ok(Response::new(LocateResponse {
            owners: pref
                .iter()
                .take(self.replicas)
                .map(|&i| self.node_info(&topo, i))
                .collect(),
            read_from: usable_owners(&topo, &req.key, &pref, &none_failed, 1)
                .first()
                .map(|&i| self.node_info(&topo, i)),
        }))
    }
}

#[cfg(test)]
mod tests;
