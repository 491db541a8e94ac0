//! The coalescer over a `tower_test` mock node stack.

use std::time::Duration;

use ringcache_proto::v1::{GetRequest, GetResponse, SetRequest, SetResponse, op_result};
use tower::util::BoxCloneSyncService;
use tower_test::mock;

use super::*;

const LIMITS: BatchLimits = BatchLimits {
    max_ops: 100,
    max_bytes: 1 << 20,
    max_queue_ops: 8,
    max_queue_bytes: 1 << 20,
    max_in_flight: 1,
};

fn coalescer(limits: BatchLimits) -> (Arc<Coalescer>, mock::Handle<NodeCall, NodeReply>) {
    let (service, handle) = mock::pair::<NodeCall, NodeReply>();
    let service = tower::ServiceExt::map_err(service, |e: tower::BoxError| {
        match e.downcast::<CallError>() {
            Ok(e) => *e,
            Err(e) => CallError::Lost(e.to_string()),
        }
    });
    let stack: NodeStack = BoxCloneSyncService::new(service);
    (Coalescer::new(stack, limits), handle)
}

fn get(key: &str) -> Op {
    Op {
        op: Some(op::Op::Get(GetRequest { key: key.into() })),
    }
}

fn set(key: &str) -> Op {
    Op {
        op: Some(op::Op::Set(SetRequest {
            key: key.into(),
            value: key.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

fn key_of(op: &Op) -> &str {
    match &op.op {
        Some(op::Op::Get(g)) => &g.key,
        Some(op::Op::Set(s)) => &s.key,
        _ => "",
    }
}

/// What a node would answer: a get finds its key as its value; a set is
/// stored with version 1.
fn answer(ops: &[Op]) -> NodeReply {
    ops.iter()
        .map(|op| OpResult {
            result: Some(match &op.op {
                Some(op::Op::Get(g)) => op_result::Result::Get(GetResponse {
                    found: true,
                    value: g.key.clone().into_bytes().into(),
                    version: 1,
                    ttl: None,
                }),
                _ => op_result::Result::Set(SetResponse {
                    stored: true,
                    version: 1,
                    missed: Vec::new(),
                }),
            }),
        })
        .collect()
}

fn value(r: &OpResult) -> &[u8] {
    match &r.result {
        Some(op_result::Result::Get(g)) => &g.value,
        other => panic!("not a get answer: {other:?}"),
    }
}

/// Lets spawned callers run until they are queued.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn an_idle_node_gets_each_request_at_once_on_its_own() {
    let (c, mut handle) = coalescer(LIMITS);
    for key in ["a", "b"] {
        let caller = {
            let c = c.clone();
            tokio::spawn(async move { c.call(vec![get(key)], None).await })
        };
        let (call, reply) = handle.next_request().await.unwrap();
        assert_eq!(call.ops.len(), 1);
        reply.send_response(answer(&call.ops));
        let got = caller.await.unwrap().unwrap();
        assert_eq!(value(&got[0]), key.as_bytes());
    }
    assert_eq!(c.queued(), 0);
}

#[tokio::test]
async fn requests_that_arrive_while_the_node_is_busy_travel_together() {
    let (c, mut handle) = coalescer(LIMITS);
    let spawn = |ops: Vec<Op>| {
        let c = c.clone();
        tokio::spawn(async move { c.call(ops, None).await })
    };
    let first = spawn(vec![get("first")]);
    let (call, first_reply) = handle.next_request().await.unwrap();
    assert_eq!(call.ops.len(), 1);

    // While that call is in flight, three callers queue: a get, a set, and
    // a two-key batch.
    let a = spawn(vec![get("a")]);
    settle().await;
    let b = spawn(vec![set("b")]);
    settle().await;
    let many = spawn(vec![get("m1"), get("m2")]);
    settle().await;
    assert_eq!(c.queued(), 4);
    first_reply.send_response(answer(&call.ops));
    first.await.unwrap().unwrap();

    // They go out as one call, in arrival order.
    let (batch, reply) = handle.next_request().await.unwrap();
    let keys: Vec<&str> = batch.ops.iter().map(key_of).collect();
    assert_eq!(keys, ["a", "b", "m1", "m2"]);
    reply.send_response(answer(&batch.ops));

    // Each caller gets its own answers.
    assert_eq!(value(&a.await.unwrap().unwrap()[0]), b"a");
    let b = b.await.unwrap().unwrap();
    assert!(matches!(
        b[0].result,
        Some(op_result::Result::Set(SetResponse { stored: true, .. }))
    ));
    let many = many.await.unwrap().unwrap();
    assert_eq!((value(&many[0]), value(&many[1])), (&b"m1"[..], &b"m2"[..]));
    assert_eq!(c.queued(), 0);
}

#[tokio::test]
async fn identical_queued_gets_are_sent_once() {
    let (c, mut handle) = coalescer(LIMITS);
    let spawn = |key: &'static str| {
        let c = c.clone();
        tokio::spawn(async move { c.call(vec![get(key)], None).await })
    };
    let first = spawn("busy");
    let (call, first_reply) = handle.next_request().await.unwrap();
    let callers: Vec<_> = ["hot", "hot", "other", "hot"]
        .into_iter()
        .map(|k| {
            let caller = spawn(k);
            (k, caller)
        })
        .collect();
    settle().await;
    first_reply.send_response(answer(&call.ops));
    first.await.unwrap().unwrap();

    let (batch, reply) = handle.next_request().await.unwrap();
    let keys: Vec<&str> = batch.ops.iter().map(key_of).collect();
    assert_eq!(keys, ["hot", "other"]);
    reply.send_response(answer(&batch.ops));
    for (key, caller) in callers {
        assert_eq!(value(&caller.await.unwrap().unwrap()[0]), key.as_bytes());
    }
}

#[tokio::test]
async fn a_full_queue_sheds_at_once() {
    let (c, mut handle) = coalescer(BatchLimits {
        max_queue_ops: 3,
        ..LIMITS
    });
    let spawn = |ops: Vec<Op>| {
        let c = c.clone();
        tokio::spawn(async move { c.call(ops, None).await })
    };
    let _first = spawn(vec![get("first")]);
    let _in_flight = handle.next_request().await.unwrap();
    let _queued = spawn(vec![get("a"), get("b")]);
    settle().await;
    let error = c.call(vec![get("c"), get("d")], None).await.unwrap_err();
    match &error {
        CallError::Shed(message) => assert!(message.contains("--node-queue"), "{message}"),
        other => panic!("not shed: {other:?}"),
    }
    assert!(!error.may_have_applied());
    // One more op still fits.
    let fits = spawn(vec![get("e")]);
    settle().await;
    assert!(!fits.is_finished());
    assert_eq!(c.queued(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_caller_whose_deadline_passes_while_queued_is_answered_and_not_sent() {
    let (c, mut handle) = coalescer(LIMITS);
    let spawn = |key: &'static str, deadline: Option<Instant>| {
        let c = c.clone();
        tokio::spawn(async move { c.call(vec![get(key)], deadline).await })
    };
    let first = spawn("first", None);
    let (call, first_reply) = handle.next_request().await.unwrap();
    let hurried = spawn("hurried", Some(Instant::now() + Duration::from_millis(50)));
    let patient = spawn("patient", None);
    settle().await;
    // The hurried caller's deadline passes while the node is busy.
    let error = hurried.await.unwrap().unwrap_err();
    assert!(matches!(error, CallError::CallerDeadline), "{error:?}");

    first_reply.send_response(answer(&call.ops));
    first.await.unwrap().unwrap();
    let (batch, reply) = handle.next_request().await.unwrap();
    let keys: Vec<&str> = batch.ops.iter().map(key_of).collect();
    assert_eq!(keys, ["patient"], "the abandoned request is not sent");
    reply.send_response(answer(&batch.ops));
    patient.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_batch_fails_each_of_its_callers() {
    let (c, mut handle) = coalescer(LIMITS);
    let spawn = |key: &'static str| {
        let c = c.clone();
        tokio::spawn(async move { c.call(vec![get(key)], None).await })
    };
    let first = spawn("first");
    let (call, first_reply) = handle.next_request().await.unwrap();
    let a = spawn("a");
    let b = spawn("b");
    settle().await;
    first_reply.send_response(answer(&call.ops));
    first.await.unwrap().unwrap();
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_error(CallError::Lost("connection reset".into()));
    for caller in [a, b] {
        let error = caller.await.unwrap().unwrap_err();
        assert!(matches!(error, CallError::Lost(_)), "{error:?}");
    }
}

#[tokio::test]
async fn answers_that_did_not_fit_are_asked_for_again() {
    let (c, mut handle) = coalescer(LIMITS);
    let spawn = |ops: Vec<Op>| {
        let c = c.clone();
        tokio::spawn(async move { c.call(ops, None).await })
    };
    // Alone: the node answers 2 of 3, then the last one.
    let alone = spawn(vec![get("a"), get("b"), get("c")]);
    let (call, reply) = handle.next_request().await.unwrap();
    reply.send_response(answer(&call.ops[..2]));
    let (call, reply) = handle.next_request().await.unwrap();
    assert_eq!(call.ops.iter().map(key_of).collect::<Vec<_>>(), ["c"]);
    reply.send_response(answer(&call.ops));
    let got = alone.await.unwrap().unwrap();
    assert_eq!(
        got.iter().map(value).collect::<Vec<_>>(),
        [b"a", b"b", b"c"]
    );

    // In a batch: the node stops inside the second caller's ops; the rest
    // of them, and the third caller's, go out next.
    let first = spawn(vec![get("first")]);
    let (call, first_reply) = handle.next_request().await.unwrap();
    let x = spawn(vec![get("x")]);
    settle().await;
    let y = spawn(vec![get("y1"), get("y2")]);
    settle().await;
    let z = spawn(vec![get("z")]);
    settle().await;
    first_reply.send_response(answer(&call.ops));
    first.await.unwrap().unwrap();
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch.ops.len(), 4);
    reply.send_response(answer(&batch.ops[..2]));
    assert_eq!(value(&x.await.unwrap().unwrap()[0]), b"x");
    let (batch, reply) = handle.next_request().await.unwrap();
    let keys: Vec<&str> = batch.ops.iter().map(key_of).collect();
    assert_eq!(keys, ["y2", "z"]);
    reply.send_response(answer(&batch.ops));
    let y = y.await.unwrap().unwrap();
    assert_eq!((value(&y[0]), value(&y[1])), (&b"y1"[..], &b"y2"[..]));
    assert_eq!(value(&z.await.unwrap().unwrap()[0]), b"z");
}

#[tokio::test]
async fn a_caller_that_goes_away_mid_call_does_not_strand_the_queue() {
    let (c, mut handle) = coalescer(LIMITS);
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.call(vec![get("first")], None).await })
    };
    let (_call, _reply) = handle.next_request().await.unwrap();
    let queued = {
        let c = c.clone();
        tokio::spawn(async move { c.call(vec![get("queued")], None).await })
    };
    settle().await;
    // The caller holding the only slot is cancelled: its slot passes to the
    // queue.
    first.abort();
    let _ = first.await;
    let (batch, reply) = handle.next_request().await.unwrap();
    assert_eq!(batch.ops.iter().map(key_of).collect::<Vec<_>>(), ["queued"]);
    reply.send_response(answer(&batch.ops));
    assert_eq!(value(&queued.await.unwrap().unwrap()[0]), b"queued");
}
