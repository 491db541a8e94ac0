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
//! - **What a handler builds is counted before it is built.** The frames
//!   alone would see an answer only once it is encoded — after the node
//!   answers were decoded, the answer merged and the message encoded, all
//!   of which a call holds at once. So each counted call carries a
//!   [`CallBytes`] in its request extensions: a handler holds the bytes of
//!   the answer it is about to build ([`CallBytes::hold`], refused with
//!   `RESOURCE_EXHAUSTED` when that would pass the limit, before any work),
//!   and marks the part that will be the encoded response as prepaid, so
//!   the response's frames are counted against it rather than twice.
//!
//! So the bytes held stay within the limit, give or take what handlers
//! under-estimated. Health checks and reflection are not counted and never
//! refused. Long-lived streams (`Internal/ApplyStream`, `Cache/Pipeline`)
//! are admitted like any call but their frames are not counted: they would
//! add up for the stream's whole life. An `ApplyStream` holds one batch and
//! one answer at a time (each at most `--max-message-bytes`); a `Pipeline`
//! counts each op as a call of its own ([`CallBytes::another`], held from
//! when the op is read until its answer is handed on); and there are at
//! most `--max-in-flight` streams.

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

/// Calls that stay open for many messages: admitted by the budget, their
/// frames not counted (see the module doc).
const LONG_LIVED_STREAMS: &[&str] = &[
    "/ringcache.v1.Internal/ApplyStream",
    crate::auth::PIPELINE_PATH,
];

fn is_long_lived_stream(path: &str) -> bool {
    LONG_LIVED_STREAMS.contains(&path)
}

/// The shared count and its limit.
#[derive(Debug)]
struct Budget {
    used: AtomicU64,
    limit: u64,
    message: String,
    /// The flag that sets `limit`, for messages.
    flag: String,
}

impl Budget {
    fn refusal(&self) -> tonic::Status {
        crate::exhausted::overloaded(self.message.clone())
    }
}

/// Bytes counted for one call, given back when the last of its request
/// body, response future, response body and [`CallBytes`] is dropped.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    bytes: AtomicU64,
    /// Bytes held by the handler for the encoded response: its frames use
    /// them up before adding to the count.
    prepaid: AtomicU64,
}

impl Held {
    fn add(&self, n: u64) -> u64 {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.budget.used.fetch_add(n, Ordering::Relaxed) + n
    }

    /// Takes up to `n` from `counter`; returns what it took.
    fn take(counter: &AtomicU64, n: u64) -> u64 {
        match counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        }) {
            Ok(before) | Err(before) => before.min(n),
        }
    }

    /// Counts `n` bytes of response frames: what was prepaid first.
    fn add_response(&self, n: u64) {
        let covered = Self::take(&self.prepaid, n);
        if covered < n {
            self.add(n - covered);
        }
    }
}

/// One call's share of the byte budget, for its handler: in the request's
/// extensions (`tonic::Request::extensions()`) of every call the layer
/// counts. Cheap to clone; the bytes stay held until the call's response
/// has been sent.
#[derive(Debug, Clone)]
pub struct CallBytes(Arc<Held>);

impl CallBytes {
    /// Holds `n` more bytes for this call — what it is about to build —
    /// or, if that would take the server past its limit, holds nothing and
    /// answers the status to refuse the call with.
    ///
    /// At most the whole budget is asked for, so a call larger than the
    /// budget still runs when it would be alone.
    pub fn hold(&self, n: u64) -> Result<(), tonic::Status> {
        let budget = &self.0.budget;
        let n = n.min(budget.limit);
        let used = budget.used.load(Ordering::Relaxed);
        if used.saturating_add(n) > budget.limit {
            return Err(crate::exhausted::overloaded(format!(
                "this call's answer needs about {n} bytes and calls in flight already hold {used} of the {} allowed ({}); retry with backoff, or ask for fewer keys",
                budget.limit, budget.flag
            )));
        }
        self.0.add(n);
        Ok(())
    }

    /// Holds `n` more bytes whatever the limit: bytes that exist already
    /// (an answer larger than was held for).
    pub fn hold_anyway(&self, n: u64) {
        self.0.add(n);
    }

    /// Gives back up to `n` of the bytes this call holds.
    pub fn release(&self, n: u64) {
        let taken = Held::take(&self.0.bytes, n);
        self.0.budget.used.fetch_sub(taken, Ordering::Relaxed);
        // What is no longer held cannot pay for the response.
        let prepaid = self.0.prepaid.load(Ordering::Relaxed);
        let held = self.0.bytes.load(Ordering::Relaxed);
        if prepaid > held {
            Held::take(&self.0.prepaid, prepaid - held);
        }
    }

    /// Marks `n` of the bytes held as the encoded response's: its frames
    /// are counted against them, not added again.
    pub fn prepay_response(&self, n: u64) {
        let held = self.0.bytes.load(Ordering::Relaxed);
        self.0.prepaid.store(n.min(held), Ordering::Relaxed);
    }

    /// Bytes this call holds now.
    pub fn held(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    /// A share of the same budget for another call holding nothing yet
    /// (one op of a `Pipeline` stream), given back when its last clone is
    /// dropped.
    pub fn another(&self) -> CallBytes {
        CallBytes(Arc::new(Held {
            budget: self.0.budget.clone(),
            bytes: AtomicU64::new(0),
            prepaid: AtomicU64::new(0),
        }))
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
                flag: flag.to_owned(),
            }),
        }
    }

    /// Bytes held by calls now.
    pub fn used(&self) -> u64 {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// Registers `ringcache_in_flight_bytes` (held now) and
    /// `ringcache_in_flight_bytes_limit` in `registry`: read from the
    /// budget at each scrape, nothing on the call path.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let used = prometheus::IntGauge::new(
            "ringcache_in_flight_bytes",
            "Bytes of requests and responses held by calls in flight now (--max-in-flight-bytes).",
        )?;
        let limit = prometheus::IntGauge::new(
            "ringcache_in_flight_bytes_limit",
            "The most bytes calls in flight may hold (--max-in-flight-bytes).",
        )?;
        limit.set(i64::try_from(self.budget.limit).unwrap_or(i64::MAX));
        registry.register(Box::new(BudgetCollector {
            budget: self.budget.clone(),
            used,
            limit,
        }))
    }
}

/// The budget's gauges, updated when scraped.
struct BudgetCollector {
    budget: Arc<Budget>,
    used: prometheus::IntGauge,
    limit: prometheus::IntGauge,
}

impl prometheus::core::Collector for BudgetCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.used.desc();
        descs.extend(self.limit.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let used = self.budget.used.load(Ordering::Relaxed);
        self.used.set(i64::try_from(used).unwrap_or(i64::MAX));
        let mut families = self.used.collect();
        families.extend(self.limit.collect());
        families
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
            prepaid: AtomicU64::new(0),
        });
        let mut req = req;
        if is_long_lived_stream(req.uri().path()) {
            // The handler counts what it holds per message (see the module
            // doc); the frames are not counted.
            req.extensions_mut().insert(CallBytes(held));
            return BytesFuture {
                inner: Some(self.inner.call(req.map(Body::new))),
                held: None,
                refused: None,
            };
        }
        req.extensions_mut().insert(CallBytes(held.clone()));
        let req = req.map(|body| Body::new(Counted::new(body, held.clone(), true)));
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
            Some(held) => response.map(|body| Body::new(Counted::new(body, held, false))),
            None => response.map(Body::new),
        }))
    }
}

/// The largest data frame a counted response hands on at once. hyper gives
/// a response's frames to h2 as soon as the stream has any send capacity,
/// and h2 buffers a whole frame however large; in frames of this size, h2's
/// flow control holds the rest back in the body — where it is counted —
/// while a client reads slowly, instead of in h2's buffers, where it is not.
const RESPONSE_CHUNK: usize = 64 * 1024;

pin_project! {
    /// A body whose data frames are counted against the budget.
    struct Counted<B> {
        #[pin]
        inner: B,
        held: Arc<Held>,
        // Requests: end with RESOURCE_EXHAUSTED past the limit. Responses:
        // always pass (never cut an answer short).
        refuse_over_limit: bool,
        // What is left of a large response frame, handed on in chunks.
        rest: Bytes,
    }
}

impl<B> Counted<B> {
    fn new(inner: B, held: Arc<Held>, refuse_over_limit: bool) -> Self {
        Self {
            inner,
            held,
            refuse_over_limit,
            rest: Bytes::new(),
        }
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
        if !this.rest.is_empty() {
            let n = this.rest.len().min(RESPONSE_CHUNK);
            return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))));
        }
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let n = data.len() as u64;
                        if *this.refuse_over_limit {
                            if this.held.add(n) > this.held.budget.limit {
                                return Poll::Ready(Some(Err(Box::new(
                                    this.held.budget.refusal(),
                                ))));
                            }
                        } else {
                            this.held.add_response(n);
                            if data.len() > RESPONSE_CHUNK {
                                *this.rest = data.split_off(RESPONSE_CHUNK);
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower().saturating_add(rest));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
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
    async fn the_gauges_show_the_bytes_held_when_scraped() {
        let layer = InFlightBytesLayer::new(1000, "--max-in-flight-bytes");
        let registry = prometheus::Registry::new();
        layer.register(&registry).unwrap();
        let gauge = |name: &str| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric()[0].get_gauge().get_value())
        };
        assert_eq!(gauge("ringcache_in_flight_bytes_limit"), Some(1000.0));
        assert_eq!(gauge("ringcache_in_flight_bytes"), Some(0.0));
        let svc = layer.layer(echo(1500));
        let response = svc.oneshot(request(10)).await.unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(gauge("ringcache_in_flight_bytes"), Some(1510.0));
        drop(body);
        assert_eq!(gauge("ringcache_in_flight_bytes"), Some(0.0));
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

    /// A handler that holds `hold` bytes for its answer before building it
    /// and prepays `answer` of them for the encoded response, then answers
    /// `answer` bytes — or the refusal `hold` gave it.
    fn handler(
        hold: u64,
        answer: usize,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Future + Send,
    > + Clone {
        tower::service_fn(move |req: http::Request<Body>| async move {
            let bytes = req
                .extensions()
                .get::<CallBytes>()
                .cloned()
                .expect("counted");
            if let Err(status) = bytes.hold(hold) {
                return Ok(status.into_http());
            }
            bytes.prepay_response(answer as u64);
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(
                http_body_util::Full::new(Bytes::from(vec![0u8; answer])),
            )))
        })
    }

    #[tokio::test]
    async fn what_a_handler_holds_is_counted_before_it_builds_and_not_twice() {
        let layer = InFlightBytesLayer::new(10_000, "--max-in-flight-bytes");
        // Holds 2 × 3000 (decoded answers + encoded response), answers 3000.
        let svc = layer.layer(handler(6000, 3000));
        let first = svc.clone().oneshot(request(10)).await.unwrap();
        assert!(status_of(&first).is_none());
        // (The handler never reads its request body, so only what it held
        // is counted.)
        assert_eq!(layer.used(), 6000, "held before the answer exists");
        let mut body = first.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(layer.used(), 6000, "the response's frames were prepaid");

        // A second such call would pass the limit: refused before any work,
        // naming the limit, and holding nothing.
        let second = svc.clone().oneshot(request(10)).await.unwrap();
        let status = status_of(&second).expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("--max-in-flight-bytes")
                && status.message().contains("6000 bytes"),
            "{}",
            status.message()
        );
        drop(second);
        assert_eq!(layer.used(), 6000);
        drop(body);
        assert_eq!(layer.used(), 0);
    }

    #[tokio::test]
    async fn a_call_larger_than_the_budget_runs_when_alone() {
        let layer = InFlightBytesLayer::new(1000, "--max-in-flight-bytes");
        let svc = layer.layer(handler(5000, 10));
        let alone = svc.clone().oneshot(request(10)).await.unwrap();
        assert!(status_of(&alone).is_none());
        assert_eq!(layer.used(), 1000, "held up to the whole budget");
        let second = svc.oneshot(request(10)).await.unwrap();
        assert_eq!(
            status_of(&second).map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
    }

    #[tokio::test]
    async fn released_bytes_no_longer_prepay_the_response() {
        let layer = InFlightBytesLayer::new(100_000, "--max-in-flight-bytes");
        let svc = tower::service_fn(|req: http::Request<Body>| async move {
            let bytes = req.extensions().get::<CallBytes>().cloned().unwrap();
            bytes.hold(5000).unwrap();
            bytes.prepay_response(5000);
            // The answer turned out smaller: give back what it does not need.
            bytes.release(4000);
            bytes.prepay_response(1000);
            assert_eq!(bytes.held(), 1000);
            bytes.hold_anyway(500);
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(
                http_body_util::Full::new(Bytes::from(vec![0u8; 1200])),
            )))
        });
        let svc = layer.layer(svc);
        let response = svc.oneshot(request(10)).await.unwrap();
        assert_eq!(layer.used(), 1500);
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        // 1000 prepaid, 200 beyond it.
        assert_eq!(layer.used(), 1700);
        drop(body);
        assert_eq!(layer.used(), 0);
    }

    #[tokio::test]
    async fn a_long_lived_stream_is_admitted_but_its_frames_do_not_pile_up() {
        let layer = InFlightBytesLayer::new(1000, "--max-in-flight-bytes");
        let svc = layer.layer(echo(5000));
        let stream = http::Request::builder()
            .uri("/ringcache.v1.Internal/ApplyStream")
            .body(http_body_util::Full::new(Bytes::from(vec![1u8; 5000])))
            .unwrap();
        let response = svc.clone().oneshot(stream).await.unwrap();
        assert!(status_of(&response).is_none());
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(layer.used(), 0);
        // Still refused while the server is at its limit.
        let big = svc.clone().oneshot(request(10)).await.unwrap();
        let mut big_body = big.into_body();
        big_body.frame().await.unwrap().unwrap();
        let stream = http::Request::builder()
            .uri("/ringcache.v1.Internal/ApplyStream")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let refused = svc.oneshot(stream).await.unwrap();
        assert_eq!(
            status_of(&refused).map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
    }
}
