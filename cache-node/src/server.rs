//! Wiring: builds the store and services, serves gRPC and `/metrics`, and
//! shuts down gracefully.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus::Registry;
use ringcache_common::{
    grpc::{HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA, add_reflection},
    limits::InFlightLimitLayer,
    metrics::{self, GrpcMetrics, GrpcMetricsLayer},
};
use ringcache_proto::{
    FILE_DESCRIPTOR_SET,
    service_names::{CACHE, NODE},
    v1::{cache_server::CacheServer, node_server::NodeServer},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{service::RoutesBuilder, transport::server::TcpIncoming};
use tower::ServiceBuilder;

use crate::{
    config::Config,
    metrics::StoreCollector,
    service::{CacheService, NodeService},
    store::Store,
};

/// Aborts a background task when dropped, so no task outlives [`run`].
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a cache node on the given listeners until `shutdown` completes,
/// then drains: health turns NOT_SERVING, after `--drain-delay` the
/// listener closes and new calls are refused, and in-flight calls get
/// `--shutdown-grace` to finish.
pub async fn run(
    config: Config,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = Arc::new(Store::new(config.store())?);

    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    registry.register(Box::new(StoreCollector::new(store.clone())?))?;
    let grpc_metrics = GrpcMetrics::new(
        &registry,
        &[
            CACHE,
            NODE,
            HEALTH_SERVICE,
            REFLECTION_V1,
            REFLECTION_V1ALPHA,
        ],
    )?;

    // Expired entries already read as absent; this frees their memory.
    let reclaimer = {
        let store = store.clone();
        let every = config.reclaim_interval;
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let freed = store.reclaim_expired();
                if freed > 0 {
                    tracing::debug!(freed, "reclaimed expired entries");
                }
            }
        }))
    };

    // The empty service name is SERVING from the start (liveness); the named
    // services turn SERVING only once the server is about to accept calls,
    // and NOT_SERVING as soon as draining starts (readiness).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<CacheServer<CacheService>>().await;
    health.set_not_serving::<NodeServer<NodeService>>().await;

    let grpc_addr = grpc_listener.local_addr()?;
    let max_message = config.max_message_bytes();
    let cache = CacheService::new(store.clone(), config.limits(), max_message);
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(
            CacheServer::new(cache)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(NodeServer::new(NodeService::new(
            store.clone(),
            config.node_id(grpc_addr.port()),
        )))
        .add_service(health_service);
    add_reflection(&mut routes, &[CACHE, NODE], &[FILE_DESCRIPTOR_SET])?;

    // Layer order, outermost first: metrics see every call, including the
    // ones the in-flight limit sheds; the limit comes before any work.
    let layers = ServiceBuilder::new()
        .layer(GrpcMetricsLayer::new(grpc_metrics))
        .layer(InFlightLimitLayer::new(
            config.max_in_flight,
            "--max-in-flight",
        ));

    let metrics_addr = metrics_listener.local_addr()?;
    let incoming = TcpIncoming::from(grpc_listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));

    let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(layers)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, async {
            let _ = grpc_stopped.await;
        });
    let mut server = tokio::spawn(server);

    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    let metrics_server = tokio::spawn(metrics::serve(metrics_listener, registry, async {
        let _ = metrics_stopped.await;
    }));

    health.set_serving::<CacheServer<CacheService>>().await;
    health.set_serving::<NodeServer<NodeService>>().await;
    tracing::info!(
        grpc = %grpc_addr,
        metrics = %metrics_addr,
        capacity = config.capacity.bytes(),
        shards = config.shards,
        node_id = %config.node_id(grpc_addr.port()),
        "cache-node serving"
    );

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            // The server stopped on its own: report why.
            drop(reclaimer);
            let _ = stop_metrics.send(());
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("grpc server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("grpc server failed"),
                Err(e) => Err(e).context("grpc server task failed"),
            };
        }
    }

    tracing::info!(
        drain_delay = ?config.drain_delay,
        grace = ?config.shutdown_grace,
        "draining: health is NOT_SERVING"
    );
    health.set_not_serving::<CacheServer<CacheService>>().await;
    health.set_not_serving::<NodeServer<NodeService>>().await;
    tokio::time::sleep(config.drain_delay).await;
    let _ = stop_grpc.send(());
    match tokio::time::timeout(config.shutdown_grace, &mut server).await {
        Ok(Ok(Ok(()))) => tracing::info!("in-flight calls finished"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "grpc server ended with an error while draining")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "grpc server task failed while draining"),
        Err(_) => {
            tracing::warn!(grace = ?config.shutdown_grace, "in-flight calls did not finish within the grace period; stopping anyway");
            server.abort();
        }
    }
    let _ = stop_metrics.send(());
    let _ = metrics_server.await;
    drop(reclaimer);
    tracing::info!("cache-node stopped");
    Ok(())
}
