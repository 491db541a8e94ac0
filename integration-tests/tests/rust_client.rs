//! The Rust client (`ringcache-client`) against the real binaries: every
//! call, auto-pipelining, tokens, and its retry rule when a connection is
//! lost.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use integration_tests::{
    NodeProcess, OrchestratorProcess, TestCluster, metric_value, proxy::FaultProxy,
};
use ringcache_client::{Client, Written};
use tonic::Code;

async fn client(uri: String) -> Client {
    Client::builder(uri)
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_call_does_what_its_unary_call_does() {
    let cluster = TestCluster::start(3, &[]).await;
    let c = client(cluster.orchestrator.process.grpc_url()).await;

    assert_eq!(c.get("absent").await.unwrap(), None);
    let v1 = c.set("k", "one").await.unwrap();
    let got = c.get("k").await.unwrap().unwrap();
    assert_eq!((got.value.as_ref(), got.version), (&b"one"[..], v1));
    assert_eq!(got.ttl, None);

    // Compare-and-swap: the version read wins once.
    assert!(matches!(
        c.compare_and_swap("k", v1, "two").await.unwrap(),
        Written::Stored(v) if v > v1
    ));
    assert!(matches!(
        c.compare_and_swap("k", v1, "three").await.unwrap(),
        Written::Refused(v) if v > v1
    ));
    assert_eq!(c.get("k").await.unwrap().unwrap().value, "two");
    assert!(matches!(
        c.add("k", "x").await.unwrap(),
        Written::Refused(_)
    ));
    assert!(matches!(
        c.add("fresh", "x").await.unwrap(),
        Written::Stored(_)
    ));

    // Compare-and-delete.
    let now = c.get("k").await.unwrap().unwrap().version;
    assert!(matches!(
        c.compare_and_delete("k", now + 1).await.unwrap(),
        Written::Refused(v) if v == now
    ));
    assert!(matches!(
        c.compare_and_delete("k", now).await.unwrap(),
        Written::Stored(_)
    ));
    assert_eq!(c.get("k").await.unwrap(), None);

    assert_eq!(c.increment("n", 5).await.unwrap(), 5);
    assert_eq!(c.increment("n", -2).await.unwrap(), 3);
    c.set_with_ttl("t", "v", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let info = c.exists("t").await.unwrap().unwrap();
    assert_eq!(info.value_bytes, 1);
    assert!(info.ttl.is_some_and(|t| t <= Duration::from_secs(60)));
    assert!(c.touch("t", None).await.unwrap());
    assert_eq!(c.exists("t").await.unwrap().unwrap().ttl, None);
    assert!(!c.touch("absent", None).await.unwrap());
    assert!(c.delete("t").await.unwrap());
    assert!(!c.delete("t").await.unwrap());
    assert_eq!(c.exists("t").await.unwrap(), None);

    let versions = c
        .set_many(&[
            ("a", Bytes::from_static(b"1")),
            ("b", Bytes::from_static(b"2")),
        ])
        .await
        .unwrap();
    assert_eq!(versions.len(), 2);
    let got = c.get_many(&["a", "absent", "b"]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, "1");
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().value, "2");

    // A refusal is the unary call's, with its code and message.
    let e = c.get("").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}

/// Many concurrent calls from many tasks share a few streams: the server
/// sees pipelined ops, not unary calls.
#[tokio::test]
async fn concurrent_calls_are_pipelined() {
    let node = NodeProcess::start(&[]).await;
    let orchestrator = OrchestratorProcess::start(&["--nodes", &node.addr()]).await;
    let c = Client::builder(orchestrator.process.grpc_url())
        .pipelines(2)
        .connect()
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..50 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let key = format!("k{t}-{i}");
                c.set(&key, key.clone()).await.unwrap();
                assert_eq!(c.get(&key).await.unwrap().unwrap().value, key);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let page = orchestrator.process.scrape().await;
    let piped = metric_value(
        &page,
        "ringcache_pipeline_ops_total",
        &["grpc_method=\"Get\"", "grpc_code=\"OK\""],
    );
    assert_eq!(piped, Some(2000.0), "{page}");
    let unary = metric_value(
        &page,
        "grpc_server_handled_total",
        &["grpc_method=\"Get\"", "grpc_code=\"OK\""],
    );
    assert_eq!(unary.unwrap_or(0.0), 0.0);
    let streams = metric_value(&page, "ringcache_pipeline_streams", &[]);
    assert_eq!(streams, Some(2.0), "two pipelines, still open: {page}");
}

#[tokio::test]
async fn a_token_rides_the_streams() {
    let node = NodeProcess::start(&[]).await;
    let dir = integration_tests::fresh_temp_dir("client-tokens");
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        "read reader-0123456789abcdef\nwrite writer-0123456789abcdef\n",
    )
    .unwrap();
    let orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &node.addr(),
        "--auth-tokens",
        tokens.to_str().unwrap(),
    ])
    .await;
    let url = orchestrator.process.grpc_url();
    let anonymous = client(url.clone()).await;
    assert_eq!(
        anonymous.get("k").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let writer = Client::builder(url.clone())
        .token("writer-0123456789abcdef")
        .connect()
        .await
        .unwrap();
    writer.set("k", "v").await.unwrap();
    let reader = Client::builder(url)
        .token("reader-0123456789abcdef")
        .connect()
        .await
        .unwrap();
    assert_eq!(reader.get("k").await.unwrap().unwrap().value, "v");
    assert_eq!(
        reader.set("k", "w").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        reader.get_many(&["k"]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .value,
        "v"
    );
}

/// The connection to the orchestrator is cut while a write and a read are
/// in flight (their node hangs): the read is sent again on a new stream and
/// answered; the write may have run, so it is not, and fails UNAVAILABLE.
#[tokio::test]
async fn a_lost_connection_repeats_reads_but_not_writes() {
    let node = NodeProcess::start(&[]).await;
    let orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &node.addr(),
        "--node-timeout",
        "10s",
        "--health-timeout",
        "10s",
    ])
    .await;
    let proxy = FaultProxy::start(orchestrator.process.grpc).await;
    let c = Client::builder(format!("http://{}", proxy.addr))
        .pipelines(1)
        .timeout(Duration::from_secs(8))
        .connect()
        .await
        .unwrap();
    c.set("r", "before").await.unwrap();
    node.process.signal("STOP");
    let (w, r) = (c.clone(), c.clone());
    let write = tokio::spawn(async move { w.set("w", "v").await });
    let read = tokio::spawn(async move { r.get("r").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.restore();
    node.process.signal("CONT");
    let write = write.await.unwrap();
    assert_eq!(
        write.as_ref().map_err(ringcache_client::Error::code).err(),
        Some(Code::Unavailable),
        "{write:?}"
    );
    let read = read.await.unwrap().unwrap();
    assert_eq!(read.unwrap().value, "before");
    // The client goes on with a new stream.
    c.set("after", "v").await.unwrap();
}
