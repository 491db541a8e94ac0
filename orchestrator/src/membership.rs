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
                if let Err(error) = resolve_once(&target, &cluster, &mut known).await {
                    tracing::warn!(%target, %error, "cannot resolve the nodes' DNS name; keeping the current membership");
                }
            }
        }
    }
}

/// One round of DNS discovery: resolve, identify new addresses, publish.
async fn resolve_once(
    target: &str,
    cluster: &Cluster,
    known: &mut HashMap<SocketAddr, NodeId>,
) -> std::io::Result<()> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target).await?.collect();
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
            Err(status) => {
                tracing::debug!(%addr, message = status.message(), "cannot identify node yet")
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
