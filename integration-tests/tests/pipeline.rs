//! `ringcache.v1.Cache/Pipeline` on the real binaries: grpcurl streaming
//! JSON ops, token roles per op, a client that never reads its answers, a
//! stream of garbage, and a drain with ops in flight.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use integration_tests::{NodeProcess, OrchestratorProcess, tools::grpcurl};
use prost::Message;
use ringcache_proto::v1::{
    GetRequest, PipelineRequest, PipelineResponse, SetRequest, cache_client::CacheClient,
    pipeline_request::Op, pipeline_response::Result as Answer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::MetadataValue,
    transport::Channel,
};

fn get(id: u64, key: &str) -> PipelineRequest {
    PipelineRequest {
        id,
        op: Some(Op::Get(GetRequest { key: key.into() })),
        ..Default::default()
    }
}

fn set(id: u64, key: &str, value: Bytes) -> PipelineRequest {
    PipelineRequest {
        id,
        op: Some(Op::Set(SetRequest {
            key: key.into(),
            value,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Opens a pipeline on `channel`, with `token` if given.
async fn open(
    channel: Channel,
    token: Option<&str>,
) -> Result<
    (
        mpsc::Sender<PipelineRequest>,
        tonic::Streaming<PipelineResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(4096);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        let value: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    let answers = CacheClient::new(channel)
        .pipeline(request)
        .await?
        .into_inner();
    Ok((tx, answers))
}

async fn next(answers: &mut tonic::Streaming<PipelineResponse>) -> PipelineResponse {
    tokio::time::timeout(Duration::from_secs(20), answers.message())
        .await
        .expect("an answer within 20 s")
        .expect("the stream goes on")
        .expect("the stream has not ended")
}

fn error_code(a: &PipelineResponse) -> Option<Code> {
    match &a.result {
        Some(Answer::Error(e)) => Some(Code::from_i32(e.code)),
        _ => None,
    }
}

/// The README's example: grpcurl streams JSON ops from stdin, through the
/// orchestrator and on a node directly.
#[tokio::test]
async fn grpcurl_sends_a_pipeline_of_json_ops() {
    let node = NodeProcess::start(&[]).await;
    let orchestrator = OrchestratorProcess::start(&["--nodes", &node.addr()]).await;
    let ops = [
        r#"{"id": 1, "set": {"key": "greeting", "value": "aGVsbG8="}}"#,
        r#"{"id": 2, "get": {"key": "greeting"}}"#,
        r#"{"id": 3, "increment": {"key": "visits", "delta": 1}}"#,
        r#"{"id": 4, "delete": {"key": "greeting"}}"#,
        r#"{"id": 5, "get": {"key": "greeting"}, "timeout": "0.2s"}"#,
        r#"{"id": 6}"#,
    ]
    .join("\n");
    for addr in [orchestrator.addr(), node.addr()] {
        let out = grpcurl(
            &[
                "-plaintext",
                "-d",
                "@",
                &addr,
                "ringcache.v1.Cache/Pipeline",
            ],
            Some(&ops),
        );
        assert!(out.success, "{}\n{}", out.stdout, out.stderr);
        let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out.stdout)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let by_id = |id: &str| {
            answers
                .iter()
                .find(|a| a["id"] == id)
                .unwrap_or_else(|| panic!("no answer for {id}: {}", out.stdout))
        };
        assert_eq!(answers.len(), 6, "{}", out.stdout);
        assert_eq!(by_id("1")["set"]["stored"], true);
        // Ops on one key run in the order sent.
        assert_eq!(by_id("2")["get"]["value"], "aGVsbG8=", "{}", out.stdout);
        assert!(by_id("3")["increment"]["value"].is_string());
        assert_eq!(by_id("4")["delete"]["deleted"], true);
        assert!(
            by_id("5")["get"].get("found").is_none(),
            "deleted: {}",
            out.stdout
        );
        assert_eq!(by_id("6")["error"]["code"], 3, "an op without a body");
    }
}

const READ: &str = "read-token-0123456789";
const WRITE: &str = "write-token-0123456789";

/// The stream opens with any data token; each op needs its unary call's
/// role.
#[tokio::test]
async fn each_op_needs_the_role_of_its_unary_call() {
    let node = NodeProcess::start(&[]).await;
    let dir = integration_tests::fresh_temp_dir("pipeline-tokens");
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("read {READ}\nwrite {WRITE}\n")).unwrap();
    let orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &node.addr(),
        "--auth-tokens",
        tokens.to_str().unwrap(),
    ])
    .await;
    let channel = orchestrator.process.channel().await;

    let refused = open(channel.clone(), None).await.err();
    assert_eq!(refused.map(|s| s.code()), Some(Code::Unauthenticated));

    let (tx, mut answers) = open(channel.clone(), Some(WRITE)).await.unwrap();
    tx.send(set(1, "k", Bytes::from_static(b"v")))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut answers).await.result,
        Some(Answer::Set(_))
    ));

    let (tx, mut answers) = open(channel, Some(READ)).await.unwrap();
    tx.send(set(1, "k", Bytes::from_static(b"other")))
        .await
        .unwrap();
    let a = next(&mut answers).await;
    assert_eq!(error_code(&a), Some(Code::PermissionDenied), "{a:?}");
    // The refusal ends nothing: the reader goes on reading.
    tx.send(get(2, "k")).await.unwrap();
    match next(&mut answers).await.result {
        Some(Answer::Get(g)) => assert_eq!(g.value, "v", "the refused write did not run"),
        other => panic!("{other:?}"),
    }
}

/// A client that sends large reads and never reads their answers is held
/// back by flow control: the orchestrator's memory stays bounded, other
/// clients are served, and every op it read is answered once the client
/// reads.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_does_not_grow_the_server() {
    const VALUE: usize = 1 << 20;
    const OPS: u64 = 600;
    let node = NodeProcess::start(&[]).await;
    let orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &node.addr(),
        "--pipeline-depth",
        "16",
        "--max-in-flight-bytes",
        "96MiB",
    ])
    .await;
    let mut cache = orchestrator.cache().await;
    cache
        .set(SetRequest {
            key: "big".into(),
            value: vec![7u8; VALUE].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = orchestrator.process.rss_bytes();

    let (tx, mut answers) = open(orchestrator.process.channel().await, None)
        .await
        .unwrap();
    // 600 MiB of answers asked for; the sender is never blocked by us, the
    // stream by the server.
    for id in 0..OPS {
        tx.send(get(id, "big")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = orchestrator.process.peak_rss_bytes();
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 200 << 20,
        "the orchestrator grew by {} MiB for a client that does not read",
        grown >> 20
    );
    // Others are served meanwhile, on another connection.
    let mut other = CacheClient::new(orchestrator.process.channel().await);
    other
        .set(SetRequest {
            key: "small".into(),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .unwrap();

    // Every op is answered once the client reads: the value, or a refusal
    // by the byte budget.
    let mut found = 0;
    for _ in 0..OPS {
        let a = next(&mut answers).await;
        match a.result {
            Some(Answer::Get(g)) => {
                assert_eq!(g.value.len(), VALUE);
                found += 1;
            }
            Some(Answer::Error(e)) => assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(found > 0);
}

/// Raw bytes as gRPC messages, to send what no generated client would.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// A message that is not a `PipelineRequest` ends the stream with
/// INVALID_ARGUMENT once the ops before it are answered; the server goes
/// on serving.
#[tokio::test]
async fn garbage_on_the_stream_ends_it_with_a_clear_status() {
    let node = NodeProcess::start(&[]).await;
    for server in ["node", "orchestrator"] {
        let orchestrator;
        let channel = if server == "node" {
            node.process.channel().await
        } else {
            orchestrator = OrchestratorProcess::start(&["--nodes", &node.addr()]).await;
            orchestrator.process.channel().await
        };
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let messages = vec![
            get(1, "k").encode_to_vec(),
            // Field 1 as a length-delimited field that runs past the end.
            vec![0x0a, 0xff, 0xff, 0x03, 0x01],
            get(2, "k").encode_to_vec(),
        ];
        let path = http::uri::PathAndQuery::from_static("/ringcache.v1.Cache/Pipeline");
        let mut answers = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(messages)),
                path,
                RawCodec,
            )
            .await
            .unwrap()
            .into_inner();
        let first = answers.message().await.unwrap().unwrap();
        assert_eq!(PipelineResponse::decode(first.as_slice()).unwrap().id, 1);
        let end = answers.message().await.err().unwrap();
        assert_eq!(end.code(), Code::InvalidArgument, "{server}: {end:?}");
        assert!(end.message().contains("not run"), "{end:?}");
        // Still serving.
        let (tx, mut answers) = open(channel, None).await.unwrap();
        tx.send(get(3, "k")).await.unwrap();
        assert_eq!(next(&mut answers).await.id, 3, "{server}");
    }
}

/// SIGTERM with ops in flight: each op read is answered, then the stream
/// ends with UNAVAILABLE.
#[tokio::test]
async fn a_draining_orchestrator_answers_every_op_it_read() {
    let node = NodeProcess::start(&[]).await;
    let mut orchestrator = OrchestratorProcess::start(&[
        "--nodes",
        &node.addr(),
        "--node-timeout",
        "10s",
        "--health-timeout",
        "10s",
        "--shutdown-grace",
        "20s",
    ])
    .await;
    let (tx, mut answers) = open(orchestrator.process.channel().await, None)
        .await
        .unwrap();
    // The node hangs: the ops stay in flight.
    node.process.signal("STOP");
    for id in 0..20 {
        tx.send(get(id, &format!("k{id}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    orchestrator.process.signal_term();
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.process.signal("CONT");
    let mut ids: Vec<u64> = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), answers.message())
            .await
            .unwrap()
        {
            Ok(Some(a)) => {
                assert!(matches!(a.result, Some(Answer::Get(_))), "{a:?}");
                ids.push(a.id);
            }
            Ok(None) => panic!("ended with OK"),
            Err(status) => break status,
        }
    };
    ids.sort_unstable();
    assert_eq!(ids, (0..20).collect::<Vec<u64>>());
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    orchestrator.process.wait_exit(Duration::from_secs(20));
}

/// A stream ends at --max-connection-age like its connection: its ops are
/// answered, and the client can open a new one.
#[tokio::test]
async fn a_stream_ends_cleanly_at_the_max_connection_age() {
    let node = NodeProcess::start(&[]).await;
    let orchestrator =
        OrchestratorProcess::start(&["--nodes", &node.addr(), "--max-connection-age", "1s"]).await;
    let (tx, mut answers) = open(orchestrator.process.channel().await, None)
        .await
        .unwrap();
    let mut id = 0;
    let opened = std::time::Instant::now();
    let end = loop {
        id += 1;
        if tx.send(get(id, "k")).await.is_err() {
            // The stream ended: its status follows.
            break answers.message().await.expect_err("an error status");
        }
        match tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .unwrap()
        {
            Ok(Some(a)) => assert_eq!(a.id, id),
            Ok(None) => panic!("ended with OK"),
            Err(status) => break status,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("max-connection-age"), "{end:?}");
    eprintln!("ended after {:?}, {id} ops", opened.elapsed());
    let (tx, mut answers) = open(orchestrator.process.channel().await, None)
        .await
        .unwrap();
    tx.send(get(1, "k")).await.unwrap();
    assert_eq!(next(&mut answers).await.id, 1);
}
