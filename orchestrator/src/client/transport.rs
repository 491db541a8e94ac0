//! HTTP/2 connections to one node, and the innermost service of its stack.
//!
//! A [`Transport`] holds `--node-connections` HTTP/2 connections to its
//! node, opened on first use and again after they break, and spreads calls
//! over them in turn. It makes unary gRPC calls on the `h2` crate directly
//! — the HTTP/2 implementation under hyper and tonic — because the layers
//! above it cost more than the call they wrap here, where every client
//! request pays them (measured in `BENCHMARKS.md`):
//!
//! - tonic's `Channel` hands every request to a buffer task (one more task
//!   wake-up per call), and hyper's HTTP/2 client hands it to the
//!   connection's task through a channel and spawns a task per request for
//!   the response (and one more to stream the request body). With `h2`, the
//!   caller's own task writes the request into the connection's buffers and
//!   reads the answer; the connection task only moves bytes.
//! - Failures are classified where they happen: a request that never
//!   reached the connection, or that the node refused before reading it
//!   (`REFUSED_STREAM`), is [`CallError::NotSent`]; any other break after
//!   sending is [`CallError::Lost`] (it may have been applied).
//!
//! The gRPC part of a unary call is small and fixed: `content-type:
//! application/grpc`, a 5-byte frame header in front of the protobuf
//! message, and the status in `grpc-status`/`grpc-message` trailers (or in
//! the headers of a trailers-only answer), which `tonic::Status` parses.
//!
//! A connection that times out or breaks is dropped, so the next call
//! opens a new one; idle connections are pinged (`PING` every 30 s, closed
//! if no answer in 10 s), so a peer that vanished without closing is
//! noticed even without traffic.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, header};
use parking_lot::Mutex;
use prost::Message;
use ringcache_proto::v1::{
    ApplyRequest, ApplyResponse, ChangesRequest, ChangesResponse, DebtsRequest, DebtsResponse,
    FlushRequest, FlushResponse, ParkRequest, ParkResponse, ScanRequest, ScanResponse,
    SettleRequest, SettleResponse, StatsRequest, StatsResponse,
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
};
use tower::Service;

use super::{
    CallError, NodeCall, NodeReply,
    stream::{BatchStream, Ended},
};

/// How connections to nodes are made.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Longest wait for a TCP connection and the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// HTTP/2 connections per node; calls take them in turn.
    pub connections: usize,
    /// Largest message to or from a node.
    pub max_message_bytes: usize,
    /// After a failed connection attempt, calls fail at once (as not
    /// sent) for this long instead of each trying again.
    pub reconnect_backoff: Duration,
    /// TLS to nodes (`--node-tls-*`); `None`: plaintext.
    pub tls: Option<NodeTls>,
    /// Send batches on one `ApplyStream` per connection
    /// (`--node-streams`) instead of a unary `Apply` each.
    pub streams: bool,
}

/// How the orchestrator speaks TLS to nodes.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// CA, and the orchestrator's own certificate for nodes that require
    /// one; reloaded when the files change (each new connection uses the
    /// configuration in use when it is made).
    pub config: Arc<ringcache_common::tls::ReloadingClientConfig>,
    /// The name node certificates are checked against
    /// (`--node-tls-server-name`); `None`: the host part of each node's
    /// address (a DNS name or an IP address).
    pub server_name: Option<String>,
}

impl NodeTls {
    /// The name to verify `address`'s (`host:port`) certificate against.
    fn server_name(&self, address: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
        let name = match &self.server_name {
            Some(n) => n.as_str(),
            None => address
                .rsplit_once(':')
                .map_or(address, |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']'),
        };
        rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{name:?} is not a name to check a certificate against: {e}"))
    }
}

/// The HTTP/2 flow-control window per stream: large enough that a batch's
/// answer is not throttled by WINDOW_UPDATE round trips at HTTP/2's 64 KiB
/// default.
const STREAM_WINDOW: u32 = 1 << 20;
/// The window of a whole connection: several large answers at once.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// How often an idle connection is pinged, and how long the answer may
/// take.
/// Who a node is: [`Transport::identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its `--node-id`.
    pub id: String,
    /// Different for every start of its process.
    pub incarnation: u64,
}

const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

const APPLY: &str = "/ringcache.v1.Internal/Apply";
/// The metadata key the ring epoch travels in.
const EPOCH_HEADER: &str = "ringcache-epoch";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const FLUSH: &str = "/ringcache.v1.Internal/Flush";
const STATS: &str = "/ringcache.v1.Node/Stats";
const SCAN: &str = "/ringcache.v1.Internal/Scan";
const CHANGES: &str = "/ringcache.v1.Internal/Changes";
const PARK: &str = "/ringcache.v1.Internal/Park";
const DEBTS: &str = "/ringcache.v1.Internal/Debts";
const SETTLE: &str = "/ringcache.v1.Internal/Settle";

/// One connection slot.
#[derive(Debug, Default)]
struct Slot {
    /// The open connection, if any, with the number it was opened under.
    sender: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Connections opened in this slot so far.
    opened: AtomicU64,
    /// Held while connecting, so concurrent calls wait for one attempt
    /// instead of each opening a connection.
    connecting: tokio::sync::Mutex<()>,
    /// When and why the last attempt failed.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// The `ApplyStream` on this slot's connection, if one was opened.
    stream: Mutex<Option<Arc<BatchStream>>>,
}

#[derive(Debug)]
struct Pool {
    address: String,
    authority: http::uri::Authority,
    settings: TransportSettings,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

/// Connections to one node; cheap to clone (clones share them).
#[derive(Debug, Clone)]
pub struct Transport {
    pool: Arc<Pool>,
    /// The ring epoch sent with every `Apply` (`ringcache-epoch`), if any.
    epoch: Option<Arc<AtomicU64>>,
}

impl Transport {
    /// Connections to `address` (`host:port`; a host name is resolved again
    /// at every connection attempt). Nothing is opened until the first
    /// call.
    pub fn new(address: &str, settings: TransportSettings) -> Result<Self, http::Error> {
        let authority = http::uri::Authority::try_from(address)?;
        let slots = (0..settings.connections.max(1))
            .map(|_| Slot::default())
            .collect();
        Ok(Self {
            pool: Arc::new(Pool {
                address: address.to_owned(),
                authority,
                settings,
                slots,
                next: AtomicUsize::new(0),
            }),
            epoch: None,
        })
    }

    /// Sends the ring epoch in `epoch` (kept current by the cluster) with
    /// every call, so nodes can tell when orchestrators disagree.
    pub fn with_epoch(mut self, epoch: Arc<AtomicU64>) -> Self {
        self.epoch = Some(epoch);
        self
    }

    /// The next slot, and a connection to send on (with its number),
    /// opened if needed.
    async fn sender(&self) -> Result<(&Slot, u64, SendRequest<Bytes>), CallError> {
        let pool = &*self.pool;
        let slot = &pool.slots[pool.next.fetch_add(1, Ordering::Relaxed) % pool.slots.len()];
        if let Some((id, sender)) = slot.sender.lock().clone() {
            return Ok((slot, id, sender));
        }
        let _connecting = slot.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some((id, sender)) = slot.sender.lock().clone() {
            return Ok((slot, id, sender));
        }
        if let Some((at, why)) = &*slot.last_failure.lock()
            && at.elapsed() < pool.settings.reconnect_backoff
        {
            return Err(CallError::NotSent(format!(
                "cannot connect to {} ({why}); next attempt in {:?}",
                pool.address,
                pool.settings.reconnect_backoff.saturating_sub(at.elapsed())
            )));
        }
        let connecting = connect(&pool.address, pool.settings.tls.as_ref());
        match tokio::time::timeout(pool.settings.connect_timeout, connecting).await {
            Ok(Ok(sender)) => {
                let id = slot.opened.fetch_add(1, Ordering::Relaxed) + 1;
                *slot.sender.lock() = Some((id, sender.clone()));
                *slot.last_failure.lock() = None;
                Ok((slot, id, sender))
            }
            Ok(Err(why)) => Err(self.connect_failed(slot, why)),
            Err(_) => Err(self.connect_failed(
                slot,
                format!("no connection within {:?}", pool.settings.connect_timeout),
            )),
        }
    }

    fn connect_failed(&self, slot: &Slot, why: String) -> CallError {
        tracing::debug!(address = %self.pool.address, %why, "cannot connect to node");
        let message = format!("cannot connect to {}: {why}", self.pool.address);
        *slot.last_failure.lock() = Some((Instant::now(), why));
        CallError::NotSent(message)
    }

    /// One unary gRPC call of `path` with `message`. A connection that
    /// breaks is dropped from its slot, so the next call opens a fresh one;
    /// with `suspicious`, so is one that does not answer before the call is
    /// dropped (health checks: a connection to a vanished peer would
    /// otherwise stay open until its keepalive gives up, and keep the node
    /// ejected).
    async fn unary<M: Message, R: Message + Default>(
        &self,
        path: &'static str,
        message: &M,
        timeout: Option<Duration>,
        headers: Option<HeaderMap>,
        suspicious: bool,
    ) -> Result<R, CallError> {
        let (slot, id, sender) = self.sender().await?;
        let mut forget = ForgetUnlessAnswered {
            slot,
            id,
            armed: suspicious,
        };
        let max = self.pool.settings.max_message_bytes;
        let outcome = unary(
            sender,
            &self.pool.authority,
            path,
            message,
            timeout,
            headers,
            max,
        )
        .await;
        forget.armed = matches!(outcome, Err(CallError::NotSent(_) | CallError::Lost(_)));
        R::decode(outcome?).map_err(|e| {
            CallError::Refused(tonic::Status::internal(format!(
                "cannot decode the node's answer: {e}"
            )))
        })
    }

    /// Calls `grpc.health.v1.Health/Check` for `service` on this node.
    pub async fn health_check(&self, service: &str, timeout: Duration) -> Result<(), Unhealthy> {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let check =
            self.unary::<_, HealthCheckResponse>(HEALTH_CHECK, &request, Some(timeout), None, true);
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(r)) if r.status() == ServingStatus::Serving => Ok(()),
            Ok(Ok(r)) if r.status() == ServingStatus::NotServing => Err(Unhealthy::NotServing),
            Ok(Ok(r)) => Err(Unhealthy::Failed(format!("health is {:?}", r.status()))),
            Ok(Err(e)) => Err(Unhealthy::Failed(e.to_string())),
            Err(_) => Err(Unhealthy::Failed(format!("no answer within {timeout:?}"))),
        }
    }

    /// Empties the node (`Internal/Flush`); returns how many entries it
    /// removed.
    pub async fn flush(&self, timeout: Duration) -> Result<u64, CallError> {
        self.unary_within::<_, FlushResponse>(FLUSH, &FlushRequest {}, timeout)
            .await
            .map(|r| r.removed)
    }

    /// A unary call of the internal API that must answer within
    /// `timeout` (sent as its deadline too): [`CallError::NodeTimeout`]
    /// when it does not.
    async fn unary_within<M: Message, R: Message + Default>(
        &self,
        path: &'static str,
        message: &M,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let call = self.unary::<_, R>(path, message, Some(timeout), None, true);
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CallError::NodeTimeout(timeout)),
        }
    }

    /// Asks the node for its identity (`Node/Stats` → `node_id`).
    pub async fn node_id(&self, timeout: Duration) -> Result<String, String> {
        self.identity(timeout).await.map(|i| i.id)
    }

    /// Headers carrying the ring epoch (`ringcache-epoch`), if this
    /// transport sends one.
    fn epoch_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(epoch) = &self.epoch
            && let Ok(v) = HeaderValue::try_from(format!("{:016x}", epoch.load(Ordering::Relaxed)))
        {
            headers.insert(EPOCH_HEADER, v);
        }
        headers
    }

    /// Asks the node who it is: its `node_id` and the incarnation of its
    /// process (`Node/Stats`). Carries the ring epoch: asked every health
    /// round, it keeps the node's record of the orchestrators' epoch fresh
    /// when no data call comes (the node vouches for direct reads by it).
    pub async fn identity(&self, timeout: Duration) -> Result<Identity, String> {
        let headers = Some(self.epoch_headers());
        let ask =
            self.unary::<_, StatsResponse>(STATS, &StatsRequest {}, Some(timeout), headers, true);
        match tokio::time::timeout(timeout, ask).await {
            Ok(Ok(stats)) => Ok(Identity {
                id: stats.node_id,
                incarnation: stats.incarnation,
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// One page of the node's keys (`Internal/Scan`) from `cursor`.
    pub async fn scan(
        &self,
        cursor: (u32, u64),
        limit: u32,
        timeout: Duration,
    ) -> Result<ScanResponse, CallError> {
        let request = ScanRequest {
            shard: cursor.0,
            position: cursor.1,
            limit,
        };
        self.unary_within(SCAN, &request, timeout).await
    }

    /// The keys this node recorded that `owner` missed changes of
    /// (`Internal/Debts`), oldest first, at most `limit`.
    pub async fn debts(
        &self,
        owner: &str,
        limit: u32,
        timeout: Duration,
    ) -> Result<DebtsResponse, CallError> {
        let request = DebtsRequest {
            owner: owner.to_owned(),
            limit,
        };
        self.unary_within(DEBTS, &request, timeout).await
    }

    /// Drops this node's records of `owner`'s debts up to `through`
    /// (`Internal/Settle`); returns how many it dropped.
    pub async fn settle(
        &self,
        owner: &str,
        through: u64,
        timeout: Duration,
    ) -> Result<u64, CallError> {
        let request = SettleRequest {
            owner: owner.to_owned(),
            through,
        };
        self.unary_within::<_, SettleResponse>(SETTLE, &request, timeout)
            .await
            .map(|r| r.settled)
    }

    /// Follows the node's change feed (`Internal/Changes`) from position
    /// `(incarnation, after)` (0, 0: from its current end), on one of the
    /// pool's connections.
    pub async fn changes(&self, incarnation: u64, after: u64) -> Result<ChangeFeed, CallError> {
        let (_, _, sender) = self.sender().await?;
        let (sender, request) = grpc_request(sender, &self.pool.authority, CHANGES).await?;
        let message = ChangesRequest { incarnation, after };
        let max = self.pool.settings.max_message_bytes;
        // A trailers-only answer is a refusal (no log, draining, too many).
        let (_, body) = send_message(sender, request, &message, max).await?;
        Ok(Messages::new(body, max))
    }

    /// Claims a stopping node's entries (`Internal/Park`): from the
    /// answer on, the node refuses data calls, and the stream reads its
    /// entries, `limit` per message.
    pub async fn park(&self, limit: u32) -> Result<Messages<ParkResponse>, CallError> {
        let (_, _, sender) = self.sender().await?;
        let (sender, request) = grpc_request(sender, &self.pool.authority, PARK).await?;
        let max = self.pool.settings.max_message_bytes;
        // A trailers-only answer is a refusal (not stopping, claimed).
        let (_, body) = send_message(sender, request, &ParkRequest { limit }, max).await?;
        Ok(Messages::new(body, max))
    }

    /// The `ApplyStream` to send the next batch on, opened if needed, with
    /// its slot; `None` when batches go by unary `Apply` (streams are off,
    /// or the node refused a stream on this connection).
    async fn stream(&self) -> Result<Option<(&Slot, Arc<BatchStream>)>, CallError> {
        if !self.pool.settings.streams {
            return Ok(None);
        }
        let (slot, connection, sender) = self.sender().await?;
        let usable = |current: &Option<Arc<BatchStream>>| match current {
            Some(s) if s.connection() == connection => match s.ended() {
                None => Some(Some(s.clone())),
                // Refused or ended by the node (draining, no such method,
                // too many streams): unary until the connection is new.
                Some(Ended::NotRun(_)) => Some(None),
                Some(Ended::Failed(_)) => None,
            },
            _ => None,
        };
        if let Some(found) = usable(&slot.stream.lock()) {
            return Ok(found.map(|s| (slot, s)));
        }
        let max = self.pool.settings.max_message_bytes;
        let opened = BatchStream::open(sender, connection, &self.pool.authority, max).await?;
        let mut current = slot.stream.lock();
        // Another call may have opened one meanwhile: use that one.
        if let Some(found) = usable(&current) {
            return Ok(found.map(|s| (slot, s)));
        }
        *current = Some(opened.clone());
        Ok(Some((slot, opened)))
    }

    /// Sends `call` on an `ApplyStream` if there is one to send it on:
    /// `None` if it must go by unary `Apply` (no stream, or the node ended
    /// the stream before running it).
    async fn apply_streamed(&self, call: &NodeCall) -> Option<Result<NodeReply, CallError>> {
        let (slot, stream) = match self.stream().await {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let epoch = self.epoch.as_ref().map_or(0, |e| e.load(Ordering::Relaxed));
        match stream.call(&call.ops, epoch).await {
            Ok(answer) => Some(match answer.error {
                Some(e) => Err(CallError::Refused(tonic::Status::new(
                    tonic::Code::from_i32(e.code),
                    e.message,
                ))),
                None => Ok(answer.results),
            }),
            Err(Ended::NotRun(_)) => None,
            Err(Ended::Failed(e)) => {
                if matches!(e, CallError::NotSent(_) | CallError::Lost(_)) {
                    // As a broken unary call does: the next call opens a
                    // fresh connection.
                    drop(ForgetUnlessAnswered {
                        slot,
                        id: stream.connection(),
                        armed: true,
                    });
                }
                Some(Err(e))
            }
        }
    }

    async fn apply(self, call: NodeCall) -> Result<NodeReply, CallError> {
        let count = call.ops.len();
        // Sampled requests go by unary `Apply`, whose headers carry their
        // trace context.
        let streamed = if call.trace.is_none() {
            self.apply_streamed(&call).await
        } else {
            None
        };
        let results = match streamed {
            Some(results) => results?,
            None => self.apply_unary(call).await?,
        };
        if results.is_empty() && count > 0 || results.len() > count {
            return Err(CallError::Refused(tonic::Status::internal(format!(
                "answered {} results for {count} ops",
                results.len()
            ))));
        }
        Ok(results)
    }

    async fn apply_unary(&self, call: NodeCall) -> Result<NodeReply, CallError> {
        // Tell the node the deadline too, so it stops work nobody waits for.
        let timeout = call.deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let mut headers = self.epoch_headers();
        if let Some(cx) = &call.trace {
            ringcache_common::rpc_trace::inject_headers(cx, &mut headers);
        }
        let headers = Some(headers);
        let request = ApplyRequest { ops: call.ops };
        Ok(self
            .unary::<_, ApplyResponse>(APPLY, &request, timeout, headers, false)
            .await?
            .results)
    }
}

/// Drops a slot's connection when dropped armed: a call on it broke, or
/// (for a suspicious call) never got its answer.
struct ForgetUnlessAnswered<'a> {
    slot: &'a Slot,
    id: u64,
    armed: bool,
}

impl Drop for ForgetUnlessAnswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut current = self.slot.sender.lock();
            // Only if no other call replaced it already.
            if current.as_ref().is_some_and(|(id, _)| *id == self.id) {
                *current = None;
            }
        }
    }
}

/// Opens one HTTP/2 connection and spawns the task that drives it (and
/// pings it while idle).
async fn connect(address: &str, tls: Option<&NodeTls>) -> Result<SendRequest<Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    match tls {
        None => http2(tcp, address).await,
        Some(tls) => {
            let name = tls.server_name(address)?;
            let stream = ringcache_common::tls::connector(&tls.config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            http2(stream, address).await
        }
    }
}

/// Why a health check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// The node answered NOT_SERVING: it is stopping (draining).
    #[error("health is NOT_SERVING (the node is stopping)")]
    NotServing,
    /// No answer, or any other status.
    #[error("{0}")]
    Failed(String),
}

/// A node's change feed being read ([`Transport::changes`]).
pub type ChangeFeed = Messages<ChangesResponse>;

/// The messages of a node's server stream being read: its change feed
/// ([`Transport::changes`]) or a stopping node's entries
/// ([`Transport::park`]).
#[derive(Debug)]
pub struct Messages<M> {
    body: h2::RecvStream,
    buf: BytesMut,
    max_message: usize,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: Message + Default> Messages<M> {
    fn new(body: h2::RecvStream, max_message: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            max_message,
            _message: std::marker::PhantomData,
        }
    }

    /// The next message; `None` when the node ended the stream without an
    /// error status.
    pub async fn next(&mut self) -> Result<Option<M>, CallError> {
        loop {
            if self.buf.len() >= 5 {
                let (compressed, len) = (
                    self.buf[0],
                    u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]),
                );
                let len = len as usize;
                if compressed != 0 || len > self.max_message {
                    return Err(CallError::Lost(format!(
                        "the node's stream is malformed (compressed flag {compressed}, length {len}, limit {})",
                        self.max_message
                    )));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let message = self.buf.split_to(len).freeze();
                    return M::decode(message).map(Some).map_err(|e| {
                        CallError::Lost(format!("cannot decode the node's stream: {e}"))
                    });
                }
            }
            match self.body.data().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(stream_failure)?;
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                None => {
                    let trailers = self.body.trailers().await.map_err(stream_failure)?;
                    return match trailers.as_ref().and_then(tonic::Status::from_header_map) {
                        Some(s) if s.code() == tonic::Code::Ok => Ok(None),
                        Some(s) => Err(CallError::Refused(s)),
                        None => Err(CallError::Lost(
                            "the stream ended without a grpc-status".to_owned(),
                        )),
                    };
                }
            }
        }
    }
}

/// The HTTP/2 handshake on `io`, and the task that drives the connection
/// (with keepalive pings) until it closes.
async fn http2<T>(io: T, address: &str) -> Result<SendRequest<Bytes>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let mut ping = connection.ping_pong();
    let address = address.to_owned();
    tokio::spawn(async move {
        let keepalive = async {
            let Some(ping) = ping.as_mut() else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(KEEPALIVE.0).await;
                match tokio::time::timeout(KEEPALIVE.1, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                    Err(_) => return format!("no PING answer within {:?}", KEEPALIVE.1),
                }
            }
        };
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(%address, %error, "connection to node closed");
                }
            }
            why = keepalive => tracing::debug!(%address, %why, "closing connection to node"),
        }
    });
    Ok(sender)
}

/// Waits until `sender`'s connection can take a new stream, and builds a
/// gRPC request for `path` (POST, `content-type: application/grpc`,
/// `te: trailers`). Fails as [`CallError::NotSent`].
pub(super) async fn grpc_request(
    sender: SendRequest<Bytes>,
    authority: &http::uri::Authority,
    path: &'static str,
) -> Result<(SendRequest<Bytes>, Request<()>), CallError> {
    let sender = sender
        .ready()
        .await
        .map_err(|e| CallError::NotSent(format!("the connection is closed ({e})")))?;
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| CallError::NotSent(e.to_string()))?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(())
        .map_err(|e| CallError::NotSent(e.to_string()))?;
    let h = request.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    Ok((sender, request))
}

/// Sends `request` with `message` as its only (and last) message, and
/// waits for the answer's headers: an HTTP status other than 200, or a
/// trailers-only answer with an error status, is [`CallError::Refused`].
/// Returns the headers and the body to read the answer's messages from.
async fn send_message<M: Message>(
    mut sender: SendRequest<Bytes>,
    request: Request<()>,
    message: &M,
    max_message: usize,
) -> Result<(http::response::Parts, h2::RecvStream), CallError> {
    let len = message.encoded_len();
    if len > max_message {
        return Err(CallError::Refused(ringcache_common::exhausted::too_large(
            format!(
                "request of {len} bytes is over the {max_message}-byte limit (--max-message-bytes)"
            ),
            max_message,
        )));
    }
    let mut body = BytesMut::with_capacity(5 + len);
    body.put_u8(0);
    body.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut body)
        .map_err(|e| CallError::NotSent(e.to_string()))?;
    let (response, mut stream) = sender
        .send_request(request, false)
        .map_err(|e| CallError::NotSent(format!("the connection is closed ({e})")))?;
    stream
        .send_data(body.freeze(), true)
        .map_err(|e| CallError::Lost(e.to_string()))?;
    let response = response.await.map_err(stream_failure)?;
    let (parts, recv) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(CallError::Refused(tonic::Status::unknown(format!(
            "the node answered HTTP {}",
            parts.status
        ))));
    }
    // A trailers-only answer: the status is in the headers.
    if let Some(status) = tonic::Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        return Err(CallError::Refused(status));
    }
    Ok((parts, recv))
}

/// The gRPC unary exchange on one HTTP/2 stream: returns the answer's
/// message bytes.
async fn unary<M: Message>(
    sender: SendRequest<Bytes>,
    authority: &http::uri::Authority,
    path: &'static str,
    message: &M,
    timeout: Option<Duration>,
    headers: Option<HeaderMap>,
    max_message: usize,
) -> Result<Bytes, CallError> {
    let (sender, mut request) = grpc_request(sender, authority, path).await?;
    {
        let h = request.headers_mut();
        if let Some(extra) = headers {
            h.extend(extra);
        }
        if let Some(t) = timeout
            && let Ok(v) = HeaderValue::try_from(grpc_timeout(t))
        {
            h.insert("grpc-timeout", v);
        }
    }
    let (parts, mut recv) = send_message(sender, request, message, max_message).await?;
    let mut data = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(stream_failure)?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        if data.len() + chunk.len() > max_message + 5 {
            return Err(CallError::Refused(ringcache_common::exhausted::too_large(
                format!(
                    "the node's answer is over the {max_message}-byte limit (--max-message-bytes)"
                ),
                max_message,
            )));
        }
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.map_err(stream_failure)?;
    let status = trailers
        .as_ref()
        .and_then(tonic::Status::from_header_map)
        .or_else(|| tonic::Status::from_header_map(&parts.headers));
    match status {
        Some(s) if s.code() == tonic::Code::Ok => {}
        Some(s) => return Err(CallError::Refused(s)),
        None => {
            return Err(CallError::Lost(
                "the answer ended without a grpc-status".to_owned(),
            ));
        }
    }
    if data.len() < 5 {
        return Err(CallError::Refused(tonic::Status::internal(
            "the node's answer has no message",
        )));
    }
    let mut data = data.freeze();
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    if compressed != 0 || len != data.len() {
        return Err(CallError::Refused(tonic::Status::internal(format!(
            "the node's answer is malformed (compressed flag {compressed}, length {len} for {} bytes)",
            data.len()
        ))));
    }
    Ok(data)
}

/// How an HTTP/2 stream error says the call ended: a stream the node
/// refused before reading (`REFUSED_STREAM`) was never processed; any
/// other failure after sending may have been.
pub(super) fn stream_failure(e: h2::Error) -> CallError {
    if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        CallError::NotSent(format!("the node refused the stream ({e})"))
    } else {
        CallError::Lost(format!("connection lost mid-call ({e})"))
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit.
fn grpc_timeout(t: Duration) -> String {
    let micros = t.as_micros();
    if micros < 100_000_000 {
        format!("{micros}u")
    } else {
        format!("{}m", t.as_millis().min(99_999_999))
    }
}

impl Service<NodeCall> for Transport {
    type Response = NodeReply;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<NodeReply, CallError>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: NodeCall) -> Self::Future {
        Box::pin(self.clone().apply(call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_fit_the_header_format() {
        assert_eq!(grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(grpc_timeout(Duration::from_secs(99)), "99000000u");
        assert_eq!(grpc_timeout(Duration::from_secs(100)), "100000m");
        assert_eq!(grpc_timeout(Duration::from_secs(1 << 40)), "99999999m");
        for t in [Duration::from_micros(1), Duration::from_secs(5)] {
            assert_eq!(
                ringcache_common::deadline::parse_timeout(&grpc_timeout(t)),
                Some(t)
            );
        }
    }
}
