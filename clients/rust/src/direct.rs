//! Direct mode: reads sent straight to the key's first owner, writes
//! through the orchestrator.
//!
//! What a direct read needs to be as safe as a routed one, and where it
//! comes from:
//!
//! - **Where the key lives**: `Cluster/WatchTopology` on the orchestrator
//!   (nodes, states, epoch, replicas), placed with the orchestrator's own
//!   code (`ringcache-placement`). A key is read directly only from its
//!   first owner, and only while that node is healthy, not warming and not
//!   reading through, and no membership change is being handed off;
//!   otherwise the read goes through the orchestrator.
//! - **That the owner is not behind**: a write or delete that missed an
//!   owner is recorded as a debt on a node that took it (before the writer
//!   is answered) and published on that node's change feed (`OWED`); when
//!   an orchestrator has brought the owner up to date it settles the debt
//!   (`SETTLED`). This client follows every node's feed and lists the debts
//!   each holds when it starts following (and after a gap), and reads a key
//!   directly only while no debt of its owner for it is open — and only
//!   while the feeds of every node that is not ejected are in sync, so no
//!   debt can be on a feed it is not reading.
//! - **That the topology is current**: every direct read carries the epoch
//!   it was routed by; the node serves it only if that is the one epoch the
//!   orchestrators call it with now (`FAILED_PRECONDITION` otherwise). A
//!   stale epoch makes the client watch the topology again, at most once
//!   per [`REFRESH_COOL_DOWN`], and the read goes through the orchestrator.
//!
//! Any direct read that does not answer cleanly (refused, failed, lost, or
//! not answered within half of what is left of its deadline) is sent
//! through the orchestrator: a read may run twice.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prost::Message;
use ringcache_nearcache::NearCache;
use ringcache_placement::{NodeId, PLACEMENT_VERSION, Ring};
use ringcache_proto::{
    direct::{DIRECT_EPOCH_HEADER, STALE_EPOCH, format_epoch, parse_epoch},
    google::rpc::Status as RpcStatus,
    v1::{
        ChangeKind, ChangesRequest, DebtsRequest, NodeState, Topology, WatchTopologyRequest,
        cluster_client::ClusterClient, internal_client::InternalClient,
    },
};
use tokio::{task::JoinHandle, time::Instant};
use tonic::{
    Code,
    metadata::AsciiMetadataValue,
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt;

use crate::lane::Lane;

/// The least time between two topology refreshes asked for by stale-epoch
/// refusals: however many reads are refused at once, the orchestrator is
/// asked again once.
pub(crate) const REFRESH_COOL_DOWN: Duration = Duration::from_secs(1);

/// A feed silent this long is lost (nodes send a heartbeat every second).
const FEED_SILENCE: Duration = Duration::from_secs(3);

/// The most debt marks kept; beyond it an owner is skipped for every key
/// until its holders settle.
const MAX_MARKS: usize = 100_000;

/// How long a key this client's own write missed an owner of stays off
/// that owner before the debt is seen on a feed. The orchestrator records
/// the debt on a node before it answers the write, and a feed that does
/// not deliver it within this long has been silent past [`FEED_SILENCE`]
/// (lost, so no direct read is made at all).
const PROVISIONAL: Duration = Duration::from_secs(5);

/// Counts of where reads went (see [`crate::Client::direct_stats`]).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) direct: AtomicU64,
    pub(crate) routed: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) stale_epochs: AtomicU64,
    pub(crate) near_hits: AtomicU64,
    pub(crate) near_misses: AtomicU64,
}

/// How to reach nodes: the orchestrator's scheme and TLS, and the token.
#[derive(Debug, Clone)]
pub(crate) struct NodeAccess {
    pub(crate) https: bool,
    pub(crate) tls: Option<ClientTlsConfig>,
    pub(crate) connect_timeout: Duration,
    pub(crate) token: Option<AsciiMetadataValue>,
    /// Pipelines per node.
    pub(crate) pipelines: usize,
}

/// One node as the current topology has it.
#[derive(Debug)]
struct ViewNode {
    id: NodeId,
    address: String,
    /// Healthy, not warming, not reading through: its keys may be read
    /// from it directly.
    readable: bool,
    /// Not ejected: debts may be recorded on it, so its feed must be
    /// followed and in sync.
    followed: bool,
}

/// The topology, ready to route by.
#[derive(Debug)]
struct View {
    epoch: u64,
    epoch_value: AsciiMetadataValue,
    ring: Ring,
    /// Index-aligned with `ring.ids()`.
    nodes: Vec<ViewNode>,
    handoff: bool,
    replicas: usize,
}

impl View {
    fn of(topology: &Topology) -> Option<Self> {
        if topology.placement_version != PLACEMENT_VERSION {
            tracing::warn!(
                version = topology.placement_version,
                "the orchestrator places keys with a placement version this client does not know: reads go through it"
            );
            return None;
        }
        let epoch = parse_epoch(&topology.epoch)?;
        let ring = Ring::new(topology.nodes.iter().map(|n| NodeId::from(n.id.as_str())));
        let nodes = ring
            .ids()
            .iter()
            .map(|id| {
                let info = topology.nodes.iter().find(|n| n.id == **id);
                let state = info.map_or(NodeState::Unknown, |n| n.state());
                ViewNode {
                    id: id.clone(),
                    address: info.map(|n| n.address.clone()).unwrap_or_default(),
                    readable: info.is_some_and(|n| {
                        state == NodeState::Healthy && !n.warming && !n.reads_through
                    }),
                    followed: !matches!(state, NodeState::Ejected | NodeState::NeverReached),
                }
            })
            .collect();
        Some(Self {
            epoch,
            epoch_value: format_epoch(epoch).parse().ok()?,
            ring,
            nodes,
            handoff: topology.handoff,
            replicas: usize::try_from(topology.replicas).unwrap_or(usize::MAX),
        })
    }
}

/// Debts this client knows of: keys an owner may hold a stale value of,
/// each with the holder that recorded it and the record's sequence there.
#[derive(Debug, Default)]
struct Marks {
    owners: HashMap<NodeId, OwnerMarks>,
    keys: usize,
}

#[derive(Debug, Default)]
struct OwnerMarks {
    keys: HashMap<String, Vec<(NodeId, u64)>>,
    /// Every key of the owner may be stale (a holder's record overflowed,
    /// or more debts than were listed, or too many marks here).
    all: Vec<(NodeId, u64)>,
    /// Keys this client's own writes missed the owner of, until their
    /// debt shows on a feed (or [`PROVISIONAL`] passed).
    provisional: HashMap<String, Instant>,
    /// Too many of those: every key, until then.
    provisional_all: Option<Instant>,
}

impl Marks {
    fn owe(&mut self, owner: &str, key: Option<&str>, holder: &NodeId, sequence: u64) {
        let marks = self.owners.entry(NodeId::from(owner)).or_default();
        if let Some(key) = key {
            marks.provisional.remove(key);
        }
        match key {
            Some(key) if self.keys < MAX_MARKS => {
                marks
                    .keys
                    .entry(key.to_owned())
                    .or_default()
                    .push((holder.clone(), sequence));
                self.keys += 1;
            }
            _ => marks.all.push((holder.clone(), sequence)),
        }
    }

    /// This client's own write of `key` missed `owner` (the orchestrator
    /// said so): keep off it until the debt shows on a feed.
    fn missed(&mut self, owner: &str, key: &str, now: Instant) {
        let marks = self.owners.entry(NodeId::from(owner)).or_default();
        if marks.keys.contains_key(key) {
            // The debt came first, on a feed.
            return;
        }
        if marks.provisional.len() >= MAX_MARKS {
            marks
                .provisional
                .retain(|_, t| now.saturating_duration_since(*t) < PROVISIONAL);
        }
        if marks.provisional.len() < MAX_MARKS {
            marks.provisional.insert(key.to_owned(), now);
        } else {
            marks.provisional_all = Some(now + PROVISIONAL);
        }
    }

    /// The holder settled the owner's debts through `through`; true if an
    /// all-keys mark went (the holder's record must be listed again: it
    /// may hold more).
    fn settle(&mut self, owner: &str, holder: &str, through: u64) -> bool {
        let Some(marks) = self.owners.get_mut(owner) else {
            return false;
        };
        let settled = |(h, s): &(NodeId, u64)| &**h == holder && *s <= through;
        let mut removed = 0;
        marks.keys.retain(|_, holders| {
            let before = holders.len();
            holders.retain(|m| !settled(m));
            removed += before - holders.len();
            !holders.is_empty()
        });
        self.keys -= removed;
        let before = marks.all.len();
        marks.all.retain(|m| !settled(m));
        let relist = marks.all.len() < before;
        if marks.keys.is_empty() && marks.all.is_empty() && marks.provisional.is_empty() {
            self.owners.remove(owner);
        }
        relist
    }

    /// The owner lost everything (it restarted, or was flushed): no debt
    /// of its can be served stale any more.
    fn clear_owner(&mut self, owner: &str) {
        if let Some(marks) = self.owners.remove(owner) {
            self.keys -= marks.keys.values().map(Vec::len).sum::<usize>();
        }
    }

    fn blocks(&self, owner: &str, key: &str, now: Instant) -> bool {
        self.owners.get(owner).is_some_and(|m| {
            !m.all.is_empty()
                || m.keys.contains_key(key)
                || m.provisional
                    .get(key)
                    .is_some_and(|t| now.saturating_duration_since(*t) < PROVISIONAL)
                || m.provisional_all.is_some_and(|until| now < until)
        })
    }
}

/// A node this client reads from and follows.
#[derive(Debug)]
struct Link {
    address: String,
    channel: Channel,
    /// The pipelines for direct reads, opened with the epoch they carry.
    lanes: std::sync::Mutex<Option<(u64, Arc<Vec<Lane>>)>>,
    /// The feed is connected and caught up, and the node's debts listed.
    in_sync: AtomicBool,
    /// The node's debts must be listed again (a holder's all-keys mark was
    /// settled, or the membership changed).
    relist: AtomicBool,
    follower: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// Ends the task in `slot`, if any.
fn abort(slot: &std::sync::Mutex<Option<JoinHandle<()>>>) {
    if let Some(task) = lock(slot).take() {
        task.abort();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        abort(&self.follower);
    }
}

/// Direct mode's state, shared by the client and its background tasks
/// (which hold it weakly, so dropping the client ends them).
#[derive(Debug)]
pub(crate) struct Direct {
    orchestrator: Channel,
    access: NodeAccess,
    view: RwLock<Option<Arc<View>>>,
    links: std::sync::Mutex<HashMap<NodeId, Arc<Link>>>,
    marks: RwLock<Marks>,
    refresh: Arc<tokio::sync::Notify>,
    last_refresh: std::sync::Mutex<Option<Instant>>,
    pub(crate) stats: Stats,
    watcher: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Reads go to owners directly.
    direct_reads: bool,
    /// The near cache, kept fresh by the feeds.
    pub(crate) near: Option<NearCache>,
    /// Every followed feed is in sync and a topology is known: what makes
    /// a direct read or a near-cache answer safe. Kept by the followers
    /// and the watcher, read with one atomic load.
    coherent: AtomicBool,
}

impl Drop for Direct {
    fn drop(&mut self) {
        abort(&self.watcher);
    }
}

/// Where a direct read goes: the owner's pipelines.
pub(crate) struct Route {
    pub(crate) lanes: Arc<Vec<Lane>>,
}

/// A lock's guard even if a thread panicked holding it: every value here
/// stays consistent between statements (counters, maps, flags).
fn poisoned<G>(e: std::sync::PoisonError<G>) -> G {
    e.into_inner()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(poisoned)
}

impl Direct {
    /// Starts watching the topology through `orchestrator`; waits up to
    /// `first` for the first topology (reads go through the orchestrator
    /// until it comes).
    pub(crate) async fn start(
        orchestrator: Channel,
        access: NodeAccess,
        first: Duration,
        direct_reads: bool,
        near: Option<NearCache>,
    ) -> Arc<Self> {
        let direct = Arc::new(Self {
            direct_reads,
            near,
            coherent: AtomicBool::new(false),
            orchestrator,
            access,
            view: RwLock::new(None),
            links: std::sync::Mutex::new(HashMap::new()),
            marks: RwLock::new(Marks::default()),
            refresh: Arc::new(tokio::sync::Notify::new()),
            last_refresh: std::sync::Mutex::new(None),
            stats: Stats::default(),
            watcher: std::sync::Mutex::new(None),
        });
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(watch(
            Arc::downgrade(&direct),
            direct.refresh.clone(),
            ready_tx,
        ));
        *lock(&direct.watcher) = Some(task);
        let _ = tokio::time::timeout(first, ready).await;
        direct
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(t) = &self.access.token {
            request.metadata_mut().insert("authorization", t.clone());
        }
        request
    }

    /// The owner's pipelines if `key` may be read directly now; `None`:
    /// read it through the orchestrator.
    /// Whether the feeds and topology make cached or direct answers safe
    /// now (one atomic load).
    pub(crate) fn coherent(&self) -> bool {
        self.coherent.load(Ordering::Acquire)
    }

    /// Recomputes [`Direct::coherent`]: a topology is known and every node
    /// that may hold a debt or change a key (not ejected) has its feed in
    /// sync.
    fn recompute(&self) {
        let view = self.view.read().unwrap_or_else(poisoned).clone();
        let links = lock(&self.links);
        let coherent = view.is_some_and(|view| {
            view.nodes.iter().filter(|n| n.followed).all(|n| {
                links
                    .get(&n.id)
                    .is_some_and(|l| l.in_sync.load(Ordering::Acquire))
            })
        });
        self.coherent.store(coherent, Ordering::Release);
    }

    /// Voids, in the near cache, the keys whose changes node `id` may have
    /// published: those it is among the first replicas + 1 nodes of
    /// (owners, and the stand-in that takes their writes while one is
    /// away). What a gap in its feed, its loss, restart or flush means.
    fn void_node(&self, id: &str) {
        let Some(near) = &self.near else {
            return;
        };
        let view = self.view.read().unwrap_or_else(poisoned).clone();
        match view {
            Some(view) => {
                let Some(index) = view.ring.index_of(id) else {
                    near.invalidate_all();
                    return;
                };
                let reach = view.replicas.saturating_add(1);
                near.invalidate_matching(|key| view.ring.owners(key, reach).contains(&index));
            }
            None => near.invalidate_all(),
        }
    }

    pub(crate) fn route(&self, key: &str) -> Option<Route> {
        if !self.direct_reads || !self.coherent() {
            return None;
        }
        let view = self.view.read().unwrap_or_else(poisoned).clone()?;
        if view.handoff {
            return None;
        }
        let owner = *view.ring.owners(key, 1).first()?;
        let node = &view.nodes[owner];
        if !node.readable {
            return None;
        }
        let link = lock(&self.links).get(&node.id)?.clone();
        if self
            .marks
            .read()
            .unwrap_or_else(poisoned)
            .blocks(&node.id, key, Instant::now())
        {
            return None;
        }
        Some(Route {
            lanes: self.lanes(&link, view.epoch, &view.epoch_value),
        })
    }

    fn lanes(&self, link: &Link, epoch: u64, epoch_value: &AsciiMetadataValue) -> Arc<Vec<Lane>> {
        let mut lanes = lock(&link.lanes);
        if let Some((e, l)) = &*lanes
            && *e == epoch
        {
            return l.clone();
        }
        let mut metadata = vec![(DIRECT_EPOCH_HEADER, epoch_value.clone())];
        if let Some(t) = &self.access.token {
            metadata.push(("authorization", t.clone()));
        }
        let fresh: Arc<Vec<Lane>> = Arc::new(
            (0..self.access.pipelines.max(1))
                .map(|_| Lane::spawn(link.channel.clone(), metadata.clone()))
                .collect(),
        );
        *lanes = Some((epoch, fresh.clone()));
        fresh
    }

    /// This client's write of `key` through the orchestrator missed the
    /// owners `missed` (as its answer says).
    pub(crate) fn missed(&self, key: &str, missed: &[String]) {
        if missed.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut marks = self.marks.write().unwrap_or_else(poisoned);
        for owner in missed {
            marks.missed(owner, key, now);
        }
    }

    /// A direct read was refused with `error`: if the node says the epoch
    /// is stale, watch the topology again (at most once per cool-down).
    pub(crate) fn refused(&self, error: &RpcStatus) {
        if error.code != Code::FailedPrecondition as i32 {
            return;
        }
        let status = tonic::Status::with_details(
            Code::FailedPrecondition,
            error.message.clone(),
            error.encode_to_vec().into(),
        );
        if status
            .get_details_error_info()
            .is_some_and(|i| i.reason == STALE_EPOCH)
        {
            self.stats.stale_epochs.fetch_add(1, Ordering::Relaxed);
            let mut last = lock(&self.last_refresh);
            let now = Instant::now();
            if last.is_none_or(|t| now.duration_since(t) >= REFRESH_COOL_DOWN) {
                *last = Some(now);
                self.refresh.notify_one();
            }
        }
    }

    /// Takes a new topology: the view, and a link (pipelines, feed) per
    /// node.
    fn apply(self: &Arc<Self>, topology: &Topology) {
        let view = View::of(topology).map(Arc::new);
        let mut links = lock(&self.links);
        let mut membership_changed = false;
        if let Some(view) = &view {
            links.retain(|id, link| {
                let keep = view
                    .nodes
                    .iter()
                    .any(|n| n.id == *id && n.address == link.address);
                membership_changed |= !keep;
                keep
            });
            for node in &view.nodes {
                if links.contains_key(&node.id) {
                    continue;
                }
                let Some(link) = self.link(&node.id, &node.address) else {
                    continue;
                };
                membership_changed = true;
                links.insert(node.id.clone(), link);
            }
            if membership_changed {
                // Debts of owners not listed before may be on any node.
                for link in links.values() {
                    link.relist.store(true, Ordering::Release);
                }
            }
        }
        drop(links);
        *self.view.write().unwrap_or_else(poisoned) = view;
        self.recompute();
    }

    fn link(self: &Arc<Self>, id: &NodeId, address: &str) -> Option<Arc<Link>> {
        let scheme = if self.access.https { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .ok()?
            .connect_timeout(self.access.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = &self.access.tls {
            endpoint = endpoint.tls_config(tls.clone()).ok()?;
        }
        let link = Arc::new(Link {
            address: address.to_owned(),
            channel: endpoint.connect_lazy(),
            lanes: std::sync::Mutex::new(None),
            in_sync: AtomicBool::new(false),
            relist: AtomicBool::new(true),
            follower: std::sync::Mutex::new(None),
        });
        let task = tokio::spawn(follow(
            Arc::downgrade(self),
            Arc::downgrade(&link),
            id.clone(),
        ));
        *lock(&link.follower) = Some(task);
        Some(link)
    }

    /// Lists every debt `holder` records, for every owner of the view.
    async fn list_debts(&self, holder: &NodeId, channel: Channel) -> Result<(), tonic::Status> {
        let owners: Vec<NodeId> = self
            .view
            .read()
            .unwrap_or_else(poisoned)
            .as_ref()
            .map(|v| v.nodes.iter().map(|n| n.id.clone()).collect())
            .unwrap_or_default();
        let mut client = InternalClient::new(channel);
        for owner in owners.iter().filter(|o| *o != holder) {
            let ask = client.debts(self.request(DebtsRequest {
                owner: owner.to_string(),
                limit: 0,
            }));
            let listed = tokio::time::timeout(FEED_SILENCE, ask)
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("the node did not list its debts"))??
                .into_inner();
            let mut marks = self.marks.write().unwrap_or_else(poisoned);
            if listed.overflowed || listed.more {
                // More than one listing shows: skip the owner until the
                // holder settles through what was listed, then list again.
                marks.owe(owner, None, holder, listed.through);
            }
            for key in &listed.keys {
                marks.owe(owner, Some(key), holder, listed.through);
            }
        }
        Ok(())
    }
}

/// Watches the topology for as long as the client lives, again after
/// every failure (with a backoff) and when a refresh is asked for.
async fn watch(
    direct: Weak<Direct>,
    refresh: Arc<tokio::sync::Notify>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(strong) = direct.upgrade() else {
            return;
        };
        let mut client = ClusterClient::new(strong.orchestrator.clone());
        let request = strong.request(WatchTopologyRequest {});
        drop(strong);
        match client.watch_topology(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        // A node said our epoch is stale: watch anew.
                        () = refresh.notified() => break,
                    };
                    let Some(strong) = direct.upgrade() else {
                        return;
                    };
                    match message {
                        Ok(Some(topology)) => {
                            backoff = Duration::from_millis(50);
                            strong.apply(&topology);
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "the server does not serve Cluster/WatchTopology (a node, or an older orchestrator): direct mode is off, every read goes through it"
                );
                return;
            }
            Err(_) => {}
        }
        // Without a live topology, reads go through the orchestrator.
        if let Some(strong) = direct.upgrade() {
            *strong.view.write().unwrap_or_else(poisoned) = None;
            strong.recompute();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Follows one node's change feed for as long as its link lives: debts
/// it records (and settles) become marks; its own flush or restart clears
/// what it owed.
async fn follow(direct: Weak<Direct>, link: Weak<Link>, id: NodeId) {
    let mut position: Option<(u64, u64)> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        let (Some(strong), Some(l)) = (direct.upgrade(), link.upgrade()) else {
            return;
        };
        let channel = l.channel.clone();
        drop(l);
        let (incarnation, after) = position.unwrap_or((0, 0));
        let request = strong.request(ChangesRequest { incarnation, after });
        drop(strong);
        let stream = tokio::time::timeout(
            FEED_SILENCE,
            InternalClient::new(channel.clone()).changes(request),
        )
        .await;
        if let Ok(Ok(response)) = stream {
            let mut stream = response.into_inner();
            loop {
                let message = match tokio::time::timeout(FEED_SILENCE, stream.message()).await {
                    Ok(Ok(Some(m))) => m,
                    _ => break,
                };
                let (Some(strong), Some(l)) = (direct.upgrade(), link.upgrade()) else {
                    return;
                };
                backoff = Duration::from_millis(50);
                let restarted = position.is_some_and(|(inc, _)| inc != message.incarnation);
                if restarted {
                    // A new process: empty, it owes nothing any more.
                    strong
                        .marks
                        .write()
                        .unwrap_or_else(poisoned)
                        .clear_owner(&id);
                }
                if restarted || message.gap {
                    // Changes went unseen: what this node could have
                    // changed is void.
                    strong.void_node(&id);
                }
                if position.is_none() || restarted || message.gap {
                    // What was recorded before we followed, or in a gap, is
                    // listed (after subscribing, so nothing falls between).
                    position = Some((message.incarnation, message.head));
                    l.relist.store(true, Ordering::Release);
                }
                if l.relist.swap(false, Ordering::AcqRel) {
                    if l.in_sync.swap(false, Ordering::AcqRel) {
                        strong.recompute();
                    }
                    if strong.list_debts(&id, channel.clone()).await.is_err() {
                        l.relist.store(true, Ordering::Release);
                        break;
                    }
                }
                let mut flushed = false;
                let mut owners_voided: Vec<String> = Vec::new();
                let mut marks = strong.marks.write().unwrap_or_else(poisoned);
                for change in &message.changes {
                    if change.kind == ChangeKind::Owed as i32 {
                        let key = (!change.key.is_empty()).then_some(change.key.as_str());
                        marks.owe(&change.owner, key, &id, change.version);
                        // A fill may have read the owner's old value
                        // between the change and this record: void it.
                        match (key, &strong.near) {
                            (Some(key), Some(near)) => near.invalidate(key),
                            (None, Some(_)) => owners_voided.push(change.owner.clone()),
                            _ => {}
                        }
                    } else if change.kind == ChangeKind::Settled as i32 {
                        if marks.settle(&change.owner, &id, change.version) {
                            l.relist.store(true, Ordering::Release);
                        }
                    } else if change.kind == ChangeKind::Flush as i32 {
                        marks.clear_owner(&id);
                        flushed = true;
                    } else if let Some(near) = &strong.near {
                        near.invalidate(&change.key);
                    }
                    if let Some((_, seq)) = &mut position {
                        *seq = change.sequence;
                    }
                }
                drop(marks);
                if flushed {
                    strong.void_node(&id);
                }
                for owner in &owners_voided {
                    strong.void_node(owner);
                }
                let caught_up = position.is_some_and(|(_, seq)| seq >= message.head);
                let in_sync = caught_up && !l.relist.load(Ordering::Acquire);
                if l.in_sync.swap(in_sync, Ordering::AcqRel) != in_sync {
                    strong.recompute();
                }
            }
        }
        if let (Some(strong), Some(l)) = (direct.upgrade(), link.upgrade()) {
            if l.in_sync.swap(false, Ordering::AcqRel) {
                strong.recompute();
            }
            // Lost: what it changes from now on goes unseen until it is
            // followed again.
            strong.void_node(&id);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debt_blocks_its_key_until_its_holder_settles_it() {
        let mut marks = Marks::default();
        let y: NodeId = "y".into();
        marks.owe("x", Some("k"), &y, 5);
        assert!(marks.blocks("x", "k", Instant::now()));
        assert!(!marks.blocks("x", "other", Instant::now()));
        assert!(!marks.blocks("z", "k", Instant::now()));
        // Settled below its record: still open.
        assert!(!marks.settle("x", "y", 4));
        assert!(marks.blocks("x", "k", Instant::now()));
        // Settled by another holder: still open.
        marks.settle("x", "w", 9);
        assert!(marks.blocks("x", "k", Instant::now()));
        marks.settle("x", "y", 5);
        assert!(!marks.blocks("x", "k", Instant::now()));
        assert_eq!(marks.keys, 0);
    }

    #[test]
    fn an_overflow_blocks_every_key_and_asks_for_a_listing_when_settled() {
        let mut marks = Marks::default();
        let y: NodeId = "y".into();
        marks.owe("x", None, &y, 7);
        assert!(marks.blocks("x", "anything", Instant::now()));
        assert!(marks.settle("x", "y", 7), "listed again");
        assert!(!marks.blocks("x", "anything", Instant::now()));
    }

    #[test]
    fn a_restarted_or_flushed_owner_owes_nothing() {
        let mut marks = Marks::default();
        let y: NodeId = "y".into();
        marks.owe("x", Some("a"), &y, 1);
        marks.owe("x", Some("b"), &y, 2);
        marks.clear_owner("x");
        assert!(!marks.blocks("x", "a", Instant::now()));
        assert_eq!(marks.keys, 0);
    }

    #[test]
    fn an_own_write_that_missed_the_owner_blocks_until_its_debt_is_seen_or_long_enough() {
        let mut marks = Marks::default();
        let y: NodeId = "y".into();
        let t = Instant::now();
        marks.missed("x", "k", t);
        assert!(marks.blocks("x", "k", t));
        assert!(!marks.blocks("x", "other", t));
        // The debt arrives on the holder's feed: it takes over, and its
        // settlement ends it.
        marks.owe("x", Some("k"), &y, 3);
        marks.settle("x", "y", 3);
        assert!(!marks.blocks("x", "k", t));
        // A debt never seen: the mark lapses once a feed would have shown it.
        marks.missed("x", "j", t);
        assert!(marks.blocks("x", "j", t + PROVISIONAL / 2));
        assert!(!marks.blocks("x", "j", t + PROVISIONAL));
        // The debt came first: nothing more to wait for.
        marks.owe("x", Some("i"), &y, 4);
        marks.missed("x", "i", t);
        marks.settle("x", "y", 4);
        assert!(!marks.blocks("x", "i", t));
    }

    #[test]
    fn marks_are_bounded() {
        let mut marks = Marks::default();
        let y: NodeId = "y".into();
        for i in 0..MAX_MARKS + 10 {
            marks.owe("x", Some(&format!("k{i}")), &y, i as u64);
        }
        assert_eq!(marks.keys, MAX_MARKS);
        // Past the bound, the owner is skipped for every key.
        assert!(marks.blocks("x", "never-recorded", Instant::now()));
    }
}
