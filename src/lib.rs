//! # credential-service
//!
//! Holds EdgeTag OAuth 2.0 credentials for a company's internal systems and hands out currently
//! valid access tokens over gRPC. Operators connect an account with BeginAuth → (browser approval)
//! → CompleteAuth; internal services call GetToken.
//!
//! # Layout
//! The data's path runs top to bottom; each module imports only modules listed below it
//! (`tests/it/layers.rs` fails on a cycle, and on a module missing here).
//! - [`launch`]: what the binary does: `--dev`, settings to bound listeners, serving, exit codes.
//! - [`server`]: composition: keys, store, provider client, broker, the gRPC and HTTP listeners,
//!   upkeep, shutdown.
//! - [`dev`]: `--dev` mode (cargo feature `dev`, on by default): the fake EdgeTag (crate
//!   `fake-edgetag`), temporary data, a banner with the commands to try.
//! - [`telemetry`]: log set-up, and OpenTelemetry trace export when an OTLP endpoint is set.
//! - [`config`]: clap settings with environment variables, EdgeTag presets.
//! - [`callback`]: the browser's landing page after EdgeTag's approval; completes the flow.
//! - [`service`]: the gRPC `CredentialService`: requests in, domain calls, statuses out; the places
//!   for watch streams.
//! - [`backup`]: the backup file (sealed records, checksummed), restore's checks, offline backups.
//! - [`auth`]: callers file (static tokens, client certificates, SPIFFE IDs, JWTs checked against
//!   their issuers' keys), the caller check before every call, roles, account globs.
//! - [`tls`]: the server's certificate, key and client CA, checked together and swapped whole when
//!   their files change; the certificate's expiry.
//! - [`broker`]: accounts in memory, pending authorizations, single-flight refresh, the scheduler.
//! - [`audit`]: one structured `audit` event per call: caller, method, account, outcome; token
//!   reads counted in each account's own memory (the broker holds the counters).
//! - [`error`]: the domain error and its one mapping to gRPC status codes.
//! - [`oauth`]: PKCE, the authorize URL, the token endpoint; turns its answers into token sets.
//! - [`store`]: durable state: pending states and account records, durable before a write returns.
//! - [`metrics`]: Prometheus series, the `/metrics` endpoint, and every bound's throttled refusal
//!   log; told things, it asks nothing.
//! - [`tokens`]: the domain records (token set, account record, pending authorization).
//! - [`grant`]: the authorization code and state from EdgeTag's redirect, obtainable only by parsing.
//! - [`account`]: [`account::AccountId`], obtainable only by parsing.
//! - [`sealing`]: encryption at rest (XChaCha20-Poly1305), key files, key ids for rotation.
//! - [`clock`]: wall-clock time with a test hook.
//! - [`reload`]: values read from files and swapped whole when the files' content changes.
//! - [`proto`]: generated code and the reflection descriptor set.
//! - [`traces`]: whether traces are on, and links between spans (a waiter to the refresh it joined).

pub mod account;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod broker;
pub mod callback;
pub mod clock;
pub mod config;
pub mod dev;
pub mod error;
pub mod grant;
pub mod launch;
pub mod metrics;
pub mod oauth;
pub mod proto;
pub mod reload;
pub mod sealing;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod traces;
