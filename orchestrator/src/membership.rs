//! Who the cache nodes are: a static list, or DNS discovery.
//!
//! - `--nodes host:port,…`: each entry's identity on the ring is the entry
//!   itself, so the list must be the same in every orchestrator. A host
//!   name is resolved again whenever its connection is re-established.
//! - `--nodes-dns name:port`: the name is resolved every `--dns-interval`
//!   (a Kubernetes headless Service answers with one address per pod), and
//!   each address is asked for its identity (`Node/Stats` → `node_id`, the
//!   pod name in a StatefulSet). The identity, not the address, places the
//!   node on the ring, so a pod restarted with a new IP owns the same keys,
//!   and scaling the StatefulSet is picked up without a restart.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use crate::{
    nodes::{Cluster, Member, identify},
    ring::NodeId,
};

/// Where the membership comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed list of `host:port`.
    Static(Vec<String>),
    /// A DNS name (and port) resolved periodically.
    Dns {
        /// `name:port`.
        target: String,
        /// How often to resolve it again.
        interval: Duration,
    },
}

/// Parses a `--nodes` list: comma-separated `host:port`, spaces ignored.
pub fn parse_static(list: &str) -> Result<Vec<String>, String> {
    let nodes: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if nodes.is_empty() {
        return Err("--nodes lists no node; expected host:port,host:port".to_owned());
    }
    for n in &nodes {
        validate_host_port(n)?;
    }
    let mut sorted = nodes.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != nodes.len() {
        return Err(format!("--nodes lists a node twice: {list}"));
    }
    Ok(nodes)
}

/// Checks a `host:port` string.
pub fn validate_host_port(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not host:port"));
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{s:?} is not host:port (port 1-65535)"));
    }
    Ok(())
}

/// Keeps `cluster`'s membership in step with `source` until dropped (the
/// returned future runs forever for DNS; for a static list it sets the
/// members and returns).
pub async fn run(source: Source, cluster: Arc<Cluster>) {
    match source {
        Source::Static(nodes) => {
            cluster.set_members(
                nodes
                    .into_iter()
                    .map(|address| Member {
                        id: NodeId::from(address.as_str()),
                        address,
                    })
                    .collect(),
            );
        }
        Source::Dns { target, interval } => {
            let mut known: HashMap<SocketAddr, NodeId> = HashMap::new();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let addrs = tokio::net::lookup_host(target.as_str())
                    .await
                    .map(Iterator::collect::<Vec<_>>);
                if let Err(error) = discover(addrs, &cluster, &mut known).await {
                    tracing::warn!(%target, %error, "cannot resolve the nodes' DNS name; keeping the current membership");
                }
            }
        }
    }
}

/// One round of discovery, given what the name resolved to: identify new
/// addresses, forget vanished ones, publish the membership. `known` carries
/// the identities learned in earlier rounds.
pub async fn discover(
    resolved: std::io::Result<Vec<SocketAddr>>,
    cluster: &Cluster,
    known: &mut HashMap<SocketAddr, NodeId>,
) -> std::io::Result<()> {
    let addrs = resolved?;
    known.retain(|addr, _| addrs.contains(addr));
    let unknown: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| !known.contains_key(a))
        .copied()
        .collect();
    let identified =
        futures::future::join_all(unknown.iter().map(|addr| async move {
            (*addr, identify(&addr.to_string(), cluster.settings()).await)
        }))
        .await;
    for (addr, result) in identified {
        match result {
            Ok(id) => {
                known.insert(addr, id);
            }
            // Not ready yet (a starting pod): try again next round.
            Err(reason) => {
                tracing::debug!(%addr, %reason, "cannot identify node yet")
            }
        }
    }
    // One address per identity: if two addresses claim the same id (an old
    // pod not yet gone from DNS), keep the lowest, deterministically.
    let mut by_id: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
    for (addr, id) in known.iter() {
        by_id
            .entry(id.clone())
            .and_modify(|a| *a = (*a).min(*addr))
            .or_insert(*addr);
    }
    cluster.set_members(
        by_id
            .into_iter()
            .map(|(id, addr)| Member {
                id,
                address: addr.to_string(),
            })
            .collect(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_lists_parse() {
        assert_eq!(
            parse_static("a:1, b:2,c.example:50061").unwrap(),
            vec!["a:1", "b:2", "c.example:50061"]
        );
        assert!(parse_static("").is_err());
        assert!(parse_static("a").is_err());
        assert!(parse_static("a:0").is_err());
        assert!(parse_static("a:x").is_err());
        assert!(parse_static(":80").is_err());
        assert!(parse_static("a:1,a:1").unwrap_err().contains("twice"));
        assert!(parse_static("[::1]:50061").is_ok());
    }
}

#[cfg(test)]
mod discovery_tests {
    use std::sync::Arc;

    use cache_node::config::Config as NodeConfig;
    use clap::Parser;
    use tokio::{net::TcpListener, sync::oneshot};

    use super::*;
    use crate::metrics::ClusterMetrics;

    /// A real cache node, in this process, on an ephemeral port.
    async fn node(id: &str) -> (SocketAddr, oneshot::Sender<()>) {
        let config = NodeConfig::try_parse_from([
            "cache-node",
            "--node-id",
            id,
            "--capacity",
            "16MiB",
            "--shards",
            "2",
        ])
        .unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(cache_node::server::run(config, grpc, metrics, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    fn cluster() -> Arc<Cluster> {
        let registry = prometheus::Registry::new();
        let config = crate::config::Config::try_parse_from([
            "orchestrator",
            "--nodes-dns",
            "unused:1",
            "--max-node-in-flight",
            "16",
        ])
        .unwrap();
        Arc::new(Cluster::new(
            config.call_settings(),
            Arc::new(ClusterMetrics::new(&registry).unwrap()),
        ))
    }

    fn members(cluster: &Cluster) -> Vec<(String, String)> {
        cluster
            .topology()
            .nodes
            .iter()
            .map(|n| (n.id.to_string(), n.address.clone()))
            .collect()
    }

    #[tokio::test]
    async fn identities_come_from_the_nodes_and_survive_a_new_address() {
        let (a, _stop_a) = node("cache-0").await;
        let (b, stop_b) = node("cache-1").await;
        let cluster = cluster();
        let mut known = HashMap::new();
        discover(Ok(vec![a, b]), &cluster, &mut known)
            .await
            .unwrap();
        assert_eq!(
            members(&cluster),
            vec![
                ("cache-0".into(), a.to_string()),
                ("cache-1".into(), b.to_string())
            ]
        );
        let ring_before = cluster.topology().ring.clone();

        // cache-1 restarts elsewhere (a pod's new IP): the old address
        // vanishes from DNS, the new one answers with the same identity.
        let _ = stop_b.send(());
        let (b2, _stop_b2) = node("cache-1").await;
        discover(Ok(vec![a, b2]), &cluster, &mut known)
            .await
            .unwrap();
        assert_eq!(
            members(&cluster),
            vec![
                ("cache-0".into(), a.to_string()),
                ("cache-1".into(), b2.to_string())
            ]
        );
        // Same identities, same ring: every key keeps its owner.
        let ring_after = cluster.topology().ring.clone();
        for i in 0..1000 {
            let k = format!("k{i}");
            assert_eq!(
                ring_before.ids()[ring_before.primary(&k).unwrap()],
                ring_after.ids()[ring_after.primary(&k).unwrap()]
            );
        }

        // Scaling up is picked up; an address that does not answer yet is
        // left out until it does; a resolver error keeps the membership.
        let (c, _stop_c) = node("cache-2").await;
        let silent: SocketAddr = "127.0.0.1:1".parse().unwrap();
        discover(Ok(vec![a, b2, c, silent]), &cluster, &mut known)
            .await
            .unwrap();
        assert_eq!(members(&cluster).len(), 3);
        assert!(
            discover(Err(std::io::Error::other("dns down")), &cluster, &mut known)
                .await
                .is_err()
        );
        assert_eq!(members(&cluster).len(), 3);
    }
}
