//! Backup under load (issue 26): on the scale section's binary and its 100,000 accounts, one
//! Backup RPC's stream written to a file (what `credctl backup` does) timed alone, then GetToken
//! driven while backups run back to back for the whole measured window, against the scale
//! section's throughput without them.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use credential_service::proto::{
    BackupRequest, credential_service_client::CredentialServiceClient,
};
use tokio::io::AsyncWriteExt;

use crate::{
    Env, fixture,
    load::{self, LoadResult, ServerCpu},
};

pub struct BackupRun {
    pub accounts: usize,
    pub bytes: u64,
    /// One backup with no other load.
    pub alone: Duration,
    /// Backups completed during the loaded window, and their mean time.
    pub during: usize,
    pub during_mean: Duration,
    pub load: LoadResult,
}

/// One Backup stream, written to `file` and fsynced; returns the bytes written.
async fn backup_once(addr: SocketAddr, file: &std::path::Path) -> u64 {
    let mut client = CredentialServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = client.backup(BackupRequest {}).await.unwrap().into_inner();
    let mut out = tokio::fs::File::create(file).await.unwrap();
    let mut bytes = 0;
    while let Some(piece) = stream.message().await.unwrap() {
        bytes += piece.data.len() as u64;
        out.write_all(&piece.data).await.unwrap();
    }
    out.sync_all().await.unwrap();
    bytes
}

pub async fn run(env: &Env, addr: SocketAddr, pid: u32, accounts: Arc<[String]>) -> BackupRun {
    let dir = fixture::temp_dir(env.data_root.as_deref(), "cs-bench-backup-");
    let file = dir.path().join("bench.backup");
    let started = Instant::now();
    let bytes = backup_once(addr, &file).await;
    let alone = started.elapsed();

    let stop = Arc::new(AtomicBool::new(false));
    let backups = {
        let (stop, file) = (stop.clone(), file.clone());
        tokio::spawn(async move {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                backup_once(addr, &file).await;
                times.push(started.elapsed());
            }
            times
        })
    };
    let clients = load::connect(addr, env.load.channels).await;
    let load = load::drive(
        &clients,
        accounts.clone(),
        None,
        &env.load,
        ServerCpu::Process(pid),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let times = backups.await.unwrap();
    let during_mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    BackupRun {
        accounts: accounts.len(),
        bytes,
        alone,
        during: times.len(),
        during_mean,
        load,
    }
}
