//! The `orchestrator` binary: parse the configuration, set up logging,
//! bind, and serve until SIGTERM/SIGINT.

#![forbid(unsafe_code)]

use clap::Parser;
use orchestrator::{config::Config, server};
use ringcache_common::{
    logging,
    server::{bind, runtime},
    shutdown,
};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    logging::init(config.process.log_format)?;
    let result = runtime()?.block_on(async {
        config.validate()?;
        let grpc = bind("--listen", config.listen).await?;
        let metrics = bind("--metrics-listen", config.metrics_listen).await?;
        server::run(config, grpc, metrics, shutdown::signal()).await
    });
    if let Err(error) = &result {
        tracing::error!(error = format!("{error:#}"), "orchestrator failed");
    }
    result
}
