//! Reads a client sends straight to a node (direct mode): the epoch they
//! were routed by, as the node's handlers find it.
//!
//! A unary call carries it in its metadata
//! ([`ringcache_proto::direct::DIRECT_EPOCH_HEADER`]); a `Pipeline` stream
//! carries it once, in the stream's metadata, and the pipeline driver puts
//! it in every op's extensions, so the handlers read it the same way
//! ([`DirectEpoch::of`]).

use ringcache_proto::direct::{DIRECT_EPOCH_HEADER, parse_epoch};
use tonic::{Request, metadata::MetadataMap};

/// The ring epoch a direct read was routed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectEpoch(pub u64);

impl DirectEpoch {
    /// The epoch in `metadata`, if it carries a well-formed one. A
    /// malformed value counts as absent: the call is then an ordinary one.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        metadata
            .get(DIRECT_EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_epoch)
            .map(Self)
    }

    /// The epoch of a request: put there by the pipeline driver for an op,
    /// or in the metadata of a unary call.
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        request
            .extensions()
            .get::<Self>()
            .copied()
            .or_else(|| Self::from_metadata(request.metadata()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn found_in_the_extensions_or_the_metadata() {
        let mut unary = Request::new(());
        assert_eq!(DirectEpoch::of(&unary), None);
        unary
            .metadata_mut()
            .insert(DIRECT_EPOCH_HEADER, "00000000000000ff".parse().unwrap());
        assert_eq!(DirectEpoch::of(&unary), Some(DirectEpoch(255)));

        let mut op = Request::new(());
        op.extensions_mut().insert(DirectEpoch(7));
        assert_eq!(DirectEpoch::of(&op), Some(DirectEpoch(7)));

        let mut malformed = Request::new(());
        malformed
            .metadata_mut()
            .insert(DIRECT_EPOCH_HEADER, "ff".parse().unwrap());
        assert_eq!(DirectEpoch::of(&malformed), None);
    }
}
