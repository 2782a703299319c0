//! The performance suite of issue 6, one command: `cargo bench --bench suite` (add `-- --quick` for
//! a smoke run, or name sections: `-- throughput storm scale durable`). Prints Markdown tables ready
//! for BENCHMARKS.md on stdout; progress goes to stderr.
//!
//! - [`throughput`]: floor versus service, in alternation, with 1, 1,000 and 100,000 accounts.
//! - [`storm`]: refresh storms, counted at the fake EdgeTag.
//! - [`scale`]: the real binary on 100,000 accounts: time to serve, memory, throughput, and
//!   [`backup`]: a Backup of them all, alone and under GetToken load.
//! - [`durable`]: CompleteAuth and refresh latency against a bare sled insert + flush.
//! - [`postgres`]: the same rows on a private PostgreSQL cluster, a three-replica storm, start-up.
//! - [`watchers`]: idle WatchToken streams on the real binary, and one refresh fanned out.
//! - [`traces`]: GetToken with OpenTelemetry traces off and on (1% sampled), alternating (only
//!   when named: `-- traces`).
//! - [`identity`]: GetToken with a JWT caller against a static-token caller, in alternation.
//! - [`h2load`]: GetToken driven by h2load from another process against the bare floor, the
//!   floor and the service (only when named: `-- h2load`).
//! - [`soak`]: ten minutes of refreshes, churn and reads, watching memory, descriptors and disk
//!   (only when named: `-- soak`, shortened with `--soak-seconds`).
//! - [`load`], [`floor`], [`fixture`]: the load generator, the floor server, set-up.

mod backup;
mod durable;
mod fixture;
mod floor;
mod h2load;
mod identity;
mod load;
mod postgres;
mod report;
mod scale;
mod soak;
mod storm;
mod throughput;
mod traces;
mod watchers;

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use credential_service::{clock::Clock, config::LogFormat, telemetry};

use crate::{fixture::Runtimes, load::LoadSpec};

#[derive(Parser)]
#[command(about = "credential-service performance suite (issue 6)")]
struct Cli {
    /// Sections to run (throughput, storm, scale, durable, postgres, watch, identity; recovery
    /// alone; soak, traces and h2load only when named); all but those three when none is named.
    sections: Vec<String>,
    /// A short smoke run: fewer accounts, one short round, fewer operations.
    #[arg(long)]
    quick: bool,
    /// Passed by `cargo bench`; without it (`cargo test --benches`) nothing runs.
    #[arg(long)]
    bench: bool,
    /// Worker threads of the runtime the servers under test run on.
    #[arg(long, default_value_t = 1)]
    server_threads: usize,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Client connections of the load generator.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Measured seconds per target and round.
    #[arg(long)]
    seconds: Option<f64>,
    /// Rounds of floor/service alternation.
    #[arg(long)]
    rounds: Option<usize>,
    /// Throughput rows to run, by their `auth` column (`no`, `yes`, `production`); all when none
    /// is named. For profiling one configuration.
    #[arg(long, value_delimiter = ',')]
    settings: Vec<String>,
    /// Account counts of the throughput rows (default 1, 1,000 and 100,000; with `--quick`
    /// 1, 1,000 and 10,000). For profiling one row.
    #[arg(long, value_delimiter = ',')]
    accounts: Vec<usize>,
    /// Drive only one target in the throughput rows (`floor` or `service`), for counting one
    /// server's instructions with `perf stat --per-thread`.
    #[arg(long)]
    only: Option<String>,
    /// A floor on tonic's default HTTP/2 settings (no keepalive) instead of the service's, as the
    /// rows before 2026-12-06 were measured: for comparing with them.
    #[arg(long)]
    bare_floor: bool,
    /// A floor that finds each account's own answer in a hash map of the loaded accounts instead
    /// of answering a constant: how much of the gap with many accounts any per-account answer
    /// pays (cache misses). Not the target's floor.
    #[arg(long)]
    lookup_floor: bool,
    /// Production rows write the audit trail to a file (`--audit-file`, in the data directory)
    /// instead of through the log formatter.
    #[arg(long)]
    audit_file: bool,
    /// Length of the soak section (run only when named: `-- soak`).
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
    /// Where data directories go (default: the system's temporary directory).
    #[arg(long)]
    data_root: Option<PathBuf>,
}

/// What every section gets.
pub struct Env {
    pub runtimes: Runtimes,
    pub load: LoadSpec,
    pub rounds: usize,
    pub data_root: Option<PathBuf>,
    /// `Some("floor")` or `Some("service")`: the throughput rows drive that target alone.
    pub only: Option<String>,
    /// The floor runs on tonic's default HTTP/2 settings, not the service's.
    pub bare_floor: bool,
    /// The floor answers each account with its own token, found by name.
    pub lookup_floor: bool,
    /// Production rows audit to a file of their own.
    pub audit_file: bool,
}

fn main() {
    let cli = Cli::parse();
    if !cli.bench {
        eprintln!("the performance suite runs with `cargo bench --bench suite`; nothing to do");
        return;
    }
    // The binary's logging, so the hot path pays what it pays in production, but into a file: on
    // the terminal, tens of thousands of audit lines would bury the tables.
    let log_path = std::env::temp_dir().join(format!(
        "credential-service-bench-{}.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path).expect("a log file in the temporary directory");
    eprintln!("the service's log goes to {}", log_path.display());
    let all = [
        "throughput",
        "storm",
        "scale",
        "durable",
        "recovery",
        "postgres",
        "watch",
        "identity",
        "soak",
        "h2load",
        "traces",
    ];
    // `soak` is long, `h2load` needs h2load installed and `traces` a collector: each runs only
    // when named; `recovery` is part of `storm`, or alone.
    let named = |s: &str| cli.sections.iter().any(|w| w == s);
    let wanted = |s: &str| {
        !["soak", "h2load", "traces"].contains(&s) && (cli.sections.is_empty() || named(s))
    };
    for s in &cli.sections {
        assert!(
            all.contains(&s.as_str()),
            "unknown section {s:?}; pick from {all:?}"
        );
    }
    let q = cli.quick;
    let env = Env {
        runtimes: Runtimes::new(cli.server_threads, cli.client_threads),
        load: LoadSpec {
            channels: cli.channels,
            in_flight: cli.in_flight,
            warmup: Duration::from_millis(if q { 200 } else { 1000 }),
            duration: Duration::from_secs_f64(cli.seconds.unwrap_or(if q { 1.0 } else { 5.0 })),
        },
        rounds: cli.rounds.unwrap_or(if q { 1 } else { 3 }),
        data_root: cli.data_root.clone(),
        only: cli.only.clone(),
        bare_floor: cli.bare_floor,
        audit_file: cli.audit_file,
        lookup_floor: cli.lookup_floor,
    };
    // With `traces`, the subscriber exports spans, as the binary's does with an endpoint set; the
    // exporter is made on the server runtime, where the binary's would run.
    let collector = named("traces").then(|| traces::Collector::start(&env.runtimes.fake));
    let telemetry = {
        let _server = env.runtimes.server.enter();
        telemetry::init_to(
            LogFormat::Text,
            std::sync::Mutex::new(log),
            false,
            collector.as_ref().map(|(_, config)| config),
        )
        .expect("the subscriber is installed")
    };
    let counts: &[usize] = if !cli.accounts.is_empty() {
        &cli.accounts
    } else if q {
        &[1, 1_000, 10_000]
    } else {
        &[1, 1_000, 100_000]
    };
    let largest = counts
        .iter()
        .copied()
        .max()
        .expect("at least one account count");

    println!("{}", report::machine(&cli_line(&cli), &env));
    env.runtimes.client.block_on(async {
        // The largest data set is seeded once; the throughput and scale sections both use it.
        let big = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-big-");
        let big_names = fixture::account_names(largest);
        if wanted("throughput") || wanted("scale") {
            let took = fixture::seed(big.path(), &big_names, &Clock::system(), |_| {
                fixture::random_token("etr_")
            })
            .await;
            eprintln!("bench: seeded {largest} accounts in {took:.2?}");
        }
        // Scale first: the child process needs the directory closed, and an in-process server's
        // connection tasks may keep its database open for a moment after it stops.
        if wanted("scale") {
            let scale = scale::run(&env, big.path(), big_names.clone()).await;
            println!("{}", report::scale(&scale));
        }
        if wanted("throughput") {
            let mut comparisons = Vec::new();
            for &n in counts {
                let (small, names);
                let dir = if n == largest {
                    names = big_names.clone();
                    big.path()
                } else {
                    small = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-n-");
                    names = fixture::account_names(n);
                    fixture::seed(small.path(), &names, &Clock::system(), |_| {
                        fixture::random_token("etr_")
                    })
                    .await;
                    small.path()
                };
                let row = |s: &str| cli.settings.is_empty() || cli.settings.iter().any(|w| w == s);
                if row("no") {
                    comparisons
                        .push(throughput::compare(&env, dir, names.clone(), None, false).await);
                }
                let auth = fixture::caller_auth(dir);
                for (label, production) in [("yes", false), ("production", true)] {
                    if row(label) {
                        comparisons.push(
                            throughput::compare(&env, dir, names.clone(), Some(&auth), production)
                                .await,
                        );
                    }
                }
            }
            println!("{}", report::throughput(&comparisons, &env));
        }
        if wanted("storm") {
            let one = storm::one_account(&env, 1_000).await;
            let many = storm::many_accounts(&env, if q { 1_000 } else { 10_000 }).await;
            println!("{}", report::storms(&[one, many]));
        }
        if wanted("storm") || named("recovery") {
            let mut recoveries = Vec::new();
            for wake in [storm::Wake::Callers, storm::Wake::Scheduler] {
                recoveries.push(storm::recovery(&env, 1_000, wake).await);
            }
            println!("{}", report::recovery(&recoveries));
        }
        if wanted("durable") {
            let durable = durable::run(&env, if q { 30 } else { 300 }).await;
            println!("{}", report::durable(&durable));
        }
        if wanted("postgres") {
            let pg = postgres::run(&env, q).await;
            println!("{}", report::postgres(&pg));
        }
        if wanted("watch") {
            let w = watchers::run(&env, if q { 1_000 } else { 10_000 }, 1_000).await;
            println!("{}", report::watchers(&w));
        }
        if named("h2load") {
            let mut rows = Vec::new();
            let counts: &[usize] = if cli.accounts.is_empty() {
                &[1]
            } else {
                &cli.accounts
            };
            for &n in counts {
                let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-h2-");
                let names = fixture::account_names(n);
                fixture::seed(dir.path(), &names, &Clock::system(), |_| {
                    fixture::random_token("etr_")
                })
                .await;
                let auth = fixture::caller_auth(dir.path());
                let row = |s: &str| cli.settings.is_empty() || cli.settings.iter().any(|w| w == s);
                for (label, auth, production) in [
                    ("no", None, false),
                    ("yes", Some(&auth), false),
                    ("production", Some(&auth), true),
                ] {
                    if row(label) {
                        rows.push(
                            h2load::run(&env, dir.path(), names.clone(), auth, production).await,
                        );
                    }
                }
            }
            println!("{}", report::h2load(&rows));
        }
        if let Some((collector, otel)) = &collector {
            let names = fixture::account_names(1);
            let dirs = [
                fixture::temp_dir(env.data_root.as_deref(), "cs-bench-off-"),
                fixture::temp_dir(env.data_root.as_deref(), "cs-bench-on-"),
            ];
            for dir in &dirs {
                fixture::seed(dir.path(), &names, &Clock::system(), |_| {
                    fixture::random_token("etr_")
                })
                .await;
            }
            let auth = fixture::caller_auth(dirs[0].path());
            let dirs = [dirs[0].path(), dirs[1].path()];
            let traced = traces::compare(&env, dirs, names, &auth, collector, otel.calls).await;
            println!("{}", report::traces(&traced));
        }
        if wanted("identity") {
            let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-identity-");
            let names = fixture::account_names(if q { 100 } else { 1_000 });
            fixture::seed(dir.path(), &names, &Clock::system(), |_| {
                fixture::random_token("etr_")
            })
            .await;
            let result = identity::run(&env, dir.path(), names).await;
            println!("{}", identity::report(&result));
        }
        if named("soak") {
            let spec = soak::SoakSpec::new(Duration::from_secs(cli.soak_seconds));
            let soak = soak::run(&env, spec).await;
            println!("{}", report::soak(&soak));
        }
    });
    println!("{}", report::load_after());
    telemetry.shutdown();
}

fn cli_line(cli: &Cli) -> String {
    let mut line = String::from("cargo bench --bench suite --");
    if cli.quick {
        line.push_str(" --quick");
    }
    if cli.sections.iter().any(|s| s == "soak") {
        line.push_str(&format!(" --soak-seconds {}", cli.soak_seconds));
    }
    if !cli.accounts.is_empty() {
        let counts: Vec<String> = cli.accounts.iter().map(|n| n.to_string()).collect();
        line.push_str(&format!(" --accounts {}", counts.join(",")));
    }
    if !cli.settings.is_empty() {
        line.push_str(&format!(" --settings {}", cli.settings.join(",")));
    }
    if cli.bare_floor {
        line.push_str(" --bare-floor");
    }
    if cli.audit_file {
        line.push_str(" --audit-file");
    }
    if cli.lookup_floor {
        line.push_str(" --lookup-floor");
    }
    for s in &cli.sections {
        line.push(' ');
        line.push_str(s);
    }
    line
}
