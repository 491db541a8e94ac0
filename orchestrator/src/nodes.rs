//! The cache nodes the orchestrator routes to: one HTTP/2 channel each,
//! their health, and the calls made to them.
//!
//! [`Cluster`] holds the current [`Topology`] — the ring and a [`Node`] per
//! ring member — behind an `ArcSwap`, so request paths read it without
//! locks and membership changes swap it whole. A node that stays in the
//! membership keeps its channel and health record across swaps.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use ringcache_common::{rpc_trace, telemetry};
use ringcache_proto::service_names::CACHE;
use ringcache_proto::v1::{StatsRequest, cache_client::CacheClient, node_client::NodeClient};
use tokio::sync::Semaphore;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tracing::Instrument;

use crate::{
    health::{Health, HealthPolicy, State},
    metrics::ClusterMetrics,
    ring::{NodeId, Ring},
};

/// How to reach and call nodes.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// Longest wait for a TCP connection to a node.
    pub connect_timeout: Duration,
    /// Longest a call to a node may take (a shorter client deadline wins).
    pub node_timeout: Duration,
    /// Most calls in flight to one node from this orchestrator.
    pub max_node_in_flight: usize,
    /// Largest message to or from a node.
    pub max_message_bytes: usize,
    /// When to eject a node.
    pub health: HealthPolicy,
}

/// A member of the cluster: its ring identity and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// The identity on the ring.
    pub id: NodeId,
    /// `host:port`.
    pub address: String,
}

/// One cache node.
#[derive(Debug)]
pub struct Node {
    /// Its identity on the ring.
    pub id: NodeId,
    /// Where it is reached (`host:port`).
    pub address: String,
    channel: Channel,
    health: Mutex<Health>,
    /// Mirrors `health.routable()`, so routing reads an atomic, not a lock.
    routable: AtomicBool,
    in_flight: Arc<Semaphore>,
}

/// Opens a lazily connected channel to `address` (`host:port`; a host name
/// is resolved again whenever the connection is re-established).
pub fn channel(address: &str, settings: &CallSettings) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

impl Node {
    fn new(member: &Member, settings: &CallSettings) -> Result<Self, tonic::transport::Error> {
        Ok(Self {
            id: member.id.clone(),
            address: member.address.clone(),
            channel: channel(&member.address, settings)?,
            health: Mutex::new(Health::default()),
            routable: AtomicBool::new(true),
            in_flight: Arc::new(Semaphore::new(settings.max_node_in_flight)),
        })
    }

    /// Whether calls may go to this node now.
    pub fn routable(&self) -> bool {
        self.routable.load(Ordering::Relaxed)
    }

    /// The health state and consecutive failures.
    pub fn health(&self) -> (State, u32) {
        let h = self.health.lock();
        (h.state(), h.consecutive_failures())
    }

    /// A `ringcache.v1.Cache` client on the node's channel.
    pub fn cache(&self, max_message_bytes: usize) -> CacheClient<Channel> {
        CacheClient::new(self.channel.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
    }
}

/// The ring and its nodes; `nodes[i]` is the ring's node `i`.
#[derive(Debug, Default)]
pub struct Topology {
    /// Who owns which key.
    pub ring: Ring,
    /// The nodes, in ring index order.
    pub nodes: Vec<Arc<Node>>,
}

/// Whether a failed call says the node is in trouble (and so counts toward
/// ejection), as opposed to the request being refused.
pub fn is_node_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// The nodes, their health and the calls to them.
#[derive(Debug)]
pub struct Cluster {
    topology: ArcSwap<Topology>,
    settings: CallSettings,
    metrics: Arc<ClusterMetrics>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(settings: CallSettings, metrics: Arc<ClusterMetrics>) -> Self {
        Self {
            topology: ArcSwap::from_pointee(Topology::default()),
            settings,
            metrics,
        }
    }

    /// The call settings.
    pub fn settings(&self) -> &CallSettings {
        &self.settings
    }

    /// The current topology.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// Replaces the membership. Nodes whose identity and address are
    /// unchanged keep their channel and health; others are created or
    /// dropped. A no-op if nothing changed.
    pub fn set_members(&self, mut members: Vec<Member>) {
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
            match Node::new(member, &self.settings) {
                Ok(node) => nodes.push(Arc::new(node)),
                Err(error) => {
                    tracing::error!(node = %member.id, address = %member.address, %error, "cannot create a channel to the node; leaving it out");
                }
            }
        }
        // The ring must match the nodes that could be created.
        let ring = Ring::new(nodes.iter().map(|n| n.id.clone()));
        for gone in current
            .nodes
            .iter()
            .filter(|n| !nodes.iter().any(|m| m.id == n.id))
        {
            self.metrics.forget_node(&gone.id);
        }
        tracing::info!(
            nodes = ?nodes.iter().map(|n| format!("{}@{}", n.id, n.address)).collect::<Vec<_>>(),
            "membership changed"
        );
        self.metrics.ring_nodes.set(nodes.len() as i64);
        for n in &nodes {
            self.metrics.set_routable(&n.id, n.routable());
        }
        self.topology.store(Arc::new(Topology { ring, nodes }));
    }

    fn record_failure(&self, node: &Node, reason: &str) {
        let ejected = {
            let mut h = node.health.lock();
            let ejected = h.failed(Instant::now(), &self.settings.health);
            node.routable.store(h.routable(), Ordering::Relaxed);
            ejected
        };
        if ejected {
            tracing::warn!(node = %node.id, address = %node.address, reason, "node ejected");
            self.metrics.ejections.with_label_values(&[&*node.id]).inc();
            self.metrics.set_routable(&node.id, false);
        }
    }

    fn record_success(&self, node: &Node) {
        // Cheap path: nothing to do while healthy with no failures.
        let mut h = node.health.lock();
        if h.consecutive_failures() > 0 {
            h.call_succeeded();
        }
    }

    /// Calls `node` with `message` through `call`, within the node timeout
    /// and the request's `deadline`, counting the node's in-flight calls and
    /// recording metrics and passive health. When spans are exported, the
    /// call gets a CLIENT span (`keys` says how many keys it carries) whose
    /// context travels to the node in the request's metadata.
    pub async fn call<Req, T, F, Fut>(
        &self,
        node: &Node,
        method: &'static str,
        deadline: Option<Instant>,
        keys: usize,
        message: Req,
        call: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(CacheClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        // A CLIENT span only inside a recorded request; an unsampled one
        // passes its decision on without recording (`inject_current`).
        let span = if telemetry::tracing_enabled() && !tracing::Span::current().is_none() {
            let span = rpc_trace::client_span(CACHE, method, &node.address, &node.id);
            span.record("ringcache.keys", keys as i64);
            span
        } else {
            tracing::Span::none()
        };
        let result = self
            .call_inner(node, method, deadline, message, call, &span)
            .instrument(span.clone())
            .await;
        if !span.is_none() {
            rpc_trace::record_client_status(&span, result.as_ref().err());
        }
        result
    }

    async fn call_inner<Req, T, F, Fut>(
        &self,
        node: &Node,
        method: &'static str,
        deadline: Option<Instant>,
        message: Req,
        call: F,
        span: &tracing::Span,
    ) -> Result<T, Status>
    where
        F: FnOnce(CacheClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let Ok(_permit) = node.in_flight.clone().try_acquire_owned() else {
            self.metrics
                .observe(&node.id, method, Code::ResourceExhausted, Duration::ZERO);
            return Err(Status::resource_exhausted(format!(
                "node {} already has {} calls in flight from this orchestrator (--max-node-in-flight); retry with backoff",
                node.id, self.settings.max_node_in_flight
            )));
        };
        let now = Instant::now();
        let timeout = match deadline {
            Some(d) => d
                .saturating_duration_since(now)
                .min(self.settings.node_timeout),
            None => self.settings.node_timeout,
        };
        if timeout.is_zero() {
            return Err(Status::deadline_exceeded(
                "the request's deadline passed before the node was called",
            ));
        }
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        if !span.is_none() {
            rpc_trace::inject(span, &mut request);
        } else if telemetry::tracing_enabled() {
            rpc_trace::inject_current(&mut request);
        }
        let client = node.cache(self.settings.max_message_bytes);
        let result = match tokio::time::timeout(timeout, call(client, request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // The caller did not cancel (that would have dropped this
            // future): a CANCELLED here is the connection to the node
            // breaking mid-call — the node is unreachable, which callers
            // must see as the retryable UNAVAILABLE.
            Ok(Err(status)) if status.code() == Code::Cancelled => Err(Status::unavailable(
                format!("connection to the node was lost ({})", status.message()),
            )),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {} did not answer within {timeout:?}",
                node.id
            ))),
        };
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe(&node.id, method, code, now.elapsed());
        match &result {
            Err(status) if is_node_failure(status) => self.record_failure(node, status.message()),
            _ => self.record_success(node),
        }
        result
    }

    /// Counts a replica write that failed.
    pub fn replica_failed(&self, node: &Node, status: &Status) {
        self.metrics
            .replica_failures
            .with_label_values(&[&*node.id])
            .inc();
        tracing::warn!(node = %node.id, code = ?status.code(), message = status.message(), "replica write failed");
    }

    /// Runs one active health check of every node, in parallel.
    pub async fn check_all(&self, timeout: Duration) {
        let topology = self.topology();
        let checks = topology.nodes.iter().map(|node| async move {
            let mut client = HealthClient::new(node.channel.clone());
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: ringcache_proto::service_names::CACHE.to_owned(),
            });
            request.set_timeout(timeout);
            let outcome = match tokio::time::timeout(timeout, client.check(request)).await {
                Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
                Ok(Ok(r)) => Err(format!("health is {:?}", r.get_ref().status())),
                Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            match outcome {
                Ok(()) => {
                    let readmitted = {
                        let mut h = node.health.lock();
                        let readmitted = h.check_succeeded(Instant::now(), &self.settings.health);
                        node.routable.store(h.routable(), Ordering::Relaxed);
                        readmitted
                    };
                    if readmitted {
                        tracing::info!(node = %node.id, address = %node.address, "node readmitted");
                    }
                    self.metrics.set_routable(&node.id, node.routable());
                }
                Err(reason) => {
                    tracing::debug!(node = %node.id, %reason, "health check failed");
                    self.record_failure(node, &reason);
                }
            }
        });
        futures::future::join_all(checks).await;
    }
}

/// Asks the node at `address` for its identity (`Node/Stats` → `node_id`).
pub async fn identify(address: &str, settings: &CallSettings) -> Result<NodeId, Status> {
    let channel =
        channel(address, settings).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut request = tonic::Request::new(StatsRequest {});
    request.set_timeout(settings.node_timeout);
    let stats = tokio::time::timeout(
        settings.node_timeout + settings.connect_timeout,
        NodeClient::new(channel).stats(request),
    )
    .await
    .map_err(|_| Status::deadline_exceeded(format!("{address} did not answer")))??
    .into_inner();
    if stats.node_id.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{address} reports no node_id"
        )));
    }
    Ok(NodeId::from(stats.node_id))
}
