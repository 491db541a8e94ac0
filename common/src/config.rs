//! Flags both binaries take, flattened into each binary's own `clap`
//! configuration so they are spelled, documented and checked once.

use std::time::Duration;

use clap::Args;

use crate::{logging::LogFormat, size::ByteSize, validate::RequestLimits};

/// The smallest default for the gRPC message size limit (gRPC's own
/// default).
const MIN_DEFAULT_MESSAGE_BYTES: u64 = 4 << 20;

/// Request limits, shared by the cache node and the orchestrator so a
/// request is refused at the first hop with the message it would get at
/// the last.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Longest key accepted.
    #[arg(long, env = "RINGCACHE_MAX_KEY_BYTES", default_value = "1KiB")]
    pub max_key_bytes: ByteSize,

    /// Largest value accepted.
    #[arg(long, env = "RINGCACHE_MAX_VALUE_BYTES", default_value = "1MiB")]
    pub max_value_bytes: ByteSize,

    /// Most keys in one GetMany, or entries in one SetMany.
    #[arg(long, env = "RINGCACHE_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Largest gRPC message, in either direction. Default: the larger of
    /// 4MiB and one maximal Set (max key + max value + 64KiB). A GetMany
    /// whose answer would be larger is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "RINGCACHE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<ByteSize>,

    /// Most requests in flight at once; beyond it, calls are answered
    /// RESOURCE_EXHAUSTED at once instead of queueing.
    #[arg(long, env = "RINGCACHE_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// Most bytes of requests and responses held by calls in flight (a
    /// response counts until it is sent); beyond it, new calls are answered
    /// RESOURCE_EXHAUSTED. Bounds the memory overload can take. At least
    /// --max-message-bytes.
    #[arg(long, env = "RINGCACHE_MAX_IN_FLIGHT_BYTES", default_value = "256MiB")]
    pub max_in_flight_bytes: ByteSize,

    /// Most ops in flight on one Pipeline stream. Beyond it the server stops
    /// reading the stream until an op is answered, and HTTP/2 flow control
    /// holds the client back: a fast writer never grows server memory.
    #[arg(long, env = "RINGCACHE_PIPELINE_DEPTH", default_value_t = crate::pipeline::DEFAULT_DEPTH)]
    pub pipeline_depth: usize,

    /// Longest time a request may run; a shorter client deadline
    /// (grpc-timeout) wins.
    #[arg(long, env = "RINGCACHE_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

/// Logging and graceful shutdown.
#[derive(Debug, Clone, Args)]
pub struct ProcessArgs {
    /// Threads that serve calls; 0 means one per CPU (at least 2). Fewer
    /// threads than CPUs trades peak throughput for less CPU per call (fewer
    /// cross-thread wake-ups).
    #[arg(long, env = "RINGCACHE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Log format on stderr. Filter with RUST_LOG (default "info").
    #[arg(long, env = "RINGCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// On SIGTERM, how long to keep serving while reporting NOT_SERVING, so
    /// load balancers stop sending new calls before the listener closes.
    #[arg(long, env = "RINGCACHE_DRAIN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// On SIGTERM, how long in-flight calls get to finish after the listener
    /// closes. Keep drain delay + this below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "RINGCACHE_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// A limit that is zero, out of range or inconsistent with another.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// A limit is zero.
    #[error("{flag} must be positive")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// The message size limit is smaller than one maximal Set.
    #[error(
        "--max-message-bytes {message} is smaller than one maximal Set ({needed} bytes); raise it or lower --max-value-bytes"
    )]
    MessageTooSmall {
        /// The configured limit.
        message: u64,
        /// What one maximal Set needs.
        needed: u64,
    },
    /// `--pipeline-depth` is past what a stream may hold.
    #[error("--pipeline-depth {depth} is more than {max} ops in flight per stream")]
    PipelineTooDeep {
        /// The configured depth.
        depth: usize,
        /// The most allowed.
        max: usize,
    },
    /// The in-flight byte budget cannot hold one maximal message.
    #[error(
        "--max-in-flight-bytes {budget} is smaller than --max-message-bytes ({message}): one maximal call could never run"
    )]
    BudgetTooSmall {
        /// The configured budget.
        budget: u64,
        /// The message size limit.
        message: u64,
    },
}

impl LimitArgs {
    /// The request limits these flags set.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_key_bytes: usize::try_from(self.max_key_bytes.bytes()).unwrap_or(usize::MAX),
            max_value_bytes: usize::try_from(self.max_value_bytes.bytes()).unwrap_or(usize::MAX),
            max_batch: self.max_batch,
        }
    }

    /// One maximal Set request on the wire: key, value and framing.
    fn max_single_set(&self) -> u64 {
        self.max_key_bytes.bytes() + self.max_value_bytes.bytes() + 64 * 1024
    }

    /// The gRPC message size limit, explicit or derived.
    pub fn max_message_bytes(&self) -> usize {
        let bytes = self.max_message_bytes.map_or_else(
            || self.max_single_set().max(MIN_DEFAULT_MESSAGE_BYTES),
            ByteSize::bytes,
        );
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    /// Checks the limits are positive and fit together.
    pub fn validate(&self) -> Result<(), LimitError> {
        for (flag, value) in [
            ("--max-key-bytes", self.max_key_bytes.bytes()),
            ("--max-value-bytes", self.max_value_bytes.bytes()),
            ("--max-batch", self.max_batch as u64),
            ("--max-in-flight", self.max_in_flight as u64),
            ("--max-in-flight-bytes", self.max_in_flight_bytes.bytes()),
            ("--pipeline-depth", self.pipeline_depth as u64),
            ("--request-timeout", self.request_timeout.as_millis() as u64),
        ] {
            if value == 0 {
                return Err(LimitError::Zero { flag });
            }
        }
        if self.pipeline_depth > crate::pipeline::MAX_DEPTH {
            return Err(LimitError::PipelineTooDeep {
                depth: self.pipeline_depth,
                max: crate::pipeline::MAX_DEPTH,
            });
        }
        if let Some(message) = self.max_message_bytes
            && message.bytes() < self.max_single_set()
        {
            return Err(LimitError::MessageTooSmall {
                message: message.bytes(),
                needed: self.max_single_set(),
            });
        }
        let message = self.max_message_bytes() as u64;
        if self.max_in_flight_bytes.bytes() < message {
            return Err(LimitError::BudgetTooSmall {
                budget: self.max_in_flight_bytes.bytes(),
                message,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        process: ProcessArgs,
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults() {
        let cli = parse(&[]);
        cli.limits.validate().unwrap();
        assert_eq!(cli.limits.limits(), RequestLimits::default());
        assert_eq!(cli.limits.max_message_bytes(), 4 << 20);
        assert_eq!(cli.process.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn message_size_follows_value_size() {
        let cli = parse(&["--max-value-bytes", "8MiB"]);
        assert_eq!(cli.limits.max_message_bytes(), (8 << 20) + 1024 + 64 * 1024);
        let cli = parse(&["--max-message-bytes", "1MiB"]);
        assert!(matches!(
            cli.limits.validate(),
            Err(LimitError::MessageTooSmall { .. })
        ));
        let cli = parse(&["--max-batch", "0"]);
        assert_eq!(
            cli.limits.validate(),
            Err(LimitError::Zero {
                flag: "--max-batch"
            })
        );
    }
}

/// TLS on the gRPC port, and the plaintext probe port.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate chain (leaf first) to serve on --listen. With
    /// --tls-key, the gRPC port speaks TLS only. Re-read when the file
    /// changes (every 2s): new connections get the new certificate,
    /// existing ones keep theirs.
    #[arg(long, env = "RINGCACHE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RINGCACHE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate signed by
    /// one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "RINGCACHE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Also serve grpc.health.v1 in plaintext on this address, for probes
    /// that cannot speak TLS (the kubelet's gRPC probe). Health only.
    #[arg(long, env = "RINGCACHE_PROBE_LISTEN")]
    pub probe_listen: Option<std::net::SocketAddr>,
}

impl TlsArgs {
    /// The reloading TLS configuration these flags ask for, loaded now (a
    /// server asked for TLS must not start without it); `None` without
    /// --tls-cert.
    pub fn server_config(
        &self,
    ) -> Result<Option<std::sync::Arc<crate::tls::ReloadingServerConfig>>, crate::tls::TlsError>
    {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        crate::tls::ServerFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        }
        .reloading()
        .map(Some)
    }
}
