//! `--max-connection-age`: a client that holds one HTTP/2 connection to an
//! orchestrator behind an L4 load balancer (a Kubernetes Service) moves to
//! an orchestrator added later, without a failed call.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{OrchestratorProcess, TestCluster, metric_value};
use ringcache_proto::v1::{GetRequest, SetRequest, cache_client::CacheClient};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

/// A TCP balancer as kube-proxy is for a ClusterIP Service: it picks a
/// backend per new connection (here in turn) and then only copies bytes,
/// so a client stays on one backend for as long as its connection lives.
struct L4Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl L4Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(Mutex::new(backends));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (backends, connections) = (backends.clone(), connections.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let n = connections.fetch_add(1, Ordering::SeqCst);
                    let backend = {
                        let b = backends.lock().unwrap();
                        b[n % b.len()]
                    };
                    tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        L4Balancer {
            addr,
            backends,
            connections,
            task,
        }
    }
}

impl Drop for L4Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls the orchestrator's `Cache` service has answered OK, from its
/// `/metrics`.
fn calls_served(page: &str) -> f64 {
    ["Get", "Set"]
        .iter()
        .filter_map(|m| {
            metric_value(
                page,
                "grpc_server_handled_total",
                &[
                    "grpc_service=\"ringcache.v1.Cache\"",
                    &format!("grpc_method=\"{m}\""),
                    "grpc_code=\"OK\"",
                ],
            )
        })
        .sum()
}

/// One node, an orchestrator behind the balancer with a client connected
/// through it, then a second orchestrator added to the balancer (a scale
/// out): both orchestrators started with `orchestrator_args`.
struct ScaledOut {
    cluster: TestCluster,
    second: OrchestratorProcess,
    balancer: L4Balancer,
    cache: CacheClient<Channel>,
}

async fn scaled_out(orchestrator_args: &[&str]) -> ScaledOut {
    let cluster = TestCluster::start(1, orchestrator_args).await;
    let first_addr: SocketAddr = cluster.orchestrator.addr().parse().unwrap();
    let balancer = L4Balancer::start(vec![first_addr]).await;
    // One client, one connection (tonic's Channel holds a single HTTP/2
    // connection and reconnects when the server closes it).
    let channel = Channel::from_shared(format!("http://{}", balancer.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cache = CacheClient::new(channel);
    let second = TestCluster::orchestrator_for(&cluster.node_addrs, orchestrator_args).await;
    balancer
        .backends
        .lock()
        .unwrap()
        .push(second.addr().parse().unwrap());
    ScaledOut {
        cluster,
        second,
        balancer,
        cache,
    }
}

#[tokio::test]
async fn a_client_moves_to_an_added_orchestrator_after_max_connection_age_without_a_failed_call() {
    let ScaledOut {
        cluster,
        second,
        balancer,
        mut cache,
    } = scaled_out(&["--max-connection-age", "2s"]).await;
    let first = &cluster.orchestrator;

    // Calls without pause for longer than the age (2 s, jittered down by
    // at most 10%): every one must succeed.
    let (mut ok, mut failed) = (0u64, Vec::new());
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(5) {
        i += 1;
        let key = format!("rebalance-{}", i % 100);
        let set = cache
            .set(SetRequest {
                key: key.clone(),
                value: i.to_be_bytes().to_vec().into(),
                ..Default::default()
            })
            .await;
        let get = cache.get(GetRequest { key }).await;
        for r in [set.map(|_| ()), get.map(|_| ())] {
            match r {
                Ok(()) => ok += 1,
                Err(status) => failed.push(status),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        failed.is_empty(),
        "failed calls while the connection moved: {failed:?}"
    );

    // The client's connection was closed by the first orchestrator and
    // the new one went to the second, which then served its calls.
    assert!(
        balancer.connections.load(Ordering::SeqCst) >= 2,
        "the client never reconnected"
    );
    let on_second = calls_served(&second.process.scrape().await);
    let on_first = calls_served(&first.process.scrape().await);
    assert!(
        on_second > 0.0,
        "no call reached the added orchestrator ({on_first} on the first, {ok} in all)"
    );
    assert_eq!(
        on_first + on_second,
        ok as f64,
        "every call was counted once"
    );
}

#[tokio::test]
async fn without_max_connection_age_the_client_stays_where_it_connected() {
    // The control: the same traffic, no age, no move (so the test above
    // shows what the flag does, not what the balancer does).
    let ScaledOut {
        cluster: _cluster,
        second,
        balancer,
        mut cache,
    } = scaled_out(&[]).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        cache.get(GetRequest { key: "stay".into() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(balancer.connections.load(Ordering::SeqCst), 1);
    assert_eq!(calls_served(&second.process.scrape().await), 0.0);
}
