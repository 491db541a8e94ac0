//! The `ringcache.v1` protobuf contract, shared by the orchestrator and the
//! cache node.
//!
//! # Layout
//!
//! - [`v1`]: the messages and the tonic client and server stubs generated
//!   from `proto/ringcache/v1/*.proto` (`Cache`, `Node`, `Cluster`,
//!   `Internal`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, with the `.proto`
//!   comments, for server reflection.
//!
//! The `.proto` files are the reference: every service, method and field is
//! documented there, and `grpcurl describe` shows those comments.

/// The generated packages, nested as prost expects (`ringcache.v1` refers
/// to `google.rpc` as `super::super::google::rpc`).
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
#[allow(clippy::all, clippy::pedantic)]
mod ringcache {
    pub mod v1 {
        tonic::include_proto!("ringcache.v1");
    }
}

/// Messages, clients and servers of the `ringcache.v1` package.
pub use ringcache::v1;

/// `google.rpc.Status`, the error of a failed `Pipeline` op (vendored from
/// googleapis).
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
#[allow(clippy::all, clippy::pedantic)]
pub mod google {
    /// The `google.rpc` package.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The encoded `FileDescriptorSet` of `ringcache.v1` (and its imports), with
/// source comments, for `tonic_reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ringcache_descriptor.bin"));

/// Fully qualified gRPC service names, as health checks and reflection
/// report them.
pub mod service_names {
    /// The data API served by both binaries.
    pub const CACHE: &str = "ringcache.v1.Cache";
    /// The node's storage statistics API.
    pub const NODE: &str = "ringcache.v1.Node";
    /// The orchestrator's cluster API.
    pub const CLUSTER: &str = "ringcache.v1.Cluster";
    /// The node's API for orchestrators (batches of operations, copies).
    pub const INTERNAL: &str = "ringcache.v1.Internal";
}

/// The two kinds of `RESOURCE_EXHAUSTED` a client must tell apart, named
/// by the `google.rpc.ErrorInfo` (domain [`direct::ERROR_DOMAIN`]) every
/// such refusal carries: one asks for a retry, the other for a smaller
/// request.
pub mod exhausted {
    /// `ErrorInfo.reason` of a call shed before it ran: a limit on calls or
    /// bytes in flight, or a queue, was full. Nothing ran; send it again
    /// after a backoff (a `google.rpc.RetryInfo` suggests the first
    /// delay).
    pub const OVERLOADED: &str = "OVERLOADED";

    /// `ErrorInfo.reason` of a call whose answer would be larger than the
    /// server sends (`--max-message-bytes`): asking again gets the same
    /// answer; ask for fewer keys. `ErrorInfo.metadata` carries the limit
    /// under [`LIMIT_BYTES`].
    pub const TOO_LARGE: &str = "TOO_LARGE";

    /// The `ErrorInfo.metadata` key of the byte limit a [`TOO_LARGE`]
    /// answer went past.
    pub const LIMIT_BYTES: &str = "limit_bytes";
}

/// Reads a client sends straight to a cache node (direct mode): the
/// metadata they carry and the refusals they can get. Both the node and
/// the clients use these names.
pub mod direct {
    /// The metadata a direct read carries (on a `Pipeline` stream, or a
    /// unary `Get`/`Exists`): the ring epoch of the topology the client
    /// routed it by, as `Topology.epoch` (16 hex digits). A read without it
    /// is an ordinary call, served as always.
    pub const DIRECT_EPOCH_HEADER: &str = "ringcache-direct-epoch";

    /// The metadata orchestrators send their ring's epoch in, with every
    /// call to a node (the node vouches for direct reads with it).
    pub const EPOCH_HEADER: &str = "ringcache-epoch";

    /// The `google.rpc.ErrorInfo` domain of ringcache's refusals.
    pub const ERROR_DOMAIN: &str = "ringcache.dev";

    /// `ErrorInfo.reason` of a direct read refused because the client's
    /// epoch is not the one the orchestrators use; `ErrorInfo.metadata`
    /// carries theirs under [`CURRENT_EPOCH`]. Refresh the topology (once,
    /// with a cool-down), and send the read through an orchestrator.
    pub const STALE_EPOCH: &str = "STALE_EPOCH";

    /// `ErrorInfo.reason` of a direct read the node cannot vouch for: no
    /// orchestrator has called it recently, or orchestrators call it with
    /// different epochs (a membership change in progress). Send the read
    /// through an orchestrator; the topology need not change.
    pub const CANNOT_VOUCH: &str = "CANNOT_VOUCH";

    /// The `ErrorInfo.metadata` key of the orchestrators' current epoch.
    pub const CURRENT_EPOCH: &str = "current_epoch";

    /// An epoch as it travels: 16 lower-case hex digits.
    pub fn format_epoch(epoch: u64) -> String {
        format!("{epoch:016x}")
    }

    /// Parses an epoch as it travels; `None` unless it is 16 hex digits.
    pub fn parse_epoch(value: &str) -> Option<u64> {
        (value.len() == 16)
            .then(|| u64::from_str_radix(value, 16).ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_set_carries_comments() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let cache = fds
            .file
            .iter()
            .find(|f| f.name() == "ringcache/v1/cache.proto")
            .expect("cache.proto is in the set");
        assert_eq!(cache.package(), "ringcache.v1");
        let comments: Vec<_> = cache
            .source_code_info
            .as_ref()
            .expect("source info kept")
            .location
            .iter()
            .filter_map(|l| l.leading_comments.as_deref())
            .collect();
        assert!(
            comments.iter().any(|c| c.contains("compare-and-set")),
            "comments: {comments:?}"
        );
        // Imports are included so reflection can resolve Duration.
        assert!(
            fds.file
                .iter()
                .any(|f| f.name() == "google/protobuf/duration.proto")
        );
    }
}
