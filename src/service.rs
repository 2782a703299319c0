//! The `credential.v1.CredentialService` gRPC surface: parse requests into domain types, call the
//! broker, turn its answers into messages and its errors into statuses. Nothing else lives here.

use std::time::Duration;

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::{
    account::AccountId,
    broker::Broker,
    clock::to_timestamp,
    error::Error,
    proto::{
        BeginAuthRequest, BeginAuthResponse, CompleteAuthRequest, CompleteAuthResponse,
        GetTokenRequest, GetTokenResponse, credential_service_server::CredentialService,
    },
};

/// Longest `min_validity` a caller may ask for before the broker compares it with real lifetimes.
const MAX_MIN_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct CredentialApi {
    broker: Broker,
}

impl CredentialApi {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

fn parse_account(raw: &str) -> Result<AccountId, Error> {
    let account = AccountId::parse(raw)?;
    tracing::Span::current().record("account", tracing::field::display(&account));
    Ok(account)
}

fn parse_min_validity(raw: Option<prost_types::Duration>) -> Result<Duration, Error> {
    let Some(d) = raw else {
        return Ok(Duration::ZERO);
    };
    let d = Duration::try_from(d)
        .map_err(|_| Error::InvalidArgument("min_validity must be a non-negative duration"))?;
    if d > MAX_MIN_VALIDITY {
        return Err(Error::InvalidArgument(
            "min_validity is longer than any EdgeTag token lives; ask for less",
        ));
    }
    Ok(d)
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    #[tracing::instrument(name = "BeginAuth", skip_all, fields(account = tracing::field::Empty))]
    async fn begin_auth(
        &self,
        request: Request<BeginAuthRequest>,
    ) -> Result<Response<BeginAuthResponse>, Status> {
        let account = parse_account(&request.get_ref().account)?;
        let auth = self.broker.begin(account).await?;
        tracing::info!("authorization started");
        Ok(Response::new(BeginAuthResponse {
            authorize_url: auth.authorize_url.into(),
            state: auth.state,
            expires_at: Some(to_timestamp(auth.expires_at)),
        }))
    }

    #[tracing::instrument(name = "CompleteAuth", skip_all, fields(account = tracing::field::Empty))]
    async fn complete_auth(
        &self,
        request: Request<CompleteAuthRequest>,
    ) -> Result<Response<CompleteAuthResponse>, Status> {
        let CompleteAuthRequest { code, state } = request.into_inner();
        let (account, tokens) = self.broker.complete(&code, &state).await?;
        Ok(Response::new(CompleteAuthResponse {
            account: account.to_string(),
            expires_at: Some(to_timestamp(tokens.expires_at)),
        }))
    }

    #[tracing::instrument(name = "GetToken", skip_all, fields(account = tracing::field::Empty))]
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let request = request.get_ref();
        let account = parse_account(&request.account)?;
        let min_validity = parse_min_validity(request.min_validity)?;
        let tokens = self.broker.get_token(&account, min_validity).await?;
        Ok(Response::new(GetTokenResponse {
            access_token: tokens.access_token.expose_secret().to_owned(),
            token_type: tokens.token_type.clone(),
            expires_at: Some(to_timestamp(tokens.expires_at)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_validity_bounds() {
        assert_eq!(parse_min_validity(None).unwrap(), Duration::ZERO);
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(
            parse_min_validity(d(90, 0)).unwrap(),
            Duration::from_secs(90)
        );
        assert!(parse_min_validity(d(-1, 0)).is_err());
        assert!(parse_min_validity(d(31 * 24 * 3600, 0)).is_err());
    }
}
