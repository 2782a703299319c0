//! The `credential.v1.CredentialService` gRPC surface: parse requests into domain types, call the
//! broker, turn its answers into messages and its errors into statuses. Nothing else lives here.
//! Each handler checks the caller's account (see [`crate::auth`]) before the broker looks the
//! account up, and leaves one audit event (see [`crate::audit`]).

use std::time::Duration;

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use crate::{
    account::AccountId,
    audit, auth,
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
        let caller = auth::caller(request.extensions())?;
        let account = match parse_account(&request.get_ref().account) {
            Ok(account) => account,
            Err(e) => return Err(audited("BeginAuth", caller.name(), "", e.into())),
        };
        let result = async {
            auth::authorize_account(request.extensions(), &account)?;
            let auth = self.broker.begin(account.clone()).await?;
            tracing::info!("authorization started");
            Ok(Response::new(BeginAuthResponse {
                authorize_url: auth.authorize_url.into(),
                state: auth.state,
                expires_at: Some(to_timestamp(auth.expires_at)),
            }))
        }
        .await;
        audit::record(
            "BeginAuth",
            caller.name(),
            account.as_str(),
            audit::outcome(&result),
        );
        result
    }

    /// Needs the admin role (checked by the auth layer). The account is not known before the
    /// state is claimed; the admin who called BeginAuth for it was checked against it, and the
    /// state (random, single use, short-lived) carries that decision.
    #[tracing::instrument(name = "CompleteAuth", skip_all, fields(account = tracing::field::Empty))]
    async fn complete_auth(
        &self,
        request: Request<CompleteAuthRequest>,
    ) -> Result<Response<CompleteAuthResponse>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let CompleteAuthRequest { code, state } = request.into_inner();
        match self.broker.complete(&code, &state).await {
            Ok((account, tokens)) => {
                audit::record(
                    "CompleteAuth",
                    caller.name(),
                    account.as_str(),
                    tonic::Code::Ok,
                );
                Ok(Response::new(CompleteAuthResponse {
                    account: account.to_string(),
                    expires_at: Some(to_timestamp(tokens.expires_at)),
                }))
            }
            Err(e) => Err(audited("CompleteAuth", caller.name(), "", e.into())),
        }
    }

    #[tracing::instrument(name = "GetToken", skip_all, fields(account = tracing::field::Empty))]
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let caller = auth::caller(request.extensions())?;
        let raw = request.get_ref();
        let account = match parse_account(&raw.account) {
            Ok(account) => account,
            Err(e) => return Err(audited("GetToken", caller.name(), "", e.into())),
        };
        let result = async {
            auth::authorize_account(request.extensions(), &account)?;
            let min_validity = parse_min_validity(raw.min_validity)?;
            let tokens = self.broker.get_token(&account, min_validity).await?;
            Ok(Response::new(GetTokenResponse {
                access_token: tokens.access_token.expose_secret().to_owned(),
                token_type: tokens.token_type.clone(),
                expires_at: Some(to_timestamp(tokens.expires_at)),
            }))
        }
        .await;
        audit::record(
            "GetToken",
            caller.name(),
            account.as_str(),
            audit::outcome(&result),
        );
        result
    }
}

/// Records a call refused before its account was known, and passes the status on.
fn audited(method: &str, caller: &str, account: &str, status: Status) -> Status {
    audit::record(method, caller, account, status.code());
    status
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
