//! HTTP/2 connections to one node, and the innermost service of its stack.
//!
//! A [`Transport`] holds `--node-connections` HTTP/2 connections to its
//! node, opened on first use and again after they break, and spreads calls
//! over them in turn. It speaks to hyper's HTTP/2 client directly, not
//! through tonic's `Channel`: a `Channel` hands every request to a buffer
//! task first (one more task wake-up per call), and hides whether a failed
//! request ever reached the connection. Here that is known exactly — hyper
//! gives back a request it could not send, and a node that refuses a stream
//! says so (`REFUSED_STREAM`) — so failures are classified into
//! [`CallError::NotSent`] or [`CallError::Lost`] where they happen.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::Uri;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use ringcache_proto::v1::{
    ApplyRequest, StatsRequest, internal_client::InternalClient, node_client::NodeClient,
};
use tonic::{Code, body::Body};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tower::Service;

use super::{CallError, NodeCall, NodeReply};

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
}

/// The HTTP/2 flow-control window per stream: large enough that a batch's
/// answer (up to `--max-message-bytes`) is not throttled by
/// WINDOW_UPDATE round trips at HTTP/2's 64 KiB default.
const STREAM_WINDOW: u32 = 1 << 20;
/// The window of a whole connection: several large answers at once.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// Why the transport failed a request: carried inside the `Status` tonic
/// makes of it, and read back by [`classify`].
#[derive(Debug, thiserror::Error)]
enum TransportError {
    /// The request was not handed to a connection.
    #[error("{0}")]
    NotSent(String),
    /// The connection failed after the request was handed to it.
    #[error("{0}")]
    Lost(#[source] hyper::Error),
}

/// One connection slot.
#[derive(Debug, Default)]
struct Slot {
    /// The open connection, if any.
    sender: Mutex<Option<SendRequest<Body>>>,
    /// Held while connecting, so concurrent calls wait for one attempt
    /// instead of each opening a connection.
    connecting: tokio::sync::Mutex<()>,
    /// When and why the last attempt failed.
    last_failure: Mutex<Option<(Instant, String)>>,
}

#[derive(Debug)]
struct Pool {
    address: String,
    origin: Uri,
    settings: TransportSettings,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

/// Connections to one node; cheap to clone (clones share them).
#[derive(Debug, Clone)]
pub struct Transport {
    pool: Arc<Pool>,
}

impl Transport {
    /// Connections to `address` (`host:port`; a host name is resolved again
    /// at every connection attempt). Nothing is opened until the first
    /// call.
    pub fn new(address: &str, settings: TransportSettings) -> Result<Self, http::Error> {
        let origin = Uri::builder()
            .scheme("http")
            .authority(address)
            .path_and_query("/")
            .build()?;
        let slots = (0..settings.connections.max(1))
            .map(|_| Slot::default())
            .collect();
        Ok(Self {
            pool: Arc::new(Pool {
                address: address.to_owned(),
                origin,
                settings,
                slots,
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// A connection to send on: the next slot's, opened if needed.
    async fn sender(&self) -> Result<SendRequest<Body>, CallError> {
        let pool = &*self.pool;
        let slot = &pool.slots[pool.next.fetch_add(1, Ordering::Relaxed) % pool.slots.len()];
        if let Some(sender) = open(slot) {
            return Ok(sender);
        }
        let _connecting = slot.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some(sender) = open(slot) {
            return Ok(sender);
        }
        if let Some((at, why)) = &*slot.last_failure.lock()
            && at.elapsed() < pool.settings.reconnect_backoff
        {
            return Err(CallError::NotSent(format!(
                "cannot connect to {} ({why}); retrying in {:?}",
                pool.address,
                pool.settings.reconnect_backoff.saturating_sub(at.elapsed())
            )));
        }
        match tokio::time::timeout(pool.settings.connect_timeout, connect(&pool.address)).await {
            Ok(Ok(sender)) => {
                *slot.sender.lock() = Some(sender.clone());
                *slot.last_failure.lock() = None;
                Ok(sender)
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

    fn conn(&self, sender: SendRequest<Body>) -> Conn {
        Conn(sender)
    }

    /// Calls `grpc.health.v1.Health/Check` for `service` on this node.
    pub async fn health_check(&self, service: &str, timeout: Duration) -> Result<(), String> {
        let check = async {
            let sender = self.sender().await.map_err(|e| e.to_string())?;
            let mut client = HealthClient::with_origin(self.conn(sender), self.pool.origin.clone());
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: service.to_owned(),
            });
            request.set_timeout(timeout);
            match client.check(request).await {
                Ok(r) if r.get_ref().status() == ServingStatus::Serving => Ok(()),
                Ok(r) => Err(format!("health is {:?}", r.get_ref().status())),
                Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
            }
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Asks the node for its identity (`Node/Stats` → `node_id`).
    pub async fn node_id(&self, timeout: Duration) -> Result<String, String> {
        let ask = async {
            let sender = self.sender().await.map_err(|e| e.to_string())?;
            let mut client = NodeClient::with_origin(self.conn(sender), self.pool.origin.clone());
            let mut request = tonic::Request::new(StatsRequest {});
            request.set_timeout(timeout);
            client
                .stats(request)
                .await
                .map(|r| r.into_inner().node_id)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn apply(self, call: NodeCall) -> Result<NodeReply, CallError> {
        let sender = self.sender().await?;
        let max = self.pool.settings.max_message_bytes;
        let mut client = InternalClient::with_origin(self.conn(sender), self.pool.origin.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let count = call.ops.len();
        let mut request = tonic::Request::new(ApplyRequest { ops: call.ops });
        if let Some(deadline) = call.deadline {
            // Tell the node too, so it stops work nobody waits for.
            let left = deadline.saturating_duration_since(Instant::now());
            request.set_timeout(left.max(Duration::from_millis(1)));
        }
        if let Some(cx) = &call.trace {
            ringcache_common::rpc_trace::inject_context(cx, &mut request);
        }
        let results = client
            .apply(request)
            .await
            .map_err(classify)?
            .into_inner()
            .results;
        if results.is_empty() && count > 0 || results.len() > count {
            return Err(CallError::Refused(tonic::Status::internal(format!(
                "answered {} results for {count} ops",
                results.len()
            ))));
        }
        Ok(results)
    }
}

/// The open connection of `slot`, if it has one that is not closed.
fn open(slot: &Slot) -> Option<SendRequest<Body>> {
    let mut sender = slot.sender.lock();
    match &*sender {
        Some(s) if !s.is_closed() => Some(s.clone()),
        Some(_) => {
            *sender = None;
            None
        }
        None => None,
    }
}

/// Opens one HTTP/2 connection and spawns the task that drives it.
async fn connect(address: &str) -> Result<SendRequest<Body>, String> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let address = address.to_owned();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%address, %error, "connection to node closed");
        }
    });
    Ok(sender)
}

/// Reads what a failed call's `Status` says about how far the request got.
fn classify(status: tonic::Status) -> CallError {
    use std::error::Error as _;
    let mut source = status.source();
    while let Some(error) = source {
        if let Some(e) = error.downcast_ref::<TransportError>() {
            return match e {
                TransportError::NotSent(why) => CallError::NotSent(why.clone()),
                TransportError::Lost(e) if refused_stream(e) => {
                    CallError::NotSent(format!("the node refused the stream ({e})"))
                }
                TransportError::Lost(e) => CallError::Lost(e.to_string()),
            };
        }
        source = error.source();
    }
    match status.source() {
        // A transport error while reading the answer.
        Some(error) => CallError::Lost(error.to_string()),
        // The status came from the node (or from decoding its answer).
        None if status.code() == Code::Cancelled => {
            CallError::Lost(format!("stream cancelled: {}", status.message()))
        }
        None => CallError::Refused(status),
    }
}

/// Whether an HTTP/2 error says the node did not process the stream
/// (`REFUSED_STREAM`, also what a GOAWAY means for streams it did not take).
fn refused_stream(error: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// One HTTP/2 connection as the `tower::Service` tonic's clients call.
#[derive(Debug, Clone)]
struct Conn(SendRequest<Body>);

impl Service<http::Request<Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = TransportError;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, TransportError>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is checked when sending: a closed connection gives the
        // request back, which is what tells "not sent" apart.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sent = self.0.try_send_request(request);
        Box::pin(async move {
            sent.await.map_err(|mut e| match e.take_message() {
                Some(_) => TransportError::NotSent(format!(
                    "the connection was closed before the request was sent ({})",
                    e.error()
                )),
                None => TransportError::Lost(e.into_error()),
            })
        })
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
