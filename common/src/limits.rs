//! Load shedding: a cap on in-flight requests across all connections.
//!
//! tower's `ConcurrencyLimit` queues callers when the limit is reached, and
//! tonic's own `load_shed` answers with a message about "the connection"
//! even when the limit is global. [`InFlightLimitLayer`] does what a cache
//! wants instead: when `limit` requests are already running, the next one is
//! answered at once with `RESOURCE_EXHAUSTED` and a message naming the limit,
//! so overload costs the client a retry and the server nothing — no queue
//! grows, no memory is held for waiting requests. Health checks and
//! reflection are never shed: probes must answer on a busy server.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::grpc::{HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA};

/// A layer that sheds requests beyond `limit` in flight at once.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    semaphore: Arc<Semaphore>,
    message: Arc<str>,
}

impl InFlightLimitLayer {
    /// Allows at most `limit` requests in flight at once over every service
    /// this layer wraps (clones share the budget). `flag` names the setting
    /// in the error message so an operator knows what to raise.
    pub fn new(limit: usize, flag: &str) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            message: format!(
                "server is at its limit of {limit} in-flight requests ({flag}); retry with backoff"
            )
            .into(),
        }
    }

    /// Requests currently admitted.
    pub fn in_flight(&self, limit: usize) -> usize {
        limit.saturating_sub(self.semaphore.available_permits())
    }
}

/// Whether a call is a probe (`grpc.health.v1.Health`, server reflection),
/// which bypasses the limit: cheap, and must answer under load.
pub(crate) fn is_probe(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(service, _)| {
            matches!(service, HEALTH_SERVICE | REFLECTION_V1 | REFLECTION_V1ALPHA)
        })
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            semaphore: self.semaphore.clone(),
            message: self.message.clone(),
        }
    }
}

/// The service made by [`InFlightLimitLayer`].
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    semaphore: Arc<Semaphore>,
    message: Arc<str>,
}

impl<S, B, RB> Service<http::Request<B>> for InFlightLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = InFlightFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_probe(req.uri().path()) {
            // Never shed a probe: a kubelet that sees a busy server fail
            // its health check restarts it, wiping its cache.
            return InFlightFuture::Probe {
                inner: self.inner.call(req),
            };
        }
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => InFlightFuture::Admitted {
                inner: self.inner.call(req),
                _permit: permit,
            },
            Err(_) => InFlightFuture::Shed {
                response: Some(crate::exhausted::overloaded(&*self.message).into_http()),
            },
        }
    }
}

pin_project! {
    /// The response future of [`InFlightLimit`]: either the admitted call,
    /// holding its permit until it completes, or an immediate refusal.
    #[project = InFlightProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // variant fields: the inner call and its permit, or the refusal

    pub enum InFlightFuture<F, RB> {
        /// The call was admitted.
        Admitted {
            #[pin]
            inner: F,
            _permit: OwnedSemaphorePermit,
        },
        /// A health check or reflection call, which is never shed.
        Probe {
            #[pin]
            inner: F,
        },
        /// The call was shed.
        Shed {
            response: Option<http::Response<RB>>,
        },
    }
}

impl<F, RB, E> Future for InFlightFuture<F, RB>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            InFlightProj::Admitted { inner, .. } | InFlightProj::Probe { inner } => inner.poll(cx),
            InFlightProj::Shed { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after completion: a caller bug; never resolve.
                None => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;
    use tower_test::mock;

    #[tokio::test]
    async fn sheds_beyond_limit_and_recovers() {
        let (svc, mut handle) = mock::pair::<http::Request<()>, http::Response<String>>();
        let layer = InFlightLimitLayer::new(2, "--max-in-flight");
        let mut svc = layer.layer(svc);
        handle.allow(10);

        let req = || http::Request::new(());
        let first = svc.ready().await.unwrap().call(req());
        let second = svc.ready().await.unwrap().call(req());
        assert_eq!(layer.in_flight(2), 2);

        // The third is refused at once, without reaching the inner service.
        let shed = svc.ready().await.unwrap().call(req()).await.unwrap();
        let status = tonic::Status::from_header_map(shed.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("limit of 2 in-flight requests (--max-in-flight)")
        );

        // Finishing one admitted call frees its permit.
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new("one".to_owned()));
        assert_eq!(first.await.unwrap().into_body(), "one");
        assert_eq!(layer.in_flight(2), 1);

        let third = svc.ready().await.unwrap().call(req());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(http::Response::new("two".to_owned()));
        let (_, send3) = handle.next_request().await.unwrap();
        send3.send_response(http::Response::new("three".to_owned()));
        assert_eq!(second.await.unwrap().into_body(), "two");
        assert_eq!(third.await.unwrap().into_body(), "three");
        assert_eq!(layer.in_flight(2), 0);
    }

    #[tokio::test]
    async fn health_checks_and_reflection_are_never_shed() {
        let (svc, mut handle) = mock::pair::<http::Request<()>, http::Response<String>>();
        let layer = InFlightLimitLayer::new(1, "--max-in-flight");
        let mut svc = layer.layer(svc);
        handle.allow(10);
        let req = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let _busy = svc
            .ready()
            .await
            .unwrap()
            .call(req("/ringcache.v1.Cache/Get"));
        let (_, _busy_reply) = handle.next_request().await.unwrap();
        let shed = svc
            .ready()
            .await
            .unwrap()
            .call(req("/ringcache.v1.Cache/Get"))
            .await
            .unwrap();
        assert!(tonic::Status::from_header_map(shed.headers()).is_some());
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            let probe = svc.ready().await.unwrap().call(req(path));
            let (seen, send) = handle.next_request().await.unwrap();
            assert_eq!(seen.uri().path(), path);
            send.send_response(http::Response::new("serving".to_owned()));
            assert_eq!(probe.await.unwrap().into_body(), "serving");
        }
    }
}
