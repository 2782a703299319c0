//! A bearer token read from a file (a Kubernetes projected service-account token): each call
//! carries the file's current token, whether the file is swapped the kubelet's way (a `..data`
//! symlink pointed at a new directory) or rewritten in place.

mod common;

use std::{path::Path, time::Duration};

use common::{Legacy, until};
use credential_client::{
    Bearer, Client, ConfigError, GrpcClient,
    proto::{GetTokenRequest, credential_service_client::CredentialServiceClient},
};
use tonic::transport::Channel;

/// Lays out `dir` as the kubelet does: `..data` → a fresh timestamped directory holding `token`,
/// and `token` → `..data/token`; each new version swaps `..data` by an atomic rename.
fn kubelet_write(dir: &Path, version: u32, token: &str) {
    let data = dir.join(format!("..2026_12_08_00_00_0{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("token"), format!("{token}\n")).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("token");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/token", &link).unwrap();
    }
}

async fn get_token(grpc: &mut GrpcClient) {
    grpc.get_token(GetTokenRequest {
        account: "acme".into(),
        min_validity: None,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn each_call_carries_the_token_the_file_holds_now() {
    let legacy = Legacy {
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let dir = tempfile::tempdir().unwrap();
    kubelet_write(dir.path(), 1, "eyJ.first.sig");
    let path = dir.path().join("token");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut grpc =
        CredentialServiceClient::with_interceptor(channel, Bearer::from_file(&path).unwrap());
    get_token(&mut grpc).await;
    get_token(&mut grpc).await;
    kubelet_write(dir.path(), 2, "eyJ.second.sig");
    get_token(&mut grpc).await;
    // Rewritten in place, as an operator's editor or a sidecar might.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "eyJ.third.sig\n").unwrap();
    get_token(&mut grpc).await;
    // Gone for a moment: the last token read is sent rather than none.
    std::fs::remove_file(&path).unwrap();
    get_token(&mut grpc).await;
    assert_eq!(
        *legacy.authorizations.lock().unwrap(),
        [
            "Bearer eyJ.first.sig",
            "Bearer eyJ.first.sig",
            "Bearer eyJ.second.sig",
            "Bearer eyJ.third.sig",
            "Bearer eyJ.third.sig",
        ]
    );
}

#[tokio::test]
async fn the_client_builder_sends_the_file_s_token_and_fails_early_without_one() {
    let legacy = Legacy {
        lifetime: Duration::from_secs(3600),
        ..Legacy::default()
    };
    let addr = legacy.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let missing = Client::builder(format!("http://{addr}"))
        .bearer_token_file(&path)
        .build()
        .unwrap_err();
    assert!(
        matches!(missing, ConfigError::BearerTokenFile(_)),
        "{missing}"
    );
    assert!(missing.to_string().contains("token"), "{missing}");
    std::fs::write(&path, "\n").unwrap();
    let empty = Client::builder(format!("http://{addr}"))
        .bearer_token_file(&path)
        .build()
        .unwrap_err();
    assert!(empty.to_string().contains("no token"), "{empty}");

    std::fs::write(&path, "eyJ.projected.sig\nignored second line\n").unwrap();
    let client = Client::builder(format!("http://{addr}"))
        .bearer_token_file(&path)
        .build()
        .unwrap();
    assert!(!format!("{client:?}").contains("projected"));
    let source = client.token_source("acme");
    source.token().await.unwrap();
    let seen = until(Duration::from_secs(10), "a GetToken call", async || {
        legacy.authorizations.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(seen, "Bearer eyJ.projected.sig");
}
