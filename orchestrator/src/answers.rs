//! The memory a read's answer takes, held against `--max-in-flight-bytes`
//! before the nodes are asked.
//!
//! A routed read holds its answer twice: the nodes' answers, decoded into
//! the buffers they arrived in (the merged answer points into them), and
//! the encoded response, until it is sent. Neither exists when the call is
//! admitted, and a `GetMany` of 900 keys can bring back megabytes. So
//! before a read goes out, it holds twice its *estimated* answer
//! ([`AnswerEstimate`]) on the call's [`CallBytes`] — refused with
//! `RESOURCE_EXHAUSTED` when that would take the orchestrator past its
//! budget — and once the answers are in, it settles on twice their real
//! size, half of it prepaid for the response's frames.
//!
//! The estimate is per key: it jumps up to any larger answer seen at once
//! and drifts down slowly. It starts at [`INITIAL_PER_KEY`] (16 KiB, or
//! `--max-value-bytes` if smaller): high enough that a burst of large
//! `GetMany`s on a fresh orchestrator is held near its real size (each
//! answer is at most `--max-message-bytes` anyway), low enough that a
//! burst of small `Get`s — a new pod taking traffic — is not refused
//! before any answer has taught it better.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ringcache_common::inflight_bytes::CallBytes;
use tonic::Status;

/// Bytes per key a read's answer is expected to take (value plus
/// framing).
#[derive(Debug)]
pub struct AnswerEstimate {
    per_key: AtomicU64,
    /// The most one answer can take (`--max-message-bytes`).
    max_answer: u64,
}

/// Bytes an answer's framing takes per key, beyond its value.
pub const FRAMING: u64 = 48;

/// The first estimate of a key's answer, before any was seen.
pub const INITIAL_PER_KEY: u64 = 16 * 1024;

/// How much of the gap to a smaller answer the estimate closes each time
/// (1/32: it takes about a hundred smaller answers to come down).
const DECAY_SHIFT: u32 = 5;

impl AnswerEstimate {
    /// Starts at [`INITIAL_PER_KEY`] (at most `max_value_bytes`) per key;
    /// no answer exceeds `max_answer` bytes.
    pub fn new(max_value_bytes: usize, max_answer: usize) -> Self {
        Self {
            per_key: AtomicU64::new(INITIAL_PER_KEY.min(max_value_bytes as u64) + FRAMING),
            max_answer: max_answer as u64,
        }
    }

    /// The bytes expected for an answer of `keys` keys.
    pub fn expect(&self, keys: usize) -> u64 {
        (keys as u64)
            .saturating_mul(self.per_key.load(Relaxed))
            .min(self.max_answer)
    }

    /// An answer of `keys` keys took `bytes`.
    pub fn observe(&self, keys: usize, bytes: u64) {
        if keys == 0 {
            return;
        }
        let seen = bytes / keys as u64;
        // One read and, only when the estimate moves, one atomic write:
        // this runs on every read, and once the estimate has converged it
        // does not write the shared cache line at all. A rise always lands
        // (`fetch_max`); a decay that loses a race is simply skipped.
        let current = self.per_key.load(Relaxed);
        if seen > current {
            self.per_key.fetch_max(seen, Relaxed);
        } else if seen < current {
            let next = current - ((current - seen) >> DECAY_SHIFT).max(1);
            let _ = self
                .per_key
                .compare_exchange(current, next, Relaxed, Relaxed);
        }
    }
}

/// The bytes one read holds on its call's budget.
#[derive(Debug)]
pub struct HeldAnswer {
    call: Option<CallBytes>,
    held: u64,
}

impl HeldAnswer {
    /// Holds twice the expected answer of `keys` keys on `call` (nothing
    /// when the call is not counted: health checks, tests calling the
    /// service directly). Refused when the budget has no room for it.
    pub fn reserve(
        call: Option<&CallBytes>,
        estimate: &AnswerEstimate,
        keys: usize,
    ) -> Result<Self, Status> {
        let Some(call) = call else {
            return Ok(Self {
                call: None,
                held: 0,
            });
        };
        let held = estimate.expect(keys).saturating_mul(2);
        call.hold(held)?;
        Ok(Self {
            call: Some(call.clone()),
            held,
        })
    }

    /// The answer is in: it takes `bytes`. Holds exactly twice that (the
    /// decoded answers and the encoded response, never refused now: the
    /// bytes exist), prepays the response, and teaches `estimate`.
    pub fn settle(self, estimate: &AnswerEstimate, keys: usize, bytes: u64) {
        estimate.observe(keys, bytes);
        let Some(call) = self.call else { return };
        let needed = bytes.saturating_mul(2);
        if needed > self.held {
            call.hold_anyway(needed - self.held);
        } else {
            call.release(self.held - needed);
        }
        call.prepay_response(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_rises_at_once_and_falls_slowly_within_the_message_limit() {
        let e = AnswerEstimate::new(1 << 20, 4 << 20);
        assert_eq!(e.expect(1), INITIAL_PER_KEY + FRAMING);
        assert_eq!(AnswerEstimate::new(100, 4 << 20).expect(1), 100 + FRAMING);
        assert_eq!(e.expect(900), 4 << 20, "never more than one message");
        for _ in 0..400 {
            e.observe(900, 900 * 4_144);
        }
        let per_key = e.expect(1);
        assert!((4_144..4_400).contains(&per_key), "{per_key}");
        e.observe(1, 100_000);
        assert_eq!(e.expect(1), 100_000, "a larger answer counts at once");
        e.observe(10, 10 * 4_144);
        assert!(e.expect(1) > 90_000, "a smaller one only a little");
        e.observe(0, 0);
    }
}
