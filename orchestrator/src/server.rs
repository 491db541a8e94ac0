//! Wiring: membership, health checks, the router, and serving.

use std::{future::Future, sync::Arc};

use ringcache_common::{
    auth::{AuthLayer, load_tokens},
    grpc::add_reflection,
    server::{AbortOnDrop, ServeOptions, registry, serve},
};
use ringcache_proto::{
    FILE_DESCRIPTOR_SET,
    service_names::{CACHE, CLUSTER},
    v1::{cache_server::CacheServer, cluster_server::ClusterServer},
};
use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;

use crate::{
    config::Config, hedge::Hedging, hotkeys::HotKeys, membership, metrics::ClusterMetrics,
    nearcache::NearCache, nodes::Cluster, service::Router,
};

/// Runs an orchestrator on the given listeners until `shutdown` completes,
/// then drains as the cache node does.
pub async fn run(
    config: Config,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let source = config.source()?;
    // TLS files and tokens are loaded before anything else: an
    // orchestrator asked for them must not start without them.
    let tls = config.tls.server_config()?;
    let auth = match &config.auth_tokens {
        Some(path) => {
            let tokens = load_tokens(path.clone())?;
            let watch = tokens
                .clone()
                .watch(ringcache_common::reload::RELOAD_INTERVAL);
            Some((
                AuthLayer::new(tokens, ringcache_common::auth::ringcache_policy),
                watch,
            ))
        }
        None => None,
    };
    let (auth, _watch_tokens) = match auth {
        Some((layer, watch)) => (Some(layer), Some(AbortOnDrop(tokio::spawn(watch)))),
        None => (None, None),
    };
    let registry = registry()?;
    let metrics = Arc::new(ClusterMetrics::new(&registry)?);
    let max_message = config.limits.max_message_bytes();
    let hot_keys_gauge = metrics.hot_keys.clone();
    let relieved = metrics.hot_key_relieved.clone();
    let near_bytes = metrics.hot_key_cache_bytes.clone();
    let hedging = Hedging::new(
        config.hedge_delay,
        config.hedge_budget,
        config.node_timeout,
        Some(metrics.hedge.clone()),
    )
    .map(Arc::new);
    let mut settings = config.call_settings();
    settings.transport.tls = config.node_tls()?;
    let _watch_node_tls = settings.transport.tls.as_ref().map(|tls| {
        AbortOnDrop(tokio::spawn(
            tls.config
                .clone()
                .watch(ringcache_common::reload::RELOAD_INTERVAL),
        ))
    });
    let cluster = Arc::new(Cluster::new(settings, metrics));

    // A static list is in place before the first call is accepted; DNS
    // discovery runs its first round at once, then every --dns-interval.
    let _membership = match source {
        source @ membership::Source::Static(_) => {
            membership::run(source, cluster.clone()).await;
            None
        }
        source => Some(AbortOnDrop(tokio::spawn(membership::run(
            source,
            cluster.clone(),
        )))),
    };
    // Readiness: SERVING while some node answers (see `Cluster::ready`),
    // re-evaluated after every health round.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    // One round before the first call is accepted: a node is routed to
    // only once this orchestrator has read what it missed (its debts on
    // the other nodes), even when the orchestrator starts after a failure.
    cluster.check_all(config.health_timeout).await;
    let _health_checks = {
        let cluster = cluster.clone();
        let (every, timeout) = (config.health_interval, config.health_timeout);
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<bool> = None;
            loop {
                tick.tick().await;
                cluster.check_all(timeout).await;
                let ready = cluster.ready();
                if last != Some(ready) {
                    report_readiness(&cluster, ready);
                    last = Some(ready);
                    ready_tx.send_replace(ready);
                }
            }
        }))
    };

    // Pipeline streams: each op enters the router as a unary call would;
    // streams end cleanly at --max-connection-age and when the listener
    // closes.
    let pipelines = ringcache_common::pipeline::Pipelines::new(&config.limits)
        .with_max_age(config.max_connection_age)
        .with_metrics(ringcache_common::pipeline::PipelineMetrics::new(&registry)?);
    let feed_cluster = cluster.clone();
    let mut router = Router::new(
        cluster,
        config.limits.limits(),
        config.replicas,
        max_message,
    )
    .with_failover_ttl(config.failover_ttl)
    .with_pipelines(pipelines.clone())
    .with_hot_keys(Arc::new(HotKeys::new(
        config.hot_key_window,
        config.hot_key_threshold,
        Some(hot_keys_gauge),
    )));
    // Hedged reads, unless --hedge-delay off: the delay and the budget's
    // window move every hedge::REFRESH, off the request path.
    let _hedge_refresh = match hedging {
        Some(hedging) => {
            router = router.with_hedging(hedging.clone());
            Some(AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::hedge::REFRESH);
                loop {
                    tick.tick().await;
                    hedging.refresh();
                }
            })))
        }
        None => None,
    };
    // Hot-key relief, unless --hot-key-cache-bytes is 0.
    let near = (config.hot_key_cache_bytes.bytes() > 0).then(|| {
        Arc::new(
            NearCache::new(config.hot_key_cache_bytes.bytes(), config.hot_key_ttl)
                .with_observer(move |bytes| {
                    near_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX))
                })
                .with_generation(feed_cluster.routing_generation()),
        )
    });
    if let Some(near) = &near {
        router = router.with_relief(near.clone(), Some(relieved));
    }
    // Every node's change feed, unless --change-feeds false: relief's
    // answers are voided by changes made anywhere, and debts recorded on
    // any node are seen by this orchestrator within milliseconds.
    let _feeds = if config.change_feeds {
        router = router.with_fed_relief();
        let sink = crate::feeds::OrchestratorSink {
            cluster: feed_cluster.clone(),
            near,
        };
        Some(AbortOnDrop(tokio::spawn(crate::feeds::supervise(
            feed_cluster.clone(),
            Arc::new(sink),
        ))))
    } else {
        None
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    // The same health state, for the plaintext probe port.
    let health_probe = health_service.clone();
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(
            CacheServer::new(router.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(ClusterServer::new(router))
        .add_service(health_service);
    add_reflection(&mut routes, &[CACHE, CLUSTER], &[FILE_DESCRIPTOR_SET])?;

    tracing::info!(replicas = config.replicas, "orchestrator starting");
    serve(
        ServeOptions::new(
            "orchestrator",
            vec![CACHE, CLUSTER],
            &config.limits,
            &config.process,
        )
        .with_readiness(ready_rx)
        .with_tls(tls)
        .with_probe_listen(config.tls.probe_listen)
        .with_auth(auth)
        .with_max_connection_age(config.max_connection_age)
        .with_pipelines(pipelines),
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

/// Logs a change of readiness, naming the nodes when none answers.
fn report_readiness(cluster: &Cluster, ready: bool) {
    let topology = cluster.topology();
    if ready {
        tracing::info!("a cache node answers: the orchestrator reports SERVING");
    } else if topology.nodes.is_empty() {
        tracing::warn!(
            "no cache node is known yet: the orchestrator reports NOT_SERVING (check --nodes, --nodes-file or --nodes-dns)"
        );
    } else {
        let nodes: Vec<String> = topology
            .nodes
            .iter()
            .map(|n| format!("{}@{}", n.id, n.address))
            .collect();
        tracing::warn!(
            ?nodes,
            "no cache node answers: the orchestrator reports NOT_SERVING until one does (check the addresses in --nodes, --nodes-file or --nodes-dns, and that the nodes run)"
        );
    }
}
