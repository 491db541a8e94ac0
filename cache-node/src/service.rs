//! The node's gRPC services: `ringcache.v1.Cache` over the [`Store`], and
//! `ringcache.v1.Node` for its statistics.
//!
//! Each method validates the whole request first (so a refused request
//! changes nothing), then calls the store, then maps the outcome. Errors
//! become statuses in one place, `From<NodeError> for Status`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use ringcache_common::{
    direct::DirectEpoch,
    inflight_bytes::CallBytes,
    pipeline::{PipelineStream, Pipelines},
    validate::{RequestLimits, to_proto_duration},
};
use ringcache_proto::v1::{
    ApplyRequest, ApplyResponse, ApplyStreamRequest, ApplyStreamResponse, ChangesRequest,
    ChangesResponse, CopyRequest, DebtsRequest, DebtsResponse, DeleteManyRequest,
    DeleteManyResponse, DeleteRequest, DeleteResponse, DeleteResult, ExistsRequest, ExistsResponse,
    FlushRequest, FlushResponse, GetManyRequest, GetManyResponse, GetRequest, GetResponse,
    GetResult, IncrementRequest, IncrementResponse, KeyError, KeyInfo, Op, OpResult, OweResponse,
    ParkRequest, ParkResponse, PipelineRequest, RingEpoch, ScanRequest, ScanResponse,
    SetManyRequest, SetManyResponse, SetRequest, SetResponse, SetResult, SettleRequest,
    SettleResponse, StatsRequest, StatsResponse, TouchRequest, TouchResponse, cache_server::Cache,
    internal_server::Internal, node_server::Node, op, op_result,
};
use tonic::{Request, Response, Status};
use tracing::Span;

use crate::{
    changes::{self, ChangeLog},
    debts::Debts,
    epochs::{self, Epochs},
    error::NodeError,
    parking::Parking,
    store::{self, Found, Store},
};

/// The metadata key orchestrators send their ring epoch in.
pub const EPOCH_HEADER: &str = "ringcache-epoch";

/// Bytes a `GetResult` costs on the wire beyond its value: tags, lengths,
/// version and TTL. Used to stop building a `GetMany` answer before it
/// outgrows the message limit.
const RESULT_FRAMING: usize = 48;

/// `ringcache.v1.Cache` served from a local [`Store`].
#[derive(Debug, Clone)]
pub struct CacheService {
    store: Arc<Store>,
    limits: RequestLimits,
    max_message_bytes: usize,
    /// Serves `Pipeline` streams, each op on this service's own handlers.
    pipelines: Pipelines,
    /// The epochs orchestrators call with: a direct read is served only
    /// with the one they use now ([`Epochs::vouch`]).
    epochs: Arc<Epochs>,
    /// Whether the node handed its entries over and refuses data calls.
    parking: Arc<Parking>,
}

impl CacheService {
    /// Serves `store`, refusing requests over `limits`, and never building a
    /// response larger than `max_message_bytes`.
    pub fn new(store: Arc<Store>, limits: RequestLimits, max_message_bytes: usize) -> Self {
        Self {
            store,
            limits,
            max_message_bytes,
            pipelines: Pipelines::default(),
            epochs: Arc::new(Epochs::new(EPOCH_WINDOW)),
            parking: Arc::new(Parking::new(Duration::ZERO)),
        }
    }

    /// Refuses data calls once `parking` says the entries were handed
    /// over (see [`crate::parking`]).
    pub fn with_parking(mut self, parking: Arc<Parking>) -> Self {
        self.parking = parking;
        self
    }

    /// `Err(Parked)` once the node handed its entries over: no data call
    /// runs here any more.
    #[inline]
    fn serving(&self) -> Result<(), NodeError> {
        if self.parking.parked() {
            Err(NodeError::Parked)
        } else {
            Ok(())
        }
    }

    /// Vouches for direct reads with the epochs in `epochs` (the ones
    /// orchestrators' calls record).
    pub fn with_epochs(mut self, epochs: Arc<Epochs>) -> Self {
        self.epochs = epochs;
        self
    }

    /// Refuses a direct read (one carrying `ringcache-direct-epoch`) that
    /// this node cannot vouch for; any other read passes.
    fn check_direct<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match DirectEpoch::of(request) {
            Some(DirectEpoch(epoch)) => Ok(self.epochs.vouch(epoch, Instant::now())?),
            None => Ok(()),
        }
    }

    /// Serves `Pipeline` streams with `pipelines` (depth, deadlines,
    /// metrics, drain).
    pub fn with_pipelines(mut self, pipelines: Pipelines) -> Self {
        self.pipelines = pipelines;
        self
    }

    fn increment_one(&self, req: &IncrementRequest) -> Result<IncrementResponse, NodeError> {
        let ttl = self.limits.check_key_ttl(&req.key, req.ttl.as_ref())?;
        let out = self
            .store
            .increment(&req.key, req.delta, req.initial, ttl)?;
        Ok(IncrementResponse {
            value: out.value,
            version: out.version,
            ttl: out.ttl.map(to_proto_duration),
            missed: Vec::new(),
        })
    }

    /// A touch, answering the value whatever `return_value` says (the
    /// caller drops it if not asked for).
    fn touch_one(&self, req: &TouchRequest) -> Result<TouchResponse, NodeError> {
        let ttl = self.limits.check_key_ttl(&req.key, req.ttl.as_ref())?;
        Ok(match self.store.touch(&req.key, ttl)? {
            Some(found) => TouchResponse {
                found: true,
                version: found.version,
                ttl: found.ttl.map(to_proto_duration),
                value: found.value,
                missed: Vec::new(),
            },
            None => TouchResponse::default(),
        })
    }

    fn delete_one(&self, req: &DeleteRequest) -> Result<DeleteResponse, NodeError> {
        self.limits.check_key(|| "key".to_owned(), &req.key)?;
        let condition = (req.if_version != 0).then_some(req.if_version);
        let out = self.store.delete_if(&req.key, condition)?;
        Ok(DeleteResponse {
            deleted: out.deleted,
            version: out.version,
            missed: Vec::new(),
        })
    }

    fn set_one(&self, req: &SetRequest, prefix: &str) -> Result<SetResponse, NodeError> {
        let checked = self.limits.check_set(prefix, req)?;
        let span = Span::current();
        if !span.is_none() {
            span.record("ringcache.shard", self.store.shard_of(&req.key) as i64);
            span.record("ringcache.value_bytes", req.value.len() as i64);
        }
        let out = self
            .store
            .set(&req.key, &req.value, checked.ttl, checked.condition)?;
        Ok(SetResponse {
            stored: out.stored,
            version: out.version,
            missed: Vec::new(),
        })
    }
}

fn get_response(found: Option<Found>) -> GetResponse {
    match found {
        Some(f) => GetResponse {
            found: true,
            value: f.value,
            version: f.version,
            ttl: f.ttl.map(to_proto_duration),
        },
        None => GetResponse::default(),
    }
}

/// Holds a read's encoded answer of `bytes` on its call's budget, and
/// prepays the response with it; refused (nothing held, nothing encoded)
/// when the node has no room for it.
fn hold_answer(call: Option<&CallBytes>, bytes: usize) -> Result<(), Status> {
    if let Some(call) = call {
        call.hold(bytes as u64)?;
        call.prepay_response(bytes as u64);
    }
    Ok(())
}

/// The bytes a batch's answers take on the wire, about.
fn results_bytes(results: &[OpResult]) -> usize {
    results
        .iter()
        .map(|r| match &r.result {
            Some(op_result::Result::Get(g)) => g.value.len() + RESULT_FRAMING,
            _ => RESULT_FRAMING,
        })
        .sum()
}

#[tonic::async_trait]
impl Cache for CacheService {
    type PipelineStream = PipelineStream;

    /// Runs each op on the store through the unary handler below: the same
    /// limits, answers and refusals (see `ringcache_common::pipeline`).
    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<PipelineStream>, Status> {
        self.pipelines.serve(self.clone(), request)
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.serving()?;
        self.check_direct(&request)?;
        let call_bytes = request.extensions().get::<CallBytes>().cloned();
        let req = request.into_inner();
        self.limits
            .check_key(|| "key".to_owned(), &req.key)
            .map_err(NodeError::from)?;
        let found = self.store.get(&req.key);
        // The value is shared with the store; what the call adds is its
        // encoded copy: held (or refused) before it is made.
        hold_answer(
            call_bytes.as_ref(),
            found.as_ref().map_or(0, |f| f.value.len()) + RESULT_FRAMING,
        )?;
        let span = Span::current();
        if !span.is_none() {
            // What explains a read's latency; never the key or value.
            span.record("ringcache.hit", found.is_some());
            span.record("ringcache.shard", self.store.shard_of(&req.key) as i64);
            span.record(
                "ringcache.value_bytes",
                found.as_ref().map_or(0, |f| f.value.len() as i64),
            );
        }
        Ok(Response::new(get_response(found)))
    }

    async fn set(&self, request: Request<SetRequest>) -> Result<Response<SetResponse>, Status> {
        self.serving()?;
        Ok(Response::new(self.set_one(&request.into_inner(), "")?))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.serving()?;
        Ok(Response::new(self.delete_one(&request.into_inner())?))
    }

    async fn increment(
        &self,
        request: Request<IncrementRequest>,
    ) -> Result<Response<IncrementResponse>, Status> {
        self.serving()?;
        Ok(Response::new(self.increment_one(&request.into_inner())?))
    }

    async fn touch(
        &self,
        request: Request<TouchRequest>,
    ) -> Result<Response<TouchResponse>, Status> {
        self.serving()?;
        let req = request.into_inner();
        let mut answer = self.touch_one(&req)?;
        if !req.return_value {
            answer.value = Bytes::new();
        }
        Ok(Response::new(answer))
    }

    async fn exists(
        &self,
        request: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        self.serving()?;
        self.check_direct(&request)?;
        let req = request.into_inner();
        self.limits.check_keys(&req.keys).map_err(NodeError::from)?;
        let results = req
            .keys
            .iter()
            .map(|key| match self.store.get(key) {
                Some(found) => KeyInfo {
                    found: true,
                    version: found.version,
                    ttl: found.ttl.map(to_proto_duration),
                    value_bytes: found.value.len() as u64,
                    error: None,
                },
                None => KeyInfo::default(),
            })
            .collect();
        Ok(Response::new(ExistsResponse { results }))
    }

    async fn delete_many(
        &self,
        request: Request<DeleteManyRequest>,
    ) -> Result<Response<DeleteManyResponse>, Status> {
        self.serving()?;
        let req = request.into_inner();
        // Refused whole before anything is deleted, as SetMany.
        self.limits.check_keys(&req.keys).map_err(NodeError::from)?;
        let results = req
            .keys
            .iter()
            .map(|key| {
                Ok(DeleteResult {
                    deleted: self.store.delete(key)?,
                    error: None,
                    missed: Vec::new(),
                })
            })
            .collect::<Result<_, NodeError>>()?;
        Ok(Response::new(DeleteManyResponse { results }))
    }

    async fn get_many(
        &self,
        request: Request<GetManyRequest>,
    ) -> Result<Response<GetManyResponse>, Status> {
        self.serving()?;
        let call_bytes = request.extensions().get::<CallBytes>().cloned();
        let req = request.into_inner();
        self.limits.check_keys(&req.keys).map_err(NodeError::from)?;
        let mut size = 0usize;
        let mut results = Vec::with_capacity(req.keys.len());
        for key in &req.keys {
            let r = get_response(self.store.get(key));
            size += r.value.len() + RESULT_FRAMING;
            if size > self.max_message_bytes {
                return Err(NodeError::ResponseTooLarge {
                    limit: self.max_message_bytes,
                    answered: results.len(),
                    requested: req.keys.len(),
                }
                .into());
            }
            results.push(GetResult {
                found: r.found,
                value: r.value,
                version: r.version,
                ttl: r.ttl,
                error: None,
            });
        }
        hold_answer(call_bytes.as_ref(), size)?;
        let span = Span::current();
        if !span.is_none() {
            span.record("ringcache.keys", results.len() as i64);
            span.record(
                "ringcache.hits",
                results.iter().filter(|r| r.found).count() as i64,
            );
            span.record(
                "ringcache.value_bytes",
                (size - RESULT_FRAMING * results.len()) as i64,
            );
        }
        Ok(Response::new(GetManyResponse { results }))
    }

    async fn set_many(
        &self,
        request: Request<SetManyRequest>,
    ) -> Result<Response<SetManyResponse>, Status> {
        self.serving()?;
        let req = request.into_inner();
        // Validate every entry before writing any, so a refused batch
        // changes nothing.
        let checked = self
            .limits
            .check_entries(&req.entries)
            .map_err(NodeError::from)?;
        for e in &req.entries {
            let weight = Store::entry_weight(e.key.len(), e.value.len(), e.ttl.is_some());
            if weight > self.store.max_entry_weight() {
                return Err(NodeError::from(store::StoreError::EntryTooLarge {
                    weight,
                    max_weight: self.store.max_entry_weight(),
                })
                .into());
            }
        }
        let mut results = Vec::with_capacity(req.entries.len());
        for (e, c) in req.entries.iter().zip(checked) {
            let out = self
                .store
                .set(&e.key, &e.value, c.ttl, c.condition)
                .map_err(NodeError::from)?;
            results.push(SetResult {
                stored: out.stored,
                version: out.version,
                error: None,
                missed: Vec::new(),
            });
        }
        let span = Span::current();
        if !span.is_none() {
            span.record("ringcache.keys", results.len() as i64);
        }
        Ok(Response::new(SetManyResponse { results }))
    }
}

/// `ringcache.v1.Internal`: batches of operations from orchestrators, and
/// copies of entries with a version chosen by another node.
#[derive(Debug, Clone)]
pub struct InternalService {
    cache: CacheService,
    epochs: Arc<Epochs>,
    /// True once the node drains: open `ApplyStream`s end (between
    /// batches) and new ones are refused, so callers move to unary
    /// `Apply`, which the drain bounds.
    draining: tokio::sync::watch::Receiver<bool>,
    /// Permits for open `ApplyStream`s (`--max-in-flight` of them).
    streams: Arc<tokio::sync::Semaphore>,
    /// Keys other nodes missed changes of (`Owe`, `Debts`, `Settle`).
    debts: Arc<Debts>,
}

/// Bytes of debt records a node keeps by default (`--debt-bytes`).
pub const DEFAULT_DEBT_BYTES: usize = 16 << 20;

/// The longest owner identity an `Owe` may name.
const MAX_OWNER_BYTES: usize = 1024;

/// Open `ApplyStream`s a node allows by default (see
/// [`InternalService::with_streams`]).
pub const DEFAULT_MAX_STREAMS: usize = 1024;

/// Epochs seen within this long of each other are current together (a
/// DNS-driven membership change reaches every orchestrator well within it).
pub const EPOCH_WINDOW: Duration = Duration::from_secs(30);

impl InternalService {
    /// Serves batches against the same store, limits and message size as
    /// `cache`.
    pub fn new(cache: CacheService) -> Self {
        let (_, draining) = tokio::sync::watch::channel(false);
        Self {
            epochs: cache.epochs.clone(),
            cache,
            draining,
            streams: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_STREAMS)),
            debts: Arc::new(Debts::new(DEFAULT_DEBT_BYTES)),
        }
    }

    /// Keeps debt records in `debts`.
    pub fn with_debts(mut self, debts: Arc<Debts>) -> Self {
        self.debts = debts;
        self
    }

    /// Records an `Owe` op's debts, and publishes each on the change feed
    /// (so every orchestrator learns of it within milliseconds).
    fn owe(&self, req: &ringcache_proto::v1::OweRequest) -> Result<OweResponse, NodeError> {
        self.cache.limits.check_key(|| "key".to_owned(), &req.key)?;
        self.cache.limits.check_batch("owners", req.owners.len())?;
        if let Some(o) = req
            .owners
            .iter()
            .find(|o| o.is_empty() || o.len() > MAX_OWNER_BYTES)
        {
            return Err(NodeError::InvalidOwner {
                len: o.len(),
                max: MAX_OWNER_BYTES,
            });
        }
        let mut first = 0;
        for owner in &req.owners {
            let (sequence, overflowed) = self.debts.record(owner, &req.key);
            if first == 0 {
                first = sequence;
            }
            if let Some(log) = self.cache.store.change_log() {
                // An overflow is published with an empty key: everything
                // the owner holds may be stale.
                let key = if overflowed { "" } else { req.key.as_str() };
                log.append_owed(owner, key, sequence);
            }
        }
        Ok(OweResponse { sequence: first })
    }

    /// Ends `ApplyStream`s once `draining` turns true, and allows at most
    /// `max_streams` open at once.
    pub fn with_streams(
        mut self,
        draining: tokio::sync::watch::Receiver<bool>,
        max_streams: usize,
    ) -> Self {
        self.draining = draining;
        self.streams = Arc::new(tokio::sync::Semaphore::new(max_streams.max(1)));
        self
    }

    /// How many keys one answer lists (`Scan`, `Debts`) when `asked`
    /// for (0: as many as allowed): at most --max-batch, and never more
    /// than fit in a message (keys are at most --max-key-bytes each).
    fn key_page(&self, asked: u32) -> usize {
        let max_batch = self.cache.limits.max_batch;
        let by_size = self.cache.max_message_bytes / (self.cache.limits.max_key_bytes + 8);
        match asked {
            0 => max_batch,
            n => usize::try_from(n).unwrap_or(usize::MAX).min(max_batch),
        }
        .min(by_size)
        .max(1)
    }

    /// A permit for a long-lived stream (`ApplyStream`, `Changes`): none
    /// once the node drains, nor beyond `--max-in-flight` open streams.
    /// `instead` says what the caller should do then.
    fn stream_permit(&self, instead: &str) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        if *self.draining.borrow() {
            return Err(Status::unavailable(format!(
                "the node is draining: {instead}"
            )));
        }
        self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many streams open on this node (--max-in-flight); {instead}"
            ))
        })
    }

    /// Records a caller's ring epoch.
    fn saw_epoch(&self, epoch: u64) {
        self.epochs.record(epoch, Instant::now());
    }

    /// Runs a batch as `Apply` does: each op in order, stopping before the
    /// first answer that would outgrow a message. Returns the results and
    /// the number of hits among them.
    fn run_batch(&self, ops: &[Op]) -> Result<(Vec<OpResult>, i64), NodeError> {
        // Refused whole, before any op runs: the caller moves on.
        self.cache.serving()?;
        self.cache.limits.check_batch("ops", ops.len())?;
        let limit = self.cache.max_message_bytes;
        let mut size = 0usize;
        let mut hits = 0i64;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let result = match self.run(op) {
                Ok(r) => r,
                Err(e) => op_result::Result::Error(key_error(e)),
            };
            let bytes = match &result {
                op_result::Result::Get(g) => {
                    hits += i64::from(g.found);
                    g.value.len()
                }
                _ => 0,
            } + RESULT_FRAMING;
            size = size.saturating_add(bytes);
            if size > limit {
                // Stop here: the caller sends the rest again. A first op
                // that cannot fit on its own would never fit: answer it with
                // an error instead, so the batch makes progress.
                if results.is_empty() {
                    results.push(OpResult {
                        result: Some(op_result::Result::Error(key_error(
                            NodeError::ResponseTooLarge {
                                limit,
                                answered: 0,
                                requested: 1,
                            },
                        ))),
                    });
                }
                break;
            }
            results.push(OpResult {
                result: Some(result),
            });
        }
        Ok((results, hits))
    }

    /// Answers one batch of an `ApplyStream`.
    fn stream_batch(&self, req: ApplyStreamRequest) -> ApplyStreamResponse {
        if req.epoch != 0 {
            self.saw_epoch(req.epoch);
        }
        let outcome = self.run_batch(&req.ops).map_err(key_error);
        match outcome {
            Ok((results, _)) => ApplyStreamResponse {
                id: req.id,
                results,
                error: None,
            },
            Err(error) => ApplyStreamResponse {
                id: req.id,
                results: Vec::new(),
                error: Some(error),
            },
        }
    }

    /// The ring epochs callers sent.
    pub fn epochs(&self) -> Arc<Epochs> {
        self.epochs.clone()
    }

    /// Runs one op. A get's answer is sized by the caller, so it can stop a
    /// batch whose answers would outgrow a message.
    fn run(&self, op: &Op) -> Result<op_result::Result, NodeError> {
        let cache = &self.cache;
        Ok(match op.op.as_ref() {
            Some(op::Op::Get(req)) => {
                cache.limits.check_key(|| "key".to_owned(), &req.key)?;
                op_result::Result::Get(get_response(cache.store.get(&req.key)))
            }
            Some(op::Op::Set(req)) => op_result::Result::Set(cache.set_one(req, "")?),
            Some(op::Op::Delete(req)) => op_result::Result::Delete(cache.delete_one(req)?),
            Some(op::Op::Increment(req)) => op_result::Result::Increment(cache.increment_one(req)?),
            Some(op::Op::Touch(req)) => op_result::Result::Touch(cache.touch_one(req)?),
            Some(op::Op::Copy(req)) => {
                let checked = cache.limits.check_copy(req)?;
                let out = cache
                    .store
                    .set(&req.key, &req.value, checked.ttl, checked.condition)?;
                op_result::Result::Copy(SetResponse {
                    stored: out.stored,
                    version: out.version,
                    missed: Vec::new(),
                })
            }
            Some(op::Op::Owe(req)) => op_result::Result::Owe(self.owe(req)?),
            None => return Err(NodeError::EmptyOp),
        })
    }
}

/// The answers of one `ApplyStream`: each batch read is run and answered
/// in the same poll, so the stream can only end between batches; it ends
/// with UNAVAILABLE once the node drains.
struct BatchStream {
    service: InternalService,
    inbound: tonic::Streaming<ApplyStreamRequest>,
    draining: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
    /// Held while the stream is open.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio_stream::Stream for BatchStream {
    type Item = Result<ApplyStreamResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.draining.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(Some(Err(Status::unavailable(
                "the node is draining: batches not answered were not run (send them with Apply)",
            ))));
        }
        match Pin::new(&mut self.inbound).poll_next(cx) {
            Poll::Ready(Some(Ok(batch))) => Poll::Ready(Some(Ok(self.service.stream_batch(batch)))),
            Poll::Ready(Some(Err(status))) => {
                self.ended = true;
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The most changes in one `ChangesResponse`.
const CHANGES_PER_MESSAGE: usize = 4096;

/// A change feed is sent a heartbeat after this long without a change.
pub const FEED_HEARTBEAT: Duration = Duration::from_secs(1);

/// Under load (a message went out less than [`FEED_BUSY`] ago), a feed
/// waits this long after a change before it reads the log, so one message
/// carries what accumulated instead of a message — a wake-up, a frame and
/// a write — per change. At rest a change goes out at once.
const FEED_LINGER: Duration = Duration::from_millis(1);
const FEED_BUSY: Duration = Duration::from_millis(5);

/// What a `Changes` stream is doing between messages.
struct Feed {
    log: Arc<ChangeLog>,
    reader: changes::Reader,
    /// The last sequence sent.
    at: u64,
    /// The first message still to send says the position was gone.
    gap: bool,
    /// Nothing sent yet: the first message goes at once.
    first: bool,
    /// When the last message with changes went out.
    last_sent: Option<tokio::time::Instant>,
    max_bytes: usize,
    draining: tokio::sync::watch::Receiver<bool>,
    ended: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Feed {
    /// The next message: changes after `at` as soon as there are some, a
    /// heartbeat after [`FEED_HEARTBEAT`] without any, or the end when the
    /// node drains.
    async fn next(mut self) -> Option<(Result<ChangesResponse, Status>, Self)> {
        if self.ended {
            return None;
        }
        loop {
            if *self.draining.borrow() {
                self.ended = true;
                return Some((
                    Err(Status::unavailable(
                        "the node is draining: follow its feed again from the last sequence seen",
                    )),
                    self,
                ));
            }
            let incarnation = self.log.incarnation();
            let (changes, head) =
                match self
                    .log
                    .read_after(incarnation, self.at, CHANGES_PER_MESSAGE, self.max_bytes)
                {
                    changes::Read::Changes { changes, head } => (changes, head),
                    // Fell behind by more than the log holds: say so, and go on
                    // from the end.
                    changes::Read::Gap { head } => {
                        self.gap = true;
                        self.at = head;
                        (Vec::new(), head)
                    }
                };
            if !changes.is_empty() || self.first || self.gap {
                if let Some(last) = changes.last() {
                    self.at = last.sequence;
                }
                self.reader.read_to(self.at);
                if !changes.is_empty() {
                    self.last_sent = Some(tokio::time::Instant::now());
                }
                let message = ChangesResponse {
                    incarnation,
                    gap: std::mem::take(&mut self.gap),
                    changes: changes.into_iter().map(change_message).collect(),
                    head,
                };
                self.first = false;
                return Some((Ok(message), self));
            }
            let mut draining = self.draining.clone();
            tokio::select! {
                () = self.log.wait_after(self.at, FEED_HEARTBEAT) => {}
                // A dropped sender (the node is going away) ends it too.
                _ = draining.wait_for(|d| *d) => {
                    self.ended = true;
                    return Some((
                        Err(Status::unavailable(
                            "the node is draining: follow its feed again from the last sequence seen",
                        )),
                        self,
                    ));
                }
            }
            let busy = self.last_sent.is_some_and(|t| t.elapsed() < FEED_BUSY);
            if busy && self.log.head() > self.at {
                tokio::time::sleep(FEED_LINGER).await;
            }
            if self.log.head() == self.at {
                self.reader.read_to(self.at);
                return Some((
                    Ok(ChangesResponse {
                        incarnation,
                        gap: false,
                        changes: Vec::new(),
                        head: self.at,
                    }),
                    self,
                ));
            }
        }
    }
}

fn change_message(c: changes::Change) -> ringcache_proto::v1::Change {
    use ringcache_proto::v1::ChangeKind as K;
    ringcache_proto::v1::Change {
        sequence: c.sequence,
        kind: match c.kind {
            changes::ChangeKind::Set => K::Set,
            changes::ChangeKind::Delete => K::Delete,
            changes::ChangeKind::Increment => K::Increment,
            changes::ChangeKind::Touch => K::Touch,
            changes::ChangeKind::Copy => K::Copy,
            changes::ChangeKind::Flush => K::Flush,
            changes::ChangeKind::Owed => K::Owed,
            changes::ChangeKind::Settled => K::Settled,
        } as i32,
        key: c.key.into_string(),
        version: c.version,
        owner: c.owner.map(String::from).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Internal for InternalService {
    type ApplyStreamStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ApplyStreamResponse, Status>> + Send>>;
    type ChangesStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ChangesResponse, Status>> + Send>>;

    async fn changes(
        &self,
        request: Request<ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        let Some(log) = self.cache.store.change_log().cloned() else {
            return Err(Status::failed_precondition(
                "this node keeps no change log (--change-log-bytes 0)",
            ));
        };
        // Feeds share the permits of ApplyStreams: both are long-lived
        // streams of orchestrators.
        let permit = self.stream_permit("follow its feed again from the last sequence seen")?;
        let req = request.into_inner();
        let (at, gap) = if req.incarnation == 0 {
            (log.head(), false)
        } else {
            match log.read_after(req.incarnation, req.after, 0, 0) {
                changes::Read::Changes { .. } => (req.after, false),
                changes::Read::Gap { head } => (head, true),
            }
        };
        let feed = Feed {
            reader: log.reader(at),
            log,
            at,
            gap,
            first: true,
            last_sent: None,
            max_bytes: (self.cache.max_message_bytes / 2).clamp(1, 1 << 20),
            draining: self.draining.clone(),
            ended: false,
            _permit: permit,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            feed,
            Feed::next,
        ))))
    }

    async fn apply_stream(
        &self,
        request: Request<tonic::Streaming<ApplyStreamRequest>>,
    ) -> Result<Response<Self::ApplyStreamStream>, Status> {
        let permit = self.stream_permit("send batches with Apply")?;
        let mut draining = self.draining.clone();
        let stream = BatchStream {
            service: self.clone(),
            inbound: request.into_inner(),
            draining: Box::pin(async move {
                // A dropped sender (the node is going away) ends it too.
                let _ = draining.wait_for(|d| *d).await;
            }),
            ended: false,
            _permit: permit,
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn debts(
        &self,
        request: Request<DebtsRequest>,
    ) -> Result<Response<DebtsResponse>, Status> {
        let req = request.into_inner();
        let listed = self.debts.list(&req.owner, self.key_page(req.limit));
        Ok(Response::new(DebtsResponse {
            keys: listed.keys,
            overflowed: listed.overflowed,
            through: listed.through,
            more: listed.more,
        }))
    }

    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let req = request.into_inner();
        let settled = self.debts.settle(&req.owner, req.through);
        if settled > 0
            && let Some(log) = self.cache.store.change_log()
        {
            // Clients that route themselves skipped the owner for these
            // keys; the feed tells them it is up to date.
            log.append_settled(&req.owner, req.through);
        }
        Ok(Response::new(SettleResponse { settled }))
    }

    type ParkStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ParkResponse, Status>> + Send>>;

    async fn park(
        &self,
        request: Request<ParkRequest>,
    ) -> Result<Response<Self::ParkStream>, Status> {
        let parking = self.cache.parking.clone();
        parking
            .claim()
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Data calls are refused from the claim on; writes that got past
        // that check before it are done (or refused) once this returns.
        self.cache.store.freeze();
        tracing::info!(
            "entries claimed by an orchestrator: refusing data calls, handing them over"
        );
        let limit = self.key_page(request.into_inner().limit);
        let pages = ParkPages {
            store: self.cache.store.clone(),
            cursor: Some((0, 0)),
            left: std::collections::VecDeque::new(),
            limit,
            max_bytes: (self.cache.max_message_bytes / 2).max(1),
            _handed_when_dropped: HandOnDrop(parking),
            handed: 0,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            pages,
            ParkPages::next,
        ))))
    }

    async fn flush(&self, _: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let removed = self.cache.store.clear();
        tracing::info!(removed, "flushed at an orchestrator's request");
        Ok(Response::new(FlushResponse { removed }))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let req = request.into_inner();
        let limit = self.key_page(req.limit);
        let shard = usize::try_from(req.shard).unwrap_or(usize::MAX);
        let page = self.cache.store.scan(shard, req.position, limit);
        let (next_shard, next_position) = page.next.unwrap_or_default();
        Ok(Response::new(ScanResponse {
            keys: page.keys,
            next_shard: u32::try_from(next_shard).unwrap_or(u32::MAX),
            next_position,
            done: page.next.is_none(),
        }))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        if let Some(epoch) = request
            .metadata()
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(epochs::parse)
        {
            self.saw_epoch(epoch);
        }
        let call_bytes = request.extensions().get::<CallBytes>().cloned();
        let req = request.into_inner();
        let (results, hits) = self.run_batch(&req.ops)?;
        // Counted, never refused: the batch's writes have been applied, and
        // a refusal would tell the orchestrator they were not.
        if let Some(call) = &call_bytes {
            let bytes = results_bytes(&results) as u64;
            call.hold_anyway(bytes);
            call.prepay_response(bytes);
        }
        let span = Span::current();
        if !span.is_none() {
            // What explains the batch's latency; never a key or a value.
            span.record("ringcache.keys", results.len() as i64);
            span.record("ringcache.hits", hits);
            span.record("ringcache.value_bytes", value_bytes(&req.ops, &results));
            if let ([op], [result]) = (req.ops.as_slice(), results.as_slice()) {
                // One op: the fields a single-key call has.
                if let Some(key) = op_key(op) {
                    span.record("ringcache.shard", self.cache.store.shard_of(key) as i64);
                }
                if let Some(op_result::Result::Get(g)) = &result.result {
                    span.record("ringcache.hit", g.found);
                }
            }
        }
        Ok(Response::new(ApplyResponse { results }))
    }
}

/// Tells the node its entries were handed over when the `Park` stream
/// ends, read to the end or dropped by its reader: either way, nothing is
/// left to wait for.
struct HandOnDrop(Arc<Parking>);

impl Drop for HandOnDrop {
    fn drop(&mut self) {
        self.0.handed();
    }
}

/// The pages of a `Park` stream: the store's entries, shard by shard.
/// Nothing changes them meanwhile (the node refuses data calls).
struct ParkPages {
    store: Arc<Store>,
    /// Where the next page starts; `None` once every shard was read.
    cursor: Option<(usize, u64)>,
    /// Keys scanned but not sent yet.
    left: std::collections::VecDeque<String>,
    limit: usize,
    /// Value bytes per page, so a page fits in a message.
    max_bytes: usize,
    /// Held until the stream ends: then the node may stop.
    _handed_when_dropped: HandOnDrop,
    handed: u64,
}

impl ParkPages {
    async fn next(mut self) -> Option<(Result<ParkResponse, Status>, Self)> {
        if self.left.is_empty() {
            let (shard, position) = self.cursor?;
            let page = self.store.scan(shard, position, self.limit);
            self.left.extend(page.keys);
            self.cursor = page.next;
        }
        let mut entries = Vec::with_capacity(self.left.len());
        let mut bytes = 0usize;
        // A page stops at about half a message; the keys left over go
        // first in the next one.
        while bytes < self.max_bytes
            && let Some(key) = self.left.pop_front()
        {
            if let Some(found) = self.store.get(&key) {
                bytes += found.value.len() + key.len();
                entries.push(CopyRequest {
                    key,
                    value: found.value,
                    ttl: found.ttl.map(to_proto_duration),
                    version: found.version,
                    unchanged_after: 0,
                    incarnation: 0,
                });
            }
        }
        self.handed += entries.len() as u64;
        if self.cursor.is_none() && self.left.is_empty() {
            tracing::info!(entries = self.handed, "every entry handed over");
        }
        Some((Ok(ParkResponse { entries }), self))
    }
}

/// The key an op names.
fn op_key(op: &Op) -> Option<&str> {
    match op.op.as_ref()? {
        op::Op::Owe(r) => Some(&r.key),
        op::Op::Get(r) => Some(&r.key),
        op::Op::Set(r) => Some(&r.key),
        op::Op::Delete(r) => Some(&r.key),
        op::Op::Copy(r) => Some(&r.key),
        op::Op::Increment(r) => Some(&r.key),
        op::Op::Touch(r) => Some(&r.key),
    }
}

/// Value bytes a batch moved: written by its sets and copies, read by its
/// gets.
fn value_bytes(ops: &[Op], results: &[OpResult]) -> i64 {
    let written: usize = ops
        .iter()
        .map(|op| match &op.op {
            Some(op::Op::Set(r)) => r.value.len(),
            Some(op::Op::Copy(r)) => r.value.len(),
            _ => 0,
        })
        .sum();
    let read: usize = results
        .iter()
        .map(|r| match &r.result {
            Some(op_result::Result::Get(g)) => g.value.len(),
            _ => 0,
        })
        .sum();
    i64::try_from(written + read).unwrap_or(i64::MAX)
}

/// A node error as the per-op error of a batch.
fn key_error(e: NodeError) -> KeyError {
    let status = Status::from(e);
    KeyError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// `ringcache.v1.Node`: the node's storage statistics.
#[derive(Debug, Clone)]
pub struct NodeService {
    store: Arc<Store>,
    node_id: String,
    started: Instant,
    incarnation: u64,
    epochs: Option<Arc<Epochs>>,
}

/// A random number, different for every process start.
pub fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // RandomState is seeded from the OS's randomness once per process.
    RandomState::new().hash_one(std::process::id()).max(1)
}

impl NodeService {
    /// Reports on `store` as node `node_id`; uptime counts from now.
    pub fn new(store: Arc<Store>, node_id: String) -> Self {
        Self {
            store,
            node_id,
            started: Instant::now(),
            incarnation: new_incarnation(),
            epochs: None,
        }
    }

    /// Reports `incarnation` (the change log's) instead of a number of its
    /// own.
    pub fn with_incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = incarnation;
        self
    }

    /// Also reports the ring epochs orchestrators called with.
    pub fn with_epochs(mut self, epochs: Arc<Epochs>) -> Self {
        self.epochs = Some(epochs);
        self
    }
}

fn shard_stats(index: u32, s: &store::ShardStats) -> ringcache_proto::v1::ShardStats {
    ringcache_proto::v1::ShardStats {
        shard: index,
        items: s.items,
        bytes_used: s.bytes_used,
        capacity_bytes: s.capacity_bytes,
        hits: s.hits,
        misses: s.misses,
        evictions: s.evictions,
        expirations: s.expirations,
        overwrites: s.overwrites,
        deletes: s.deletes,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        // Orchestrators ask every health round, with their epoch: what lets
        // the node vouch for direct reads when no data call comes.
        if let Some(epochs) = &self.epochs
            && let Some(epoch) = request
                .metadata()
                .get(EPOCH_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(epochs::parse)
        {
            epochs.record(epoch, Instant::now());
        }
        let shards = self.store.shard_stats();
        let total = Store::sum(&shards);
        Ok(Response::new(StatsResponse {
            total: Some(shard_stats(0, &total)),
            shards: shards
                .iter()
                .enumerate()
                .map(|(i, s)| shard_stats(u32::try_from(i).unwrap_or(u32::MAX), s))
                .collect(),
            uptime: Some(to_proto_duration(self.started.elapsed())),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            node_id: self.node_id.clone(),
            incarnation: self.incarnation,
            ring_epochs: self.epochs.as_ref().map_or_else(Vec::new, |e| {
                let now = Instant::now();
                e.seen()
                    .into_iter()
                    .map(|s| RingEpoch {
                        epoch: format!("{:016x}", s.epoch),
                        last_seen: Some(to_proto_duration(now.saturating_duration_since(s.last))),
                        calls: s.calls,
                    })
                    .collect()
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use ringcache_proto::v1::CopyRequest;

    use super::*;
    use crate::store::StoreConfig;

    fn service() -> CacheService {
        let store = Store::new(StoreConfig {
            capacity: 64 << 20,
            shards: 4,
        })
        .unwrap();
        CacheService::new(Arc::new(store), RequestLimits::default(), 4 << 20)
    }

    fn set_req(key: &str, value: &[u8]) -> SetRequest {
        SetRequest {
            key: key.into(),
            value: value.to_vec().into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_stopping_node_hands_every_entry_to_one_claimant_and_runs_no_data_call_after() {
        use futures::StreamExt;
        use tonic::Code;

        let parking = Arc::new(Parking::new(Duration::from_secs(5)));
        let cache = service().with_parking(parking.clone());
        let mut written = std::collections::HashMap::new();
        for i in 0..300 {
            let key = format!("k{i}");
            let out = cache
                .set(Request::new(set_req(&key, key.as_bytes())))
                .await
                .unwrap()
                .into_inner();
            written.insert(key, out.version);
        }
        let internal = InternalService::new(cache.clone());
        let claim = || internal.park(Request::new(ParkRequest { limit: 64 }));
        // A serving node keeps its entries (and serves).
        assert_eq!(
            claim().await.err().map(|s| s.code()),
            Some(Code::FailedPrecondition)
        );
        assert!(
            cache
                .get(Request::new(GetRequest { key: "k1".into() }))
                .await
                .is_ok()
        );

        parking.stopping();
        let mut pages = claim().await.unwrap().into_inner();
        // Claimed once: a second claimant is refused, and no data call
        // runs any more (UNAVAILABLE: the caller moves on).
        assert_eq!(
            claim().await.err().map(|s| s.code()),
            Some(Code::FailedPrecondition)
        );
        let refused = cache
            .set(Request::new(set_req("late", b"x")))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        let refused = cache
            .get(Request::new(GetRequest { key: "k1".into() }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        let refused = internal
            .apply(Request::new(ApplyRequest {
                ops: vec![Op {
                    op: Some(op::Op::Delete(DeleteRequest {
                        key: "k1".into(),
                        if_version: 0,
                    })),
                }],
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(cache.store.delete("k1"), Err(store::StoreError::Frozen));

        // Every entry, with its version, in pages of at most 64.
        let mut handed = std::collections::HashMap::new();
        while let Some(page) = pages.next().await {
            let page = page.unwrap();
            assert!(page.entries.len() <= 64);
            for e in page.entries {
                assert_eq!(e.value, e.key.as_bytes());
                handed.insert(e.key, e.version);
            }
        }
        assert_eq!(handed, written);
        drop(pages);
        assert_eq!(parking.stage(), crate::parking::Stage::Handed);
    }

    #[tokio::test]
    async fn get_set_delete() {
        let svc = service();
        let get = |k: &str| svc.get(Request::new(GetRequest { key: k.into() }));
        assert!(!get("a").await.unwrap().into_inner().found);
        let set = svc
            .set(Request::new(set_req("a", b"1")))
            .await
            .unwrap()
            .into_inner();
        assert!(set.stored);
        let got = get("a").await.unwrap().into_inner();
        assert_eq!(
            (got.found, &got.value[..], got.version),
            (true, &b"1"[..], set.version)
        );
        assert!(got.ttl.is_none());
        let del = svc
            .delete(Request::new(DeleteRequest {
                key: "a".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(del.deleted);
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_whole() {
        let svc = service();
        let status = svc
            .get(Request::new(GetRequest { key: String::new() }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        // One bad entry refuses the batch, and the good ones are not written.
        let big = vec![0u8; (1 << 20) + 1];
        let status = svc
            .set_many(Request::new(SetManyRequest {
                entries: vec![set_req("good", b"x"), set_req("bad", &big)],
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("entries[1].value: value is 1048577 bytes")
        );
        assert!(
            !svc.get(Request::new(GetRequest { key: "good".into() }))
                .await
                .unwrap()
                .into_inner()
                .found
        );
    }

    #[tokio::test]
    async fn batches_answer_in_request_order() {
        let svc = service();
        let entries = (0..50)
            .map(|i| set_req(&format!("k{i}"), format!("v{i}").as_bytes()))
            .collect();
        let set = svc
            .set_many(Request::new(SetManyRequest { entries }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.results.len(), 50);
        assert!(set.results.iter().all(|r| r.stored && r.error.is_none()));
        let keys: Vec<String> = (0..60).rev().map(|i| format!("k{i}")).collect();
        let got = svc
            .get_many(Request::new(GetManyRequest { keys: keys.clone() }))
            .await
            .unwrap()
            .into_inner();
        for (key, r) in keys.iter().zip(&got.results) {
            let i: usize = key[1..].parse().unwrap();
            if i < 50 {
                assert!(r.found);
                assert_eq!(&r.value[..], format!("v{i}").as_bytes());
            } else {
                assert!(!r.found);
            }
        }
    }

    #[tokio::test]
    async fn get_many_refuses_an_answer_over_the_message_limit() {
        let store = Arc::new(
            Store::new(StoreConfig {
                capacity: 64 << 20,
                shards: 4,
            })
            .unwrap(),
        );
        let svc = CacheService::new(store, RequestLimits::default(), 1 << 20);
        let value = vec![1u8; 400 * 1024];
        for k in ["a", "b", "c"] {
            svc.set(Request::new(set_req(k, &value))).await.unwrap();
        }
        let status = svc
            .get_many(Request::new(GetManyRequest {
                keys: vec!["a".into(), "b".into(), "c".into()],
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("after 2 of 3 keys"),
            "{}",
            status.message()
        );
    }

    fn op(op: op::Op) -> Op {
        Op { op: Some(op) }
    }

    async fn apply(svc: &InternalService, ops: Vec<Op>) -> Vec<op_result::Result> {
        svc.apply(Request::new(ApplyRequest { ops }))
            .await
            .unwrap()
            .into_inner()
            .results
            .into_iter()
            .map(|r| r.result.unwrap())
            .collect()
    }

    #[tokio::test]
    async fn apply_runs_mixed_ops_in_order_and_fails_only_the_bad_one() {
        let internal = InternalService::new(service());
        let results = apply(
            &internal,
            vec![
                op(op::Op::Set(set_req("a", b"1"))),
                op(op::Op::Get(GetRequest { key: "a".into() })),
                op(op::Op::Get(GetRequest { key: String::new() })),
                op(op::Op::Delete(DeleteRequest {
                    key: "a".into(),
                    ..Default::default()
                })),
                op(op::Op::Get(GetRequest { key: "a".into() })),
                Op { op: None },
            ],
        )
        .await;
        assert_eq!(results.len(), 6);
        let version = match &results[0] {
            op_result::Result::Set(s) => {
                assert!(s.stored);
                s.version
            }
            other => panic!("{other:?}"),
        };
        match &results[1] {
            op_result::Result::Get(g) => {
                assert!(g.found);
                assert_eq!((&g.value[..], g.version), (&b"1"[..], version));
            }
            other => panic!("{other:?}"),
        }
        match &results[2] {
            op_result::Result::Error(e) => {
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
                assert!(e.message.contains("key must not be empty"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&results[3], op_result::Result::Delete(d) if d.deleted));
        assert!(matches!(&results[4], op_result::Result::Get(g) if !g.found));
        assert!(
            matches!(&results[5], op_result::Result::Error(e) if e.code == tonic::Code::InvalidArgument as i32)
        );
    }

    #[tokio::test]
    async fn copies_keep_their_version_and_never_go_back() {
        let internal = InternalService::new(service());
        let copy = |version: u64, value: &[u8]| {
            op(op::Op::Copy(CopyRequest {
                key: "k".into(),
                value: value.to_vec().into(),
                ttl: None,
                version,
                ..Default::default()
            }))
        };
        let results = apply(
            &internal,
            vec![
                copy(100, b"new"),
                copy(50, b"old"),
                copy(0, b"zero"),
                op(op::Op::Get(GetRequest { key: "k".into() })),
                op(op::Op::Set(set_req("k", b"local"))),
            ],
        )
        .await;
        assert!(matches!(&results[0], op_result::Result::Copy(s) if s.stored && s.version == 100));
        assert!(
            matches!(&results[1], op_result::Result::Copy(s) if !s.stored && s.version == 100),
            "an older copy is refused: {:?}",
            results[1]
        );
        assert!(
            matches!(&results[2], op_result::Result::Error(e) if e.message.contains("version must be between 1 and"))
        );
        assert!(matches!(&results[3], op_result::Result::Get(g) if &g.value[..] == b"new"));
        assert!(
            matches!(&results[4], op_result::Result::Set(s) if s.version > 100),
            "a later write gets a larger version: {:?}",
            results[4]
        );
    }

    #[tokio::test]
    async fn apply_stops_where_the_answers_would_outgrow_a_message() {
        let store = Arc::new(
            Store::new(StoreConfig {
                capacity: 64 << 20,
                shards: 4,
            })
            .unwrap(),
        );
        let cache = CacheService::new(store, RequestLimits::default(), 1 << 20);
        let internal = InternalService::new(cache.clone());
        let value = vec![1u8; 400 * 1024];
        for k in ["a", "b", "c"] {
            cache.set(Request::new(set_req(k, &value))).await.unwrap();
        }
        let get = |k: &str| op(op::Op::Get(GetRequest { key: k.into() }));
        let results = apply(&internal, vec![get("a"), get("b"), get("c")]).await;
        assert_eq!(results.len(), 2, "the third answer does not fit");
        // The rest, sent again, is answered.
        let results = apply(&internal, vec![get("c")]).await;
        assert!(matches!(&results[0], op_result::Result::Get(g) if g.found));
        let status = internal
            .apply(Request::new(ApplyRequest {
                ops: (0..1001).map(|_| get("a")).collect(),
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("--max-batch"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn stats_report_totals_and_shards() {
        let svc = service();
        svc.set(Request::new(set_req("a", b"1"))).await.unwrap();
        svc.get(Request::new(GetRequest { key: "a".into() }))
            .await
            .unwrap();
        svc.get(Request::new(GetRequest { key: "b".into() }))
            .await
            .unwrap();
        let node = NodeService::new(svc.store.clone(), "node-a".into());
        let stats = node
            .stats(Request::new(StatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        let total = stats.total.unwrap();
        assert_eq!((total.items, total.hits, total.misses), (1, 1, 1));
        assert_eq!(total.capacity_bytes, 64 << 20);
        assert_eq!(stats.shards.len(), 4);
        assert_eq!(stats.node_id, "node-a");
        assert_eq!(stats.shards.iter().map(|s| s.items).sum::<u64>(), 1);
        assert!(
            stats
                .shards
                .iter()
                .enumerate()
                .all(|(i, s)| s.shard as usize == i)
        );
    }
}

#[cfg(test)]
mod feed_tests {
    use std::time::Duration;

    use futures::StreamExt;
    use ringcache_proto::v1::{ChangeKind, CopyRequest};

    use super::*;
    use crate::store::StoreConfig;

    fn logged(max_bytes: usize) -> (InternalService, Arc<ChangeLog>) {
        let log = Arc::new(ChangeLog::new(42, max_bytes));
        let store = Store::new(StoreConfig {
            capacity: 64 << 20,
            shards: 4,
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .with_change_log(log.clone());
        let cache = CacheService::new(Arc::new(store), RequestLimits::default(), 4 << 20);
        (InternalService::new(cache), log)
    }

    fn op(op: op::Op) -> Op {
        Op { op: Some(op) }
    }

    async fn next(stream: &mut <InternalService as Internal>::ChangesStream) -> ChangesResponse {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no message within 10 s"))
            .unwrap_or_else(|| panic!("the feed ended"))
            .unwrap_or_else(|s| panic!("{s}"))
    }

    async fn follow(
        svc: &InternalService,
        incarnation: u64,
        after: u64,
    ) -> <InternalService as Internal>::ChangesStream {
        svc.changes(Request::new(ChangesRequest { incarnation, after }))
            .await
            .unwrap_or_else(|s| panic!("{s}"))
            .into_inner()
    }

    #[tokio::test]
    async fn every_kind_of_change_is_published_in_order_and_followed_live() {
        let (svc, _log) = logged(1 << 20);
        let mut feed = follow(&svc, 0, 0).await;
        let first = next(&mut feed).await;
        assert_eq!((first.incarnation, first.gap, first.head), (42, false, 0));
        assert!(first.changes.is_empty(), "the first message comes at once");
        let ops = vec![
            op(op::Op::Set(SetRequest {
                key: "a".into(),
                value: Bytes::from_static(b"1"),
                ..Default::default()
            })),
            op(op::Op::Increment(IncrementRequest {
                key: "n".into(),
                delta: 2,
                ..Default::default()
            })),
            op(op::Op::Touch(TouchRequest {
                key: "a".into(),
                ..Default::default()
            })),
            op(op::Op::Copy(CopyRequest {
                key: "c".into(),
                value: Bytes::from_static(b"x"),
                ttl: None,
                version: 7,
                ..Default::default()
            })),
            op(op::Op::Delete(DeleteRequest {
                key: "gone".into(),
                if_version: 0,
            })),
            // Not applied: no change.
            op(op::Op::Set(SetRequest {
                key: "a".into(),
                value: Bytes::from_static(b"2"),
                condition: Some(ringcache_proto::v1::set_request::Condition::IfAbsent(true)),
                ..Default::default()
            })),
            op(op::Op::Get(GetRequest { key: "a".into() })),
        ];
        let (results, _) = svc.run_batch(&ops).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(results.len(), ops.len());
        let mut seen = Vec::new();
        while seen.len() < 5 {
            seen.extend(next(&mut feed).await.changes);
        }
        let kinds: Vec<(u64, i32, &str)> = seen
            .iter()
            .map(|c| (c.sequence, c.kind, c.key.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (1, ChangeKind::Set as i32, "a"),
                (2, ChangeKind::Increment as i32, "n"),
                (3, ChangeKind::Touch as i32, "a"),
                (4, ChangeKind::Copy as i32, "c"),
                (5, ChangeKind::Delete as i32, "gone"),
            ]
        );
        assert_eq!(seen[3].version, 7, "a copy keeps its version");
        svc.flush(Request::new(FlushRequest {}))
            .await
            .unwrap_or_else(|s| panic!("{s}"));
        let flush = next(&mut feed).await;
        assert_eq!(flush.changes[0].kind, ChangeKind::Flush as i32);
        assert_eq!(flush.head, 6);
    }

    #[tokio::test]
    async fn a_follower_resumes_after_its_position_or_is_told_of_a_gap() {
        // Room for three short-key changes.
        let (svc, log) = logged(3 * crate::changes::ENTRY_OVERHEAD);
        for k in ["a", "b", "c", "d"] {
            svc.cache.store.delete(k).unwrap();
        }
        assert_eq!(log.head(), 4);
        // After 1: changes 2..4 are held.
        let mut feed = follow(&svc, 42, 1).await;
        let m = next(&mut feed).await;
        assert!(!m.gap);
        assert_eq!(
            m.changes.iter().map(|c| c.sequence).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        // After 0: change 1 was dropped.
        let mut feed = follow(&svc, 42, 0).await;
        let m = next(&mut feed).await;
        assert!(m.gap && m.changes.is_empty());
        assert_eq!(m.head, 4);
        // Another incarnation: a gap too, then live from the end.
        let mut feed = follow(&svc, 41, 4).await;
        assert!(next(&mut feed).await.gap);
        svc.cache.store.delete("e").unwrap();
        let m = next(&mut feed).await;
        assert!(!m.gap);
        assert_eq!(m.changes[0].sequence, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_feed_sends_heartbeats_and_ends_when_the_node_drains() {
        let (svc, _log) = logged(1 << 20);
        let (drain, draining) = tokio::sync::watch::channel(false);
        let svc = svc.with_streams(draining, 8);
        let mut feed = follow(&svc, 0, 0).await;
        next(&mut feed).await;
        let beat = next(&mut feed).await;
        assert!(beat.changes.is_empty() && !beat.gap);
        drain.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .unwrap_or_else(|_| panic!("the feed did not end"));
        assert!(matches!(end, Some(Err(s)) if s.code() == tonic::Code::Unavailable));
        assert!(feed.next().await.is_none());
        let refused = svc
            .changes(Request::new(ChangesRequest::default()))
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::Unavailable));
    }

    #[tokio::test]
    async fn without_a_log_the_feed_is_refused_with_the_flag_to_change() {
        let store = Store::new(StoreConfig {
            capacity: 64 << 20,
            shards: 4,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let cache = CacheService::new(Arc::new(store), RequestLimits::default(), 4 << 20);
        let svc = InternalService::new(cache);
        let status = svc
            .changes(Request::new(ChangesRequest::default()))
            .await
            .err()
            .unwrap_or_else(|| panic!("a feed without a log"));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("--change-log-bytes"));
    }
}
