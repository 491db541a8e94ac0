//! The `orchestrator` binary: parse the configuration, then serve until
//! SIGTERM/SIGINT (see `ringcache_common::server::main`).

#![forbid(unsafe_code)]

/// mimalloc rather than the system allocator: a routed request allocates
/// and frees dozens of small buffers (headers, frames, messages), and
/// glibc's malloc/free were ~15% of its instructions; with mimalloc a
/// routed `Get` takes 14% fewer (see `BENCHMARKS.md`). Not in the cache
/// node: there memory, not CPU, is the bound, and mimalloc keeps more of
/// what a churning cache frees (measured: 95 MiB resident where glibc
/// stays under 89 MiB, for a 32 MiB capacity overwritten ten times).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use orchestrator::{config::Config, server};

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    let result = config
        .validate()
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            ringcache_common::server::main(
                "orchestrator",
                config.process.log_format,
                config.process.worker_threads,
                config.listen,
                config.metrics_listen,
                |grpc, metrics, shutdown| server::run(config, grpc, metrics, shutdown),
            )
        });
    // One line on stderr for any error, never a backtrace.
    ringcache_common::server::exit("orchestrator", result)
}
