//! Load shedding by bytes: a cap on the request and response bytes a
//! server holds at once, across all connections.
//!
//! [`crate::limits::InFlightLimitLayer`] caps how many calls run; this caps
//! how much memory they hold. Every data frame of a request body is counted
//! as it arrives, and every data frame of a response body as it is
//! produced; a call's bytes stay counted until its response has been sent
//! (or dropped), because that is when its buffers are freed — a client that
//! reads its large answers slowly holds server memory all that time.
//!
//! - A new call that arrives while the count is at the limit is refused at
//!   once with `RESOURCE_EXHAUSTED`, naming the flag.
//! - A request whose body would take the count over the limit is refused
//!   while it arrives: its body ends with that status, which is what the
//!   client gets.
//! - A response is never cut short: its bytes are counted even past the
//!   limit (the call was admitted and its answer built), and new calls are
//!   refused until they are sent.
//!
//! So the bytes held never exceed the limit by more than the answers of the
//! calls in flight (each at most `--max-message-bytes`, and at most
//! `--max-in-flight` of them). Health checks and reflection are not
//! counted and never refused.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::limits::is_probe;

/// The shared count and its limit.
#[derive(Debug)]
struct Budget {
    used: AtomicU64,
    limit: u64,
    message: String,
}

impl Budget {
    fn refusal(&self) -> tonic::Status {
        tonic::Status::resource_exhausted(self.message.clone())
    }
}

/// Bytes counted for one call, given back when the last of its request
/// body, response future and response body is dropped.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    bytes: AtomicU64,
}

impl Held {
    fn add(&self, n: u64) -> u64 {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.budget.used.fetch_add(n, Ordering::Relaxed) + n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        self.budget.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A layer that sheds calls while the bytes held by calls in flight are at
/// `limit`.
#[derive(Debug, Clone)]
pub struct InFlightBytesLayer {
    budget: Arc<Budget>,
}

impl InFlightBytesLayer {
    /// Holds at most about `limit` bytes of requests and responses at once
    /// over every service this layer wraps (clones share the budget).
    /// `flag` names the setting in the error message.
    pub fn new(limit: u64, flag: &str) -> Self {
        Self {
            budget: Arc::new(Budget {
                used: AtomicU64::new(0),
                limit,
                message: format!(
                    "server is at its limit of {limit} bytes held by calls in flight ({flag}); retry with backoff"
                ),
            }),
        }
    }

    /// Bytes held by calls now.
    pub fn used(&self) -> u64 {
        self.budget.used.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for InFlightBytesLayer {
    type Service = InFlightBytes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightBytes {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// The service made by [`InFlightBytesLayer`].
#[derive(Debug, Clone)]
pub struct InFlightBytes<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S, B, RB> Service<http::Request<B>> for InFlightBytes<S>
where
    S: Service<http::Request<Body>, Response = http::Response<RB>>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BytesFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_probe(req.uri().path()) {
            return BytesFuture {
                inner: Some(self.inner.call(req.map(Body::new))),
                held: None,
                refused: None,
            };
        }
        if self.budget.used.load(Ordering::Relaxed) >= self.budget.limit {
            return BytesFuture {
                inner: None,
                held: None,
                refused: Some(self.budget.refusal().into_http()),
            };
        }
        let held = Arc::new(Held {
            budget: self.budget.clone(),
            bytes: AtomicU64::new(0),
        });
        let req = req.map(|body| {
            Body::new(Counted {
                inner: body,
                held: held.clone(),
                refuse_over_limit: true,
            })
        });
        BytesFuture {
            inner: Some(self.inner.call(req)),
            held: Some(held),
            refused: None,
        }
    }
}

pin_project! {
    /// The response future of [`InFlightBytes`].
    #[derive(Debug)]
    pub struct BytesFuture<F> {
        #[pin]
        inner: Option<F>,
        held: Option<Arc<Held>>,
        refused: Option<http::Response<Body>>,
    }
}

impl<F, RB, E> Future for BytesFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return match this.refused.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after completion: a caller bug; never resolve.
                None => Poll::Pending,
            };
        };
        let response = std::task::ready!(inner.poll(cx))?;
        Poll::Ready(Ok(match this.held.take() {
            // The response body keeps the call's bytes counted until it is
            // sent, and counts its own.
            Some(held) => response.map(|body| {
                Body::new(Counted {
                    inner: body,
                    held,
                    refuse_over_limit: false,
                })
            }),
            None => response.map(Body::new),
        }))
    }
}

pin_project! {
    /// A body whose data frames are counted against the budget.
    struct Counted<B> {
        #[pin]
        inner: B,
        held: Arc<Held>,
        // Requests: end with RESOURCE_EXHAUSTED past the limit. Responses:
        // always pass (never cut an answer short).
        refuse_over_limit: bool,
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let total = this.held.add(data.len() as u64);
                    if *this.refuse_over_limit && total > this.held.budget.limit {
                        return Poll::Ready(Some(Err(Box::new(this.held.budget.refusal()))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// A service that reads the whole request, then answers `answer`
    /// bytes, or the status its request body ended with.
    fn echo(
        answer: usize,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Future + Send,
    > + Clone {
        tower::service_fn(move |req: http::Request<Body>| async move {
            match req.into_body().collect().await {
                Ok(_) => Ok(http::Response::new(Body::new(http_body_util::Full::new(
                    Bytes::from(vec![0u8; answer]),
                )))),
                // tonic's body turns our boxed status back into a Status.
                Err(status) => Ok(status.into_http()),
            }
        })
    }

    fn request(bytes: usize) -> http::Request<http_body_util::Full<Bytes>> {
        http::Request::builder()
            .uri("/ringcache.v1.Cache/GetMany")
            .body(http_body_util::Full::new(Bytes::from(vec![1u8; bytes])))
            .unwrap()
    }

    fn status_of(r: &http::Response<Body>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(r.headers())
    }

    #[tokio::test]
    async fn a_response_holds_its_bytes_until_sent_and_new_calls_are_refused_meanwhile() {
        let layer = InFlightBytesLayer::new(1000, "--max-in-flight-bytes");
        let svc = layer.layer(echo(1500));
        let response = svc.clone().oneshot(request(10)).await.unwrap();
        assert!(status_of(&response).is_none());
        // Not sent yet: nothing counted beyond the request.
        assert_eq!(layer.used(), 10);
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().len(), 1500, "never cut short");
        assert_eq!(layer.used(), 1510);

        let refused = svc.clone().oneshot(request(10)).await.unwrap();
        let status = status_of(&refused).expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("limit of 1000 bytes held by calls in flight (--max-in-flight-bytes)"),
            "{}",
            status.message()
        );
        // Probes are never refused.
        let probe = http::Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let answered = svc.clone().oneshot(probe).await.unwrap();
        assert!(status_of(&answered).is_none());

        drop(body);
        assert_eq!(layer.used(), 0, "given back once the answer is gone");
        let again = svc.oneshot(request(10)).await.unwrap();
        assert!(status_of(&again).is_none());
    }

    #[tokio::test]
    async fn a_request_over_the_limit_is_refused_while_it_arrives() {
        let layer = InFlightBytesLayer::new(1000, "--max-in-flight-bytes");
        let svc = layer.layer(echo(1));
        let response = svc.oneshot(request(5000)).await.unwrap();
        let status = status_of(&response).expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--max-in-flight-bytes"));
        drop(response);
        assert_eq!(layer.used(), 0);
    }
}
