//! Wiring: builds the store and services, then serves them with the shared
//! layers, `/metrics` and graceful shutdown (`ringcache_common::server`).

use std::{future::Future, sync::Arc};

use ringcache_common::{
    grpc::add_reflection,
    server::{AbortOnDrop, BeforeClose, ServeOptions, registry, serve},
};
use ringcache_proto::{
    FILE_DESCRIPTOR_SET,
    service_names::{CACHE, INTERNAL, NODE},
    v1::{cache_server::CacheServer, internal_server::InternalServer, node_server::NodeServer},
};
use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;

use crate::{
    changes::ChangeLog,
    config::Config,
    debts::Debts,
    epochs::Epochs,
    metrics::{ChangesCollector, DebtsCollector, EpochsCollector, StoreCollector},
    parking::{Outcome, Parking},
    service::{CacheService, EPOCH_WINDOW, InternalService, NodeService, new_incarnation},
    store::Store,
};

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
    // TLS files are loaded before anything else: a node asked for TLS
    // must not start without it.
    let tls = config.tls.server_config()?;
    let incarnation = new_incarnation();
    let mut store = Store::new(config.store())?;
    let change_log_bytes = usize::try_from(config.change_log_bytes.bytes()).unwrap_or(usize::MAX);
    let change_log =
        (change_log_bytes > 0).then(|| Arc::new(ChangeLog::new(incarnation, change_log_bytes)));
    if let Some(log) = &change_log {
        store = store.with_change_log(log.clone());
    }
    let store = Arc::new(store);
    let grpc_addr = grpc_listener.local_addr()?;
    let node_id = config.node_id(grpc_addr.port());

    let registry = registry()?;
    registry.register(Box::new(StoreCollector::new(store.clone())?))?;
    if let Some(log) = change_log {
        registry.register(Box::new(ChangesCollector::new(log)?))?;
    }

    // Expired entries already read as absent; this frees their memory.
    let _reclaimer = {
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

    let (health, health_service) = tonic_health::server::health_reporter();
    // The same health state, for the plaintext probe port.
    let health_probe = health_service.clone();
    let max_message = config.limits.max_message_bytes();
    // Pipeline streams: ops run on the store through the unary handlers,
    // end cleanly when the listener closes.
    let pipelines = ringcache_common::pipeline::Pipelines::new(&config.limits)
        .with_metrics(ringcache_common::pipeline::PipelineMetrics::new(&registry)?);
    // One record of the epochs orchestrators call with: Apply and Stats
    // fill it, Node/Stats reports it, direct reads are vouched for by it.
    let epochs = Arc::new(Epochs::new(EPOCH_WINDOW));
    // On SIGTERM, an orchestrator may claim the entries (Internal/Park);
    // the listener stays open until they are handed over.
    let parking = Arc::new(Parking::new(config.park_wait));
    let cache = CacheService::new(store.clone(), config.limits(), max_message)
        .with_pipelines(pipelines.clone())
        .with_epochs(epochs.clone())
        .with_parking(parking.clone());
    // ApplyStreams end when the node starts draining (callers move to
    // unary Apply, which the drain bounds).
    let (draining_tx, draining) = tokio::sync::watch::channel(false);
    let stopping = parking.clone();
    let shutdown = async move {
        shutdown.await;
        // A claim may come from now on (health turns NOT_SERVING next).
        stopping.stopping();
        draining_tx.send_replace(true);
    };
    let park_wait = Arc::new(ParkWait {
        parking,
        epochs: epochs.clone(),
        grace: config.process.shutdown_grace,
    });
    let debts = Arc::new(Debts::new(
        usize::try_from(config.debt_bytes.bytes()).unwrap_or(usize::MAX),
    ));
    registry.register(Box::new(DebtsCollector::new(debts.clone())?))?;
    let internal = InternalService::new(cache.clone())
        .with_streams(draining, config.limits.max_in_flight)
        .with_debts(debts);
    registry.register(Box::new(EpochsCollector::new(epochs.clone())?))?;
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(
            CacheServer::new(cache)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(
            InternalServer::new(internal)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(NodeServer::new(
            NodeService::new(store, node_id.clone())
                .with_incarnation(incarnation)
                .with_epochs(epochs),
        ))
        .add_service(health_service);
    add_reflection(
        &mut routes,
        &[CACHE, NODE, INTERNAL],
        &[FILE_DESCRIPTOR_SET],
    )?;

    tracing::info!(
        node_id,
        capacity = config.capacity.bytes(),
        shards = config.shards,
        "cache-node starting"
    );
    serve(
        ServeOptions::new(
            "cache-node",
            vec![CACHE, NODE, INTERNAL],
            &config.limits,
            &config.process,
        )
        .with_tls(tls)
        .with_probe_listen(config.tls.probe_listen)
        .with_pipelines(pipelines)
        .with_before_close(park_wait),
        routes.routes(),
        health,
        health_probe,
        grpc_listener,
        metrics_listener,
        registry,
        shutdown,
    )
    .await
}

/// While draining: wait for an orchestrator to claim the entries, and for
/// it to read them all (see [`crate::parking`]).
#[derive(Debug)]
struct ParkWait {
    parking: Arc<Parking>,
    epochs: Arc<Epochs>,
    grace: std::time::Duration,
}

impl BeforeClose for ParkWait {
    fn run(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            // Only an orchestrator claims: wait if one called lately.
            let called = self
                .epochs
                .distinct_within(crate::epochs::VOUCH_WINDOW, std::time::Instant::now())
                > 0;
            match self.parking.wait(self.grace, called).await {
                Outcome::Unclaimed => {
                    if called {
                        tracing::warn!(
                            "no orchestrator claimed this node's entries: they are lost with it"
                        );
                    }
                }
                Outcome::Handed => tracing::info!("entries handed over: stopping"),
                Outcome::TimedOut => tracing::warn!(
                    grace = ?self.grace,
                    "entries not all handed over within --shutdown-grace: stopping anyway"
                ),
            }
        })
    }
}
