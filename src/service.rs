//! The `credential.v1.CredentialService` gRPC surface: parse requests into domain types, call the
//! broker, turn its answers into messages and its errors into statuses. Nothing else lives here.
//! Each handler checks the caller's account (see [`crate::auth`]) before the broker looks the
//! account up, and leaves one audit event (see [`crate::audit`]; token reads are counted).

mod watchers;

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::{
    account::{AccountId, AccountName},
    audit, auth,
    backup::format::{Encoder, Header},
    broker::{self, Broker, Grant, Imported, Removal},
    clock::to_timestamp,
    error::Error,
    proto::{
        self, AccountInfo, BackupRequest, BackupResponse, BeginAuthRequest, BeginAuthResponse,
        CompleteAuthRequest, CompleteAuthResponse, DescribeAccountRequest, GetTokenRequest,
        GetTokenResponse, ImportGrantRequest, ImportGrantResponse, ImportOutcome,
        ListAccountsRequest, ListAccountsResponse, RefreshTokenRequest, RefreshTokenResponse,
        RemoveAccountRequest, RemoveAccountResponse, RemoveOutcome, ResealRecordsRequest,
        ResealRecordsResponse, WatchAccountsRequest, WatchTokenRequest, WatchTokenResponse,
        credential_service_server::CredentialService,
    },
    store::RawAccount,
    tokens::{AccountRecord, AccountStatus, RefreshOutcome},
};

pub use self::watchers::{CALLER_WATCHERS_REFUSED, WATCHERS_REFUSED, WatchBounds, WatchKind};

/// Longest `min_validity` a caller may ask for before the broker compares it with real lifetimes.
const MAX_MIN_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// ListAccounts page size when the caller names none.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest ListAccounts page; bigger requests are served this many.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct CredentialApi {
    broker: Broker,
    watchers: WatchBounds,
    shutdown: CancellationToken,
}

impl CredentialApi {
    /// `watchers` bounds the WatchToken and WatchAccounts streams open at once; `shutdown` ends
    /// them all, so that draining does not wait for streams that never end on their own.
    pub fn new(broker: Broker, watchers: WatchBounds, shutdown: CancellationToken) -> Self {
        Self {
            broker,
            watchers,
            shutdown,
        }
    }
}

/// Audits a WatchToken or WatchAccounts stream's end when it is dropped, however it ends.
struct WatchEnd {
    method: &'static str,
    caller: String,
    account: String,
    outcome: Code,
}

impl WatchEnd {
    fn ended(&mut self, outcome: Code) {
        self.outcome = outcome;
    }
}

impl Drop for WatchEnd {
    fn drop(&mut self) {
        audit::record(self.method, &self.caller, &self.account, self.outcome);
    }
}

/// The stream a WatchToken call answers with.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<WatchTokenResponse, Status>> + Send>>;

fn token_message(record: &AccountRecord) -> WatchTokenResponse {
    let tokens = &record.tokens;
    WatchTokenResponse {
        access_token: tokens.access_token.expose_secret().to_owned(),
        token_type: tokens.token_type.clone(),
        expires_at: Some(to_timestamp(tokens.expires_at)),
        team_id: record.team_id().to_owned(),
    }
}

/// The stream a Backup call answers with.
pub type BackupStream = Pin<Box<dyn Stream<Item = Result<BackupResponse, Status>> + Send>>;

/// Bytes per Backup message: far below gRPC's 4 MiB default limit, large enough that 100,000
/// accounts take a few hundred messages.
const BACKUP_CHUNK: usize = 256 * 1024;

/// The backup file of `records`, encoded lazily as the stream is polled, one chunk at a time.
fn backup_stream(source: &str, records: Vec<RawAccount>) -> BackupStream {
    let mut encoder = Some(Encoder::new(&Header::new(source, &records)));
    let mut records = records.into_iter();
    let chunks = std::iter::from_fn(move || {
        let e = encoder.as_mut()?;
        while e.pending() < BACKUP_CHUNK {
            match records.next() {
                Some(r) => e.record(&r),
                None => return encoder.take().map(|e| e.finish()),
            }
        }
        Some(e.take())
    });
    Box::pin(futures::stream::iter(
        chunks.map(|data| Ok(BackupResponse { data })),
    ))
}

/// The grant of an ImportGrant request, checked.
fn parse_grant(request: ImportGrantRequest) -> Result<(Grant, bool), Error> {
    let ImportGrantRequest {
        refresh_token,
        access_token,
        access_token_expires_at,
        replace,
        ..
    } = request;
    if refresh_token.is_empty() {
        return Err(Error::InvalidArgument("refresh_token is required"));
    }
    let access = match (access_token.is_empty(), access_token_expires_at) {
        (true, None) => None,
        (false, Some(at)) => Some((
            access_token.into(),
            std::time::SystemTime::try_from(at).map_err(|_| {
                Error::InvalidArgument("access_token_expires_at is not a valid time")
            })?,
        )),
        (false, None) => {
            return Err(Error::InvalidArgument(
                "access_token needs access_token_expires_at",
            ));
        }
        (true, Some(_)) => {
            return Err(Error::InvalidArgument(
                "access_token_expires_at is set without access_token",
            ));
        }
    };
    let grant = Grant {
        refresh_token: refresh_token.into(),
        access,
    };
    Ok((grant, replace))
}

/// The stream a WatchAccounts call answers with.
pub type AccountEventStream =
    Pin<Box<dyn Stream<Item = Result<proto::AccountEvent, Status>> + Send>>;

/// What operators see of an account event; never a token.
pub fn account_event(event: &broker::AccountEvent) -> proto::AccountEvent {
    use broker::AccountEventKind as K;
    let kind = match event.kind {
        K::Snapshot => proto::AccountEventKind::Snapshot,
        K::Connected => proto::AccountEventKind::Connected,
        K::Refreshed => proto::AccountEventKind::Refreshed,
        K::RefreshFailing => proto::AccountEventKind::RefreshFailing,
        K::Recovered => proto::AccountEventKind::Recovered,
        K::NeedsReauth => proto::AccountEventKind::NeedsReauth,
        K::Removed => proto::AccountEventKind::Removed,
        K::TeamChanged => proto::AccountEventKind::TeamChanged,
    };
    let (failure_code, failure_message) = match &event.failure {
        Some(f) => (f.code as i32, f.message.clone()),
        None => (0, String::new()),
    };
    proto::AccountEvent {
        account: event.account.to_string(),
        kind: kind.into(),
        info: event
            .record
            .as_ref()
            .map(|record| account_info(&event.account, record, event.refreshing)),
        failure_code,
        failure_message,
    }
}

fn parse_account(raw: &str) -> Result<AccountId, Error> {
    let account = AccountId::parse(raw)?;
    tracing::Span::current().record("account", tracing::field::display(&account));
    Ok(account)
}

/// [`parse_account`] for GetToken and WatchToken, whose spans are DEBUG: at the default level
/// there is no span to record into, and asking the subscriber for the current one costs more than
/// the parse. Borrowed: a token read allocates no name of its own.
fn parse_account_debug_span(raw: &str) -> Result<AccountName<'_>, Error> {
    let account = AccountName::parse(raw)?;
    if tracing::level_filters::LevelFilter::current() >= tracing::Level::DEBUG {
        tracing::Span::current().record("account", tracing::field::display(account));
    }
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

/// Page size from the request: 0 means the default, and the maximum caps the rest (AIP-158).
fn parse_page_size(raw: i32) -> Result<usize, Error> {
    match usize::try_from(raw) {
        Err(_) => Err(Error::InvalidArgument("page_size must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
    }
}

/// A page token is the base64url of the last account name on the previous page: opaque to
/// callers, stable across restarts and unaffected by accounts added or removed in between.
fn parse_page_token(raw: &str) -> Result<Option<AccountId>, Error> {
    if raw.is_empty() {
        return Ok(None);
    }
    const BAD: Error = Error::InvalidArgument(
        "page_token is not one this service issued; pass next_page_token unchanged",
    );
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| BAD)?;
    let name = std::str::from_utf8(&bytes).map_err(|_| BAD)?;
    AccountId::parse(name).map(Some).map_err(|_| BAD)
}

fn page_token(last: &AccountId) -> String {
    URL_SAFE_NO_PAD.encode(last.as_str())
}

/// What operators see of an account; the mapping of domain status to the wire enum lives here.
pub fn account_info(account: &AccountId, record: &AccountRecord, refreshing: bool) -> AccountInfo {
    let status = match record.status {
        AccountStatus::NeedsReauth => proto::AccountStatus::NeedsReauth,
        AccountStatus::Active if record.refresh_failing() => proto::AccountStatus::RefreshingFailed,
        AccountStatus::Active => proto::AccountStatus::Active,
    };
    let outcome = match record.last_refresh.map(|r| r.outcome) {
        None => proto::RefreshOutcome::Unspecified,
        Some(RefreshOutcome::Succeeded) => proto::RefreshOutcome::Succeeded,
        Some(RefreshOutcome::Failed) => proto::RefreshOutcome::Failed,
    };
    AccountInfo {
        account: account.to_string(),
        status: status.into(),
        access_token_expires_at: Some(to_timestamp(record.tokens.expires_at)),
        last_refresh_at: record.last_refresh.map(|r| to_timestamp(r.at)),
        last_refresh_outcome: outcome.into(),
        refreshing,
        team_id: record.team_id().to_owned(),
        teams: record.teams.as_ref().map_or_else(Vec::new, |t| {
            t.teams
                .iter()
                .map(|team| proto::Team {
                    id: team.id.clone(),
                    name: team.name.clone(),
                })
                .collect()
        }),
    }
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
            caller.authorize(account.name())?;
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

    /// Needs the admin role (checked by `Callers::check` in the call layer). The account is not
    /// known before the state is claimed; the admin who called BeginAuth for it was checked
    /// against it, and the state (random, single use, short-lived) carries that decision.
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

    // DEBUG: at the default level a span per token read would cost more than the read itself;
    // events on GetToken's slow path carry the account as their own field. Every read is counted
    // into the aggregated audit trail.
    #[tracing::instrument(
        name = "GetToken",
        level = "debug",
        skip_all,
        fields(account = tracing::field::Empty)
    )]
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let caller = auth::caller(request.extensions())?;
        let raw = request.get_ref();
        let account = match parse_account_debug_span(&raw.account) {
            Ok(account) => account,
            Err(e) => {
                let status = Status::from(e);
                audit::count("GetToken", caller.name(), "", status.code(), None);
                return Err(status);
            }
        };
        let result = async {
            caller.authorize(account)?;
            let min_validity = parse_min_validity(raw.min_validity)?;
            let served = self.broker.serve_token(account, min_validity).await?;
            let tokens = &served.record.tokens;
            let response = Response::new(GetTokenResponse {
                access_token: tokens.access_token.expose_secret().to_owned(),
                token_type: tokens.token_type.clone(),
                expires_at: Some(to_timestamp(tokens.expires_at)),
                team_id: served.record.team_id().to_owned(),
            });
            Ok::<_, Status>((response, served))
        }
        .await;
        // Token reads are counted, not logged one by one (see crate::audit).
        match result {
            Ok((response, served)) => {
                audit::count_token_read_in(caller.shared_name(), served.counted());
                Ok(response)
            }
            Err(status) => {
                audit::count(
                    "GetToken",
                    caller.name(),
                    account.as_str(),
                    status.code(),
                    None,
                );
                Err(status)
            }
        }
    }

    type WatchTokenStream = TokenStream;

    #[tracing::instrument(
        name = "WatchToken",
        level = "debug",
        skip_all,
        fields(account = tracing::field::Empty)
    )]
    async fn watch_token(
        &self,
        request: Request<WatchTokenRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let raw = request.get_ref();
        let account = parse_account_debug_span(&raw.account);
        let name = account.as_ref().map_or("", |a| a.as_str()).to_owned();
        let started = async {
            let account = account.map_err(Status::from)?;
            caller.authorize(account)?;
            let min_validity = parse_min_validity(raw.min_validity)?;
            let permit = self.watchers.admit(caller.name(), WatchKind::Token)?;
            Ok((account, min_validity, permit))
        }
        .await;
        // Each stream's start and end are audited one by one: they are few, and long-lived.
        audit::record("WatchToken", caller.name(), &name, audit::outcome(&started));
        let (account, min_validity, permit) = started?;
        let shutdown = self.shutdown.clone();
        let tokens = self
            .broker
            .watch_token(account.to_id(), min_validity)
            .map(|item| {
                item.map(|tokens| token_message(&tokens))
                    .map_err(Status::from)
            });
        let mut end = WatchEnd {
            method: "WatchToken.end",
            caller: caller.name().to_owned(),
            account: name,
            outcome: Code::Cancelled, // the caller went away
        };
        let stream = tokens
            .take_until(shutdown.clone().cancelled_owned())
            .chain(futures::stream::once(async move {
                // Reached only when cut short by shutdown (a broker error ends the stream first).
                Err(Status::unavailable(
                    "the server is shutting down; reconnect to another replica or retry",
                ))
            }))
            .scan(false, |ended, item| {
                // One error ends the stream: nothing after it.
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = item.is_err();
                futures::future::ready(Some(item))
            })
            .map(move |item| {
                if let Err(status) = &item {
                    end.ended(status.code());
                }
                let _held = &permit;
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchAccountsStream = AccountEventStream;

    /// Needs the admin role (checked by `Callers::check` in the call layer); sees only the
    /// caller's globs, like ListAccounts.
    #[tracing::instrument(name = "WatchAccounts", skip_all)]
    async fn watch_accounts(
        &self,
        request: Request<WatchAccountsRequest>,
    ) -> Result<Response<AccountEventStream>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let started = self.watchers.admit(caller.name(), WatchKind::Accounts);
        audit::record("WatchAccounts", caller.name(), "", audit::outcome(&started));
        let permit = started?;
        let mut end = WatchEnd {
            method: "WatchAccounts.end",
            caller: caller.name().to_owned(),
            account: String::new(),
            outcome: Code::Cancelled, // the caller went away
        };
        let events = self
            .broker
            .watch_accounts(move |account| caller.may_use(account.name()))
            .map(|event| Ok(account_event(&event)));
        let stream = events
            .take_until(self.shutdown.clone().cancelled_owned())
            // The events never end on their own: only shutdown ends the stream.
            .chain(futures::stream::once(async move {
                Err(Status::unavailable(
                    "the server is shutting down; reconnect to another replica or retry",
                ))
            }))
            .map(move |item| {
                if let Err(status) = &item {
                    end.ended(status.code());
                }
                let _held = &permit;
                item
            });
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(name = "ListAccounts", skip_all)]
    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let result = self.list_page(&caller, request.get_ref());
        audit::record("ListAccounts", caller.name(), "", audit::outcome(&result));
        result
    }

    #[tracing::instrument(name = "DescribeAccount", skip_all, fields(account = tracing::field::Empty))]
    async fn describe_account(
        &self,
        request: Request<DescribeAccountRequest>,
    ) -> Result<Response<AccountInfo>, Status> {
        let raw = request.get_ref().account.clone();
        on_account(request, "DescribeAccount", &raw, async |account| {
            let record = self.broker.describe(account)?;
            let refreshing = self.broker.is_refreshing(account);
            Ok(Response::new(account_info(account, &record, refreshing)))
        })
        .await
    }

    #[tracing::instrument(name = "RemoveAccount", skip_all, fields(account = tracing::field::Empty))]
    async fn remove_account(
        &self,
        request: Request<RemoveAccountRequest>,
    ) -> Result<Response<RemoveAccountResponse>, Status> {
        let RemoveAccountRequest { account, force } = request.get_ref().clone();
        on_account(request, "RemoveAccount", &account, async |account| {
            let outcome = match self.broker.remove(account, force).await? {
                Removal::Revoked => RemoveOutcome::Revoked,
                Removal::RemovedWithoutRevocation => RemoveOutcome::RemovedWithoutRevocation,
                Removal::NotFound => RemoveOutcome::NotFound,
            };
            Ok(Response::new(RemoveAccountResponse {
                outcome: outcome.into(),
            }))
        })
        .await
    }

    #[tracing::instrument(name = "RefreshToken", skip_all, fields(account = tracing::field::Empty))]
    async fn refresh_token(
        &self,
        request: Request<RefreshTokenRequest>,
    ) -> Result<Response<RefreshTokenResponse>, Status> {
        let raw = request.get_ref().account.clone();
        on_account(request, "RefreshToken", &raw, async |account| {
            let tokens = self.broker.refresh_now(account).await?;
            tracing::info!("refreshed on request");
            Ok(Response::new(RefreshTokenResponse {
                expires_at: Some(to_timestamp(tokens.expires_at)),
            }))
        })
        .await
    }

    /// Needs the admin role (checked by `Callers::check` in the call layer), whatever its globs:
    /// it changes no account's content and answers counts and key ids only.
    #[tracing::instrument(name = "ResealRecords", skip_all)]
    async fn reseal_records(
        &self,
        request: Request<ResealRecordsRequest>,
    ) -> Result<Response<ResealRecordsResponse>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let result = match self.broker.reseal().await {
            Ok(done) => Ok(Response::new(ResealRecordsResponse {
                key_id: done.key_id,
                resealed: done.resealed as u64,
                already_current: done.current as u64,
                remaining: done
                    .remaining
                    .into_iter()
                    .map(|(key_id, n)| (key_id, n as u64))
                    .collect(),
            })),
            Err(e) => Err(Status::from(e)),
        };
        audit::record("ResealRecords", caller.name(), "", audit::outcome(&result));
        result
    }

    type BackupStream = BackupStream;

    /// Needs the admin role (checked by `Callers::check` in the call layer) and globs that cover
    /// every account. Reads the store, not the cache: GetToken goes on meanwhile.
    #[tracing::instrument(name = "Backup", skip_all)]
    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let caller = auth::caller(request.extensions())?.clone();
        let result = async {
            let records = self.broker.export_accounts().await?;
            let outside = records
                .iter()
                .filter(|r| !caller.may_use(r.account.name()))
                .count();
            if outside > 0 {
                return Err(Error::NotEveryAccount { outside });
            }
            Ok(records)
        }
        .await
        .map_err(Status::from);
        audit::record("Backup", caller.name(), "", audit::outcome(&result));
        let records = result?;
        tracing::info!(accounts = records.len(), "backup taken");
        Ok(Response::new(backup_stream(
            self.broker.store_kind(),
            records,
        )))
    }

    /// One audit event per grant (account, caller, outcome); never a token.
    #[tracing::instrument(name = "ImportGrant", skip_all, fields(account = tracing::field::Empty))]
    async fn import_grant(
        &self,
        request: Request<ImportGrantRequest>,
    ) -> Result<Response<ImportGrantResponse>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let raw = message.account.clone();
        let request = Request::from_parts(metadata, extensions, ());
        on_account(request, "ImportGrant", &raw, async |account| {
            let (grant, replace) = parse_grant(message)?;
            let (outcome, tokens) = match self.broker.import(account, grant, replace).await? {
                Imported::Refreshed(tokens) => (ImportOutcome::Refreshed, tokens),
                Imported::Stored(tokens) => (ImportOutcome::Stored, tokens),
            };
            Ok(Response::new(ImportGrantResponse {
                outcome: outcome.into(),
                expires_at: Some(to_timestamp(tokens.expires_at)),
            }))
        })
        .await
    }
}

impl CredentialApi {
    /// One page of the accounts this caller may see (its globs), sorted by name.
    fn list_page(
        &self,
        caller: &auth::Caller,
        request: &ListAccountsRequest,
    ) -> Result<Response<ListAccountsResponse>, Status> {
        let page_size = parse_page_size(request.page_size)?;
        let after = parse_page_token(&request.page_token)?;
        let mut all = self.broker.list();
        all.retain(|(id, _)| caller.may_use(id.name()));
        let start = match &after {
            Some(last) => all.partition_point(|(id, _)| id <= last),
            None => 0,
        };
        let page = &all[start..(start + page_size).min(all.len())];
        let more = start + page.len() < all.len();
        Ok(Response::new(ListAccountsResponse {
            accounts: page
                .iter()
                .map(|(id, record)| account_info(id, record, self.broker.is_refreshing(id)))
                .collect(),
            next_page_token: match page.last() {
                Some((last, _)) if more => page_token(last),
                _ => String::new(),
            },
        }))
    }
}

/// An admin call on one account: parses the name, checks it against the caller's globs before
/// the broker looks it up (so a refusal never tells whether it exists), and leaves one audit event
/// whatever happens.
async fn on_account<Req, T>(
    request: Request<Req>,
    method: &'static str,
    raw_account: &str,
    call: impl AsyncFnOnce(&AccountId) -> Result<Response<T>, Error>,
) -> Result<Response<T>, Status> {
    let caller = auth::caller(request.extensions())?;
    let account = match parse_account(raw_account) {
        Ok(account) => account,
        Err(e) => return Err(audited(method, caller.name(), "", e.into())),
    };
    let result = match caller.authorize(account.name()) {
        Ok(()) => call(&account).await.map_err(Status::from),
        Err(status) => Err(status),
    };
    audit::record(
        method,
        caller.name(),
        account.as_str(),
        audit::outcome(&result),
    );
    result
}

/// Records a call refused before its account was known, and passes the status on.
fn audited(method: &str, caller: &str, account: &str, status: Status) -> Status {
    audit::record(method, caller, account, status.code());
    status
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// WatchToken and WatchAccounts streams share one cap: a permit is held while a stream is
    /// open, whichever kind, and returns when it is dropped; WatchAccounts may also take the
    /// places kept for admins, which WatchToken never takes.
    #[tokio::test]
    async fn watch_streams_of_both_kinds_share_the_watcher_cap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            crate::store::SledStore::open(dir.path(), crate::sealing::Keyring::ephemeral())
                .unwrap(),
        );
        let provider = crate::oauth::unreachable_provider();
        let broker = Broker::new(
            store,
            provider,
            crate::clock::Clock::manual(),
            crate::broker::BrokerConfig::default(),
        )
        .await
        .unwrap();
        let api = CredentialApi::new(
            broker,
            WatchBounds::new(1, 1, None),
            CancellationToken::new(),
        );
        fn request<T>(message: T) -> Request<T> {
            let mut request = Request::new(message);
            request
                .extensions_mut()
                .insert(Arc::new(auth::Caller::anonymous()));
            request
        }
        let token = || {
            request(WatchTokenRequest {
                account: "acme".into(),
                min_validity: None,
            })
        };
        fn code<T>(r: Result<T, Status>) -> Option<Code> {
            r.err().map(|s| s.code())
        }

        let events = api.watch_accounts(request(WatchAccountsRequest {})).await;
        assert!(events.is_ok());
        assert_eq!(
            code(api.watch_token(token()).await),
            Some(Code::ResourceExhausted)
        );
        let kept = api.watch_accounts(request(WatchAccountsRequest {})).await;
        assert!(kept.is_ok(), "the place kept for admins");
        assert_eq!(
            code(api.watch_accounts(request(WatchAccountsRequest {})).await),
            Some(Code::ResourceExhausted)
        );
        drop((events, kept));
        let watching = api.watch_token(token()).await;
        assert!(watching.is_ok());
        assert_eq!(
            code(api.watch_token(token()).await),
            Some(Code::ResourceExhausted)
        );
        let kept = api.watch_accounts(request(WatchAccountsRequest {})).await;
        assert!(kept.is_ok(), "the place kept for admins");
        drop((watching, kept));
        assert!(
            api.watch_accounts(request(WatchAccountsRequest {}))
                .await
                .is_ok()
        );
    }

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

    #[test]
    fn page_size_defaults_caps_and_rejects_negative() {
        assert_eq!(parse_page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(parse_page_size(7).unwrap(), 7);
        assert_eq!(parse_page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(parse_page_size(-1).is_err());
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let acme = AccountId::parse("team@acme").unwrap();
        assert_eq!(parse_page_token(&page_token(&acme)).unwrap(), Some(acme));
        assert_eq!(parse_page_token("").unwrap(), None);
        for bad in ["!!!", "YS9i" /* "a/b" */, "_w"] {
            assert!(parse_page_token(bad).is_err(), "{bad}");
        }
    }
}
