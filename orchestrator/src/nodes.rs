//! The cache nodes the orchestrator routes to: their clients, their health,
//! and the topology.
//!
//! [`Cluster`] holds the current [`Topology`] — the ring and a [`Node`] per
//! ring member — behind an `ArcSwap`, so request paths read it without
//! locks and membership changes swap it whole. A node that stays in the
//! membership keeps its connections, queue and health record across swaps.
//! How a node is called lives in [`crate::client`].

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use ringcache_proto::{service_names::CACHE, v1::op_result};

use crate::{
    client::{
        CallError, NodeClient, NodeStack, StackSettings,
        batch::BatchLimits,
        delete_op,
        layers::{CallMetrics, HealthRecorder},
        stack,
        transport::{Transport, TransportSettings, Unhealthy},
    },
    feeds::FeedState,
    handoff::{HandoffSettings, Mutations, Warmth},
    health::{Health, HealthPolicy, State},
    invalidation::{Pending, Replay, StandIns},
    metrics::ClusterMetrics,
    ring::{NodeId, Ring},
};

/// How to reach and call nodes.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// Connections to each node.
    pub transport: TransportSettings,
    /// Timeouts and in-flight limits of each node's calls.
    pub stack: StackSettings,
    /// How each node's requests are coalesced.
    pub batch: BatchLimits,
    /// When to eject a node.
    pub health: HealthPolicy,
    /// Longest an active check may take (`--health-timeout`); also bounds
    /// the probes made when calls are cut short.
    pub probe_timeout: Duration,
    /// Most bytes of keys recorded per node for invalidation before the
    /// node is marked for a flush instead.
    pub pending_invalidation_bytes: usize,
    /// Warm handoff to nodes that join or restart.
    pub handoff: HandoffSettings,
}

/// A member of the cluster: its ring identity and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// The identity on the ring.
    pub id: NodeId,
    /// `host:port`.
    pub address: String,
}

/// One node's health record, fed by active checks and by its calls.
#[derive(Debug)]
pub struct NodeHealth {
    id: NodeId,
    address: String,
    health: Mutex<Health>,
    /// Mirrors `health.routable()`, so routing reads an atomic, not a lock.
    routable: AtomicBool,
    policy: HealthPolicy,
    metrics: Arc<ClusterMetrics>,
    /// How the node is checked when calls cannot tell whether it answers.
    probe: Probe,
    /// The cluster's routing generation, moved when this node is ejected
    /// or readmitted.
    routing: Arc<AtomicU64>,
    /// Wakes the cluster's topology watchers on those changes.
    events: Arc<TopologyEvents>,
}

/// Wakes whoever follows the topology (`Cluster/WatchTopology` streams)
/// when it changes: a node ejected or readmitted, starting or ending
/// warm-up, the membership replaced.
#[derive(Debug)]
pub struct TopologyEvents(tokio::sync::watch::Sender<u64>);

impl Default for TopologyEvents {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(0))
    }
}

impl TopologyEvents {
    /// Something changed: wake every watcher.
    pub fn changed(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes on every change from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// An active check run on demand, when a call ends without saying whether
/// the node answers (see [`HealthRecorder::call_inconclusive`]): with
/// client deadlines shorter than `--node-timeout`, every call to a hung
/// node ends that way, and only checks can blame it. One probe at a time
/// per node; after one that succeeds, the next waits [`PROBE_SPACING`],
/// so a healthy node whose callers cut calls short is not checked on
/// every call.
#[derive(Debug)]
struct Probe {
    transport: Transport,
    /// `--health-timeout`.
    timeout: Duration,
    running: AtomicBool,
}

/// The least time between the start of a probe that succeeded and the
/// next one.
const PROBE_SPACING: Duration = Duration::from_millis(100);

impl NodeHealth {
    fn failed(&self, reason: &str) {
        let ejected = {
            let mut h = self.health.lock();
            let ejected = h.failed(Instant::now(), &self.policy);
            self.routable.store(h.routable(), Ordering::Relaxed);
            ejected
        };
        if ejected {
            self.routing.fetch_add(1, Ordering::AcqRel);
            self.events.changed();
            tracing::warn!(node = %self.id, address = %self.address, reason, "node ejected");
            self.metrics.ejections.with_label_values(&[&*self.id]).inc();
            self.metrics.set_routable(&self.id, false);
        }
    }

    fn check_succeeded(&self) {
        let readmitted = {
            let mut h = self.health.lock();
            let readmitted = h.check_succeeded(Instant::now(), &self.policy);
            self.routable.store(h.routable(), Ordering::Relaxed);
            readmitted
        };
        if readmitted {
            self.routing.fetch_add(1, Ordering::AcqRel);
            self.events.changed();
            tracing::info!(node = %self.id, address = %self.address, "node readmitted");
        }
        self.metrics.set_reached(&self.id);
        self.metrics
            .set_routable(&self.id, self.routable.load(Ordering::Relaxed));
    }
}

impl HealthRecorder for NodeHealth {
    fn call_inconclusive(self: Arc<Self>) {
        if self.probe.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.probe.running.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(async move {
            let started = tokio::time::Instant::now();
            let outcome = self
                .probe
                .transport
                .health_check(CACHE, self.probe.timeout)
                .await;
            let result = if outcome.is_ok() { "ok" } else { "failed" };
            self.metrics
                .probes
                .with_label_values(&[&*self.id, result])
                .inc();
            match outcome {
                Ok(()) => {
                    // It answers: what the cut-short calls hid was not the
                    // node. (Never readmits: that is the full check's job.)
                    self.call_succeeded();
                    tokio::time::sleep_until(started + PROBE_SPACING).await;
                }
                Err(reason) => {
                    tracing::debug!(node = %self.id, %reason, "probe after calls cut short failed");
                    self.failed(&format!("probe after calls were cut short: {reason}"));
                }
            }
            self.probe.running.store(false, Ordering::Release);
        });
    }

    fn call_succeeded(&self) {
        // Cheap path: nothing to do while healthy with no failures.
        let mut h = self.health.lock();
        if h.consecutive_failures() > 0 || !h.answered() {
            h.call_succeeded();
        }
    }

    fn call_failed(&self, error: &CallError) {
        self.failed(&error.to_string());
    }
}

/// One cache node.
#[derive(Debug)]
pub struct Node {
    /// Its identity on the ring.
    pub id: NodeId,
    /// Where it is reached (`host:port`).
    pub address: String,
    /// How it is called.
    pub client: NodeClient,
    /// Keys it may hold stale values of.
    pub pending: Pending,
    /// Keys it took writes of while their owners were away.
    pub stand_ins: StandIns,
    /// Whether it is being warmed (joined or restarted empty).
    pub warmth: Warmth,
    /// Whether this orchestrator is in step with its change feed.
    feed: FeedState,
    /// Its debts must be read from every other node at the next health
    /// round (a holder was unreachable, or a feed had a gap).
    collect_debts: AtomicBool,
    /// Its own `--node-id`, as it last reported it.
    reported_id: Mutex<Option<String>>,
    /// Whether this orchestrator tried to claim its entries since it last
    /// served (it reported NOT_SERVING: stopping; see [`crate::parking`]).
    park_tried: AtomicBool,
    /// Until when reads prefer the key's other owners (the read fence,
    /// see [`Node::fence_reads`]): nanoseconds after [`fence_epoch`]; 0
    /// for none.
    read_fence: AtomicU64,
    health: Arc<NodeHealth>,
}

/// The instant read fences are counted from (the first use).
fn fence_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn fence_nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(fence_epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Node {
    fn new(
        member: &Member,
        settings: &CallSettings,
        metrics: &Arc<ClusterMetrics>,
        epoch: &Arc<AtomicU64>,
        routing: &Arc<AtomicU64>,
        events: &Arc<TopologyEvents>,
        make_stack: impl Fn(&Member, Transport, Arc<dyn HealthRecorder>, CallMetrics) -> NodeStack,
    ) -> Result<Self, http::Error> {
        let transport =
            Transport::new(&member.address, settings.transport.clone())?.with_epoch(epoch.clone());
        let health = Arc::new(NodeHealth {
            id: member.id.clone(),
            address: member.address.clone(),
            health: Mutex::new(Health::default()),
            routable: AtomicBool::new(true),
            policy: settings.health,
            metrics: metrics.clone(),
            probe: Probe {
                transport: transport.clone(),
                timeout: settings.probe_timeout,
                running: AtomicBool::new(false),
            },
            routing: routing.clone(),
            events: events.clone(),
        });
        let stack = make_stack(
            member,
            transport.clone(),
            health.clone(),
            metrics.call_metrics(&member.id),
        );
        Ok(Self {
            id: member.id.clone(),
            address: member.address.clone(),
            client: NodeClient::new(stack, transport, settings.batch),
            pending: Pending::new(settings.pending_invalidation_bytes),
            stand_ins: StandIns::new(settings.pending_invalidation_bytes),
            warmth: Warmth::default(),
            feed: FeedState::default(),
            collect_debts: AtomicBool::new(false),
            reported_id: Mutex::new(None),
            park_tried: AtomicBool::new(false),
            read_fence: AtomicU64::new(0),
            health,
        })
    }

    /// Where this orchestrator is with the node's change feed.
    pub fn feed(&self) -> &FeedState {
        &self.feed
    }

    /// Whether calls may go to this node now.
    pub fn routable(&self) -> bool {
        self.health.routable.load(Ordering::Relaxed)
    }

    /// Whether writes and deletes of `key` should also reach this node
    /// although it is not routable: it is ejected but answered its last
    /// health check (it waits out its backoff), and holds no value of
    /// `key` it may have missed an update of. Another orchestrator may
    /// already read from it, so what this one changes must land there too.
    pub fn writable_while_ejected(&self, key: &str) -> bool {
        !self.routable()
            && self.health.health.lock().answering_while_ejected()
            && !self.pending.contains(key)
    }

    /// Keeps reads off this node for `fence` when the key's other owners
    /// can answer: it is coming back (readmitted, or restarted), and
    /// another orchestrator may not have seen it yet. That one still
    /// writes around it for up to a health round — its deletes reach the
    /// other owners and are recorded as debts of this node, which reach
    /// this orchestrator on the feeds only after they were made. Reads
    /// from the other owners see those changes at once. Writes go to the
    /// node as usual.
    pub fn fence_reads(&self, fence: Duration) {
        let until = fence_nanos(Instant::now() + fence);
        self.read_fence.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether reads should prefer the key's other owners now (see
    /// [`Node::fence_reads`]).
    #[inline]
    pub fn read_fenced(&self) -> bool {
        let until = self.read_fence.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if fence_nanos(Instant::now()) < until {
            return true;
        }
        // Over: from now on one load answers (routing asks on every
        // request), unless a new fence was set meanwhile.
        let _ = self
            .read_fence
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
        false
    }

    /// Whether calls for `key` may go to this node now: it is routable and
    /// holds no value of `key` it may have missed an update of.
    #[inline]
    pub fn usable_for(&self, key: &str) -> bool {
        self.routable() && !self.pending.contains(key)
    }

    /// The health state and consecutive failures.
    pub fn health(&self) -> (State, u32) {
        let h = self.health.health.lock();
        (h.state(), h.consecutive_failures())
    }

    /// Its own `--node-id`, as it last reported it.
    pub fn reported_id(&self) -> Option<String> {
        self.reported_id.lock().clone()
    }

    /// Records the id the node reports; warns when an entry that names an
    /// identity (`id=host:port`) reaches a node that says it is another.
    fn saw_id(&self, id: &str) {
        let mut reported = self.reported_id.lock();
        if reported.as_deref() == Some(id) {
            return;
        }
        let named = *self.id != *self.address;
        if named && !id.is_empty() && *self.id != *id {
            tracing::warn!(node = %self.id, address = %self.address, reports = %id, "the node at this address reports another --node-id than the membership gives it: check the id=host:port entries");
        }
        *reported = Some(id.to_owned());
    }

    /// Whether the node ever answered this orchestrator.
    pub fn answered(&self) -> bool {
        self.health.health.lock().answered()
    }
}

/// The ring and its nodes; `nodes[i]` is the ring's node `i`.
#[derive(Debug, Default)]
pub struct Topology {
    /// Who owns which key.
    pub ring: Ring,
    /// The nodes, in ring index order.
    pub nodes: Vec<Arc<Node>>,
    /// The ring's epoch ([`Ring::epoch`]).
    pub epoch: u64,
    /// Each node's share of keys as first owner ([`Ring::shares`]), in
    /// ring index order.
    pub shares: Vec<f64>,
}

/// Key hashes [`Ring::shares`] measures each topology's shares on.
const SHARE_SAMPLES: u32 = 1 << 16;

/// The membership before the last change, kept through the handoff
/// window: keys that moved may still be held by their previous owners.
#[derive(Debug)]
pub struct Previous {
    /// The topology before the change.
    pub topology: Arc<Topology>,
    /// When the window ends.
    pub until: Instant,
}

/// The nodes, their health and the calls to them.
#[derive(Debug)]
pub struct Cluster {
    topology: ArcSwap<Topology>,
    previous: ArcSwapOption<Previous>,
    /// Writes and deletes running (see [`crate::handoff`]).
    pub mutations: Mutations,
    /// Handoff is active (some node warming, or the previous membership
    /// still in its window) until this many ms after `created`.
    handoff_until_ms: AtomicU64,
    created: Instant,
    /// Read-through copies running, bounded.
    pub(crate) copy_slots: Arc<tokio::sync::Semaphore>,
    /// The current ring's epoch, shared with every node's transport, which
    /// sends it with each call.
    epoch: Arc<AtomicU64>,
    /// Moves whenever routing changes: a node ejected or readmitted, the
    /// membership replaced. What was read under an older routing
    /// (relief's answers) is not served.
    routing: Arc<AtomicU64>,
    /// Wakes topology watchers.
    events: Arc<TopologyEvents>,
    /// The nodes' change feeds are followed ([`crate::feeds::supervise`]).
    feeds: AtomicBool,
    settings: CallSettings,
    metrics: Arc<ClusterMetrics>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(settings: CallSettings, metrics: Arc<ClusterMetrics>) -> Self {
        Self {
            topology: ArcSwap::from_pointee(Topology::default()),
            previous: ArcSwapOption::empty(),
            mutations: Mutations::default(),
            handoff_until_ms: AtomicU64::new(0),
            created: Instant::now(),
            copy_slots: Arc::new(tokio::sync::Semaphore::new(crate::handoff::COPY_SLOTS)),
            epoch: Arc::new(AtomicU64::new(Ring::default().epoch())),
            routing: Arc::new(AtomicU64::new(0)),
            events: Arc::new(TopologyEvents::default()),
            feeds: AtomicBool::new(false),
            settings,
            metrics,
        }
    }

    /// Records that the nodes' change feeds are followed.
    pub fn feeds_followed(&self) {
        self.feeds.store(true, Ordering::Release);
    }

    /// How a copy to `target` read from now on must be conditioned (see
    /// [`crate::handoff::CopySince`]).
    pub fn copy_since(&self, target: &Node) -> crate::handoff::CopySince {
        use crate::handoff::CopySince;
        if !self.feeds.load(Ordering::Acquire) {
            return CopySince::Unconditional;
        }
        // A node that restarted holds nothing older than its start: a copy
        // is wanted only for a key it never changed since. Conditioning on
        // the start — not on a position taken just before the copy's value
        // was read — also refuses the copy when a delete reached this node
        // first and its other holders a moment later, after they were
        // read: the node knows the key changed, whenever it did.
        if let Some(incarnation) = target.warmth.restarted_as(Instant::now()) {
            return CopySince::After(crate::feeds::Position {
                incarnation,
                sequence: 0,
            });
        }
        match target.feed().position() {
            Some(p) => CopySince::After(p),
            // A node without a change log cannot vouch for copies (and
            // would refuse conditional ones): only this orchestrator's own
            // writes guard them, as with --change-feeds false.
            None if target.feed().refused() => CopySince::Unconditional,
            None => CopySince::Unknown,
        }
    }

    /// The routing generation (see the field), shared.
    pub fn routing_generation(&self) -> Arc<AtomicU64> {
        self.routing.clone()
    }

    /// The call settings.
    pub fn settings(&self) -> &CallSettings {
        &self.settings
    }

    /// The current topology.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// The membership before the last change, while its handoff window
    /// lasts.
    pub fn previous(&self) -> Option<Arc<Previous>> {
        self.previous
            .load_full()
            .filter(|p| Instant::now() < p.until)
    }

    /// Whether any handoff is going on: a node warming or a recent
    /// membership change. Cheap: read paths ask it on every miss.
    pub fn handoff_active(&self) -> bool {
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.handoff_until_ms.load(Ordering::Relaxed)
    }

    /// Starts warming `node`: misses on it read through, and a refill runs
    /// at the next health round.
    pub fn start_warming(&self, node: &Node) {
        let window = self.settings.handoff.window;
        node.warmth.start(window);
        self.extend_handoff(window);
        self.events.changed();
    }

    /// Wakes topology watchers: something they report changed.
    pub fn topology_changed(&self) {
        self.events.changed();
    }

    /// Wakes on every change of what `Cluster/WatchTopology` reports
    /// (ejections, readmissions, warm-up, membership); time-bound changes
    /// (a read-through window ending) are not signalled.
    pub fn topology_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    fn extend_handoff(&self, window: Duration) {
        let until = self.created.elapsed().saturating_add(window);
        self.handoff_until_ms.fetch_max(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Replaces the membership. Nodes whose identity and address are
    /// unchanged keep their channel and health; others are created or
    /// dropped. A no-op if nothing changed.
    pub fn set_members(&self, members: Vec<Member>) {
        self.set_members_with(members, |member, transport, health, metrics| {
            stack(
                &member.id,
                &member.address,
                transport,
                &self.settings.stack,
                health,
                metrics,
            )
        });
    }

    /// [`Cluster::set_members`], with each new node's call stack made by
    /// `make_stack` from its member, transport, health record and metrics.
    /// Tests give nodes stacks that answer without a network.
    pub fn set_members_with(
        &self,
        mut members: Vec<Member>,
        make_stack: impl Fn(&Member, Transport, Arc<dyn HealthRecorder>, CallMetrics) -> NodeStack,
    ) {
        members.sort();
        members.dedup_by(|a, b| a.id == b.id);
        let current = self.topology();
        let unchanged = current.nodes.len() == members.len()
            && current
                .nodes
                .iter()
                .zip(&members)
                .all(|(n, m)| n.id == m.id && n.address == m.address);
        if unchanged {
            return;
        }
        let existing: HashMap<(&str, &str), &Arc<Node>> = current
            .nodes
            .iter()
            .map(|n| ((&*n.id, n.address.as_str()), n))
            .collect();
        let ring = Ring::new(members.iter().map(|m| m.id.clone()));
        let mut nodes = Vec::with_capacity(ring.len());
        for id in ring.ids() {
            let Some(member) = members.iter().find(|m| &m.id == id) else {
                continue;
            };
            if let Some(node) = existing.get(&(&*member.id, member.address.as_str())) {
                nodes.push(Arc::clone(node));
                continue;
            }
            match Node::new(
                member,
                &self.settings,
                &self.metrics,
                &self.epoch,
                &self.routing,
                &self.events,
                &make_stack,
            ) {
                Ok(node) => {
                    // A node that joins a ring that had members owns keys
                    // they hold: warm it. (At startup there is nobody to
                    // copy from.)
                    if !current.nodes.is_empty() {
                        self.start_warming(&node);
                    }
                    self.metrics.add_node(&node.id);
                    nodes.push(Arc::new(node));
                }
                Err(error) => {
                    tracing::error!(node = %member.id, address = %member.address, %error, "cannot create a channel to the node; leaving it out");
                }
            }
        }
        // The ring must match the nodes that could be created.
        let ring = Ring::new(nodes.iter().map(|n| n.id.clone()));
        let epoch = ring.epoch();
        self.epoch.store(epoch, Ordering::Relaxed);
        for gone in current
            .nodes
            .iter()
            .filter(|n| !nodes.iter().any(|m| m.id == n.id))
        {
            self.metrics.forget_node(&gone.id);
        }
        tracing::info!(
            nodes = ?nodes.iter().map(|n| format!("{}@{}", n.id, n.address)).collect::<Vec<_>>(),
            epoch = format!("{epoch:016x}"),
            "membership changed"
        );
        self.metrics.ring_nodes.set(nodes.len() as i64);
        for n in &nodes {
            self.metrics.set_routable(&n.id, n.routable());
        }
        if !current.nodes.is_empty() {
            // Keys that moved are still held by their previous owners.
            let window = self.settings.handoff.window;
            self.previous.store(Some(Arc::new(Previous {
                topology: current,
                until: Instant::now() + window,
            })));
            self.extend_handoff(window);
        }
        self.topology.store(Arc::new(Topology {
            shares: ring.shares(SHARE_SAMPLES),
            ring,
            nodes,
            epoch,
        }));
        self.routing.fetch_add(1, Ordering::AcqRel);
        self.events.changed();
    }

    /// Whether this orchestrator can serve: some node on the ring is
    /// healthy (answered its last check). False with no node, or with
    /// every node ejected or never reached.
    pub fn ready(&self) -> bool {
        self.topology()
            .nodes
            .iter()
            .any(|n| matches!(n.health().0, State::Healthy))
    }

    /// Counts a replica write that failed.
    pub fn replica_failed(&self, node: &Node, error: &CallError) {
        self.metrics
            .replica_failures
            .with_label_values(&[&*node.id])
            .inc();
        tracing::warn!(node = %node.id, %error, "replica write failed");
    }

    /// Runs one active health check of every node, in parallel, on the
    /// connections calls use; starts warming nodes that restarted, and
    /// refills of warming nodes.
    pub async fn check_all(self: &Arc<Self>, timeout: Duration) {
        let topology = self.topology();
        if self
            .previous
            .load()
            .as_ref()
            .is_some_and(|p| Instant::now() >= p.until)
        {
            // The window is over: let the old nodes' connections go.
            self.previous.store(None);
        }
        let topo = &*topology;
        let checks = topology.nodes.iter().map(|node| async move {
            match node.client.transport().health_check(CACHE, timeout).await {
                Ok(()) => {
                    // A restarted node is empty: warm it before it gets
                    // calls again.
                    let mut restarted = false;
                    match node.client.transport().identity(timeout).await {
                        Ok(identity) => {
                            node.saw_id(&identity.id);
                            if node.warmth.saw_incarnation(identity.incarnation) {
                                tracing::info!(node = %node.id, "node restarted (new incarnation): warming it");
                                restarted = true;
                                self.start_warming(node);
                            }
                        }
                        Err(reason) => {
                            tracing::debug!(node = %node.id, %reason, "cannot learn the node's incarnation");
                        }
                    }
                    // Before routing to a node this orchestrator has not
                    // seen serve — at its start, or after an ejection — read
                    // what it missed from every other node's debt records
                    // (another orchestrator, maybe gone since, may have
                    // recorded them). Then bring it up to date: keys it
                    // missed updates of are skipped by routing until then.
                    node.park_tried.store(false, Ordering::Release);
                    let state = node.health().0;
                    let returning = !matches!(state, State::Healthy);
                    if restarted || matches!(state, State::Ejected { .. }) {
                        // Before it is readmitted: no read reaches it
                        // unfenced.
                        node.fence_reads(self.settings.handoff.read_fence);
                    }
                    let collect = returning || node.collect_debts.swap(false, Ordering::AcqRel);
                    self.catch_up(node, topo, collect).await;
                    node.health.check_succeeded();
                    if node.warmth.take_refill() {
                        tokio::spawn(crate::handoff::refill(self.clone(), node.clone()));
                    }
                }
                Err(reason) => {
                    tracing::debug!(node = %node.id, %reason, "health check failed");
                    if reason == Unhealthy::NotServing
                        && self.feeds.load(Ordering::Acquire)
                        && !node.park_tried.swap(true, Ordering::AcqRel)
                    {
                        // Stopping: keep its entries while it is away.
                        tokio::spawn(crate::parking::park(self.clone(), node.clone()));
                    }
                    node.health.failed(&reason.to_string());
                }
            }
        });
        futures::future::join_all(checks).await;
        self.retire_stand_ins();
    }

    /// Stand-in copies whose owners are all routable again are no longer
    /// written: record them for invalidation on the node holding them (it
    /// then skips them, and the next round deletes them there).
    pub fn retire_stand_ins(&self) {
        let topology = self.topology();
        let replicas = self.settings.handoff.replicas;
        for node in &topology.nodes {
            if node.stand_ins.is_empty() {
                continue;
            }
            let retired = node.stand_ins.take_where(|key| {
                topology
                    .ring
                    .owners(key, replicas)
                    .iter()
                    .all(|&o| topology.nodes[o].routable())
            });
            for key in &retired {
                self.invalidate_later(node, key);
            }
            if !retired.is_empty() {
                tracing::info!(node = %node.id, keys = retired.len(), "owners are back: stand-in copies will be deleted");
            }
        }
    }
}

/// The most rounds of reading debts and settling them in one catch-up
/// (each reads up to `--max-batch` keys per holder).
const MAX_CATCH_UP_ROUNDS: usize = 64;

impl Cluster {
    /// Brings `node` up to date: with `collect`, first reads its debts
    /// from every other node of `topology`; then deletes on it what it
    /// missed ([`Cluster::replay_invalidations`]) and settles the debt
    /// records that covered it on their holders. Repeats while a holder
    /// has more records than one answer lists.
    async fn catch_up(&self, node: &Node, topology: &Topology, mut collect: bool) {
        let timeout = self.settings.stack.node_timeout;
        let limit = u32::try_from(self.settings.batch.max_ops).unwrap_or(u32::MAX);
        let replicas = self.settings.handoff.replicas;
        for _ in 0..MAX_CATCH_UP_ROUNDS {
            let mut more = false;
            // Copies holders keep only because the node was away (they
            // do not own the key): retired once the node is up to date,
            // whichever orchestrator wrote them.
            let mut retired: Vec<(&Arc<Node>, Vec<String>)> = Vec::new();
            let mut restore: Vec<(&Arc<Node>, Vec<String>)> = Vec::new();
            if collect {
                for (h, holder) in topology.nodes.iter().enumerate() {
                    if holder.id == node.id {
                        continue;
                    }
                    match holder
                        .client
                        .transport()
                        .debts(&node.id, limit, timeout)
                        .await
                    {
                        Ok(listed) => {
                            more |= listed.more;
                            if listed.overflowed {
                                node.pending.record_owed(None, &holder.id, listed.through);
                            }
                            for key in &listed.keys {
                                node.pending
                                    .record_owed(Some(key), &holder.id, listed.through);
                            }
                            let stand_ins: Vec<String> = listed
                                .keys
                                .iter()
                                .filter(|k| !topology.ring.owners(k, replicas).contains(&h))
                                .cloned()
                                .collect();
                            if !stand_ins.is_empty() {
                                // Copies kept while the node was away
                                // (a stand-in's writes, a stopping node's
                                // parked entries) go back to it first.
                                restore.push((holder, stand_ins.clone()));
                                retired.push((holder, stand_ins));
                            }
                            if !listed.keys.is_empty() || listed.overflowed {
                                tracing::info!(node = %node.id, holder = %holder.id, keys = listed.keys.len(), overflowed = listed.overflowed, "read what the node missed from another node's records");
                            }
                        }
                        Err(error) => {
                            // Read again at the next round (the holder may
                            // answer by then).
                            tracing::debug!(node = %node.id, holder = %holder.id, %error, "cannot read the node's debts on a holder");
                            node.collect_debts.store(true, Ordering::Release);
                        }
                    }
                }
            }
            let incarnation = node.warmth.incarnation();
            for (holder, keys) in restore {
                let restored =
                    crate::parking::restore(self, node, holder, &keys, incarnation).await;
                if restored > 0 {
                    tracing::info!(node = %node.id, holder = %holder.id, keys = restored, "the node is back: copied back the entries another node kept for it");
                }
            }
            self.replay_invalidations(node).await;
            // Settled before the holders' copies are retired: the other
            // orchestrators learn from the feed that the node is up to
            // date before the copies they could restore from go.
            for (holder, through) in node.pending.take_marks() {
                let Some(h) = topology.nodes.iter().find(|n| *n.id == *holder) else {
                    continue;
                };
                if let Err(error) = h
                    .client
                    .transport()
                    .settle(&node.id, through, timeout)
                    .await
                {
                    tracing::debug!(node = %node.id, %holder, %error, "cannot settle debts on their holder yet");
                }
            }
            for (holder, keys) in retired {
                tracing::info!(node = %node.id, holder = %holder.id, keys = keys.len(), "the node is back: the copies another node kept for it will be deleted there");
                // At the holder's next replay, not at once: another
                // orchestrator bringing the node back at the same moment
                // may still restore from them (see above).
                for key in &keys {
                    self.invalidate_later(holder, key);
                }
            }
            if !more {
                break;
            }
            collect = true;
        }
    }

    /// Deletes, on `node`, the keys it may hold stale values of (a batch
    /// per call, until none are left or a call fails), or flushes it if
    /// there were too many to track.
    async fn replay_invalidations(&self, node: &Node) {
        let timeout = self.settings.stack.node_timeout;
        loop {
            match node.pending.take(self.settings.batch.max_ops) {
                Replay::Nothing => break,
                Replay::Flush => match node.client.transport().flush(timeout).await {
                    Ok(removed) => {
                        node.pending.flushed();
                        self.metrics.flushes.with_label_values(&[&*node.id]).inc();
                        tracing::warn!(node = %node.id, removed, "node flushed: it missed more updates than could be tracked");
                    }
                    Err(error) => {
                        tracing::warn!(node = %node.id, %error, "cannot flush the node yet");
                        break;
                    }
                },
                Replay::Keys(keys) => {
                    let ops = keys.iter().map(|(key, _)| delete_op(key.clone())).collect();
                    let deadline = Some(Instant::now() + timeout);
                    match node.client.call(ops, deadline, None).await {
                        Ok(results) => {
                            let done: Vec<(String, u64)> = keys
                                .into_iter()
                                .zip(&results)
                                .filter(|(_, r)| {
                                    matches!(r.result, Some(op_result::Result::Delete(_)))
                                })
                                .map(|(k, _)| k)
                                .collect();
                            let n = done.len();
                            node.pending.replayed(&done);
                            self.metrics
                                .invalidations_replayed
                                .with_label_values(&[&*node.id])
                                .inc_by(n as u64);
                            tracing::info!(node = %node.id, keys = n, "invalidated keys the node missed updates of");
                            if n == 0 {
                                break;
                            }
                        }
                        Err(error) => {
                            tracing::debug!(node = %node.id, %error, "cannot replay invalidations yet");
                            break;
                        }
                    }
                }
            }
        }
        self.metrics
            .pending_invalidations
            .with_label_values(&[&*node.id])
            .set(node.pending.len() as i64);
    }

    /// Deletes `keys` on `node`; the keys it did not confirm deleted (the
    /// call failed, or an op was answered otherwise) are recorded for
    /// invalidation there, so it does not serve them meanwhile.
    pub async fn delete_or_record(
        &self,
        node: &Node,
        keys: Vec<String>,
        deadline: Option<Instant>,
    ) {
        if keys.is_empty() {
            return;
        }
        let ops = keys.iter().map(|k| delete_op(k.clone())).collect();
        let answers = node
            .client
            .call(ops, deadline, None)
            .await
            .unwrap_or_default();
        for (i, key) in keys.iter().enumerate() {
            let deleted = answers
                .get(i)
                .is_some_and(|r| matches!(r.result, Some(op_result::Result::Delete(_))));
            if !deleted {
                self.invalidate_later(node, key);
            }
        }
    }

    /// A node's feed says `holder` recorded that `owner` may hold a stale
    /// value of `key` (`None`: of any key), as record `sequence`: routing
    /// skips the key on `owner` from now on, and the next health round
    /// deletes it there and settles the record.
    pub fn owed(&self, owner: &str, key: Option<&str>, holder: &str, sequence: u64) {
        let topology = self.topology();
        if let Some(node) = topology.nodes.iter().find(|n| *n.id == *owner) {
            node.pending.record_owed(key, holder, sequence);
            self.metrics
                .pending_invalidations
                .with_label_values(&[&*node.id])
                .set(node.pending.len() as i64);
        }
    }

    /// A node's feed says `holder` dropped its records of `owner`'s debts
    /// up to `through`: whichever orchestrator settled them brought the
    /// owner up to date on those keys, so they need no replay here.
    pub fn settled(&self, owner: &str, holder: &str, through: u64) {
        let topology = self.topology();
        if let Some(node) = topology.nodes.iter().find(|n| *n.id == *owner) {
            let cleared = node.pending.settled(holder, through);
            if cleared > 0 {
                tracing::debug!(node = %node.id, %holder, keys = cleared, "debts settled elsewhere");
                self.metrics
                    .pending_invalidations
                    .with_label_values(&[&*node.id])
                    .set(node.pending.len() as i64);
            }
        }
    }

    /// Counts a debt this orchestrator could not record on a node.
    pub fn debt_not_recorded(&self, holder: &Node) {
        self.metrics
            .debts_unrecorded
            .with_label_values(&[&*holder.id])
            .inc();
    }

    /// A node's feed had a gap: debt records it published may have been
    /// missed, so every node's debts are read again at the next round.
    pub fn feed_gap(&self) {
        for node in &self.topology().nodes {
            node.collect_debts.store(true, Ordering::Release);
        }
    }

    /// Records that `node` may hold a stale value of `key`.
    pub fn invalidate_later(&self, node: &Node, key: &str) {
        node.pending.record(key);
        self.metrics
            .pending_invalidations
            .with_label_values(&[&*node.id])
            .set(node.pending.len() as i64);
    }
}

/// Asks the node at `address` for its identity (`Node/Stats` → `node_id`).
pub async fn identify(address: &str, settings: &CallSettings) -> Result<NodeId, String> {
    let transport =
        Transport::new(address, settings.transport.clone()).map_err(|e| e.to_string())?;
    let id = transport
        .node_id(settings.stack.node_timeout + settings.transport.connect_timeout)
        .await?;
    if id.is_empty() {
        return Err(format!("{address} reports no node_id"));
    }
    Ok(NodeId::from(id))
}
