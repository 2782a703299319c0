//! The signing keys of the JWT issuers in the callers file: each issuer's JSON Web Key Set, read
//! from a file or fetched over HTTPS, kept in memory and swapped whole when it changes.
//!
//! Fetching happens in the background ([`run_fetchers`]), never on a call's path: at start (which
//! does not wait for it), every [`FetchTiming::refresh_every`] after a good fetch, sooner after a
//! failed one (the keys in hand keep working meanwhile), and when a token names a key id the set
//! does not hold, at most once per [`FetchTiming::min_interval`] however many such tokens arrive.
//! A key set survives a reload of the callers file when its source is unchanged.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse},
};
use tokio::sync::Notify;
use url::Url;

/// When key sets are fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FetchTiming {
    /// Fetches triggered by unknown key ids are at least this far apart, per issuer.
    pub(super) min_interval: Duration,
    /// How often a key set is fetched again after a good fetch.
    pub(super) refresh_every: Duration,
    /// The longest a fetch may take, connection included.
    pub(super) timeout: Duration,
}

impl Default for FetchTiming {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(10),
            refresh_every: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The longest JWKS document read; real ones are a few kilobytes.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// The first and the longest pause after a failed fetch.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One verification key and the algorithms its type fits.
pub(super) struct Key {
    pub(super) decoding: DecodingKey,
    algorithms: &'static [Algorithm],
    /// The key as published, to tell a changed set from a refetched one.
    published: String,
}

impl Key {
    /// Whether `alg` fits this key's type (and the algorithm the key names, if it names one).
    pub(super) fn allows(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

/// A key set as fetched: keys by `kid`.
#[derive(Default)]
pub(super) struct KeySet {
    pub(super) keys: HashMap<String, Arc<Key>>,
    /// False until the first good fetch: tokens are then answered UNAVAILABLE, not refused.
    pub(super) loaded: bool,
    /// Changes whenever the keys do; verified tokens remember it, so removing a key ends them.
    pub(super) generation: u64,
}

/// Where a key set comes from.
enum Source {
    File(PathBuf),
    Uri {
        url: Url,
        http: reqwest::Client,
        /// Sent as `authorization: Bearer` (a cluster whose JWKS needs the reader's own token).
        token_file: Option<PathBuf>,
    },
}

/// What identifies a source across reloads of the callers file.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(super) struct SourceSpec {
    pub(super) jwks_uri: Option<Url>,
    pub(super) jwks_file: Option<PathBuf>,
    /// The CA file's content, so a new CA makes a new client.
    pub(super) ca_pem: Option<Vec<u8>>,
    pub(super) token_file: Option<PathBuf>,
}

/// One issuer's key set and its fetching.
pub(super) struct KeySource {
    /// For log lines: the issuer's name and where its keys come from.
    pub(super) what: String,
    spec: SourceSpec,
    source: Source,
    timing: FetchTiming,
    current: ArcSwap<KeySet>,
    /// When a token with an unknown key id last asked for a fetch.
    last_asked: Mutex<Option<Instant>>,
    /// A fetch was asked for and has not completed yet.
    asked: AtomicBool,
    wake: Arc<Notify>,
    /// Whether its fetcher task runs.
    fetching: AtomicBool,
}

impl Drop for KeySource {
    fn drop(&mut self) {
        // Its fetcher, asleep, holds only a weak reference: let it see that and end.
        self.wake.notify_one();
    }
}

impl KeySource {
    /// A source for `spec`; a file is read at once (a bad file is a bad callers file), a URL is
    /// fetched later by [`run_fetchers`].
    pub(super) fn new(
        issuer: &str,
        spec: SourceSpec,
        timing: FetchTiming,
    ) -> Result<Arc<Self>, String> {
        let (source, what) = match (&spec.jwks_uri, &spec.jwks_file) {
            (Some(url), None) => {
                let mut http = reqwest::Client::builder()
                    .timeout(timing.timeout)
                    .connect_timeout(timing.timeout.min(Duration::from_secs(5)))
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("credential-service/", env!("CARGO_PKG_VERSION")));
                if let Some(pem) = &spec.ca_pem {
                    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|_| {
                        format!("issuer {issuer}: ca_file holds no PEM certificate")
                    })?;
                    if certs.is_empty() {
                        return Err(format!("issuer {issuer}: ca_file holds no PEM certificate"));
                    }
                    // The cluster's CA alone: its API server is not vouched for by public roots.
                    http = http.tls_built_in_root_certs(false);
                    for cert in certs {
                        http = http.add_root_certificate(cert);
                    }
                }
                let http = http
                    .build()
                    .map_err(|e| format!("issuer {issuer}: cannot build its HTTP client: {e}"))?;
                let source = Source::Uri {
                    url: url.clone(),
                    http,
                    token_file: spec.token_file.clone(),
                };
                (source, format!("issuer {issuer}'s keys ({url})"))
            }
            (None, Some(path)) => {
                let what = format!("issuer {issuer}'s keys ({})", path.display());
                (Source::File(path.clone()), what)
            }
            _ => {
                return Err(format!(
                    "issuer {issuer} needs exactly one of jwks_uri and jwks_file"
                ));
            }
        };
        let this = Arc::new(Self {
            what,
            spec,
            source,
            timing,
            current: ArcSwap::from_pointee(KeySet::default()),
            last_asked: Mutex::new(None),
            asked: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            fetching: AtomicBool::new(false),
        });
        if let Source::File(path) = &this.source {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", this.what))?;
            this.install(parse(&bytes).map_err(|e| format!("{}: {e}", this.what))?);
        }
        Ok(this)
    }

    /// Whether this source fetches from `spec` with `timing` (then a reload keeps it).
    pub(super) fn is(&self, spec: &SourceSpec, timing: FetchTiming) -> bool {
        self.spec == *spec && self.timing == timing
    }

    /// The keys in hand.
    pub(super) fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// A token named a key id the set lacks: asks for a fetch, unless one was asked for within
    /// `min_interval`. Returns whether a fetch is coming (asked now, or asked before and not
    /// done yet): the key may yet arrive, so the caller is told to retry.
    pub(super) fn ask_for_fetch(&self) -> bool {
        let mut last = self.last_asked.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < self.timing.min_interval) {
            return self.asked.load(Ordering::Acquire);
        }
        *last = Some(Instant::now());
        self.asked.store(true, Ordering::Release);
        self.wake.notify_one();
        true
    }

    /// Swaps in `keys`; the generation moves only if they differ from those in hand.
    fn install(&self, mut keys: HashMap<String, Arc<Key>>) {
        let old = self.current.load();
        let same = old.loaded
            && old.keys.len() == keys.len()
            && keys.iter().all(|(kid, key)| {
                old.keys
                    .get(kid)
                    .is_some_and(|k| k.published == key.published)
            });
        if same {
            return;
        }
        keys.shrink_to_fit();
        tracing::info!(keys = keys.len(), "{}: key set loaded", self.what);
        self.current.store(Arc::new(KeySet {
            keys,
            loaded: true,
            generation: old.generation + 1,
        }));
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let bytes = match &self.source {
            Source::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read it: {e}"))?,
            Source::Uri {
                url,
                http,
                token_file,
            } => {
                let mut request = http.get(url.clone()).header("accept", "application/json");
                if let Some(path) = token_file {
                    let text = tokio::fs::read_to_string(path)
                        .await
                        .map_err(|e| format!("cannot read token_file {}: {e}", path.display()))?;
                    let token = text.lines().next().unwrap_or("").trim();
                    request = request.bearer_auth(token);
                }
                let mut response = request.send().await.map_err(|e| {
                    // reqwest's message names the URL, never a header.
                    format!("fetch failed: {}", error_chain(&e))
                })?;
                if !response.status().is_success() {
                    return Err(format!("fetch answered HTTP {}", response.status()));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| format!("fetch failed: {}", error_chain(&e)))?
                {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(format!("the key set is over {MAX_JWKS_BYTES} bytes"));
                    }
                    body.extend_from_slice(&chunk);
                }
                body
            }
        };
        parse(&bytes)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The usable keys of a JWKS document: signing keys with a `kid` whose type fits one of RS256,
/// PS256, ES256 (P-256) or EdDSA (Ed25519). Others (HMAC secrets, encryption keys, other
/// curves) are skipped, so no token can be checked against them.
fn parse(bytes: &[u8]) -> Result<HashMap<String, Arc<Key>>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JWKS document (a JSON object with `keys`): {e}"))?;
    let mut keys = HashMap::new();
    for value in document.keys {
        let published = value.to_string();
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let algorithms: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[Algorithm::RS256, Algorithm::PS256],
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                &[Algorithm::ES256]
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                &[Algorithm::EdDSA]
            }
            _ => continue,
        };
        // A key that names its algorithm is held to it.
        let algorithms = match jwk.common.key_algorithm {
            None => algorithms,
            Some(named) => match algorithms.iter().position(|a| key_algorithm(*a) == named) {
                Some(at) => &algorithms[at..=at],
                None => continue,
            },
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.entry(kid).or_insert_with(|| {
            Arc::new(Key {
                decoding,
                algorithms,
                published,
            })
        });
    }
    Ok(keys)
}

fn key_algorithm(alg: Algorithm) -> KeyAlgorithm {
    match alg {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::PS256 => KeyAlgorithm::PS256,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        // Never in a key's list (see `parse`).
        _ => KeyAlgorithm::HS256,
    }
}

/// The key sources of the callers file in force; the fetchers follow it.
#[derive(Default)]
pub(super) struct Registry {
    sources: Mutex<Vec<Arc<KeySource>>>,
    changed: Notify,
}

impl Registry {
    /// The source for `spec`: the one in force if it matches, else a new one.
    pub(super) fn source(
        &self,
        issuer: &str,
        spec: SourceSpec,
        timing: FetchTiming,
    ) -> Result<Arc<KeySource>, String> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = sources.iter().find(|s| s.is(&spec, timing)) {
            return Ok(found.clone());
        }
        drop(sources);
        KeySource::new(issuer, spec, timing)
    }

    /// The sources of the callers file now in force.
    pub(super) fn replace(&self, sources: Vec<Arc<KeySource>>) {
        *self.sources.lock().unwrap_or_else(|e| e.into_inner()) = sources;
        self.changed.notify_one();
    }
}

/// Starts a fetcher for every key source in force, now and after each reload, for as long as it
/// runs (the server runs it beside the reloader).
pub(super) async fn run_fetchers(registry: Arc<Registry>) {
    loop {
        let sources = registry
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for source in sources {
            if !source.fetching.swap(true, Ordering::AcqRel) {
                tokio::spawn(fetch_loop(Arc::downgrade(&source), source.wake.clone()));
            }
        }
        registry.changed.notified().await;
    }
}

/// Fetches one source's keys until the source is dropped (a reload removed it).
async fn fetch_loop(source: Weak<KeySource>, wake: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        let Some(this) = source.upgrade() else { return };
        // An ask that arrives during this fetch is served by the next one.
        let serves_ask = this.asked.load(Ordering::Acquire);
        let fetched = this.fetch().await;
        let pause = match fetched {
            Ok(keys) => {
                failures = 0;
                this.install(keys);
                this.timing.refresh_every
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                let held = this.keys();
                tracing::warn!(
                    error = %reason,
                    keys_in_hand = held.keys.len(),
                    "{}: cannot load the key set; keeping the keys in hand and trying again",
                    this.what
                );
                RETRY_FIRST
                    .saturating_mul(1 << failures.min(6).saturating_sub(1))
                    .min(RETRY_MAX)
                    .min(this.timing.refresh_every)
            }
        };
        if serves_ask {
            this.asked.store(false, Ordering::Release);
        }
        drop(this);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_signing_keys_of_the_four_algorithms_are_kept() {
        let doc = br#"{"keys":[
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
            {"kty":"EC","kid":"p384","crv":"P-384","x":"AA","y":"AA"},
            {"kty":"OKP","kid":"ed","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","kid":"ed-enc","use":"enc","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","kid":"ed-named-rs","alg":"RS256","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"RSA","kid":"rsa-ps","alg":"PS256","n":"AQAB","e":"AQAB"},
            "not a key"
        ]}"#;
        let keys = parse(doc).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ed", "rsa-ps"]);
        assert!(keys["ed"].allows(Algorithm::EdDSA));
        assert!(!keys["ed"].allows(Algorithm::ES256));
        assert!(keys["rsa-ps"].allows(Algorithm::PS256));
        assert!(!keys["rsa-ps"].allows(Algorithm::RS256));
        assert!(parse(b"[]").is_err());
    }
}
