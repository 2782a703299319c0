//! What the fake remembers: its configuration, codes, grants and tokens, faults and counters.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use tokio::sync::watch;

use crate::{
    CODE_LIFETIME, FAKE_TEAM_ID, FakeConfig, FakeTeam, Fault, UserMeFault, connections::Connections,
};

pub(crate) struct Inner {
    pub(crate) config: FakeConfig,
    /// The client secret accepted now: the configured one until a roll.
    pub(crate) client_secret: Mutex<String>,
    pub(crate) store: Mutex<Store>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) token_delay_nanos: AtomicU64,
    pub(crate) counters: Counters,
    pub(crate) connections: Arc<Connections>,
    /// Flips to `true` when the fake is dropped; releases [`Fault::Hang`] handlers.
    pub(crate) shutdown: watch::Sender<bool>,
    /// How `/v1/user/me` answers.
    pub(crate) user_me: Mutex<UserMe>,
}

/// What `/v1/user/me` says, and whether it fails.
pub(crate) struct UserMe {
    pub(crate) fault: Option<UserMeFault>,
    pub(crate) team_id: String,
    pub(crate) teams: Vec<FakeTeam>,
    pub(crate) requests: u64,
}

impl Default for UserMe {
    fn default() -> Self {
        Self {
            fault: None,
            team_id: FAKE_TEAM_ID.to_owned(),
            teams: vec![FakeTeam {
                id: FAKE_TEAM_ID.to_owned(),
                name: None,
            }],
            requests: 0,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) authorize: AtomicU64,
    pub(crate) token_requests: AtomicU64,
    pub(crate) code_exchanges_ok: AtomicU64,
    pub(crate) refreshes_ok: AtomicU64,
    pub(crate) revokes: AtomicU64,
    pub(crate) refresh_token_reuses: AtomicU64,
    /// Token requests being handled now; a watch, so tests can await a count instead of polling.
    pub(crate) token_in_flight: watch::Sender<u64>,
    pub(crate) token_peak: AtomicU64,
    /// Nanoseconds token requests spent in the handler, summed.
    pub(crate) token_nanos: AtomicU64,
    /// Requests to the API host carrying W3C trace context (`traceparent` or `tracestate`).
    pub(crate) trace_context: AtomicU64,
}

impl Counters {
    /// Counts the request if it carries trace context, which a caller should never send to a
    /// third party.
    pub(crate) fn note_trace_context(&self, headers: &axum::http::HeaderMap) {
        if headers.contains_key("traceparent") || headers.contains_key("tracestate") {
            self.trace_context.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
pub(crate) struct Faults {
    pub(crate) queue: VecDeque<Fault>,
    pub(crate) persistent: Option<Fault>,
    /// Refresh tokens whose refreshes EdgeTag sits on, and for how long (a slow EdgeTag for
    /// chosen accounts).
    pub(crate) held_refreshes: (std::collections::HashSet<String>, std::time::Duration),
}

/// Counts one token request as in flight for as long as it lives, and the time it took.
pub(crate) struct InFlight<'a>(&'a Counters, Instant);

impl<'a> InFlight<'a> {
    pub(crate) fn enter(counters: &'a Counters) -> Self {
        counters.token_in_flight.send_modify(|now| {
            *now += 1;
            counters.token_peak.fetch_max(*now, Ordering::SeqCst);
        });
        InFlight(counters, Instant::now())
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let nanos = u64::try_from(self.1.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.token_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.0.token_in_flight.send_modify(|now| *now -= 1);
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct PendingCode {
    pub(crate) client_id: String,
    pub(crate) redirect_uri: String,
    pub(crate) code_challenge: String,
    pub(crate) issued_at: SystemTime,
}

pub(crate) struct Grant {
    pub(crate) revoked: bool,
    /// The grant's current refresh token, if it still has one.
    pub(crate) refresh_token: Option<String>,
}

pub(crate) struct AccessToken {
    pub(crate) grant: u64,
    pub(crate) expires_at: SystemTime,
}

/// Codes, grants and tokens. Held under a `std` mutex for a few map operations at a time.
#[derive(Default)]
pub(crate) struct Store {
    pub(crate) codes: HashMap<String, PendingCode>,
    pub(crate) grants: HashMap<u64, Grant>,
    pub(crate) access: HashMap<String, AccessToken>,
    /// Live refresh token → grant id.
    pub(crate) refresh: HashMap<String, u64>,
    /// Refresh tokens replaced by rotation → grant id, kept only for reuse detection.
    pub(crate) rotated_away: HashMap<String, u64>,
    /// Every refresh token ever issued and every verifier ever received, for leak-scanning tests.
    pub(crate) issued_refresh: Vec<String>,
    pub(crate) received_verifiers: Vec<String>,
    pub(crate) next_grant_id: u64,
}

impl Store {
    pub(crate) fn access_token_is_valid(&self, token: &str, now: SystemTime) -> bool {
        self.access.get(token).is_some_and(|t| {
            now < t.expires_at && self.grants.get(&t.grant).is_some_and(|g| !g.revoked)
        })
    }

    /// Forgets expired codes and access tokens once the maps have doubled since the last sweep,
    /// keeping memory bounded in long `--dev` runs at amortised constant cost.
    pub(crate) fn sweep(&mut self, now: SystemTime) {
        if self.codes.len() >= 1024 && self.codes.len() == self.codes.capacity() {
            self.codes.retain(|_, c| now < c.issued_at + CODE_LIFETIME);
        }
        if self.access.len() >= 1024 && self.access.len() == self.access.capacity() {
            self.access.retain(|_, t| now < t.expires_at);
        }
    }

    pub(crate) fn new_grant(&mut self) -> u64 {
        self.next_grant_id += 1;
        let id = self.next_grant_id;
        self.grants.insert(
            id,
            Grant {
                revoked: false,
                refresh_token: None,
            },
        );
        id
    }

    pub(crate) fn issue_access_token(
        &mut self,
        grant: u64,
        now: SystemTime,
        lifetime: Duration,
    ) -> String {
        self.sweep(now);
        let token = random_token("eta_");
        self.access.insert(
            token.clone(),
            AccessToken {
                grant,
                expires_at: now + lifetime,
            },
        );
        token
    }

    /// Gives the grant a fresh refresh token, invalidating its previous one.
    pub(crate) fn issue_refresh_token(&mut self, grant: u64) -> String {
        let token = random_token("etr_");
        if let Some(g) = self.grants.get_mut(&grant)
            && let Some(old) = g.refresh_token.replace(token.clone())
        {
            self.refresh.remove(&old);
        }
        self.refresh.insert(token.clone(), grant);
        self.issued_refresh.push(token.clone());
        token
    }

    pub(crate) fn revoke_grant(&mut self, grant: u64) {
        if let Some(g) = self.grants.get_mut(&grant) {
            g.revoked = true;
            if let Some(old) = g.refresh_token.take() {
                self.refresh.remove(&old);
            }
        }
    }
}

/// A prefixed random token: 256 bits, base64url without padding.
pub(crate) fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", random_base64url())
}

/// 256 random bits, base64url without padding: 43 characters, also a valid PKCE verifier.
pub(crate) fn random_base64url() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}
