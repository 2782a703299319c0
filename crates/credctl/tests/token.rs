//! credctl's bearer token (issue 31, finding 4): read from a file, so that it stays out of `ps`;
//! never in the environment of the browser `begin --open` starts; taken as a value, and never
//! echoed by the argument parser, when it starts with `-`.

#[path = "../../../tests/common/mod.rs"]
#[allow(dead_code, unused_macros, unused_imports)] // these cases use a part of the harness
mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, process::Output};

use common::{Options, TestApp};
use tokio::process::Command;

const CREDCTL: &str = env!("CARGO_BIN_EXE_credctl");

/// A server whose callers file knows one admin, `token`.
async fn server_with_admin(dir: &Path, token: &str) -> TestApp {
    let callers = common::callers_file(dir, &[("ops", token, "admin", "*")]);
    TestApp::spawn_with(Options {
        callers,
        token: Some(token.into()),
        ..Options::default()
    })
    .await
}

/// credctl against `app` with `args`, in an environment of `env` alone.
async fn credctl(app: &TestApp, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(CREDCTL)
        .env_clear()
        .env("CREDCTL_SERVER", format!("http://{}", app.addr))
        .envs(env.iter().copied())
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn the_token_is_read_from_a_file_and_never_shown() {
    const TOKEN: &str = "ops-file-token-7f3a";
    let dir = tempfile::tempdir().unwrap();
    let app = server_with_admin(dir.path(), TOKEN).await;
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = file.to_str().unwrap();

    let listed = credctl(&app, &[], &["--token-file", path, "list"]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    assert!(stderr(&listed).is_empty(), "{}", stderr(&listed));
    let listed = credctl(&app, &[("CREDCTL_TOKEN_FILE", path)], &["list"]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    // Without it: refused, as before.
    let refused = credctl(&app, &[], &["list"]).await;
    assert_eq!(refused.status.code(), Some(9), "{}", stderr(&refused));

    // A file others may read still works, with a warning that names its mode, not its content.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = credctl(&app, &[], &["--token-file", path, "list"]).await;
    assert_eq!(open.status.code(), Some(0), "{}", stderr(&open));
    assert!(stderr(&open).contains("0644"), "{}", stderr(&open));

    // Two ways at once, or a file that is not there: usage errors that never quote the token.
    for (env, args) in [
        (
            &[("CREDCTL_TOKEN", TOKEN)][..],
            &["--token-file", path, "list"][..],
        ),
        (&[], &["--token-file", "/nonexistent/token", "list"]),
    ] {
        let out = credctl(&app, env, args).await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(!stderr(&out).contains(TOKEN), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn begin_open_keeps_the_token_out_of_the_browsers_environment() {
    const TOKEN: &str = "ops-env-token-91c2";
    let dir = tempfile::tempdir().unwrap();
    let app = server_with_admin(dir.path(), TOKEN).await;
    let bin = tempfile::tempdir().unwrap();
    let seen = bin.path().join("environment");
    let opener = bin.path().join("xdg-open");
    std::fs::write(
        &opener,
        format!("#!/bin/sh\n/usr/bin/env > '{}'\n", seen.display()),
    )
    .unwrap();
    std::fs::set_permissions(&opener, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let path = bin.path().to_str().unwrap();
    for env in [
        &[("PATH", path), ("CREDCTL_TOKEN", TOKEN)][..],
        &[
            ("PATH", path),
            ("CREDCTL_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    ] {
        let _ = std::fs::remove_file(&seen);
        let opened = credctl(&app, env, &["begin", "acme", "--open"]).await;
        assert_eq!(opened.status.code(), Some(0), "{}", stderr(&opened));
        let environment = std::fs::read_to_string(&seen).expect("the opener ran");
        assert!(environment.contains("PATH="), "{environment}");
        assert!(!environment.contains("CREDCTL_TOKEN"), "{environment}");
        assert!(!environment.contains(TOKEN), "{environment}");
    }
}

#[tokio::test]
async fn a_token_starting_with_a_dash_is_a_value_and_never_echoed() {
    const TOKEN: &str = "-dash-token-SECRET-4e";
    let dir = tempfile::tempdir().unwrap();
    let app = server_with_admin(dir.path(), TOKEN).await;
    for args in [
        &["--token", TOKEN, "list"][..],
        &["list", "--token", TOKEN],
        &["--json", "--token", TOKEN, "list"],
    ] {
        let out = credctl(&app, &[], args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("SECRET"), "{}", stderr(&out));
    }
    // Parse errors around it say what is wrong, without it.
    for args in [
        &["--token", TOKEN, "--frobnicate", "list"][..],
        &["--token", TOKEN],
        &["--token", TOKEN, "list", "extra"],
    ] {
        let out = credctl(&app, &[], args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let text = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
        assert!(!text.contains("SECRET"), "{args:?}: {text}");
        assert!(text.contains("error"), "{args:?}: {text}");
    }
}
