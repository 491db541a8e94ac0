//! The `cache-node` binary: parse the configuration, set up logging, bind,
//! and serve until SIGTERM/SIGINT.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use cache_node::{config::Config, server};
use clap::Parser;
use ringcache_common::{logging, metrics, shutdown};
use tokio::net::TcpListener;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    logging::init(config.log_format)?;
    // At least two workers whatever the CPU count: a one-CPU pod must still
    // serve a call while another waits on I/O.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(async {
        config.validate()?;
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot bind --listen {}", config.listen))?;
        let metrics = metrics::bind(config.metrics_listen).await?;
        server::run(config, grpc, metrics, shutdown::signal()).await
    });
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "cache-node failed");
    }
    result
}
