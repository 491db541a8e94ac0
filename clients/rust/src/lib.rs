//! The Rust client of ringcache.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringcache_client::Error> {
//! use ringcache_client::Client;
//!
//! let client = Client::builder("http://127.0.0.1:50051").connect().await?;
//! client.set("greeting", "hello").await?;
//! if let Some(entry) = client.get("greeting").await? {
//!     assert_eq!(entry.value, "hello");
//! }
//! client.delete("greeting").await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How calls travel
//!
//! Single-key calls (`get`, `set`, `delete`, `increment`, `touch`,
//! `exists`, compare-and-swap, compare-and-delete) are **pipelined**: the
//! client keeps a few long-lived `ringcache.v1.Cache/Pipeline` streams
//! ([`Builder::pipelines`], one HTTP/2 connection each) and sends every
//! call as one message on one of them, so concurrent calls share reads and
//! writes instead of paying an HTTP/2 stream, headers and trailers each.
//! Callers never see the streams: a call is a future that resolves to its
//! answer. Batches (`get_many`, `set_many`, `delete_many`) are unary
//! calls, sent again by the same rule as below (a batch that could not be
//! sent because the connection was down provably never ran).
//!
//! # Deadlines and retries
//!
//! Every call has a deadline ([`Builder::timeout`], 1 s by default), sent
//! with the op and enforced here. A call is sent again, with a growing
//! backoff and within its deadline, only when running it twice cannot do
//! harm:
//!
//! - it provably never ran — its stream could not be opened (the
//!   connection is coming back), or ended cleanly without answering it (the
//!   server drains: it answers every op it read, and marks the end so):
//!   sent again until the deadline;
//! - the server shed it before it ran (`RESOURCE_EXHAUSTED`, "retry with
//!   backoff"), or it is a read (`get`, `exists`) whose connection was lost:
//!   sent again up to [`Builder::retries`] times.
//!
//! A write whose connection was lost before its answer is not sent again:
//! it may have run, and running it twice could overwrite a newer write by
//! another client, or turn `deleted = true` into `false`. It fails with
//! `UNAVAILABLE`, and the caller decides.
//!
//! # Direct mode and the near cache
//!
//! With [`Builder::direct`], `get` and `exists` go straight to the key's
//! first owner, placed by the orchestrator's topology
//! (`Cluster/WatchTopology`) with the orchestrator's own placement code;
//! writes and batches still go through the orchestrator. With
//! [`Builder::near_cache_bytes`], `get` answers repeated reads from this
//! process. Both follow every node's change feed, and a read is sent
//! directly (or answered from the near cache) only while that is as safe
//! as a routed read: the owner healthy and owing the key no update, every
//! feed in sync, the node agreeing on the topology's epoch. Otherwise it
//! goes through the orchestrator. [`Client::direct_stats`] and
//! [`Client::near_cache_stats`] say where reads went. The README's
//! "Direct mode and the near cache" states the guarantees.
//!
//! # Tracing
//!
//! Each call is a `tracing` span (`ringcache.client`, with the OpenTelemetry
//! RPC attributes). When the application exports spans with
//! `tracing-opentelemetry`, the span's trace context rides with the op, so
//! the orchestrator's and the nodes' spans join the caller's trace.

mod direct;
mod lane;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use ringcache_proto::v1::{
    DeleteManyRequest, DeleteRequest, ExistsRequest, GetManyRequest, GetRequest, IncrementRequest,
    KeyError, SetManyRequest, SetRequest, TouchRequest, cache_client::CacheClient,
    pipeline_request::Op, pipeline_response::Result as Answer, set_request,
};
use tokio::time::Instant;
use tonic::{
    Code, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::lane::{Lane, Outcome};

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered the call with an error status (a refused
    /// argument, a missing permission, no reachable node, ...).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The call did not finish within its deadline.
    #[error("the call did not finish within its deadline of {0:?}")]
    Timeout(Duration),
    /// The client could not connect to the server.
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        /// The server's URI.
        uri: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The builder was given something unusable.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl Error {
    /// The gRPC code this error amounts to (`DEADLINE_EXCEEDED` for a
    /// timeout, `UNAVAILABLE` for a failed connection, `INVALID_ARGUMENT`
    /// for a bad configuration).
    pub fn code(&self) -> Code {
        match self {
            Error::Status(s) => s.code(),
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Connect { .. } => Code::Unavailable,
            Error::Config(_) => Code::InvalidArgument,
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Status(status)
    }
}

/// A stored value and what the server knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// The key's version: changes on every write, for compare-and-swap.
    pub version: u64,
    /// Time left to live; `None`: no expiry.
    pub ttl: Option<Duration>,
}

impl AsRef<[u8]> for Entry {
    fn as_ref(&self) -> &[u8] {
        &self.value
    }
}

/// What `exists` knows of a live key, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's version.
    pub version: u64,
    /// Time left to live; `None`: no expiry.
    pub ttl: Option<Duration>,
    /// The value's size in bytes.
    pub value_bytes: u64,
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written; the key's new version.
    Stored(u64),
    /// Not written: the condition did not hold. The key's current version
    /// (0: absent).
    Refused(u64),
}

/// Builds a [`Client`]; see [`Client::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    uri: String,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    pipelines: usize,
    retries: u32,
    tls: Option<ClientTlsConfig>,
    /// The same TLS for nodes, without the orchestrator's name override.
    node_tls: Option<ClientTlsConfig>,
    direct: bool,
    direct_pipelines: usize,
    near_cache_bytes: u64,
    near_cache_max_age: Duration,
}

impl Builder {
    /// Direct mode (off by default): reads (`get`, `exists`) go straight
    /// to the key's owner node over its own pipelines, placed by the
    /// orchestrator's topology (`Cluster/WatchTopology`) and kept safe by
    /// the nodes' change feeds; writes and batches still go through the
    /// orchestrator. A read that cannot be sent directly — its owner away,
    /// warming or owing the key an update, a feed not followed, the
    /// topology changing — goes through the orchestrator. The nodes'
    /// addresses in the topology must be reachable from this client, with
    /// the same scheme, TLS and token. See the crate documentation.
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }

    /// In direct mode, how many pipelines (streams) to each node (1 by
    /// default): a node takes only its share of the reads, and the fewer
    /// its streams, the more ops each read and write carries — the node's
    /// CPU per read falls with it (BENCHMARKS.md).
    pub fn direct_pipelines(mut self, n: usize) -> Self {
        self.direct_pipelines = n.max(1);
        self
    }

    /// A near cache of at most `bytes` (keys, values and bookkeeping; 0,
    /// the default, turns it off): `get` answers from this process when it
    /// can, in well under a microsecond. It is kept fresh by the nodes'
    /// change feeds (which this client then follows, as in direct mode): a
    /// write or delete by any client voids the key here within the feed's
    /// latency, this client's own at once. Answers are served only while
    /// every feed is followed and in sync; a lost feed, a gap in it or a
    /// node's restart voids only the keys that node could have changed.
    /// It implies direct mode ([`Builder::direct`]): answers are kept only
    /// when they come from the key's owner (an orchestrator's may lag a
    /// feed this client has already read).
    pub fn near_cache_bytes(mut self, bytes: u64) -> Self {
        self.near_cache_bytes = bytes;
        self
    }

    /// The longest a near-cache answer is kept (30 s by default): the
    /// bound on staleness if everything else failed.
    pub fn near_cache_max_age(mut self, age: Duration) -> Self {
        self.near_cache_max_age = age;
        self
    }

    /// Sends `token` as `authorization: Bearer <token>` (servers started
    /// with `--auth-tokens`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Each call's deadline (1 s by default), retries included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long [`Builder::connect`] waits for each connection (5 s by
    /// default).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How many pipelines (streams, each on its own HTTP/2 connection)
    /// calls are spread over (4 by default, at least 1).
    pub fn pipelines(mut self, n: usize) -> Self {
        self.pipelines = n.max(1);
        self
    }

    /// How many times a call that may run twice is sent again (2 by
    /// default); see the crate documentation.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// TLS with the server certificate checked against `ca_pem` (use an
    /// `https://` URI).
    pub fn tls_ca(mut self, ca_pem: impl AsRef<[u8]>) -> Self {
        let ca = Certificate::from_pem(ca_pem);
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.ca_certificate(ca.clone()));
        let node_tls = self.node_tls.take().unwrap_or_default();
        self.node_tls = Some(node_tls.ca_certificate(ca));
        self
    }

    /// A client certificate and key (mTLS; in direct mode, to the nodes
    /// too).
    pub fn tls_identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let identity = Identity::from_pem(cert_pem, key_pem);
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.identity(identity.clone()));
        let node_tls = self.node_tls.take().unwrap_or_default();
        self.node_tls = Some(node_tls.identity(identity));
        self
    }

    /// The name the server's certificate must carry, when it is not the
    /// URI's host.
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        let tls = self.tls.take().unwrap_or_default();
        self.tls = Some(tls.domain_name(name));
        self
    }

    /// Connects every pipeline's connection, failing if the server cannot
    /// be reached.
    pub async fn connect(self) -> Result<Client, Error> {
        let token = self
            .token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| Error::Config("the token is not printable ASCII".into()))
            })
            .transpose()?;
        let mut endpoint = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| Error::Config(format!("{}: {e}", self.uri)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = self.tls.clone() {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        }
        let mut lanes = Vec::with_capacity(self.pipelines);
        let mut first = None;
        for _ in 0..self.pipelines {
            let channel = endpoint.connect().await.map_err(|source| Error::Connect {
                uri: self.uri.clone(),
                source,
            })?;
            if first.is_none() {
                first = Some(channel.clone());
            }
            lanes.push(Lane::spawn(
                channel,
                token.iter().map(|t| ("authorization", t.clone())).collect(),
            ));
        }
        let unary = first.ok_or_else(|| Error::Config("no pipelines".into()))?;
        let near = (self.near_cache_bytes > 0).then(|| {
            ringcache_nearcache::NearCache::new(self.near_cache_bytes, self.near_cache_max_age)
        });
        let direct = if self.direct || near.is_some() {
            let access = direct::NodeAccess {
                https: self.uri.starts_with("https:"),
                tls: self.node_tls.clone(),
                connect_timeout: self.connect_timeout,
                token: token.clone(),
                pipelines: self.direct_pipelines,
            };
            Some(
                direct::Direct::start(unary.clone(), access, self.connect_timeout, true, near)
                    .await,
            )
        } else {
            None
        };
        Ok(Client {
            inner: Arc::new(Inner {
                lanes,
                next: AtomicUsize::new(0),
                unary,
                token,
                timeout: self.timeout,
                retries: self.retries,
                direct,
            }),
        })
    }
}

/// A ringcache client: cheap to clone (a handle), safe to share between
/// tasks. See the crate documentation.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    lanes: Vec<Lane>,
    next: AtomicUsize,
    /// For the unary calls (batches).
    unary: Channel,
    token: Option<AsciiMetadataValue>,
    timeout: Duration,
    retries: u32,
    /// Direct mode's topology, feeds and node pipelines.
    direct: Option<Arc<direct::Direct>>,
}

/// Where a direct-mode client's reads went (all zero without direct
/// mode); see [`Client::direct_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectStats {
    /// Reads answered by the owner node directly.
    pub direct: u64,
    /// Reads sent through the orchestrator because they could not go
    /// directly (owner away or warming, an open debt, a feed not in sync,
    /// no topology).
    pub routed: u64,
    /// Direct reads that did not answer cleanly and were sent through the
    /// orchestrator.
    pub fallbacks: u64,
    /// Direct reads a node refused because the client's topology epoch
    /// was stale.
    pub stale_epochs: u64,
}

/// The near cache's counts (all zero without one); see
/// [`Client::near_cache_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearCacheStats {
    /// `get`s answered from the near cache.
    pub hits: u64,
    /// `get`s that were not (absent, expired, voided, or the feeds not in
    /// sync).
    pub misses: u64,
    /// Answers held.
    pub entries: u64,
    /// Bytes held (keys, values and bookkeeping).
    pub bytes: u64,
}

/// Whether a call may be sent again when its connection was lost before
/// its answer: reads only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeatable {
    Read,
    Write,
}

impl Client {
    /// A builder for a client of the server at `uri` (an orchestrator, or a
    /// node): `http://host:port`, or `https://` with TLS.
    pub fn builder(uri: impl Into<String>) -> Builder {
        Builder {
            uri: uri.into(),
            token: None,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            pipelines: 4,
            retries: 2,
            tls: None,
            node_tls: None,
            direct: false,
            direct_pipelines: 1,
            near_cache_bytes: 0,
            near_cache_max_age: Duration::from_secs(30),
        }
    }

    /// The near cache's hits, misses and size.
    pub fn near_cache_stats(&self) -> NearCacheStats {
        let Some(direct) = &self.inner.direct else {
            return NearCacheStats::default();
        };
        let Some(near) = &direct.near else {
            return NearCacheStats::default();
        };
        NearCacheStats {
            hits: direct.stats.near_hits.load(Ordering::Relaxed),
            misses: direct.stats.near_misses.load(Ordering::Relaxed),
            entries: near.len() as u64,
            bytes: near.bytes(),
        }
    }

    /// Where reads went, in direct mode.
    pub fn direct_stats(&self) -> DirectStats {
        self.inner
            .direct
            .as_ref()
            .map_or_else(DirectStats::default, |d| {
                let s = &d.stats;
                DirectStats {
                    direct: s.direct.load(Ordering::Relaxed),
                    routed: s.routed.load(Ordering::Relaxed),
                    fallbacks: s.fallbacks.load(Ordering::Relaxed),
                    stale_epochs: s.stale_epochs.load(Ordering::Relaxed),
                }
            })
    }

    /// A read: straight to the key's owner in direct mode when that is
    /// safe now, else (or if that does not answer cleanly) through the
    /// orchestrator.
    /// Answers whether the answer came from the owner directly too.
    async fn read(&self, method: &'static str, key: &str, op: Op) -> Result<(Answer, bool), Error> {
        let deadline = Instant::now() + self.inner.timeout;
        if let Some(direct) = &self.inner.direct {
            match direct.route(key) {
                Some(route) => {
                    // Half of the deadline at most: a hung owner leaves
                    // the orchestrator time to answer.
                    let budget = self.inner.timeout / 2;
                    let lane = &route.lanes
                        [self.inner.next.fetch_add(1, Ordering::Relaxed) % route.lanes.len()];
                    let span = client_span(method);
                    let (traceparent, tracestate) = lane::trace_context(&span);
                    let outcome = tokio::time::timeout(
                        budget,
                        lane.call(op.clone(), budget, traceparent, tracestate),
                    )
                    .await;
                    match outcome {
                        Ok(Outcome::Answer(Answer::Error(e))) => {
                            direct.refused(&e);
                            span.record("rpc.grpc.status_code", i64::from(e.code));
                        }
                        Ok(Outcome::Answer(answer)) => {
                            span.record("rpc.grpc.status_code", 0);
                            direct.stats.direct.fetch_add(1, Ordering::Relaxed);
                            return Ok((answer, true));
                        }
                        Ok(_) | Err(_) => {}
                    }
                    direct.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    direct.stats.routed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let answer = self.call(method, op, Repeatable::Read, deadline).await?;
        Ok((answer, false))
    }

    /// Reads `key`: `None` if it is absent or expired.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, Error> {
        // The near cache first, while the feeds keep it exact.
        let near = self
            .inner
            .direct
            .as_ref()
            .and_then(|d| d.near.as_ref().map(|n| (d, n)));
        let mut ticket = None;
        if let Some((direct, near)) = near {
            if direct.coherent() {
                let now = std::time::Instant::now();
                if let Some(hit) = near.get(key, now) {
                    direct.stats.near_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(hit.found.then(|| Entry {
                        value: hit.value,
                        version: hit.version,
                        ttl: hit.expires.map(|e| e.saturating_duration_since(now)),
                    }));
                }
                // Taken before the read: a change seen meanwhile voids it.
                ticket = Some(near.ticket(key));
            }
            direct.stats.near_misses.fetch_add(1, Ordering::Relaxed);
        }
        let op = Op::Get(GetRequest { key: key.into() });
        match self.read("Get", key, op).await? {
            (Answer::Get(g), from_owner) => {
                if let (Some((direct, near)), Some(ticket), true) = (near, ticket, from_owner)
                    && direct.coherent()
                {
                    let now = std::time::Instant::now();
                    let answer = ringcache_nearcache::Answer {
                        found: g.found,
                        value: g.value.clone(),
                        version: g.version,
                        expires: g.ttl.and_then(duration).map(|t| now + t),
                    };
                    near.fill(key, ticket, answer, now);
                }
                Ok(g.found.then(|| Entry {
                    value: g.value,
                    version: g.version,
                    ttl: g.ttl.and_then(duration),
                }))
            }
            (other, _) => Err(unexpected("Get", &other)),
        }
    }

    /// Writes `value` under `key` with no expiry; answers the new version.
    pub async fn set(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, Error> {
        self.set_with_ttl(key, value, None).await
    }

    /// Writes `value` under `key`, living `ttl` (`None`: no expiry).
    pub async fn set_with_ttl(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<u64, Error> {
        match self.set_with(key, value, ttl, None).await? {
            Written::Stored(version) => Ok(version),
            Written::Refused(_) => Err(Error::Status(Status::internal(
                "an unconditional Set was not stored (a bug in the server)",
            ))),
        }
    }

    /// Writes `value` under `key` only if the key's version is still
    /// `version` (compare-and-swap; 0 is never a key's version, use
    /// [`Client::add`] for "only if absent").
    pub async fn compare_and_swap(
        &self,
        key: &str,
        version: u64,
        value: impl Into<Bytes>,
    ) -> Result<Written, Error> {
        self.set_with(
            key,
            value,
            None,
            Some(set_request::Condition::IfVersion(version)),
        )
        .await
    }

    /// Writes `value` under `key` only if the key is absent (memcached
    /// `add`, Redis `SET NX`).
    pub async fn add(&self, key: &str, value: impl Into<Bytes>) -> Result<Written, Error> {
        self.set_with(
            key,
            value,
            None,
            Some(set_request::Condition::IfAbsent(true)),
        )
        .await
    }

    async fn set_with(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
        condition: Option<set_request::Condition>,
    ) -> Result<Written, Error> {
        let op = Op::Set(SetRequest {
            key: key.into(),
            value: value.into(),
            ttl: ttl.map(proto_duration).transpose()?,
            condition,
        });
        match self.write("Set", key, op).await? {
            Answer::Set(s) if s.stored => Ok(Written::Stored(s.version)),
            Answer::Set(s) => Ok(Written::Refused(s.version)),
            other => Err(unexpected("Set", &other)),
        }
    }

    /// Deletes `key`; true if a live value was removed.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        let op = Op::Delete(DeleteRequest {
            key: key.into(),
            if_version: 0,
        });
        match self.write("Delete", key, op).await? {
            Answer::Delete(d) => Ok(d.deleted),
            other => Err(unexpected("Delete", &other)),
        }
    }

    /// Deletes `key` only if its version is still `version`
    /// (compare-and-delete). `Refused` carries the current version.
    pub async fn compare_and_delete(&self, key: &str, version: u64) -> Result<Written, Error> {
        if version == 0 {
            return Err(Error::Config(
                "compare_and_delete needs the version read (0 is no version)".into(),
            ));
        }
        let op = Op::Delete(DeleteRequest {
            key: key.into(),
            if_version: version,
        });
        match self.write("Delete", key, op).await? {
            Answer::Delete(d) if d.deleted => Ok(Written::Stored(version)),
            Answer::Delete(d) => Ok(Written::Refused(d.version)),
            other => Err(unexpected("Delete", &other)),
        }
    }

    /// Adds `delta` to the counter under `key` (created as 0 if absent);
    /// answers the new value.
    pub async fn increment(&self, key: &str, delta: i64) -> Result<i64, Error> {
        let op = Op::Increment(IncrementRequest {
            key: key.into(),
            delta,
            ..Default::default()
        });
        match self.write("Increment", key, op).await? {
            Answer::Increment(i) => Ok(i.value),
            other => Err(unexpected("Increment", &other)),
        }
    }

    /// Sets `key`'s time to live (`None`: never expire) without sending its
    /// value; true if the key exists.
    pub async fn touch(&self, key: &str, ttl: Option<Duration>) -> Result<bool, Error> {
        let op = Op::Touch(TouchRequest {
            key: key.into(),
            ttl: ttl.map(proto_duration).transpose()?,
            return_value: false,
        });
        match self.write("Touch", key, op).await? {
            Answer::Touch(t) => Ok(t.found),
            other => Err(unexpected("Touch", &other)),
        }
    }

    /// Sets `key`'s time to live (`None`: never expire) and reads it
    /// (memcached `gat`): `None` if the key is absent.
    pub async fn touch_and_get(
        &self,
        key: &str,
        ttl: Option<Duration>,
    ) -> Result<Option<Entry>, Error> {
        let op = Op::Touch(TouchRequest {
            key: key.into(),
            ttl: ttl.map(proto_duration).transpose()?,
            return_value: true,
        });
        match self.write("Touch", key, op).await? {
            Answer::Touch(t) if t.found => Ok(Some(Entry {
                value: t.value,
                version: t.version,
                ttl: t.ttl.and_then(duration),
            })),
            Answer::Touch(_) => Ok(None),
            other => Err(unexpected("Touch", &other)),
        }
    }

    /// Whether `key` holds a live value, with its version, TTL and size.
    pub async fn exists(&self, key: &str) -> Result<Option<KeyInfo>, Error> {
        let op = Op::Exists(ExistsRequest {
            keys: vec![key.into()],
        });
        match self.read("Exists", key, op).await?.0 {
            Answer::Exists(e) => {
                Ok(e.results
                    .into_iter()
                    .next()
                    .filter(|k| k.found)
                    .map(|k| KeyInfo {
                        version: k.version,
                        ttl: k.ttl.and_then(duration),
                        value_bytes: k.value_bytes,
                    }))
            }
            other => Err(unexpected("Exists", &other)),
        }
    }

    /// Reads several keys in one call; the answers are in the order of
    /// `keys`. A key that failed alone (its nodes unreachable) fails the
    /// call.
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Entry>>, Error> {
        let request = GetManyRequest {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        };
        let response = self
            .unary(Repeatable::Read, request, |mut c, r| async move {
                c.get_many(r).await
            })
            .await?;
        response
            .results
            .into_iter()
            .map(|r| match r.error {
                Some(e) => Err(key_error(e)),
                None => Ok(r.found.then(|| Entry {
                    value: r.value,
                    version: r.version,
                    ttl: r.ttl.and_then(duration),
                })),
            })
            .collect()
    }

    /// Writes several entries in one call (no expiry); answers each one's
    /// new version, in order. Entries are applied independently.
    pub async fn set_many(&self, entries: &[(&str, Bytes)]) -> Result<Vec<u64>, Error> {
        let request = SetManyRequest {
            entries: entries
                .iter()
                .map(|(k, v)| SetRequest {
                    key: (*k).to_owned(),
                    value: v.clone(),
                    ..Default::default()
                })
                .collect(),
        };
        let response = self
            .unary(Repeatable::Write, request, |mut c, r| async move {
                c.set_many(r).await
            })
            .await;
        self.void_near(entries.iter().map(|(k, _)| *k));
        let response = response?;
        if let Some(direct) = &self.inner.direct {
            for ((key, _), r) in entries.iter().zip(&response.results) {
                direct.missed(key, &r.missed);
            }
        }
        response
            .results
            .into_iter()
            .map(|r| match r.error {
                Some(e) => Err(key_error(e)),
                None => Ok(r.version),
            })
            .collect()
    }

    /// Deletes several keys in one call; for each key in order, whether a
    /// live value was removed, or why that key failed alone (its nodes
    /// unreachable: the others are deleted all the same).
    pub async fn delete_many(&self, keys: &[&str]) -> Result<Vec<Result<bool, Error>>, Error> {
        let request = DeleteManyRequest {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        };
        let response = self
            .unary(Repeatable::Write, request, |mut c, r| async move {
                c.delete_many(r).await
            })
            .await;
        self.void_near(keys.iter().copied());
        let response = response?;
        if let Some(direct) = &self.inner.direct {
            for (key, r) in keys.iter().zip(&response.results) {
                direct.missed(key, &r.missed);
            }
        }
        Ok(response
            .results
            .into_iter()
            .map(|r| match r.error {
                Some(e) => Err(key_error(e)),
                None => Ok(r.deleted),
            })
            .collect())
    }

    /// Voids the near cache's answers of `keys` (this client wrote them).
    fn void_near<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        if let Some(near) = self.inner.direct.as_ref().and_then(|d| d.near.as_ref()) {
            for key in keys {
                near.invalidate(key);
            }
        }
    }

    /// A unary call (the batches), with the pipelined calls' retry rule:
    /// sent again, within the deadline, when it provably was not sent (the
    /// connection could not be made), when the server shed it, or when it
    /// is a read that failed `UNAVAILABLE`.
    async fn unary<T, R, F, Fut>(
        &self,
        repeatable: Repeatable,
        message: T,
        call: F,
    ) -> Result<R, Error>
    where
        T: Clone,
        F: Fn(CacheClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let inner = &*self.inner;
        let deadline = Instant::now() + inner.timeout;
        let mut attempt: u32 = 0;
        loop {
            let mut channel = inner.unary.clone();
            // Not sent until the connection is ready: a failure here ran
            // nothing.
            let ready = tokio::time::timeout_at(
                deadline,
                std::future::poll_fn(|cx| {
                    tonic::codegen::Service::<http::Request<tonic::body::Body>>::poll_ready(
                        &mut channel,
                        cx,
                    )
                }),
            )
            .await;
            let (result, sent) = match ready {
                Err(_) => return Err(Error::Timeout(inner.timeout)),
                Ok(Err(e)) => (
                    Err(Status::unavailable(format!("cannot connect: {e}"))),
                    false,
                ),
                Ok(Ok(())) => {
                    let call = call(
                        CacheClient::new(channel),
                        self.unary_request(message.clone()),
                    );
                    match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => return Err(Error::Timeout(inner.timeout)),
                        Ok(r) => (r, true),
                    }
                }
            };
            let status = match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            // The channel connects lazily, inside the call: a call that
            // failed to connect was not sent either.
            let sent = sent && !connect_failed(&status);
            let shed = is_shed(&status);
            let retry = !sent
                || (attempt < inner.retries
                    && (shed
                        || (repeatable == Repeatable::Read && status.code() == Code::Unavailable)));
            attempt += 1;
            let backoff = Duration::from_millis(5 << attempt.min(6));
            if !retry || Instant::now() + backoff >= deadline {
                return Err(Error::Status(status));
            }
            tokio::time::sleep(backoff).await;
        }
    }

    fn unary_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.inner.timeout);
        if let Some(t) = &self.inner.token {
            request.metadata_mut().insert("authorization", t.clone());
        }
        let span = tracing::Span::current();
        let (traceparent, tracestate) = lane::trace_context(&span);
        if let Ok(v) = MetadataValue::try_from(traceparent.as_str())
            && !traceparent.is_empty()
        {
            request.metadata_mut().insert("traceparent", v);
        }
        if let Ok(v) = MetadataValue::try_from(tracestate.as_str())
            && !tracestate.is_empty()
        {
            request.metadata_mut().insert("tracestate", v);
        }
        request
    }

    /// A write, through the orchestrator. In direct mode, owners its answer
    /// says it missed are kept off for the key until they are up to date.
    async fn write(&self, method: &'static str, key: &str, op: Op) -> Result<Answer, Error> {
        let deadline = Instant::now() + self.inner.timeout;
        let result = self.call(method, op, Repeatable::Write, deadline).await;
        // Whatever the answer, the write may have run: this process's
        // cached answer of the key (and any fill racing it) is void.
        if let Some(near) = self.inner.direct.as_ref().and_then(|d| d.near.as_ref()) {
            near.invalidate(key);
        }
        let answer = result?;
        if let Some(direct) = &self.inner.direct {
            let missed = match &answer {
                Answer::Set(a) => &a.missed,
                Answer::Delete(a) => &a.missed,
                Answer::Increment(a) => &a.missed,
                Answer::Touch(a) => &a.missed,
                _ => return Ok(answer),
            };
            direct.missed(key, missed);
        }
        Ok(answer)
    }

    /// Runs `op` on a pipeline to the orchestrator, sending it again where
    /// that is safe (see the crate documentation), until `deadline`.
    async fn call(
        &self,
        method: &'static str,
        op: Op,
        repeatable: Repeatable,
        deadline: Instant,
    ) -> Result<Answer, Error> {
        let inner = &*self.inner;
        let span = client_span(method);
        let (traceparent, tracestate) = lane::trace_context(&span);
        let mut attempt = 0;
        let result = loop {
            let lane = &inner.lanes[inner.next.fetch_add(1, Ordering::Relaxed) % inner.lanes.len()];
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = tokio::time::timeout_at(
                deadline,
                lane.call(op.clone(), left, traceparent.clone(), tracestate.clone()),
            )
            .await;
            let outcome = match outcome {
                Err(_) => break Err(Error::Timeout(inner.timeout)),
                Ok(o) => o,
            };
            let retry = match &outcome {
                Outcome::Answer(Answer::Error(e)) => {
                    // Shed before it ran (not "too large": asking again
                    // gets the same answer).
                    e.code == Code::ResourceExhausted as i32
                        && is_shed(&tonic::Status::with_details(
                            Code::ResourceExhausted,
                            e.message.clone(),
                            prost::Message::encode_to_vec(e).into(),
                        ))
                        && attempt < inner.retries
                }
                Outcome::Answer(_) => false,
                // Never ran (the stream could not be opened, or ended
                // cleanly first): sent again until the deadline, while the
                // connection comes back.
                Outcome::NotRun(_) => true,
                Outcome::Lost(_) => repeatable == Repeatable::Read && attempt < inner.retries,
                Outcome::Refused(_) => false,
            };
            if retry {
                attempt += 1;
                let backoff = Duration::from_millis(5 << attempt.min(6));
                if Instant::now() + backoff < deadline {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            break match outcome {
                Outcome::Answer(Answer::Error(e)) => Err(Error::Status(Status::new(
                    Code::from_i32(e.code),
                    e.message,
                ))),
                Outcome::Answer(answer) => Ok(answer),
                Outcome::NotRun(status) | Outcome::Lost(status) | Outcome::Refused(status) => {
                    Err(Error::Status(status))
                }
            };
        };
        span.record(
            "rpc.grpc.status_code",
            result.as_ref().map_or_else(|e| e.code() as i64, |_| 0),
        );
        result
    }
}

/// The span of one call (`ringcache.client`, with the OpenTelemetry RPC
/// attributes).
fn client_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "ringcache.client",
        otel.name = format!("ringcache.v1.Cache/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "ringcache.v1.Cache",
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// Whether a call failed before the server processed it: its connection
/// could not be made (a refused or timed-out TCP connect anywhere in the
/// status's chain of causes), the server refused its HTTP/2 stream, or the
/// connection closed while the call was still queued for it.
fn connect_failed(status: &Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        let text = e.to_string();
        // A connect that failed, or an HTTP/2 stream the server refused
        // before processing it (REFUSED_STREAM, after its GOAWAY).
        if text.contains("tcp connect error")
            || text.contains("error trying to connect")
            || text.contains("refused stream")
        {
            return true;
        }
        cause = e.source();
    }
    let message = status.message();
    // hyper cancels a request still queued for a connection that closed
    // (an orchestrator draining, say) before the connection took it
    // ("operation was canceled": never sent), and tonic answers CANCELLED.
    // This client never cancels a call it still waits for.
    let queued_on_a_closed_connection =
        status.code() == Code::Cancelled && message.contains("operation was canceled");
    message.contains("tcp connect error")
        || message.contains("refused stream")
        || queued_on_a_closed_connection
}

/// The error of one key of a batch.
fn key_error(e: KeyError) -> Error {
    Error::Status(Status::new(Code::from_i32(e.code), e.message))
}

fn unexpected(method: &str, answer: &Answer) -> Error {
    Error::Status(Status::internal(format!(
        "the server answered a {method} with another kind of answer: {answer:?}"
    )))
}

/// A protobuf duration as a `Duration`; `None` if negative.
fn duration(d: prost_types::Duration) -> Option<Duration> {
    Duration::try_from(d).ok()
}

fn proto_duration(d: Duration) -> Result<prost_types::Duration, Error> {
    prost_types::Duration::try_from(d).map_err(|_| Error::Config(format!("TTL {d:?} is too long")))
}

/// Whether `status` is a call the servers shed before it ran (nothing
/// ran: send it again after a backoff) rather than a refusal that asking
/// again does not change, such as an answer too large. The servers name
/// which in a `google.rpc.ErrorInfo`; older ones said "retry with backoff"
/// in the message.
fn is_shed(status: &tonic::Status) -> bool {
    use ringcache_proto::{direct::ERROR_DOMAIN, exhausted::OVERLOADED};
    use tonic_types::StatusExt;
    status.code() == Code::ResourceExhausted
        && match status
            .get_details_error_info()
            .filter(|i| i.domain == ERROR_DOMAIN)
        {
            Some(info) => info.reason == OVERLOADED,
            None => status.message().contains("retry with backoff"),
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call on a channel whose server is gone fails before it is sent,
    /// and is recognised as such (so even a write may be sent again).
    #[tokio::test]
    async fn a_refused_connection_is_recognised_as_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .connect_lazy();
        let status = CacheClient::new(channel)
            .delete_many(DeleteManyRequest {
                keys: vec!["k".into()],
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("nothing listens on port {port}"));
        assert!(connect_failed(&status), "{status:?}");
        assert!(!connect_failed(&Status::unavailable("connection reset")));
        // What tonic answers for a request hyper dropped from the queue of
        // a connection that closed.
        assert!(connect_failed(&Status::cancelled("operation was canceled")));
        assert!(!connect_failed(&Status::cancelled("the caller gave up")));
    }

    #[test]
    fn only_shed_calls_are_sent_again_whatever_the_message_says() {
        use tonic_types::{ErrorDetails, StatusExt};
        let with = |reason: &str, message: &str| {
            tonic::Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_error_info(
                    reason,
                    ringcache_proto::direct::ERROR_DOMAIN,
                    std::collections::HashMap::<String, String>::new(),
                ),
            )
        };
        assert!(is_shed(&with("OVERLOADED", "queue full")));
        assert!(!is_shed(&with(
            "TOO_LARGE",
            "ask for fewer keys (or retry with backoff)"
        )));
        // Servers before the ErrorInfo: the message.
        assert!(is_shed(&tonic::Status::resource_exhausted(
            "at the limit; retry with backoff"
        )));
        assert!(!is_shed(&tonic::Status::resource_exhausted(
            "grpc: received message larger than max"
        )));
    }
}
