//! Spans for RPCs, per the OpenTelemetry semantic conventions for RPC
//! (version [`crate::telemetry::SEMCONV_VERSION`]): a SERVER span for every
//! call a binary serves ([`ServerTraceLayer`]), CLIENT spans for the calls
//! the orchestrator makes ([`client_span`]), and W3C `traceparent` /
//! `tracestate` carried in gRPC metadata between them.
//!
//! Span fields named `otel.*` are how `tracing-opentelemetry` sets the span's
//! name, kind and status; the others become attributes. Fields that are
//! known only later (the status code; a node's hit or miss) are declared
//! empty and recorded when known — `tracing` needs every field declared when
//! the span is created.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use opentelemetry::{
    Context as OtelContext, global,
    propagation::{Extractor, Injector},
    trace::{SpanContext, TraceContextExt, TraceFlags, TraceState},
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use pin_project_lite::pin_project;
use ringcache_proto::service_names::INTERNAL;
use tower::{Layer, Service};
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads W3C trace context from HTTP/2 headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes W3C trace context into gRPC request metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Puts `span`'s trace context into `request`'s metadata, so the server it
/// goes to continues the trace.
pub fn inject<T>(span: &Span, request: &mut tonic::Request<T>) {
    let cx = span.context();
    global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()))
    });
}

/// Writes W3C trace context into HTTP headers.
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Puts `cx`'s trace context into `headers`.
pub fn inject_headers(cx: &OtelContext, headers: &mut http::HeaderMap) {
    global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
}

/// Puts `cx`'s trace context into `request`'s metadata.
pub fn inject_context<T>(cx: &OtelContext, request: &mut tonic::Request<T>) {
    global::get_text_map_propagator(|p| {
        p.inject_context(cx, &mut MetadataInjector(request.metadata_mut()))
    });
}

/// Puts the current OpenTelemetry context (set for requests that are not
/// sampled, see [`ServerTraceLayer`]) into `request`'s metadata, so the
/// server it goes to follows the same decision without recording anything.
pub fn inject_current<T>(request: &mut tonic::Request<T>) {
    let cx = OtelContext::current();
    if cx.span().span_context().is_valid() {
        global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()))
        });
    }
}

/// Whether a trace id falls in the sampled `ratio`: the same rule as the
/// SDK's `TraceIdRatioBased`, so every service decides a trace alike.
fn in_ratio(trace_id: opentelemetry::trace::TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..16]);
    let x = u64::from_be_bytes(low) >> 1;
    x < (ratio * (1u64 << 63) as f64) as u64
}

/// Decides, before any span exists, whether this request is recorded.
/// `Err` carries the context to propagate when it is not: the caller's own
/// (not sampled), or a new unsampled one so downstream services agree.
fn decide(parent: OtelContext) -> Result<OtelContext, OtelContext> {
    let sc = parent.span().span_context().clone();
    let sampled = match crate::telemetry::sampling() {
        crate::telemetry::Sampling::AlwaysOn => true,
        crate::telemetry::Sampling::AlwaysOff => false,
        crate::telemetry::Sampling::Ratio(r) if sc.is_valid() => in_ratio(sc.trace_id(), r),
        crate::telemetry::Sampling::ParentBased(_) if sc.is_valid() => sc.is_sampled(),
        crate::telemetry::Sampling::Ratio(r) | crate::telemetry::Sampling::ParentBased(r) => {
            let ids = RandomIdGenerator::default();
            let trace_id = ids.new_trace_id();
            if in_ratio(trace_id, r) {
                return Ok(parent);
            }
            let unsampled = SpanContext::new(
                trace_id,
                ids.new_span_id(),
                TraceFlags::default(),
                false,
                TraceState::default(),
            );
            return Err(parent.with_remote_span_context(unsampled));
        }
    };
    if sampled { Ok(parent) } else { Err(parent) }
}

/// Whether a status code marks a SERVER span as an error: per the
/// conventions, only codes that mean the server failed, not the caller.
fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// Records the outcome on an RPC span: the status code, and ERROR status
/// when `is_error`.
fn record_status(span: &Span, code: tonic::Code, message: Option<&str>, is_error: bool) {
    span.record("rpc.grpc.status_code", code as i64);
    if is_error {
        span.record("otel.status_code", "ERROR");
        if let Some(m) = message {
            span.record("otel.status_message", m);
        }
    }
}

/// A CLIENT span for a call from this process to `service/method` on
/// `address` (`host:port`), node `node`.
pub fn client_span(service: &str, method: &str, address: &str, node: &str) -> Span {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, ""));
    tracing::info_span!(
        "grpc.client",
        otel.name = format!("{service}/{method}"),
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_message = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        server.address = host,
        server.port = port.parse::<i64>().unwrap_or(0),
        ringcache.node = node,
        ringcache.keys = Empty,
    )
}

/// Records a client call's outcome: any status but OK is an error on a
/// CLIENT span.
pub fn record_client_status(span: &Span, status: Option<&tonic::Status>) {
    match status {
        None => record_status(span, tonic::Code::Ok, None, false),
        Some(s) => record_status(span, s.code(), Some(s.message()), true),
    }
}

/// A SERVER span for a call to `path` (`/service/method`) whose caller's
/// context is `parent`.
fn new_server_span(path: &str, service: &str, method: &str, parent: OtelContext) -> Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = &path[1..],
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_message = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
        ringcache.hit = Empty,
        ringcache.shard = Empty,
        ringcache.value_bytes = Empty,
        ringcache.keys = Empty,
        ringcache.hits = Empty,
    );
    // Fails only if the span is disabled (not sampled by the subscriber),
    // in which case there is nothing to parent.
    let _ = span.set_parent(parent);
    span
}

/// Reads W3C trace context from one op's own fields.
struct OpExtractor<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for OpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent).filter(|v| !v.is_empty()),
            "tracestate" => Some(self.tracestate).filter(|v| !v.is_empty()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The SERVER span of one op of a stream (`Pipeline`), as
/// [`ServerTraceLayer`] makes one for a unary call to `path`
/// (`/service/method`): continuing the op's own `traceparent` and
/// `tracestate`, sampled by the same rule. Returns the span (`Span::none()`
/// when not recorded) and, when not recorded, the context to make current
/// while the op runs, so the calls it makes pass the decision on.
pub fn op_span(path: &str, traceparent: &str, tracestate: &str) -> (Span, Option<OtelContext>) {
    let parent = global::get_text_map_propagator(|p| {
        p.extract(&OpExtractor {
            traceparent,
            tracestate,
        })
    });
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return (Span::none(), None);
    };
    match decide(parent) {
        Ok(parent) => (new_server_span(path, service, method, parent), None),
        Err(propagate) => (Span::none(), Some(propagate)),
    }
}

/// Records the outcome of a call served on `span`: `None` for OK.
pub fn record_server_status(span: &Span, status: Option<&tonic::Status>) {
    if span.is_none() {
        return;
    }
    match status {
        None => record_status(span, tonic::Code::Ok, None, false),
        Some(s) => record_status(span, s.code(), Some(s.message()), server_error(s.code())),
    }
}

/// A layer that opens a SERVER span around every call to one of the given
/// services, continuing the caller's trace from the request headers. Calls
/// to other services (health checks, reflection) are not traced: a load
/// balancer's probes would otherwise flood the trace store.
#[derive(Debug, Clone)]
pub struct ServerTraceLayer {
    services: Vec<&'static str>,
}

impl ServerTraceLayer {
    /// Traces calls to `services`.
    pub fn new(services: Vec<&'static str>) -> Self {
        Self { services }
    }
}

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace {
            inner,
            services: self.services.clone(),
        }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
    services: Vec<&'static str>,
}

impl<S, B, RB> Service<http::Request<B>> for ServerTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ServerTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        // A pipeline is not one call but many: each op gets its own SERVER
        // span, in its own trace (`crate::pipeline`).
        let traced = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(service, _)| self.services.contains(service))
            .filter(|_| path != crate::auth::PIPELINE_PATH);
        let parent = match traced {
            Some((service, _)) => {
                let parent =
                    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
                if service == INTERNAL && !parent.span().span_context().is_sampled() {
                    // Orchestrators' calls are traced only as part of a
                    // sampled client request: a batch of unsampled requests
                    // must not start traces of its own.
                    Err(OtelContext::new())
                } else {
                    decide(parent)
                }
            }
            None => Err(OtelContext::new()),
        };
        let (span, propagate) = match (traced, parent) {
            (Some((service, method)), Ok(parent)) => {
                (new_server_span(path, service, method, parent), None)
            }
            // Not recorded: no span at all, only the context to pass on.
            (_, Err(propagate)) => (Span::none(), Some(propagate)),
            (None, Ok(_)) => (Span::none(), None),
        };
        let client_timeout = crate::deadline::client_timeout(req.headers());
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ServerTraceFuture {
            inner,
            span,
            propagate,
            start: tokio::time::Instant::now(),
            client_timeout,
            done: false,
        }
    }
}

pin_project! {
    /// The response future of [`ServerTrace`]: polls the call inside its
    /// span and records the status.
    #[derive(Debug)]
    pub struct ServerTraceFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        // For a request that is not recorded: the context made current while
        // it runs, so calls it makes pass the decision on. (A recorded
        // request's context comes from its span instead: attaching another
        // here would hide it.)
        propagate: Option<OtelContext>,
        start: tokio::time::Instant,
        client_timeout: Option<std::time::Duration>,
        done: bool,
    }

    impl<F> PinnedDrop for ServerTraceFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done && !this.span.is_none() {
                // Cut short: by the client's deadline (tonic enforces it
                // outside every layer) or by the client going away.
                let code = crate::deadline::unfinished_code(this.client_timeout.map(|t| *this.start + t));
                record_status(this.span, code, Some("the call did not finish"), server_error(code));
            }
        }
    }
}

impl<F, RB, E> Future for ServerTraceFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let _attached = this.propagate.as_ref().map(|c| c.clone().attach());
        let result = std::task::ready!(this.inner.poll(cx));
        *this.done = true;
        if !this.span.is_none() {
            match &result {
                Ok(response) => match tonic::Status::from_header_map(response.headers()) {
                    Some(status) => {
                        let code = status.code();
                        record_status(this.span, code, Some(status.message()), server_error(code));
                    }
                    None => record_status(this.span, tonic::Code::Ok, None, false),
                },
                Err(_) => record_status(this.span, tonic::Code::Unknown, None, true),
            }
        }
        Poll::Ready(result)
    }
}
