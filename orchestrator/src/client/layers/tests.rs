//! Each layer alone, over a `tower_test` mock, with paused time.

use std::sync::atomic::{AtomicU32, Ordering};

use prometheus::{HistogramOpts, IntCounter};
use ringcache_proto::v1::{GetRequest, Op, OpResult, op};
use tower::{ServiceExt, util::MapErr};
use tower_test::mock;

use super::*;

type Mock = MapErr<mock::Mock<NodeCall, NodeReply>, fn(tower::BoxError) -> CallError>;

/// A mock inner service that fails with the `CallError` it is given.
fn mock() -> (Mock, mock::Handle<NodeCall, NodeReply>) {
    let (service, handle) = mock::pair::<NodeCall, NodeReply>();
    let unbox: fn(tower::BoxError) -> CallError = |e| match e.downcast::<CallError>() {
        Ok(e) => *e,
        Err(e) => CallError::Lost(e.to_string()),
    };
    (service.map_err(unbox), handle)
}

fn get(key: &str) -> NodeCall {
    NodeCall {
        ops: vec![Op {
            op: Some(op::Op::Get(GetRequest { key: key.into() })),
        }],
        ..Default::default()
    }
}

fn answer() -> NodeReply {
    vec![OpResult::default()]
}

#[tokio::test(start_paused = true)]
async fn timeout_blames_the_node_only_for_its_own_timeout() {
    let (inner, mut handle) = mock();
    let service = TimeoutLayer::new(Duration::from_secs(1)).layer(inner);

    // The node never answers: --node-timeout fires.
    let call = tokio::spawn(service.clone().oneshot(get("a")));
    let _pending = handle.next_request().await.unwrap();
    let error = call.await.unwrap().unwrap_err();
    assert!(
        matches!(error, CallError::NodeTimeout(d) if d == Duration::from_secs(1)),
        "{error:?}"
    );
    assert!(error.is_node_fault());

    // The caller's deadline is shorter: it fires, and it is not the node's
    // fault.
    let mut tight = get("b");
    tight.deadline = Some(Instant::now() + Duration::from_millis(100));
    let call = tokio::spawn(service.clone().oneshot(tight));
    let _pending = handle.next_request().await.unwrap();
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, CallError::CallerDeadline), "{error:?}");
    assert!(!error.is_node_fault());

    // A deadline already past: refused without calling the node.
    let mut late = get("c");
    late.deadline = Some(Instant::now());
    let error = service.clone().oneshot(late).await.unwrap_err();
    assert!(matches!(error, CallError::CallerDeadline));

    // An answer in time passes through.
    let call = tokio::spawn(service.oneshot(get("d")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(answer());
    assert_eq!(call.await.unwrap().unwrap().len(), 1);
}

#[tokio::test]
async fn shed_refuses_beyond_the_limit_at_once_and_recovers() {
    let (inner, mut handle) = mock();
    let layer = ShedLayer::new(1, "cache-0");
    let service = layer.layer(inner);
    handle.allow(10);

    let first = tokio::spawn(service.clone().oneshot(get("a")));
    let (_, reply) = handle.next_request().await.unwrap();
    // The second is refused while the first is in flight.
    let error = service.clone().oneshot(get("b")).await.unwrap_err();
    match &error {
        CallError::Shed(message) => assert!(
            message.contains("node cache-0 already has 1 calls in flight")
                && message.contains("--max-node-in-flight"),
            "{message}"
        ),
        other => panic!("not shed: {other:?}"),
    }
    assert!(!error.is_node_fault() && !error.may_have_applied());
    reply.send_response(answer());
    first.await.unwrap().unwrap();

    // The permit came back.
    let third = tokio::spawn(service.oneshot(get("c")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(answer());
    third.await.unwrap().unwrap();
}

/// Counts what the health layer reports.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU32,
    failed: AtomicU32,
    inconclusive: AtomicU32,
}

impl HealthRecorder for Counts {
    fn call_succeeded(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }
    fn call_failed(&self, _: &CallError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    fn call_inconclusive(self: Arc<Self>) {
        self.inconclusive.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn health_counts_only_failures_that_blame_the_node() {
    let counts = Arc::new(Counts::default());
    let (inner, mut handle) = mock();
    let service = HealthLayer::new(counts.clone()).layer(inner);
    handle.allow(10);
    let outcomes: Vec<Result<NodeReply, CallError>> = vec![
        Ok(answer()),
        Err(CallError::NodeTimeout(Duration::from_secs(1))),
        Err(CallError::NotSent("connection refused".into())),
        Err(CallError::CallerDeadline),
        Err(CallError::Shed("full".into())),
        Err(CallError::Refused(tonic::Status::invalid_argument(
            "bad key",
        ))),
        Err(CallError::Refused(tonic::Status::internal("broken"))),
    ];
    for outcome in outcomes {
        let call = tokio::spawn(service.clone().oneshot(get("a")));
        let (_, reply) = handle.next_request().await.unwrap();
        match outcome {
            Ok(r) => reply.send_response(r),
            Err(e) => reply.send_error(e),
        }
        let _ = call.await.unwrap();
    }
    assert_eq!(
        counts.failed.load(Ordering::Relaxed),
        3,
        "timeout, not sent, internal"
    );
    assert_eq!(
        counts.ok.load(Ordering::Relaxed),
        2,
        "an answer, a refusal by the node"
    );
    assert_eq!(
        counts.inconclusive.load(Ordering::Relaxed),
        1,
        "the caller's deadline says nothing about the node"
    );

    // A call dropped before its outcome (the caller went away) is
    // inconclusive too, never a success.
    let abandoned = tokio::spawn(service.clone().oneshot(get("b")));
    let _pending = handle.next_request().await.unwrap();
    abandoned.abort();
    let _ = abandoned.await;
    assert_eq!(counts.inconclusive.load(Ordering::Relaxed), 2);
    assert_eq!(counts.ok.load(Ordering::Relaxed), 2);
}

/// A hung node behind callers with short deadlines: every call is cut by
/// the caller's deadline (below `--node-timeout`). None of them may count
/// as a success that would wipe out the failures of active checks.
#[tokio::test(start_paused = true)]
async fn a_caller_deadline_never_resets_the_failure_count() {
    let counts = Arc::new(Counts::default());
    let (inner, mut handle) = mock();
    let service = HealthLayer::new(counts.clone())
        .layer(TimeoutLayer::new(Duration::from_secs(1)).layer(inner));
    handle.allow(100);
    for i in 0..20 {
        let mut call = get(&format!("k{i}"));
        call.deadline = Some(Instant::now() + Duration::from_millis(150));
        let call = tokio::spawn(service.clone().oneshot(call));
        // The node never answers.
        let _held = handle.next_request().await.unwrap();
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, CallError::CallerDeadline), "{err:?}");
    }
    assert_eq!(counts.ok.load(Ordering::Relaxed), 0);
    assert_eq!(counts.failed.load(Ordering::Relaxed), 0);
    assert_eq!(counts.inconclusive.load(Ordering::Relaxed), 20);
}

fn call_metrics() -> CallMetrics {
    CallMetrics {
        calls: Arc::new(std::array::from_fn(|i| {
            IntCounter::new(format!("calls_{i}"), "calls").unwrap()
        })),
        latency: Histogram::with_opts(HistogramOpts::new("latency", "latency")).unwrap(),
        ops: Histogram::with_opts(HistogramOpts::new("ops", "ops")).unwrap(),
    }
}

#[tokio::test]
async fn metrics_count_every_outcome_and_calls_whose_caller_left() {
    let metrics = call_metrics();
    let (inner, mut handle) = mock();
    let service = MetricsLayer::new(metrics.clone()).layer(inner);
    handle.allow(10);

    let call = tokio::spawn(service.clone().oneshot(get("a")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(answer());
    call.await.unwrap().unwrap();

    let call = tokio::spawn(service.clone().oneshot(get("b")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_error(CallError::NodeTimeout(Duration::from_secs(1)));
    call.await.unwrap().unwrap_err();

    // The caller goes away before the node answers.
    let abandoned = service.clone().oneshot(get("c"));
    let abandoned = tokio::spawn(abandoned);
    let _pending = handle.next_request().await.unwrap();
    abandoned.abort();
    let _ = abandoned.await;

    let count = |code: Code| metrics.calls[code as usize].get();
    assert_eq!(count(Code::Ok), 1);
    assert_eq!(count(Code::DeadlineExceeded), 1);
    assert_eq!(count(Code::Cancelled), 1);
    assert_eq!(metrics.latency.get_sample_count(), 3);
    assert_eq!(metrics.ops.get_sample_sum(), 3.0);
}

#[tokio::test]
async fn trace_passes_calls_without_a_sampled_parent_through_untouched() {
    let (inner, mut handle) = mock();
    let service = TraceLayer::new("cache-0", "127.0.0.1:1").layer(inner);
    let mut call = get("a");
    call.parent = Some(tracing::Span::none());
    let call = tokio::spawn(service.oneshot(call));
    let (seen, reply) = handle.next_request().await.unwrap();
    assert!(
        seen.trace.is_none(),
        "no context is sent for an unsampled call"
    );
    reply.send_response(answer());
    call.await.unwrap().unwrap();
}
