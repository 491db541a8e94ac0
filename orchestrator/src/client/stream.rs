//! Batches to a node on one long-lived `Internal/ApplyStream` per
//! connection.
//!
//! A unary `Apply` pays for a new HTTP/2 stream, a header block each way
//! and trailers — on both the orchestrator and the node — every time a
//! batch goes out. On an `ApplyStream` a batch is one DATA frame each way:
//! the caller's task encodes its batch and hands it to the stream, and one
//! reader task per stream hands each answer to the caller waiting for its
//! id.
//!
//! How a call ends, and what it tells the caller:
//!
//! - answered: the batch's results, or its whole-batch error as unary
//!   `Apply` would have failed ([`CallError::Refused`]);
//! - the node ended the stream with a status (it drains, it does not
//!   implement the method, it has too many streams open): the node ends
//!   streams only between batches, so a batch without an answer was not
//!   run — [`Ended::NotRun`], and the transport sends it again by unary
//!   `Apply`;
//! - the stream or its connection broke: the batch may have run —
//!   [`CallError::Lost`] (or [`CallError::NotSent`] if the node refused the
//!   stream before reading it).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use parking_lot::Mutex;
use prost::Message;
use ringcache_proto::v1::{ApplyStreamResponse, Op};
use tokio::sync::oneshot;

use super::{
    CallError,
    transport::{grpc_request, stream_failure},
};

const APPLY_STREAM: &str = "/ringcache.v1.Internal/ApplyStream";

/// Why a batch got no answer on the stream.
#[derive(Debug, Clone)]
pub enum Ended {
    /// The node ended the stream with a status before reading the batch:
    /// it was not run; send it by unary `Apply`.
    NotRun(tonic::Status),
    /// The call failed; the error says whether the batch may have run.
    Failed(CallError),
}

type Answer = Result<ApplyStreamResponse, Ended>;

/// Callers waiting for answers, by batch id.
#[derive(Debug, Default)]
struct Waiting {
    calls: HashMap<u64, oneshot::Sender<Answer>>,
    /// Set when the stream ended: what later callers get.
    ended: Option<Ended>,
}

impl Waiting {
    /// Ends the stream: every waiting caller, and every later one, gets
    /// `why`.
    fn end(&mut self, why: Ended) {
        for (_, tx) in self.calls.drain() {
            let _ = tx.send(Err(why.clone()));
        }
        self.ended = Some(why);
    }
}

/// One open `ApplyStream`.
#[derive(Debug)]
pub struct BatchStream {
    /// The number of the connection it runs on.
    connection: u64,
    send: Arc<Mutex<SendStream<Bytes>>>,
    waiting: Arc<Mutex<Waiting>>,
    next_id: AtomicU64,
    max_message: usize,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.reader.abort();
        // Ends our side: the node's stream ends and frees its permit.
        self.send.lock().send_reset(h2::Reason::CANCEL);
    }
}

/// Removes a caller's entry when it stops waiting (its deadline passed),
/// so a late answer is dropped rather than kept.
struct Unregister<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.waiting.lock().calls.remove(&self.id);
    }
}

impl BatchStream {
    /// Opens a stream on `sender` (connection number `connection`) and
    /// spawns its reader. Fails as [`CallError::NotSent`].
    pub async fn open(
        sender: SendRequest<Bytes>,
        connection: u64,
        authority: &http::uri::Authority,
        max_message: usize,
    ) -> Result<Arc<Self>, CallError> {
        let (mut sender, request) = grpc_request(sender, authority, APPLY_STREAM).await?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|e| CallError::NotSent(format!("the connection is closed ({e})")))?;
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let send = Arc::new(Mutex::new(send));
        let reader = tokio::spawn(read_answers(
            response,
            send.clone(),
            waiting.clone(),
            max_message,
        ));
        Ok(Arc::new(Self {
            connection,
            send,
            waiting,
            next_id: AtomicU64::new(1),
            max_message,
            reader,
        }))
    }

    /// The number of the connection it runs on.
    pub fn connection(&self) -> u64 {
        self.connection
    }

    /// How it ended, if it did.
    pub fn ended(&self) -> Option<Ended> {
        self.waiting.lock().ended.clone()
    }

    /// Sends one batch and waits for its answer.
    pub async fn call(&self, ops: &[Op], epoch: u64) -> Answer {
        use prost::encoding::{message, uint64};
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // An `ApplyStreamRequest`, encoded from the borrowed ops (the
        // caller keeps them, to send by unary `Apply` if need be).
        let len = uint64::encoded_len(1, &id)
            + message::encoded_len_repeated(2, ops)
            + if epoch == 0 {
                0
            } else {
                uint64::encoded_len(3, &epoch)
            };
        if len > self.max_message {
            return Err(Ended::Failed(CallError::Refused(
                ringcache_common::exhausted::too_large(
                    format!(
                        "request of {len} bytes is over the {}-byte limit (--max-message-bytes)",
                        self.max_message
                    ),
                    self.max_message,
                ),
            )));
        }
        let mut body = BytesMut::with_capacity(5 + len);
        body.put_u8(0);
        body.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        uint64::encode(1, &id, &mut body);
        message::encode_repeated(2, ops, &mut body);
        if epoch != 0 {
            uint64::encode(3, &epoch, &mut body);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock();
            if let Some(why) = &waiting.ended {
                return Err(why.clone());
            }
            waiting.calls.insert(id, tx);
        }
        let _unregister = Unregister {
            waiting: &self.waiting,
            id,
        };
        // Queued on the stream (h2 writes it from the connection's task);
        // the number of batches in flight per node is bounded above.
        if let Err(e) = self.send.lock().send_data(body.freeze(), false) {
            return Err(Ended::Failed(CallError::NotSent(format!(
                "the stream is closed ({e})"
            ))));
        }
        rx.await.unwrap_or_else(|_| {
            Err(Ended::Failed(CallError::Lost(
                "the stream's reader stopped".to_owned(),
            )))
        })
    }
}

/// The stream's reader: hands each answer to its caller, then ends the
/// stream with how it ended, and closes our side (a draining node waits
/// for its streams to close).
async fn read_answers(
    response: h2::client::ResponseFuture,
    send: Arc<Mutex<SendStream<Bytes>>>,
    waiting: Arc<Mutex<Waiting>>,
    max_message: usize,
) {
    let why = read(response, &waiting, max_message).await;
    waiting.lock().end(why);
    send.lock().send_reset(h2::Reason::CANCEL);
}

async fn read(
    response: h2::client::ResponseFuture,
    waiting: &Mutex<Waiting>,
    max_message: usize,
) -> Ended {
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return Ended::Failed(stream_failure(e)),
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Ended::NotRun(tonic::Status::unknown(format!(
            "the node answered HTTP {}",
            parts.status
        )));
    }
    // A trailers-only answer: refused before any batch was read.
    if let Some(status) = tonic::Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        return Ended::NotRun(status);
    }
    let mut buf = BytesMut::new();
    if let Err(why) = read_messages(&mut body, &mut buf, waiting, max_message).await {
        return why;
    }
    match body.trailers().await {
        Ok(Some(trailers)) => Ended::NotRun(
            tonic::Status::from_header_map(&trailers)
                .unwrap_or_else(|| tonic::Status::unknown("the stream ended without a status")),
        ),
        Ok(None) => Ended::Failed(CallError::Lost(
            "the stream ended without a grpc-status".to_owned(),
        )),
        Err(e) => Ended::Failed(stream_failure(e)),
    }
}

/// Reads length-prefixed answers until the node's side ends.
async fn read_messages(
    body: &mut RecvStream,
    buf: &mut BytesMut,
    waiting: &Mutex<Waiting>,
    max_message: usize,
) -> Result<(), Ended> {
    let malformed = |why: String| Ended::Failed(CallError::Lost(why));
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| Ended::Failed(stream_failure(e)))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let (compressed, len) = (buf[0], u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]));
            let len = len as usize;
            if compressed != 0 || len > max_message {
                return Err(malformed(format!(
                    "the node's answer is malformed (compressed flag {compressed}, length {len}, limit {max_message})"
                )));
            }
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let message = buf.split_to(len).freeze();
            let answer = ApplyStreamResponse::decode(message)
                .map_err(|e| malformed(format!("cannot decode the node's answer: {e}")))?;
            let caller = waiting.lock().calls.remove(&answer.id);
            if let Some(tx) = caller {
                let _ = tx.send(Ok(answer));
            }
        }
    }
    Ok(())
}
