//! `credctl`, the operators' command line: each subcommand is one gRPC call to a running
//! credential-service, printed for people (default) or as JSON (`--json`), with every gRPC status
//! turned into a sentence, a hint and its own exit code. The binary only parses and calls [`run`].
//!
//! `backup` and `import` live in their own modules ([`backup`](self::backup),
//! [`import`](self::import)).
//!
//! Built on `credential-client`: its generated stubs, its [`Bearer`](credential_client::Bearer)
//! interceptor, its [`endpoint`](credential_client::endpoint) and its gRPC code names. Subcommands
//! with more than a call and a sentence have a module of their own (`reseal`); so do reaching the
//! service (`connect`), the bearer token (`token`) and the browser `begin --open` starts
//! (`browser`).

mod reseal;

mod backup;
mod import;

mod browser;
mod connect;
mod token;

pub use token::parse;

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::{Parser, Subcommand};
use credential_client::{GrpcClient as Client, code_name};
use serde_json::{Value, json};
use tonic::{Code, Status};

use credential_client::proto::{
    AccountEvent, AccountEventKind, AccountInfo, AccountStatus, BeginAuthRequest,
    CompleteAuthRequest, DescribeAccountRequest, GetTokenRequest, ListAccountsRequest,
    RefreshOutcome, RefreshTokenRequest, RemoveAccountRequest, RemoveOutcome, WatchAccountsRequest,
    WatchTokenRequest,
};

/// Exit codes, one per kind of failure, so scripts can tell them apart.
pub mod exit;

use self::{
    browser::{OPENER, open_browser},
    connect::connect,
};
use exit::EXIT_CODES;

/// Talks to a credential-service over gRPC.
#[derive(Parser)]
#[command(name = "credctl", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// The service's gRPC address (`http://` or `https://`).
    #[arg(
        long,
        env = "CREDCTL_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,

    /// Bearer token sent as `authorization: Bearer ...`. Prefer --token-file: a command line is
    /// visible to every local user in `ps` and /proc, and an environment to the processes of
    /// the same user.
    #[arg(
        long,
        env = "CREDCTL_TOKEN",
        hide_env_values = true,
        global = true,
        allow_hyphen_values = true
    )]
    pub token: Option<String>,

    /// File whose first line is the bearer token (mode 0600), instead of --token.
    #[arg(long, env = "CREDCTL_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,

    /// PEM file of the CA that signed the service's certificate (`https://` only; the system's
    /// roots are trusted too).
    #[arg(long, env = "CREDCTL_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,

    /// Print JSON instead of sentences.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// One gRPC call each.
#[derive(Subcommand, Clone)]
pub enum Command {
    /// Start connecting an account: prints EdgeTag's page to open and approve.
    Begin {
        account: String,
        /// Also open the page in the default browser (xdg-open; open on macOS).
        #[arg(long)]
        open: bool,
    },
    /// Finish connecting with the `code` and `state` from EdgeTag's redirect. With `-` alone,
    /// reads them from standard input instead (the whole redirect URL, or `CODE STATE`), which keeps
    /// the code out of `ps` and the shell history.
    Complete {
        /// base64url values may start with `-`: taken as pasted, never as a flag.
        #[arg(allow_hyphen_values = true)]
        code: String,
        #[arg(allow_hyphen_values = true)]
        state: Option<String>,
    },
    /// Print a valid access token (on stdout, alone, for `$(credctl token ACCOUNT)`).
    Token {
        account: String,
        /// The token must stay valid at least this long, e.g. `30m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        min_validity: Option<Duration>,
    },
    /// Follow an account's tokens: one line per token the service pushes (its expiry; the token
    /// itself only with --show-token), until the stream ends or Ctrl-C.
    Watch {
        account: String,
        /// Also print each access token.
        #[arg(long)]
        show_token: bool,
        /// Each token must stay valid at least this long, e.g. `30m`.
        #[arg(long, value_parser = humantime::parse_duration)]
        min_validity: Option<Duration>,
    },
    /// List every connected account with its status.
    List,
    /// Show one account's status.
    Describe { account: String },
    /// Revoke the account's grant at EdgeTag and forget the account.
    Remove {
        account: String,
        /// Remove it here even when EdgeTag cannot be reached to revoke the grant.
        #[arg(long)]
        force: bool,
    },
    /// Refresh the account's access token now.
    Refresh { account: String },
    /// Follow the accounts you may see: one line per account first (its current state), then one
    /// line per transition (connected, refreshed, refresh_failing, recovered, needs_reauth,
    /// removed), until the stream ends or Ctrl-C. With --json, one JSON object per line.
    Events,
    /// After an encryption key rotation (new key files, then SIGHUP): re-seal every stored record
    /// with the service's current key, while it serves. Prints what remains on other keys (key
    /// ids only) and exits 1 while any record does.
    Reseal,
    /// Back up every account while the service runs, to FILE: the records as stored, sealed,
    /// with a SHA-256 at the end. FILE is created 0600 and appears only once complete and
    /// verified. Restore with `credential-service restore --from FILE`.
    Backup { file: PathBuf },
    /// Import grants from FILE (or - for standard input): one JSON object per line,
    /// {"account", "refresh_token", "access_token", "expires_at"}, the last two optional. Each is
    /// checked with EdgeTag at once unless its access token is still valid; one result per line.
    Import {
        file: String,
        /// Overwrite accounts that are already connected.
        #[arg(long)]
        replace: bool,
    },
}

/// Why a command failed; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach credential-service at {server}: {cause}")]
    Unreachable { server: String, cause: String },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    #[error("cannot write the output: {0}")]
    Io(#[from] std::io::Error),
    /// The call succeeded but did not finish the job (records left on other keys).
    #[error("{0}")]
    Incomplete(String),
    #[error("{0}")]
    Failed(String),
    #[error(
        "{imported} of {total} grant(s) imported; the lines above say what became of the others"
    )]
    NotAllImported { imported: usize, total: usize },
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::Unreachable { .. } => exit::UNREACHABLE,
            Self::Io(_) | Self::Incomplete(_) | Self::Failed(_) => exit::OTHER,
            Self::NotAllImported { .. } => exit::NOT_ALL_IMPORTED,
            Self::Status(s) => match s.code() {
                Code::NotFound => exit::NOT_FOUND,
                Code::InvalidArgument | Code::OutOfRange => exit::INVALID_ARGUMENT,
                Code::FailedPrecondition => exit::FAILED_PRECONDITION,
                Code::Unavailable => exit::UNAVAILABLE,
                Code::DeadlineExceeded => exit::DEADLINE_EXCEEDED,
                Code::Unauthenticated => exit::UNAUTHENTICATED,
                Code::PermissionDenied => exit::PERMISSION_DENIED,
                Code::Unimplemented => exit::UNIMPLEMENTED,
                Code::Internal | Code::DataLoss => exit::INTERNAL,
                Code::Aborted => exit::ABORTED,
                _ => exit::OTHER,
            },
        }
    }

    /// What to do about it, for people, after `command` failed so.
    pub fn hint_after(&self, command: &Command) -> Option<&'static str> {
        match (self, command) {
            // CompleteAuth's NOT_FOUND is about the state, not an account.
            (Self::Status(s), Command::Complete { .. }) if s.code() == Code::NotFound => Some(
                "the state is unknown, expired or already used: start again with `credctl begin ACCOUNT`",
            ),
            (Self::Status(s), Command::Reseal) if s.code() == Code::FailedPrecondition => {
                Some("fix the key file named above, then run `credctl reseal` again")
            }
            _ => self.hint(),
        }
    }

    /// What to do about it, for people.
    pub fn hint(&self) -> Option<&'static str> {
        let Self::Status(s) = self else {
            return match self {
                Self::Unreachable { .. } => Some(
                    "check that the service runs and --server / CREDCTL_SERVER points at its gRPC address",
                ),
                Self::Incomplete(_) => Some(
                    "give every replica the key files those records need, send each SIGHUP, then run `credctl reseal` again",
                ),
                _ => None,
            };
        };
        Some(match s.code() {
            Code::NotFound => {
                "check the account name with `credctl list`, or connect it with `credctl begin`"
            }
            Code::InvalidArgument | Code::OutOfRange => "fix the argument named above",
            Code::FailedPrecondition => "connect the account again: `credctl begin ACCOUNT`",
            Code::Unavailable => "EdgeTag or the service is unreachable; retry later",
            Code::DeadlineExceeded => "the call took too long; retry later",
            Code::Unauthenticated => {
                "pass a valid bearer token with --token-file (or --token, CREDCTL_TOKEN)"
            }
            Code::PermissionDenied => {
                "this caller may not do that; ask an administrator for the needed role"
            }
            Code::Unimplemented => "the service is older than this credctl; upgrade it",
            Code::Internal | Code::DataLoss => "the service's log has the cause",
            Code::Aborted => "start the authorization again: `credctl begin ACCOUNT`",
            _ => return None,
        })
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

/// Runs the command, prints its result to stdout and any failure to stderr.
pub async fn run(cli: Cli) -> ExitCode {
    let stdout = std::io::stdout();
    let command = cli.command.clone();
    match execute(cli, &mut stdout.lock()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credctl: {e}");
            if let Some(hint) = e.hint_after(&command) {
                eprintln!("  hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs the command and writes its result to `out`.
pub async fn execute(cli: Cli, out: &mut impl Write) -> Result<(), CliError> {
    // Grants are read (and a grant on the command line refused) before anything is sent.
    let grants = match &cli.command {
        Command::Import { file, .. } => {
            import::refuse_secret_argument(file)?;
            Some(import::read_input(file)?)
        }
        _ => None,
    };
    let bearer = token::bearer(cli.token, cli.token_file.as_deref())?;
    let mut client = connect(&cli.server, bearer, cli.ca_file.as_deref()).await?;
    let json = cli.json;
    match cli.command {
        Command::Begin { account, open } => begin(&mut client, json, out, account, open).await,
        Command::Complete { code, state } => complete(&mut client, json, out, code, state).await,
        Command::Token {
            account,
            min_validity,
        } => token(&mut client, json, out, account, min_validity).await,
        Command::Watch {
            account,
            show_token,
            min_validity,
        } => watch(&mut client, json, out, account, show_token, min_validity).await,
        Command::List => list(&mut client, json, out).await,
        Command::Describe { account } => describe(&mut client, json, out, account).await,
        Command::Remove { account, force } => remove(&mut client, json, out, account, force).await,
        Command::Events => events(&mut client, json, out).await,
        Command::Refresh { account } => refresh(&mut client, json, out, account).await,
        Command::Reseal => reseal::reseal(&mut client, json, out).await,
        Command::Backup { file } => backup::backup(&mut client, json, out, &file).await,
        Command::Import { replace, .. } => {
            let grants = grants.unwrap_or_default();
            import::import(&mut client, json, out, &grants, replace).await
        }
    }
}

/// `credctl begin`: BeginAuth, and the page to open (opened too with `--open`).
async fn begin(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
    open: bool,
) -> Result<(), CliError> {
    let r = client
        .begin_auth(BeginAuthRequest {
            account: account.clone(),
        })
        .await?
        .into_inner();
    let expires = r.expires_at.map(format_time).unwrap_or_default();
    let opened = open && open_browser(&r.authorize_url);
    if json {
        print_json(
            out,
            json!({"authorize_url": r.authorize_url, "state": r.state, "expires_at": expires}),
        )?;
    } else {
        writeln!(
            out,
            "Open this page and approve access for account {account}:\n\n  {}\n",
            r.authorize_url
        )?;
        if opened {
            writeln!(out, "(opened in your browser)\n")?;
        } else if open {
            writeln!(
                out,
                "(could not start a browser with {OPENER}: open the page yourself)\n"
            )?;
        }
        writeln!(
            out,
            "If EdgeTag then shows the service's \"Connected\" page, you are done. Otherwise run\n  \
             credctl complete -\nand paste the address EdgeTag sent the browser to (or run \
             credctl complete CODE STATE; state {}). Valid until {expires}.",
            r.state
        )?;
    }
    Ok(())
}

/// `credctl complete`: CompleteAuth with the code and state, from argv or standard input.
async fn complete(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    code: String,
    state: Option<String>,
) -> Result<(), CliError> {
    let (code, state) = match (code.as_str(), state) {
        ("-", None) => code_and_state_from_stdin()?,
        (_, Some(state)) => (code, state),
        (_, None) => {
            return Err(CliError::Usage(
                "complete needs CODE STATE, or - to read them from standard input".into(),
            ));
        }
    };
    let r = client
        .complete_auth(CompleteAuthRequest { code, state })
        .await?
        .into_inner();
    let expires = r.expires_at.map(format_time).unwrap_or_default();
    if json {
        print_json(out, json!({"account": r.account, "expires_at": expires}))?;
    } else {
        writeln!(
            out,
            "Connected account {}; its access token expires at {expires}.",
            r.account
        )?;
    }
    Ok(())
}

/// `credctl token`: GetToken; the token alone on stdout (for `$(credctl token ACCOUNT)`), the
/// EdgeTag team (the `Team-Id` header's value) on stderr.
async fn token(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
    min_validity: Option<Duration>,
) -> Result<(), CliError> {
    let min_validity = proto_duration(min_validity)?;
    let r = client
        .get_token(GetTokenRequest {
            account,
            min_validity,
        })
        .await?
        .into_inner();
    if json {
        let expires = r.expires_at.map(format_time).unwrap_or_default();
        print_json(
            out,
            json!({"access_token": r.access_token, "token_type": r.token_type, "expires_at": expires, "team_id": r.team_id}),
        )?;
    } else {
        writeln!(out, "{}", r.access_token)?;
        eprintln!("team_id: {}", team_or_unknown(&r.team_id));
    }
    Ok(())
}

/// `credctl watch`: WatchToken, one line per pushed token, flushed as it comes.
async fn watch(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
    show_token: bool,
    min_validity: Option<Duration>,
) -> Result<(), CliError> {
    let min_validity = proto_duration(min_validity)?;
    let mut stream = client
        .watch_token(WatchTokenRequest {
            account,
            min_validity,
        })
        .await?
        .into_inner();
    while let Some(r) = stream.message().await? {
        let expires = r.expires_at.map(format_time).unwrap_or_default();
        match (json, show_token) {
            // JSON lines: one object per push.
            (true, true) => writeln!(
                out,
                "{}",
                json!({"expires_at": expires, "team_id": r.team_id, "token_type": r.token_type, "access_token": r.access_token})
            )?,
            (true, false) => writeln!(
                out,
                "{}",
                json!({"expires_at": expires, "team_id": r.team_id})
            )?,
            (false, true) => writeln!(
                out,
                "expires_at={expires} team_id={} token_type={} access_token={}",
                team_or_dash(&r.team_id),
                r.token_type,
                r.access_token
            )?,
            (false, false) => writeln!(
                out,
                "expires_at={expires} team_id={}",
                team_or_dash(&r.team_id)
            )?,
        }
        out.flush()?; // one line per push, as it comes
    }
    Ok(())
}

/// `credctl list`: every page of ListAccounts, as a table.
async fn list(client: &mut Client, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let mut accounts = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_accounts(ListAccountsRequest {
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        accounts.extend(page.accounts);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if json {
        print_json(out, Value::Array(accounts.iter().map(info_json).collect()))?;
    } else if accounts.is_empty() {
        writeln!(
            out,
            "No accounts are connected. Connect one with `credctl begin ACCOUNT`."
        )?;
    } else {
        print_table(out, &accounts)?;
    }
    Ok(())
}

/// `credctl describe`: DescribeAccount, one labelled line per field.
async fn describe(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
) -> Result<(), CliError> {
    let info = client
        .describe_account(DescribeAccountRequest { account })
        .await?
        .into_inner();
    if json {
        print_json(out, info_json(&info))?;
    } else {
        let j = info_json(&info);
        for (key, label) in [
            ("account", "account"),
            ("status", "status"),
            ("access_token_expires_at", "access token expires"),
            ("last_refresh_at", "last refresh"),
            ("last_refresh_outcome", "last refresh outcome"),
            ("refreshing", "refreshing now"),
            ("team_id", "team"),
        ] {
            let value = match &j[key] {
                Value::String(s) if s.is_empty() => "-".to_owned(),
                Value::String(s) => s.clone(),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            writeln!(out, "{label:<22}{value}")?;
        }
        for team in &info.teams {
            let name = if team.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", team.name)
            };
            writeln!(out, "{:<22}{}{name}", "reaches team", team.id)?;
        }
    }
    Ok(())
}

/// `credctl remove`: RemoveAccount, and what became of the grant at EdgeTag.
async fn remove(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
    force: bool,
) -> Result<(), CliError> {
    let outcome = client
        .remove_account(RemoveAccountRequest {
            account: account.clone(),
            force,
        })
        .await?
        .into_inner()
        .outcome();
    let (name, sentence) = match outcome {
        RemoveOutcome::Revoked => (
            "revoked",
            format!("Removed account {account}; EdgeTag revoked its grant."),
        ),
        RemoveOutcome::RemovedWithoutRevocation => (
            "removed_without_revocation",
            format!(
                "Removed account {account} here, but EdgeTag could not be told: its grant \
                 stays valid at EdgeTag until it expires or is revoked there."
            ),
        ),
        RemoveOutcome::NotFound => (
            "not_found",
            format!("Account {account} was not connected; nothing to remove."),
        ),
        RemoveOutcome::Unspecified => ("unspecified", format!("Removed account {account}.")),
    };
    if json {
        print_json(out, json!({"account": account, "outcome": name}))?;
    } else {
        writeln!(out, "{sentence}")?;
    }
    Ok(())
}

/// `credctl events`: WatchAccounts, one line per event, flushed as it comes.
async fn events(client: &mut Client, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let mut stream = client
        .watch_accounts(WatchAccountsRequest {})
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        if json {
            writeln!(out, "{}", event_json(&event))?;
        } else {
            writeln!(out, "{}", event_line(&event))?;
        }
        out.flush()?; // one line per event, as it comes
    }
    Ok(())
}

/// `credctl refresh`: RefreshToken now.
async fn refresh(
    client: &mut Client,
    json: bool,
    out: &mut impl Write,
    account: String,
) -> Result<(), CliError> {
    let r = client
        .refresh_token(RefreshTokenRequest {
            account: account.clone(),
        })
        .await?
        .into_inner();
    let expires = r.expires_at.map(format_time).unwrap_or_default();
    if json {
        print_json(out, json!({"account": account, "expires_at": expires}))?;
    } else {
        writeln!(
            out,
            "Refreshed account {account}; the new access token expires at {expires}."
        )?;
    }
    Ok(())
}

/// One line from standard input: EdgeTag's whole redirect URL, or `CODE STATE`.
fn code_and_state_from_stdin() -> Result<(String, String), CliError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("cannot read standard input: {e}")))?;
    parse_code_and_state(line.trim()).ok_or_else(|| {
        CliError::Usage("expected the redirect URL or CODE STATE on standard input".into())
    })
}

fn parse_code_and_state(input: &str) -> Option<(String, String)> {
    if let Ok(url) = url::Url::parse(input) {
        let find = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        return Some((find("code")?, find("state")?));
    }
    let mut words = input.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(code), Some(state), None) => Some((code.to_owned(), state.to_owned())),
        _ => None,
    }
}

/// `--min-validity` as the proto's duration.
fn proto_duration(d: Option<Duration>) -> Result<Option<prost_types::Duration>, CliError> {
    d.map(prost_types::Duration::try_from)
        .transpose()
        .map_err(|_| CliError::Usage("--min-validity is too long".into()))
}

fn format_time(t: prost_types::Timestamp) -> String {
    SystemTime::try_from(t)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

fn status_name(status: AccountStatus) -> &'static str {
    match status {
        AccountStatus::Active => "active",
        AccountStatus::NeedsReauth => "needs_reauth",
        AccountStatus::RefreshingFailed => "refreshing_failed",
        AccountStatus::Unspecified => "unspecified",
    }
}

fn outcome_name(outcome: RefreshOutcome) -> Option<&'static str> {
    match outcome {
        RefreshOutcome::Unspecified => None,
        RefreshOutcome::Succeeded => Some("succeeded"),
        RefreshOutcome::Failed => Some("failed"),
    }
}

fn event_kind_name(kind: AccountEventKind) -> &'static str {
    match kind {
        AccountEventKind::Snapshot => "snapshot",
        AccountEventKind::Connected => "connected",
        AccountEventKind::Refreshed => "refreshed",
        AccountEventKind::RefreshFailing => "refresh_failing",
        AccountEventKind::Recovered => "recovered",
        AccountEventKind::NeedsReauth => "needs_reauth",
        AccountEventKind::Removed => "removed",
        AccountEventKind::TeamChanged => "team_changed",
        AccountEventKind::Unspecified => "unspecified",
    }
}

/// One JSON line: the kind, the account, its state (`info`, null once removed) and, while
/// refreshing fails, the code and message GetToken would answer with.
fn event_json(event: &AccountEvent) -> Value {
    let failure = (event.failure_code != 0).then(|| {
        json!({
            "code": code_name(Code::from(event.failure_code)),
            "message": event.failure_message,
        })
    });
    json!({
        "event": event_kind_name(event.kind()),
        "account": event.account,
        "info": event.info.as_ref().map(info_json),
        "failure": failure,
    })
}

/// One line for people: `KIND ACCOUNT status=... expires=...` and the failure, if any.
fn event_line(event: &AccountEvent) -> String {
    let mut line = format!("{} {}", event_kind_name(event.kind()), event.account);
    if let Some(info) = &event.info {
        line.push_str(&format!(" status={}", status_name(info.status())));
        if let Some(at) = info.access_token_expires_at {
            line.push_str(&format!(" expires={}", format_time(at)));
        }
        line.push_str(&format!(" team={}", team_or_dash(&info.team_id)));
    }
    if event.failure_code != 0 {
        line.push_str(&format!(
            " failure={}: {}",
            code_name(Code::from(event.failure_code)),
            event.failure_message
        ));
    }
    line
}

fn info_json(info: &AccountInfo) -> Value {
    json!({
        "account": info.account,
        "status": status_name(info.status()),
        "access_token_expires_at": info.access_token_expires_at.map(format_time),
        "last_refresh_at": info.last_refresh_at.map(format_time),
        "last_refresh_outcome": outcome_name(info.last_refresh_outcome()),
        "refreshing": info.refreshing,
        "team_id": info.team_id,
        "teams": info.teams.iter().map(|t| json!({"id": t.id, "name": t.name})).collect::<Vec<_>>(),
    })
}

/// The team id, or `-` while the service does not know it.
fn team_or_dash(team_id: &str) -> &str {
    if team_id.is_empty() { "-" } else { team_id }
}

/// The team id, or what an empty one means.
fn team_or_unknown(team_id: &str) -> &str {
    if team_id.is_empty() {
        "(not known yet)"
    } else {
        team_id
    }
}

fn print_json(out: &mut impl Write, value: Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&value).unwrap_or_default()
    )
}

fn print_table(out: &mut impl Write, accounts: &[AccountInfo]) -> std::io::Result<()> {
    let width = accounts
        .iter()
        .map(|a| a.account.len())
        .max()
        .unwrap_or(0)
        .max("ACCOUNT".len());
    let team_width = accounts
        .iter()
        .map(|a| a.team_id.len())
        .max()
        .unwrap_or(0)
        .max("TEAM".len());
    writeln!(
        out,
        "{:<width$}  {:<17}  {:<20}  {:<team_width$}  LAST REFRESH",
        "ACCOUNT", "STATUS", "TOKEN EXPIRES", "TEAM"
    )?;
    for a in accounts {
        let last = match (a.last_refresh_at, outcome_name(a.last_refresh_outcome())) {
            (Some(at), Some(outcome)) => format!("{} {outcome}", format_time(at)),
            _ => "-".to_owned(),
        };
        let refreshing = if a.refreshing { " (refreshing)" } else { "" };
        writeln!(
            out,
            "{:<width$}  {:<17}  {:<20}  {:<team_width$}  {last}{refreshing}",
            a.account,
            status_name(a.status()),
            a.access_token_expires_at
                .map(format_time)
                .unwrap_or_default(),
            team_or_dash(&a.team_id),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_own_exit_code() {
        let codes = [
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Internal,
            Code::Aborted,
        ];
        let mut seen: Vec<u8> = codes
            .iter()
            .map(|c| CliError::Status(Status::new(*c, "x")).exit_code())
            .collect();
        seen.push(CliError::Usage(String::new()).exit_code());
        seen.push(
            CliError::Unreachable {
                server: String::new(),
                cause: String::new(),
            }
            .exit_code(),
        );
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n, "exit codes collide");
        assert!(!seen.contains(&0) && !seen.contains(&exit::OTHER));
        for c in codes {
            assert!(
                CliError::Status(Status::new(c, "x")).hint().is_some(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn complete_not_found_is_about_the_state_not_an_account() {
        let e = CliError::Status(Status::not_found("unknown state"));
        let complete = Command::Complete {
            code: "c".into(),
            state: Some("s".into()),
        };
        let hint = e.hint_after(&complete).unwrap();
        assert!(
            hint.contains("credctl begin") && !hint.contains("credctl list"),
            "{hint}"
        );
        let token = Command::Token {
            account: "acme".into(),
            min_validity: None,
        };
        assert!(e.hint_after(&token).unwrap().contains("credctl list"));
    }

    /// Codes and states are base64url: one in 64 starts with `-`, and must still be taken as
    /// pasted, wherever the global flags go.
    #[test]
    fn a_code_or_state_starting_with_a_dash_is_a_value() {
        for args in [
            &["credctl", "complete", "-xCode", "-yState"][..],
            &["credctl", "--json", "complete", "-xCode", "-yState"],
            &["credctl", "complete", "-xCode", "-yState", "--json"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            let Command::Complete { code, state } = cli.command else {
                panic!("{args:?} is not `complete`");
            };
            assert_eq!(
                (code.as_str(), state.as_deref()),
                ("-xCode", Some("-yState"))
            );
            assert_eq!(cli.json, args.contains(&"--json"), "{args:?}");
        }
        let Command::Complete { code, state } = Cli::try_parse_from(["credctl", "complete", "-"])
            .unwrap()
            .command
        else {
            panic!("not `complete`");
        };
        assert_eq!((code.as_str(), state), ("-", None));
    }

    #[test]
    fn code_and_state_come_from_a_redirect_url_or_two_words() {
        let both = Some(("c-1".to_owned(), "s-1".to_owned()));
        assert_eq!(
            parse_code_and_state("https://ops.example.com/cb?code=c-1&state=s-1"),
            both
        );
        assert_eq!(parse_code_and_state("c-1 s-1"), both);
        assert_eq!(
            parse_code_and_state("https://ops.example.com/cb?code=c-1"),
            None
        );
        assert_eq!(parse_code_and_state("just-one"), None);
    }
}
