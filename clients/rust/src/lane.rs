//! One pipeline: a task that owns a `Cache/Pipeline` stream on one
//! connection, gives each call an id, sends it, and hands each answer to
//! the call with its id. The stream is opened when the first call comes
//! and opened again after it ends.

use std::{collections::HashMap, time::Duration};

use opentelemetry::propagation::Injector;
use ringcache_proto::v1::{
    PipelineRequest, PipelineResponse, cache_client::CacheClient, pipeline_request::Op,
    pipeline_response::Result as Answer,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, metadata::AsciiMetadataValue, transport::Channel};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trailer a server sets when a stream ends cleanly: the ops it did not
/// answer never ran (`ringcache_common::pipeline::NOT_RUN_TRAILER`).
const NOT_RUN_TRAILER: &str = "ringcache-unanswered-not-run";

/// Calls waiting to be sent on one lane, at most.
const QUEUE: usize = 1024;

/// What became of a call.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The server's answer (which may be an error status).
    Answer(Answer),
    /// It provably never ran: it could not be sent, or its stream ended
    /// cleanly without answering it.
    NotRun(Status),
    /// Its connection was lost before its answer: it may have run.
    Lost(Status),
    /// The server refused the stream itself (a missing token, no such
    /// method, ...): nothing ran, and sending it again would be refused
    /// too.
    Refused(Status),
}

/// Whether a stream's status refuses the stream itself, which no retry
/// changes.
fn refusal(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unauthenticated | PermissionDenied | Unimplemented | InvalidArgument | FailedPrecondition
    )
}

struct Call {
    op: Op,
    timeout: Duration,
    traceparent: String,
    tracestate: String,
    reply: oneshot::Sender<Outcome>,
}

/// A handle on one pipeline's task; the task ends when the handle is
/// dropped and the calls in flight are answered.
#[derive(Debug)]
pub(crate) struct Lane {
    calls: mpsc::Sender<Call>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("op", &self.op).finish()
    }
}

impl Lane {
    /// Starts a pipeline on `channel`, sending `metadata` (the token, a
    /// direct read's epoch) on its streams.
    pub(crate) fn spawn(
        channel: Channel,
        metadata: Vec<(&'static str, AsciiMetadataValue)>,
    ) -> Self {
        let (calls, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(channel, metadata, rx));
        Self { calls }
    }

    /// Runs `op` on this pipeline with a deadline of `timeout`.
    pub(crate) async fn call(
        &self,
        op: Op,
        timeout: Duration,
        traceparent: String,
        tracestate: String,
    ) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            op,
            timeout,
            traceparent,
            tracestate,
            reply,
        };
        if self.calls.send(call).await.is_err() {
            return Outcome::NotRun(Status::unavailable("the client's pipeline has stopped"));
        }
        answer.await.unwrap_or_else(|_| {
            Outcome::Lost(Status::unavailable(
                "the client's pipeline stopped before the answer came",
            ))
        })
    }
}

/// The lane's task: streams, one after another, until the handle is
/// dropped.
async fn run(
    channel: Channel,
    metadata: Vec<(&'static str, AsciiMetadataValue)>,
    mut calls: mpsc::Receiver<Call>,
) {
    let mut failures: u32 = 0;
    // A stream is opened for the first call waiting.
    while let Some(first) = calls.recv().await {
        let (tx, rx) = mpsc::channel::<PipelineRequest>(QUEUE);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        for (key, value) in &metadata {
            request.metadata_mut().insert(*key, value.clone());
        }
        let mut pending: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
        let mut next_id: u64 = 0;
        // Queued before the stream is open: HTTP/2 sends it with the headers.
        send(&tx, &mut pending, &mut next_id, first);
        let mut answers = match CacheClient::new(channel.clone()).pipeline(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                // Refused, or no connection (the server restarts, a bad
                // token, ...): nothing ran. Every call waiting is answered
                // so at once — each caller backs off and sends again within
                // its own deadline — rather than each waiting its turn
                // behind a backoff of this lane's.
                let outcome = |s: Status| {
                    if refusal(s.code()) {
                        Outcome::Refused(s)
                    } else {
                        Outcome::NotRun(s)
                    }
                };
                fail_all(&mut pending, outcome, &status);
                while let Ok(call) = calls.try_recv() {
                    let _ = call
                        .reply
                        .send(outcome(Status::new(status.code(), status.message())));
                }
                failures = failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(5u64 << failures.min(4))).await;
                continue;
            }
        };
        failures = 0;
        let mut open = true;
        let mut tx = Some(tx);
        loop {
            // Calls are taken only while the stream can queue them: when the
            // server holds the stream back, callers wait in `calls`.
            let room = tx.as_ref().is_some_and(|t| t.capacity() > 0);
            tokio::select! {
                call = calls.recv(), if open && room => match call {
                    Some(call) => {
                        if let Some(t) = &tx {
                            send(t, &mut pending, &mut next_id, call);
                        }
                    }
                    // The client is gone: end the stream once what was sent
                    // is answered.
                    None => {
                        open = false;
                        tx = None;
                        if pending.is_empty() {
                            return;
                        }
                    }
                },
                message = answers.message() => match message {
                    Ok(Some(PipelineResponse { id, result })) => {
                        if let Some(reply) = pending.remove(&id) {
                            let outcome = match result {
                                Some(answer) => Outcome::Answer(answer),
                                None => Outcome::Lost(Status::internal(format!("the server answered op {id} with nothing"))),
                            };
                            let _ = reply.send(outcome);
                        }
                        if !open && pending.is_empty() {
                            return;
                        }
                    }
                    Ok(None) => {
                        // Ended with OK, which the server does only once we
                        // have sent everything: nothing should be pending.
                        let status = Status::unavailable("the pipeline ended");
                        fail_all(&mut pending, Outcome::NotRun, &status);
                        break;
                    }
                    Err(status) => {
                        if status.metadata().get(NOT_RUN_TRAILER).is_some() {
                            fail_all(&mut pending, Outcome::NotRun, &status);
                        } else if refusal(status.code()) {
                            fail_all(&mut pending, Outcome::Refused, &status);
                        } else {
                            let lost = Status::unavailable(format!(
                                "the connection was lost before the answer came, so the call may have run: {}",
                                status.message()
                            ));
                            fail_all(&mut pending, Outcome::Lost, &lost);
                        }
                        break;
                    }
                },
            }
        }
        if !open {
            return;
        }
    }
}

/// Sends `call` on the stream `tx` under the next id.
fn send(
    tx: &mpsc::Sender<PipelineRequest>,
    pending: &mut HashMap<u64, oneshot::Sender<Outcome>>,
    next_id: &mut u64,
    call: Call,
) {
    *next_id = next_id.wrapping_add(1);
    let id = *next_id;
    let request = PipelineRequest {
        id,
        op: Some(call.op),
        timeout: prost_types::Duration::try_from(call.timeout).ok(),
        traceparent: call.traceparent,
        tracestate: call.tracestate,
    };
    match tx.try_send(request) {
        Ok(()) => {
            pending.insert(id, call.reply);
        }
        // The stream has ended: the op was not sent.
        Err(_) => {
            let _ = call.reply.send(Outcome::NotRun(Status::unavailable(
                "the client's pipeline ended before the op was sent",
            )));
        }
    }
}

fn fail_all(
    pending: &mut HashMap<u64, oneshot::Sender<Outcome>>,
    outcome: impl Fn(Status) -> Outcome,
    status: &Status,
) {
    for (_, reply) in pending.drain() {
        let _ = reply.send(outcome(Status::new(status.code(), status.message())));
    }
}

/// Collects W3C trace context.
#[derive(Default)]
struct Collect {
    traceparent: String,
    tracestate: String,
}

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" => self.tracestate = value,
            _ => {}
        }
    }
}

/// The `traceparent` and `tracestate` of `span` (empty when spans are not
/// exported with OpenTelemetry).
pub(crate) fn trace_context(span: &tracing::Span) -> (String, String) {
    if span.is_none() {
        return (String::new(), String::new());
    }
    let cx = span.context();
    let mut collect = Collect::default();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut collect));
    (collect.traceparent, collect.tracestate)
}
