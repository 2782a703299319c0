//! The `fake-edgetag` binary as a developer runs it: its flags reach the fake, it prints the URLs
//! to configure, it refuses to listen beyond loopback, and Ctrl-C stops it cleanly.

use std::{process::Stdio, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};
use url::Url;

const BIN: &str = env!("CARGO_BIN_EXE_fake-edgetag");
const REDIRECT_URI: &str = "http://127.0.0.1:9/callback";

#[tokio::test]
async fn refuses_to_listen_beyond_loopback() {
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:0"])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only listens on loopback"), "{stderr}");
}

#[tokio::test]
async fn serves_the_printed_urls_with_the_given_settings_until_ctrl_c() {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            "my-client",
            "--redirect-uri",
            REDIRECT_URI,
            "--token-lifetime",
            "90s",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("client secret:");
            printed.push(line);
            if done {
                return;
            }
        }
        panic!("fake-edgetag ended before printing its settings: {printed:?}");
    })
    .await
    .unwrap();
    let value = |label: &str| -> String {
        let line = printed.iter().find(|l| l.starts_with(label)).unwrap();
        line[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(value("client id:"), "my-client");
    assert!(printed.iter().any(|l| l.ends_with("(the default)")));
    let secret = value("client secret:");
    let authorize = Url::parse(&value("authorize URL:")).unwrap();
    let token_url = value("token URL:");

    // The browser leg: the fake redirects to the registered URI with a code.
    let verifier = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let mut url = authorize.clone();
    url.query_pairs_mut()
        .append_pair("client_id", "my-client")
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("response_type", "code")
        .append_pair("scope", "full")
        .append_pair("state", "st")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(url.as_str()).send().await.unwrap();
    assert_eq!(response.status(), 302);
    let location = Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT_URI), "{location}");
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let mut elsewhere = url.clone();
    elsewhere
        .query_pairs_mut()
        .clear()
        .extend_pairs(url.query_pairs().map(|(k, v)| {
            let v = if k == "redirect_uri" {
                "http://127.0.0.1:9/other".into()
            } else {
                v
            };
            (k.into_owned(), v.into_owned())
        }));
    let refused = client.get(elsewhere.as_str()).send().await.unwrap();
    assert_eq!(refused.status(), 400, "only the registered redirect URI");

    // The token leg, with the printed client credentials and the configured lifetime.
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .append_pair("code_verifier", &verifier)
        .finish();
    let response = client
        .post(&token_url)
        .basic_auth("my-client", Some(&secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(answer["expires_in"], 90);

    // Ctrl-C: a clean stop.
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `--help` says what the default secret is (it is public), and a log written to a pipe or a
/// file carries no colour codes.
#[tokio::test]
async fn help_names_the_default_secret_and_piped_logs_are_plain() {
    let help = Command::new(BIN).arg("--help").output().await.unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("[default: fake-client-secret]"), "{help}");

    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("fake EdgeTag serving") {
                return line;
            }
        }
        panic!("fake-edgetag ended before logging that it serves");
    })
    .await
    .unwrap();
    assert!(!serving.contains('\x1b'), "{serving:?}");
    child.kill().await.unwrap();
}
