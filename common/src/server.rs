//! Serving and draining, the same way in both binaries: the tower layers,
//! the `/metrics` endpoint, readiness, and graceful shutdown.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus::Registry;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{service::Routes, transport::server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::ServiceBuilder;

use crate::{
    auth::AuthLayer,
    deadline::DeadlineLayer,
    grpc::{HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA},
    inflight_bytes::InFlightBytesLayer,
    limits::InFlightLimitLayer,
    metrics::{self, GrpcMetrics, GrpcMetricsLayer},
    refusals::ClearRefusalsLayer,
    rpc_trace::ServerTraceLayer,
    tls::ReloadingServerConfig,
};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The binary's name, for logs (`cache-node`, `orchestrator`).
    pub name: &'static str,
    /// The gRPC services this binary serves; their health turns SERVING
    /// when serving starts and NOT_SERVING when draining starts. They are
    /// also the services the RPC metrics label by name.
    pub services: Vec<&'static str>,
    /// Most requests in flight at once (`--max-in-flight`).
    pub max_in_flight: usize,
    /// Most bytes held by calls in flight (`--max-in-flight-bytes`).
    pub max_in_flight_bytes: u64,
    /// The gRPC message limit (`--max-message-bytes`), named in refusals.
    pub max_message_bytes: usize,
    /// Longest a request may run (`--request-timeout`).
    pub request_timeout: Duration,
    /// Time spent NOT_SERVING before the listener closes (`--drain-delay`).
    pub drain_delay: Duration,
    /// Time in-flight calls get after the listener closes
    /// (`--shutdown-grace`).
    pub shutdown_grace: Duration,
    /// Whether the service can do its job (the orchestrator: some node is
    /// reachable). While false, the named services report NOT_SERVING even
    /// though the server runs. `None`: always ready once serving.
    pub ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// TLS on the gRPC port (`--tls-cert`, `--tls-key`, `--tls-client-ca`);
    /// `None`: plaintext.
    pub tls: Option<Arc<ReloadingServerConfig>>,
    /// A plaintext port serving `grpc.health.v1` only (`--probe-listen`),
    /// for probes that cannot speak TLS.
    pub probe_listen: Option<SocketAddr>,
    /// Bearer-token checks (`--auth-tokens`); `None`: no authentication.
    pub auth: Option<AuthLayer>,
    /// Close client connections gracefully after about this long
    /// (`--max-connection-age`); `None`: never.
    pub max_connection_age: Option<Duration>,
    /// The `Pipeline` streams to end when the listener closes (they would
    /// otherwise hold the drain open for as long as their clients keep
    /// them).
    pub pipelines: Option<crate::pipeline::Pipelines>,
    /// Work to finish while NOT_SERVING, before the listener closes
    /// (alongside `--drain-delay`): the node hands its entries over.
    pub before_close: Option<Arc<dyn BeforeClose>>,
}

/// What a binary does while draining, before its listener closes: the
/// listener stays open (and health NOT_SERVING) until both this and
/// `--drain-delay` are done.
pub trait BeforeClose: std::fmt::Debug + Send + Sync {
    /// Runs once, when draining starts.
    fn run(&self) -> futures::future::BoxFuture<'_, ()>;
}

impl ServeOptions {
    /// The options the shared flags set, for `services` of binary `name`.
    pub fn new(
        name: &'static str,
        services: Vec<&'static str>,
        limits: &crate::config::LimitArgs,
        process: &crate::config::ProcessArgs,
    ) -> Self {
        Self {
            name,
            services,
            max_in_flight: limits.max_in_flight,
            max_in_flight_bytes: limits.max_in_flight_bytes.bytes(),
            max_message_bytes: limits.max_message_bytes(),
            request_timeout: limits.request_timeout,
            drain_delay: process.drain_delay,
            shutdown_grace: process.shutdown_grace,
            ready: None,
            tls: None,
            probe_listen: None,
            auth: None,
            max_connection_age: None,
            pipelines: None,
            before_close: None,
        }
    }

    /// Runs `work` while draining, before the listener closes.
    pub fn with_before_close(mut self, work: Arc<dyn BeforeClose>) -> Self {
        self.before_close = Some(work);
        self
    }

    /// Ends `pipelines`' streams cleanly when the listener closes.
    pub fn with_pipelines(mut self, pipelines: crate::pipeline::Pipelines) -> Self {
        self.pipelines = Some(pipelines);
        self
    }

    /// Closes client connections gracefully after about `age` (zero:
    /// never), so clients spread over servers added since they connected.
    pub fn with_max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = (!age.is_zero()).then_some(age);
        self
    }

    /// Serves TLS with `tls` (see [`crate::tls`]).
    pub fn with_tls(mut self, tls: Option<Arc<ReloadingServerConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// Also serves health checks in plaintext on `addr`.
    pub fn with_probe_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.probe_listen = addr;
        self
    }

    /// Checks bearer tokens with `auth` (see [`crate::auth`]).
    pub fn with_auth(mut self, auth: Option<AuthLayer>) -> Self {
        self.auth = auth;
        self
    }

    /// Reports the services NOT_SERVING while `ready` is false.
    pub fn with_readiness(mut self, ready: tokio::sync::watch::Receiver<bool>) -> Self {
        self.ready = Some(ready);
        self
    }
}

/// `age` shortened by a random 0-10%, so that servers started together do
/// not all close their connections at the same moment. (tonic takes one
/// age per server, so the jitter is per process, not per connection.)
fn jittered(age: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is seeded from the OS: random enough here.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = (random % 1001) as f64 / 10_000.0; // 0 ..= 0.1
    age.mul_f64(1.0 - fraction)
}

/// A Prometheus registry with the process collector (CPU, memory, file
/// descriptors) registered, on Linux.
pub fn registry() -> anyhow::Result<Registry> {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

/// Serves `routes` on `grpc_listener` and `registry` on `metrics_listener`
/// until `shutdown` completes, then drains.
///
/// Layers, outermost first:
///
/// 1. RPC metrics — so they see every call: shed ones, timed-out ones, and
///    ones whose client went away (counted as `Canceled`).
/// 2. the SERVER span (when spans are exported) — so a shed or timed-out
///    call shows in its trace with its status.
/// 3. authentication (with `--auth-tokens`) — a call without the right
///    token does no work at all; probes need no token.
/// 4. the in-flight limit — before any work is done; health checks and
///    reflection bypass it, so a busy server still answers its probes.
/// 5. the in-flight byte budget — request and response bytes held by
///    calls, counted until each response is sent; probes bypass it too.
/// 6. the deadline — the shorter of the client's `grpc-timeout` and
///    `request_timeout`, answered `DEADLINE_EXCEEDED`. Inside the limit, so
///    a call that runs out of time gives its permit back at once.
/// 7. clear refusals — tonic's own decoding refusals rewritten to name the
///    limit or the mistake (inside the metrics, which count the final
///    code).
///
/// tonic's own `Server::timeout` is not used: it wraps every layer, so the
/// calls it cuts short would never reach the metrics or the span.
///
/// Readiness: the named `services` are NOT_SERVING until the server is
/// about to accept calls, and turn NOT_SERVING again as soon as `shutdown`
/// completes; the empty service name stays SERVING (liveness). Then, after
/// `drain_delay`, the listener closes and in-flight calls get
/// `shutdown_grace` to finish.
///
/// With TLS, connections are accepted by [`crate::tls::incoming`] and the
/// certificate files are watched for changes. With a probe port, a second,
/// plaintext server answers `grpc.health.v1` there from the same health
/// state, until the process ends.
///
/// Logs `"<name> serving"` with the `grpc`, `metrics` (and `probe`)
/// addresses once ready (the integration harness waits for that line).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    options: ServeOptions,
    routes: Routes,
    health: HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ServeOptions {
        name,
        services,
        max_in_flight,
        max_in_flight_bytes,
        max_message_bytes,
        request_timeout,
        drain_delay,
        shutdown_grace,
        ready,
        tls,
        probe_listen,
        auth,
        max_connection_age,
        pipelines,
        before_close,
    } = options;
    let set_all = |status| {
        let health = health.clone();
        let services = services.clone();
        async move {
            for s in services {
                health.set_service_status(s, status).await;
            }
        }
    };
    set_all(ServingStatus::NotServing).await;

    let mut labelled = services.clone();
    labelled.extend([HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA]);
    let grpc_metrics = GrpcMetrics::new(&registry, &labelled)?;
    // Spans only when they are exported: the layer costs nothing otherwise.
    let tracing =
        crate::telemetry::tracing_enabled().then(|| ServerTraceLayer::new(services.clone()));
    let bytes_budget = InFlightBytesLayer::new(max_in_flight_bytes, "--max-in-flight-bytes");
    bytes_budget.register(&registry)?;
    let layers = ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(grpc_metrics))
        .option_layer(tracing)
        .option_layer(auth)
        .layer(InFlightLimitLayer::new(max_in_flight, "--max-in-flight"))
        .layer(bytes_budget)
        .layer(DeadlineLayer::new(request_timeout))
        .layer(ClearRefusalsLayer::new(max_message_bytes));

    let grpc_addr = grpc_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(age) = max_connection_age {
        // hyper sends GOAWAY when a connection reaches its age, lets the
        // calls in flight finish (each bounded by the deadline layer), and
        // closes it. No `max_connection_age_grace`: in tonic 0.14 setting it
        // replaces the graceful close at `age` with a forced one at
        // `age + grace`, which would cut calls in flight.
        builder = builder.max_connection_age(jittered(age));
    }
    let router = builder.layer(layers).add_routes(routes);
    let stopped = async {
        let _ = grpc_stopped.await;
    };
    type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
    let mut _watch_certs = None;
    let server: Serving = match tls {
        Some(tls) => {
            let failures = prometheus::IntCounter::new(
                "ringcache_tls_handshake_failures_total",
                "TLS handshakes on the gRPC port that failed or timed out (wrong CA, no client certificate, plaintext clients, ...).",
            )?;
            registry.register(Box::new(failures.clone()))?;
            _watch_certs = Some(AbortOnDrop(tokio::spawn(
                tls.clone().watch(crate::reload::RELOAD_INTERVAL),
            )));
            let incoming = crate::tls::incoming(grpc_listener, tls, Some(failures));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => {
            let incoming = TcpIncoming::from(grpc_listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    let mut server = tokio::spawn(server);

    // The plaintext probe port: health only, same state, lives until the
    // process ends (probes keep answering NOT_SERVING while draining).
    let probe = match probe_listen {
        Some(addr) => {
            let listener = bind("--probe-listen", addr).await?;
            let probe_addr = listener.local_addr()?;
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            // Health, and reflection describing health alone (so
            // `grpcurl -plaintext <probe> grpc.health.v1.Health/Check`
            // works).
            let mut probe_routes = tonic::service::RoutesBuilder::default();
            probe_routes.add_service(health_service);
            crate::grpc::add_reflection(&mut probe_routes, &[], &[])?;
            let probe_server = tonic::transport::Server::builder()
                .add_routes(probe_routes.routes())
                .serve_with_incoming(incoming);
            Some((
                probe_addr,
                AbortOnDrop(tokio::spawn(async move {
                    if let Err(e) = probe_server.await {
                        tracing::error!(error = %e, "probe server failed");
                    }
                })),
            ))
        }
        None => None,
    };

    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    let metrics_server = tokio::spawn(metrics::serve(metrics_listener, registry, async {
        let _ = metrics_stopped.await;
    }));

    // Readiness follows `ready` until draining starts.
    let readiness = match ready {
        None => {
            set_all(ServingStatus::Serving).await;
            None
        }
        Some(mut ready) => {
            let (health, services) = (health.clone(), services.clone());
            Some(tokio::spawn(async move {
                loop {
                    let status = if *ready.borrow_and_update() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for s in &services {
                        health.set_service_status(*s, status).await;
                    }
                    if ready.changed().await.is_err() {
                        break;
                    }
                }
            }))
        }
    };
    match &probe {
        Some((probe_addr, _)) => tracing::info!(
            grpc = %grpc_addr,
            metrics = %metrics_addr,
            probe = %probe_addr,
            tls = _watch_certs.is_some(),
            "{name} serving"
        ),
        None => tracing::info!(
            grpc = %grpc_addr,
            metrics = %metrics_addr,
            tls = _watch_certs.is_some(),
            "{name} serving"
        ),
    }

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            let _ = stop_metrics.send(());
            if let Some(task) = &readiness {
                task.abort();
            }
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("grpc server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("grpc server failed"),
                Err(e) => Err(e).context("grpc server task failed"),
            };
        }
    }

    tracing::info!(?drain_delay, grace = ?shutdown_grace, "draining: health is NOT_SERVING");
    if let Some(task) = readiness {
        // Stopped before draining reports NOT_SERVING, so it cannot undo it.
        task.abort();
        let _ = task.await;
    }
    set_all(ServingStatus::NotServing).await;
    match &before_close {
        Some(work) => {
            tokio::join!(tokio::time::sleep(drain_delay), work.run());
        }
        None => tokio::time::sleep(drain_delay).await,
    }
    // Streams of many calls answer what they read and end: the graceful
    // stop below waits for every open stream.
    if let Some(p) = &pipelines {
        p.close();
    }
    let _ = stop_grpc.send(());
    match tokio::time::timeout(shutdown_grace, &mut server).await {
        Ok(Ok(Ok(()))) => tracing::info!("in-flight calls finished"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "grpc server ended with an error while draining")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "grpc server task failed while draining"),
        Err(_) => {
            tracing::warn!(grace = ?shutdown_grace, "in-flight calls did not finish within the grace period; stopping anyway");
            server.abort();
        }
    }
    let _ = stop_metrics.send(());
    let _ = metrics_server.await;
    tracing::info!("{name} stopped");
    Ok(())
}

/// Aborts a background task when dropped, so no task outlives the server
/// that started it.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The body of both binaries' `main`: set up logging, start the runtime,
/// bind `--listen` and `--metrics-listen`, and run `serve` with the
/// SIGTERM/SIGINT future until it returns. Logs the error it fails with.
pub fn main<F, Fut>(
    name: &'static str,
    log_format: crate::logging::LogFormat,
    worker_threads: usize,
    listen: std::net::SocketAddr,
    metrics_listen: std::net::SocketAddr,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, TcpListener, crate::shutdown::Signal) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = runtime(worker_threads)?;
    // The OTLP exporter needs the runtime to exist when it is built.
    let telemetry = {
        let _guard = runtime.enter();
        crate::telemetry::init(name, log_format)?
    };
    let result = runtime.block_on(async {
        let grpc = bind("--listen", listen).await?;
        let metrics = bind("--metrics-listen", metrics_listen).await?;
        serve(grpc, metrics, crate::shutdown::signal()).await
    });
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "{name} failed");
    }
    // Flush spans from outside `block_on`, while the runtime still runs
    // the exporter's I/O.
    telemetry.shutdown();
    drop(runtime);
    result
}

/// How both binaries end: `Ok` exits 0; an error is printed as one line
/// on stderr (`<name>: error: <cause: cause: …>`), never as a backtrace —
/// whatever `RUST_BACKTRACE` says, a wrong flag is not a crash — and exits
/// 1. (Errors while serving were also logged by [`main`].)
pub fn exit(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", error_line(name, &error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The one line [`exit`] prints for `error`: its whole chain of causes.
pub fn error_line(name: &str, error: &anyhow::Error) -> String {
    format!("{name}: error: {error:#}")
}

/// Builds the multi-threaded runtime both binaries run on: `workers`
/// threads (`--worker-threads`), or by default one per CPU and at least
/// two, so a one-CPU pod still serves a call while another task (an
/// exporter, a health check) runs.
pub fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        n => n,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Binds a listener, with an error that names the flag.
pub async fn bind(flag: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {flag} {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jittered_age_is_at_most_ten_percent_shorter_and_varies() {
        let age = Duration::from_secs(300);
        let ages: Vec<Duration> = (0..200).map(|_| jittered(age)).collect();
        for a in &ages {
            assert!(*a <= age && *a >= age.mul_f64(0.9), "{a:?}");
        }
        let distinct: std::collections::HashSet<_> = ages.iter().collect();
        assert!(distinct.len() > 50, "only {} distinct ages", distinct.len());
    }
}
