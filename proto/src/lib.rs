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
