//! The `orchestrator` binary: parse the configuration, then serve until
//! SIGTERM/SIGINT (see `ringcache_common::server::main`).

#![forbid(unsafe_code)]

use clap::Parser;
use orchestrator::{config::Config, server};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate()?;
    ringcache_common::server::main(
        "orchestrator",
        config.process.log_format,
        config.listen,
        config.metrics_listen,
        |grpc, metrics, shutdown| server::run(config, grpc, metrics, shutdown),
    )
}
