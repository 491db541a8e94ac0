//! The layers of a node's call stack, one job each.
//!
//! Every layer wraps a `Service<NodeCall, Response = NodeReply, Error =
//! CallError>` and is tested alone with `tower_test` mocks. They are
//! composed in [`super::stack`], outermost first:
//!
//! 1. [`TraceLayer`] — the CLIENT span of a sampled call, outermost so it
//!    covers everything below, including the wait for a permit and the
//!    timeout, and records the final outcome.
//! 2. [`MetricsLayer`] — counts and times every call with its final
//!    outcome, including calls shed or timed out below it, and calls whose
//!    caller went away (counted as `Canceled` when their future is
//!    dropped).
//! 3. [`HealthLayer`] — passive health: outcomes that blame the node
//!    ([`CallError::is_node_fault`]) count toward ejecting it, an answer
//!    from the node resets the count, and a call that ended without
//!    telling (cut by its caller's deadline, or dropped) is neither: it
//!    asks for an active probe of the node instead. Above the timeout, so
//!    a node that does not answer within `--node-timeout` is blamed; the
//!    timeout layer tells a caller's deadline from `--node-timeout`.
//! 4. [`ShedLayer`] — at most `--max-node-in-flight` calls to the node at
//!    once; beyond that, refuse at once ([`CallError::Shed`]) rather than
//!    queue. Below health, so our own shedding never blames the node.
//! 5. [`TimeoutLayer`] — the shorter of `--node-timeout` and the caller's
//!    deadline, knowing which fired.
//! 6. the transport ([`super::transport::Transport`]).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus::{Histogram, IntCounter};
use ringcache_common::{deadline::unfinished_code, rpc_trace, telemetry};
use ringcache_proto::service_names::INTERNAL;
use tokio::sync::Semaphore;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{CallError, NodeCall, NodeReply};

/// A boxed response future.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<NodeReply, CallError>> + Send + 'static>>;

/// Every status code, in `Code as usize` order, for per-code counters.
pub const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

// ---------------------------------------------------------------- timeout

/// Bounds a call by `--node-timeout` and by the caller's deadline
/// (`NodeCall::deadline`), and says which one fired.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    node_timeout: Duration,
}

impl TimeoutLayer {
    /// Calls get at most `node_timeout`.
    pub fn new(node_timeout: Duration) -> Self {
        Self { node_timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            node_timeout: self.node_timeout,
        }
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    node_timeout: Duration,
}

impl<S> Service<NodeCall> for Timeout<S>
where
    S: Service<NodeCall, Response = NodeReply, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = NodeReply;
    type Error = CallError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: NodeCall) -> CallFuture {
        let node_timeout = self.node_timeout;
        let (wait, callers) = match call.deadline {
            Some(d) => match d.saturating_duration_since(Instant::now()) {
                left if left.is_zero() => {
                    return Box::pin(async { Err(CallError::CallerDeadline) });
                }
                left if left < node_timeout => (left, true),
                _ => (node_timeout, false),
            },
            None => (node_timeout, false),
        };
        let inner = self.inner.call(call);
        Box::pin(async move {
            match tokio::time::timeout(wait, inner).await {
                Ok(result) => result,
                Err(_) if callers => Err(CallError::CallerDeadline),
                Err(_) => Err(CallError::NodeTimeout(node_timeout)),
            }
        })
    }
}

// ------------------------------------------------------------------ shed

/// Refuses calls beyond a number in flight at once, without queueing.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    message: Arc<str>,
}

impl ShedLayer {
    /// At most `limit` calls in flight through every service this layer
    /// makes (they share the budget); `node` names the node in refusals.
    pub fn new(limit: usize, node: &str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            message: format!(
                "node {node} already has {limit} calls in flight from this orchestrator (--max-node-in-flight); retry with backoff"
            )
            .into(),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            permits: self.permits.clone(),
            message: self.message.clone(),
        }
    }
}

/// The service made by [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    message: Arc<str>,
}

impl<S> Service<NodeCall> for Shed<S>
where
    S: Service<NodeCall, Response = NodeReply, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = NodeReply;
    type Error = CallError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: NodeCall) -> CallFuture {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let inner = self.inner.call(call);
                Box::pin(async move {
                    let result = inner.await;
                    drop(permit);
                    result
                })
            }
            Err(_) => {
                let message = self.message.to_string();
                Box::pin(async move { Err(CallError::Shed(message)) })
            }
        }
    }
}

// ---------------------------------------------------------------- health

/// Where passive health goes: the node's health record.
pub trait HealthRecorder: fmt::Debug + Send + Sync + 'static {
    /// The node answered the call (with results, or with a status that
    /// does not blame it).
    fn call_succeeded(&self);
    /// A call failed in a way that blames the node.
    fn call_failed(&self, error: &CallError);
    /// A call ended without saying whether the node answers: its caller's
    /// deadline passed first, or its caller went away. Neither a success
    /// nor a failure; the recorder should find out by other means (an
    /// active check), or a node that hangs would never be blamed while
    /// callers use deadlines shorter than `--node-timeout`.
    fn call_inconclusive(self: Arc<Self>);
}

/// How [`HealthLayer`] files one call's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The node answered.
    Answered,
    /// The node is to blame.
    Failed,
    /// Nothing is known about the node.
    Inconclusive,
    /// Not about the node at all (our own shedding).
    Ignored,
}

impl Verdict {
    /// The verdict on one outcome.
    pub fn of(result: &Result<NodeReply, CallError>) -> Self {
        match result {
            Ok(_) => Verdict::Answered,
            Err(CallError::CallerDeadline) => Verdict::Inconclusive,
            Err(CallError::Shed(_)) => Verdict::Ignored,
            Err(e) if e.is_node_fault() => Verdict::Failed,
            // A status from the node that does not blame it: an answer.
            Err(_) => Verdict::Answered,
        }
    }
}

/// Feeds call outcomes to a [`HealthRecorder`].
#[derive(Debug, Clone)]
pub struct HealthLayer {
    recorder: Arc<dyn HealthRecorder>,
}

impl HealthLayer {
    /// Reports to `recorder`.
    pub fn new(recorder: Arc<dyn HealthRecorder>) -> Self {
        Self { recorder }
    }
}

impl<S> Layer<S> for HealthLayer {
    type Service = HealthAccounting<S>;
    fn layer(&self, inner: S) -> HealthAccounting<S> {
        HealthAccounting {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// The service made by [`HealthLayer`].
#[derive(Debug, Clone)]
pub struct HealthAccounting<S> {
    inner: S,
    recorder: Arc<dyn HealthRecorder>,
}

impl<S> Service<NodeCall> for HealthAccounting<S>
where
    S: Service<NodeCall, Response = NodeReply, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = NodeReply;
    type Error = CallError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: NodeCall) -> CallFuture {
        let mut pending = PendingVerdict {
            recorder: Some(self.recorder.clone()),
        };
        let inner = self.inner.call(call);
        Box::pin(async move {
            let result = inner.await;
            if let Some(recorder) = pending.recorder.take() {
                match Verdict::of(&result) {
                    Verdict::Answered => recorder.call_succeeded(),
                    Verdict::Failed => {
                        if let Err(e) = &result {
                            recorder.call_failed(e);
                        }
                    }
                    Verdict::Inconclusive => recorder.call_inconclusive(),
                    Verdict::Ignored => {}
                }
            }
            result
        })
    }
}

/// Reports a call dropped before its outcome (its caller went away) as
/// inconclusive.
struct PendingVerdict {
    recorder: Option<Arc<dyn HealthRecorder>>,
}

impl Drop for PendingVerdict {
    fn drop(&mut self) {
        if let Some(recorder) = self.recorder.take() {
            recorder.call_inconclusive();
        }
    }
}

// --------------------------------------------------------------- metrics

/// One node's call metrics, resolved once so a call touches no label map.
#[derive(Debug, Clone)]
pub struct CallMetrics {
    /// `ringcache_node_calls_total{node, code}`, indexed by `Code as usize`.
    pub calls: Arc<[IntCounter; 17]>,
    /// `ringcache_node_call_seconds{node}`.
    pub latency: Histogram,
    /// `ringcache_node_call_ops{node}`: ops per call (how well calls are
    /// coalesced).
    pub ops: Histogram,
}

/// Counts and times every call with its final outcome.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: CallMetrics,
}

impl MetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: CallMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service made by [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    metrics: CallMetrics,
}

/// Records a call when dropped: with its outcome once known, or as
/// unfinished ([`unfinished_code`]) if its caller went away first.
struct Record {
    metrics: CallMetrics,
    start: Instant,
    deadline: Option<Instant>,
    code: Option<Code>,
}

impl Drop for Record {
    fn drop(&mut self) {
        let code = self
            .code
            .unwrap_or_else(|| unfinished_code(self.deadline.map(tokio::time::Instant::from_std)));
        self.metrics.calls[code as usize].inc();
        self.metrics
            .latency
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl<S> Service<NodeCall> for Metrics<S>
where
    S: Service<NodeCall, Response = NodeReply, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = NodeReply;
    type Error = CallError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: NodeCall) -> CallFuture {
        self.metrics.ops.observe(call.ops.len() as f64);
        let mut record = Record {
            metrics: self.metrics.clone(),
            start: Instant::now(),
            deadline: call.deadline,
            code: None,
        };
        let inner = self.inner.call(call);
        Box::pin(async move {
            let result = inner.await;
            record.code = Some(match &result {
                Ok(_) => Code::Ok,
                Err(e) => e.code(),
            });
            drop(record);
            result
        })
    }
}

// ----------------------------------------------------------------- trace

/// Opens a CLIENT span for calls that carry a sampled parent span, and
/// sends its context to the node.
#[derive(Debug, Clone)]
pub struct TraceLayer {
    address: Arc<str>,
    node: Arc<str>,
}

impl TraceLayer {
    /// Spans name `node` at `address`.
    pub fn new(node: &str, address: &str) -> Self {
        Self {
            address: address.into(),
            node: node.into(),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            address: self.address.clone(),
            node: self.node.clone(),
        }
    }
}

/// The service made by [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    address: Arc<str>,
    node: Arc<str>,
}

impl<S> Service<NodeCall> for Trace<S>
where
    S: Service<NodeCall, Response = NodeReply, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = NodeReply;
    type Error = CallError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: NodeCall) -> CallFuture {
        let Some(parent) = call.parent.take().filter(|p| !p.is_none()) else {
            return Box::pin(self.inner.call(call));
        };
        if !telemetry::tracing_enabled() {
            return Box::pin(self.inner.call(call));
        }
        let span = {
            let _entered = parent.enter();
            rpc_trace::client_span(INTERNAL, "Apply", &self.address, &self.node)
        };
        span.record("ringcache.keys", call.ops.len() as i64);
        call.trace = Some(span.context());
        let mut outcome = SpanOutcome {
            span: span.clone(),
            deadline: call.deadline,
            recorded: false,
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(call)
        };
        Box::pin(async move {
            let result = inner.instrument(span.clone()).await;
            let status = result.as_ref().err().map(|e| e.to_status(""));
            rpc_trace::record_client_status(&span, status.as_ref());
            outcome.done();
            result
        })
    }
}

/// Records a CLIENT span's outcome if its call is dropped unfinished (the
/// server cut the request short, or the client went away).
struct SpanOutcome {
    span: tracing::Span,
    deadline: Option<Instant>,
    recorded: bool,
}

impl SpanOutcome {
    /// The outcome was recorded.
    fn done(&mut self) {
        self.recorded = true;
    }
}

impl Drop for SpanOutcome {
    fn drop(&mut self) {
        if !self.recorded {
            let status = tonic::Status::new(
                unfinished_code(self.deadline.map(tokio::time::Instant::from_std)),
                "the call did not finish: its request was cut short",
            );
            rpc_trace::record_client_status(&self.span, Some(&status));
        }
    }
}

#[cfg(test)]
mod tests;
