//! The floor: the same tonic stack as the service (tonic `Server` with the service's HTTP/2
//! settings from [`server::http2_server`], the same routes for health and reflection, Nagle off,
//! the same request size limit, tonic's `Grpc::unary` with the prost codec exactly as the generated
//! `CredentialServiceServer` dispatches it) whose GetToken answers a constant. The service can
//! only be slower than this; how much slower is what the suite reports.
//!
//! The routing is written out instead of implementing the generated trait so the floor keeps
//! compiling when RPCs are added to the proto; GetToken's path goes through the very same code.
//!
//! `--lookup-floor` runs a variant that finds each account's own answer by name in a hash map of
//! every loaded account: the least any per-account answer costs. It is not the target's floor; it
//! tells how much of the gap with many accounts is the lookup's cache misses.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use credential_service::{
    config::Limits,
    proto::{self, GetTokenRequest, GetTokenResponse, credential_service_server::SERVICE_NAME},
    server::{self, MAX_REQUEST_BYTES, ServeError},
};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status,
    body::Body,
    codegen::{Body as HttpBody, Service, StdError, http},
    server::{Grpc, NamedService, UnaryService},
    transport::{Server, server::TcpIncoming},
};

const GET_TOKEN_PATH: &str = "/credential.v1.CredentialService/GetToken";

/// Serves the floor on `listener` until `shutdown`, with the routes the service registers; on
/// tonic's default HTTP/2 settings if `bare`; with each of `lookup`'s accounts answered by its own
/// token if given.
pub async fn run(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    bare: bool,
    lookup: Option<Arc<[String]>>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FloorService>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // The production defaults: keepalive makes hyper time every frame, a cost of the transport
    // that a floor without it would charge to the service.
    let mut server = if bare {
        Server::builder()
    } else {
        server::http2_server(&Limits::DEFAULT)
    };
    server
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(FloorService::new(lookup.as_deref()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// `credential.v1.CredentialService` whose GetToken returns a token of the real size: one
/// constant, or (lookup floor) the account's own.
#[derive(Clone)]
pub struct FloorService {
    answers: Arc<Answers>,
}

enum Answers {
    Constant(GetTokenResponse),
    /// Keyed like the service's account map (foldhash).
    PerAccount(HashMap<String, GetTokenResponse, foldhash::fast::RandomState>),
}

impl FloorService {
    fn new(lookup: Option<&[String]>) -> Self {
        let expires = SystemTime::now() + Duration::from_secs(7200);
        let answer = || GetTokenResponse {
            access_token: crate::fixture::random_token("eta_"),
            token_type: "Bearer".into(),
            expires_at: Some(prost_types::Timestamp::from(expires)),
            // The service answers with the account's team too.
            team_id: fake_edgetag::FAKE_TEAM_ID.into(),
        };
        let answers = match lookup {
            None => Answers::Constant(answer()),
            Some(accounts) => {
                Answers::PerAccount(accounts.iter().map(|a| (a.clone(), answer())).collect())
            }
        };
        Self {
            answers: Arc::new(answers),
        }
    }
}

impl NamedService for FloorService {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for FloorService
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == GET_TOKEN_PATH {
            let method = FloorGetToken(self.answers.clone());
            Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default())
                    .apply_compression_config(Default::default(), Default::default())
                    .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                Ok(grpc.unary(method, req).await)
            })
        } else {
            Box::pin(async move {
                let mut response = http::Response::new(Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            })
        }
    }
}

struct FloorGetToken(Arc<Answers>);

impl UnaryService<GetTokenRequest> for FloorGetToken {
    type Response = GetTokenResponse;
    // Boxed like the generated code's handler future.
    type Future = BoxFuture<'static, Result<Response<GetTokenResponse>, Status>>;

    fn call(&mut self, request: Request<GetTokenRequest>) -> Self::Future {
        // Answered before the future, so the request is dropped here, as the constant floor
        // always did.
        let answer = match &*self.0 {
            Answers::Constant(answer) => Ok(answer.clone()),
            Answers::PerAccount(map) => map
                .get(&request.get_ref().account)
                .cloned()
                .ok_or_else(|| Status::not_found("no such account")),
        };
        Box::pin(async move { answer.map(Response::new) })
    }
}
