//! # credential-service
//!
//! Holds EdgeTag OAuth 2.0 credentials for a company's internal systems and hands out currently
//! valid access tokens over gRPC. Operators connect an account with BeginAuth → (browser approval)
//! → CompleteAuth; internal services call GetToken.
//!
//! # Layout
//! The data's path runs top to bottom; each module knows only those below it.
//! - [`launch`]: what the binary does: `--dev`, settings to bound listeners, serving, exit codes.
//! - [`server`]: `run(listener, config, clock, shutdown)`: health, reflection, the service, upkeep.
//! - [`auth`]: callers file, the tower layer that authenticates callers and checks roles, account globs.
//! - [`audit`]: one structured `audit` event per call: caller, method, account, outcome.
//! - [`service`]: the gRPC `CredentialService`: requests in, domain calls, statuses out.
//! - [`broker`]: accounts in memory, pending authorizations, single-flight refresh.
//! - [`oauth`]: PKCE, the authorize URL, the token endpoint and its answers, classified once.
//! - [`store`]: the sled database: pending states and token sets, flushed before every reply.
//! - [`sealing`]: encryption at rest (XChaCha20-Poly1305), key files, key ids for rotation.
//! - [`tokens`]: the domain records (token set, account record, pending authorization).
//! - [`account`]: [`account::AccountId`], obtainable only by parsing.
//! - [`error`]: the domain error and its one mapping to gRPC status codes.
//! - [`config`]: clap settings with environment variables, EdgeTag presets.
//! - [`clock`]: wall-clock time with a test hook.
//! - [`telemetry`]: log set-up.
//! - [`metrics`]: Prometheus series and the `/metrics` endpoint; fed by server, oauth and broker.
//! - [`callback`]: the browser's landing page after EdgeTag's approval; completes the flow.
//! - [`dev`]: `--dev` mode: fake EdgeTag, temporary data, a banner with the commands to try.
//! - [`fake_provider`]: a strict fake EdgeTag for tests, `--dev` mode and the `fake-edgetag` binary.
//! - [`proto`]: generated code and the reflection descriptor set.
//! - [`cli`]: `credctl`, the operators' command line over the gRPC API (a client, beside the rest).

pub mod account;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod callback;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod error;
pub mod fake_provider;
pub mod launch;
pub mod metrics;
pub mod oauth;
pub mod proto;
pub mod sealing;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tokens;
