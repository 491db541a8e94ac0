//! The cache node's configuration: flags, each also read from an
//! environment variable (`RINGCACHE_*`), with defaults that work on a
//! laptop and in a pod.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use ringcache_common::{logging::LogFormat, size::ByteSize, validate::RequestLimits};

use crate::store::{MAX_SHARDS, Store, StoreConfig};

/// The smallest default for the gRPC message size limit (gRPC's own
/// default).
const MIN_DEFAULT_MESSAGE_BYTES: u64 = 4 << 20;

/// ringcache cache node: sharded in-memory storage served over gRPC.
///
/// Serves ringcache.v1.Cache, ringcache.v1.Node, grpc.health.v1.Health and
/// server reflection. Every flag can also be set by the environment
/// variable shown next to it.
#[derive(Debug, Clone, Parser)]
#[command(name = "cache-node", version, about, long_about)]
pub struct Config {
    /// Address for the gRPC server.
    #[arg(long, env = "RINGCACHE_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,

    /// Address for the Prometheus /metrics endpoint.
    #[arg(long, env = "RINGCACHE_METRICS_LISTEN", default_value = "0.0.0.0:9091")]
    pub metrics_listen: SocketAddr,

    /// Log format on stderr. Filter with RUST_LOG (default "info").
    #[arg(long, env = "RINGCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The node's identity on the orchestrators' hash ring, reported by
    /// ringcache.v1.Node/Stats. Must be unique in the cluster and stable
    /// across restarts (a restarted node with the same id owns the same
    /// keys). Default: the host name and the gRPC port, e.g. "cache-0:50061"
    /// (in a StatefulSet, the host name is the pod name).
    #[arg(long, env = "RINGCACHE_NODE_ID")]
    pub node_id: Option<String>,

    /// Most bytes the node holds: key + value + per-entry overhead, summed
    /// over all entries. When full, writes evict other entries. Set it below
    /// the memory limit of the container (see README: about 80%).
    #[arg(long, env = "RINGCACHE_CAPACITY", default_value = "256MiB")]
    pub capacity: ByteSize,

    /// Number of shards. Each has its own lock and capacity / shards bytes;
    /// more shards mean less lock contention on many cores.
    #[arg(long, env = "RINGCACHE_SHARDS", default_value_t = 16)]
    pub shards: usize,

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

    /// Longest time a request may run; a shorter client deadline
    /// (grpc-timeout) wins.
    #[arg(long, env = "RINGCACHE_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How often expired entries are reclaimed (expired entries read as
    /// absent at once; this only frees their memory).
    #[arg(long, env = "RINGCACHE_RECLAIM_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reclaim_interval: Duration,

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

/// A configuration whose values do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A limit is zero or out of range.
    #[error("{flag} must be {rule}, got {value}")]
    OutOfRange {
        /// The flag.
        flag: &'static str,
        /// What is allowed.
        rule: &'static str,
        /// What was given.
        value: String,
    },
    /// The largest entry would not fit in a shard.
    #[error(
        "the largest entry ({entry} bytes: --max-key-bytes + --max-value-bytes + overhead) does not fit in a shard ({shard} bytes: --capacity / --shards); raise --capacity, lower --shards or lower --max-value-bytes"
    )]
    EntryExceedsShard {
        /// The largest entry's weight.
        entry: u64,
        /// A shard's capacity.
        shard: u64,
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
}

impl Config {
    /// The node's identity: `--node-id`, or the host name and `port`.
    pub fn node_id(&self, port: u16) -> String {
        match &self.node_id {
            Some(id) => id.clone(),
            None => format!("{}:{port}", gethostname::gethostname().to_string_lossy()),
        }
    }

    /// The request limits these flags set.
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_key_bytes: usize::try_from(self.max_key_bytes.bytes()).unwrap_or(usize::MAX),
            max_value_bytes: usize::try_from(self.max_value_bytes.bytes()).unwrap_or(usize::MAX),
            max_batch: self.max_batch,
        }
    }

    /// The store shape these flags set.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            capacity: self.capacity.bytes(),
            shards: self.shards,
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

    /// Checks that the values fit together, with a message naming the flags
    /// to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |flag, value: u64| {
            if value == 0 {
                Err(ConfigError::OutOfRange {
                    flag,
                    rule: "positive",
                    value: value.to_string(),
                })
            } else {
                Ok(())
            }
        };
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(ConfigError::OutOfRange {
                flag: "--shards",
                rule: "between 1 and 4096",
                value: self.shards.to_string(),
            });
        }
        positive("--capacity", self.capacity.bytes())?;
        positive("--max-key-bytes", self.max_key_bytes.bytes())?;
        positive("--max-value-bytes", self.max_value_bytes.bytes())?;
        positive("--max-batch", self.max_batch as u64)?;
        positive("--max-in-flight", self.max_in_flight as u64)?;
        positive(
            "--reclaim-interval",
            self.reclaim_interval.as_millis() as u64,
        )?;
        let entry = Store::entry_weight(
            usize::try_from(self.max_key_bytes.bytes()).unwrap_or(usize::MAX),
            usize::try_from(self.max_value_bytes.bytes()).unwrap_or(usize::MAX),
            true,
        );
        let shard = self.capacity.bytes() / self.shards as u64;
        if entry > shard {
            return Err(ConfigError::EntryExceedsShard { entry, shard });
        }
        if let Some(message) = self.max_message_bytes
            && message.bytes() < self.max_single_set()
        {
            return Err(ConfigError::MessageTooSmall {
                message: message.bytes(),
                needed: self.max_single_set(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("cache-node").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]);
        c.validate().unwrap();
        assert_eq!(c.capacity.bytes(), 256 << 20);
        assert_eq!(c.limits(), RequestLimits::default());
        assert_eq!(c.max_message_bytes(), 4 << 20);
    }

    #[test]
    fn sizes_parse_with_units() {
        let c = parse(&[
            "--capacity",
            "1GiB",
            "--max-value-bytes",
            "8MiB",
            "--shards",
            "8",
        ]);
        c.validate().unwrap();
        assert_eq!(c.capacity.bytes(), 1 << 30);
        assert_eq!(c.max_message_bytes(), (8 << 20) + 1024 + 64 * 1024);
    }

    #[test]
    fn inconsistent_combinations_are_refused() {
        let c = parse(&["--capacity", "8MiB", "--shards", "16"]);
        let err = c.validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::EntryExceedsShard { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("raise --capacity"));

        let c = parse(&["--max-message-bytes", "1MiB"]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MessageTooSmall { .. })
        ));

        let c = parse(&["--shards", "0"]);
        assert!(c.validate().is_err());
        let c = parse(&["--max-batch", "0"]);
        assert!(c.validate().is_err());
    }

    #[test]
    fn bad_values_fail_to_parse() {
        assert!(Config::try_parse_from(["cache-node", "--capacity", "lots"]).is_err());
        assert!(Config::try_parse_from(["cache-node", "--log-format", "xml"]).is_err());
    }
}
