//! The node's errors, and the one place they become gRPC statuses.

use ringcache_common::validate::ValidationError;

use crate::store::StoreError;

/// Everything a cache-node request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request breaks a limit or is malformed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The store refused a write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A batch op with no operation set.
    #[error("op: no operation set (expected get, set, delete, copy, increment, touch or owe)")]
    EmptyOp,
    /// An `Owe` op names an owner that is empty or too long.
    #[error("owe: an owner identity must be 1 to {max} bytes, got {len}")]
    InvalidOwner {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The node is stopping and handed its entries to an orchestrator:
    /// data calls go to the key's next node (see [`crate::parking`]).
    #[error(
        "this node is stopping and has handed its entries over; the call was not run: send it to the key's next node"
    )]
    Parked,
    /// A batch's answer would be larger than a message may be.
    #[error(
        "response would be over {limit} bytes (--max-message-bytes) after {answered} of {requested} keys; ask for fewer keys per call"
    )]
    ResponseTooLarge {
        /// The message size limit.
        limit: usize,
        /// Keys answered before the limit was hit.
        answered: usize,
        /// Keys asked for.
        requested: usize,
    },
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Invalid(e) => e.into(),
            // An entry too large for a shard is a configuration limit the
            // request ran into: the same request will never fit.
            NodeError::Store(e @ StoreError::EntryTooLarge { .. }) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            // The stored value is not a counter: the request cannot apply
            // to the key as it is.
            NodeError::Store(e @ StoreError::NotAnInteger { .. }) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            // Stopping: not run, the caller may send it anywhere else.
            NodeError::Store(e @ StoreError::Frozen) => tonic::Status::unavailable(e.to_string()),
            NodeError::Store(e @ StoreError::Overflow { .. }) => {
                tonic::Status::out_of_range(e.to_string())
            }
            e @ (NodeError::EmptyOp | NodeError::InvalidOwner { .. }) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            // Not run: the caller may send it anywhere else.
            e @ NodeError::Parked => tonic::Status::unavailable(e.to_string()),
            e @ NodeError::ResponseTooLarge { limit, .. } => {
                ringcache_common::exhausted::too_large(e.to_string(), limit)
            }
        }
    }
}
