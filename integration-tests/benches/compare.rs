//! ringcache against what teams run today: twemproxy (ketama) in front of
//! three Redis servers, driven by redis-benchmark — side by side, on this
//! machine, in one run.
//!
//! ```sh
//! scripts/bench-compare.sh                 # installs redis + nutcracker, full run
//! scripts/bench-compare.sh --seconds 20    # longer cases
//! ```
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes a smoke
//! run of a few thousand requests, so the harness cannot rot; it asserts no
//! timing. When redis-server, redis-benchmark or nutcracker are missing, the
//! peer rows are skipped with a message (scripts/bench-compare.sh installs
//! them).
//!
//! Every case runs at the same concurrency (default 50 in flight) and value
//! size (100 bytes) over a keyspace of 100k keys. ringcache's load comes from
//! this process (a closed-loop tonic client whose own CPU per call is
//! reported too); the peer's from redis-benchmark. "Server CPU per op" is the
//! user + system time of the server processes (orchestrator + nodes, or
//! nutcracker + redis) over the operations: the figure that does not depend
//! on how heavy the load generator is. Results are also written as JSON to
//! `bench-results/`.
//!
//! `--zipf S` runs the skewed-load table instead: `Get`s of keys drawn
//! from a Zipf distribution with exponent `S` over `--zipf-keys` (1M) keys,
//! through an orchestrator with hot-key relief off and one with it on (the
//! default), in front of the same three nodes; plus uniform `Get`s through
//! both, for relief's cost when nothing is hot. It reports the busiest
//! node's CPU against the mean node CPU, and the share of reads relieved.
//! `--hot-key-threshold N` is passed to both orchestrators. `--node-cpu F`
//! caps each node at F CPUs (a cgroup, v1 or v2; needs root), so that the
//! nodes, not the orchestrator, are what limits throughput — as in a
//! deployment where many orchestrators send one hot key's reads to its one
//! node. The smoke run makes a small pass of it too.
//!
//! `--tls` adds a row for the routed `Get` with TLS on every hop (client to
//! orchestrator, and mutual TLS from orchestrator to nodes; certificates
//! made here with rcgen), next to the plaintext row of the same run.
//!
//! `--node-args "…"` and `--orchestrator-args "…"` pass extra flags to
//! the nodes (the cluster's and the direct one) and the orchestrator, to
//! measure a setting.
//!
//! `--only A,B` runs only the cases whose name contains `A` or `B` (for
//! example `--only "Get (orchestrator)","twemproxy GET"`).
//!
//! `--feeds` runs the change feeds' cost table instead: two clusters side
//! by side (3 nodes, 2 orchestrators each, as the chart deploys), one with
//! feeds on (the default) and one with them off (`--change-log-bytes 0`
//! on the nodes, `--change-feeds false` on the orchestrators); routed
//! `Get` and `Set` through the first orchestrator of each, alternating
//! between the clusters, `--rounds` times (2). Server CPU counts both orchestrators (the
//! second only follows the feeds) and the nodes.
//!
//! `--baseline DIR` also routes the same load through the `orchestrator`
//! binary in `DIR` (say, a build of the previous commit), in front of the
//! same nodes, so a change to the orchestrator is measured side by side
//! with what it replaces.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use integration_tests::{
    NodeProcess, TestCluster,
    bench::{Args, LoadResult, closed_loop, cpu_of},
    workspace_root,
    zipf::Zipf,
};
use ringcache_proto::v1::{
    GetManyRequest, GetRequest, IncrementRequest, SetManyRequest, SetRequest,
    cache_client::CacheClient,
};
use tonic::transport::Channel;

struct Options {
    full: bool,
    /// `--zipf S`: the skewed-load table only.
    zipf: Option<f64>,
    zipf_keys: usize,
    hot_key_threshold: Option<String>,
    node_cpu: Option<f64>,
    tls: bool,
    baseline: Option<String>,
    seconds: u64,
    concurrency: usize,
    keys: usize,
    value: usize,
    batch: usize,
    /// `--node-args "…"`: extra arguments for every cache node.
    node_args: Vec<String>,
    /// `--orchestrator-args "…"`: extra arguments for the orchestrator.
    orchestrator_args: Vec<String>,
    /// `--only A,B`: run only the cases whose name contains one of these.
    only: Vec<String>,
    /// `--feeds`: the change feeds' cost table only.
    feeds: bool,
    /// `--rounds N`: how many times the feeds table alternates (2).
    rounds: usize,
}

impl Options {
    /// Whether the case named `case` runs (see `--only`).
    fn runs(&self, case: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| case.contains(o.as_str()))
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A flag's value split at whitespace (none if absent).
fn words(value: Option<String>) -> Vec<String> {
    value.map_or_else(Vec::new, |v| {
        v.split_whitespace().map(str::to_owned).collect()
    })
}

fn options() -> Options {
    let args = Args::from_env();
    let full = args.flag("--bench") && !args.flag("--smoke");
    let value = |name: &str| args.value::<usize>(name);
    Options {
        full,
        zipf: args.value::<f64>("--zipf"),
        zipf_keys: value("--zipf-keys").unwrap_or(if full { 1_000_000 } else { 5_000 }),
        hot_key_threshold: args.value::<String>("--hot-key-threshold"),
        node_cpu: args.value::<f64>("--node-cpu"),
        tls: args.flag("--tls") || !full,
        baseline: args.value::<String>("--baseline"),
        seconds: value("--seconds").map_or(if full { 10 } else { 1 }, |s| s as u64),
        concurrency: value("--concurrency").unwrap_or(50),
        keys: value("--keys").unwrap_or(if full { 100_000 } else { 2_000 }),
        value: value("--value-bytes").unwrap_or(100),
        batch: 100,
        node_args: words(args.value::<String>("--node-args")),
        orchestrator_args: words(args.value::<String>("--orchestrator-args")),
        feeds: args.flag("--feeds"),
        rounds: value("--rounds").unwrap_or(2),
        only: args
            .value::<String>("--only")
            .map(|o| o.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    case: String,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    server_cpu_us_per_op: f64,
    client_cpu_us_per_op: Option<f64>,
    /// For a routed case: the orchestrator's share of
    /// `server_cpu_us_per_op` (the rest is the nodes').
    orchestrator_cpu_us_per_op: Option<f64>,
    /// The peer row this one is compared with.
    peer: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn self_cpu() -> f64 {
    cpu_of(&[std::process::id()])
}

/// The key rank task `t` reads at its `i`th call in the uniform cases: a
/// walk, different per task, that spreads calls evenly over `keys`.
fn uniform_rank(t: usize, i: u64, keys: u64) -> u64 {
    (t as u64 * 7919 + i * 104_729) % keys
}

/// One uniform-case Get: task `t`'s `i`th key of `keys`, through `client`.
async fn uniform_get(mut client: CacheClient<Channel>, t: usize, i: u64, keys: u64) -> bool {
    let k = uniform_rank(t, i, keys);
    client
        .get(GetRequest {
            key: format!("key:{k}"),
        })
        .await
        .is_ok()
}

/// Writes `key:0` … `key:<keys-1>` with `value` through `client`, 500 a
/// call.
async fn preload(client: &mut CacheClient<Channel>, keys: usize, value: &bytes::Bytes) {
    for chunk in (0..keys).collect::<Vec<_>>().chunks(500) {
        let entries = chunk
            .iter()
            .map(|i| SetRequest {
                key: format!("key:{i}"),
                value: value.clone(),
                ..Default::default()
            })
            .collect();
        client.set_many(SetManyRequest { entries }).await.unwrap();
    }
}

/// Runs one ringcache case: `call` in a closed loop; `ops_per_call` is how
/// many keys one call carries (GetMany). With more than one server, the
/// first is the orchestrator, whose share is reported too. `None` when
/// `--only` leaves the case out.
async fn ringcache_case<F, Fut>(
    o: &Options,
    concurrency: usize,
    case: &str,
    peer: Option<&str>,
    servers: &[u32],
    ops_per_call: u64,
    call: F,
) -> Option<Row>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    if !o.runs(case) {
        return None;
    }
    let max_calls = if o.full { u64::MAX } else { 2_000 };
    let orchestrator = &servers[..usize::from(servers.len() > 1)];
    let (server_before, client_before) = (cpu_of(servers), self_cpu());
    let orchestrator_before = cpu_of(orchestrator);
    let r: LoadResult =
        closed_loop(concurrency, Duration::from_secs(o.seconds), max_calls, call).await;
    let server = cpu_of(servers) - server_before;
    let orchestrator_cpu = cpu_of(orchestrator) - orchestrator_before;
    let client = self_cpu() - client_before;
    assert_eq!(r.errors, 0, "{case}: {} calls failed", r.errors);
    let ops = (r.calls * ops_per_call).max(1) as f64;
    Some(Row {
        case: case.to_owned(),
        ops_per_sec: r.rate() * ops_per_call as f64,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        server_cpu_us_per_op: server * 1e6 / ops,
        client_cpu_us_per_op: Some(client * 1e6 / ops),
        orchestrator_cpu_us_per_op: (!orchestrator.is_empty())
            .then(|| orchestrator_cpu * 1e6 / ops),
        peer: peer.map(str::to_owned),
    })
}

async fn ringcache_rows(o: &Options) -> Vec<Row> {
    let node_args = strs(&o.node_args);
    let cluster = TestCluster::start_with(3, &node_args, &strs(&o.orchestrator_args)).await;
    let direct = NodeProcess::start(&node_args).await;
    let servers: Vec<u32> = std::iter::once(cluster.orchestrator.process.pid())
        .chain(cluster.nodes.iter().flatten().map(|n| n.process.pid()))
        .collect();
    let value = vec![0x5au8; o.value];
    // Preload every key, through the orchestrator and into the direct node.
    let mut via = cluster.orchestrator.cache().await;
    let mut node = direct.cache().await;
    for chunk in (0..o.keys).collect::<Vec<_>>().chunks(500) {
        let entries: Vec<SetRequest> = chunk
            .iter()
            .map(|i| SetRequest {
                key: format!("key:{i}"),
                value: value.clone().into(),
                ..Default::default()
            })
            .collect();
        via.set_many(SetManyRequest {
            entries: entries.clone(),
        })
        .await
        .unwrap();
        node.set_many(SetManyRequest { entries }).await.unwrap();
    }
    // 8 HTTP/2 connections, as a client pool would open.
    let mut orch_clients = Vec::new();
    let mut node_clients = Vec::new();
    for _ in 0..8 {
        orch_clients.push(cluster.orchestrator.cache().await);
        node_clients.push(direct.cache().await);
    }
    let keys = o.keys as u64;
    let get = |clients: Vec<CacheClient<Channel>>| {
        move |t: usize, i: u64| uniform_get(clients[t % clients.len()].clone(), t, i, keys)
    };
    let set = |clients: Vec<CacheClient<Channel>>, value: Vec<u8>| {
        let value = bytes::Bytes::from(value);
        move |t: usize, i: u64| {
            let mut c = clients[t % clients.len()].clone();
            let value = value.clone();
            async move {
                let k = uniform_rank(t, i, keys);
                c.set(SetRequest {
                    key: format!("key:{k}"),
                    value,
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        }
    };
    let increment = |clients: Vec<CacheClient<Channel>>| {
        move |t: usize, i: u64| {
            let mut c = clients[t % clients.len()].clone();
            async move {
                let k = uniform_rank(t, i, keys);
                c.increment(IncrementRequest {
                    key: format!("counter:{k}"),
                    delta: 1,
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        }
    };
    // Every call on one counter: what a hot counter costs (every increment
    // of the key is applied in turn under its shard's lock).
    let hot_increment = |clients: Vec<CacheClient<Channel>>| {
        move |t: usize, _: u64| {
            let mut c = clients[t % clients.len()].clone();
            async move {
                c.increment(IncrementRequest {
                    key: "hot".into(),
                    delta: 1,
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        }
    };
    let batch = o.batch as u64;
    let get_many = |clients: Vec<CacheClient<Channel>>| {
        move |t: usize, i: u64| {
            let mut c = clients[t % clients.len()].clone();
            async move {
                let base = uniform_rank(t, i, keys);
                let keys = (0..batch)
                    .map(|j| format!("key:{}", (base + j * 997) % keys))
                    .collect();
                c.get_many(GetManyRequest { keys }).await.is_ok()
            }
        }
    };
    let node_pid = [direct.process.pid()];
    let node_pids: Vec<u32> = servers[1..].to_vec();
    let c = o.concurrency;
    // The Rust client: 5 pipelines (one stream on its own connection each),
    // the calls in flight spread over them (50 in flight: 10 per stream).
    let piped = |url: String| async move {
        ringcache_client::Client::builder(url)
            .pipelines(5)
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap()
    };
    let orch_pipes = piped(cluster.orchestrator.process.grpc_url()).await;
    let node_pipes = piped(direct.process.grpc_url()).await;
    // Direct mode: reads straight to each key's owner, routed by the
    // orchestrator's topology; measured once it reads directly.
    let direct_mode = ringcache_client::Client::builder(cluster.orchestrator.process.grpc_url())
        .pipelines(5)
        .timeout(Duration::from_secs(5))
        .direct(true)
        .connect()
        .await
        .unwrap();
    let warm = std::time::Instant::now();
    while direct_mode.direct_stats().direct == 0 && warm.elapsed() < Duration::from_secs(20) {
        let _ = direct_mode.get("key:0").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let piped_get = |client: ringcache_client::Client| {
        move |t: usize, i: u64| {
            let client = client.clone();
            async move {
                let k = uniform_rank(t, i, keys);
                client.get(&format!("key:{k}")).await.is_ok()
            }
        }
    };
    let piped_set = |client: ringcache_client::Client, value: Vec<u8>| {
        let value = bytes::Bytes::from(value);
        move |t: usize, i: u64| {
            let client = client.clone();
            let value = value.clone();
            async move {
                let k = uniform_rank(t, i, keys);
                client.set(&format!("key:{k}"), value).await.is_ok()
            }
        }
    };
    let rows = vec![
        ringcache_case(
            o,
            c,
            "Rust client Get (orchestrator, pipelined)",
            Some("twemproxy GET"),
            &servers,
            1,
            piped_get(orch_pipes.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "Rust client Set (orchestrator, pipelined)",
            Some("twemproxy SET"),
            &servers,
            1,
            piped_set(orch_pipes.clone(), value.clone()),
        )
        .await,
        ringcache_case(
            o,
            1,
            "Rust client Get (orchestrator, pipelined, 1 in flight)",
            Some("twemproxy GET, 1 in flight"),
            &servers,
            1,
            piped_get(orch_pipes),
        )
        .await,
        ringcache_case(
            o,
            c,
            "Rust client Get (direct mode: owners read directly)",
            Some("twemproxy GET"),
            &servers,
            1,
            piped_get(direct_mode.clone()),
        )
        .await,
        ringcache_case(
            o,
            1,
            "Rust client Get (direct mode, 1 in flight)",
            Some("twemproxy GET, 1 in flight"),
            &servers,
            1,
            piped_get(direct_mode.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "Rust client Get (one node, direct, pipelined)",
            Some("twemproxy GET"),
            &node_pid,
            1,
            piped_get(node_pipes.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "Rust client Set (one node, direct, pipelined)",
            Some("twemproxy SET"),
            &node_pid,
            1,
            piped_set(node_pipes, value.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Get (orchestrator)",
            Some("twemproxy GET"),
            &servers,
            1,
            get(orch_clients.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Set (orchestrator)",
            Some("twemproxy SET"),
            &servers,
            1,
            set(orch_clients.clone(), value.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Increment (orchestrator)",
            Some("twemproxy INCR"),
            &servers,
            1,
            increment(orch_clients.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Increment, one hot key (orchestrator)",
            Some("twemproxy INCR, one hot key"),
            &servers,
            1,
            hot_increment(orch_clients.clone()),
        )
        .await,
        ringcache_case(
            o,
            1,
            "ringcache Get (orchestrator, 1 in flight)",
            Some("twemproxy GET, 1 in flight"),
            &servers,
            1,
            get(orch_clients.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Get (one node, direct)",
            Some("twemproxy GET"),
            &node_pid,
            1,
            get(node_clients.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache Set (one node, direct)",
            Some("twemproxy SET"),
            &node_pid,
            1,
            set(node_clients, value.clone()),
        )
        .await,
        ringcache_case(
            o,
            c,
            "ringcache GetMany 100 (keys/s)",
            Some("twemproxy MGET 100 (keys/s)"),
            &servers,
            batch,
            get_many(orch_clients),
        )
        .await,
    ];
    let mut rows: Vec<Row> = rows.into_iter().flatten().collect();
    // Next to the Rust client's rows, at the top.
    for (i, row) in go_client_rows(o, &cluster.orchestrator.addr(), &servers)
        .into_iter()
        .enumerate()
    {
        rows.insert((3 + i).min(rows.len()), row);
    }
    if let Some(dir) = &o.baseline {
        // The baseline orchestrator, in front of the same nodes.
        let binary = std::path::Path::new(dir).join("orchestrator");
        let nodes = cluster.node_addrs.join(",");
        let process = integration_tests::Process::start(&binary, &["--nodes", &nodes], &[]);
        let url = process.grpc_url();
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(CacheClient::connect(url.clone()).await.unwrap());
        }
        let pids: Vec<u32> = std::iter::once(process.pid())
            .chain(node_pids.iter().copied())
            .collect();
        rows.extend(
            ringcache_case(
                o,
                c,
                "baseline Get (orchestrator)",
                Some("twemproxy GET"),
                &pids,
                1,
                get(clients.clone()),
            )
            .await,
        );
        rows.extend(
            ringcache_case(
                o,
                c,
                "baseline Set (orchestrator)",
                Some("twemproxy SET"),
                &pids,
                1,
                set(clients.clone(), value),
            )
            .await,
        );
        rows.extend(
            ringcache_case(
                o,
                1,
                "baseline Get (orchestrator, 1 in flight)",
                Some("twemproxy GET, 1 in flight"),
                &pids,
                1,
                get(clients),
            )
            .await,
        );
    }
    rows
}

/// `--feeds`: routed `Get` and `Set` with the change feeds on and off, two
/// clusters side by side (see the module documentation).
async fn feeds_rows(o: &Options) -> Vec<Row> {
    struct Side {
        label: &'static str,
        _cluster: TestCluster,
        _follower: integration_tests::OrchestratorProcess,
        servers: Vec<u32>,
        clients: Vec<CacheClient<Channel>>,
    }
    let value = bytes::Bytes::from(vec![0x5au8; o.value]);
    let mut sides = Vec::new();
    for (label, node_args, orchestrator_args) in [
        ("on", &[][..], &[][..]),
        (
            "off",
            &["--change-log-bytes", "0"][..],
            &["--change-feeds", "false"][..],
        ),
    ] {
        let cluster = TestCluster::start_with(3, node_args, orchestrator_args).await;
        let follower = TestCluster::orchestrator_for(&cluster.node_addrs, orchestrator_args).await;
        preload(&mut cluster.orchestrator.cache().await, o.keys, &value).await;
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(cluster.orchestrator.cache().await);
        }
        let servers = [cluster.orchestrator.process.pid(), follower.process.pid()]
            .into_iter()
            .chain(cluster.nodes.iter().flatten().map(|n| n.process.pid()))
            .collect();
        sides.push(Side {
            label,
            _cluster: cluster,
            _follower: follower,
            servers,
            clients,
        });
    }
    let keys = o.keys as u64;
    let mut rows = Vec::new();
    for round in 1..=o.rounds {
        for op in ["Get", "Set"] {
            for side in &sides {
                let clients = side.clients.clone();
                let value = value.clone();
                let case = format!("routed {op}, feeds {} (round {round})", side.label);
                let row = if op == "Get" {
                    ringcache_case(
                        o,
                        o.concurrency,
                        &case,
                        None,
                        &side.servers,
                        1,
                        move |t, i| uniform_get(clients[t % clients.len()].clone(), t, i, keys),
                    )
                    .await
                } else {
                    ringcache_case(
                        o,
                        o.concurrency,
                        &case,
                        None,
                        &side.servers,
                        1,
                        move |t, i| {
                            let mut c = clients[t % clients.len()].clone();
                            let value = value.clone();
                            async move {
                                c.set(SetRequest {
                                    key: format!("key:{}", uniform_rank(t, i, keys)),
                                    value,
                                    ..Default::default()
                                })
                                .await
                                .is_ok()
                            }
                        },
                    )
                    .await
                };
                rows.extend(row);
            }
        }
    }
    rows
}

/// The Go client (`clients/go`, its `ringcache-load` command) making the
/// same `Get` load as the Rust client's first row, against the same
/// orchestrator: `None` (with a message) when `go` is missing.
/// The Go client's `Get` rows: pipelined (5 streams, one per connection,
/// as the Rust client's rows), unary (8 connections) and in direct mode
/// (one client, one pipeline per node, as the Rust client's direct row),
/// at the bench's concurrency and at 1 in flight.
fn go_client_rows(o: &Options, orchestrator: &str, servers: &[u32]) -> Vec<Row> {
    const PIPELINED: &[&str] = &["-pipelines=1", "-connections=5"];
    const UNARY: &[&str] = &["-unary", "-connections=8"];
    const DIRECT: &[&str] = &["-direct", "-pipelines=1", "-connections=1"];
    [
        (
            "Go client Get (orchestrator, pipelined)",
            PIPELINED,
            o.concurrency,
            "twemproxy GET",
        ),
        (
            "Go client Get (orchestrator, unary)",
            UNARY,
            o.concurrency,
            "twemproxy GET",
        ),
        (
            "Go client Get (direct mode: owners read directly)",
            DIRECT,
            o.concurrency,
            "twemproxy GET",
        ),
        (
            "Go client Get (orchestrator, pipelined, 1 in flight)",
            PIPELINED,
            1,
            "twemproxy GET, 1 in flight",
        ),
        (
            "Go client Get (orchestrator, unary, 1 in flight)",
            UNARY,
            1,
            "twemproxy GET, 1 in flight",
        ),
        (
            "Go client Get (direct mode, 1 in flight)",
            DIRECT,
            1,
            "twemproxy GET, 1 in flight",
        ),
    ]
    .into_iter()
    .filter_map(|(case, mode, concurrency, peer)| {
        go_client_row(o, orchestrator, servers, case, mode, concurrency, peer)
    })
    .collect()
}

fn go_client_row(
    o: &Options,
    orchestrator: &str,
    servers: &[u32],
    case: &str,
    mode: &[&str],
    concurrency: usize,
    peer: &str,
) -> Option<Row> {
    if !o.runs(case) {
        return None;
    }
    if !have("go") {
        eprintln!("go not found: skipping the Go client row");
        return None;
    }
    let binary =
        integration_tests::tools::go_build("clients/go", "./cmd/ringcache-load", "ringcache-load");
    let max_calls = if o.full { 0 } else { 2_000 };
    let server_before = cpu_of(servers);
    let out = Command::new(&binary)
        .args(["-target", orchestrator])
        .args(["-concurrency", &concurrency.to_string()])
        .args(mode)
        .args(["-duration", &format!("{}s", o.seconds)])
        .args(["-max-calls", &max_calls.to_string()])
        .args(["-keys", &o.keys.to_string()])
        .output()
        .expect("run ringcache-load");
    let server = cpu_of(servers) - server_before;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON line");
    let calls = v["calls"].as_f64().unwrap_or(0.0);
    assert_eq!(
        v["errors"].as_f64(),
        Some(0.0),
        "Go client calls failed: {v}"
    );
    if mode.contains(&"-direct") {
        // A direct row measures direct reads, not the fallback.
        let direct = v["direct"].as_f64().unwrap_or(0.0);
        assert!(
            direct >= 0.9 * calls,
            "{case}: only {direct} of {calls} reads went directly: {v}"
        );
    }
    Some(Row {
        case: case.to_owned(),
        ops_per_sec: v["calls_per_sec"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
        p99_us: v["p99_us"].as_f64().unwrap_or(0.0),
        server_cpu_us_per_op: server * 1e6 / calls.max(1.0),
        client_cpu_us_per_op: v["client_cpu_us_per_op"].as_f64(),
        orchestrator_cpu_us_per_op: None,
        peer: Some(peer.to_owned()),
    })
}

/// PEM files of a test CA and the certificates a TLS cluster needs.
struct TlsFiles {
    dir: std::path::PathBuf,
    ca: String,
}

impl TlsFiles {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = integration_tests::fresh_temp_dir("bench-tls");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, pem: &str| std::fs::write(dir.join(name), pem).unwrap();
        write("ca.pem", &ca);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write("cert.pem", &cert.pem());
        write("key.pem", &key.serialize_pem());
        TlsFiles { dir, ca }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The routed `Get` with TLS on every hop: three nodes requiring client
/// certificates, an orchestrator serving TLS and presenting its
/// certificate to them, 8 TLS connections from this process.
async fn tls_row(o: &Options) -> Option<Row> {
    const CASE: &str = "ringcache Get (orchestrator, TLS + mTLS to nodes)";
    if !o.runs(CASE) {
        return None;
    }
    use integration_tests::{Process, binary};
    let files = TlsFiles::new();
    let (ca, cert, key) = (
        files.path("ca.pem"),
        files.path("cert.pem"),
        files.path("key.pem"),
    );
    let node_args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    let nodes: Vec<Process> = (0..3)
        .map(|_| Process::start(&binary("cache-node"), &node_args, &[]))
        .collect();
    let list = nodes
        .iter()
        .map(|n| n.grpc.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let orchestrator = Process::start(
        &binary("orchestrator"),
        &[
            "--nodes",
            &list,
            "--node-tls-ca",
            &ca,
            "--node-tls-cert",
            &cert,
            "--node-tls-key",
            &key,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    );
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&files.ca))
        .domain_name("localhost");
    let url = format!("https://{}", orchestrator.grpc);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let channel = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(CacheClient::new(channel));
    }
    // Ready once a node answers through it; then preload.
    let mut c = clients[0].clone();
    for _ in 0..200 {
        if c.get(GetRequest { key: "k".into() }).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    preload(&mut c, o.keys, &bytes::Bytes::from(vec![0x5au8; o.value])).await;
    let servers: Vec<u32> = std::iter::once(orchestrator.pid())
        .chain(nodes.iter().map(Process::pid))
        .collect();
    let keys = o.keys as u64;
    ringcache_case(
        o,
        o.concurrency,
        CASE,
        Some("twemproxy GET"),
        &servers,
        1,
        move |t: usize, i: u64| uniform_get(clients[t % clients.len()].clone(), t, i, keys),
    )
    .await
}

/// One row of the skewed-load table.
struct SkewRow {
    case: String,
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    server_cpu_us_per_op: f64,
    /// The orchestrator's share of `server_cpu_us_per_op`.
    orchestrator_cpu_us_per_op: f64,
    /// CPU of the busiest node over the mean node CPU.
    busiest_vs_mean: f64,
    /// Reads the orchestrator answered from its near cache.
    relieved_share: f64,
}

/// Which keys a skewed-load case reads.
#[derive(Clone)]
enum Keys {
    Uniform(u64),
    Zipf(Arc<Zipf>),
}

impl Keys {
    fn key(&self, t: usize, i: u64) -> String {
        match self {
            Keys::Uniform(n) => format!("key:{}", uniform_rank(t, i, *n)),
            Keys::Zipf(z) => format!("key:{}", z.rank(t as u64, i)),
        }
    }
}

async fn relieved_reads(o: &integration_tests::OrchestratorProcess) -> f64 {
    let page = o.process.scrape().await;
    integration_tests::metric_value(&page, "ringcache_hot_key_relieved_reads_total", &[])
        .unwrap_or(0.0)
}

/// `Get`s of `keys` through `orchestrator` (unary tonic calls) in a
/// closed loop; see [`skew_run`].
async fn skew_case(
    o: &Options,
    case: String,
    orchestrator: &integration_tests::OrchestratorProcess,
    node_pids: &[u32],
    keys: Keys,
) -> SkewRow {
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(orchestrator.cache().await);
    }
    let call = move |t: usize, i: u64| {
        let mut c = clients[t % clients.len()].clone();
        let key = keys.key(t, i);
        async move { c.get(GetRequest { key }).await.is_ok() }
    };
    skew_run(o, case, orchestrator, node_pids, call).await
}

/// `Get`s of `keys` with the Rust client `client` (direct mode, with or
/// without a near cache); see [`skew_run`].
async fn skew_client_case(
    o: &Options,
    case: String,
    orchestrator: &integration_tests::OrchestratorProcess,
    node_pids: &[u32],
    client: ringcache_client::Client,
    keys: Keys,
) -> SkewRow {
    let call = move |t: usize, i: u64| {
        let client = client.clone();
        let key = keys.key(t, i);
        async move { client.get(&key).await.is_ok() }
    };
    skew_run(o, case, orchestrator, node_pids, call).await
}

/// Runs `call` in a closed loop after a warm-up long enough for hot keys
/// to be found (two windows) and caches to fill, and measures it.
async fn skew_run<F, Fut>(
    o: &Options,
    case: String,
    orchestrator: &integration_tests::OrchestratorProcess,
    node_pids: &[u32],
    call: F,
) -> SkewRow
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let warm = if o.full { 3 } else { 1 };
    let c = call.clone();
    closed_loop(
        o.concurrency,
        Duration::from_secs(warm),
        u64::MAX,
        move |t, i| c(t, i + (1 << 40)),
    )
    .await;
    let max_calls = if o.full { u64::MAX } else { 4_000 };
    let nodes_before: Vec<f64> = node_pids.iter().map(|&p| cpu_of(&[p])).collect();
    let orch_before = cpu_of(&[orchestrator.process.pid()]);
    let relieved_before = relieved_reads(orchestrator).await;
    let r = closed_loop(
        o.concurrency,
        Duration::from_secs(o.seconds),
        max_calls,
        move |t, i| call(t, i),
    )
    .await;
    assert_eq!(r.errors, 0, "{case}: {} calls failed", r.errors);
    let nodes: Vec<f64> = node_pids
        .iter()
        .zip(&nodes_before)
        .map(|(&p, b)| cpu_of(&[p]) - b)
        .collect();
    let orch = cpu_of(&[orchestrator.process.pid()]) - orch_before;
    let relieved = relieved_reads(orchestrator).await - relieved_before;
    let ops = r.calls.max(1) as f64;
    let mean = nodes.iter().sum::<f64>() / nodes.len() as f64;
    let busiest = nodes.iter().copied().fold(0.0, f64::max);
    SkewRow {
        case,
        ops_per_sec: r.rate(),
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        server_cpu_us_per_op: (orch + nodes.iter().sum::<f64>()) * 1e6 / ops,
        orchestrator_cpu_us_per_op: orch * 1e6 / ops,
        busiest_vs_mean: if mean > 0.0 { busiest / mean } else { 0.0 },
        relieved_share: relieved / ops,
    }
}

/// A CPU cap on one process, removed when dropped.
struct CpuCap(std::path::PathBuf);

impl CpuCap {
    /// Caps `pid` at `cpus` CPUs in a new cgroup (v2 if mounted at
    /// /sys/fs/cgroup or /sys/fs/cgroup/unified with the cpu controller,
    /// else v1's cpu hierarchy).
    fn new(pid: u32, cpus: f64) -> Result<Self, String> {
        let period = 100_000u64;
        let quota = ((cpus * period as f64) as u64).max(1_000);
        let name = format!("ringcache-bench-{}-{pid}", std::process::id());
        let write = |path: std::path::PathBuf, value: String| {
            std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
        };
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let controllers = std::fs::read_to_string(format!("{root}/cgroup.subtree_control"));
            if controllers.is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu")) {
                let dir = std::path::Path::new(root).join(&name);
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                write(dir.join("cpu.max"), format!("{quota} {period}"))?;
                write(dir.join("cgroup.procs"), pid.to_string())?;
                return Ok(CpuCap(dir));
            }
        }
        let dir = std::path::Path::new("/sys/fs/cgroup/cpu").join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write(dir.join("cpu.cfs_period_us"), period.to_string())?;
        write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        // Every thread of the process.
        write(dir.join("cgroup.procs"), pid.to_string())?;
        Ok(CpuCap(dir))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // The process must leave before the group can go: it is killed
        // first (the cluster drops before the caps).
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The skewed-load table: see the module documentation.
async fn skew_rows(o: &Options, s: f64) -> Vec<SkewRow> {
    let mut on_args: Vec<&str> = Vec::new();
    if let Some(t) = &o.hot_key_threshold {
        on_args.extend(["--hot-key-threshold", t.as_str()]);
    }
    let cluster = TestCluster::start(3, &on_args).await;
    let mut off_args = on_args.clone();
    off_args.extend(["--hot-key-cache-bytes", "0"]);
    let off = TestCluster::orchestrator_for(&cluster.node_addrs, &off_args).await;
    let on = &cluster.orchestrator;
    let node_pids: Vec<u32> = cluster
        .nodes
        .iter()
        .flatten()
        .map(|n| n.process.pid())
        .collect();
    let mut caps = Vec::new();
    if let Some(cpus) = o.node_cpu {
        for &pid in &node_pids {
            match CpuCap::new(pid, cpus) {
                Ok(cap) => caps.push(cap),
                Err(e) => panic!("--node-cpu: cannot cap node {pid}: {e}"),
            }
        }
        eprintln!("nodes capped at {cpus} CPU each");
    }
    let value = bytes::Bytes::from(vec![0x5au8; o.value]);
    preload(&mut on.cache().await, o.zipf_keys, &value).await;
    let zipf = Keys::Zipf(Arc::new(Zipf::new(o.zipf_keys, s)));
    let uniform = Keys::Uniform(o.zipf_keys as u64);
    let mut rows = Vec::new();
    for (case, orchestrator, keys) in [
        ("uniform Get, relief off", &off, uniform.clone()),
        ("uniform Get, relief on", on, uniform),
        (&*format!("Zipf s={s} Get, relief off"), &off, zipf.clone()),
        (&*format!("Zipf s={s} Get, relief on"), on, zipf.clone()),
    ] {
        rows.push(skew_case(o, case.to_owned(), orchestrator, &node_pids, keys).await);
    }
    // The Rust client reading the owners directly, without and with a
    // near cache (64 MiB), through the relief-off orchestrator's topology.
    for (case, near) in [
        (
            format!("Zipf s={s} Get, Rust client direct, near cache off"),
            0,
        ),
        (
            format!("Zipf s={s} Get, Rust client direct, near cache on"),
            64 << 20,
        ),
    ] {
        if !o.runs(&case) {
            continue;
        }
        let client = ringcache_client::Client::builder(off.process.grpc_url())
            .pipelines(5)
            .timeout(Duration::from_secs(5))
            .direct(true)
            .near_cache_bytes(near)
            .connect()
            .await
            .unwrap();
        let warm = std::time::Instant::now();
        while client.direct_stats().direct == 0 && warm.elapsed() < Duration::from_secs(20) {
            let _ = client.get("key:0").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rows.push(skew_client_case(o, case, &off, &node_pids, client, zipf.clone()).await);
    }
    drop(off);
    drop(cluster);
    drop(caps);
    rows
}

fn print_skew(o: &Options, rows: &[SkewRow]) {
    println!(
        "| case ({} keys) | ops/s | p50 | p99 | server CPU/op | of which orchestrator | busiest node / mean node CPU | reads relieved |",
        o.zipf_keys
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {:.1} µs | {:.2}× | {:.1}% |",
            r.case,
            r.ops_per_sec,
            r.p50_us,
            r.p99_us,
            r.server_cpu_us_per_op,
            r.orchestrator_cpu_us_per_op,
            r.busiest_vs_mean,
            r.relieved_share * 100.0
        );
    }
    for pair in rows.chunks(2) {
        if let [off, on] = pair {
            println!(
                "{} → {}: {:.2}× the throughput, {:.2}× the server CPU per Get",
                off.case,
                on.case,
                on.ops_per_sec / off.ops_per_sec,
                on.server_cpu_us_per_op / off.server_cpu_us_per_op
            );
        }
    }
}

/// A child process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn wait_port(port: u16) {
    integration_tests::eventually(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(|_| ())
    })
    .await;
}

/// redis-benchmark's CSV: the rps and the p50 and p99 latencies (ms).
fn parse_csv(out: &str) -> (f64, f64, f64) {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('"') && !l.starts_with("\"test\""))
        .unwrap_or_else(|| panic!("no result in redis-benchmark output:\n{out}"));
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|v| v.trim_matches('"').parse().unwrap_or(0.0))
        .collect();
    // rps, avg, min, p50, p95, p99, max
    (f[0], f[3], f[5])
}

async fn peer_rows(o: &Options) -> Option<Vec<Row>> {
    let missing: Vec<&str> = ["redis-server", "redis-benchmark", "nutcracker"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipping the twemproxy + Redis rows: {missing:?} not installed (scripts/bench-compare.sh installs them)"
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!("ringcache-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut servers = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", dir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        servers.push(Server(child));
        wait_port(port).await;
        lines.push(format!("   - 127.0.0.1:{port}:1"));
    }
    let proxy_port = free_port();
    let config = dir.join("nutcracker.yml");
    std::fs::write(
        &config,
        format!(
            "bench:\n  listen: 127.0.0.1:{proxy_port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  preconnect: true\n  server_connections: 1\n  servers:\n{}\n",
            lines.join("\n")
        ),
    )
    .unwrap();
    let proxy = Command::new("nutcracker")
        .args([
            "-c",
            config.to_str().unwrap(),
            "-s",
            &free_port().to_string(),
            "-a",
            "127.0.0.1",
        ])
        .args(["-o", dir.join("nutcracker.log").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nutcracker");
    let proxy = Server(proxy);
    wait_port(proxy_port).await;
    let pids: Vec<u32> = servers
        .iter()
        .map(|s| s.0.id())
        .chain([proxy.0.id()])
        .collect();

    let requests = |rate_guess: f64| -> u64 {
        if o.full {
            (rate_guess * o.seconds as f64) as u64
        } else {
            2_000
        }
    };
    let run = |args: Vec<String>| {
        let out = Command::new("redis-benchmark")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy_port.to_string(),
                "-c",
                &o.concurrency.to_string(),
            ])
            .args([
                "-d",
                &o.value.to_string(),
                "-r",
                &o.keys.to_string(),
                "--csv",
            ])
            .args(&args)
            .output()
            .expect("run redis-benchmark");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut rows = Vec::new();
    // Preload the keyspace, then measure SET and GET.
    run(vec![
        "-n".into(),
        (o.keys * 2).to_string(),
        "-t".into(),
        "set".into(),
    ]);
    // `-t` names a redis-benchmark test; otherwise the words are the
    // command (one key: no __rand_int__ to replace).
    for (case, test, rate, clients) in [
        ("twemproxy SET", "set", 60_000.0, o.concurrency),
        ("twemproxy GET", "get", 60_000.0, o.concurrency),
        ("twemproxy INCR", "incr", 60_000.0, o.concurrency),
        (
            "twemproxy INCR, one hot key",
            "INCR hot",
            60_000.0,
            o.concurrency,
        ),
        ("twemproxy GET, 1 in flight", "get", 8_000.0, 1),
    ] {
        if !o.runs(case) {
            continue;
        }
        let before = cpu_of(&pids);
        let n = requests(rate);
        let mut args = vec![
            "-n".into(),
            n.to_string(),
            // A later -c wins over the default set above.
            "-c".into(),
            clients.to_string(),
        ];
        if test.contains(' ') {
            args.extend(test.split(' ').map(str::to_owned));
        } else {
            args.extend(["-t".to_owned(), test.to_owned()]);
        }
        let (rps, p50, p99) = parse_csv(&run(args));
        let cpu = cpu_of(&pids) - before;
        rows.push(Row {
            case: case.into(),
            ops_per_sec: rps,
            p50_us: p50 * 1000.0,
            p99_us: p99 * 1000.0,
            server_cpu_us_per_op: cpu * 1e6 / n as f64,
            client_cpu_us_per_op: None,
            orchestrator_cpu_us_per_op: None,
            peer: None,
        });
    }
    // MGET of 100 random keys per call.
    if !o.runs("twemproxy MGET 100 (keys/s)") {
        return Some(rows);
    }
    let n = requests(2_000.0);
    let mut args = vec!["-n".into(), n.to_string(), "MGET".into()];
    args.extend((0..o.batch).map(|_| "key:__rand_int__".to_owned()));
    let before = cpu_of(&pids);
    let (rps, p50, p99) = parse_csv(&run(args));
    let cpu = cpu_of(&pids) - before;
    rows.push(Row {
        case: "twemproxy MGET 100 (keys/s)".into(),
        ops_per_sec: rps * o.batch as f64,
        p50_us: p50 * 1000.0,
        p99_us: p99 * 1000.0,
        server_cpu_us_per_op: cpu * 1e6 / (n as f64 * o.batch as f64),
        client_cpu_us_per_op: None,
        orchestrator_cpu_us_per_op: None,
        peer: None,
    });
    drop(proxy);
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    Some(rows)
}

#[tokio::main]
async fn main() {
    let o = options();
    if o.feeds {
        eprintln!(
            "change feeds on vs off: {}s per case, {} in flight",
            o.seconds, o.concurrency
        );
        let rows = feeds_rows(&o).await;
        print_table(&rows, &[]);
        return;
    }
    if let Some(s) = o.zipf.filter(|_| o.full) {
        eprintln!(
            "skewed load: Zipf s={s} over {} keys, {}s per case, {} in flight",
            o.zipf_keys, o.seconds, o.concurrency
        );
        let rows = skew_rows(&o, s).await;
        print_skew(&o, &rows);
        return;
    }
    eprintln!(
        "{} run: {}s per case, {} in flight, {}-byte values, {} keys",
        if o.full { "full" } else { "smoke" },
        o.seconds,
        o.concurrency,
        o.value,
        o.keys
    );
    if !o.full {
        // The smoke run keeps the skewed-load harness working too.
        print_skew(&o, &skew_rows(&o, o.zipf.unwrap_or(1.1)).await);
    }
    let mut rows = ringcache_rows(&o).await;
    if o.tls {
        // Right after the plaintext Get rows it is compared with.
        if let Some(tls) = tls_row(&o).await {
            rows.insert(2.min(rows.len()), tls);
        }
    }
    let peers = peer_rows(&o).await.unwrap_or_default();
    rows.extend(peers.iter().cloned());
    print_table(&rows, &peers);
    write_json(&o, &rows);
}

/// Prints `rows` as a Markdown table, with ratios to their `peers` rows.
fn print_table(rows: &[Row], peers: &[Row]) {
    println!(
        "| case | ops/s | p50 | p99 | server CPU/op | of which orchestrator | client CPU/op | ops/s vs peer | server CPU/op vs peer |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let peer = r
            .peer
            .as_ref()
            .and_then(|p| peers.iter().find(|x| &x.case == p));
        let (ratio_ops, ratio_cpu) = match peer {
            Some(p) => (
                format!("{:.2}× ({})", r.ops_per_sec / p.ops_per_sec, p.case),
                format!("{:.2}×", r.server_cpu_us_per_op / p.server_cpu_us_per_op),
            ),
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {} | {:.0} | {:.0} µs | {:.0} µs | {:.1} µs | {} | {} | {} | {} |",
            r.case,
            r.ops_per_sec,
            r.p50_us,
            r.p99_us,
            r.server_cpu_us_per_op,
            r.orchestrator_cpu_us_per_op
                .map_or("—".into(), |c| format!("{c:.1} µs")),
            r.client_cpu_us_per_op
                .map_or("—".into(), |c| format!("{c:.1} µs")),
            ratio_ops,
            ratio_cpu
        );
    }
}

/// Writes `rows` to `bench-results/` as JSON.
fn write_json(o: &Options, rows: &[Row]) {
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "case": r.case, "ops_per_sec": r.ops_per_sec, "p50_us": r.p50_us, "p99_us": r.p99_us,
                "server_cpu_us_per_op": r.server_cpu_us_per_op, "client_cpu_us_per_op": r.client_cpu_us_per_op,
                "orchestrator_cpu_us_per_op": r.orchestrator_cpu_us_per_op,
                "peer": r.peer,
            })
        })
        .collect();
    let dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let path = dir.join(format!(
        "compare-{}-{stamp}.json",
        if o.full { "full" } else { "smoke" }
    ));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({
            "concurrency": o.concurrency, "value_bytes": o.value, "keys": o.keys, "seconds_per_case": o.seconds, "rows": json,
        }))
        .unwrap(),
    )
    .unwrap();
    eprintln!("results written to {}", path.display());
}
