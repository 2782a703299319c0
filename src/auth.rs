//! Who may call what. A callers file (TOML) names each caller, how it proves who it is (the
//! SHA-256 of a static bearer token, the subject alternative name or SPIFFE ID of its client
//! certificate (mTLS), or the issuer and subject of the JWTs it presents, checked against the
//! `[[issuer]]`s of the file: [`jwt`], [`jwks`], [`spiffe`]), its role and the account globs it
//! may use. [`Callers::check`] runs before every gRPC call reaches its service (the
//! server's call layer calls it): it lets health and reflection through, authenticates everyone
//! else, checks the role against the method (GetToken: reader or admin; every other
//! `credential.v1` method: admin, so new admin RPCs are admin-only without further work) and puts
//! the [`Caller`] into the request's extensions. Handlers then check the account with
//! [`Caller::authorize`] before looking it up, so a denial never reveals whether an account
//! exists. Without a callers file every call is allowed (the service then listens on loopback
//! only). The file is re-read on SIGHUP and when its content changes ([`crate::reload`]); a bad
//! file keeps the old table.

mod jwks;
mod jwt;
mod spiffe;

use std::{collections::HashMap, fmt, net::IpAddr, path::Path, sync::Arc};

pub use jwt::{MAX_BEARER_BYTES, Refusal};

use rustls_pki_types::ServerName;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{
    Status,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use crate::{
    account::AccountName,
    audit,
    reload::{self, FileBacked, Reloadable},
};
use jwks::{FetchTiming, Registry};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GetToken and WatchToken for its accounts.
    Reader,
    /// Everything, for its accounts: BeginAuth, CompleteAuth, GetToken and the admin RPCs.
    Admin,
}

/// An authenticated caller, found in each authenticated request's extensions as `Arc<Caller>`.
pub struct Caller {
    /// Shared, so that the audit can key a caller's counted reads by the name's address.
    name: Arc<str>,
    role: Role,
    accounts: Vec<AccountGlob>,
    /// One of the globs is `*`: no matching needed on the hot path.
    any_account: bool,
}

/// One account glob of a caller. Most are a name or a prefix followed by `*`; those are matched as
/// string comparisons, which every GetToken pays, and the rest by `glob`.
enum AccountGlob {
    Exact(Box<str>),
    Prefix(Box<str>),
    Pattern(glob::Pattern),
}

impl AccountGlob {
    fn new(glob: &str) -> Result<Self, glob::PatternError> {
        let pattern = glob::Pattern::new(glob)?;
        let special = |c: char| matches!(c, '*' | '?' | '[' | ']' | '\\');
        Ok(match glob.find(special) {
            None => Self::Exact(glob.into()),
            Some(at) if at == glob.len() - 1 && glob.ends_with('*') => {
                Self::Prefix(glob[..at].into())
            }
            Some(_) => Self::Pattern(pattern),
        })
    }

    fn matches(&self, account: &str) -> bool {
        match self {
            Self::Exact(name) => account == &**name,
            Self::Prefix(prefix) => account.starts_with(&**prefix),
            Self::Pattern(pattern) => pattern.matches(account),
        }
    }

    fn as_str(&self) -> String {
        match self {
            Self::Exact(name) => name.to_string(),
            Self::Prefix(prefix) => format!("{prefix}*"),
            Self::Pattern(pattern) => pattern.as_str().to_owned(),
        }
    }
}

impl Caller {
    /// The caller's name from the callers file (`anonymous` without one): for logs and audit.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as kept for this caller's lifetime: [`crate::audit::count_read`] keys by it.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether one of the caller's account globs matches `account`.
    pub fn may_use(&self, account: AccountName<'_>) -> bool {
        self.any_account || self.accounts.iter().any(|p| p.matches(account.as_str()))
    }

    /// Checks that this caller may use `account`. Call it before looking the account up: the
    /// answer is the same PERMISSION_DENIED whether or not the account exists.
    pub fn authorize(&self, account: AccountName<'_>) -> Result<(), Status> {
        if self.may_use(account) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "permission denied: caller {} may not use account {account}",
                self.name
            )))
        }
    }

    pub(crate) fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Admin,
            accounts: Vec::new(),
            any_account: true,
        }
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("role", &self.role)
            .field(
                "accounts",
                &self.accounts.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The authenticated caller of a request; fails closed if [`Callers::check`] did not run.
pub fn caller(extensions: &http::Extensions) -> Result<&Arc<Caller>, Status> {
    extensions
        .get::<Arc<Caller>>()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// Why a callers file could not be used: the file and the reason. Never quotes a token (the file
/// holds only hashes).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallersError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersFile {
    #[serde(default)]
    issuer: Vec<jwt::IssuerEntry>,
    #[serde(default)]
    caller: Vec<CallerEntry>,
}

/// A caller's `jwt = { issuer, subject }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtEntry {
    issuer: String,
    subject: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    name: String,
    token_sha256: Option<String>,
    tls_san: Option<String>,
    tls_spiffe_id: Option<String>,
    jwt: Option<JwtEntry>,
    role: Role,
    accounts: Vec<String>,
}

/// One loaded callers file.
#[derive(Default)]
struct Table {
    callers: usize,
    by_token: Vec<([u8; 32], Arc<Caller>)>,
    by_san: Vec<(ServerName<'static>, Arc<Caller>)>,
    by_spiffe: Vec<(String, Arc<Caller>)>,
    issuers: Vec<jwt::Issuer>,
    /// JWT callers by `"{issuer name}\n{subject}"`.
    by_subject: HashMap<String, Arc<Caller>>,
    /// JWTs verified under this file.
    remembered: jwt::Remembered,
}

/// The key of [`Table::by_subject`].
fn subject_key(issuer: &str, subject: &str) -> String {
    format!("{issuer}\n{subject}")
}

impl Table {
    #[cfg(test)]
    fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with(text, &Registry::default(), FetchTiming::default())
    }

    /// Parses a callers file; its issuers' key sources come from `keys` when unchanged.
    fn parse_with(text: &str, keys: &Registry, timing: FetchTiming) -> Result<Self, String> {
        let file: CallersFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut table = Table::default();
        let mut names = std::collections::HashSet::new();
        table.callers = file.caller.len();
        for entry in file.issuer {
            let issuer = jwt::Issuer::parse(entry, keys, timing)?;
            if table.issuers.iter().any(|i| i.name == issuer.name) {
                return Err(format!("issuer {} is listed twice", issuer.name));
            }
            if table.issuers.iter().any(|i| i.iss == issuer.iss) {
                return Err(format!(
                    "issuers {} and another have the same `issuer`",
                    issuer.name
                ));
            }
            table.issuers.push(issuer);
        }
        for entry in file.caller {
            let name = entry.name.trim();
            if name.is_empty() {
                return Err("a caller has an empty name".into());
            }
            if !names.insert(name.to_owned()) {
                return Err(format!("caller {name} is listed twice"));
            }
            if entry.accounts.is_empty() {
                return Err(format!(
                    "caller {name} has no accounts (use [\"*\"] for all)"
                ));
            }
            let accounts = entry
                .accounts
                .iter()
                .map(|g| {
                    AccountGlob::new(g)
                        .map_err(|e| format!("caller {name}: account glob {g:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let caller = Arc::new(Caller {
                name: name.into(),
                role: entry.role,
                any_account: accounts
                    .iter()
                    .any(|p| matches!(p, AccountGlob::Prefix(prefix) if prefix.is_empty())),
                accounts,
            });
            if entry.token_sha256.is_none()
                && entry.tls_san.is_none()
                && entry.tls_spiffe_id.is_none()
                && entry.jwt.is_none()
            {
                return Err(format!(
                    "caller {name} needs token_sha256, tls_san, tls_spiffe_id or jwt (one or more)"
                ));
            }
            if let Some(jwt) = &entry.jwt {
                if !table.issuers.iter().any(|i| *i.name == *jwt.issuer) {
                    return Err(format!(
                        "caller {name}: jwt.issuer {:?} names no [[issuer]]",
                        jwt.issuer
                    ));
                }
                if jwt.subject.is_empty() {
                    return Err(format!("caller {name}: jwt.subject is empty"));
                }
                let key = subject_key(&jwt.issuer, &jwt.subject);
                if table.by_subject.insert(key, caller.clone()).is_some() {
                    return Err(format!(
                        "caller {name} shares its jwt issuer and subject with another caller"
                    ));
                }
            }
            if let Some(id) = &entry.tls_spiffe_id {
                let id = spiffe::parse(id.trim()).map_err(|why| {
                    format!("caller {name}: tls_spiffe_id {id:?} is not a SPIFFE ID: it {why}")
                })?;
                if table.by_spiffe.iter().any(|(known, _)| known == id) {
                    return Err(format!(
                        "caller {name} shares its tls_spiffe_id with another caller"
                    ));
                }
                table.by_spiffe.push((id.to_owned(), caller.clone()));
            }
            if let Some(hex_hash) = &entry.token_sha256 {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(hex_hash.trim(), &mut hash).map_err(|_| {
                    format!("caller {name}: token_sha256 must be 64 hex digits (the SHA-256 of the token, not the token)")
                })?;
                if table.by_token.iter().any(|(h, _)| *h == hash) {
                    return Err(format!(
                        "caller {name} shares its token with another caller"
                    ));
                }
                table.by_token.push((hash, caller.clone()));
            }
            if let Some(san) = &entry.tls_san {
                let san = ServerName::try_from(san.trim())
                    .map_err(|_| {
                        format!("caller {name}: tls_san {san:?} is not a DNS name or IP address")
                    })?
                    .to_owned();
                if table.by_san.iter().any(|(known, _)| *known == san) {
                    return Err(format!(
                        "caller {name} shares its tls_san with another caller"
                    ));
                }
                table.by_san.push((san, caller));
            }
        }
        Ok(table)
    }

    /// The key sources of this file's issuers.
    fn key_sources(&self) -> Vec<Arc<jwks::KeySource>> {
        self.issuers.iter().map(|i| i.keys.clone()).collect()
    }

    /// The callers file as read, parsed; errors name the file.
    fn from_file(
        path: &Path,
        read: &reload::Read,
        keys: &Registry,
        timing: FetchTiming,
    ) -> Result<Self, String> {
        let what = "the callers file (--callers-file / CREDENTIAL_SERVICE_CALLERS_FILE)";
        let bytes = reload::content(read, what, path)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| format!("the callers file {} is not UTF-8", path.display()))?;
        Self::parse_with(text, keys, timing)
            .map_err(|reason| format!("the callers file {} is invalid: {reason}", path.display()))
    }
}

/// Why a call was not let in: what the caller is told, and for the audit the reason and, when
/// known, the caller.
#[derive(Debug)]
struct Refused {
    status: Status,
    reason: &'static str,
    caller: Option<Arc<Caller>>,
}

impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        Self {
            status,
            reason: "",
            caller: None,
        }
    }
}

/// Who may call: the callers file, reloadable, or open (no file: everyone is an admin of every
/// account). Cheap to clone; clones share reloads.
#[derive(Clone)]
pub struct Callers {
    registry: Option<Arc<FileBacked<Table>>>,
    /// The key sources of the file's issuers, for their fetchers.
    keys: Arc<Registry>,
    anonymous: Arc<Caller>,
}

impl fmt::Debug for Callers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.registry {
            None => f.write_str("Callers(open)"),
            Some(r) => write!(f, "Callers({})", r.files()[0].display()),
        }
    }
}

impl Callers {
    /// No callers file: every call is allowed, as `anonymous` with the admin role.
    pub fn open() -> Self {
        Self {
            registry: None,
            keys: Arc::default(),
            anonymous: Arc::new(Caller::anonymous()),
        }
    }

    /// Reads the callers file at `path`.
    pub fn load(path: &Path) -> Result<Self, CallersError> {
        let timing = FetchTiming::default();
        let file = path.to_owned();
        let keys = Arc::new(Registry::default());
        let sources = keys.clone();
        let registry = FileBacked::load(
            "the callers file",
            vec![path.to_owned()],
            Box::new(move |reads| {
                let table = Table::from_file(&file, &reads[0], &sources, timing)?;
                // Parsed whole: the fetchers follow this file's issuers from now on.
                sources.replace(table.key_sources());
                Ok(table)
            }),
            |table| format!("{} caller(s)", table.callers),
        )
        .map_err(CallersError)?;
        Ok(Self {
            registry: Some(Arc::new(registry)),
            keys,
            anonymous: Arc::new(Caller::anonymous()),
        })
    }

    /// Fetches the signing keys of the callers file's JWT issuers, following reloads, for as long
    /// as it runs (the server runs it while it serves; calls never wait for a fetch).
    pub async fn fetch_issuer_keys(self) {
        jwks::run_fetchers(self.keys).await;
    }

    /// Whether there is no callers file (every call allowed).
    pub fn is_open(&self) -> bool {
        self.registry.is_none()
    }

    /// Re-reads the callers file and swaps it in atomically; on error the old table stays.
    /// Returns how many callers the file in force lists.
    pub fn reload(&self) -> Result<usize, CallersError> {
        let Some(registry) = &self.registry else {
            return Ok(0);
        };
        registry.reload().map_err(CallersError)?;
        Ok(registry.peek().callers)
    }

    /// The callers file for the server's reloader (SIGHUP, and when its content changes); `None`
    /// when there is no file.
    pub fn reloadable(&self) -> Option<Arc<dyn Reloadable>> {
        self.registry
            .clone()
            .map(|registry| registry as Arc<dyn Reloadable>)
    }

    /// Who sent `req`: its bearer token if it has one, else its verified client certificate.
    fn authenticate<B>(&self, req: &http::Request<B>) -> Result<Arc<Caller>, Refused> {
        let Some(registry) = &self.registry else {
            return Ok(self.anonymous.clone());
        };
        let table = registry.peek();
        if let Some(value) = req.headers().get(http::header::AUTHORIZATION) {
            let token = bearer_token(value.as_bytes()).ok_or_else(|| {
                Status::unauthenticated(
                    "malformed authorization header; send `authorization: Bearer <token>`",
                )
            })?;
            if token.len() > MAX_BEARER_BYTES {
                return Err(refused(Refusal::TooLong, None));
            }
            let digest: [u8; 32] = Sha256::digest(token).into();
            // Every entry is compared, in constant time, whatever matches.
            let mut found = None;
            for (hash, caller) in &table.by_token {
                if digests_equal(hash, &digest) && found.is_none() {
                    found = Some(caller);
                }
            }
            if let Some(caller) = found {
                return Ok(caller.clone());
            }
            // A JWT (three dot-separated parts) from one of the file's issuers.
            if !table.issuers.is_empty() && token.contains(&b'.') {
                if let Some(caller) = table.remembered.get(&digest) {
                    return Ok(caller);
                }
                let find = |issuer: &str, subject: &str| {
                    table.by_subject.get(&subject_key(issuer, subject))
                };
                return jwt::verify(token, digest, &table.issuers, find, &table.remembered)
                    .map_err(|(refusal, caller)| refused(refusal, caller));
            }
            return Err(Status::unauthenticated("unknown bearer token").into());
        }
        if (!table.by_san.is_empty() || !table.by_spiffe.is_empty())
            && let Some(certs) = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs())
            && let Some(leaf) = certs.first()
            && let Ok(cert) = webpki::EndEntityCert::try_from(leaf)
        {
            // rustls verified the chain against --tls-client-ca during the handshake. A wildcard
            // would stand for every caller under its domain, so a certificate with one names none.
            if cert.valid_dns_names().any(|name| name.contains('*')) {
                return Err(Status::unauthenticated(
                    "client certificates with a wildcard name are not accepted",
                )
                .into());
            }
            // A SPIFFE ID matches exactly, never as a prefix.
            let mut named: Option<&Arc<Caller>> = None;
            if !table.by_spiffe.is_empty()
                && let Some(id) = spiffe::of_certificate(leaf.as_ref())
            {
                named = table
                    .by_spiffe
                    .iter()
                    .find(|(known, _)| *known == id)
                    .map(|(_, caller)| caller);
            }
            // A certificate whose names belong to two callers would otherwise be whichever the
            // file lists first: it names neither.
            for (san, caller) in &table.by_san {
                if !san_matches(&cert, san) {
                    continue;
                }
                match named {
                    Some(first) if !Arc::ptr_eq(first, caller) => {
                        return Err(Status::unauthenticated(
                            "the client certificate names more than one caller in the callers \
                             file, so it names none: issue one certificate per caller",
                        )
                        .into());
                    }
                    _ => named = Some(caller),
                }
            }
            return named.cloned().ok_or_else(|| {
                Status::unauthenticated(
                    "the client certificate names no caller in the callers file",
                )
                .into()
            });
        }
        Err(Status::unauthenticated(
            "no credentials: send `authorization: Bearer <token>` (or a client certificate listed in the callers file)",
        )
        .into())
    }
}

fn refused(refusal: Refusal, caller: Option<Arc<Caller>>) -> Refused {
    Refused {
        status: refusal.status(),
        reason: refusal.reason(),
        caller,
    }
}

/// Compares two SHA-256 digests in constant time. subtle's slice comparison puts each byte through
/// an optimisation barrier, which made it cost three quarters as much as the hash itself on every
/// call; this folds the differences of four words and passes only the result through one.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .chunks_exact(8)
        .zip(b.chunks_exact(8))
        .fold(0u64, |acc, (x, y)| {
            let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().expect("8-byte chunk"));
            acc | (word(x) ^ word(y))
        });
    bool::from(diff.ct_eq(&0))
}

/// Whether the certificate carries `san` exactly: a DNS name equal to one of its DNS names (ASCII
/// case aside), or an IP address equal to one of its IP addresses. Not webpki's server-name rules,
/// which let a wildcard stand for the name.
fn san_matches(cert: &webpki::EndEntityCert<'_>, san: &ServerName<'_>) -> bool {
    match san {
        ServerName::DnsName(name) => cert
            .valid_dns_names()
            .any(|presented| presented.eq_ignore_ascii_case(name.as_ref())),
        ServerName::IpAddress(_) => cert.verify_is_valid_for_subject_name(san).is_ok(),
        _ => false,
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// What a gRPC method path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Open,
    Reader,
    Admin,
}

fn access(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        Access::Open
    } else if path == "/credential.v1.CredentialService/GetToken"
        || path == "/credential.v1.CredentialService/WatchToken"
    {
        Access::Reader
    } else {
        // Every other method, present or future, and anything unknown: admins only.
        Access::Admin
    }
}

/// The IP address a request came from (plaintext or TLS), for refusals' audit events.
fn peer<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let extensions = req.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
        .map(|addr| addr.ip())
}

impl Callers {
    /// The caller check every gRPC call passes before the routes see it (the server's call layer
    /// runs it): health and reflection pass as they are (`None`); anyone else is authenticated,
    /// their role checked against the method, and the [`Caller`] put into the request's
    /// extensions. A refusal is counted into the audit trail with the peer's address; its message
    /// names only `method`, which comes from the known method table.
    pub fn check<B>(
        &self,
        req: &mut http::Request<B>,
        method: &'static str,
    ) -> Result<Option<CallAudit>, Status> {
        let need = access(req.uri().path());
        if need == Access::Open {
            return Ok(None);
        }
        if audit::refusing() {
            let status = Status::unavailable(
                "the audit trail cannot be written and --audit-required is set; retry later",
            );
            audit::count(method, "", "", status.code(), peer(req));
            return Err(status);
        }
        let caller = self.authenticate(req).map_err(|refused| {
            let name = refused.caller.as_ref().map_or("", |c| c.name());
            let code = refused.status.code();
            audit::count_refusal(method, name, refused.reason, code, peer(req));
            refused.status
        })?;
        if need == Access::Admin && caller.role != Role::Admin {
            let status = Status::permission_denied(format!(
                "permission denied: {method} needs the admin role"
            ));
            audit::count(method, caller.name(), "", status.code(), peer(req));
            return Err(status);
        }
        req.extensions_mut().insert(caller.clone());
        Ok(Some(CallAudit {
            caller,
            method,
            scope: audit::Scope::default(),
        }))
    }
}

/// An authenticated call's place in the audit trail. Its handler audits it; a call that tonic
/// refused before the handler ran (undecodable, missing or compressed message, unknown method) is
/// counted by [`CallAudit::ended`] instead, with its caller and the status tonic answered.
pub struct CallAudit {
    caller: Arc<Caller>,
    method: &'static str,
    scope: audit::Scope,
}

impl CallAudit {
    /// Polls the call's future with the call's audit mark in place.
    pub fn enter<T>(&mut self, poll: impl FnOnce() -> T) -> T {
        self.scope.enter(poll)
    }

    /// The call ended with `code`: counts it unless its handler already did.
    pub fn ended(&self, code: tonic::Code) {
        if !self.scope.audited() {
            audit::count(self.method, self.caller.name(), "", code, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[caller]]
        name = "billing"
        token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" # sha256("test")
        role = "reader"
        accounts = ["acme-*", "globex"]

        [[caller]]
        name = "ops"
        tls_san = "ops.internal.example.com"
        role = "admin"
        accounts = ["*"]
    "#;

    proptest::proptest! {
        /// The string-comparison fast paths answer exactly as `glob` does.
        #[test]
        fn account_globs_match_as_glob_does(
            glob in "[a-c*?\\[\\]!-]{0,6}",
            name in "[a-c-]{0,6}",
        ) {
            if let Ok(pattern) = glob::Pattern::new(&glob) {
                let ours = AccountGlob::new(&glob).unwrap();
                proptest::prop_assert_eq!(ours.matches(&name), pattern.matches(&name));
                proptest::prop_assert_eq!(ours.as_str(), glob);
            }
        }
    }

    #[test]
    fn plain_names_and_trailing_stars_take_the_fast_paths() {
        assert!(matches!(
            AccountGlob::new("globex").unwrap(),
            AccountGlob::Exact(_)
        ));
        assert!(matches!(
            AccountGlob::new("acme-*").unwrap(),
            AccountGlob::Prefix(_)
        ));
        assert!(matches!(AccountGlob::new("*").unwrap(), AccountGlob::Prefix(p) if p.is_empty()));
        assert!(matches!(
            AccountGlob::new("a*b").unwrap(),
            AccountGlob::Pattern(_)
        ));
        assert!(matches!(
            AccountGlob::new("acme-*?").unwrap(),
            AccountGlob::Pattern(_)
        ));
        assert!(matches!(
            AccountGlob::new("[*]").unwrap(),
            AccountGlob::Pattern(_)
        ));
    }

    fn account(s: &str) -> AccountName<'_> {
        AccountName::parse(s).unwrap()
    }

    fn request(path: &str, auth: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(path);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap()
    }

    fn callers(text: &str) -> Callers {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(&path, text).unwrap();
        Callers::load(&path).unwrap()
    }

    #[test]
    fn a_known_token_finds_its_caller_and_globs_limit_its_accounts() {
        let callers = callers(FILE);
        let c = callers
            .authenticate(&request("/x", Some("Bearer test")))
            .unwrap();
        assert_eq!(c.name(), "billing");
        assert_eq!(c.role(), Role::Reader);
        assert!(c.may_use(account("acme-prod")));
        assert!(c.may_use(account("globex")));
        assert!(!c.may_use(account("globex-2")));
        assert!(!c.may_use(account("initech")));
        let c = callers
            .authenticate(&request("/x", Some("bearer   test ")))
            .unwrap();
        assert_eq!(c.name(), "billing");
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let callers = callers(FILE);
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic dGVzdA=="),
            Some("Bearer "),
            Some("test"),
        ] {
            let e = callers.authenticate(&request("/x", auth)).unwrap_err();
            assert_eq!(e.status.code(), tonic::Code::Unauthenticated, "{auth:?}");
        }
    }

    #[test]
    fn methods_map_to_what_they_need() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Access::Open
        );
        assert_eq!(
            access("/credential.v1.CredentialService/GetToken"),
            Access::Reader
        );
        assert_eq!(
            access("/credential.v1.CredentialService/WatchToken"),
            Access::Reader
        );
        // WatchAccounts shows every account in the caller's globs: operators only.
        for m in [
            "BeginAuth",
            "CompleteAuth",
            "ListAccounts",
            "RemoveAccount",
            "WatchAccounts",
        ] {
            assert_eq!(
                access(&format!("/credential.v1.CredentialService/{m}")),
                Access::Admin
            );
        }
        assert_eq!(access("/other.Service/GetToken"), Access::Admin);
    }

    #[test]
    fn bad_files_say_why_without_quoting_tokens() {
        for (text, needle) in [
            (
                "[[caller]]\nname = \"a\"\nrole = \"reader\"\naccounts = [\"*\"]",
                "token_sha256, tls_san, tls_spiffe_id or jwt",
            ),
            (
                "[[caller]]\nname = \"a\"\ntoken_sha256 = \"my-real-token\"\nrole = \"reader\"\naccounts = [\"*\"]",
                "64 hex digits",
            ),
            (
                "[[caller]]\nname = \"a\"\ntoken_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"root\"\naccounts = [\"*\"]",
                "unknown variant",
            ),
            (
                "[[caller]]\nname = \"a\"\ntls_san = \"a.example\"\nrole = \"reader\"\naccounts = []",
                "no accounts",
            ),
            (
                "[[caller]]\nname = \"a\"\ntls_san = \"a.example\"\nrole = \"reader\"\naccounts = [\"[\"]",
                "account glob",
            ),
            (
                "[[caller]]\nname = \"a\"\ntls_san = \"a.example\"\nrole = \"reader\"\naccounts = [\"*\"]\ntoken = \"x\"",
                "unknown field",
            ),
            (
                "[[caller]]\nname = \"a\"\ntls_san = \"a.example\"\nrole = \"reader\"\naccounts = [\"*\"]\n\
                 [[caller]]\nname = \"b\"\ntls_san = \"a.example\"\nrole = \"admin\"\naccounts = [\"*\"]",
                "shares its tls_san",
            ),
            (
                "[[caller]]\nname = \"a\"\njwt = { issuer = \"k8s\", subject = \"s\" }\nrole = \"reader\"\naccounts = [\"*\"]",
                "names no [[issuer]]",
            ),
            (
                "[[caller]]\nname = \"a\"\ntls_spiffe_id = \"spiffe://Td/x\"\nrole = \"reader\"\naccounts = [\"*\"]",
                "not a SPIFFE ID",
            ),
            (
                "[[issuer]]\nname = \"k8s\"\nissuer = \"https://k8s\"\njwks_uri = \"https://k8s/jwks\"\naudiences = []",
                "audiences",
            ),
            (
                "[[issuer]]\nname = \"k8s\"\nissuer = \"https://k8s\"\njwks_uri = \"http://k8s/jwks\"\naudiences = [\"cs\"]",
                "plain http only to loopback",
            ),
            (
                "[[issuer]]\nname = \"k8s\"\nissuer = \"https://k8s\"\njwks_uri = \"https://k8s/jwks\"\naudiences = [\"cs\"]\n\
                 [[caller]]\nname = \"a\"\njwt = { issuer = \"k8s\", subject = \"s\" }\nrole = \"reader\"\naccounts = [\"*\"]\n\
                 [[caller]]\nname = \"b\"\njwt = { issuer = \"k8s\", subject = \"s\" }\nrole = \"admin\"\naccounts = [\"*\"]",
                "shares its jwt issuer and subject",
            ),
        ] {
            let e = Table::parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains("my-real-token"), "{e}");
        }
    }

    #[test]
    fn digests_are_equal_only_when_every_bit_is() {
        let a: [u8; 32] = Sha256::digest(b"test").into();
        assert!(digests_equal(&a, &{ a }));
        for i in 0..32 {
            for bit in [0x01u8, 0x80] {
                let mut b = a;
                b[i] ^= bit;
                assert!(!digests_equal(&a, &b), "byte {i} bit {bit:#x} differs");
            }
        }
    }

    #[test]
    fn open_mode_is_an_admin_of_everything() {
        let c = Callers::open().authenticate(&request("/x", None)).unwrap();
        assert_eq!(c.role(), Role::Admin);
        assert!(c.may_use(account("anything")));
    }

    #[test]
    fn account_denial_needs_an_authenticated_caller_and_says_nothing_of_existence() {
        let mut ext = http::Extensions::new();
        assert_eq!(
            caller(&ext).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let table = Table::parse(FILE).unwrap();
        ext.insert(table.by_token[0].1.clone());
        let billing = caller(&ext).unwrap();
        assert!(billing.authorize(account("acme-1")).is_ok());
        let e = billing.authorize(account("initech")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "permission denied: caller billing may not use account initech"
        );
    }
}
