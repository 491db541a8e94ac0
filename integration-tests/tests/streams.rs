//! Batches on `Internal/ApplyStream`: a node answers them in order on one
//! stream, ends its streams when it drains, and an orchestrator sends its
//! batches there (and by unary `Apply` when told not to).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use integration_tests::{NodeProcess, TestCluster, metric_value};
use ringcache_proto::v1::{
    ApplyStreamRequest, GetRequest, Op, SetRequest, internal_client::InternalClient, op, op_result,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn get(key: &str) -> Op {
    Op {
        op: Some(op::Op::Get(GetRequest { key: key.into() })),
    }
}

fn set(key: &str, value: &str) -> Op {
    Op {
        op: Some(op::Op::Set(SetRequest {
            key: key.into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

/// Opens an `ApplyStream` on `node`: the sending half and the answers.
async fn open(
    node: &NodeProcess,
) -> (
    mpsc::Sender<ApplyStreamRequest>,
    tonic::Streaming<ringcache_proto::v1::ApplyStreamResponse>,
) {
    let mut client = InternalClient::new(node.process.channel().await);
    let (tx, rx) = mpsc::channel(8);
    let answers = client
        .apply_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

#[tokio::test]
async fn a_node_answers_batches_on_one_stream_in_order_and_a_bad_batch_does_not_end_it() {
    let node = NodeProcess::start(&["--max-batch", "4"]).await;
    let (tx, mut answers) = open(&node).await;
    let batch = |id, ops| ApplyStreamRequest { id, ops, epoch: 7 };
    tx.send(batch(10, vec![set("a", "1"), get("a"), get("b")]))
        .await
        .unwrap();
    // Over --max-batch: refused as a whole, nothing runs.
    tx.send(batch(
        11,
        (0..5).map(|i| set(&format!("x{i}"), "v")).collect(),
    ))
    .await
    .unwrap();
    tx.send(batch(12, vec![get("a"), get("x0")])).await.unwrap();

    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.id, 10);
    assert!(first.error.is_none());
    assert_eq!(first.results.len(), 3);
    match &first.results[1].result {
        Some(op_result::Result::Get(g)) => assert!(g.found && &g.value[..] == b"1"),
        other => panic!("{other:?}"),
    }
    match &first.results[2].result {
        Some(op_result::Result::Get(g)) => assert!(!g.found),
        other => panic!("{other:?}"),
    }

    let second = answers.message().await.unwrap().unwrap();
    assert_eq!(second.id, 11);
    assert!(second.results.is_empty());
    let error = second.error.expect("a whole-batch error");
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert!(error.message.contains("--max-batch"), "{}", error.message);

    let third = answers.message().await.unwrap().unwrap();
    assert_eq!(third.id, 12);
    match (&third.results[0].result, &third.results[1].result) {
        (Some(op_result::Result::Get(a)), Some(op_result::Result::Get(x))) => {
            assert!(a.found, "the stream still works after a refused batch");
            assert!(!x.found, "the refused batch wrote nothing");
        }
        other => panic!("{other:?}"),
    }
    // The epoch travelled with the batches: the node saw exactly one.
    let page = node.process.scrape().await;
    assert_eq!(
        metric_value(&page, "ringcache_node_ring_epochs", &[]),
        Some(1.0),
        "{page}"
    );

    // Closing our side ends the node's.
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_draining_node_ends_its_streams_between_batches_and_refuses_new_ones() {
    let mut node = NodeProcess::start(&["--drain-delay", "2s"]).await;
    let (tx, mut answers) = open(&node).await;
    tx.send(ApplyStreamRequest {
        id: 1,
        ops: vec![set("k", "v")],
        epoch: 0,
    })
    .await
    .unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().id, 1);

    node.process.signal_term();
    let ended = tokio::time::timeout(Duration::from_secs(1), answers.message())
        .await
        .expect("the stream ends as the drain starts, not at its end");
    let status = ended.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");

    // During the drain delay a new stream is refused, and unary Apply
    // still works: that is where callers go.
    let mut client = InternalClient::new(node.process.channel().await);
    let (_tx, rx) = mpsc::channel::<ApplyStreamRequest>(1);
    let refused = client
        .apply_stream(ReceiverStream::new(rx))
        .await
        .expect_err("refused while draining");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let answer = client
        .apply(ringcache_proto::v1::ApplyRequest {
            ops: vec![get("k")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        &answer.results[0].result,
        Some(op_result::Result::Get(g)) if g.found
    ));
    drop((tx, _tx, answers, client));
    // Within --drain-delay + --shutdown-grace (10 s), cleanly.
    let status = node
        .process
        .wait_exit(Duration::from_secs(20))
        .expect("exits after draining");
    assert!(status.success(), "{status}");
}

/// Unary `Apply` calls a node has answered.
async fn unary_applies(node: &NodeProcess) -> f64 {
    let page = node.process.scrape().await;
    metric_value(
        &page,
        "grpc_server_handled_total",
        &["grpc_method=\"Apply\""],
    )
    .unwrap_or(0.0)
}

async fn routed_load(cluster: &TestCluster) {
    let mut c = cluster.orchestrator.cache().await;
    for i in 0..100 {
        let key = format!("k{i}");
        c.set(SetRequest {
            key: key.clone(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(c.get(GetRequest { key }).await.unwrap().into_inner().found);
    }
}

#[tokio::test]
async fn an_orchestrator_sends_its_batches_on_streams_unless_told_not_to() {
    let cluster = TestCluster::start(2, &[]).await;
    routed_load(&cluster).await;
    for node in cluster.nodes.iter().flatten() {
        assert_eq!(
            unary_applies(node).await,
            0.0,
            "every batch went on a stream"
        );
    }

    let unary = TestCluster::start(2, &["--node-streams", "false"]).await;
    routed_load(&unary).await;
    let mut total = 0.0;
    for node in unary.nodes.iter().flatten() {
        total += unary_applies(node).await;
    }
    assert!(
        total >= 200.0,
        "{total} unary Apply calls for 200 routed calls"
    );
}
