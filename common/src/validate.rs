//! Request limits, checked before any work is done.
//!
//! Both the cache node and the orchestrator enforce the same limits, so a
//! request is refused at the first hop with the same message it would get at
//! the last. Every refusal is `INVALID_ARGUMENT` and names the field and the
//! flag that sets the limit.

use std::time::Duration;

use ringcache_proto::v1::{CopyRequest, SetRequest, set_request};

/// The limits a server enforces on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest key, in bytes (`--max-key-bytes`).
    pub max_key_bytes: usize,
    /// Largest value, in bytes (`--max-value-bytes`).
    pub max_value_bytes: usize,
    /// Most keys or entries in one `GetMany`/`SetMany` (`--max-batch`).
    pub max_batch: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_batch: 1000,
        }
    }
}

/// A request that breaks a limit or is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// An empty key.
    #[error("{field}: key must not be empty")]
    EmptyKey {
        /// Where in the request (`key`, `keys[3]`, `entries[0].key`).
        field: String,
    },
    /// A key over `--max-key-bytes`.
    #[error("{field}: key is {len} bytes, over the {max}-byte limit (--max-key-bytes)")]
    KeyTooLong {
        /// Where in the request.
        field: String,
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value over `--max-value-bytes`.
    #[error("{field}: value is {len} bytes, over the {max}-byte limit (--max-value-bytes)")]
    ValueTooLarge {
        /// Where in the request.
        field: String,
        /// The value's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A batch over `--max-batch`.
    #[error(
        "{field}: batch of {len} is over the limit of {max} per request (--max-batch); split it"
    )]
    BatchTooLarge {
        /// `keys` or `entries`.
        field: &'static str,
        /// How many were sent.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A copy whose version is 0 or beyond [`MAX_VERSION`].
    #[error("{field}: a copy's version must be between 1 and {MAX_VERSION}, got {version}")]
    BadCopyVersion {
        /// Where in the request.
        field: String,
        /// The version sent.
        version: u64,
    },
    /// A TTL that is not a positive duration.
    #[error("{field}: ttl must be a positive duration, got {seconds}s {nanos}ns")]
    BadTtl {
        /// Where in the request.
        field: String,
        /// The seconds sent.
        seconds: i64,
        /// The nanoseconds sent.
        nanos: i32,
    },
}

impl From<ValidationError> for tonic::Status {
    fn from(e: ValidationError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// The largest version a copy may carry: 2^62. Versions are microseconds
/// of wall clock (about 2^51 today), so this is never reached by a real
/// write, and a store whose versions grow from a copy's can never run out
/// of larger ones (`u64::MAX` is 2^64 - 1).
pub const MAX_VERSION: u64 = 1 << 62;

/// A `SetRequest`'s write condition, as the store understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCondition {
    /// Write unconditionally.
    Always,
    /// Write only if absent.
    IfAbsent,
    /// Write only if the current version is this one (0 = absent).
    IfVersion(u64),
    /// Write only if the key holds a live value.
    IfPresent,
    /// Copy from another node: write with exactly this version, only if it
    /// is greater than the current version. Never from a client's request:
    /// only `ringcache.v1.Internal`'s `CopyRequest` makes it.
    Replica(u64),
    /// As `Replica`, and only if the key has not changed on the node since
    /// change `after` of its change log's incarnation `incarnation` (warm
    /// handoff: a delete between the read and the copy wins).
    ReplicaUnchanged {
        /// The version to write with.
        version: u64,
        /// The change log incarnation `after` belongs to.
        incarnation: u64,
        /// The last change the copier had seen.
        after: u64,
    },
}

/// A checked `SetRequest`'s TTL and condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedSet {
    /// Time to live; `None` = no expiry.
    pub ttl: Option<Duration>,
    /// When to write.
    pub condition: WriteCondition,
}

impl RequestLimits {
    /// Checks one key; `field` says where it is in the request.
    #[inline]
    pub fn check_key(
        &self,
        field: impl FnOnce() -> String,
        key: &str,
    ) -> Result<(), ValidationError> {
        if key.is_empty() {
            return Err(ValidationError::EmptyKey { field: field() });
        }
        if key.len() > self.max_key_bytes {
            return Err(ValidationError::KeyTooLong {
                field: field(),
                len: key.len(),
                max: self.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Checks a batch's length.
    pub fn check_batch(&self, field: &'static str, len: usize) -> Result<(), ValidationError> {
        if len > self.max_batch {
            return Err(ValidationError::BatchTooLarge {
                field,
                len,
                max: self.max_batch,
            });
        }
        Ok(())
    }

    /// Checks every key of a `GetMany`.
    pub fn check_keys(&self, keys: &[String]) -> Result<(), ValidationError> {
        self.check_batch("keys", keys.len())?;
        for (i, key) in keys.iter().enumerate() {
            self.check_key(|| format!("keys[{i}]"), key)?;
        }
        Ok(())
    }

    /// Checks a `SetRequest` and extracts its TTL and condition. `prefix`
    /// is where the request sits (`""` for `Set`, `"entries[3]."` for a
    /// `SetMany` entry).
    pub fn check_set(&self, prefix: &str, req: &SetRequest) -> Result<CheckedSet, ValidationError> {
        let ttl = self.check_entry(prefix, &req.key, &req.value, req.ttl.as_ref())?;
        let condition = match req.condition {
            None
            | Some(
                set_request::Condition::IfAbsent(false) | set_request::Condition::IfPresent(false),
            ) => WriteCondition::Always,
            Some(set_request::Condition::IfPresent(true)) => WriteCondition::IfPresent,
            Some(set_request::Condition::IfAbsent(true)) => WriteCondition::IfAbsent,
            Some(set_request::Condition::IfVersion(v)) => WriteCondition::IfVersion(v),
        };
        Ok(CheckedSet { ttl, condition })
    }

    /// Checks a `CopyRequest` (a copy of an entry from another node) and
    /// extracts its TTL and condition ([`WriteCondition::Replica`]).
    pub fn check_copy(&self, req: &CopyRequest) -> Result<CheckedSet, ValidationError> {
        let ttl = self.check_entry("", &req.key, &req.value, req.ttl.as_ref())?;
        if req.version == 0 || req.version > MAX_VERSION {
            return Err(ValidationError::BadCopyVersion {
                field: "version".to_owned(),
                version: req.version,
            });
        }
        let condition = if req.incarnation == 0 {
            WriteCondition::Replica(req.version)
        } else {
            WriteCondition::ReplicaUnchanged {
                version: req.version,
                incarnation: req.incarnation,
                after: req.unchanged_after,
            }
        };
        Ok(CheckedSet { ttl, condition })
    }

    /// Checks a key and an optional TTL (`Increment`, `Touch`); returns
    /// the TTL.
    pub fn check_key_ttl(
        &self,
        key: &str,
        ttl: Option<&prost_types::Duration>,
    ) -> Result<Option<Duration>, ValidationError> {
        self.check_entry("", key, &[], ttl)
    }

    /// Checks the key, value and TTL of an entry to write; returns the TTL.
    fn check_entry(
        &self,
        prefix: &str,
        key: &str,
        value: &[u8],
        ttl: Option<&prost_types::Duration>,
    ) -> Result<Option<Duration>, ValidationError> {
        self.check_key(|| format!("{prefix}key"), key)?;
        if value.len() > self.max_value_bytes {
            return Err(ValidationError::ValueTooLarge {
                field: format!("{prefix}value"),
                len: value.len(),
                max: self.max_value_bytes,
            });
        }
        match ttl {
            None => Ok(None),
            Some(d) => positive_duration(d)
                .map(Some)
                .ok_or_else(|| ValidationError::BadTtl {
                    field: format!("{prefix}ttl"),
                    seconds: d.seconds,
                    nanos: d.nanos,
                }),
        }
    }

    /// Checks every entry of a `SetMany`.
    pub fn check_entries(
        &self,
        entries: &[SetRequest],
    ) -> Result<Vec<CheckedSet>, ValidationError> {
        self.check_batch("entries", entries.len())?;
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| self.check_set(&format!("entries[{i}]."), e))
            .collect()
    }
}

/// A protobuf duration as a positive `Duration`, or `None` if it is zero,
/// negative or malformed.
fn positive_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) || (d.seconds == 0 && d.nanos == 0) {
        return None;
    }
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// A `Duration` as a protobuf duration (saturating at `i64::MAX` seconds).
pub fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Always below 10^9, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_req(key: &str, value_len: usize) -> SetRequest {
        SetRequest {
            key: key.to_owned(),
            value: vec![0u8; value_len].into(),
            ..Default::default()
        }
    }

    #[test]
    fn keys_are_checked_with_field_names() {
        let limits = RequestLimits {
            max_key_bytes: 4,
            ..Default::default()
        };
        assert!(limits.check_keys(&["abcd".into()]).is_ok());
        let err = limits
            .check_keys(&["ok".into(), "toolong".into()])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "keys[1]: key is 7 bytes, over the 4-byte limit (--max-key-bytes)"
        );
        let err = limits.check_keys(&["".into()]).unwrap_err();
        assert_eq!(err.to_string(), "keys[0]: key must not be empty");
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn values_batches_and_ttls_are_checked() {
        let limits = RequestLimits {
            max_value_bytes: 10,
            max_batch: 2,
            ..Default::default()
        };
        assert!(limits.check_set("", &set_req("k", 10)).is_ok());
        assert_eq!(
            limits
                .check_set("", &set_req("k", 11))
                .unwrap_err()
                .to_string(),
            "value: value is 11 bytes, over the 10-byte limit (--max-value-bytes)"
        );
        let three = vec![set_req("a", 1), set_req("b", 1), set_req("c", 1)];
        assert!(
            limits
                .check_entries(&three)
                .unwrap_err()
                .to_string()
                .contains("batch of 3 is over the limit of 2 per request (--max-batch)")
        );
        let mut bad = set_req("k", 1);
        bad.ttl = Some(prost_types::Duration {
            seconds: 0,
            nanos: 0,
        });
        assert!(matches!(
            limits.check_entries(&[set_req("a", 1), bad.clone()]).unwrap_err(),
            ValidationError::BadTtl { ref field, .. } if field == "entries[1].ttl"
        ));
        bad.ttl = Some(prost_types::Duration {
            seconds: -5,
            nanos: 0,
        });
        assert!(limits.check_set("", &bad).is_err());
        bad.ttl = Some(prost_types::Duration {
            seconds: 1,
            nanos: 2_000_000_000,
        });
        assert!(limits.check_set("", &bad).is_err());
        bad.ttl = Some(prost_types::Duration {
            seconds: 0,
            nanos: 500,
        });
        assert_eq!(
            limits.check_set("", &bad).unwrap().ttl,
            Some(Duration::from_nanos(500))
        );
    }

    #[test]
    fn conditions_map() {
        let limits = RequestLimits::default();
        let mut req = set_req("k", 1);
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::Always
        );
        req.condition = Some(set_request::Condition::IfAbsent(false));
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::Always
        );
        req.condition = Some(set_request::Condition::IfAbsent(true));
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::IfAbsent
        );
        req.condition = Some(set_request::Condition::IfVersion(7));
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::IfVersion(7)
        );
        req.condition = Some(set_request::Condition::IfPresent(true));
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::IfPresent
        );
        req.condition = Some(set_request::Condition::IfPresent(false));
        assert_eq!(
            limits.check_set("", &req).unwrap().condition,
            WriteCondition::Always
        );
    }

    #[test]
    fn durations_round_trip() {
        let d = Duration::new(12, 345);
        let p = to_proto_duration(d);
        assert_eq!((p.seconds, p.nanos), (12, 345));
        assert_eq!(positive_duration(&p), Some(d));
    }
}
