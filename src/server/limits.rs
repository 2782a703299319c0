//! The call layer every gRPC call passes first, and the bounds on calls: how many are in
//! progress at once over all connections, and how many health Watch streams (which never end on
//! their own) are open. Past a bound the call is refused with RESOURCE_EXHAUSTED at once, never
//! queued; each refusal is counted (`credential_limit_hits_total`) and logged at most once per
//! [`LOG_EVERY`] per bound.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, codegen::http};
use tonic_health::{
    pb::{HealthCheckRequest, HealthCheckResponse, health_server::Health},
    server::HealthService,
};

use crate::{
    auth::{CallAudit, Callers},
    metrics::{self, LOG_EVERY, RpcCall, Throttled},
};

/// Health checks stay answerable while the service sheds other calls: probes must see it alive.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Every bound's refusal log.
static REFUSAL_LOGS: [&Throttled; 10] = [
    &CALLS_REFUSED,
    &OPEN_CALLS_REFUSED,
    &WATCHES_REFUSED,
    &super::conn::REFUSED,
    &super::conn::TIMED_OUT,
    &super::http::HTTP_REFUSED,
    &super::http::HTTP_TIMED_OUT,
    &super::http::HTTP_TOO_LARGE,
    &crate::service::WATCHERS_REFUSED,
    &crate::service::CALLER_WATCHERS_REFUSED,
];

/// Logs the refusals counted since each bound's last line: every [`LOG_EVERY`] while the server
/// runs, and once at the end, so the `hits` of the lines add up to the refusals.
pub(super) fn flush_refusal_logs() {
    for log in REFUSAL_LOGS {
        log.flush();
    }
}

/// [`flush_refusal_logs`] every [`LOG_EVERY`], for as long as it runs.
pub(super) async fn run_refusal_log_flusher() {
    let mut tick = tokio::time::interval(LOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        flush_refusal_logs();
    }
}

static CALLS_REFUSED: Throttled = Throttled::new(
    "calls_in_flight",
    "calls refused: too many in flight (--max-calls-in-flight / CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT)",
);
static OPEN_CALLS_REFUSED: Throttled = Throttled::new(
    "open_calls_in_flight",
    "calls to open methods refused: too many in flight (--max-open-calls-in-flight / CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT)",
);
static WATCHES_REFUSED: Throttled = Throttled::new(
    "health_watches",
    "health Watch refused: too many open (--max-health-watches / CREDENTIAL_SERVICE_MAX_HEALTH_WATCHES)",
);

/// The layer every gRPC call passes first: it times and counts the call (by method and status),
/// checks the caller ([`Callers::check`]), and bounds the calls in progress over all connections.
/// One layer for all three, because each wrapper around every call's future costs throughput on
/// the hot path.
///
/// The caller is checked before the call takes a place, and the methods anyone may call (health,
/// reflection) have their own bound: nobody without credentials can hold the places that callers
/// need, for instance with calls whose request body never comes.
#[derive(Clone, Debug)]
pub(super) struct CallLayer {
    bounds: Arc<Bounds>,
    callers: Callers,
}

/// `--max-calls-in-flight` for authenticated calls, `--max-open-calls-in-flight` for the rest.
#[derive(Debug)]
struct Bounds {
    authenticated: Arc<InFlightBound>,
    open: Arc<InFlightBound>,
}

/// Calls in progress against `--max-calls-in-flight`: a counter, taken and given back without a
/// lock.
#[derive(Debug)]
struct InFlightBound {
    in_flight: AtomicUsize,
    max: usize,
}

impl InFlightBound {
    fn admit(self: &Arc<Self>) -> Option<InFlightPermit> {
        // Never counts past `max`, even for a moment: a refusal means the bound was really full.
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(InFlightPermit(self.clone()))
    }
}

/// One admitted call's place; given back when the call's future is dropped.
#[derive(Debug)]
struct InFlightPermit(Arc<InFlightBound>);

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CallLayer {
    /// `callers` may be reloaded while the server runs.
    pub(super) fn new(
        max_calls_in_flight: usize,
        max_open_calls_in_flight: usize,
        callers: Callers,
    ) -> Self {
        let bound = |max| {
            Arc::new(InFlightBound {
                in_flight: AtomicUsize::new(0),
                max,
            })
        };
        Self {
            bounds: Arc::new(Bounds {
                authenticated: bound(max_calls_in_flight),
                open: bound(max_open_calls_in_flight),
            }),
            callers,
        }
    }
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = Calls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Calls {
            inner,
            bounds: self.bounds.clone(),
            callers: self.callers.clone(),
        }
    }
}

/// The service [`CallLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub(super) struct Calls<S> {
    inner: S,
    bounds: Arc<Bounds>,
    callers: Callers,
}

impl<S, B> tower::Service<http::Request<B>> for Calls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let call = RpcCall::start(request.uri().path());
        let audit = match self.callers.check(&mut request, call.method()) {
            Ok(audit) => audit,
            Err(status) => return CallFuture::refused(&call, status),
        };
        // `audit` is `None` for the methods anyone may call; of those, health checks take no
        // place at all.
        let bound = match &audit {
            Some(_) => Some((&self.bounds.authenticated, &CALLS_REFUSED)),
            None if request.uri().path() == HEALTH_CHECK => None,
            None => Some((&self.bounds.open, &OPEN_CALLS_REFUSED)),
        };
        let permit = match bound {
            None => None,
            Some((bound, refusals)) => match bound.admit() {
                Some(permit) => Some(permit),
                None => {
                    refusals.hit();
                    let code = tonic::Code::ResourceExhausted;
                    if let Some(audit) = &audit {
                        audit.ended(code);
                    }
                    let status = Status::new(code, "too many calls in progress; retry later");
                    return CallFuture::refused(&call, status);
                }
            },
        };
        CallFuture::Admitted {
            inner: self.inner.call(request),
            record: CallRecord {
                call,
                audit,
                done: false,
            },
            permit,
        }
    }
}

/// What an admitted call leaves in the metrics and, if its handler did not audit it, in the
/// audit trail: once, with the status of its answer's head, or with CANCELLED if the call is
/// dropped before (the client reset the stream, or shutdown's grace ran out).
pub(super) struct CallRecord {
    call: RpcCall,
    audit: Option<CallAudit>,
    done: bool,
}

impl CallRecord {
    fn end(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.call.finish(code);
        if let Some(audit) = &self.audit {
            audit.ended(code);
        }
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// A call's future: it holds the call's in-flight place until the answer's head is ready
    /// (for unary calls: until the request has been read and handled), then records the call
    /// ([`CallRecord`]).
    #[project = CallFutureProj]
    pub(super) enum CallFuture<F> {
        Admitted {
            #[pin]
            inner: F,
            record: CallRecord,
            permit: Option<InFlightPermit>,
        },
        Refused {
            response: Option<http::Response<tonic::body::Body>>,
        },
    }
}

impl<F> CallFuture<F> {
    /// Refuses the call with `status` without running it.
    fn refused(call: &RpcCall, status: Status) -> Self {
        call.finish(status.code());
        CallFuture::Refused {
            response: Some(status.into_http()),
        }
    }
}

impl<F, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallFutureProj::Admitted {
                inner,
                record,
                permit,
            } => {
                let result = std::task::ready!(match &mut record.audit {
                    Some(audit) => audit.enter(|| inner.poll(cx)),
                    None => inner.poll(cx),
                });
                record.end(match &result {
                    Ok(response) => metrics::grpc_status(response.headers()),
                    Err(_) => tonic::Code::Unknown,
                });
                // The in-flight place is given back now, not when the future is dropped.
                permit.take();
                Poll::Ready(result)
            }
            CallFutureProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
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
            WATCHES_REFUSED.hit();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_bound_admits_up_to_its_max_and_frees_places_as_calls_end() {
        let bound = Arc::new(InFlightBound {
            in_flight: AtomicUsize::new(0),
            max: 2,
        });
        let first = bound.admit().expect("a free place");
        let _second = bound.admit().expect("a free place");
        assert!(
            bound.admit().is_none(),
            "a third call while two are in flight"
        );
        assert_eq!(
            bound.in_flight.load(Ordering::Acquire),
            2,
            "a refusal takes nothing"
        );
        drop(first);
        assert!(bound.admit().is_some(), "the ended call's place");
    }
}
