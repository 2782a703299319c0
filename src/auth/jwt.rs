//! Callers that present a JWT from an issuer in the callers file (a Kubernetes service-account
//! token, an OIDC access token): its signature checked against the issuer's published keys
//! ([`super::jwks`]), chosen by `kid`, with RS256, PS256, ES256 or EdDSA only and only the one
//! the key's type fits; `iss`, `aud`, `exp`, `nbf` and `iat` checked with 60 s of leeway; `sub`
//! names the caller.
//!
//! A verified token is remembered by its SHA-256 until its `exp` ([`Verified`]), so a caller's
//! token reads do not pay a signature check each; the memory is dropped with the callers file it
//! was checked under, and ends early when the issuer's key set changes (a removed key ends the
//! tokens it signed).

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use base64::Engine as _;
use dashmap::DashMap;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use tonic::Code;

use super::{
    Caller,
    jwks::{FetchTiming, KeySource, Registry, SourceSpec},
};

/// Tokens longer than this are refused before any parsing.
pub const MAX_BEARER_BYTES: usize = 8 * 1024;
/// The leeway on `exp`, `nbf` and `iat`, for clocks that disagree a little.
const LEEWAY_SECS: u64 = 60;
/// The most verified tokens remembered per callers file; beyond it, expired ones are dropped, and
/// if none has expired new ones are checked on every call instead.
const MAX_REMEMBERED: usize = 100_000;

/// An `[[issuer]]` of the callers file.
pub(super) struct Issuer {
    /// The name callers' `jwt.issuer` refers to.
    pub(super) name: Box<str>,
    /// The `iss` its tokens carry.
    pub(super) iss: Box<str>,
    pub(super) audiences: Vec<String>,
    pub(super) keys: Arc<KeySource>,
}

/// An `[[issuer]]`: whose JWTs callers may present.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IssuerEntry {
    name: String,
    /// The tokens' `iss`, exactly.
    issuer: String,
    jwks_uri: Option<String>,
    jwks_file: Option<PathBuf>,
    /// Trusted alone for `jwks_uri` (a cluster's CA).
    ca_file: Option<PathBuf>,
    /// A token sent when fetching `jwks_uri` (a cluster that lets only its own workloads read it).
    token_file: Option<PathBuf>,
    audiences: Vec<String>,
}

impl Issuer {
    /// One `[[issuer]]` of the callers file, checked, with its key source from `keys`.
    pub(super) fn parse(
        entry: IssuerEntry,
        keys: &Registry,
        timing: FetchTiming,
    ) -> Result<Self, String> {
        let name = entry.name.trim();
        if name.is_empty() {
            return Err("an issuer has an empty name".into());
        }
        if entry.issuer.is_empty() {
            return Err(format!("issuer {name}: `issuer` is empty"));
        }
        if entry.audiences.is_empty() || entry.audiences.iter().any(String::is_empty) {
            return Err(format!(
                "issuer {name}: audiences must list one or more non-empty audiences"
            ));
        }
        let jwks_uri = entry
        .jwks_uri
        .as_deref()
        .map(|uri| {
            let url = url::Url::parse(uri)
                .map_err(|e| format!("issuer {name}: jwks_uri {uri:?} is not a URL: {e}"))?;
            match url.scheme() {
                "https" => Ok(url),
                "http" if is_loopback(&url) => Ok(url),
                _ => Err(format!(
                    "issuer {name}: jwks_uri must be an https:// URL (plain http only to loopback)"
                )),
            }
        })
        .transpose()?;
        if jwks_uri.is_none() && (entry.ca_file.is_some() || entry.token_file.is_some()) {
            return Err(format!(
                "issuer {name}: ca_file and token_file apply to jwks_uri only"
            ));
        }
        let ca_pem = entry
            .ca_file
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    format!("issuer {name}: cannot read ca_file {}: {e}", path.display())
                })
            })
            .transpose()?;
        let spec = SourceSpec {
            jwks_uri,
            jwks_file: entry.jwks_file,
            ca_pem,
            token_file: entry.token_file,
        };
        Ok(Issuer {
            name: name.into(),
            iss: entry.issuer.into(),
            audiences: entry.audiences,
            keys: keys.source(name, spec, timing)?,
        })
    }
}

/// Whether `url` points at this machine. The same rule as the provider URLs' (`config`), which
/// this module may not import (`config` builds on `auth`).
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Why a JWT was not accepted: the audit's reason and the caller's message. Never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLong,
    Malformed,
    AlgorithmNotAllowed,
    UnknownIssuer,
    /// The issuer's keys are not loaded yet, or a fetch for a new key id is under way.
    KeysNotReady,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    UnknownSubject,
}

impl Refusal {
    /// The audit event's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLong => "token too long",
            Self::Malformed => "malformed token",
            Self::AlgorithmNotAllowed => "algorithm not allowed",
            Self::UnknownIssuer => "unknown issuer",
            Self::KeysNotReady => "issuer keys not loaded",
            Self::UnknownKey => "unknown key",
            Self::BadSignature => "bad signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::WrongAudience => "wrong audience",
            Self::UnknownSubject => "unknown subject",
        }
    }

    /// What the caller is told: UNAVAILABLE while keys are awaited (retrying will help),
    /// UNAUTHENTICATED otherwise.
    pub fn status(self) -> tonic::Status {
        let code = match self {
            Self::KeysNotReady => Code::Unavailable,
            _ => Code::Unauthenticated,
        };
        let message = match self {
            Self::TooLong => format!("bearer token over {MAX_BEARER_BYTES} bytes"),
            Self::KeysNotReady => {
                "the token issuer's signing keys are being fetched; retry shortly".to_owned()
            }
            Self::AlgorithmNotAllowed => {
                "JWT algorithm not allowed (RS256, PS256, ES256 or EdDSA, as the key's type fits)"
                    .to_owned()
            }
            other => format!("JWT refused: {}", other.reason()),
        };
        tonic::Status::new(code, message)
    }
}

/// A verified token, remembered by its digest.
#[derive(Clone)]
pub(super) struct Verified {
    pub(super) caller: Arc<Caller>,
    /// Its `exp`, in seconds since the epoch.
    expires: u64,
    keys: Arc<KeySource>,
    generation: u64,
}

/// Verified tokens of one callers file, by SHA-256.
#[derive(Default)]
pub(super) struct Remembered(DashMap<[u8; 32], Verified, foldhash::fast::RandomState>);

impl Remembered {
    /// The caller of a token verified before, if it has not expired and its issuer's keys have
    /// not changed since.
    pub(super) fn get(&self, digest: &[u8; 32]) -> Option<Arc<Caller>> {
        let entry = self.0.get(digest)?;
        let fresh = entry.expires > now_secs() && entry.keys.keys().generation == entry.generation;
        fresh.then(|| entry.caller.clone())
    }

    fn remember(&self, digest: [u8; 32], verified: Verified) {
        if self.0.len() >= MAX_REMEMBERED {
            let now = now_secs();
            self.0.retain(|_, v| v.expires > now);
            if self.0.len() >= MAX_REMEMBERED {
                return;
            }
        }
        self.0.insert(digest, verified);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    /// Extensions the verifier must understand; this one understands none.
    crit: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    nbf: Option<u64>,
    iat: Option<u64>,
}

/// The caller `token` names, checked as the module docs say. `find` maps (issuer name,
/// subject) to a caller. On refusal, the caller's name too when the signature was good (an
/// expired token of a known caller).
pub(super) fn verify<'a>(
    token: &[u8],
    digest: [u8; 32],
    issuers: &[Issuer],
    find: impl Fn(&str, &str) -> Option<&'a Arc<Caller>>,
    remembered: &Remembered,
) -> Result<Arc<Caller>, (Refusal, Option<Arc<Caller>>)> {
    let refuse = |r| (r, None);
    if token.len() > MAX_BEARER_BYTES {
        return Err(refuse(Refusal::TooLong));
    }
    let token = std::str::from_utf8(token).map_err(|_| refuse(Refusal::Malformed))?;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(Refusal::Malformed));
    };
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| refuse(Refusal::Malformed))
    };
    let header: Header =
        serde_json::from_slice(&decode(header)?).map_err(|_| refuse(Refusal::Malformed))?;
    let alg = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "PS256" => Algorithm::PS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(refuse(Refusal::AlgorithmNotAllowed)),
    };
    if header.crit.is_some() {
        return Err(refuse(Refusal::Malformed));
    }
    // The issuer, to know whose keys to check against; believed only once they do.
    let peek: Peek =
        serde_json::from_slice(&decode(payload)?).map_err(|_| refuse(Refusal::Malformed))?;
    let issuer = peek
        .iss
        .and_then(|iss| issuers.iter().find(|i| *i.iss == *iss))
        .ok_or(refuse(Refusal::UnknownIssuer))?;
    let keys = issuer.keys.keys();
    let kid = header.kid.ok_or(refuse(Refusal::UnknownKey))?;
    let Some(key) = keys.keys.get(&kid) else {
        // Not loaded yet: the fetcher is at it already. Loaded: perhaps a new key, so one fetch
        // per interval, however many tokens ask; until it is done they are told to retry.
        return Err(refuse(if !keys.loaded || issuer.keys.ask_for_fetch() {
            Refusal::KeysNotReady
        } else {
            Refusal::UnknownKey
        }));
    };
    if !key.allows(alg) {
        return Err(refuse(Refusal::AlgorithmNotAllowed));
    }
    let mut validation = Validation::new(alg);
    // Times are checked below, once the caller is known, so their refusals can name it.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_issuer(&[&*issuer.iss]);
    validation.set_audience(&issuer.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let refusal = match e.kind() {
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                ErrorKind::InvalidAudience => Refusal::WrongAudience,
                ErrorKind::InvalidIssuer => Refusal::UnknownIssuer,
                ErrorKind::InvalidAlgorithm => Refusal::AlgorithmNotAllowed,
                _ => Refusal::Malformed,
            };
            refuse(refusal)
        })?
        .claims;
    // The signature is good from here on: refusals may name the caller.
    let caller = find(&issuer.name, &claims.sub);
    let named = |r| (r, caller.cloned());
    let now = now_secs();
    if claims.exp.saturating_add(LEEWAY_SECS) <= now {
        return Err(named(Refusal::Expired));
    }
    let ahead = |t: Option<u64>| t.is_some_and(|t| t > now + LEEWAY_SECS);
    if ahead(claims.nbf) || ahead(claims.iat) {
        return Err(named(Refusal::NotYetValid));
    }
    let caller = caller.ok_or(refuse(Refusal::UnknownSubject))?.clone();
    remembered.remember(
        digest,
        Verified {
            caller: caller.clone(),
            expires: claims.exp,
            keys: issuer.keys.clone(),
            generation: keys.generation,
        },
    );
    Ok(caller)
}
