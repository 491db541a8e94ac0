//! How one cache node is called.
//!
//! A [`NodeClient`] per node: a [`batch::Coalescer`] over a tower stack of
//! [`layers`] over a [`transport::Transport`]. Every call is one
//! `ringcache.v1.Internal/Apply` carrying one or more ops (a client's
//! `Get`, a `GetMany`'s keys for this node, replica copies, …) and fails
//! with a typed [`CallError`]; nothing below the router reasons with
//! `tonic::Status`.
//!
//! ```text
//!  Router ──ops──▶ NodeClient
//!                   ├─ sampled request ──────────────┐ (its own call, so its
//!                   └─ Coalescer (queue, batches) ───┤  trace shows the node)
//!                                                    ▼
//!          Trace → Metrics → Health → Shed → Timeout → Transport ──HTTP/2──▶ node
//! ```

use std::{sync::Arc, time::Instant};

use ringcache_proto::v1::{DeleteRequest, GetRequest, Op, OpResult, op};
use tower::{ServiceBuilder, util::BoxCloneSyncService};

pub mod batch;
pub mod error;
pub mod layers;
pub mod stream;
pub mod transport;

pub use error::CallError;

/// An op that reads `key`.
pub fn get_op(key: &str) -> Op {
    Op {
        op: Some(op::Op::Get(GetRequest {
            key: key.to_owned(),
        })),
    }
}

/// An op that deletes `key` unconditionally.
pub fn delete_op(key: String) -> Op {
    Op {
        op: Some(op::Op::Delete(DeleteRequest { key, if_version: 0 })),
    }
}

use self::{
    batch::{BatchLimits, Coalescer},
    layers::{
        CallMetrics, HealthLayer, HealthRecorder, MetricsLayer, ShedLayer, TimeoutLayer, TraceLayer,
    },
    transport::Transport,
};

/// One call to a node: ops to run in order.
#[derive(Debug, Default)]
pub struct NodeCall {
    /// What to run.
    pub ops: Vec<Op>,
    /// The latest deadline of the callers this call serves; `None` if one
    /// of them has none. `--node-timeout` applies either way.
    pub deadline: Option<Instant>,
    /// For a sampled request: its span, which the call's CLIENT span is a
    /// child of.
    pub parent: Option<tracing::Span>,
    /// The trace context sent to the node (set by the trace layer).
    pub trace: Option<opentelemetry::Context>,
}

/// The node's answers, one per op in order — or fewer, when they did not
/// all fit in one message (the caller sends the rest again).
pub type NodeReply = Vec<OpResult>;

/// A node's call stack, type-erased.
pub type NodeStack = BoxCloneSyncService<NodeCall, NodeReply, CallError>;

/// What a node's stack needs to know.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// `--node-timeout`.
    pub node_timeout: std::time::Duration,
    /// `--max-node-in-flight`.
    pub max_in_flight: usize,
}

/// Builds a node's stack over `transport`; see [`layers`] for the order.
pub fn stack(
    node: &str,
    address: &str,
    transport: Transport,
    settings: &StackSettings,
    health: Arc<dyn HealthRecorder>,
    metrics: CallMetrics,
) -> NodeStack {
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new(node, address))
        .layer(MetricsLayer::new(metrics))
        .layer(HealthLayer::new(health))
        .layer(ShedLayer::new(settings.max_in_flight, node))
        .layer(TimeoutLayer::new(settings.node_timeout))
        .service(transport);
    BoxCloneSyncService::new(service)
}

/// Calls one node: coalesced with other callers' requests, or on its own
/// for sampled requests.
#[derive(Debug, Clone)]
pub struct NodeClient {
    coalescer: Arc<Coalescer>,
    transport: Transport,
}

impl NodeClient {
    /// A client over `stack` (whose innermost service is `transport`).
    pub fn new(stack: NodeStack, transport: Transport, limits: BatchLimits) -> Self {
        Self {
            coalescer: Coalescer::new(stack, limits),
            transport,
        }
    }

    /// Runs `ops` on the node and answers each, in order.
    ///
    /// A request inside a sampled trace (`parent` is its recorded span)
    /// goes in a call of its own, so that its trace shows this call's
    /// CLIENT span and the node's SERVER span as its children; all other
    /// requests are coalesced. Sampling is a small fraction of requests in
    /// production, so the cost of not batching them is small.
    pub async fn call(
        &self,
        ops: Vec<Op>,
        deadline: Option<Instant>,
        parent: Option<tracing::Span>,
    ) -> Result<NodeReply, CallError> {
        match parent {
            Some(parent) if !parent.is_none() => {
                self.coalescer.send_alone(ops, deadline, Some(parent)).await
            }
            _ => self.coalescer.call(ops, deadline).await,
        }
    }

    /// The node's connections (for health checks and identity).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
}
