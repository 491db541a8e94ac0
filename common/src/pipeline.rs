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

use crate::{auth::Caller, deadline::OpDeadline, direct::DirectEpoch, inflight_bytes::CallBytes};

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
        let streams = IntGauge::new("ringcache_pipeline_streams", "Pipeline streams open now.")?;
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

    /// Completes once [`Pipelines::close`] was called (the server drains):
    /// other long-lived response streams of the service end with it too.
    pub async fn closed(&self) {
        let mut closing = self.inner.closing.subscribe();
        let _ = closing.wait_for(|c| *c).await;
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
            direct: DirectEpoch::from_metadata(request.metadata()),
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
    /// The epoch a direct client routed this stream's reads by (the
    /// stream's `ringcache-direct-epoch`), handed to every op.
    direct: Option<DirectEpoch>,
}

/// An op answered, waiting to be sent.
struct Done {
    id: u64,
    /// What the op held back while it ran (see [`Sequence`]).
    order: Sequence,
    response: PipelineResponse,
    held: Option<CallBytes>,
}

/// What an op waits for, so that ops run in the order they were sent
/// where that order can matter: a write and then a read of the same key
/// on one stream read the write, as on one connection to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sequence {
    /// A single-key op: runs after the stream's earlier ops on its key.
    Key(String),
    /// An op on several keys (`Exists`): runs once every earlier op has
    /// finished, and holds the stream's later ops back until it has.
    Barrier,
    /// An op that runs nothing (it has no body).
    Free,
}

impl Sequence {
    fn of(op: &PipelineRequest) -> Self {
        match &op.op {
            Some(Op::Get(m)) => Sequence::Key(m.key.clone()),
            Some(Op::Set(m)) => Sequence::Key(m.key.clone()),
            Some(Op::Delete(m)) => Sequence::Key(m.key.clone()),
            Some(Op::Increment(m)) => Sequence::Key(m.key.clone()),
            Some(Op::Touch(m)) => Sequence::Key(m.key.clone()),
            Some(Op::Exists(m)) => match m.keys.as_slice() {
                [key] => Sequence::Key(key.clone()),
                _ => Sequence::Barrier,
            },
            None => Sequence::Free,
        }
    }
}

/// The ops of a stream read but not yet started, each behind an earlier
/// op on its key (or behind a barrier).
#[derive(Default)]
struct Waiting {
    /// Keys with an op running, and the ops waiting behind it, in order.
    keys: std::collections::HashMap<String, VecDeque<PipelineRequest>, foldhash::fast::RandomState>,
    /// Ops in `keys`' queues.
    queued: usize,
    /// A barrier op read: waiting for the ops before it (`Some(Some)`), or
    /// running (`Some(None)`). No op is read meanwhile.
    barrier: Option<Option<PipelineRequest>>,
}

impl Waiting {
    /// Takes `op` (read just now, in `order`): answers it if it may run
    /// now, else keeps it until [`Waiting::finished`] releases it.
    fn admit(
        &mut self,
        op: PipelineRequest,
        order: &Sequence,
        running: usize,
    ) -> Option<PipelineRequest> {
        match order {
            Sequence::Free => Some(op),
            Sequence::Key(key) => match self.keys.get_mut(key) {
                Some(queue) => {
                    queue.push_back(op);
                    self.queued += 1;
                    None
                }
                None => {
                    self.keys.insert(key.clone(), VecDeque::new());
                    Some(op)
                }
            },
            Sequence::Barrier => {
                if running == 0 && self.queued == 0 {
                    self.barrier = Some(None);
                    Some(op)
                } else {
                    self.barrier = Some(Some(op));
                    None
                }
            }
        }
    }

    /// An op in `order` finished; `running` ops still run. Answers the ops
    /// that may run now.
    fn finished(&mut self, order: &Sequence, running: usize) -> Vec<PipelineRequest> {
        let mut start = Vec::new();
        match order {
            Sequence::Key(key) => {
                if let Some(queue) = self.keys.get_mut(key) {
                    match queue.pop_front() {
                        Some(next) => {
                            self.queued -= 1;
                            start.push(next);
                        }
                        None => {
                            self.keys.remove(key);
                        }
                    }
                }
            }
            Sequence::Barrier => self.barrier = None,
            Sequence::Free => {}
        }
        if running + start.len() == 0
            && self.queued == 0
            && let Some(waiting) = self.barrier.as_mut()
            && let Some(op) = waiting.take()
        {
            start.push(op);
        }
        start
    }

    /// Whether the stream may read another op (none waits on a barrier).
    fn reading(&self) -> bool {
        self.barrier.is_none()
    }
}

/// The trailer that marks a stream's end as clean: every op the server read
/// was answered, so the ops without an answer never ran and may be sent
/// again whatever they are. A stream that ends without it (a connection
/// lost) leaves them unknown.
pub const NOT_RUN_TRAILER: &str = "ringcache-unanswered-not-run";

/// `status`, marked with [`NOT_RUN_TRAILER`].
fn clean_end(status: Status) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        NOT_RUN_TRAILER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Status::with_metadata(status.code(), status.message(), metadata)
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
    use futures::FutureExt as _;
    let mut running = FuturesUnordered::new();
    let mut waiting = Waiting::default();
    let mut ready: VecDeque<Done> = VecDeque::new();
    let mut ids: HashSet<u64, foldhash::fast::RandomState> = HashSet::default();
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
    // Ops read and not yet handed on count against the depth, whatever they
    // are doing.
    macro_rules! room {
        () => {
            running.len() + waiting.queued + ready.len() < inner.depth && waiting.reading()
        };
    }
    // A message read from the stream.
    macro_rules! accept {
        ($message:expr) => {
            match $message {
                Ok(Some(op)) => {
                    if ids.insert(op.id) {
                        let order = Sequence::of(&op);
                        if let Some(op) = waiting.admit(op, &order, running.len()) {
                            running.push(run(service, inner, stream, op, order));
                        }
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
            }
        };
    }
    // An op that finished: the ops waiting behind it start.
    macro_rules! finished {
        ($done:expr) => {{
            let done: Done = $done;
            for op in waiting.finished(&done.order, running.len()) {
                let order = Sequence::of(&op);
                running.push(run(service, inner, stream, op, order));
            }
            ready.push_back(done);
        }};
    }
    loop {
        // Before waiting: every op already received is taken (ops read
        // together reach the nodes in one batch), every op already finished
        // is collected, and every answer ready is handed on (answers ready
        // together leave in one write).
        while reading && room!() {
            match input.message().now_or_never() {
                Some(message) => accept!(message),
                None => break,
            }
        }
        while let Some(Some(done)) = running.next().now_or_never() {
            finished!(done);
        }
        if !ready.is_empty() && ready.len() < running.len() {
            // More answers are on their way: let the tasks bringing them
            // run once, so that they leave in the same write.
            tokio::task::yield_now().await;
            while let Some(Some(done)) = running.next().now_or_never() {
                finished!(done);
            }
        }
        while !ready.is_empty() {
            match tx.try_reserve() {
                Ok(permit) => {
                    if let Some(done) = ready.pop_front() {
                        ids.remove(&done.id);
                        permit.send(Ok((done.response, done.held)));
                    }
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(())) => break,
                // The client went away: nothing more can be answered.
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
            }
        }
        let room = room!();
        tokio::select! {
            biased;
            permit = tx.reserve(), if !ready.is_empty() => {
                let Ok(permit) = permit else { return };
                if let Some(done) = ready.pop_front() {
                    ids.remove(&done.id);
                    permit.send(Ok((done.response, done.held)));
                }
            }
            Some(done) = running.next(), if !running.is_empty() => finished!(done),
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
            message = input.message(), if reading && room => accept!(message),
            else => break,
        }
    }
    if let Some(status) = end {
        let _ = tx.send(Err(clean_end(status))).await;
    }
}

/// Runs one op through the service's unary handler and answers it.
async fn run<S: Cache>(
    service: &S,
    inner: &Inner,
    stream: &StreamContext,
    op: PipelineRequest,
    order: Sequence,
) -> Done {
    let started = Instant::now();
    let id = op.id;
    // Only counted against a byte budget (none: nothing to size).
    let size = if stream.bytes.is_some() {
        op.encoded_len() as u64
    } else {
        0
    };
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
            order,
            Status::invalid_argument(format!(
                "op {id} has no operation: set one of get, set, delete, increment, touch, exists"
            )),
        );
    };
    let kind = Kind::of(&op);
    let (result, held) = checked(
        service,
        inner,
        stream,
        kind,
        op,
        size,
        timeout,
        started,
        &traceparent,
        &tracestate,
    )
    .await;
    if let Some(m) = &inner.metrics {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        m.record(kind, code, started.elapsed());
    }
    match result {
        Ok(answer) => Done {
            id,
            order,
            response: PipelineResponse {
                id,
                result: Some(answer),
            },
            held,
        },
        Err(status) => failed(id, order, status),
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
    let call = dispatch(service, op, deadline, held.clone(), stream.direct);
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
    direct: Option<DirectEpoch>,
) -> Result<Answer, Status> {
    let ops = OpContext {
        deadline,
        held,
        direct,
    };
    Ok(match op {
        Op::Get(m) => Answer::Get(service.get(ops.request(m)).await?.into_inner()),
        Op::Set(m) => Answer::Set(service.set(ops.request(m)).await?.into_inner()),
        Op::Delete(m) => Answer::Delete(service.delete(ops.request(m)).await?.into_inner()),
        Op::Increment(m) => {
            Answer::Increment(service.increment(ops.request(m)).await?.into_inner())
        }
        Op::Touch(m) => Answer::Touch(service.touch(ops.request(m)).await?.into_inner()),
        Op::Exists(m) => Answer::Exists(service.exists(ops.request(m)).await?.into_inner()),
    })
}

/// What the driver hands every op's request besides its message.
struct OpContext {
    deadline: Instant,
    held: Option<CallBytes>,
    direct: Option<DirectEpoch>,
}

impl OpContext {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let extensions = request.extensions_mut();
        extensions.insert(OpDeadline(self.deadline));
        if let Some(held) = &self.held {
            extensions.insert(held.clone());
        }
        if let Some(direct) = self.direct {
            extensions.insert(direct);
        }
        request
    }
}

fn failed(id: u64, order: Sequence, status: Status) -> Done {
    Done {
        id,
        order,
        response: PipelineResponse {
            id,
            result: Some(Answer::Error(RpcStatus {
                code: status.code() as i32,
                message: status.message().to_owned(),
                // A status with rich details (tonic-types) carries them as
                // an encoded google.rpc.Status: the op's error keeps them.
                details: RpcStatus::decode(status.details())
                    .map(|s| s.details)
                    .unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use bytes::Bytes;
    use parking_lot::Mutex;
    use ringcache_proto::v1::{
        DeleteManyRequest, DeleteManyResponse, DeleteRequest, DeleteResponse, ExistsRequest,
        ExistsResponse, GetManyRequest, GetManyResponse, GetRequest, GetResponse, IncrementRequest,
        IncrementResponse, KeyInfo, SetManyRequest, SetManyResponse, SetRequest, SetResponse,
        TouchRequest, TouchResponse, cache_client::CacheClient, cache_server::CacheServer,
    };
    use tokio::sync::{Semaphore, mpsc};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    /// A service whose ops on keys starting with `slow` wait for a permit
    /// of `gate`; every op is logged as it starts.
    #[derive(Clone)]
    struct Fake {
        values: Arc<Mutex<HashMap<String, Bytes>>>,
        log: Arc<Mutex<Vec<String>>>,
        gate: Arc<Semaphore>,
        started: Arc<AtomicUsize>,
        pipelines: Pipelines,
    }

    impl Fake {
        fn new(pipelines: Pipelines) -> Self {
            Self {
                values: Arc::default(),
                log: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
                started: Arc::default(),
                pipelines,
            }
        }

        async fn enter(&self, what: String) {
            let slow = what
                .split(' ')
                .nth(1)
                .is_some_and(|k| k.starts_with("slow"));
            self.log.lock().push(what);
            self.started.fetch_add(1, Ordering::SeqCst);
            if slow && let Ok(p) = self.gate.acquire().await {
                p.forget();
            }
        }

        fn log(&self) -> Vec<String> {
            self.log.lock().clone()
        }
    }

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    #[tonic::async_trait]
    impl Cache for Fake {
        type PipelineStream = PipelineStream;

        async fn pipeline(
            &self,
            request: Request<Streaming<PipelineRequest>>,
        ) -> Result<Response<PipelineStream>, Status> {
            self.pipelines.serve(self.clone(), request)
        }

        async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            let key = r.into_inner().key;
            self.enter(format!("get {key}")).await;
            let value = self.values.lock().get(&key).cloned();
            Ok(Response::new(GetResponse {
                found: value.is_some(),
                value: value.unwrap_or_default(),
                ..Default::default()
            }))
        }

        async fn set(&self, r: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
            let r = r.into_inner();
            self.enter(format!("set {}", r.key)).await;
            self.values.lock().insert(r.key, r.value);
            Ok(Response::new(SetResponse {
                stored: true,
                version: 1,
                missed: Vec::new(),
            }))
        }

        async fn exists(
            &self,
            r: Request<ExistsRequest>,
        ) -> Result<Response<ExistsResponse>, Status> {
            let keys = r.into_inner().keys;
            self.enter(format!("exists {}", keys.join(","))).await;
            let values = self.values.lock();
            Ok(Response::new(ExistsResponse {
                results: keys
                    .iter()
                    .map(|k| KeyInfo {
                        found: values.contains_key(k),
                        ..Default::default()
                    })
                    .collect(),
            }))
        }

        async fn delete(
            &self,
            _: Request<DeleteRequest>,
        ) -> Result<Response<DeleteResponse>, Status> {
            unimplemented()
        }

        async fn get_many(
            &self,
            _: Request<GetManyRequest>,
        ) -> Result<Response<GetManyResponse>, Status> {
            unimplemented()
        }

        async fn set_many(
            &self,
            _: Request<SetManyRequest>,
        ) -> Result<Response<SetManyResponse>, Status> {
            unimplemented()
        }

        async fn delete_many(
            &self,
            _: Request<DeleteManyRequest>,
        ) -> Result<Response<DeleteManyResponse>, Status> {
            unimplemented()
        }

        async fn increment(
            &self,
            _: Request<IncrementRequest>,
        ) -> Result<Response<IncrementResponse>, Status> {
            unimplemented()
        }

        async fn touch(&self, _: Request<TouchRequest>) -> Result<Response<TouchResponse>, Status> {
            unimplemented()
        }
    }

    /// Serves `fake` on a local port; answers a client.
    async fn client(fake: Fake) -> CacheClient<tonic::transport::Channel> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CacheServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        CacheClient::connect(format!("http://{addr}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An open stream: send ops with `.0`, read answers from `.1`.
    async fn open(
        client: &mut CacheClient<tonic::transport::Channel>,
    ) -> (mpsc::Sender<PipelineRequest>, Streaming<PipelineResponse>) {
        let (tx, rx) = mpsc::channel(1024);
        let answers = client
            .pipeline(ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        (tx, answers)
    }

    fn get(id: u64, key: &str) -> PipelineRequest {
        PipelineRequest {
            id,
            op: Some(Op::Get(GetRequest { key: key.into() })),
            ..Default::default()
        }
    }

    fn set(id: u64, key: &str, value: &'static str) -> PipelineRequest {
        PipelineRequest {
            id,
            op: Some(Op::Set(SetRequest {
                key: key.into(),
                value: Bytes::from_static(value.as_bytes()),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    async fn send(tx: &mpsc::Sender<PipelineRequest>, op: PipelineRequest) {
        tx.send(op).await.unwrap_or_else(|e| panic!("{e}"));
    }

    async fn next(answers: &mut Streaming<PipelineResponse>) -> PipelineResponse {
        tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .unwrap_or_else(|_| panic!("no answer within 10 s"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the stream ended"))
    }

    /// Waits until `fake` has started `n` ops.
    async fn started(fake: &Fake, n: usize) {
        for _ in 0..1000 {
            if fake.started.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "{} ops started, not {n}: {:?}",
            fake.started.load(Ordering::SeqCst),
            fake.log()
        );
    }

    fn depth(n: usize) -> Pipelines {
        Pipelines::with_limits(n, Duration::from_secs(5), 4 << 20)
    }

    #[tokio::test]
    async fn ops_on_one_key_run_in_order_and_others_overtake_them() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(&tx, set(1, "slow-k", "v")).await;
        send(&tx, get(2, "slow-k")).await;
        send(&tx, get(3, "x")).await;
        // The other key is answered while the write of slow-k waits.
        let first = next(&mut answers).await;
        assert_eq!(first.id, 3, "{first:?}");
        assert_eq!(
            fake.log(),
            ["set slow-k", "get x"],
            "the read of slow-k waits for its write"
        );
        fake.gate.add_permits(2);
        let (a, b) = (next(&mut answers).await, next(&mut answers).await);
        assert_eq!((a.id, b.id), (1, 2));
        match b.result {
            Some(Answer::Get(g)) => assert!(g.found && g.value == "v", "{g:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_op_on_several_keys_waits_for_the_ops_before_it_and_holds_back_the_ones_after() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(&tx, set(1, "slow-a", "v")).await;
        send(
            &tx,
            PipelineRequest {
                id: 2,
                op: Some(Op::Exists(ExistsRequest {
                    keys: vec!["slow-a".into(), "b".into()],
                })),
                ..Default::default()
            },
        )
        .await;
        send(&tx, get(3, "c")).await;
        started(&fake, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fake.log(), ["set slow-a"]);
        fake.gate.add_permits(1);
        let ids: Vec<u64> = vec![
            next(&mut answers).await.id,
            next(&mut answers).await.id,
            next(&mut answers).await.id,
        ];
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(fake.log(), ["set slow-a", "exists slow-a,b", "get c"]);
    }

    #[tokio::test]
    async fn a_full_stream_is_not_read_until_an_op_is_answered() {
        let fake = Fake::new(depth(2));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        for i in 0..5 {
            send(&tx, get(i, &format!("slow-{i}"))).await;
        }
        started(&fake, 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fake.started.load(Ordering::SeqCst), 2, "{:?}", fake.log());
        fake.gate.add_permits(5);
        let mut ids: Vec<u64> = Vec::new();
        for _ in 0..5 {
            ids.push(next(&mut answers).await.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_duplicate_id_ends_the_stream_once_the_ops_in_flight_are_answered() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(&tx, get(1, "slow-a")).await;
        send(&tx, get(1, "b")).await;
        send(&tx, get(2, "c")).await;
        started(&fake, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        fake.gate.add_permits(1);
        assert_eq!(next(&mut answers).await.id, 1);
        let end = answers.message().await.err();
        assert_eq!(
            end.as_ref().map(Status::code),
            Some(tonic::Code::InvalidArgument),
            "{end:?}"
        );
        assert!(end.is_some_and(|s| s.message().contains("already in flight")));
        assert_eq!(
            fake.log(),
            ["get slow-a"],
            "nothing after the duplicate runs"
        );
    }

    #[tokio::test]
    async fn an_op_without_a_body_or_with_a_bad_timeout_is_answered_with_an_error() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(
            &tx,
            PipelineRequest {
                id: 7,
                ..Default::default()
            },
        )
        .await;
        let mut bad = get(8, "k");
        bad.timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        send(&tx, bad).await;
        for id in [7, 8] {
            let a = next(&mut answers).await;
            assert_eq!(a.id, id);
            match a.result {
                Some(Answer::Error(e)) => {
                    assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}")
                }
                other => panic!("{other:?}"),
            }
        }
        // The stream goes on.
        send(&tx, get(9, "k")).await;
        assert!(matches!(
            next(&mut answers).await.result,
            Some(Answer::Get(_))
        ));
    }

    #[tokio::test]
    async fn an_op_past_its_deadline_answers_deadline_exceeded() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        let mut op = get(1, "slow-a");
        op.timeout = Some(prost_types::Duration {
            seconds: 0,
            nanos: 50_000_000,
        });
        send(&tx, op).await;
        match next(&mut answers).await.result {
            Some(Answer::Error(e)) => {
                assert_eq!(e.code, tonic::Code::DeadlineExceeded as i32, "{e:?}");
                assert!(e.message.contains("50ms"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn closing_answers_the_ops_read_then_ends_with_unavailable_and_refuses_new_streams() {
        let pipelines = depth(16);
        let fake = Fake::new(pipelines.clone());
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(&tx, get(1, "slow-a")).await;
        started(&fake, 1).await;
        pipelines.close();
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&tx, get(2, "b")).await;
        fake.gate.add_permits(1);
        assert_eq!(next(&mut answers).await.id, 1);
        let end = answers.message().await.err();
        assert_eq!(
            end.as_ref().map(Status::code),
            Some(tonic::Code::Unavailable)
        );
        assert!(
            end.is_some_and(|s| s.metadata().get(NOT_RUN_TRAILER).is_some()),
            "a clean end is marked"
        );
        assert_eq!(
            fake.log(),
            ["get slow-a"],
            "the op sent after closing never ran"
        );
        let (_tx, rx) = mpsc::channel::<PipelineRequest>(1);
        let refused = c.pipeline(ReceiverStream::new(rx)).await.err();
        assert_eq!(refused.map(|s| s.code()), Some(tonic::Code::Unavailable));
    }

    #[tokio::test]
    async fn the_stream_ends_with_ok_once_the_client_is_done_and_everything_is_answered() {
        let fake = Fake::new(depth(16));
        let mut c = client(fake.clone()).await;
        let (tx, mut answers) = open(&mut c).await;
        send(&tx, get(1, "slow-a")).await;
        drop(tx);
        started(&fake, 1).await;
        fake.gate.add_permits(1);
        assert_eq!(next(&mut answers).await.id, 1);
        assert!(matches!(answers.message().await, Ok(None)));
    }
}
