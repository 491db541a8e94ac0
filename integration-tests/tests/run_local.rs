//! `scripts/run-local.sh`, run as the README's quick start and failure
//! walk-through use it: start the cluster, stop a node, keep calling,
//! start the node again, stop everything with a signal.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{binary, eventually, health, workspace_root};
use ringcache_proto::v1::{
    GetRequest, ListNodesRequest, NodeState, SetRequest, cache_client::CacheClient,
    cluster_client::ClusterClient,
};
use tonic_health::pb::health_check_response::ServingStatus;

/// The kernel's range of local ports for outgoing connections: a port in it
/// can be taken by any connection's source port between our check and the
/// script's bind.
fn ephemeral_ports() -> std::ops::RangeInclusive<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".to_owned());
    let mut bounds = range.split_whitespace().map(|n| n.parse::<u32>().unwrap());
    let low = bounds.next().unwrap();
    let high = bounds.next().unwrap();
    low..=high
}

/// One script at a time: the tests of this file run at once, in one
/// process, and each picks its ports while the other's may not be bound
/// yet.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An offset that puts every port the script uses outside the ephemeral
/// range (where possible) and makes each of them free right now.
fn free_offset() -> u16 {
    const PORTS: [u32; 8] = [50051, 9090, 50061, 50062, 50063, 9091, 9092, 9093];
    let ephemeral = ephemeral_ports();
    let fits = |offset: u32| PORTS.iter().all(|p| p + offset <= 65_535);
    let outside = |offset: u32| PORTS.iter().all(|p| !ephemeral.contains(&(p + offset)));
    let free = |offset: u32| {
        PORTS.iter().all(|p| {
            let port = u16::try_from(p + offset).unwrap();
            TcpListener::bind(("127.0.0.1", port)).is_ok()
        })
    };
    let start = std::process::id() % 1000 * 13;
    let candidates: Vec<u32> = (0..15_000u32)
        .map(|i| (start + i * 7) % 15_000)
        .filter(|&offset| fits(offset))
        .collect();
    let offset = candidates
        .iter()
        .copied()
        .filter(|&offset| outside(offset))
        .chain(candidates.iter().copied())
        .find(|&offset| free(offset))
        .expect("no free port range for run-local.sh");
    u16::try_from(offset).unwrap()
}

/// Stops the script and shows what it and its processes printed when the
/// test fails: the script's own output is otherwise lost.
struct OnFailure {
    script: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for OnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.script.id().to_string()])
            .status();
        let _ = self.script.wait();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        files.sort();
        for file in files {
            if file.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {}", file.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn run_local(args: &[&str], offset: u16, dir: &std::path::Path) -> std::process::Output {
    Command::new(workspace_root().join("scripts/run-local.sh"))
        .args(args)
        .env("PORT_OFFSET", offset.to_string())
        .env("RUN_LOCAL_DIR", dir)
        .output()
        .unwrap()
}

async fn node_states(url: &str) -> Vec<(String, NodeState)> {
    let mut api = ClusterClient::connect(url.to_owned()).await.unwrap();
    api.list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.id.clone(), n.state()))
        .collect()
}

#[tokio::test]
async fn the_local_cluster_survives_a_node_stopping_and_takes_it_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let offset = free_offset();
    let dir = std::env::temp_dir().join(format!("ringcache-run-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin_dir = binary("orchestrator").parent().unwrap().to_path_buf();
    let script_log = std::fs::File::create(dir.join("run-local.sh.log")).unwrap();
    let script = Command::new(workspace_root().join("scripts/run-local.sh"))
        .env("PORT_OFFSET", offset.to_string())
        .env("RUN_LOCAL_DIR", &dir)
        .env("BIN_DIR", &bin_dir)
        .stdout(script_log.try_clone().unwrap())
        .stderr(script_log)
        .spawn()
        .unwrap();
    let mut guard = OnFailure {
        script,
        dir: dir.clone(),
    };
    let url = format!("http://127.0.0.1:{}", 50051 + offset);
    // Ready as the user sees it: the script says the cluster runs (every
    // process came up), and the orchestrator answers its health check.
    eventually(Duration::from_secs(60), || async {
        let said = std::fs::read_to_string(dir.join("run-local.sh.log")).unwrap_or_default();
        if !said.contains("ringcache is running") {
            return Err(format!("the script has not said it runs: {said}"));
        }
        match health(&url, "ringcache.v1.Cache").await {
            Ok(ServingStatus::Serving) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Static entries carry the nodes' ids.
    let states = node_states(&url).await;
    let ids: Vec<&str> = states.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);

    let mut cache = CacheClient::connect(url.clone()).await.unwrap();
    for i in 0..30 {
        cache
            .set(SetRequest {
                key: format!("k{i}"),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // The walk-through: stop a node, keep calling.
    let stopped = run_local(&["stop-node", "2"], offset, &dir);
    assert!(stopped.status.success(), "{stopped:?}");
    eventually(Duration::from_secs(20), || async {
        let states = node_states(&url).await;
        if states[1].1 == NodeState::Ejected {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
    assert!(
        guard.script.try_wait().unwrap().is_none(),
        "the cluster keeps running without the node"
    );
    for i in 0..30 {
        cache
            .get(GetRequest {
                key: format!("k{i}"),
            })
            .await
            .expect("calls keep answering with a node down");
    }
    let log = std::fs::read_to_string(dir.join("node-2.cmd")).unwrap();
    assert!(log.contains("--node-id"), "the node's flags are on record");

    // Start it again: it rejoins.
    let again = run_local(&["restart-node", "2"], offset, &dir);
    assert!(again.status.success(), "{again:?}");
    eventually(Duration::from_secs(20), || async {
        let states = node_states(&url).await;
        if states.iter().all(|(_, s)| *s == NodeState::Healthy) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
    let busy = run_local(&["restart-node", "2"], offset, &dir);
    assert!(
        !busy.status.success(),
        "a running node is not started twice"
    );

    // A signal stops every process, the restarted node included.
    Command::new("kill")
        .args(["-TERM", &guard.script.id().to_string()])
        .status()
        .unwrap();
    let status = guard.script.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "stopped by the signal: {status:?}"
    );
    for name in ["orchestrator", "node-1", "node-2", "node-3"] {
        let pid = std::fs::read_to_string(dir.join(format!("{name}.pid"))).unwrap();
        let pid = pid.trim();
        eventually(Duration::from_secs(15), || async {
            let alive = Command::new("kill")
                .args(["-0", pid])
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if alive {
                Err(format!("{name} ({pid}) still runs"))
            } else {
                Ok(())
            }
        })
        .await;
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A node that cannot start (its port is taken) fails the script at once,
/// loudly: a non-zero exit naming the node and quoting its log, no
/// "ringcache is running", and nothing left running — also on a second
/// run, whose earlier log lines must not count as ready.
#[tokio::test]
async fn the_local_cluster_fails_loudly_when_a_node_cannot_start() {
    let _one = ONE_AT_A_TIME.lock().await;
    let offset = free_offset();
    let dir = std::env::temp_dir().join(format!("ringcache-run-local-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin_dir = binary("orchestrator").parent().unwrap().to_path_buf();
    // Node 2's port, held by someone else.
    let taken = TcpListener::bind(("127.0.0.1", 50062 + offset)).unwrap();
    for attempt in 1..=2 {
        let out = Command::new(workspace_root().join("scripts/run-local.sh"))
            .env("PORT_OFFSET", offset.to_string())
            .env("RUN_LOCAL_DIR", &dir)
            .env("BIN_DIR", &bin_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "run {attempt} succeeded: {said}");
        assert!(
            said.contains("node-2 exited during start-up"),
            "run {attempt} does not name the node: {said}"
        );
        assert!(
            said.contains("already in use") || said.contains("Address in use"),
            "run {attempt} does not quote why: {said}"
        );
        assert!(
            !said.contains("ringcache is running"),
            "run {attempt} said it runs: {said}"
        );
        // Everything it started was stopped.
        for name in ["node-1", "node-3", "orchestrator"] {
            let Ok(pid) = std::fs::read_to_string(dir.join(format!("{name}.pid"))) else {
                continue;
            };
            let alive = Command::new("kill")
                .args(["-0", pid.trim()])
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(!alive, "run {attempt} left {name} running");
        }
    }
    drop(taken);
    std::fs::remove_dir_all(dir).ok();
}
