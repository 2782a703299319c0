//! The gRPC side: the credential service with health and reflection (v1 and v1alpha, for grpcurl
//! 1.8) behind the metrics and caller-check layers, optional TLS, and the drain at shutdown.

use std::future::Future;

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use super::{DRAIN_GRACE, MAX_REQUEST_BYTES, ServeError};
use crate::{
    auth::AuthLayer,
    broker::Broker,
    config::{ServiceConfig, TlsConfig},
    metrics::RpcMetricsLayer,
    proto::{self, credential_service_server::CredentialServiceServer},
    service::CredentialApi,
};

/// Serves gRPC on `listener` until `shutdown` resolves; then health turns NOT_SERVING and open
/// calls get [`DRAIN_GRACE`] to finish.
pub(super) async fn serve(
    listener: TcpListener,
    config: &ServiceConfig,
    broker: &Broker,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CredentialServiceServer<CredentialApi>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let api = CredentialServiceServer::new(CredentialApi::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    let (draining, mut drain_started) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
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
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls_config(tls))?;
    }
    let served = builder
        .layer(RpcMetricsLayer)
        .layer(AuthLayer::new(config.callers.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        served = served => served?,
        () = drain_deadline => {
            tracing::warn!(grace = ?DRAIN_GRACE, "calls still open after the grace period; closing them");
        }
    }
    Ok(())
}

fn tls_config(tls: &TlsConfig) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    match &tls.client_ca_pem {
        // Optional: bearer-token callers need no certificate; a presented one must verify.
        Some(ca) => config
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true),
        None => config,
    }
}
