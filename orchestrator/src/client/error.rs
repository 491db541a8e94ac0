//! How a call to a node failed, classified once where it happens.
//!
//! Everything downstream — whether to try another node, whether the node
//! is to blame, what the client is told — reads a [`CallError`], never a
//! status code. [`CallError::to_status`] is the one mapping to the wire.

use std::time::Duration;

use tonic::{Code, Status};

/// Why a call to a node did not produce an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The request never left this process: no connection could be made,
    /// or the connection was already closed when it was handed over (or the
    /// node refused the stream before reading it). It cannot have been
    /// applied.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The connection broke after the request was sent: it may or may not
    /// have been applied.
    #[error("connection lost mid-call: {0}")]
    Lost(String),
    /// The node did not answer within `--node-timeout`. It may have applied
    /// the request.
    #[error("no answer within {0:?} (--node-timeout)")]
    NodeTimeout(Duration),
    /// The caller's own deadline passed first. Never the node's fault.
    /// The request may have been applied (the caller cannot retry anyway:
    /// its time is up).
    #[error("the request's deadline passed before the node answered")]
    CallerDeadline,
    /// Refused by this orchestrator before sending: too many calls or
    /// queued requests for this node already.
    #[error("{0}")]
    Shed(String),
    /// The node answered with an error status for the whole call.
    #[error("node answered {}: {}", .0.code(), .0.message())]
    Refused(Status),
}

impl CallError {
    /// Whether this failure says the node is in trouble, and so counts
    /// toward ejecting it. Only transport failures and `--node-timeout`
    /// do, plus statuses that mean the node itself broke: never the
    /// caller's deadline, never our own shedding, never a node that
    /// answered that it is busy.
    pub fn is_node_fault(&self) -> bool {
        match self {
            CallError::NotSent(_) | CallError::Lost(_) | CallError::NodeTimeout(_) => true,
            CallError::CallerDeadline | CallError::Shed(_) => false,
            CallError::Refused(status) => matches!(
                status.code(),
                Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss
            ),
        }
    }

    /// Whether the node may have applied the request. Only when it cannot
    /// may a conditional write be tried on another node.
    pub fn may_have_applied(&self) -> bool {
        match self {
            CallError::NotSent(_) | CallError::Shed(_) => false,
            CallError::Lost(_) | CallError::NodeTimeout(_) | CallError::CallerDeadline => true,
            // The node answered for the whole call, before running any op
            // (limits, its own load shedding, draining) — except for
            // statuses that say it broke somewhere unknown.
            CallError::Refused(status) => !matches!(
                status.code(),
                Code::ResourceExhausted
                    | Code::InvalidArgument
                    | Code::Unavailable
                    | Code::Unimplemented
                    | Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
            ),
        }
    }

    /// The gRPC code a client sees for this failure.
    pub fn code(&self) -> Code {
        match self {
            CallError::NotSent(_) | CallError::Lost(_) => Code::Unavailable,
            CallError::NodeTimeout(_) | CallError::CallerDeadline => Code::DeadlineExceeded,
            CallError::Shed(_) => Code::ResourceExhausted,
            CallError::Refused(status) => status.code(),
        }
    }

    /// The status a client sees, naming the node. The one place a node
    /// call's failure becomes a `Status`.
    pub fn to_status(&self, node: &str) -> Status {
        let message = format!("node {node}: {self}");
        match self {
            CallError::Shed(_) => ringcache_common::exhausted::overloaded(message),
            // The node's details (why it refused: an ErrorInfo) go on.
            CallError::Refused(status) if !status.details().is_empty() => Status::with_details(
                self.code(),
                message,
                bytes::Bytes::copy_from_slice(status.details()),
            ),
            _ => Status::new(self.code(), message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blame_and_application_follow_the_failure() {
        let cases = [
            (CallError::NotSent("refused".into()), true, false),
            (CallError::Lost("reset".into()), true, true),
            (CallError::NodeTimeout(Duration::from_secs(1)), true, true),
            (CallError::CallerDeadline, false, true),
            (CallError::Shed("full".into()), false, false),
            (
                CallError::Refused(Status::resource_exhausted("busy")),
                false,
                false,
            ),
            (
                CallError::Refused(Status::invalid_argument("bad")),
                false,
                false,
            ),
            (CallError::Refused(Status::internal("bug")), true, true),
            (
                CallError::Refused(Status::unavailable("draining")),
                true,
                false,
            ),
        ];
        for (error, fault, applied) in cases {
            assert_eq!(error.is_node_fault(), fault, "{error:?} fault");
            assert_eq!(error.may_have_applied(), applied, "{error:?} applied");
        }
    }

    #[test]
    fn statuses_name_the_node_and_keep_the_code() {
        let s = CallError::NodeTimeout(Duration::from_millis(250)).to_status("cache-1");
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert_eq!(
            s.message(),
            "node cache-1: no answer within 250ms (--node-timeout)"
        );
        let s = CallError::Lost("connection reset".into()).to_status("cache-2");
        assert_eq!(s.code(), Code::Unavailable);
        let s = CallError::Refused(Status::invalid_argument("key: too long")).to_status("n");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("key: too long"));
    }
}
