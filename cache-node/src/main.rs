//! The `cache-node` binary: parse the configuration, then serve until
//! SIGTERM/SIGINT (see `ringcache_common::server::main`).

#![forbid(unsafe_code)]

use cache_node::{config::Config, server};
use clap::Parser;

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let result = config
        .validate()
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            ringcache_common::server::main(
                "cache-node",
                config.process.log_format,
                config.process.worker_threads,
                config.listen,
                config.metrics_listen,
                |grpc, metrics, shutdown| server::run(config, grpc, metrics, shutdown),
            )
        });
    // One line on stderr for any error, never a backtrace.
    ringcache_common::server::exit("cache-node", result)
}
