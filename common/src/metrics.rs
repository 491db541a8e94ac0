//! Prometheus metrics: the `/metrics` endpoint and per-RPC instrumentation.
//!
//! RPC metrics follow the names of go-grpc-prometheus, so existing gRPC
//! dashboards work unchanged:
//!
//! - `grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`
//! - `grpc_server_handling_seconds{grpc_service, grpc_method, grpc_code}`
//!
//! `grpc_code` is the status name (`OK`, `InvalidArgument`, …). Only the
//! services the layer is told about get their own labels; calls to any
//! other path are counted as `grpc_service="unknown"` so that a client
//! cannot grow the label space without bound.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use pin_project_lite::pin_project;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use tokio::{net::TcpListener, time::Instant};
use tower::{Layer, Service};

/// Latency buckets, in seconds: 50 µs to 5 s. Cache calls are fast, so the
/// low end is finer than Prometheus' defaults.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Per-RPC counters and latency histograms, registered in a [`Registry`].
#[derive(Debug)]
pub struct GrpcMetrics {
    handled: IntCounterVec,
    handling: HistogramVec,
    known_services: Vec<&'static str>,
}

impl GrpcMetrics {
    /// Creates the RPC metrics and registers them in `registry`. Calls to
    /// services not in `known_services` are labelled `unknown`.
    pub fn new(
        registry: &Registry,
        known_services: &[&'static str],
    ) -> Result<Arc<Self>, prometheus::Error> {
        let labels = &["grpc_service", "grpc_method", "grpc_code"];
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "RPCs completed on the server, by service, method and status code.",
            ),
            labels,
        )?;
        let handling = HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Time from receiving an RPC to sending its response headers, by service, method and status code.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(handling.clone()))?;
        Ok(Arc::new(Self {
            handled,
            handling,
            known_services: known_services.to_vec(),
        }))
    }

    /// Splits a gRPC path (`/pkg.Service/Method`) into bounded labels.
    fn classify<'a>(&self, path: &'a str) -> (&'a str, &'a str) {
        let unknown = ("unknown", "unknown");
        let Some(rest) = path.strip_prefix('/') else {
            return unknown;
        };
        let Some((service, method)) = rest.split_once('/') else {
            return unknown;
        };
        if self.known_services.contains(&service) && !method.is_empty() && method.len() <= 64 {
            (service, method)
        } else {
            unknown
        }
    }

    fn record(&self, service: &str, method: &str, code: tonic::Code, seconds: f64) {
        let code = code_name(code);
        let labels = [service, method, code];
        self.handled.with_label_values(&labels).inc();
        self.handling.with_label_values(&labels).observe(seconds);
    }
}

/// The status name used in the `grpc_code` label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// A tower layer that records [`GrpcMetrics`] for every call.
///
/// The status is read from the response headers: tonic answers an error
/// as a trailers-only response whose headers carry `grpc-status`, and a
/// unary success has no `grpc-status` header (it comes as `OK` in the
/// trailers). The latency is the time until the response headers, which
/// for unary calls is when the handler has finished.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<GrpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service made by [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GrpcMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // A reference-counted handle on the request's path, not two label
        // strings: nothing is allocated per call.
        let path = req.uri().path_and_query().cloned();
        let client_timeout = crate::deadline::client_timeout(req.headers());
        GrpcMetricsFuture {
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
            path,
            start: Instant::now(),
            client_timeout,
            done: false,
        }
    }
}

pin_project! {
    /// The response future of [`GrpcMetricsService`]. Records the call
    /// when it completes, or when it is dropped unfinished.
    #[derive(Debug)]
    pub struct GrpcMetricsFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<GrpcMetrics>,
        path: Option<http::uri::PathAndQuery>,
        start: Instant,
        client_timeout: Option<std::time::Duration>,
        done: bool,
    }

    impl<F> PinnedDrop for GrpcMetricsFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done {
                let code = crate::deadline::unfinished_code(this.client_timeout.map(|t| *this.start + t));
                let (service, method) = this
                    .metrics
                    .classify(this.path.as_ref().map_or("", http::uri::PathAndQuery::path));
                this.metrics
                    .record(service, method, code, this.start.elapsed().as_secs_f64());
            }
        }
    }
}

impl<F, RB, E> Future for GrpcMetricsFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        *this.done = true;
        let code = match &result {
            Ok(response) => response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32),
            Err(_) => tonic::Code::Unknown,
        };
        let (service, method) = this
            .metrics
            .classify(this.path.as_ref().map_or("", http::uri::PathAndQuery::path));
        this.metrics
            .record(service, method, code, this.start.elapsed().as_secs_f64());
        Poll::Ready(result)
    }
}

/// Serves the Prometheus text format of `registry` at `GET /metrics` on
/// `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(registry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render(State(registry): State<Registry>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 * 1024);
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            http::StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(error) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("cannot encode metrics: {error}").into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tower::ServiceExt;

    fn response(status: Option<tonic::Code>) -> http::Response<()> {
        let mut response = http::Response::new(());
        if let Some(code) = status {
            response
                .headers_mut()
                .insert("grpc-status", (code as i32).to_string().parse().unwrap());
        }
        response
    }

    #[tokio::test]
    async fn counts_by_service_method_and_code() {
        let registry = Registry::new();
        let metrics = GrpcMetrics::new(&registry, &["ringcache.v1.Cache"]).unwrap();
        let svc = tower::service_fn(|req: http::Request<()>| async move {
            let code = if req.uri().path().ends_with("/Set") {
                Some(tonic::Code::InvalidArgument)
            } else {
                None
            };
            Ok::<_, std::convert::Infallible>(response(code))
        });
        let svc = GrpcMetricsLayer::new(metrics.clone()).layer(svc);
        for path in [
            "/ringcache.v1.Cache/Get",
            "/ringcache.v1.Cache/Get",
            "/ringcache.v1.Cache/Set",
            "/evil.Service/Method",
        ] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
        let get = metrics
            .handled
            .with_label_values(&["ringcache.v1.Cache", "Get", "OK"])
            .get();
        let set = metrics
            .handled
            .with_label_values(&["ringcache.v1.Cache", "Set", "InvalidArgument"])
            .get();
        let unknown = metrics
            .handled
            .with_label_values(&["unknown", "unknown", "OK"])
            .get();
        assert_eq!((get, set, unknown), (2, 1, 1));
        let hist = metrics
            .handling
            .with_label_values(&["ringcache.v1.Cache", "Get", "OK"]);
        assert_eq!(hist.get_sample_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_dropped_unfinished_are_counted() {
        let registry = Registry::new();
        let metrics = GrpcMetrics::new(&registry, &["ringcache.v1.Cache"]).unwrap();
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>()
        });
        let svc = GrpcMetricsLayer::new(metrics.clone()).layer(never);
        let req = |timeout: Option<&str>| {
            let mut b = http::Request::builder().uri("/ringcache.v1.Cache/Get");
            if let Some(t) = timeout {
                b = b.header("grpc-timeout", t);
            }
            b.body(()).unwrap()
        };
        // The client resets the stream: cancelled.
        drop(svc.clone().call(req(None)));
        // Cut short at the client's deadline (as tonic does, outside our
        // layers): deadline exceeded.
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            svc.clone().oneshot(req(Some("50m"))),
        )
        .await;
        let count = |code| {
            metrics
                .handled
                .with_label_values(&["ringcache.v1.Cache", "Get", code])
                .get()
        };
        assert_eq!((count("Canceled"), count("DeadlineExceeded")), (1, 1));
    }

    #[test]
    fn classify_bounds_labels() {
        let registry = Registry::new();
        let metrics = GrpcMetrics::new(&registry, &["a.B"]).unwrap();
        assert_eq!(metrics.classify("/a.B/Get"), ("a.B", "Get"));
        assert_eq!(metrics.classify("/a.C/Get"), ("unknown", "unknown"));
        assert_eq!(metrics.classify("/a.B/"), ("unknown", "unknown"));
        assert_eq!(metrics.classify("nonsense"), ("unknown", "unknown"));
    }
}
