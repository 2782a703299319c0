//! Bounds on calls: how many are in progress at once over all connections, and how many health
//! Watch streams (which never end on their own) are open. Past a bound the call is refused with
//! RESOURCE_EXHAUSTED at once, never queued; each refusal is counted
//! (`credential_limit_hits_total`) and logged at most once per [`LOG_EVERY`] per bound.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{
    Stream, StreamExt,
    future::{Either, Ready, ready},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, codegen::http};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::HealthService,
};

use crate::metrics;

/// How often, at most, one bound's refusals are logged (with the count since the last line).
pub(super) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Health checks stay answerable while the service sheds other calls: probes must see it alive.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// A log line per bound at most every [`LOG_EVERY`], carrying how many hits it stands for.
pub(super) struct Throttled {
    what: &'static str,
    since_last: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Throttled {
    pub(super) const fn new(what: &'static str) -> Self {
        Self {
            what,
            since_last: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// Counts one hit of the bound (metric and, now and then, a warning naming `limit`).
    pub(super) fn hit(&self, limit: &'static str) {
        metrics::record_limit_hit(limit);
        self.since_last.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let hits = self.since_last.swap(0, Ordering::Relaxed);
        tracing::warn!(limit, hits, "{}", self.what);
    }
}

static CALLS_REFUSED: Throttled = Throttled::new(
    "calls refused: too many in flight (--max-calls-in-flight / CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT)",
);
static WATCHES_REFUSED: Throttled = Throttled::new(
    "health Watch refused: too many open (--max-health-watches / CREDENTIAL_SERVICE_MAX_HEALTH_WATCHES)",
);

/// The tower layer that bounds the calls in progress over all connections.
#[derive(Clone, Debug)]
pub(super) struct InFlightLayer {
    permits: Arc<Semaphore>,
}

impl InFlightLayer {
    pub(super) fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// The service [`InFlightLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub(super) struct InFlight<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> tower::Service<http::Request<B>> for InFlight<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Permitted<S::Future>, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == HEALTH_CHECK {
            return Either::Left(Permitted {
                inner: self.inner.call(request),
                _permit: None,
            });
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Either::Left(Permitted {
                inner: self.inner.call(request),
                _permit: Some(permit),
            }),
            Err(_) => {
                CALLS_REFUSED.hit("calls_in_flight");
                let status = Status::resource_exhausted("too many calls in progress; retry later");
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future holding its in-flight permit until the answer's head is ready (for unary
    /// calls: until the request has been read and handled).
    pub(super) struct Permitted<F> {
        #[pin]
        inner: F,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

/// tonic-health's service with a cap on open Watch streams: each holds a permit until the
/// stream is dropped (the peer went away or the server shuts down).
pub(super) struct CappedHealth {
    inner: HealthService,
    watches: Arc<Semaphore>,
}

impl CappedHealth {
    pub(super) fn new(inner: HealthService, max_watches: usize) -> Self {
        Self {
            inner,
            watches: Arc::new(Semaphore::new(max_watches)),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for CappedHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Ok(permit) = self.watches.clone().try_acquire_owned() else {
            WATCHES_REFUSED.hit("health_watches");
            return Err(Status::resource_exhausted(
                "too many health Watch streams open; use Check, or retry later",
            ));
        };
        let stream = self.inner.watch(request).await?.into_inner();
        let stream: WatchStream = Box::pin(stream.map(move |item| {
            let _held = &permit;
            item
        }));
        Ok(Response::new(stream))
    }
}
