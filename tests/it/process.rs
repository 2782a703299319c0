//! The real binary as operators run it: configuration errors, the data-directory lock, graceful
//! shutdown on SIGTERM, and `--dev` mode driven exactly as the README's banner says.

use std::{process::Stdio, time::Duration};

use credential_service::proto::{
    BeginAuthRequest, GetTokenRequest, credential_service_client::CredentialServiceClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, Command},
};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");

fn service(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Reads stderr until a line contains `needle`; returns that line. Fails if the process ends first.
async fn wait_for_line(lines: &mut Lines<BufReader<ChildStderr>>, needle: &str) -> String {
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended before a line with {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the line appears")
}

/// The address from the "serving" log line.
/// Stops `child` the way systemd or Kubernetes does (SIGTERM) and checks that it exits 0.
async fn stop(child: &mut Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the service stops within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

fn serving_addr(line: &str) -> String {
    line.split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The service with every required setting (client id, secret, redirect URI) plus `args`.
fn configured(args: &[&str]) -> Command {
    let mut cmd = service(args);
    cmd.args([
        "--client-id",
        "cid",
        "--redirect-uri",
        "https://ops.example.com/cb",
    ])
    .env("EDGETAG_CLIENT_SECRET", "s3cret");
    cmd
}

/// Starts a server with a fake-free but complete configuration on port 0; returns it, its stderr
/// and its address.
async fn start_real(data_dir: &std::path::Path) -> (Child, Lines<BufReader<ChildStderr>>, String) {
    let mut child = configured(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = wait_for_line(&mut lines, "credential-service serving").await;
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    (child, lines, addr)
}

#[tokio::test]
async fn missing_settings_exit_2_with_one_line_naming_flag_and_variable() {
    let out = service(&[]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--client-id") && err.contains("EDGETAG_CLIENT_ID"),
        "{err}"
    );
}

#[tokio::test]
async fn a_second_process_on_the_same_data_directory_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The data one level down: the encryption key is created beside it, inside the temp dir.
    let data = dir.path().join("data");
    let (mut first, _lines, _addr) = start_real(&data).await;
    let out = configured(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("in use by another credential-service process"),
        "{err}"
    );
    first.kill().await.unwrap();
}

#[tokio::test]
async fn sigterm_finishes_gracefully_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines, addr) = start_real(&dir.path().join("data")).await;
    let mut client = CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .begin_auth(BeginAuthRequest {
            account: "acme".into(),
        })
        .await
        .unwrap();

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    wait_for_line(&mut lines, "stopped").await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn dev_mode_runs_the_whole_flow_as_its_banner_describes() {
    let mut child = service(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--callback-listen",
        "127.0.0.1:0",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for_line(&mut lines, "DEV MODE").await;
    wait_for_line(&mut lines, "curl -sL \"$URL\"").await;
    wait_for_line(&mut lines, "CredentialService/GetToken").await;
    // credctl as a release binary beside the service, not a second (debug) build.
    wait_for_line(&mut lines, "target/release/credctl --server http://").await;
    let serving = wait_for_line(&mut lines, "credential-service serving").await;
    let addr = serving_addr(&serving);
    // Its data, and the encryption key beside them, in a temporary directory of their own.
    let data_dir = std::path::PathBuf::from(
        serving
            .split("data_dir=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
    );
    let temporary = data_dir.parent().unwrap().to_owned();
    assert!(temporary.exists(), "{temporary:?}");
    let callback = serving_addr(&wait_for_line(&mut lines, "browser callback serving").await);

    let mut client = CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let begun = client
        .begin_auth(BeginAuthRequest {
            account: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // The fake approves and redirects to the callback listener, with code and state.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = http.get(&begun.authorize_url).send().await.unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::FOUND);
    let location = answer.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&format!("http://{callback}/oauth/callback?code=")),
        "{location}"
    );

    // What `curl -sL "$URL"` shows: the callback's page, the account connected.
    let page = reqwest::get(&begun.authorize_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Connected account acme"), "{page}");
    let token = client
        .get_token(GetTokenRequest {
            account: "acme".into(),
            min_validity: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!token.access_token.is_empty());
    assert_eq!(token.token_type, "Bearer");
    // Stopped as usual, it leaves nothing behind.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    stop(&mut child).await;
    assert!(!temporary.exists(), "{temporary:?} is left behind");
}

#[tokio::test]
async fn listening_beyond_loopback_without_a_callers_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = configured(&[
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without a callers file")
            && err.contains("--callers-file")
            && err.contains("CREDENTIAL_SERVICE_CALLERS_FILE"),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_callers_file() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    let file = |token: &str| {
        format!(
            "[[caller]]\nname = \"reader\"\ntoken_sha256 = \"{}\"\nrole = \"reader\"\naccounts = [\"*\"]\n",
            hex::encode(Sha256::digest(token))
        )
    };
    std::fs::write(&callers, file("first-token")).unwrap();
    let mut child = configured(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--callers-file",
        callers.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = serving_addr(&wait_for_line(&mut lines, "credential-service serving").await);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let code_with = |token: &'static str| {
        let channel = channel.clone();
        async move {
            let mut request = tonic::Request::new(GetTokenRequest {
                account: "acme".into(),
                min_validity: None,
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            CredentialServiceClient::new(channel)
                .get_token(request)
                .await
                .unwrap_err()
                .code()
        }
    };
    // Known caller, unknown account: NOT_FOUND; unknown token: UNAUTHENTICATED.
    assert_eq!(code_with("first-token").await, tonic::Code::NotFound);
    assert_eq!(
        code_with("second-token").await,
        tonic::Code::Unauthenticated
    );

    std::fs::write(&callers, file("second-token")).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    wait_for_line(&mut lines, "callers file reloaded").await;
    assert_eq!(code_with("second-token").await, tonic::Code::NotFound);
    assert_eq!(code_with("first-token").await, tonic::Code::Unauthenticated);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_account() {
    let mut child = service(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--callback-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = wait_for_line(&mut lines, "credential-service serving").await;
    let line: serde_json::Value = serde_json::from_str(&serving).expect("a JSON object");
    assert_eq!(line["level"], "INFO");
    let addr = line["fields"]["addr"].as_str().unwrap().to_owned();
    assert!(line["timestamp"].is_string());

    let mut client = CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .begin_auth(BeginAuthRequest {
            account: "acme".into(),
        })
        .await
        .unwrap();
    let started = wait_for_line(&mut lines, "authorization started").await;
    let line: serde_json::Value = serde_json::from_str(&started).expect("a JSON object");
    assert_eq!(line["span"]["account"], "acme");
    assert_eq!(line["span"]["name"], "BeginAuth");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    stop(&mut child).await; // so that dev mode removes its temporary directory
}

/// The last line the binary, started on `data`, wrote before it exited with code 1: its one-line
/// reason for not starting.
async fn refusal_on(data: &std::path::Path) -> String {
    let mut cmd = configured(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the service exits at once")
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.trim().lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("credential-service: "), "{err}");
    last
}

/// Stores an account sealed with a key of the test's own (no key file beside the data
/// directory), as an earlier run whose key file was then lost would have; returns the key's id.
async fn store_an_account_sealed_with_a_lost_key(data: &std::path::Path) -> String {
    use credential_service::{
        account::AccountId,
        sealing::Keyring,
        store::{Expected, SledStore, Store},
        tokens::{AccountRecord, TokenSet},
    };
    let keys = Keyring::from_keys(&[7; 32], &[]);
    let store = SledStore::open(data, keys.clone()).unwrap();
    let now = std::time::SystemTime::now();
    let tokens = TokenSet {
        access_token: "at".into(),
        refresh_token: Some("rt".into()),
        token_type: "Bearer".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(3600),
    };
    store
        .put_account(
            &AccountId::parse("acme").unwrap(),
            &AccountRecord::connected(tokens),
            Expected::Absent,
        )
        .await
        .unwrap();
    keys.current_id()
}

/// A new key beside records sealed with another would leave every grant sealed for good (and, on
/// a new account's write, a store needing two keys): the service names the key the records need.
#[tokio::test]
async fn no_new_key_is_created_beside_a_store_that_holds_records() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_id = store_an_account_sealed_with_a_lost_key(&data).await;
    let line = refusal_on(&data).await;
    assert!(
        line.contains(&key_id)
            && line.contains(data.to_str().unwrap())
            && line.contains("data.key")
            && line.contains("--encryption-key-file"),
        "{line}"
    );
    assert!(
        !dir.path().join("data.key").exists(),
        "no key was created beside the records"
    );
}

/// A key file without its data directory means the data went missing (a wrong mount, a failed
/// restore): starting empty there would look healthy and serve nothing.
#[tokio::test]
async fn no_new_data_directory_is_created_beside_an_existing_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    credential_service::sealing::create_key_file(&dir.path().join("data.key")).unwrap();
    let line = refusal_on(&data).await;
    assert!(
        line.contains(data.to_str().unwrap()) && line.contains("does not exist"),
        "{line}"
    );
    assert!(!data.exists(), "no empty store was created");
}

/// A store sled cannot read (here: written by another sled version) stops the service with one
/// line naming the directory and what to do, and is left exactly as it was.
#[tokio::test]
async fn a_store_that_does_not_open_stops_the_service_and_stays_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut first, _lines, _addr) = start_real(&data).await;
    first.kill().await.unwrap();
    let mut conf = b"segment_size: 524288\nuse_compression: false\nversion: 0.99\n".to_vec();
    let crc = crc32fast::hash(&conf);
    conf.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(data.join("conf"), &conf).unwrap();
    let db_before = std::fs::read(data.join("db")).unwrap();

    let line = refusal_on(&data).await;
    assert!(
        line.contains(data.to_str().unwrap())
            && line.contains("does not open")
            && line.contains("restore"),
        "{line}"
    );
    assert_eq!(std::fs::read(data.join("conf")).unwrap(), conf);
    assert_eq!(std::fs::read(data.join("db")).unwrap(), db_before);
}

/// An operator sees where the service will send what: a stand-in's token URL without a revoke URL
/// revokes on the stand-in, never on EdgeTag's preset host (with the stand-in's credentials).
#[tokio::test]
async fn the_serving_line_names_every_edgetag_url_and_revoke_follows_the_token_host() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = configured(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--token-url",
        "https://edgetag.internal:8443/v1/oauth-app/client/token",
    ])
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = wait_for_line(&mut lines, "credential-service serving").await;
    for url in [
        "authorize_url=https://app-sandbox.edgetag.io/oauth/app/login",
        "token_url=https://edgetag.internal:8443/v1/oauth-app/client/token",
        "revoke_url=https://edgetag.internal:8443/v1/oauth-app/client/revoke",
        "user_info_url=https://edgetag.internal:8443/v1/user/me",
    ] {
        assert!(line.contains(url), "{url} missing from: {line}");
    }
    child.kill().await.unwrap();
}
