//! The service's integration tests, one module per area, built into one test binary: one link of
//! the service and its dependencies instead of one per file, and one private PostgreSQL cluster
//! per run (`pg_cluster::Cluster::shared`) that every module's databases live on.
//!
//! Three suites stay binaries of their own because they read process-wide state that other
//! tests would add to: `tests/logs/` and `tests/audit_counts.rs` each install the process's one
//! global log subscriber (TRACE, searched for secrets; INFO, the production level, whose event
//! counts must be exact), and `tests/metrics.rs` asserts exact counts in the service's metric
//! registry, which is process-wide like Prometheus clients' default registry.

#[path = "../common/binary.rs"]
mod binary;
#[path = "../common/mod.rs"]
mod common;

mod admin;
mod audit_file;
mod backup;
mod callback;
mod crash;
mod deploy;
mod events;
mod flow;
mod hardening;
mod hardening2;
mod identity;
mod inputs;
mod key_rotation;
mod layers;
mod power_cut;
mod process;
mod readme;
mod readme_backups;
mod recovery;
mod refresh;
mod replicas;
mod rotation;
mod security;
mod team;
mod traces;
mod upstream;
mod watch;
