//! `--audit-file` and `--audit-required` in the real binary: the trail as JSON lines in a file of
//! its own (0600, counts exact across a rotation by rename and SIGHUP), and what happens to calls
//! when that file cannot be written, for a full disk (a file-size limit) and for a directory
//! taken away: refused with UNAVAILABLE until it can (and nothing lost) with `--audit-required`,
//! served with the loss counted without it.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use tokio::process::Command;
use tonic::{Code, transport::Channel};

use crate::binary::{Binary, until};

/// The file-size limit the service runs under in the full-disk tests: far above what its store
/// writes, reached by the audit file only because the test makes it so.
const FILE_SIZE_LIMIT: u64 = 64 << 20;

/// Calls of `method` by `caller` with `outcome` that the audit file at `path` accounts for.
fn audited(path: &Path, method: &str, caller: &str, outcome: &str) -> u64 {
    let text = std::fs::read(path).unwrap_or_default();
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end])
        .expect("the audit file is UTF-8")
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("each line is JSON"))
        .filter(|v| v["method"] == method && v["caller"] == caller && v["outcome"] == outcome)
        .map(|v| v["count"].as_u64().unwrap_or(1))
        .sum()
}

fn token_reads(path: &Path) -> u64 {
    audited(path, "GetToken", "reader", "OK")
}

async fn read_tokens(channel: &Channel, n: u64) {
    for _ in 0..n {
        Binary::get_token(channel, "acme").await.unwrap();
    }
}

async fn start(audit: &Path, extra: &[&str], limit: Option<u64>) -> Binary {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--audit-file",
        audit.to_str().unwrap(),
        "--audit-interval",
        "100ms",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Binary::start_with(dir, &args, |command: &mut Command| {
        if let Some(limit) = limit {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    rustix::process::setrlimit(
                        rustix::process::Resource::Fsize,
                        rustix::process::Rlimit {
                            current: Some(limit),
                            maximum: Some(limit),
                        },
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_trail_is_json_lines_in_its_own_file_and_counts_stay_exact_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let service = start(&path, &[], None).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the audit file is its owner's only");

    service
        .connect_account(service.channel().await, "acme")
        .await;
    let channel = service.channel().await;
    let token = Binary::get_token(&channel, "acme")
        .await
        .unwrap()
        .access_token;
    read_tokens(&channel, 49).await;
    until("50 token reads in the audit file", || async {
        token_reads(&path) == 50
    })
    .await;
    assert_eq!(audited(&path, "CompleteAuth", "admin", "OK"), 1);

    // logrotate: rename, then SIGHUP; the next lines go to a new file at the path.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    service.signal("HUP").await;
    service.log.wait_for(&["audit file reopened"]).await;
    read_tokens(&channel, 30).await;
    let log = service.log.clone();
    assert!(service.stop().await.success());

    assert_eq!(token_reads(&rotated), 50);
    assert_eq!(
        token_reads(&path),
        30,
        "the last flush, at shutdown, wrote the rest"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the reopened file too");
    for file in [&path, &rotated] {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains(&token), "no token in the audit file");
    }
    assert!(
        log.matching(&["GetToken"]).is_empty(),
        "the trail is not in the logs:\n{}",
        log.text()
    );
}

/// How the audit file is made unwritable.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    /// The file reaches the process's file-size limit, as a full disk refuses writes.
    Full,
    /// Its directory is removed.
    Removed,
}

/// Makes the audit file unwritable; returns what [`repair`] needs.
fn break_file(path: &Path, how: Breakage) -> u64 {
    match how {
        Breakage::Full => {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let len = file.metadata().unwrap().len();
            // Zeros up to just below the limit: the service's next line does not fit.
            file.set_len(FILE_SIZE_LIMIT - 16).unwrap();
            len
        }
        Breakage::Removed => {
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
            0
        }
    }
}

fn repair(path: &Path, how: Breakage) {
    match how {
        Breakage::Full => {
            // Cut the zeros; what the service wrote before them stays.
            let text = std::fs::read(path).unwrap();
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(end as u64)
                .unwrap();
        }
        Breakage::Removed => std::fs::create_dir_all(path.parent().unwrap()).unwrap(),
    }
}

fn audit_path(dir: &Path) -> PathBuf {
    dir.join("audit").join("audit.jsonl")
}

async fn required_refuses_until_writable_and_loses_nothing(how: Breakage) {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let service = start(&path, &["--audit-required"], Some(FILE_SIZE_LIMIT)).await;
    service
        .connect_account(service.channel().await, "acme")
        .await;
    let channel = service.channel().await;
    read_tokens(&channel, 20).await;
    until("20 reads written", || async { token_reads(&path) == 20 }).await;

    break_file(&path, how);
    // Reads go on being served until a flush fails; from then on they are refused.
    let mut served = 20;
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match Binary::get_token(&channel, "acme").await {
                Ok(_) => served += 1,
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("calls are refused once the audit file cannot be written");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("audit"), "{}", refused.message());
    assert_eq!(
        service.metric("credential_audit_file_writable").await,
        Some(0.0)
    );
    service
        .log
        .wait_for(&["audit file cannot be written", "refused"])
        .await;

    repair(&path, how);
    until("calls served again", || async {
        Binary::get_token(&channel, "acme").await.is_ok()
    })
    .await;
    served += 1;
    assert_eq!(
        service.metric("credential_audit_file_writable").await,
        Some(1.0)
    );
    assert!(service.stop().await.success());

    let written = token_reads(&path);
    match how {
        // Every read served is in the file: the lines that did not fit were kept and written.
        Breakage::Full => assert_eq!(written, served),
        // The first 20 went with the directory; every read after them is in the new file.
        Breakage::Removed => assert_eq!(written, served - 20),
    }
    assert!(
        audited(&path, "GetToken", "", "UNAVAILABLE") >= 1,
        "the refusals are audited too"
    );
}

#[tokio::test]
async fn with_audit_required_a_full_disk_refuses_calls_until_lines_fit_again_and_none_are_lost() {
    required_refuses_until_writable_and_loses_nothing(Breakage::Full).await;
}

#[tokio::test]
async fn with_audit_required_a_removed_directory_refuses_calls_until_it_is_back() {
    required_refuses_until_writable_and_loses_nothing(Breakage::Removed).await;
}

async fn not_required_serves_and_counts_the_loss(how: Breakage) {
    let dir = tempfile::tempdir().unwrap();
    let path = audit_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let service = start(&path, &[], Some(FILE_SIZE_LIMIT)).await;
    service
        .connect_account(service.channel().await, "acme")
        .await;
    let channel = service.channel().await;
    read_tokens(&channel, 5).await;
    until("5 reads written", || async { token_reads(&path) == 5 }).await;

    break_file(&path, how);
    read_tokens(&channel, 10).await;
    until("lost lines counted", || async {
        service
            .metric("credential_audit_events_lost_total")
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    read_tokens(&channel, 10).await; // still served
    assert_eq!(
        service.metric("credential_audit_file_writable").await,
        Some(0.0)
    );
    service
        .log
        .wait_for(&["audit file cannot be written", "lost"])
        .await;

    repair(&path, how);
    read_tokens(&channel, 7).await;
    until("lines written again", || async {
        service.metric("credential_audit_file_writable").await == Some(1.0)
    })
    .await;
    let warnings = service.log.matching(&["audit events are lost"]).len();
    assert!(service.stop().await.success());
    assert_eq!(warnings, 1, "one warning a minute, not one per flush");
    let written = token_reads(&path);
    assert!(written < 32, "some reads were lost: {written}");
    assert!(
        written >= 7,
        "the reads after the repair are written: {written}"
    );
}

#[tokio::test]
async fn without_audit_required_a_full_disk_loses_lines_and_serves_on() {
    not_required_serves_and_counts_the_loss(Breakage::Full).await;
}

#[tokio::test]
async fn without_audit_required_a_removed_directory_loses_lines_and_serves_on() {
    not_required_serves_and_counts_the_loss(Breakage::Removed).await;
}

#[tokio::test]
async fn an_audit_file_that_cannot_be_opened_stops_the_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("audit.jsonl");
    let output = Command::new(crate::binary::BIN)
        .args(["--dev", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--audit-file")
        .arg(&missing)
        .env_clear()
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--audit-file"), "{stderr}");
}
