//! The cache node's configuration: flags, each also read from an
//! environment variable (`RINGCACHE_*`), with defaults that work on a
//! laptop and in a pod.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use ringcache_common::{
    config::{LimitArgs, LimitError, ProcessArgs, TlsArgs},
    size::ByteSize,
    validate::RequestLimits,
};

use crate::store::{MAX_SHARDS, Store, StoreConfig};

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

    /// Logging and shutdown.
    #[command(flatten)]
    pub process: ProcessArgs,

    /// Request limits.
    #[command(flatten)]
    pub limits: LimitArgs,

    /// TLS on the gRPC port, and the plaintext probe port.
    #[command(flatten)]
    pub tls: TlsArgs,

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

    /// How often expired entries are reclaimed (expired entries read as
    /// absent at once; this only frees their memory).
    #[arg(long, env = "RINGCACHE_RECLAIM_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reclaim_interval: Duration,

    /// Most bytes of the change log that orchestrators follow
    /// (Internal/Changes): every write, delete, increment, touch and copy,
    /// about 96 bytes each (plus keys over 24 bytes). Beyond it the oldest
    /// changes are dropped, and a follower that had not read them is told
    /// it missed some (it then forgets what it kept of this node). 0 turns
    /// the log off: orchestrators then relieve none of this node's keys.
    #[arg(long, env = "RINGCACHE_CHANGE_LOG_BYTES", default_value = "32MiB")]
    pub change_log_bytes: ByteSize,

    /// Most bytes of debt records: keys other nodes missed a write or
    /// delete of (recorded here by orchestrators, about 64 bytes plus the
    /// key each), deleted there before they serve again. Beyond it, the
    /// node with the most is marked to be flushed instead.
    #[arg(long, env = "RINGCACHE_DEBT_BYTES", default_value = "16MiB")]
    pub debt_bytes: ByteSize,

    /// On SIGTERM, how long to wait for an orchestrator to claim this
    /// node's entries (Internal/Park) and keep them on the nodes that own
    /// its keys while it is away — so a planned restart keeps the cache
    /// even with one copy of each key. Once claimed, the node refuses data
    /// calls and stops when the entries are handed over, or after
    /// --shutdown-grace. Waited for only if an orchestrator called in the
    /// last 10 s. 0s: never hand entries over.
    #[arg(long, env = "RINGCACHE_PARK_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub park_wait: Duration,
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
    /// A request limit is wrong.
    #[error(transparent)]
    Limits(#[from] LimitError),
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
        self.limits.limits()
    }

    /// The store shape these flags set.
    pub fn store(&self) -> StoreConfig {
        StoreConfig {
            capacity: self.capacity.bytes(),
            shards: self.shards,
        }
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
        self.limits.validate()?;
        positive(
            "--reclaim-interval",
            self.reclaim_interval.as_millis() as u64,
        )?;
        let entry = Store::entry_weight(
            self.limits().max_key_bytes,
            self.limits().max_value_bytes,
            true,
        );
        let shard = crate::store::max_entry_weight(self.capacity.bytes() / self.shards as u64);
        if entry > shard {
            return Err(ConfigError::EntryExceedsShard { entry, shard });
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
        assert_eq!(c.limits.max_message_bytes(), 4 << 20);
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
        assert_eq!(c.limits.max_message_bytes(), (8 << 20) + 1024 + 64 * 1024);
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
            Err(ConfigError::Limits(LimitError::MessageTooSmall { .. }))
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
