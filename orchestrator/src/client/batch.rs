//! Coalescing: concurrent requests for one node travel as one call.
//!
//! twemproxy and mcrouter are cheap per request because they pipeline:
//! whatever is waiting for a server goes out in one write. The
//! [`Coalescer`] does the same with gRPC calls, and needs no timer:
//!
//! - **Idle**: while fewer than `max_in_flight` calls to the node are
//!   running, a request is sent at once, alone, from the caller's own task
//!   — no added latency, no task hop.
//! - **Busy**: otherwise it joins the node's queue. When a call finishes,
//!   whatever queued meanwhile goes out as the next call (one
//!   `Internal/Apply` carrying every queued op, up to the batch limits), so
//!   batches are as large as the load makes them.
//! - **Bounded**: ops and bytes per call, and ops and bytes queued per
//!   node. A full queue refuses at once with [`CallError::Shed`]
//!   (`RESOURCE_EXHAUSTED`), never growing memory.
//! - **Each caller keeps its own deadline and result**: a caller whose
//!   deadline passes stops waiting ([`CallError::CallerDeadline`]); if it
//!   was still queued its ops are dropped unsent. Each gets the results of
//!   its own ops, or the call's error.
//! - **Single-flight**: a `Get` of a key that another caller's `Get` is
//!   already *queued* for joins that one, and both get its answer. Only
//!   queued ones: joining a `Get` already sent could answer with a value
//!   read before a write that completed after this caller asked.
//!
//! A node answers as many ops as fit in one message; the rest of a
//! request goes out again with the next call (see `Internal/Apply`).

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher,
    sync::Arc,
    time::Instant,
};

use parking_lot::Mutex;
use prost::Message;
use ringcache_proto::v1::{Op, OpResult, op};
use smallvec::SmallVec;
use tokio::sync::oneshot;
use tower::ServiceExt;

use super::{CallError, NodeCall, NodeReply, NodeStack};

/// How large batches and queues may grow, per node.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most ops in one call (at most the node's `--max-batch`).
    pub max_ops: usize,
    /// Most request bytes in one call (below `--max-message-bytes`).
    pub max_bytes: usize,
    /// Most ops waiting for the node; beyond, requests are shed.
    pub max_queue_ops: usize,
    /// Most request bytes waiting for the node; beyond, requests are shed.
    pub max_queue_bytes: usize,
    /// Calls to the node running at once before requests queue.
    pub max_in_flight: usize,
}

type Reply = Result<NodeReply, CallError>;

/// One caller's request (or several callers', for a single-flight `Get`).
#[derive(Debug)]
struct Pending {
    /// Ops not answered yet.
    ops: Vec<Op>,
    /// Answers to the ops already answered (when a call's answers did not
    /// all fit in one message).
    done: Vec<OpResult>,
    /// Encoded size of `ops`.
    bytes: usize,
    /// The latest deadline of its callers; `None` if one has none.
    deadline: Option<Instant>,
    /// Who waits for the answer.
    waiters: SmallVec<[oneshot::Sender<Reply>; 1]>,
    /// Queue order, for finding a single-flight `Get` (0 once requeued).
    seq: u64,
    /// For a lone `Get`: the hash of its key.
    get_hash: Option<u64>,
}

impl Pending {
    fn abandoned(&self) -> bool {
        self.waiters.iter().all(oneshot::Sender::is_closed)
    }

    fn finish(self, reply: Reply) {
        let mut waiters = self.waiters.into_iter();
        let Some(first) = waiters.next() else { return };
        for w in waiters {
            let _ = w.send(reply.clone());
        }
        let _ = first.send(reply);
    }
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Pending>,
    queued_ops: usize,
    queued_bytes: usize,
    /// Calls to the node running now (alone or batched).
    in_flight: usize,
    /// Lone queued `Get`s: key hash → seq.
    gets: HashMap<u64, u64>,
    next_seq: u64,
}

impl State {
    fn push_back(&mut self, p: Pending) {
        self.queued_ops += p.ops.len();
        self.queued_bytes += p.bytes;
        if let Some(h) = p.get_hash {
            self.gets.insert(h, p.seq);
        }
        self.queue.push_back(p);
    }

    /// Takes the next call's worth of requests off the front of the queue.
    fn take_batch(&mut self, limits: &BatchLimits) -> Vec<Pending> {
        let (mut ops, mut bytes) = (0, 0);
        let mut batch = Vec::new();
        while let Some(front) = self.queue.front() {
            if !batch.is_empty()
                && (ops + front.ops.len() > limits.max_ops
                    || bytes + front.bytes > limits.max_bytes)
            {
                break;
            }
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            self.queued_ops -= p.ops.len();
            self.queued_bytes -= p.bytes;
            if let Some(h) = p.get_hash
                && self.gets.get(&h) == Some(&p.seq)
            {
                self.gets.remove(&h);
            }
            // Every caller gave up (deadline, cancelled): never sent.
            if p.abandoned() {
                continue;
            }
            ops += p.ops.len();
            bytes += p.bytes;
            batch.push(p);
        }
        batch
    }
}

/// Sends one node's requests, coalescing them while the node is busy.
#[derive(Debug)]
pub struct Coalescer {
    stack: NodeStack,
    limits: BatchLimits,
    state: Mutex<State>,
    hasher: foldhash::fast::FixedState,
}

/// Gives back a call slot when the call that held it ends — however it
/// ends, so a caller that goes away cannot leave the queue stranded.
struct SlotGuard(Arc<Coalescer>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Coalescer {
    /// Coalesces calls made through `stack`.
    pub fn new(stack: NodeStack, limits: BatchLimits) -> Arc<Self> {
        Arc::new(Self {
            stack,
            limits,
            state: Mutex::new(State::default()),
            hasher: foldhash::fast::FixedState::with_seed(0x0062_6174_6368),
        })
    }

    /// Requests queued now (ops).
    pub fn queued(&self) -> usize {
        self.state.lock().queued_ops
    }

    /// Runs `ops` on the node, alone if it is idle or with other callers'
    /// ops if it is busy, and answers them in order. `deadline` is the
    /// caller's: past it, the caller stops waiting.
    pub async fn call(self: &Arc<Self>, ops: Vec<Op>, deadline: Option<Instant>) -> Reply {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let get_hash = match ops.as_slice() {
            [
                Op {
                    op: Some(op::Op::Get(g)),
                },
            ] => Some(self.hasher.hash_one(&g.key)),
            _ => None,
        };
        // Ok: queued, wait for the answer; Err: send now.
        let waiting = {
            let mut st = self.state.lock();
            if st.in_flight < self.limits.max_in_flight {
                // Idle enough (and so nothing is queued: requests queue
                // only while every slot is taken): send now.
                st.in_flight += 1;
                Err(ops)
            } else {
                let (tx, rx) = oneshot::channel();
                if let Some(p) = get_hash.and_then(|h| single_flight(&mut st, h, &ops)) {
                    p.waiters.push(tx);
                    p.deadline = later(p.deadline, deadline);
                } else {
                    let bytes = ops.iter().map(Message::encoded_len).sum::<usize>();
                    if st.queued_ops + ops.len() > self.limits.max_queue_ops
                        || st.queued_bytes + bytes > self.limits.max_queue_bytes
                    {
                        return Err(CallError::Shed(format!(
                            "{} requests ({} bytes) already queued for this node (--node-queue); retry with backoff",
                            st.queued_ops, st.queued_bytes
                        )));
                    }
                    let seq = {
                        st.next_seq += 1;
                        st.next_seq
                    };
                    st.push_back(Pending {
                        ops,
                        done: Vec::new(),
                        bytes,
                        deadline,
                        waiters: SmallVec::from_buf([tx]),
                        seq,
                        get_hash,
                    });
                }
                Ok(rx)
            }
        };
        match waiting {
            Err(ops) => {
                let _slot = SlotGuard(self.clone());
                self.send_alone(ops, deadline, None).await
            }
            Ok(rx) => {
                let answer = match deadline {
                    Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                        Ok(answer) => answer,
                        Err(_) => return Err(CallError::CallerDeadline),
                    },
                    None => rx.await,
                };
                answer.unwrap_or_else(|_| {
                    Err(CallError::Lost(
                        "the batch carrying this request was dropped".to_owned(),
                    ))
                })
            }
        }
    }

    /// Sends one caller's ops now, bypassing the queue, in as many calls
    /// as their answers need. `parent` is the span of a sampled request.
    pub async fn send_alone(
        &self,
        mut ops: Vec<Op>,
        deadline: Option<Instant>,
        parent: Option<tracing::Span>,
    ) -> Reply {
        let mut done = Vec::with_capacity(ops.len());
        loop {
            let count = ops.len();
            // Keep the ops until the answer shows they were all run: a node
            // whose answers do not fit in one message leaves the rest.
            let call = NodeCall {
                ops: ops.clone(),
                deadline,
                parent: parent.clone(),
                trace: None,
            };
            let results = self.stack.clone().oneshot(call).await?;
            let answered = results.len().min(count);
            done.extend(results);
            if answered == count {
                return Ok(done);
            }
            ops.drain(..answered);
        }
    }

    /// A call finished: hand its slot to whatever queued, or free it.
    fn release(self: &Arc<Self>) {
        let batch = {
            let mut st = self.state.lock();
            let batch = st.take_batch(&self.limits);
            if batch.is_empty() {
                st.in_flight -= 1;
            }
            batch
        };
        if !batch.is_empty() {
            tokio::spawn(self.clone().drive(batch));
        }
    }

    /// Sends batches until the queue is empty, then frees the slot.
    async fn drive(self: Arc<Self>, mut batch: Vec<Pending>) {
        let slot = SlotGuard(self.clone());
        loop {
            self.send_batch(batch).await;
            let next = self.state.lock().take_batch(&self.limits);
            if next.is_empty() {
                // The guard frees the slot (and picks up anything queued in
                // between).
                drop(slot);
                return;
            }
            batch = next;
        }
    }

    /// Sends several callers' requests as one call and answers each.
    async fn send_batch(&self, batch: Vec<Pending>) {
        let total: usize = batch.iter().map(|p| p.ops.len()).sum();
        let mut ops = Vec::with_capacity(total);
        let mut deadline = batch.first().and_then(|p| p.deadline);
        for p in &batch {
            ops.extend(p.ops.iter().cloned());
            deadline = later(deadline, p.deadline);
        }
        let call = NodeCall {
            ops,
            deadline,
            parent: None,
            trace: None,
        };
        match self.stack.clone().oneshot(call).await {
            Ok(results) => {
                let mut results = results.into_iter();
                let mut unfinished = Vec::new();
                for mut p in batch {
                    let n = p.ops.len();
                    let before = p.done.len();
                    p.done.extend(results.by_ref().take(n));
                    let answered = p.done.len() - before;
                    if answered == n {
                        let done = std::mem::take(&mut p.done);
                        p.finish(Ok(done));
                    } else {
                        // The node's answers filled a message: the rest
                        // goes out first in the next call.
                        p.ops.drain(..answered);
                        p.bytes = p.ops.iter().map(Message::encoded_len).sum();
                        p.seq = 0;
                        p.get_hash = None;
                        unfinished.push(p);
                    }
                }
                if !unfinished.is_empty() {
                    let mut st = self.state.lock();
                    for p in unfinished.into_iter().rev() {
                        st.queued_ops += p.ops.len();
                        st.queued_bytes += p.bytes;
                        st.queue.push_front(p);
                    }
                }
            }
            Err(e) => {
                for p in batch {
                    p.finish(Err(e.clone()));
                }
            }
        }
    }
}

/// A queued lone `Get` of the same key, if any.
fn single_flight<'s>(st: &'s mut State, hash: u64, ops: &[Op]) -> Option<&'s mut Pending> {
    let seq = *st.gets.get(&hash)?;
    let i = st.queue.binary_search_by_key(&seq, |p| p.seq).ok()?;
    let p = &mut st.queue[i];
    (p.ops == ops).then_some(p)
}

/// The later of two deadlines; `None` (no deadline) is latest.
fn later(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    Some(a?.max(b?))
}

#[cfg(test)]
mod tests;
