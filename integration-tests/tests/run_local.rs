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

/// An offset that makes every port the script uses free right now.
fn free_offset() -> u16 {
    for attempt in 0..200u32 {
        // 1000..14000: every port stays below 65536.
        let offset = 1000 + (std::process::id() % 130 * 100 + attempt * 53) % 13_000;
        let offset = u16::try_from(offset).unwrap();
        let ports = [50051u16, 9090, 50061, 50062, 50063, 9091, 9092, 9093];
        if ports
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p + offset)).is_ok())
        {
            return offset;
        }
    }
    panic!("no free port range for run-local.sh");
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
    let offset = free_offset();
    let dir = std::env::temp_dir().join(format!("ringcache-run-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin_dir = binary("orchestrator").parent().unwrap().to_path_buf();
    let mut script = Command::new(workspace_root().join("scripts/run-local.sh"))
        .env("PORT_OFFSET", offset.to_string())
        .env("RUN_LOCAL_DIR", &dir)
        .env("BIN_DIR", &bin_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{}", 50051 + offset);
    eventually(Duration::from_secs(60), || async {
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
        script.try_wait().unwrap().is_none(),
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
        .args(["-TERM", &script.id().to_string()])
        .status()
        .unwrap();
    let status = script.wait().unwrap();
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
