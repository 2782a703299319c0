//! Open files at start: the soft `RLIMIT_NOFILE` raised to the hard limit (systemd and many
//! shells start services at a soft 1024 whatever the hard limit allows), and a warning when even
//! that is below what the listeners' bounds may hold at once, since then a flood of connections
//! could take the descriptors the rest of the service needs.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::config::{ServiceConfig, StoreConfig};

/// Descriptors for everything but client connections: the listeners, sled's files or the
/// PostgreSQL pool (32 connections), the log, and slack.
const RESERVE: u64 = 128;

/// The kernel's usual ceiling (`fs.nr_open`), for a hard limit of "unlimited", which a soft
/// limit cannot take.
const NR_OPEN: u64 = 1 << 20;

/// The descriptors the bounds in `config` may hold at once: every gRPC connection, every HTTP
/// connection of each HTTP listener, each request to EdgeTag that may be out (refreshes, stalled
/// ones included, and the code exchanges and revocations beside them), and [`RESERVE`]. The
/// systemd unit's `LimitNOFILE` is checked against it.
pub fn budget(config: &ServiceConfig) -> u64 {
    let http_listeners =
        u64::from(config.callback.is_some()) + u64::from(config.metrics_listen.is_some());
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    count(config.limits.max_connections)
        .saturating_add(count(config.http_limits.max_connections).saturating_mul(http_listeners))
        .saturating_add(count(
            config
                .broker
                .upstream_max_in_flight
                .max(config.broker.upstream_concurrency),
        ))
        .saturating_add(count(config.broker.upstream_concurrency))
        .saturating_add(RESERVE)
}

/// Raises the soft open-files limit to the hard one and logs the outcome once: at INFO when the
/// limit covers [`budget`], else a warning naming the flags and the setting to change.
pub fn raise_and_check(config: &ServiceConfig) {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let target = maximum.unwrap_or(NR_OPEN);
    let limit = match current {
        Some(soft) if soft < target => match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum,
            },
        ) {
            Ok(()) => target,
            Err(e) => {
                tracing::warn!(soft, hard = target, error = %e, "cannot raise the open-file limit");
                soft
            }
        },
        Some(soft) => soft,
        None => u64::MAX,
    };
    let needed = budget(config);
    if limit < needed {
        tracing::warn!(
            open_files = limit,
            needed,
            store = match config.store {
                StoreConfig::Sled => "sled",
                StoreConfig::Postgres(_) => "postgres",
            },
            "the open-file limit is below what the bounds may hold (--max-connections, plus \
             --http-max-connections per HTTP listener, plus --upstream-max-in-flight and \
             --upstream-concurrency for EdgeTag, plus {RESERVE} for the rest): raise it \
             (LimitNOFILE= under systemd, ulimit -n) or lower those bounds"
        );
    } else {
        tracing::info!(open_files = limit, needed, "open-file limit");
    }
}
