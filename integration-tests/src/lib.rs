//! A harness that runs the real ringcache binaries and the real tools
//! users drive them with.
//!
//! # Layout
//!
//! - [`binary`]: builds (once per test process) and locates `cache-node`
//!   and, later, `orchestrator`.
//! - [`Process`]: one running server on ephemeral ports of 127.0.0.1. It
//!   reads the addresses the server logs once it is serving (no port
//!   guessing, no races), keeps draining its logs, and is killed when
//!   dropped. [`Process::terminate`] sends SIGTERM for shutdown tests.
//! - [`NodeProcess`], [`OrchestratorProcess`]: the binaries with gRPC
//!   clients to them.
//! - [`TestCluster`]: cache nodes plus an orchestrator, with nodes that
//!   can be killed and restarted on their old address.
//! - [`tools`]: real `grpcurl`, installed from the Go module proxy by
//!   `scripts/install-tools.sh` on first use.
//! - [`bench`]: a closed-loop load generator and `/proc` CPU readings for
//!   the benchmarks.
//! - [`jaeger`]: a real Jaeger v2 and a reader for its query API.
//! - [`proxy`]: a TCP fault proxy that can cut the connections it carries
//!   (a partition between two processes).
//! - [`eventually`]: retries an async check until it passes or times out,
//!   instead of fixed sleeps.

#![forbid(unsafe_code)]
// A test harness: failing loudly with a message is its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use ringcache_proto::v1::{
    ListNodesRequest, NodeState, cache_client::CacheClient, cluster_client::ClusterClient,
    node_client::NodeClient,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub mod bench;
pub mod jaeger;
pub mod proxy;
pub mod tools;
pub mod zipf;

/// The workspace root (where `Cargo.toml` and `scripts/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The path of a workspace binary (`cache-node`, `orchestrator`), built
/// once per test process with the same profile as the tests.
///
/// Set `RINGCACHE_BIN_DIR` to use binaries built elsewhere (for example a
/// release build).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Ok(dir) = std::env::var("RINGCACHE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let dir = BUILT.get_or_init(|| {
        // Tests run from target/<profile>/deps/<test-binary>: build the
        // binaries with the same profile, into the same directory.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .ok_or_else(|| "cannot find the target directory".to_owned())?;
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "--bins", "--quiet", "--profile", &profile])
            .status()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build --bins failed: {status}"));
        }
        Ok(dir)
    });
    match dir {
        Ok(dir) => dir.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// A fresh directory under the system's temporary directory, named
/// `ringcache-<what>-<pid>-<nanos>` (the caller removes it).
pub fn fresh_temp_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("ringcache-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Retries `check` every 50 ms until it returns `Ok` or `timeout` passes;
/// then panics with the last error.
pub async fn eventually<T, E, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("condition not met within {timeout:?}: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Writes `entries` through `cache` by `SetMany`, `chunk` at a time, and
/// checks that every one was stored.
pub async fn store_all(
    cache: &mut CacheClient<Channel>,
    entries: impl IntoIterator<Item = ringcache_proto::v1::SetRequest>,
    chunk: usize,
) {
    let entries: Vec<_> = entries.into_iter().collect();
    for part in entries.chunks(chunk.max(1)) {
        let r = cache
            .set_many(ringcache_proto::v1::SetManyRequest {
                entries: part.to_vec(),
            })
            .await
            .expect("SetMany")
            .into_inner();
        assert!(
            r.results.iter().all(|r| r.stored && r.error.is_none()),
            "{:?}",
            r.results.iter().find(|r| !r.stored || r.error.is_some())
        );
    }
}

/// Polls `Cluster/ListNodes` until `ok` holds for the listed nodes, and
/// returns them; panics with the last list after `timeout`.
pub async fn wait_for_nodes(
    cluster: &ClusterClient<Channel>,
    timeout: Duration,
    ok: impl Fn(&[ringcache_proto::v1::NodeInfo]) -> bool,
) -> Vec<ringcache_proto::v1::NodeInfo> {
    let ok = &ok;
    eventually(timeout, || {
        let mut cluster = cluster.clone();
        async move {
            let nodes = cluster
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .nodes;
            if ok(&nodes) {
                Ok(nodes)
            } else {
                Err(format!("{nodes:?}"))
            }
        }
    })
    .await
}

/// A running server process, killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    /// The gRPC address it serves on.
    pub grpc: SocketAddr,
    /// The `/metrics` address.
    pub metrics: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `binary` with `args`, on ephemeral ports of 127.0.0.1 unless
    /// `args` set `--listen`/`--metrics-listen`, and waits until it logs
    /// that it is serving. `env` adds environment variables.
    pub fn start(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new(binary);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        cmd.args(["--log-format", "json"])
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RINGCACHE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        // For a failure's post-mortem: `RINGCACHE_TEST_LOG_DIR` keeps
        // every process's log in `<dir>/<binary>-<pid>.log`.
        let mut copy = std::env::var_os("RINGCACHE_TEST_LOG_DIR").and_then(|dir| {
            std::fs::File::create(Path::new(&dir).join(format!("{name}-{}.log", child.id()))).ok()
        });
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(file) = copy.as_mut() {
                        use std::io::Write as _;
                        let _ = writeln!(file, "{line}");
                    }
                    let serving = serving_addresses(&line);
                    // Stored before `start` returns: a caller reading the
                    // serving line from `logs()` must find it there.
                    logs.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    if let Some(addrs) = serving
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addrs);
                    }
                }
            });
        }
        let (grpc, metrics) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                let logs = logs.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                panic!("{name} did not start serving; its logs:\n{logs}");
            }
        };
        Process {
            child,
            name,
            grpc,
            metrics,
            logs,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://` URL of the gRPC address, for tonic.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The log lines written so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, …): `STOP` freezes
    /// the process with its sockets open — a node that stops answering
    /// without closing anything.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} failed");
        if name == "STOP" {
            self.wait_stopped();
        }
    }

    /// Waits until every thread of the process is stopped. `kill` returns
    /// once SIGSTOP is queued; the group stop itself happens when one thread
    /// takes the signal and stops the others, which on a loaded machine can
    /// be milliseconds later — long enough for a worker thread to answer a
    /// request the test meant to send to a frozen process.
    fn wait_stopped(&self) {
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stopped = std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the command name's closing parenthesis.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
                    })
                })
            });
            if stopped {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not stop within 10 s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself, letting
    /// the test's other tasks run meanwhile (a draining server waits for
    /// its clients, which on a test's single-threaded runtime are those
    /// tasks: [`Process::wait_exit`] would freeze them).
    pub async fn exited(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal_term();
        match self.wait_exit(timeout) {
            Some(status) => status,
            None => panic!("{} did not exit within {timeout:?} of SIGTERM", self.name),
        }
    }

    /// The process' resident memory, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmRSS:")
    }

    /// The most resident memory the process ever had (the kernel's
    /// high-water mark, `VmHWM`): a peak no sampling can miss.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmHWM:")
    }

    fn proc_status_bytes(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The `/metrics` page.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics).await
    }

    /// Waits until the process reports `ringcache.v1.Cache` SERVING.
    pub async fn wait_ready(&self) {
        let url = self.grpc_url();
        eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                match health(&url, "ringcache.v1.Cache").await {
                    Ok(ServingStatus::Serving) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }

    /// A connected gRPC channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.grpc_url())
            .expect("valid url")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Picks the `grpc` and `metrics` addresses out of the JSON line a server
/// logs once it is serving.
fn serving_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if !v.get("message")?.as_str()?.ends_with("serving") {
        return None;
    }
    let grpc = v.get("grpc")?.as_str()?.parse().ok()?;
    let metrics = v.get("metrics")?.as_str()?.parse().ok()?;
    Some((grpc, metrics))
}

/// GETs `/metrics` from `addr` (plain HTTP/1.1, no client library needed).
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "unexpected response: {response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The value of the sample `name{labels}` in a Prometheus text page; the
/// labels are matched as a substring, e.g. `grpc_method="Get"`.
pub fn metric_value(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Asks `grpc.health.v1.Health/Check` for `service` at `url`.
pub async fn health(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

/// A running `cache-node`.
#[derive(Debug)]
pub struct NodeProcess {
    /// The process.
    pub process: Process,
}

impl NodeProcess {
    /// Starts a cache node with extra `args` and waits until its
    /// `ringcache.v1.Cache` health is SERVING.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[]).await
    }

    /// As [`NodeProcess::start`], with environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let process = Process::start(&binary("cache-node"), args, env);
        process.wait_ready().await;
        NodeProcess { process }
    }

    /// A `ringcache.v1.Cache` client.
    pub async fn cache(&self) -> CacheClient<Channel> {
        CacheClient::new(self.process.channel().await)
    }

    /// A `ringcache.v1.Node` client.
    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.process.channel().await)
    }

    /// `host:port` for grpcurl.
    pub fn addr(&self) -> String {
        self.process.grpc.to_string()
    }
}

/// A running `orchestrator`.
#[derive(Debug)]
pub struct OrchestratorProcess {
    /// The process.
    pub process: Process,
}

impl OrchestratorProcess {
    /// Starts an orchestrator with `args` (which must give `--nodes` or
    /// `--nodes-dns`) and waits until its `ringcache.v1.Cache` health is
    /// SERVING.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[]).await
    }

    /// As [`OrchestratorProcess::start`], with environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let process = Process::start(&binary("orchestrator"), args, env);
        process.wait_ready().await;
        OrchestratorProcess { process }
    }

    /// A `ringcache.v1.Cache` client.
    pub async fn cache(&self) -> CacheClient<Channel> {
        CacheClient::new(self.process.channel().await)
    }

    /// A `ringcache.v1.Cluster` client.
    pub async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.process.channel().await)
    }

    /// `host:port` for grpcurl.
    pub fn addr(&self) -> String {
        self.process.grpc.to_string()
    }
}

/// Health settings that make ejection and readmission quick in tests.
pub const FAST_HEALTH: &[&str] = &[
    "--health-interval",
    "100ms",
    "--health-timeout",
    "200ms",
    "--eject-after",
    "2",
    "--eject-backoff",
    "300ms",
    "--eject-max-backoff",
    "1s",
    "--node-timeout",
    "500ms",
    "--connect-timeout",
    "300ms",
];

/// Cache nodes plus an orchestrator routing to them, as separate
/// processes.
#[derive(Debug)]
pub struct TestCluster {
    /// The nodes; `None` once stopped by [`TestCluster::kill_node`].
    pub nodes: Vec<Option<NodeProcess>>,
    /// Each node's address, fixed for the cluster's life (a restarted node
    /// comes back on the same port).
    pub node_addrs: Vec<String>,
    /// The orchestrator.
    pub orchestrator: OrchestratorProcess,
    node_args: Vec<String>,
}

impl TestCluster {
    /// Starts `n` nodes and an orchestrator over them, with
    /// `orchestrator_args` added (e.g. `--replicas 2`) and quick health
    /// checks.
    pub async fn start(n: usize, orchestrator_args: &[&str]) -> Self {
        Self::start_with(n, &[], orchestrator_args).await
    }

    /// As [`TestCluster::start`], with extra node arguments.
    pub async fn start_with(n: usize, node_args: &[&str], orchestrator_args: &[&str]) -> Self {
        Self::start_with_env(n, node_args, orchestrator_args, &[]).await
    }

    /// As [`TestCluster::start_with`], with environment variables for every
    /// process (e.g. `OTEL_*`).
    pub async fn start_with_env(
        n: usize,
        node_args: &[&str],
        orchestrator_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(Some(NodeProcess::start_with_env(node_args, env).await));
        }
        let node_addrs: Vec<String> = nodes.iter().flatten().map(NodeProcess::addr).collect();
        let orchestrator = Self::orchestrator_with_env(&node_addrs, orchestrator_args, env).await;
        TestCluster {
            nodes,
            node_addrs,
            orchestrator,
            node_args: node_args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Starts another orchestrator over `node_addrs`.
    pub async fn orchestrator_for(node_addrs: &[String], extra: &[&str]) -> OrchestratorProcess {
        Self::orchestrator_with_env(node_addrs, extra, &[]).await
    }

    /// As [`TestCluster::orchestrator_for`], with environment variables.
    pub async fn orchestrator_with_env(
        node_addrs: &[String],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> OrchestratorProcess {
        let list = node_addrs.join(",");
        let mut args = vec!["--nodes", &list];
        // The quick health settings, except where `extra` sets its own.
        for pair in FAST_HEALTH.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        args.extend_from_slice(extra);
        OrchestratorProcess::start_with_env(&args, env).await
    }

    /// Kills node `i` with SIGKILL (no drain: a crash).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// Stops node `i` as an orchestration system does: SIGTERM, then wait
    /// for it to drain and exit. Async: clients in this process keep
    /// running meanwhile (a drain waits for them to leave).
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.process.signal_term();
            let status = node.process.exited(Duration::from_secs(30)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "node {i} did not drain and exit cleanly: {status:?}"
            );
        }
    }

    /// Waits until the orchestrator reports node `i` healthy and not
    /// warming (its keys copied back after a restart or a join): what a
    /// rolling restart waits for before the next node.
    pub async fn wait_node_warm(&self, i: usize) {
        self.wait_node(i, Duration::from_secs(30), |n| {
            n.state() == NodeState::Healthy && !n.warming
        })
        .await;
    }

    /// Waits until `ok` holds for the orchestrator's report of node `i`.
    async fn wait_node(
        &self,
        i: usize,
        timeout: Duration,
        ok: impl Fn(&ringcache_proto::v1::NodeInfo) -> bool,
    ) {
        let addr = &self.node_addrs[i];
        let cluster = self.orchestrator.cluster().await;
        wait_for_nodes(&cluster, timeout, |nodes| {
            nodes.iter().find(|n| n.address == *addr).is_some_and(&ok)
        })
        .await;
    }

    /// Starts node `i` again on its old address.
    pub async fn restart_node(&mut self, i: usize) {
        let addr = self.node_addrs[i].clone();
        let mut args: Vec<&str> = vec!["--listen", &addr];
        args.extend(self.node_args.iter().map(String::as_str));
        self.nodes[i] = Some(NodeProcess::start(&args).await);
    }

    /// A client straight to node `i`.
    pub async fn node_cache(&self, i: usize) -> CacheClient<Channel> {
        self.nodes[i]
            .as_ref()
            .expect("node is running")
            .cache()
            .await
    }

    /// The index in `nodes` of `key`'s first owner, as the orchestrator
    /// locates it.
    pub async fn first_owner(&self, key: &str) -> usize {
        let address = self
            .orchestrator
            .cluster()
            .await
            .locate(ringcache_proto::v1::LocateRequest { key: key.into() })
            .await
            .expect("Locate answers")
            .into_inner()
            .owners[0]
            .address
            .clone();
        self.node_addrs
            .iter()
            .position(|a| *a == address)
            .expect("the owner is one of the cluster's nodes")
    }

    /// Waits until the orchestrator reports node `i` in `state`.
    pub async fn wait_node_state(&self, i: usize, state: NodeState) {
        self.wait_node(i, Duration::from_secs(15), |n| n.state() == state)
            .await;
    }
}
