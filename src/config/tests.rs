use clap::Parser;
use secrecy::ExposeSecret;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn settings(args: &[&str]) -> Settings {
    let mut argv = vec!["credential-service"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap().settings
}

const REQUIRED: [&str; 4] = [
    "--client-id",
    "cid",
    "--redirect-uri",
    "https://ops.example.com/cb",
];

#[test]
fn postgres_needs_a_shared_key_and_keeps_the_password_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("store-password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();
    let key = dir.path().join("key");
    let url = "postgres://svc@db.internal:5432/creds?sslmode=disable";
    let with = |extra: &[&str]| {
        let mut args = REQUIRED.to_vec();
        args.extend_from_slice(&["--store", url]);
        args.extend_from_slice(extra);
        settings(&args).resolve(Some("secret".into()))
    };

    let e = with(&[]).unwrap_err().to_string();
    assert!(e.contains("needs --encryption-key-file"), "{e}");
    assert_eq!(e.lines().count(), 1);

    let key_arg = key.to_str().unwrap();
    let password_arg = password.to_str().unwrap();
    let config = with(&[
        "--encryption-key-file",
        key_arg,
        "--store-password-file",
        password_arg,
    ])
    .unwrap();
    let StoreConfig::Postgres(pg) = &config.store else {
        panic!("a postgres:// store is PostgreSQL");
    };
    assert_eq!(pg.url(), url);
    assert!(!format!("{config:?}").contains("s3cret-pw"), "{config:?}");

    // sled stays the default, and PostgreSQL's settings mean nothing to it.
    let config = settings(&REQUIRED).resolve(Some("secret".into())).unwrap();
    assert!(matches!(config.store, StoreConfig::Sled));
    let mut args = REQUIRED.to_vec();
    args.extend_from_slice(&["--store-password-file", password_arg]);
    let e = settings(&args).resolve(Some("secret".into())).unwrap_err();
    assert!(e.to_string().contains("sled store has no server"), "{e}");
}

#[test]
fn a_token_url_without_a_revoke_url_revokes_on_its_own_host() {
    let mut args = REQUIRED.to_vec();
    args.extend([
        "--token-url",
        "https://edgetag.internal:8443/v1/oauth-app/client/token",
    ]);
    let c = settings(&args).resolve(Some("s".into())).unwrap();
    assert_eq!(
        c.provider.revoke_url.as_str(),
        "https://edgetag.internal:8443/v1/oauth-app/client/revoke"
    );
    assert_eq!(
        c.provider.user_info_url.as_str(),
        "https://edgetag.internal:8443/v1/user/me",
        "the access token goes to the token URL's host too"
    );
    args.extend(["--revoke-url", "https://other.internal/revoke"]);
    let c = settings(&args).resolve(Some("s".into())).unwrap();
    assert_eq!(
        c.provider.revoke_url.as_str(),
        "https://other.internal/revoke"
    );
}

#[test]
fn sandbox_is_the_default_and_production_switches_every_host() {
    let c = settings(&REQUIRED).resolve(Some("s3cret".into())).unwrap();
    assert_eq!(
        c.provider.authorize_url.as_str(),
        "https://app-sandbox.edgetag.io/oauth/app/login"
    );
    assert_eq!(
        c.provider.token_url.as_str(),
        "https://api-sandbox.edgetag.io/v1/oauth-app/client/token"
    );
    assert_eq!(c.provider.client_secret.current().expose_secret(), "s3cret");
    assert_eq!(c.broker.state_ttl, Duration::from_secs(600));
    assert_eq!(c.broker.refresh_margin, Duration::from_secs(300));
    assert_eq!(c.listen.to_string(), "127.0.0.1:50051");

    let mut args = REQUIRED.to_vec();
    args.extend(["--environment", "production", "--state-ttl", "90s"]);
    let c = settings(&args).resolve(Some("s".into())).unwrap();
    assert_eq!(
        c.provider.authorize_url.as_str(),
        "https://app.edgetag.io/oauth/app/login"
    );
    assert_eq!(
        c.provider.token_url.as_str(),
        "https://api.edgetag.io/v1/oauth-app/client/token"
    );
    assert_eq!(
        c.provider.revoke_url.as_str(),
        "https://api.edgetag.io/v1/oauth-app/client/revoke"
    );
    assert_eq!(
        c.provider.user_info_url.as_str(),
        "https://api.edgetag.io/v1/user/me"
    );
    assert_eq!(c.broker.state_ttl, Duration::from_secs(90));
}

#[test]
fn the_flags_defaults_are_the_builders() {
    let resolved = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
    let (ui, api) = Environment::Sandbox.hosts();
    let url = |base: &str, path: &str| Url::parse(&format!("{base}{path}")).unwrap();
    let built = ServiceConfig::new(
        Upstream {
            authorize_url: url(ui, "/oauth/app/login"),
            token_url: url(api, "/v1/oauth-app/client/token"),
            revoke_url: url(api, "/v1/oauth-app/client/revoke"),
            client_id: "cid".into(),
            client_secret: "s".into(),
            redirect_uri: url("https://ops.example.com", "/cb"),
        },
        "./data".into(),
    );
    assert_eq!(format!("{resolved:?}"), format!("{built:?}"));
    // What the provider's Debug leaves out.
    let (r, b) = (&resolved.provider, &built.provider);
    assert_eq!(
        r.client_secret.current().expose_secret(),
        b.client_secret.current().expose_secret()
    );
    assert_eq!(r.default_token_lifetime, b.default_token_lifetime);
    assert_eq!(r.send_redirect_uri, b.send_redirect_uri);
}

#[test]
fn missing_settings_name_flag_and_variable() {
    let e = settings(&[])
        .resolve(Some("s".into()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--client-id") && e.contains("EDGETAG_CLIENT_ID"),
        "{e}"
    );
    let e = settings(&REQUIRED).resolve(None).unwrap_err().to_string();
    assert!(
        e.contains("--client-secret-file") && e.contains("EDGETAG_CLIENT_SECRET_FILE"),
        "{e}"
    );
    let e = settings(&["--client-id", "c"])
        .resolve(Some("s".into()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--redirect-uri") && e.contains("EDGETAG_REDIRECT_URI"),
        "{e}"
    );
}

#[test]
fn secret_file_is_read_and_trimmed_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "file-secret\n").unwrap();
    let mut args = REQUIRED.to_vec();
    let p = path.to_str().unwrap();
    args.extend(["--client-secret-file", p]);
    let c = settings(&args).resolve(Some("env-secret".into())).unwrap();
    assert_eq!(
        c.provider.client_secret.current().expose_secret(),
        "file-secret"
    );
    assert!(!format!("{c:?}").contains("file-secret"));
}

#[test]
fn listening_beyond_loopback_needs_a_callers_file() {
    let mut args = REQUIRED.to_vec();
    args.extend(["--listen", "0.0.0.0:50051"]);
    let e = settings(&args)
        .resolve(Some("s".into()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("0.0.0.0:50051") && e.contains("--callers-file"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    std::fs::write(&path, "").unwrap();
    args.extend(["--callers-file", path.to_str().unwrap()]);
    let c = settings(&args).resolve(Some("s".into())).unwrap();
    assert!(!c.callers.is_open());
    let c = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
    assert!(c.callers.is_open());
}

#[test]
fn limits_default_to_the_documented_values_and_none_may_be_zero() {
    let c = settings(&REQUIRED).resolve(Some("s".into())).unwrap();
    assert_eq!(c.limits, Limits::DEFAULT);
    let mut args = REQUIRED.to_vec();
    args.extend(["--max-health-watches", "3", "--handshake-timeout", "2s"]);
    let c = settings(&args).resolve(Some("s".into())).unwrap();
    assert_eq!(c.limits.max_health_watches, 3);
    assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
    for (flag, value, variable) in [
        (
            "--max-connections",
            "0",
            "CREDENTIAL_SERVICE_MAX_CONNECTIONS",
        ),
        (
            "--max-calls-in-flight",
            "0",
            "CREDENTIAL_SERVICE_MAX_CALLS_IN_FLIGHT",
        ),
        (
            "--max-open-calls-in-flight",
            "0",
            "CREDENTIAL_SERVICE_MAX_OPEN_CALLS_IN_FLIGHT",
        ),
        (
            "--handshake-timeout",
            "0s",
            "CREDENTIAL_SERVICE_HANDSHAKE_TIMEOUT",
        ),
    ] {
        let mut args = REQUIRED.to_vec();
        args.extend([flag, value]);
        let e = settings(&args)
            .resolve(Some("s".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(flag) && e.contains(variable), "{e}");
    }
}

#[test]
fn credentials_never_go_over_plain_http_except_to_loopback() {
    let mut args = REQUIRED.to_vec();
    args.extend(["--token-url", "http://api.example.com/token"]);
    let e = settings(&args)
        .resolve(Some("s".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--token-url") && e.contains("https"), "{e}");
    let mut args = REQUIRED.to_vec();
    args.extend(["--token-url", "http://127.0.0.1:9/token"]);
    assert!(settings(&args).resolve(Some("s".into())).is_ok());
}

#[test]
fn urls_are_printed_without_credentials() {
    let url = Url::parse("https://user:hunter2@api.example.com/token").unwrap();
    assert_eq!(printable(&url), "https://api.example.com/token");
    let mut args = REQUIRED.to_vec();
    args.extend(["--token-url", "http://user:hunter2@api.example.com/token"]);
    let e = settings(&args)
        .resolve(Some("s".into()))
        .unwrap_err()
        .to_string();
    assert!(!e.contains("hunter2"), "{e}");
}
