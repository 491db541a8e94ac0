//! Who the cache nodes are: a static list, a file, or DNS discovery.
//!
//! - `--nodes host:port,…`: each entry's identity on the ring is the entry
//!   itself — or, written `id=host:port`, the id given (the node's
//!   `--node-id`, so the node keeps its keys if its address changes). The
//!   list must be the same in every orchestrator. A host name is resolved
//!   again whenever its connection is re-established.
//! - `--nodes-file PATH`: the same entries, one per line (`#` comments and
//!   blank lines ignored), read again every `--dns-interval`: edit the file
//!   (or the ConfigMap mounted as it) to add or remove nodes without a
//!   restart. A file that cannot be read or parsed keeps the current
//!   membership, with a warning.
//! - `--nodes-dns name:port`: the name is resolved every `--dns-interval`
//!   (a Kubernetes headless Service answers with one address per pod), and
//!   each address is asked for its identity (`Node/Stats` → `node_id`, the
//!   pod name in a StatefulSet). The identity, not the address, places the
//!   node on the ring, so a pod restarted with a new IP owns the same keys,
//!   and scaling the StatefulSet is picked up without a restart.
//!
//!   An address missing from one DNS answer is not dropped at once: it
//!   stays a member until it has been missing for `--dns-removal-grace`
//!   (DNS answers of a headless Service flap while pods restart; dropping
//!   a member moves its keys away and back). Every address is asked for its
//!   identity again each round, so an IP reused by another pod places that
//!   pod, not the one that had the IP before.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
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
    /// A file listing `host:port`, one per line, read periodically.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// How often to read it again.
        interval: Duration,
    },
    /// A DNS name (and port) resolved periodically.
    Dns {
        /// `name:port`.
        target: String,
        /// How often to resolve it again.
        interval: Duration,
        /// How long an address may be missing from the answers before its
        /// node leaves the membership.
        grace: Duration,
    },
}

/// Splits a static entry into its ring identity and address: `id=host:port`
/// names the identity (give it the node's `--node-id`); a bare
/// `host:port` is its own identity.
fn split_entry(entry: &str) -> (&str, &str) {
    match entry.split_once('=') {
        Some((id, address)) => (id.trim(), address.trim()),
        None => (entry, entry),
    }
}

/// Parses a `--nodes` list: comma-separated `host:port` or
/// `id=host:port`, spaces ignored.
pub fn parse_static(list: &str) -> Result<Vec<String>, String> {
    let nodes: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if nodes.is_empty() {
        return Err(
            "--nodes lists no node; expected host:port,host:port (or id=host:port)".to_owned(),
        );
    }
    for n in &nodes {
        let (id, address) = split_entry(n);
        if id.is_empty() {
            return Err(format!("{n:?} has an empty id; expected id=host:port"));
        }
        validate_host_port(address)?;
    }
    for (what, pick) in [
        ("node", (|e| split_entry(e).1) as fn(&str) -> &str),
        ("id", |e| split_entry(e).0),
    ] {
        let mut seen: Vec<&str> = nodes.iter().map(|n| pick(n)).collect();
        seen.sort_unstable();
        if let Some(twice) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("--nodes lists a {what} twice: {}", twice[0]));
        }
    }
    Ok(nodes)
}

/// Parses a `--nodes-file`: one `host:port` per line; `#` starts a
/// comment; blank lines are ignored.
pub fn parse_file(text: &str) -> Result<Vec<String>, String> {
    let entries: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    if entries.is_empty() {
        return Err("lists no node; expected one host:port per line".to_owned());
    }
    parse_static(&entries.join(","))
}

/// The members of a static list or file (entries checked by
/// [`parse_static`]).
fn members_of(nodes: Vec<String>) -> Vec<Member> {
    nodes
        .iter()
        .map(|entry| {
            let (id, address) = split_entry(entry);
            Member {
                id: NodeId::from(id),
                address: address.to_owned(),
            }
        })
        .collect()
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
        Source::Static(nodes) => cluster.set_members(members_of(nodes)),
        Source::File { path, interval } => {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A few lines of a local file: read off the async threads.
                let file = path.clone();
                let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(file))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .and_then(|text| parse_file(&text));
                match read {
                    Ok(nodes) => cluster.set_members(members_of(nodes)),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot read --nodes-file; keeping the current membership");
                    }
                }
            }
        }
        Source::Dns {
            target,
            interval,
            grace,
        } => {
            let mut known = Known::new(grace);
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

/// What discovery has learned about each address.
#[derive(Debug)]
pub struct Known {
    /// Address → its node's identity, and when DNS last listed it.
    addrs: HashMap<SocketAddr, (NodeId, Instant)>,
    /// How long an address may be missing before it is forgotten.
    grace: Duration,
}

impl Known {
    /// Nothing known yet; forget addresses missing for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            addrs: HashMap::new(),
            grace,
        }
    }
}

/// One round of discovery, given what the name resolved to: identify every
/// listed address (again: an IP may now belong to another pod), forget
/// addresses missing for longer than the grace, publish the membership.
pub async fn discover(
    resolved: std::io::Result<Vec<SocketAddr>>,
    cluster: &Cluster,
    known: &mut Known,
) -> std::io::Result<()> {
    let addrs = resolved?;
    let now = Instant::now();
    let grace = known.grace;
    known
        .addrs
        .retain(|addr, (_, seen)| addrs.contains(addr) || now.duration_since(*seen) < grace);
    let topology = cluster.topology();
    let identified = futures::future::join_all(addrs.iter().map(|addr| {
        let address = addr.to_string();
        // Ask on the node's own connections when it is a member already.
        let member = topology
            .nodes
            .iter()
            .find(|n| n.address == address)
            .cloned();
        async move {
            let id = match member {
                Some(node) => {
                    let timeout = cluster.settings().stack.node_timeout;
                    node.client
                        .transport()
                        .node_id(timeout)
                        .await
                        .map(NodeId::from)
                }
                None => identify(&address, cluster.settings()).await,
            };
            (*addr, id)
        }
    }))
    .await;
    for (addr, result) in identified {
        match result {
            Ok(id) if !id.is_empty() => {
                if let Some((old, _)) = known.addrs.get(&addr)
                    && *old != id
                {
                    tracing::info!(%addr, old = %old, new = %id, "address now answers as another node");
                }
                known.addrs.insert(addr, (id, now));
            }
            Ok(_) => tracing::debug!(%addr, "node reports no node_id"),
            // Not ready yet (a starting pod), or briefly unreachable: a
            // known address keeps its identity (and its grace) meanwhile.
            Err(reason) => {
                if let Some((_, seen)) = known.addrs.get_mut(&addr) {
                    *seen = now;
                }
                tracing::debug!(%addr, %reason, "cannot identify node");
            }
        }
    }
    // One address per identity: if two addresses claim the same id (an old
    // pod not yet gone from DNS, or within its grace), keep the one listed
    // most recently, then the lowest, deterministically.
    let mut by_id: BTreeMap<NodeId, (Instant, SocketAddr)> = BTreeMap::new();
    for (addr, (id, seen)) in &known.addrs {
        by_id
            .entry(id.clone())
            .and_modify(|best| {
                if (*seen, std::cmp::Reverse(*addr)) > (best.0, std::cmp::Reverse(best.1)) {
                    *best = (*seen, *addr);
                }
            })
            .or_insert((*seen, *addr));
    }
    cluster.set_members(
        by_id
            .into_iter()
            .map(|(id, (_, addr))| Member {
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

    #[test]
    fn static_entries_may_name_their_identity() {
        let nodes = parse_static("node-1=127.0.0.1:50061, node-2 = 127.0.0.1:50062,c:3").unwrap();
        let members = members_of(nodes);
        let pairs: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (&*m.id, m.address.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("node-1", "127.0.0.1:50061"),
                ("node-2", "127.0.0.1:50062"),
                ("c:3", "c:3")
            ]
        );
        assert!(parse_static("=a:1").unwrap_err().contains("empty id"));
        assert!(
            parse_static("x=a:1,x=b:2")
                .unwrap_err()
                .contains("id twice")
        );
        assert!(
            parse_static("x=a:1,y=a:1")
                .unwrap_err()
                .contains("node twice")
        );
        assert!(parse_static("x=a").is_err());
    }

    #[test]
    fn node_files_parse() {
        assert_eq!(
            parse_file("# the cache\na:1\n\n  b:2  # second\n").unwrap(),
            vec!["a:1", "b:2"]
        );
        assert!(parse_file("# nothing\n\n").is_err());
        assert!(parse_file("a:1\na:1\n").unwrap_err().contains("twice"));
        assert!(parse_file("a\n").is_err());
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
        node_at(id, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A real cache node, in this process, on `addr`.
    async fn node_at(id: &str, addr: SocketAddr) -> (SocketAddr, oneshot::Sender<()>) {
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
        let grpc = TcpListener::bind(addr).await.unwrap();
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
        let mut known = Known::new(Duration::from_secs(60));
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
        // A port that was just free: nothing listens there (a fixed port
        // such as 1 may be in use on a shared machine).
        let silent: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
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

    #[tokio::test]
    async fn a_missing_address_waits_out_its_grace_and_a_reused_one_is_identified_again() {
        let (a, stop_a) = node("cache-0").await;
        let (b, _stop_b) = node("cache-1").await;
        let cluster = cluster();
        let mut patient = Known::new(Duration::from_secs(60));
        discover(Ok(vec![a, b]), &cluster, &mut patient)
            .await
            .unwrap();
        // b is missing from one answer: it stays (within its grace).
        discover(Ok(vec![a]), &cluster, &mut patient).await.unwrap();
        assert_eq!(members(&cluster).len(), 2);
        // With no grace left, it goes.
        patient.grace = Duration::ZERO;
        discover(Ok(vec![a]), &cluster, &mut patient).await.unwrap();
        assert_eq!(members(&cluster), vec![("cache-0".into(), a.to_string())]);

        // a's IP (here: its port) now belongs to another node: the next
        // round places that node, not cache-0.
        let _ = stop_a.send(());
        let (a2, _stop_a2) = eventually_bind("cache-9", a).await;
        assert_eq!(a2, a);
        eventually_members(
            &cluster,
            &mut patient,
            vec![a],
            vec![("cache-9".into(), a.to_string())],
        )
        .await;
    }

    /// Starts a node on `addr` once the previous owner of the port let go.
    async fn eventually_bind(id: &str, addr: SocketAddr) -> (SocketAddr, oneshot::Sender<()>) {
        for _ in 0..100 {
            if std::net::TcpListener::bind(addr).is_ok() {
                return node_at(id, addr).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{addr} was not released");
    }

    /// Runs discovery rounds until the membership is `expected`.
    async fn eventually_members(
        cluster: &Cluster,
        known: &mut Known,
        addrs: Vec<SocketAddr>,
        expected: Vec<(String, String)>,
    ) {
        for _ in 0..100 {
            discover(Ok(addrs.clone()), cluster, known).await.unwrap();
            if members(cluster) == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(members(cluster), expected);
    }
}
