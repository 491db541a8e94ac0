//! `RESOURCE_EXHAUSTED` statuses, made in one place so that every one
//! carries a `google.rpc.ErrorInfo` saying which kind it is
//! ([`ringcache_proto::exhausted`]): a call shed before it ran (retry
//! with backoff) or an answer too large to send (ask for less). Clients
//! act on the reason; the message stays for people.

use std::time::Duration;

use ringcache_proto::{
    direct::ERROR_DOMAIN,
    exhausted::{LIMIT_BYTES, OVERLOADED, TOO_LARGE},
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The first backoff a shed call's `RetryInfo` suggests.
pub const RETRY_AFTER: Duration = Duration::from_millis(20);

/// A call shed before it ran: `message` names the limit hit.
pub fn overloaded(message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::with_error_info(
        OVERLOADED,
        ERROR_DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    );
    details.set_retry_info(Some(RETRY_AFTER));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// An answer over `limit` bytes: `message` says what to ask for instead.
pub fn too_large(message: impl Into<String>, limit: usize) -> Status {
    let details = ErrorDetails::with_error_info(
        TOO_LARGE,
        ERROR_DOMAIN,
        [(LIMIT_BYTES.to_owned(), limit.to_string())],
    );
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// The `ErrorInfo.reason` of `status`, if it carries one of ringcache's.
pub fn reason(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|i| i.domain == ERROR_DOMAIN)
        .map(|i| i.reason)
}

/// Whether `status` is a call shed before it ran (safe to send again).
/// Servers older than the ErrorInfo said so only in the message.
pub fn is_overloaded(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && match reason(status) {
            Some(r) => r == OVERLOADED,
            None => status.message().contains("retry with backoff"),
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_names_its_reason_and_survives_the_wire() {
        let shed = overloaded("at the limit (--max-in-flight); retry with backoff");
        let large = too_large("about 9 MB, over the limit; ask for fewer keys", 4 << 20);
        // As a client decodes them: from the HTTP trailers' bytes.
        let wire = |s: Status| {
            let response = s.into_http::<tonic::body::Body>();
            Status::from_header_map(response.headers()).unwrap()
        };
        let (shed, large) = (wire(shed), wire(large));
        assert_eq!(reason(&shed).as_deref(), Some(OVERLOADED));
        assert_eq!(
            shed.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(RETRY_AFTER)
        );
        assert!(is_overloaded(&shed));
        assert_eq!(reason(&large).as_deref(), Some(TOO_LARGE));
        assert_eq!(
            large
                .get_details_error_info()
                .and_then(|i| i.metadata.get(LIMIT_BYTES).cloned()),
            Some((4u64 << 20).to_string())
        );
        assert!(!is_overloaded(&large));
        // An older server's shed, by its message only.
        assert!(is_overloaded(&Status::resource_exhausted(
            "server is at its limit; retry with backoff"
        )));
        assert!(!is_overloaded(&Status::resource_exhausted("too big")));
    }
}
