//! Markdown for BENCHMARKS.md: the machine, then one table per section with targets and verdicts.

use std::process::Command;

use crate::{
    Env,
    durable::Durable,
    postgres::Postgres,
    scale::{self, Scale},
    soak::{Sample, Soak},
    storm::{Recovery, Storm, Wake},
    throughput::{self, Comparison},
    traces::{self, Traced},
    watchers::Watchers,
};

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

fn verdict(ok: bool) -> String {
    if ok { "✅ holds" } else { "❌ misses" }.into()
}

fn us(ns: u64) -> String {
    fmt_us(ns as f64 / 1000.0)
}

fn fmt_us(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn first_line(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    })
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn machine(command: &str, env: &Env) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rows = vec![
        vec!["command".into(), format!("`{command}`")],
        vec![
            "date (UTC)".into(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ],
        vec!["cores (nproc)".into(), cores.to_string()],
        vec![
            "CPU".into(),
            first_line("/proc/cpuinfo", "model name").unwrap_or_default(),
        ],
        vec![
            "kernel".into(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
        ],
        vec![
            "rustc".into(),
            command_output("rustc", &["-V"]).unwrap_or_else(|| "unknown".into()),
        ],
        vec!["load average at start (1/5/15 min)".into(), loadavg()],
        vec![
            "runtimes".into(),
            format!(
                "servers: {} worker thread(s); load generator: {} worker thread(s); fake EdgeTag: 1",
                env.runtimes.server.metrics().num_workers(),
                env.runtimes.client.metrics().num_workers()
            ),
        ],
        vec![
            "load".into(),
            format!(
                "{} connections × {} in flight; {:?} warm-up + {:?} measured per target and round; {} round(s)",
                env.load.channels,
                env.load.in_flight,
                env.load.warmup,
                env.load.duration,
                env.rounds
            ),
        ],
    ];
    format!("## Machine\n\n{}", table(&["", ""], &rows))
}

pub fn load_after() -> String {
    format!("Load average at the end (1/5/15 min): {}\n", loadavg())
}

pub fn throughput(comparisons: &[Comparison], env: &Env) -> String {
    let mut rows = Vec::new();
    for c in comparisons {
        let auth = c.settings.label();
        for (name, r, per_round) in [
            (
                "floor",
                &c.floor,
                c.rounds.iter().map(|r| r.0).collect::<Vec<_>>(),
            ),
            (
                "service",
                &c.service,
                c.rounds.iter().map(|r| r.1).collect(),
            ),
        ] {
            let spread = per_round
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" / ");
            rows.push(vec![
                c.accounts.to_string(),
                auth.into(),
                name.into(),
                format!("{:.0}", r.rps()),
                spread,
                fmt_us(r.p50_us()),
                fmt_us(r.p99_us()),
                format!("{:.1}", r.server_us_per_req()),
                format!("{:.1}", r.client_us_per_req()),
                r.errors.to_string(),
            ]);
        }
    }
    let mut ratios = Vec::new();
    for c in comparisons {
        ratios.push(vec![
            c.accounts.to_string(),
            c.settings.label().into(),
            format!("{:.3}", c.throughput_ratio()),
            format!("{:.3}", c.p99_ratio()),
            format!(
                "{:.2}",
                c.service.server_us_per_req() / c.floor.server_us_per_req()
            ),
            verdict(c.holds()),
        ]);
    }
    let floor = if env.lookup_floor {
        "**Lookup floor** (`--lookup-floor`): the floor answers each account with its own token, \
         found by name in a hash map of the loaded accounts, not with one constant. "
    } else {
        ""
    };
    format!(
        "## GetToken: floor versus service\n\n{floor}\
         Both servers run in this process on the same runtime ({} worker thread(s)); the load \
         generator runs on its own runtime. Targets: service ≥ {:.2}× the floor's throughput, p99 \
         ≤ {:.1}× the floor's; with production settings (auth `production`: callers file, bearer \
         tokens, `/metrics` on, default log level with the aggregated read audit) ≥ {:.2}× and \
         ≤ {:.1}×. Server CPU is the on-CPU time of the server runtime's threads per \
         answered request.\n\n{}\n{}",
        env.runtimes.server.metrics().num_workers(),
        throughput::MIN_THROUGHPUT_RATIO,
        throughput::MAX_P99_RATIO,
        throughput::PRODUCTION_MIN_THROUGHPUT_RATIO,
        throughput::PRODUCTION_MAX_P99_RATIO,
        table(
            &[
                "accounts",
                "auth",
                "target",
                "req/s",
                "req/s per round",
                "p50",
                "p99",
                "server CPU µs/req",
                "client CPU µs/req",
                "errors",
            ],
            &rows
        ),
        table(
            &[
                "accounts",
                "auth",
                "throughput service/floor",
                "p99 service/floor",
                "server CPU service/floor",
                "target",
            ],
            &ratios
        ),
    )
}

pub fn scale(s: &Scale) -> String {
    let rows = vec![
        vec![
            "time from spawn to first SERVING health answer".into(),
            format!("{:.0} ms", s.time_to_serve.as_secs_f64() * 1000.0),
            format!("≤ {:?}", scale::MAX_TIME_TO_SERVE),
            verdict(s.time_to_serve <= scale::MAX_TIME_TO_SERVE),
        ],
        vec![
            "resident memory after loading (VmRSS)".into(),
            format!("{:.1} MiB", s.rss_after_load_mb),
            format!("≤ {} MB", scale::MAX_RSS_MB),
            verdict(s.rss_after_load_mb <= scale::MAX_RSS_MB),
        ],
        vec![
            "resident memory after the GetToken load (VmRSS / peak VmHWM)".into(),
            format!("{:.1} / {:.1} MiB", s.rss_after_traffic_mb, s.peak_rss_mb),
            format!("≤ {} MB", scale::MAX_RSS_MB),
            verdict(s.peak_rss_mb <= scale::MAX_RSS_MB),
        ],
        vec![
            "GetToken throughput (binary's own runtime; shares the 2 cores with the load generator)"
                .into(),
            format!(
                "{:.0} req/s, p50 {}, p99 {}, {:.1} µs CPU/req, {} errors",
                s.load.rps(),
                fmt_us(s.load.p50_us()),
                fmt_us(s.load.p99_us()),
                s.load.server_us_per_req(),
                s.load.errors
            ),
            String::new(),
            String::new(),
        ],
    ];
    let b = &s.backup;
    let backup_rows = vec![
        vec![
            "one Backup stream written to a file and fsynced, no other load".into(),
            format!(
                "{:.0} ms ({} accounts, {:.1} MiB)",
                b.alone.as_secs_f64() * 1000.0,
                b.accounts,
                b.bytes as f64 / (1024.0 * 1024.0)
            ),
        ],
        vec![
            "Backups back to back during the GetToken window".into(),
            format!(
                "{} completed, {:.0} ms each on average",
                b.during,
                b.during_mean.as_secs_f64() * 1000.0
            ),
        ],
        vec![
            "GetToken throughput meanwhile (against the row above without backups)".into(),
            format!(
                "{:.0} req/s ({:.0}% of {:.0}), p50 {}, p99 {}, {} errors",
                b.load.rps(),
                100.0 * b.load.rps() / s.load.rps(),
                s.load.rps(),
                fmt_us(b.load.p50_us()),
                fmt_us(b.load.p99_us()),
                b.load.errors
            ),
        ],
    ];
    format!(
        "## Scale: the release binary on {} stored accounts\n\n{}\n### Backup of them all, online\n\n{}",
        s.accounts,
        table(&["measure", "value", "target", ""], &rows),
        table(&["measure", "value"], &backup_rows)
    )
}

pub fn storms(storms: &[Storm]) -> String {
    let rows: Vec<Vec<String>> = storms
        .iter()
        .map(|s| {
            vec![
                s.name.into(),
                s.accounts.to_string(),
                s.callers.to_string(),
                format!(
                    "{:?} (measured {:.2} ms)",
                    s.upstream_delay,
                    s.upstream_latency.as_secs_f64() * 1000.0
                ),
                format!("{} (expected {})", s.upstream_calls, s.expected_calls),
                format!("{} (cap {})", s.peak_upstream, s.cap),
                format!(
                    "{:.0} ms (limit {:.0} ms)",
                    s.drain.as_secs_f64() * 1000.0,
                    s.limit().as_secs_f64() * 1000.0
                ),
                us(s.latency.value_at_quantile(0.5)),
                us(s.latency.value_at_quantile(0.99)),
                match &s.first_error {
                    Some(e) => format!("{} (first: {e})", s.errors),
                    None => s.errors.to_string(),
                },
                verdict(s.holds()),
            ]
        })
        .collect();
    format!(
        "## Refresh storms\n\nEvery token expires at once (the shared clock jumps past expiry), then \
         all callers call GetToken concurrently over {} connections. Upstream calls and peak \
         concurrency are counted by the fake EdgeTag; `upstream delay` is added by the fake to every \
         token request, and `measured` is the mean time a token request really spent in the fake (a \
         sleep lasts at least one more tick of the millisecond timer). The drain's limit is accounts × \
         measured latency ÷ cap.\n\n{}",
        16,
        table(
            &[
                "storm",
                "accounts",
                "callers",
                "upstream delay",
                "upstream calls",
                "peak upstream in flight",
                "time to drain",
                "caller p50",
                "caller p99",
                "errors",
                "target",
            ],
            &rows
        )
    )
}

pub fn recovery(rs: &[Recovery]) -> String {
    let rows: Vec<Vec<String>> = rs
        .iter()
        .map(|r| {
            vec![
                match r.wake {
                    Wake::Callers => "expired accounts, EdgeTag back, callers waiting".into(),
                    Wake::Scheduler => {
                        "expired accounts, EdgeTag back, one operator refresh, no callers".into()
                    }
                },
                r.accounts.to_string(),
                format!(
                    "{:?} (measured {:.2} ms)",
                    r.upstream_delay,
                    r.upstream_latency.as_secs_f64() * 1000.0
                ),
                format!(
                    "{} requests, {} of {} callers UNAVAILABLE",
                    r.outage_requests, r.outage_unavailable, r.accounts,
                ),
                format!("{} ({} ok)", r.upstream_calls, r.refreshes_ok),
                format!("{} (cap {})", r.peak_upstream, r.cap),
                format!("{:.0} ms", r.refreshed.as_secs_f64() * 1000.0),
                format!("{:.0} ms", r.served.as_secs_f64() * 1000.0),
                format!(
                    "{:.0} ms ({:.0} ms at the set delay)",
                    r.limit().as_secs_f64() * 1000.0,
                    r.nominal_limit().as_secs_f64() * 1000.0
                ),
                format!(
                    "{:.2}",
                    r.served.as_secs_f64() / r.limit().as_secs_f64().max(1e-9)
                ),
                format!(
                    "{:.2} ms; {:.0} ms; {:.2}",
                    r.client_latency.as_secs_f64() * 1000.0,
                    r.client_limit().as_secs_f64() * 1000.0,
                    r.served.as_secs_f64() / r.client_limit().as_secs_f64().max(1e-9)
                ),
                format!(
                    "server {:.0} µs/refresh; all threads {:.2} cores busy",
                    r.server_cpu.as_secs_f64() * 1e6 / r.accounts.max(1) as f64,
                    r.process_cpu.as_secs_f64() / r.window.as_secs_f64().max(1e-9)
                ),
                match &r.first_error {
                    Some(e) => format!("{} (first: {e})", r.errors),
                    None => r.errors.to_string(),
                },
                verdict(r.holds()),
            ]
        })
        .collect();
    format!(
        "## Recovery after an EdgeTag outage\n\nEvery token expires while EdgeTag answers 503 to every \
         refresh, and each account's caller is told UNAVAILABLE; then EdgeTag is back. The limit is accounts × \
         upstream latency ÷ cap, with the latency the fake really had (mean time per token request); the target is served within 1.2× of it. \
         The service's own view is beside it: the mean latency its EdgeTag client measured for those refreshes \
         (sent to answer, so also both HTTP stacks and loopback), the limit at that latency, and served ÷ that \
         limit, which is what the service adds by leaving upstream slots idle.\n\n{}",
        table(
            &[
                "storm",
                "accounts",
                "upstream delay",
                "outage",
                "upstream calls after",
                "peak upstream in flight",
                "until all refreshed",
                "until all served",
                "limit",
                "served ÷ limit",
                "client-seen latency; limit; served ÷ it",
                "CPU from the return to the end",
                "errors",
                "target",
            ],
            &rows
        )
    )
}

pub fn durable(d: &Durable) -> String {
    let rows: Vec<Vec<String>> = d
        .rows
        .iter()
        .map(|(name, h)| {
            vec![
                (*name).into(),
                h.len().to_string(),
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.99)),
                fmt_us(h.mean() / 1000.0),
            ]
        })
        .collect();
    format!(
        "## Durable writes\n\nSequential operations, one at a time, on the same filesystem. The \
         refresh row is GetToken on an account whose token has expired ({} refreshes seen at the \
         fake for {} calls).\n\n{}",
        d.refreshes_seen,
        d.ops,
        table(&["operation", "ops", "p50", "p99", "mean"], &rows)
    )
}

pub fn soak(s: &Soak) -> String {
    let first = s.samples.first().copied();
    let warm = s.samples.iter().find(|x| x.at >= s.spec.warmup).copied();
    let last = s.samples.last().copied();
    let fmt = |v: Option<Sample>, f: &dyn Fn(&Sample) -> String| v.map_or("-".into(), |x| f(&x));
    let mib = |b: f64| format!("{:.2} MiB", b / 1048576.0);
    type Getter = Box<dyn Fn(&Sample) -> f64>;
    type Shower = Box<dyn Fn(f64) -> String>;
    let measures: Vec<(&str, Getter, Shower)> = vec![
        (
            "resident memory of the service process (VmRSS)",
            Box::new(|x: &Sample| x.rss_kib as f64 * 1024.0),
            Box::new(mib),
        ),
        (
            "open file descriptors of the service process (/proc/PID/fd)",
            Box::new(|x: &Sample| x.fds as f64),
            Box::new(|v| format!("{v:.0}")),
        ),
        (
            "data directory size",
            Box::new(|x: &Sample| x.data_bytes as f64),
            Box::new(mib),
        ),
        (
            "data directory files",
            Box::new(|x: &Sample| x.data_files as f64),
            Box::new(|v| format!("{v:.0}")),
        ),
    ];
    let rows: Vec<Vec<String>> = measures
        .iter()
        .map(|(name, get, show)| {
            vec![
                (*name).into(),
                fmt(first, &|x| show(get(x))),
                fmt(warm, &|x| show(get(x))),
                fmt(last, &|x| show(get(x))),
                format!("{}/h", show(s.slope_per_hour(get))),
                format!("{}/h", show(s.late_slope_per_hour(get))),
            ]
        })
        .collect();
    let secs = s.samples.last().map_or(0.0, |x| x.at.as_secs_f64());
    let samples: Vec<Vec<String>> = s
        .samples
        .iter()
        .map(|x| {
            vec![
                format!("{:.0}", x.at.as_secs_f64()),
                format!("{:.1}", x.rss_kib as f64 / 1024.0),
                x.fds.to_string(),
                format!("{:.2}", x.data_bytes as f64 / 1048576.0),
                x.data_files.to_string(),
                x.refreshes_ok.to_string(),
            ]
        })
        .collect();
    format!(
        "## Soak\n\n{} accounts on {:?} tokens refreshed by the scheduler; {} new accounts connected \
         (BeginAuth, approval, CompleteAuth) and {} removed (RemoveAccount) per second; {} GetToken \
         per second. Sampled every {:?}; slopes are least-squares fits over the samples after a \
         {:?} warm-up. Ran {:.0} s (asked: {:?}). Load average before / after: {} / {}.\n\n{}\n\
         | counts |  |\n|---|---|\n| GetToken calls (errors) | {} ({}) |\n| accounts connected / \
         removed (errors) | {} / {} ({}) |\n| refreshes answered by the fake | {} ({:.0}/s) |\n\
         | token requests not answered with a token | {} |\n| accounts at the end | {} |\n\
         | errors in all | {}{} |\n\n<details><summary>samples</summary>\n\n{}\n</details>\n",
        s.spec.accounts,
        s.spec.token_lifetime,
        s.spec.churn_per_sec,
        s.spec.churn_per_sec,
        s.spec.gets_per_sec,
        s.spec.sample_every,
        s.spec.warmup,
        secs,
        s.spec.duration,
        s.load_before,
        s.load_after,
        table(
            &[
                "measure",
                "at start",
                "after warm-up",
                "at end",
                "slope after warm-up",
                "slope over the second half"
            ],
            &rows
        ),
        s.gets,
        s.get_errors,
        s.connected,
        s.removed,
        s.churn_errors,
        s.refreshes_ok,
        s.refreshes_ok as f64 / secs.max(1.0),
        s.upstream_failures,
        s.accounts_at_end,
        s.errors(),
        s.first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (first: {e})")),
        table(
            &["s", "RSS MiB", "fds", "data MiB", "data files", "refreshes"],
            &samples
        ),
    )
}

pub fn postgres(p: &Postgres) -> String {
    let mut out = String::from("### PostgreSQL (issue 12)\n\n");
    let rows: Vec<Vec<String>> = p
        .throughput
        .iter()
        .map(|(store, c)| {
            vec![
                (*store).to_owned(),
                c.accounts.to_string(),
                format!("{:.0}", c.floor.rps()),
                format!("{:.0}", c.service.rps()),
                format!("{:.2}", c.throughput_ratio()),
                format!("{:.2}", c.p99_ratio()),
                verdict(c.throughput_ratio() >= 0.90),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "GetToken on",
            "accounts",
            "floor req/s",
            "service req/s",
            "throughput ratio",
            "p99 ratio",
            "≥ 0.90× floor",
        ],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = p
        .refresh
        .iter()
        .map(|(store, h)| {
            vec![
                (*store).to_owned(),
                h.len().to_string(),
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.99)),
                us(h.max()),
            ]
        })
        .collect();
    out.push_str(&table(
        &["GetToken that refreshes, on", "calls", "p50", "p99", "max"],
        &rows,
    ));
    out.push('\n');
    let f = &p.fleet;
    let exact = f.upstream_calls == f.accounts as u64 && f.not_refreshed_once == 0;
    let within = f.peak_upstream <= (f.cap_per_replica * f.replicas) as u64;
    out.push_str(&table(
        &[
            "fleet storm",
            "GetToken calls",
            "upstream calls",
            "accounts not refreshed exactly once",
            "distinct tokens per account (max)",
            "peak upstream in flight (cap × replicas)",
            "errors",
            "drained in",
            "exactly one per account",
        ],
        &[vec![
            format!("{} accounts × {} replicas", f.accounts, f.replicas),
            f.calls.to_string(),
            f.upstream_calls.to_string(),
            f.not_refreshed_once.to_string(),
            f.distinct_tokens_per_account_max.to_string(),
            format!(
                "{} ({} × {}) {}",
                f.peak_upstream,
                f.cap_per_replica,
                f.replicas,
                if within { "✅" } else { "❌" }
            ),
            f.errors.to_string(),
            format!("{:.2?}", f.drain),
            verdict(exact && f.errors == 0 && f.distinct_tokens_per_account_max == 1),
        ]],
    ));
    out.push('\n');
    let s = &p.startup;
    out.push_str(&table(
        &["start-up", "seeded in", "SERVING after", "≤ 2 s"],
        &[vec![
            format!("{} accounts in PostgreSQL", s.accounts),
            format!("{:.1?}", s.seeded_in),
            format!("{:.2?}", s.serving_after),
            verdict(s.serving_after <= std::time::Duration::from_secs(2)),
        ]],
    ));
    out
}

pub fn watchers(w: &Watchers) -> String {
    let mut out = String::from("### WatchToken (issue 13)\n\n");
    out.push_str(&table(
        &[
            "idle watchers",
            "RSS before",
            "RSS with them open",
            "per watcher",
            "CPU at rest",
        ],
        &[vec![
            w.idle.to_string(),
            format!("{:.1} MiB", w.rss_before_mb),
            format!("{:.1} MiB", w.rss_after_mb),
            format!("{:.1} KiB", w.kib_per_watcher()),
            format!(
                "{:.1}% of a core over {:?}",
                w.idle_cpu * 100.0,
                w.idle_window
            ),
        ]],
    ));
    out.push('\n');
    out.push_str(&table(
        &[
            "fan-out",
            "RefreshToken round trip",
            "until the last watcher has it",
            "< 50 ms",
        ],
        &[vec![
            format!("1 refresh to {} watchers of one account", w.fan_out),
            fmt_us(w.refresh_call.as_secs_f64() * 1e6),
            fmt_us(w.fan_out_last.as_secs_f64() * 1e6),
            verdict(w.fan_out_last < std::time::Duration::from_millis(50)),
        ]],
    ));
    out
}

pub fn h2load(rows: &[crate::h2load::H2Row]) -> String {
    use crate::h2load::TARGETS;
    let mut out = String::from(
        "### GetToken driven by h2load (4 connections × 32 streams, from another process)\n\n\
         Medians over the rounds; ratios are per round (same round, alternating order), then the median.\n\n\
         | auth | accounts | target | req/s | server CPU µs/req | throughput vs bare floor | CPU vs bare floor | \
         throughput vs floor | CPU vs floor |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        for (i, target) in TARGETS.iter().enumerate() {
            let (rps, cpu) = row.medians(i);
            let (t0, c0) = row.ratios(i, 0);
            let (t1, c1) = row.ratios(i, 1);
            out += &format!(
                "| {} | {} | {target} | {rps:.0} | {cpu:.1} | {t0:.3} | {c0:.3} | {t1:.3} | {c1:.3} |\n",
                row.settings, row.accounts
            );
        }
    }
    for row in rows {
        out += &format!(
            "\nh2load's own CPU ({} accounts, auth {}): {:.1} µs per request.",
            row.accounts, row.settings, row.client_cpu_us
        );
    }
    out.push('\n');
    out
}

pub fn traces(t: &Traced) -> String {
    let mut rows = Vec::new();
    for (name, r, per_round) in [
        (
            "off",
            &t.off,
            t.rounds.iter().map(|r| r.0).collect::<Vec<_>>(),
        ),
        (
            "on, 1% sampled",
            &t.on,
            t.rounds.iter().map(|r| r.1).collect(),
        ),
    ] {
        let spread = per_round
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        rows.push(vec![
            t.accounts.to_string(),
            name.into(),
            format!("{:.0}", r.rps()),
            spread,
            fmt_us(r.p50_us()),
            fmt_us(r.p99_us()),
            format!("{:.1}", r.server_us_per_req()),
            r.errors.to_string(),
        ]);
    }
    format!(
        "## GetToken: traces off versus on\n\n\
         Production settings; two services in this process on the same runtime, one with traces \
         off, one exporting over OTLP (`parentbased_traceidratio`, 0.01: callers send no \
         `traceparent` here, so 1% of calls start a sampled trace) to a collector on another \
         runtime, which received {} spans. Target: on ≥ {:.2}× off. Server CPU is the server \
         runtime's threads only (the exporter's batch thread is not counted).\n\n{}\n\
         throughput on/off: **{:.3}** ({}); p99 on/off: {:.3}; server CPU on/off: {:.2}\n",
        t.exported,
        traces::MIN_RATIO,
        table(
            &[
                "accounts",
                "traces",
                "req/s",
                "req/s per round",
                "p50",
                "p99",
                "server CPU µs/req",
                "errors",
            ],
            &rows
        ),
        t.ratio(),
        verdict(t.ratio() >= traces::MIN_RATIO),
        t.on.p99_us() / t.off.p99_us(),
        t.on.server_us_per_req() / t.off.server_us_per_req(),
    )
}
