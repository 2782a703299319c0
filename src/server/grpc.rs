//! The gRPC side: the credential service with health and reflection (v1 and v1alpha, for grpcurl
//! 1.8) behind the call layer (metrics, calls in flight, the caller check), with the listener's
//! bounds (request size on every service, streams per connection, HTTP/2 keepalive; connections
//! and handshakes in `conn`, calls in flight and health watches in `limits`), optional TLS, and
//! the drain at shutdown.

use std::future::Future;

use tokio::{net::TcpListener, sync::watch};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::{
    DRAIN_GRACE, conn,
    error::ServeError,
    limits::{CallLayer, CappedHealth},
};
use crate::{
    broker::Broker,
    config::ServiceConfig,
    proto::{self, credential_service_server::CredentialServiceServer},
    service::{CredentialApi, WatchBounds},
};

/// Serves gRPC on `listener` until `shutdown` resolves; then health turns NOT_SERVING and open
/// calls get [`DRAIN_GRACE`] to finish.
pub(super) async fn serve(
    listener: TcpListener,
    config: &ServiceConfig,
    broker: &Broker,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let limits = &config.limits;
    let max_request = limits.max_request_bytes;
    let health = HealthReporter::new();
    health
        .set_serving::<CredentialServiceServer<CredentialApi>>()
        .await;
    let health_service = HealthServer::new(CappedHealth::new(
        HealthService::from_health_reporter(health.clone()),
        limits.max_health_watches,
    ))
    .max_decoding_message_size(max_request);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()?
        .max_decoding_message_size(max_request);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(max_request);
    // Cancelled when shutdown begins: WatchToken streams end then, instead of holding the drain.
    let watches_end = tokio_util::sync::CancellationToken::new();
    // Without a callers file every call is the same anonymous caller: no per-caller bound then.
    let watchers = WatchBounds::new(
        limits.max_watchers,
        limits.watchers_kept_for_admins,
        (!config.callers.is_open()).then_some(limits.max_watchers_per_caller),
    );
    let api = CredentialServiceServer::new(CredentialApi::new(
        broker.clone(),
        watchers,
        watches_end.clone(),
    ))
    .max_decoding_message_size(max_request);
    let tls = config.tls.clone();

    let (draining, mut drain_started) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        watches_end.cancel();
        health
            .set_not_serving::<CredentialServiceServer<CredentialApi>>()
            .await;
        draining.send_replace(true);
    };
    // Calls that never end on their own (health Watch streams) must not hold the exit forever.
    let drain_deadline = async move {
        let _ = drain_started.wait_for(|started| *started).await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    let server = super::http2_server(limits);
    let server = match config.traces {
        Some(sampling) => {
            server.trace_fn(move |request| super::trace::call_span(sampling, request))
        }
        None => server,
    };
    let router = server
        .layer(CallLayer::new(
            limits.max_calls_in_flight,
            limits.max_open_calls_in_flight,
            config.callers.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api);
    let served = async {
        match tls {
            Some(tls) => {
                let incoming = conn::tls(listener, limits, tls);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                let incoming = conn::plain(listener, limits);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    };
    tokio::select! {
        served = served => served?,
        () = drain_deadline => {
            tracing::warn!(grace = ?DRAIN_GRACE, "calls still open after the grace period; closing them");
        }
    }
    Ok(())
}
