//! Refusals that say what to do. tonic answers a request it cannot decode
//! before our handlers see it, with messages that do not name our limits:
//! a message over the size limit is `OUT_OF_RANGE: Error, decoded message
//! length too large: …`, and a key that is not UTF-8 is `INTERNAL: failed
//! to decode Protobuf message: …` (a server error, for a client's
//! mistake). [`ClearRefusalsLayer`] rewrites those answers: the size limit
//! names `--max-message-bytes`, and undecodable requests are
//! `INVALID_ARGUMENT` saying what was wrong.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// Rewrites tonic's decoding refusals; see the module documentation.
#[derive(Debug, Clone)]
pub struct ClearRefusalsLayer {
    max_message_bytes: Arc<str>,
}

impl ClearRefusalsLayer {
    /// Refusals name `max_message_bytes` as the `--max-message-bytes`
    /// limit.
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            max_message_bytes: max_message_bytes.to_string().into(),
        }
    }
}

impl<S> Layer<S> for ClearRefusalsLayer {
    type Service = ClearRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClearRefusals {
            inner,
            max_message_bytes: self.max_message_bytes.clone(),
        }
    }
}

/// The service made by [`ClearRefusalsLayer`].
#[derive(Debug, Clone)]
pub struct ClearRefusals<S> {
    inner: S,
    max_message_bytes: Arc<str>,
}

impl<S, B, RB> Service<http::Request<B>> for ClearRefusals<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ClearFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        ClearFuture {
            inner: self.inner.call(req),
            max_message_bytes: self.max_message_bytes.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`ClearRefusals`].
    #[derive(Debug)]
    pub struct ClearFuture<F> {
        #[pin]
        inner: F,
        max_message_bytes: Arc<str>,
    }
}

impl<F, RB, E> Future for ClearFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        // Only answers that carry their status in the headers (refusals
        // made before any data was sent) are rewritten.
        if let Some(status) = Status::from_header_map(response.headers())
            && let Some(clear) = clarify(&status, this.max_message_bytes)
        {
            // Cannot fail: the status's fields are valid header values.
            let _ = clear.add_header(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

/// The clearer status for a refusal tonic made, if it is one of those
/// (also for a message on a stream that fails to decode).
pub fn clarify(status: &Status, max_message_bytes: &str) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange if message.contains("decoded message length too large") => {
            Some(Status::out_of_range(format!(
                "request message too large: {} (the limit is --max-message-bytes {max_message_bytes}); send fewer or smaller entries per call",
                message.trim_start_matches("Error, ")
            )))
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Some(Status::invalid_argument(if message.contains("UTF-8") {
                format!(
                    "a string field of the request is not valid UTF-8 (keys are UTF-8 text; encode binary keys, e.g. as hex or base64): {message}"
                )
            } else {
                format!(
                    "the request is not a valid protobuf message of the method's type: {message}"
                )
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    async fn answer(status: Status) -> Status {
        let svc =
            ClearRefusalsLayer::new(4096).layer(tower::service_fn(move |_: http::Request<()>| {
                let status = status.clone();
                async move { Ok::<_, std::convert::Infallible>(status.into_http::<()>()) }
            }));
        let response = svc.oneshot(http::Request::new(())).await.unwrap();
        Status::from_header_map(response.headers()).unwrap()
    }

    #[tokio::test]
    async fn the_size_limit_names_its_flag() {
        let s = answer(Status::out_of_range(
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        ))
        .await;
        assert_eq!(s.code(), Code::OutOfRange);
        assert!(
            s.message().contains("--max-message-bytes 4096"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("found 5000 bytes"), "{}", s.message());
    }

    #[tokio::test]
    async fn undecodable_requests_are_the_clients_mistake() {
        let s = answer(Status::internal(
            "failed to decode Protobuf message: GetRequest.key: invalid string value: data is not UTF-8 encoded",
        ))
        .await;
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("not valid UTF-8"), "{}", s.message());
        let s = answer(Status::internal(
            "failed to decode Protobuf message: buffer underflow",
        ))
        .await;
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn other_answers_pass_untouched() {
        let s = answer(Status::internal("a real bug")).await;
        assert_eq!((s.code(), s.message()), (Code::Internal, "a real bug"));
        let s = answer(Status::out_of_range("something else")).await;
        assert_eq!(s.message(), "something else");
    }
}
