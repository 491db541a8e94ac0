//! The real `cache-node` binary, through real grpcurl — the way users
//! first meet it — including every grpcurl example in the README.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::{Engine, prelude::BASE64_STANDARD};
use integration_tests::{
    NodeProcess, TestCluster, metric_value,
    tools::{grpcurl, tool},
    workspace_root,
};

#[tokio::test]
async fn list_and_describe_show_the_services_and_their_comments() {
    let node = NodeProcess::start(&[]).await;
    let addr = node.addr();
    let list = grpcurl(&["-plaintext", &addr, "list"], None);
    assert!(list.success, "{}", list.stderr);
    let services: Vec<&str> = list.stdout.lines().collect();
    for s in [
        "grpc.health.v1.Health",
        "ringcache.v1.Cache",
        "ringcache.v1.Node",
    ] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert!(
        !services.contains(&"ringcache.v1.Cluster"),
        "only served services are listed"
    );

    let describe = grpcurl(
        &["-plaintext", &addr, "describe", "ringcache.v1.Cache"],
        None,
    );
    assert!(describe.success, "{}", describe.stderr);
    assert!(describe.stdout.contains("rpc GetMany"));
    assert!(
        describe.stdout.contains("// Get reads one key."),
        "{}",
        describe.stdout
    );

    let describe = grpcurl(
        &["-plaintext", &addr, "describe", "ringcache.v1.SetRequest"],
        None,
    );
    assert!(
        describe.stdout.contains("compare-and-set"),
        "{}",
        describe.stdout
    );
    assert!(
        describe.stdout.contains("--max-value-bytes"),
        "{}",
        describe.stdout
    );
}

#[tokio::test]
async fn set_get_delete_round_trip_with_json() {
    let node = NodeProcess::start(&[]).await;
    let addr = node.addr();
    let value = BASE64_STANDARD.encode(b"hello, ringcache");
    let set = grpcurl(
        &[
            "-plaintext",
            "-d",
            &format!(r#"{{"key":"greeting","value":"{value}","ttl":"60s"}}"#),
            &addr,
            "ringcache.v1.Cache/Set",
        ],
        None,
    );
    assert!(set.success, "{}", set.stderr);
    let set = set.json();
    assert_eq!(set["stored"], true);
    let version = set["version"]
        .as_str()
        .expect("uint64 is a JSON string")
        .to_owned();

    let get = grpcurl(
        &[
            "-plaintext",
            "-d",
            r#"{"key":"greeting"}"#,
            &addr,
            "ringcache.v1.Cache/Get",
        ],
        None,
    )
    .json();
    assert_eq!(get["found"], true);
    assert_eq!(get["version"], version.as_str());
    let bytes = BASE64_STANDARD
        .decode(get["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, b"hello, ringcache");
    let ttl = get["ttl"].as_str().unwrap();
    assert!(
        ttl.ends_with('s') && ttl.trim_end_matches('s').parse::<f64>().unwrap() <= 60.0,
        "{ttl}"
    );

    // Conditional writes through JSON: a stale version is not stored.
    let stale = grpcurl(
        &[
            "-plaintext",
            "-d",
            r#"{"key":"greeting","value":"eA==","ifVersion":"1"}"#,
            &addr,
            "ringcache.v1.Cache/Set",
        ],
        None,
    );
    assert!(stale.success, "{}", stale.stderr);
    assert_eq!(stale.json()["version"], version.as_str());

    let del = grpcurl(
        &[
            "-plaintext",
            "-d",
            r#"{"key":"greeting"}"#,
            &addr,
            "ringcache.v1.Cache/Delete",
        ],
        None,
    )
    .json();
    assert_eq!(del["deleted"], true);

    // A missing key answers found: false (grpcurl omits defaults unless asked).
    let miss = grpcurl(
        &[
            "-plaintext",
            "-emit-defaults",
            "-d",
            r#"{"key":"greeting"}"#,
            &addr,
            "ringcache.v1.Cache/Get",
        ],
        None,
    )
    .json();
    assert_eq!(miss["found"], false);

    let page = node.process.scrape().await;
    assert_eq!(
        metric_value(
            &page,
            "grpc_server_handled_total",
            &["grpc_method=\"Set\"", "grpc_code=\"OK\""]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn oversized_value_answers_invalid_argument() {
    let node = NodeProcess::start(&["--max-value-bytes", "64KiB"]).await;
    let addr = node.addr();
    let big = BASE64_STANDARD.encode(vec![7u8; 64 * 1024 + 1]);
    let body = format!(r#"{{"key":"big","value":"{big}"}}"#);
    let out = grpcurl(
        &["-plaintext", "-d", "@", &addr, "ringcache.v1.Cache/Set"],
        Some(&body),
    );
    assert!(!out.success);
    assert!(
        out.stderr.contains("Code: InvalidArgument"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("value is 65537 bytes, over the 65536-byte limit (--max-value-bytes)"),
        "{}",
        out.stderr
    );
    // Nothing was stored, and the node still serves.
    let get = grpcurl(
        &[
            "-plaintext",
            "-emit-defaults",
            "-d",
            r#"{"key":"big"}"#,
            &addr,
            "ringcache.v1.Cache/Get",
        ],
        None,
    );
    assert!(get.success);
    assert_eq!(get.json()["found"], false);
}

#[tokio::test]
async fn health_check_answers_serving() {
    let node = NodeProcess::start(&[]).await;
    let addr = node.addr();
    for service in ["", "ringcache.v1.Cache"] {
        let out = grpcurl(
            &[
                "-plaintext",
                "-d",
                &format!(r#"{{"service":"{service}"}}"#),
                &addr,
                "grpc.health.v1.Health/Check",
            ],
            None,
        );
        assert!(out.success, "{}", out.stderr);
        assert_eq!(out.json()["status"], "SERVING");
    }
}

/// Runs the grpcurl commands of the README block between
/// `<!-- {marker}:start -->` and `<!-- {marker}:end -->` as pasted, with
/// `placeholder` (`localhost:50051`) replaced by the real address.
///
/// A command may end in `# fails: Code` to say it is meant to be refused
/// with that status.
fn run_readme_block(marker: &str, placeholder: &str, addr: &str) {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let section = readme
        .split(&format!("<!-- {marker}:start -->"))
        .nth(1)
        .and_then(|s| s.split(&format!("<!-- {marker}:end -->")).next())
        .unwrap_or_else(|| panic!("README has no {marker} block"));
    let commands: Vec<&str> = section
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("grpcurl "))
        .collect();
    assert!(commands.len() >= 5, "too few examples found: {commands:?}");

    let bin_dir = tool("grpcurl").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for command in commands {
        let (command, expect_failure) = match command.split_once("# fails:") {
            Some((c, code)) => (c.trim(), Some(code.trim())),
            None => (command, None),
        };
        assert!(
            command.contains(placeholder),
            "`{command}` does not use {placeholder}"
        );
        let command = command.replace(placeholder, addr);
        let out = std::process::Command::new("bash")
            .args(["-o", "pipefail", "-c", &command])
            .env("PATH", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match expect_failure {
            None => assert!(out.status.success(), "`{command}` failed:\n{stderr}"),
            Some(code) => {
                assert!(!out.status.success(), "`{command}` should fail with {code}");
                assert!(
                    stderr.contains(&format!("Code: {code}")),
                    "`{command}`:\n{stderr}"
                );
            }
        }
    }
}

#[tokio::test]
async fn readme_node_examples_work_as_pasted() {
    let node = NodeProcess::start(&[]).await;
    run_readme_block("grpcurl-node-examples", "localhost:50061", &node.addr());
}

#[tokio::test]
async fn readme_cluster_examples_work_as_pasted() {
    let cluster = TestCluster::start(3, &[]).await;
    run_readme_block(
        "grpcurl-examples",
        "localhost:50051",
        &cluster.orchestrator.addr(),
    );
    // The examples' keys really were spread by the orchestrator.
    let nodes_with_keys = {
        let mut n = 0;
        for node in cluster.nodes.iter().flatten() {
            let stats = node
                .node()
                .await
                .stats(ringcache_proto::v1::StatsRequest {})
                .await
                .unwrap()
                .into_inner();
            if stats.total.unwrap().items > 0 {
                n += 1;
            }
        }
        n
    };
    assert!(
        nodes_with_keys >= 2,
        "keys landed on {nodes_with_keys} node(s)"
    );
}
