//! `ringcache.v1.Cache/Pipeline`: many single-key calls on one long-lived
//! stream, served the same way by both binaries.
//!
//! A unary call costs an HTTP/2 stream, a header block each way, trailers
//! and a task; an op on an open stream costs one message, and many
//! messages share each read and write. [`Pipelines::serve`] runs every op
//! through the service's own unary handler (`Cache::get`, `Cache::set`, …),
//! so an op has exactly the semantics, limits and refusals of its unary
//! call: through the orchestrator it enters the same router and coalescer,
//! on a node it runs on the store.
//!
//! Per stream, one task reads ops, runs them concurrently (not one task per
//! op) and writes the answers as they finish, in any order, matched by id:
//!
//! - **Bounded.** At most `--pipeline-depth` ops are running or waiting to
//!   be sent; beyond it the stream is not read, so HTTP/2 flow control holds
//!   the client back. Each op also holds its request's bytes and its
//!   answer's on the server's in-flight byte budget from when it is read
//!   until its answer is handed on, and an op that would pass the budget
//!   answers `RESOURCE_EXHAUSTED`. A client that never reads its answers
//!   stops being read: the server's memory stays bounded.
//! - **Roles per op.** The stream opens with any data token; each op is
//!   checked against the role its unary call needs ([`Caller::refusal`]).
//! - **Deadlines per op.** An op's `timeout`, capped by
//!   `--request-timeout`, is its deadline (the unary call's `grpc-timeout`).
//! - **Traces per op.** Each op is one SERVER span continuing its own
//!   `traceparent`; the stream itself is not traced.
//! - **Every op read is answered.** When the server drains, or the stream
//!   reaches `--max-connection-age`, it stops reading, answers the ops in
//!   flight and ends the stream with `UNAVAILABLE`: the ops left without an
//!   answer never ran and may be sent again. A duplicate id in flight or an
//!   undecodable message ends the stream with `INVALID_ARGUMENT` the same
//!   way.

use std::{
    collections::{HashSet, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt, stream::FuturesUnordered};
use opentelemetry::Context as OtelContext;
use pin_project_lite::pin_project;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use prost::Message as _;
use ringcache_proto::{
    google::rpc::Status as RpcStatus,
    v1::{
        PipelineRequest, PipelineResponse, cache_server::Cache, pipeline_request::Op,
        pipeline_response::Result as Answer,
    },
};
use tonic::{Request, Response, Status, Streaming};
use tracing::Span;

use crate::{auth::Caller, deadline::OpDeadline, inflight_bytes::CallBytes};

/// Ops in flight per stream by default (`--pipeline-depth`).
pub const DEFAULT_DEPTH: usize = 128;

/// The most `--pipeline-depth` may be.
pub const MAX_DEPTH: usize = 65_536;

/// The answers of a `Pipeline` call.
pub type PipelineStream = Pin<Box<dyn Stream<Item = Result<PipelineResponse, Status>> + Send>>;

/// The kinds of op, in the order of the metrics' handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Set,
    Delete,
    Increment,
    Touch,
    Exists,
}

const KINDS: [Kind; 6] = [
    Kind::Get,
    Kind::Set,
    Kind::Delete,
    Kind::Increment,
    Kind::Touch,
    Kind::Exists,
];

impl Kind {
    fn of(op: &Op) -> Self {
        match op {
            Op::Get(_) => Kind::Get,
            Op::Set(_) => Kind::Set,
            Op::Delete(_) => Kind::Delete,
            Op::Increment(_) => Kind::Increment,
            Op::Touch(_) => Kind::Touch,
            Op::Exists(_) => Kind::Exists,
        }
    }

    /// The unary method's name, as the metrics label it.
    fn method(self) -> &'static str {
        match self {
            Kind::Get => "Get",
            Kind::Set => "Set",
            Kind::Delete => "Delete",
            Kind::Increment => "Increment",
            Kind::Touch => "Touch",
            Kind::Exists => "Exists",
        }
    }

    /// The unary method's path: what its role and span are decided by.
    fn path(self) -> &'static str {
        match self {
            Kind::Get => "/ringcache.v1.Cache/Get",
            Kind::Set => "/ringcache.v1.Cache/Set",
            Kind::Delete => "/ringcache.v1.Cache/Delete",
            Kind::Increment => "/ringcache.v1.Cache/Increment",
            Kind::Touch => "/ringcache.v1.Cache/Touch",
            Kind::Exists => "/ringcache.v1.Cache/Exists",
        }
    }
}

/// Ops, streams and op latency, by method and status code.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    ops: IntCounterVec,
    /// `ops` with code OK, per kind, resolved once (the common case).
    ok: Vec<IntCounter>,
    seconds: Vec<Histogram>,
    streams: IntGauge,
}

impl PipelineMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let ops = IntCounterVec::new(
            Opts::new(
                "ringcache_pipeline_ops_total",
                "Ops answered on Pipeline streams, by method and status code (each as its unary call would be: grpc_code OK, NotFound, ...).",
            ),
            &["grpc_method", "grpc_code"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "ringcache_pipeline_op_seconds",
                "Time from reading a Pipeline op to its answer, by method.",
            )
            .buckets(crate::metrics::LATENCY_BUCKETS.to_vec()),
            &["grpc_method"],
        )?;
        let streams = IntGauge::new(
            "ringcache_pipeline_streams",
            "Pipeline streams open now.",
        )?;
        registry.register(Box::new(ops.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(streams.clone()))?;
        Ok(Self {
            ok: KINDS
                .iter()
                .map(|k| ops.with_label_values(&[k.method(), "OK"]))
                .collect(),
            seconds: KINDS
                .iter()
                .map(|k| seconds.with_label_values(&[k.method()]))
                .collect(),
            ops,
            streams,
        })
    }

    fn record(&self, kind: Kind, code: tonic::Code, elapsed: Duration) {
        let i = kind as usize;
        match code {
            tonic::Code::Ok => self.ok[i].inc(),
            code => self
                .ops
                .with_label_values(&[kind.method(), crate::metrics::code_name(code)])
                .inc(),
        }
        self.seconds[i].observe(elapsed.as_secs_f64());
    }
}

/// Serves `Pipeline` streams for a service; cheap to clone. See the module
/// documentation.
#[derive(Debug, Clone)]
pub struct Pipelines {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    depth: usize,
    request_timeout: Duration,
    max_message_bytes: String,
    max_age: Option<Duration>,
    /// True once the server closes its listener (drain): streams stop
    /// reading and end.
    closing: tokio::sync::watch::Sender<bool>,
    metrics: Option<PipelineMetrics>,
}

impl Default for Pipelines {
    /// The defaults of the flags: [`DEFAULT_DEPTH`], a 5 s
    /// `--request-timeout`.
    fn default() -> Self {
        Self::with_limits(DEFAULT_DEPTH, Duration::from_secs(5), 4 << 20)
    }
}

impl Pipelines {
    /// Streams of at most `limits.pipeline_depth` ops in flight, each op
    /// given at most `limits.request_timeout`.
    pub fn new(limits: &crate::config::LimitArgs) -> Self {
        Self::with_limits(
            limits.pipeline_depth,
            limits.request_timeout,
            limits.max_message_bytes(),
        )
    }

    /// Streams of at most `depth` ops in flight, each op given at most
    /// `request_timeout`; `max_message_bytes` is named in refusals.
    pub fn with_limits(depth: usize, request_timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                depth: depth.clamp(1, MAX_DEPTH),
                request_timeout,
                max_message_bytes: max_message_bytes.to_string(),
                max_age: None,
                closing: tokio::sync::watch::channel(false).0,
                metrics: None,
            }),
        }
    }

    fn with_inner(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            depth: shared.depth,
            request_timeout: shared.request_timeout,
            max_message_bytes: shared.max_message_bytes.clone(),
            max_age: shared.max_age,
            closing: shared.closing.clone(),
            metrics: shared.metrics.clone(),
        });
        f(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Ends each stream cleanly (as on drain) once it is `age` old (zero:
    /// never): `--max-connection-age` for streams, whose connection would
    /// otherwise stay open for as long as they do.
    pub fn with_max_age(self, age: Duration) -> Self {
        self.with_inner(|i| i.max_age = (!age.is_zero()).then_some(age))
    }

    /// Records ops and streams in `metrics`.
    pub fn with_metrics(self, metrics: PipelineMetrics) -> Self {
        self.with_inner(|i| i.metrics = Some(metrics))
    }

    /// Stops every stream reading: each answers its ops in flight and ends
    /// with `UNAVAILABLE`. New streams are refused. Called by
    /// [`crate::server::serve`] when the listener closes.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Serves one `Pipeline` call on `service`, whose unary handlers run
    /// each op.
    pub fn serve<S>(
        &self,
        service: S,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status>
    where
        S: Cache + Send + Sync + 'static,
    {
        if *self.inner.closing.borrow() {
            return Err(draining());
        }
        let stream = StreamContext {
            caller: request.extensions().get::<Caller>().copied(),
            bytes: request.extensions().get::<CallBytes>().cloned(),
        };
        let input = request.into_inner();
        let depth = self.inner.depth;
        let (tx, rx) = tokio::sync::mpsc::channel(depth);
        let inner = self.inner.clone();
        if let Some(m) = &inner.metrics {
            m.streams.inc();
        }
        tokio::spawn(async move {
            drive(&service, &inner, input, &stream, tx).await;
            if let Some(m) = &inner.metrics {
                m.streams.dec();
            }
        });
        // An answer's bytes stay held until it is handed on to be encoded.
        let answers = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|item: Item| item.map(|(response, _held)| response));
        Ok(Response::new(Box::pin(answers)))
    }
}

/// What the driver hands on: an answer and the bytes it holds, or the
/// status ending the stream.
type Item = Result<(PipelineResponse, Option<CallBytes>), Status>;

/// What a stream's ops share.
#[derive(Debug)]
struct StreamContext {
    /// The caller's role, with authentication on.
    caller: Option<Caller>,
    /// The stream's share of the in-flight byte budget.
    bytes: Option<CallBytes>,
}

/// An op answered, waiting to be sent.
struct Done {
    id: u64,
    response: PipelineResponse,
    held: Option<CallBytes>,
}

fn draining() -> Status {
    Status::unavailable(
        "the server is shutting down: ops without an answer were not run; send them again on a new stream (another server)",
    )
}

/// Reads, runs and answers ops until the stream ends; see the module
/// documentation.
async fn drive<S: Cache>(
    service: &S,
    inner: &Inner,
    mut input: Streaming<PipelineRequest>,
    stream: &StreamContext,
    tx: tokio::sync::mpsc::Sender<Item>,
) {
    let mut running = FuturesUnordered::new();
    let mut ready: VecDeque<Done> = VecDeque::new();
    let mut ids: HashSet<u64> = HashSet::new();
    let mut closing = inner.closing.subscribe();
    let aged = async {
        match inner.max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(aged);
    let mut reading = true;
    let mut end: Option<Status> = None;
    loop {
        let room = running.len() + ready.len() < inner.depth;
        tokio::select! {
            biased;
            permit = tx.reserve(), if !ready.is_empty() => {
                // The client went away: nothing more can be answered.
                let Ok(permit) = permit else { return };
                if let Some(done) = ready.pop_front() {
                    ids.remove(&done.id);
                    permit.send(Ok((done.response, done.held)));
                }
            }
            Some(done) = running.next(), if !running.is_empty() => ready.push_back(done),
            _ = closing.wait_for(|c| *c), if reading => {
                reading = false;
                end = Some(draining());
            }
            () = &mut aged, if reading => {
                reading = false;
                end = Some(Status::unavailable(
                    "the stream reached --max-connection-age: ops without an answer were not run; send them again on a new stream",
                ));
            }
            message = input.message(), if reading && room => match message {
                Ok(Some(op)) => {
                    if ids.insert(op.id) {
                        running.push(run(service, inner, stream, op));
                    } else {
                        reading = false;
                        end = Some(Status::invalid_argument(format!(
                            "op id {} is already in flight on this stream: ids must be unique among unanswered ops (the stream ends; ops without an answer were not run)",
                            op.id
                        )));
                    }
                }
                // The client has sent everything: answer, then end with OK.
                Ok(None) => reading = false,
                Err(status) => {
                    reading = false;
                    let status = crate::refusals::clarify(&status, &inner.max_message_bytes)
                        .unwrap_or(status);
                    end = Some(Status::new(
                        status.code(),
                        format!(
                            "{} (the stream ends; ops read before this message are answered, ops without an answer were not run)",
                            status.message()
                        ),
                    ));
                }
            },
            else => break,
        }
    }
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
}

/// Runs one op through the service's unary handler and answers it.
async fn run<S: Cache>(
    service: &S,
    inner: &Inner,
    stream: &StreamContext,
    op: PipelineRequest,
) -> Done {
    let started = Instant::now();
    let id = op.id;
    let size = op.encoded_len() as u64;
    let PipelineRequest {
        op,
        timeout,
        traceparent,
        tracestate,
        ..
    } = op;
    let Some(op) = op else {
        return failed(
            id,
            Status::invalid_argument(format!(
                "op {id} has no operation: set one of get, set, delete, increment, touch, exists"
            )),
        );
    };
    let kind = Kind::of(&op);
    let (result, held) = checked(service, inner, stream, kind, op, size, timeout, started, &traceparent, &tracestate).await;
    if let Some(m) = &inner.metrics {
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        m.record(kind, code, started.elapsed());
    }
    match result {
        Ok(answer) => Done {
            id,
            response: PipelineResponse {
                id,
                result: Some(answer),
            },
            held,
        },
        Err(status) => failed(id, status),
    }
}

/// Runs `op` of `kind` once it passes the checks its unary call would
/// (role, bytes, deadline), in its span; answers the result and the bytes
/// it holds.
#[allow(clippy::too_many_arguments)]
async fn checked<S: Cache>(
    service: &S,
    inner: &Inner,
    stream: &StreamContext,
    kind: Kind,
    op: Op,
    size: u64,
    timeout: Option<prost_types::Duration>,
    started: Instant,
    traceparent: &str,
    tracestate: &str,
) -> (Result<Answer, Status>, Option<CallBytes>) {
    if let Some(refusal) = stream.caller.and_then(|c| c.refusal(kind.path())) {
        return (Err(refusal), None);
    }
    let limit = match timeout.map(Duration::try_from) {
        None => inner.request_timeout,
        Some(Ok(t)) => t.min(inner.request_timeout),
        Some(Err(_)) => {
            return (
                Err(Status::invalid_argument(
                    "the op's timeout is negative or out of range: send a positive duration (or none for --request-timeout)",
                )),
                None,
            );
        }
    };
    let held = stream.bytes.as_ref().map(CallBytes::another);
    if let Some(h) = &held
        && let Err(refusal) = h.hold(size)
    {
        return (Err(refusal), None);
    }
    let deadline = started + limit;
    let (span, propagate) = if crate::telemetry::tracing_enabled() {
        crate::rpc_trace::op_span(kind.path(), traceparent, tracestate)
    } else {
        (Span::none(), None)
    };
    let call = dispatch(service, op, deadline, held.clone());
    let result = InSpan {
        inner: tokio::time::timeout_at(deadline.into(), call),
        span: span.clone(),
        propagate,
    }
    .await
    .unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "the op did not finish within its deadline of {limit:?} (its timeout, capped by --request-timeout)"
        )))
    });
    crate::rpc_trace::record_server_status(&span, result.as_ref().err());
    (result, held)
}

/// An op's answer: its unary handler's.
async fn dispatch<S: Cache>(
    service: &S,
    op: Op,
    deadline: Instant,
    held: Option<CallBytes>,
) -> Result<Answer, Status> {
    fn request<T>(message: T, deadline: Instant, held: Option<CallBytes>) -> Request<T> {
        let mut request = Request::new(message);
        let extensions = request.extensions_mut();
        extensions.insert(OpDeadline(deadline));
        if let Some(held) = held {
            extensions.insert(held);
        }
        request
    }
    Ok(match op {
        Op::Get(m) => Answer::Get(service.get(request(m, deadline, held)).await?.into_inner()),
        Op::Set(m) => Answer::Set(service.set(request(m, deadline, held)).await?.into_inner()),
        Op::Delete(m) => {
            Answer::Delete(service.delete(request(m, deadline, held)).await?.into_inner())
        }
        Op::Increment(m) => Answer::Increment(
            service
                .increment(request(m, deadline, held))
                .await?
                .into_inner(),
        ),
        Op::Touch(m) => {
            Answer::Touch(service.touch(request(m, deadline, held)).await?.into_inner())
        }
        Op::Exists(m) => {
            Answer::Exists(service.exists(request(m, deadline, held)).await?.into_inner())
        }
    })
}

fn failed(id: u64, status: Status) -> Done {
    Done {
        id,
        response: PipelineResponse {
            id,
            result: Some(Answer::Error(RpcStatus {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: Vec::new(),
            })),
        },
        held: None,
    }
}

pin_project! {
    /// Polls an op inside its span, with the context to propagate (for an
    /// op that is not recorded) current: what the server's trace layer does
    /// for a unary call.
    struct InSpan<F> {
        #[pin]
        inner: F,
        span: Span,
        propagate: Option<OtelContext>,
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = (!this.span.is_none()).then(|| this.span.enter());
        let _attached = this.propagate.as_ref().map(|c| c.clone().attach());
        this.inner.poll(cx)
    }
}
