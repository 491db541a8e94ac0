//! The orchestrator's configuration: flags, each also read from an
//! environment variable (`RINGCACHE_*`).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use ringcache_common::{
    config::{LimitArgs, LimitError, ProcessArgs, TlsArgs},
    size::ByteSize,
};

use crate::{
    client::{StackSettings, batch::BatchLimits, transport::TransportSettings},
    handoff::HandoffSettings,
    health::HealthPolicy,
    membership::{Source, parse_file, parse_static, validate_host_port},
    nodes::CallSettings,
};

/// ringcache orchestrator: routes ringcache.v1.Cache calls to the cache
/// nodes that own each key.
///
/// Serves ringcache.v1.Cache, ringcache.v1.Cluster, grpc.health.v1.Health
/// and server reflection. Give the nodes with --nodes (a fixed list) or
/// --nodes-dns (a DNS name, such as a Kubernetes headless Service). Every
/// flag can also be set by the environment variable shown next to it.
#[derive(Debug, Clone, Parser)]
#[command(name = "orchestrator", version, about, long_about)]
pub struct Config {
    /// Address for the gRPC server.
    #[arg(long, env = "RINGCACHE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Address for the Prometheus /metrics endpoint.
    #[arg(long, env = "RINGCACHE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// The cache nodes, as host:port,host:port. Each entry is the node's
    /// identity on the ring: give every orchestrator the same list.
    #[arg(
        long,
        env = "RINGCACHE_NODES",
        conflicts_with_all = ["nodes_dns", "nodes_file"],
        required_unless_present_any = ["nodes_dns", "nodes_file"]
    )]
    pub nodes: Option<String>,

    /// A file listing the cache nodes, one host:port per line (# starts a
    /// comment), read again every --dns-interval: edit it to add or remove
    /// nodes without a restart. Entries are identities, as for --nodes.
    #[arg(long, env = "RINGCACHE_NODES_FILE", conflicts_with = "nodes_dns")]
    pub nodes_file: Option<std::path::PathBuf>,

    /// Discover the cache nodes by resolving this name:port periodically
    /// (e.g. a headless Service). Each address is asked for its --node-id.
    #[arg(long, env = "RINGCACHE_NODES_DNS")]
    pub nodes_dns: Option<String>,

    /// How often --nodes-dns is resolved again (and --nodes-file read
    /// again).
    #[arg(long, env = "RINGCACHE_DNS_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub dns_interval: Duration,

    /// How long an address may be missing from --nodes-dns answers before
    /// its node leaves the ring (answers flap while pods restart, and each
    /// departure moves the node's keys away and back).
    #[arg(long, env = "RINGCACHE_DNS_REMOVAL_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub dns_removal_grace: Duration,

    /// Copies of each key: writes go to this many nodes.
    #[arg(long, env = "RINGCACHE_REPLICAS", default_value_t = 1)]
    pub replicas: usize,

    /// Longest a call to a node may take (a shorter client deadline wins).
    #[arg(long, env = "RINGCACHE_NODE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub node_timeout: Duration,

    /// Hedged reads (with --replicas 2 or more): how long a read waits for
    /// its node before it is also sent to the key's next owner, the first
    /// answer winning. `auto` (the default) is the p99 latency of answered
    /// node calls over the last 10 s, at least 2ms and at most
    /// --node-timeout; `off` turns hedging off; or a duration.
    #[arg(long, env = "RINGCACHE_HEDGE_DELAY", default_value = "auto")]
    pub hedge_delay: crate::hedge::DelayPolicy,

    /// Hedged reads: the most keys hedged, in percent of keys read over
    /// the last 10 s (plus a burst of 20), so a cluster slow everywhere is
    /// not asked twice for everything.
    #[arg(long, env = "RINGCACHE_HEDGE_BUDGET", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=100))]
    pub hedge_budget: u64,

    /// Longest wait for a connection to a node.
    #[arg(long, env = "RINGCACHE_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Most calls in flight to one node from this orchestrator; beyond it,
    /// calls for that node's keys are answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "RINGCACHE_MAX_NODE_IN_FLIGHT", default_value_t = 1024)]
    pub max_node_in_flight: usize,

    /// HTTP/2 connections from this orchestrator to each node; calls take
    /// them in turn.
    #[arg(long, env = "RINGCACHE_NODE_CONNECTIONS", default_value_t = 1)]
    pub node_connections: usize,

    /// Send batches to nodes on one long-lived `Internal/ApplyStream` per
    /// connection (one DATA frame each way per batch) instead of a unary
    /// `Apply` call each. Sampled requests still go by unary `Apply`, so
    /// their trace context travels in its headers; nodes that refuse or end
    /// the stream (draining, an older version) get unary `Apply` too.
    #[arg(long, env = "RINGCACHE_NODE_STREAMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_streams: bool,

    /// Calls to one node in flight at once before further requests for it
    /// queue and go out together, as one batch, when a call returns. 0 for
    /// no coalescing (every request is a call of its own).
    #[arg(long, env = "RINGCACHE_NODE_PIPELINE", default_value_t = 1)]
    pub node_pipeline: usize,

    /// Most requests (keys) queued for one node while its calls are in
    /// flight; beyond it, requests for that node are answered
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "RINGCACHE_NODE_QUEUE", default_value_t = 4096)]
    pub node_queue: usize,

    /// Most request bytes queued for one node; beyond it, requests for that
    /// node are answered RESOURCE_EXHAUSTED.
    #[arg(long, env = "RINGCACHE_NODE_QUEUE_BYTES", default_value = "32MiB")]
    pub node_queue_bytes: ByteSize,

    /// Most bytes of keys recorded per node for invalidation (writes and
    /// deletes that could not reach it); beyond it, the node is flushed
    /// before it serves again.
    #[arg(
        long,
        env = "RINGCACHE_PENDING_INVALIDATION_BYTES",
        default_value = "16MiB"
    )]
    pub pending_invalidation_bytes: ByteSize,

    /// Longest a write may live on a node that stands in for the key's
    /// owners while they are away (a shorter TTL of the write's own wins).
    /// When the owners return, the stand-in's copy is not updated: this
    /// bounds how long it can be served stale should they fail again.
    #[arg(long, env = "RINGCACHE_FAILOVER_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub failover_ttl: Duration,

    /// How long after a node joins the ring or restarts empty (or the
    /// membership changes) reads that miss on it are answered from the
    /// key's other holders, and copied to it.
    #[arg(long, env = "RINGCACHE_HANDOFF_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub handoff_window: Duration,

    /// Keys scanned per second when refilling a node that joined or
    /// restarted (0 turns the refill off; reads still read through).
    #[arg(long, env = "RINGCACHE_HANDOFF_RATE", default_value_t = 50_000)]
    pub handoff_rate: u32,

    /// The window hot-key rates are measured over (Cluster/HotKeys).
    #[arg(long, env = "RINGCACHE_HOT_KEY_WINDOW", default_value = "1s", value_parser = humantime::parse_duration)]
    pub hot_key_window: Duration,

    /// Calls per second (reads + writes) from which a key counts as hot
    /// (Cluster/HotKeys, ringcache_hot_keys).
    #[arg(long, env = "RINGCACHE_HOT_KEY_THRESHOLD", default_value_t = 1000.0)]
    pub hot_key_threshold: f64,

    /// Hot-key relief: the most bytes (keys, values and bookkeeping) of hot
    /// keys' answers this orchestrator keeps to answer their reads itself.
    /// 0 turns relief off.
    #[arg(long, env = "RINGCACHE_HOT_KEY_CACHE_BYTES", default_value = "16MiB")]
    pub hot_key_cache_bytes: ByteSize,

    /// Hot-key relief: how long an answer is served from this
    /// orchestrator's near cache. A write or delete through this
    /// orchestrator is seen at once; one through another orchestrator may
    /// be seen this much later for a hot key.
    #[arg(long, env = "RINGCACHE_HOT_KEY_TTL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub hot_key_ttl: Duration,

    /// Follow every node's change feed (Internal/Changes): a write or
    /// delete through any orchestrator, or straight to a node, voids this
    /// orchestrator's relieved answer of the key within milliseconds, and
    /// a key is relieved only while the feeds of the nodes that could take
    /// its writes are followed and caught up. Off: relief is bounded by
    /// --hot-key-ttl alone (a write through another orchestrator may be
    /// seen that much later).
    #[arg(long, env = "RINGCACHE_CHANGE_FEEDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub change_feeds: bool,

    /// How often every node's health is checked.
    #[arg(long, env = "RINGCACHE_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Longest a health check may take.
    #[arg(long, env = "RINGCACHE_HEALTH_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive failed checks or calls that eject a node.
    #[arg(long, env = "RINGCACHE_EJECT_AFTER", default_value_t = 3)]
    pub eject_after: u32,

    /// The first ejection's length; it doubles while a node keeps failing.
    #[arg(long, env = "RINGCACHE_EJECT_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub eject_backoff: Duration,

    /// The longest ejection.
    #[arg(long, env = "RINGCACHE_EJECT_MAX_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub eject_max_backoff: Duration,

    /// Logging and shutdown.
    #[command(flatten)]
    pub process: ProcessArgs,

    /// Request limits (the same as the nodes', so requests are refused at
    /// the first hop).
    #[command(flatten)]
    pub limits: LimitArgs,

    /// TLS on the gRPC port, and the plaintext probe port.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// File of bearer tokens clients must present (`authorization: Bearer
    /// <token>`), one `<role> <token>` per line (roles: read, write,
    /// admin; `#` comments). Re-read when it changes. Without it, no
    /// authentication.
    #[arg(long, env = "RINGCACHE_AUTH_TOKENS")]
    pub auth_tokens: Option<std::path::PathBuf>,

    /// Close each client connection gracefully after about this long
    /// (HTTP/2 GOAWAY: calls in flight finish, clients reconnect for the
    /// next ones), so clients spread over orchestrators added since they
    /// connected, behind an L4 load balancer such as a Kubernetes Service.
    /// Jittered by up to -10% per process. Calls in flight are not cut
    /// (they end by `--request-timeout` at the latest). `0s`: never.
    #[arg(long, env = "RINGCACHE_MAX_CONNECTION_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,

    /// PEM CA certificate(s) node certificates must chain to: turns on TLS
    /// for every call to nodes. Re-read when the file changes.
    #[arg(long, env = "RINGCACHE_NODE_TLS_CA")]
    pub node_tls_ca: Option<std::path::PathBuf>,

    /// PEM certificate the orchestrator presents to nodes (for nodes
    /// started with --tls-client-ca). Needs --node-tls-key and
    /// --node-tls-ca.
    #[arg(long, env = "RINGCACHE_NODE_TLS_CERT", requires_all = ["node_tls_key", "node_tls_ca"])]
    pub node_tls_cert: Option<std::path::PathBuf>,

    /// Private key of --node-tls-cert.
    #[arg(long, env = "RINGCACHE_NODE_TLS_KEY", requires = "node_tls_cert")]
    pub node_tls_key: Option<std::path::PathBuf>,

    /// The name every node certificate is checked against. Default: the
    /// host of each node's address as given to --nodes (with --nodes-dns,
    /// addresses are the resolved IPs: set this to a name the node
    /// certificates carry, e.g. the headless Service's DNS name).
    #[arg(long, env = "RINGCACHE_NODE_TLS_SERVER_NAME", requires = "node_tls_ca")]
    pub node_tls_server_name: Option<String>,
}

/// A configuration whose values do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A flag's value is out of range or malformed.
    #[error("{flag}: {message}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A request limit is wrong.
    #[error(transparent)]
    Limits(#[from] LimitError),
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

impl Config {
    /// Where the membership comes from.
    pub fn source(&self) -> Result<Source, ConfigError> {
        match (&self.nodes, &self.nodes_dns, &self.nodes_file) {
            (Some(list), None, None) => Ok(Source::Static(
                parse_static(list).map_err(|e| invalid("--nodes", e))?,
            )),
            (None, None, Some(path)) => {
                // Refuse to start on a file that cannot be used; later
                // failures keep the membership the file gave last.
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("--nodes-file", format!("{}: {e}", path.display())))?;
                parse_file(&text)
                    .map_err(|e| invalid("--nodes-file", format!("{}: {e}", path.display())))?;
                Ok(Source::File {
                    path: path.clone(),
                    interval: self.dns_interval,
                })
            }
            (None, Some(target), None) => {
                validate_host_port(target).map_err(|e| invalid("--nodes-dns", e))?;
                Ok(Source::Dns {
                    target: target.clone(),
                    interval: self.dns_interval,
                    grace: self.dns_removal_grace,
                })
            }
            _ => Err(invalid(
                "--nodes",
                "give exactly one of --nodes, --nodes-file and --nodes-dns",
            )),
        }
    }

    /// TLS to nodes as the --node-tls-* flags ask (files loaded now);
    /// `None` without --node-tls-ca.
    pub fn node_tls(
        &self,
    ) -> Result<Option<crate::client::transport::NodeTls>, ringcache_common::tls::TlsError> {
        let Some(ca) = &self.node_tls_ca else {
            return Ok(None);
        };
        let config = ringcache_common::tls::ClientFiles {
            ca: ca.clone(),
            cert: self.node_tls_cert.clone(),
            key: self.node_tls_key.clone(),
        }
        .reloading()?;
        Ok(Some(crate::client::transport::NodeTls {
            config,
            server_name: self.node_tls_server_name.clone(),
        }))
    }

    /// How nodes are called: connections, timeouts, limits, coalescing
    /// (plaintext: [`Config::node_tls`] adds TLS).
    pub fn call_settings(&self) -> CallSettings {
        let max_message = self.limits.max_message_bytes();
        let max_ops = self.limits.max_batch.max(1);
        CallSettings {
            transport: TransportSettings {
                connect_timeout: self.connect_timeout,
                connections: self.node_connections,
                max_message_bytes: max_message,
                reconnect_backoff: Duration::from_millis(250),
                tls: None,
                streams: self.node_streams,
            },
            stack: StackSettings {
                node_timeout: self.node_timeout,
                max_in_flight: self.max_node_in_flight,
            },
            batch: BatchLimits {
                max_ops,
                // Room for each op's tag and length prefix in the message.
                max_bytes: max_message.saturating_sub(max_ops * 8 + 1024).max(1),
                max_queue_ops: self.node_queue,
                max_queue_bytes: usize::try_from(self.node_queue_bytes.bytes())
                    .unwrap_or(usize::MAX),
                // Pipelining off: every request waits for a call slot of
                // its own, up to --max-node-in-flight (so it never queues).
                max_in_flight: match self.node_pipeline {
                    0 => self.max_node_in_flight,
                    n => n,
                },
            },
            health: self.health_policy(),
            probe_timeout: self.health_timeout,
            pending_invalidation_bytes: usize::try_from(self.pending_invalidation_bytes.bytes())
                .unwrap_or(usize::MAX),
            handoff: HandoffSettings {
                window: self.handoff_window,
                rate: self.handoff_rate,
                replicas: self.replicas.max(1),
                read_fence: self
                    .health_interval
                    .saturating_add(self.health_timeout)
                    .saturating_add(self.node_timeout),
            },
        }
    }

    /// When to eject nodes.
    pub fn health_policy(&self) -> HealthPolicy {
        HealthPolicy {
            eject_after: self.eject_after,
            base_backoff: self.eject_backoff,
            max_backoff: self.eject_max_backoff,
        }
    }

    /// Checks that the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        self.source()?;
        if self.replicas == 0 || self.replicas > 16 {
            return Err(invalid(
                "--replicas",
                format!("must be between 1 and 16, got {}", self.replicas),
            ));
        }
        for (flag, zero) in [
            ("--node-timeout", self.node_timeout.is_zero()),
            ("--connect-timeout", self.connect_timeout.is_zero()),
            ("--health-interval", self.health_interval.is_zero()),
            ("--health-timeout", self.health_timeout.is_zero()),
            ("--dns-interval", self.dns_interval.is_zero()),
            ("--eject-backoff", self.eject_backoff.is_zero()),
            ("--failover-ttl", self.failover_ttl.is_zero()),
            ("--hot-key-window", self.hot_key_window.is_zero()),
            ("--hot-key-ttl", self.hot_key_ttl.is_zero()),
            ("--max-node-in-flight", self.max_node_in_flight == 0),
            ("--node-connections", self.node_connections == 0),
            ("--node-queue", self.node_queue == 0),
            ("--eject-after", self.eject_after == 0),
        ] {
            if zero {
                return Err(invalid(flag, "must be positive"));
            }
        }
        if !(self.hot_key_threshold.is_finite() && self.hot_key_threshold > 0.0) {
            return Err(invalid(
                "--hot-key-threshold",
                format!("must be a positive number, got {}", self.hot_key_threshold),
            ));
        }
        if self.eject_max_backoff < self.eject_backoff {
            return Err(invalid(
                "--eject-max-backoff",
                "must be at least --eject-backoff",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("orchestrator").chain(args.iter().copied()))
    }

    #[test]
    fn static_membership() {
        let c = parse(&["--nodes", "a:1,b:2"]).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.source().unwrap(),
            Source::Static(vec!["a:1".into(), "b:2".into()])
        );
        assert_eq!(c.replicas, 1);
        assert_eq!(c.listen.port(), 50051);
        assert_eq!(c.metrics_listen.port(), 9090);
    }

    #[test]
    fn dns_membership() {
        let c = parse(&[
            "--nodes-dns",
            "nodes.default.svc:50061",
            "--dns-interval",
            "2s",
        ])
        .unwrap();
        assert_eq!(
            c.source().unwrap(),
            Source::Dns {
                target: "nodes.default.svc:50061".into(),
                interval: Duration::from_secs(2),
                grace: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn membership_is_required_and_exclusive() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--nodes", "a:1", "--nodes-dns", "b:2"]).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let c = parse(&["--nodes", "a:1", "--replicas", "0"]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("--replicas"));
        let c = parse(&["--nodes", "nonsense"]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("--nodes"));
        let c = parse(&["--nodes-dns", "nodes"]).unwrap();
        assert!(c.validate().is_err());
    }
}
