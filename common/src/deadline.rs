//! Request deadlines: the client's `grpc-timeout`, and the server layer
//! that enforces it together with `--request-timeout`.
//!
//! tonic's own `Server::timeout` wraps every layer added with
//! `Server::layer`, so a call it cuts short is dropped before the metrics
//! and span layers see its outcome. [`DeadlineLayer`] is one of our layers
//! instead, placed inside metrics and tracing: a call that runs out of time
//! is answered `DEADLINE_EXCEEDED`, and counted and traced as such.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`), as the gRPC over HTTP/2 spec defines it.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time the client allows, from a request's `grpc-timeout` header.
pub fn client_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    parse_timeout(headers.get("grpc-timeout")?.to_str().ok()?)
}

/// When a request must be answered by, if its client set a deadline: an
/// [`OpDeadline`] (one op of a `Pipeline`), else its `grpc-timeout`.
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    if let Some(OpDeadline(at)) = request.extensions().get::<OpDeadline>() {
        return Some(*at);
    }
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_timeout(value).map(|d| Instant::now() + d)
}

/// The deadline of one op of a `Pipeline` stream, in its request's
/// extensions: what `grpc-timeout` is to a unary call.
#[derive(Debug, Clone, Copy)]
pub struct OpDeadline(pub Instant);

/// The status of a call dropped before it finished: `DEADLINE_EXCEEDED` if
/// its `deadline` had passed (a timer outside the layer that records it
/// cut it short — tonic enforces `grpc-timeout` outside every server layer),
/// else `CANCELLED` (its caller went away). One definition for the servers'
/// metrics and spans and the orchestrator's node calls.
pub fn unfinished_code(deadline: Option<tokio::time::Instant>) -> tonic::Code {
    // The timer that fired started a moment before the one we compare
    // with: allow for that.
    let slack = Duration::from_millis(1);
    match deadline {
        Some(d) if tokio::time::Instant::now() + slack >= d => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Cancelled,
    }
}

/// Answers `DEADLINE_EXCEEDED` when a call outlives the shorter of the
/// client's `grpc-timeout` and the server's limit.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// No call runs longer than `limit` (`--request-timeout`).
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

/// The service made by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B, RB> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (wait, from_client) = match client_timeout(req.headers()) {
            Some(t) if t < self.limit => (t, true),
            _ => (self.limit, false),
        };
        DeadlineFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep(wait),
            wait,
            from_client,
        }
    }
}

pin_project! {
    /// The response future of [`Deadline`].
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: tokio::time::Sleep,
        wait: Duration,
        from_client: bool,
    }
}

impl<F, RB, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        std::task::ready!(this.sleep.poll(cx));
        let message = if *this.from_client {
            format!("the call's deadline ({:?}) passed", this.wait)
        } else {
            format!(
                "the call ran past the server's limit of {:?} (--request-timeout)",
                this.wait
            )
        };
        Poll::Ready(Ok(tonic::Status::deadline_exceeded(message).into_http()))
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in ["", "5", "S", "5s", "123456789S", "-1S", "+1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_the_header() {
        let mut r = tonic::Request::new(());
        assert!(deadline(&r).is_none());
        r.set_timeout(Duration::from_millis(500));
        let d = deadline(&r).unwrap();
        assert!(d > Instant::now() && d <= Instant::now() + Duration::from_millis(500));
    }

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri("/ringcache.v1.Cache/Get");
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(()).unwrap()
    }

    fn status(response: &http::Response<String>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    #[tokio::test(start_paused = true)]
    async fn answers_deadline_exceeded_naming_what_ran_out() {
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new("late".to_owned()))
        });
        let service = DeadlineLayer::new(Duration::from_secs(5)).layer(slow);

        let r = service
            .clone()
            .oneshot(request(Some("100m")))
            .await
            .unwrap();
        let s = status(&r).unwrap();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("deadline (100ms)"), "{}", s.message());

        let r = service.clone().oneshot(request(None)).await.unwrap();
        let s = status(&r).unwrap();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("--request-timeout"), "{}", s.message());

        // A client deadline longer than the limit: the limit wins.
        let r = service.oneshot(request(Some("1H"))).await.unwrap();
        assert!(status(&r).unwrap().message().contains("5s"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_time_passes_through() {
        let fast = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new("ok".to_owned()))
        });
        let service = DeadlineLayer::new(Duration::from_secs(5)).layer(fast);
        let r = service.oneshot(request(Some("1S"))).await.unwrap();
        assert!(status(&r).is_none());
        assert_eq!(r.into_body(), "ok");
    }
}
