//! Durable writes: what CompleteAuth and a refresh cost, next to the floor of any durable write on
//! the same disk (a bare sled insert and flush) and the service's store doing the same write.

use std::time::{Duration, Instant};

use credential_service::{
    account::AccountId,
    broker::BrokerConfig,
    clock::Clock,
    proto::{BeginAuthRequest, CompleteAuthRequest, GetTokenRequest},
    store::{Expected, Store},
};
use hdrhistogram::Histogram;

use crate::{
    Env,
    fixture::{self, RunningServer, TOKEN_LIFETIME},
    load,
};

pub struct Durable {
    pub ops: usize,
    /// (operation, latencies in ns)
    pub rows: Vec<(&'static str, Histogram<u64>)>,
    /// Refreshes the fake saw during the refresh measurement (should equal `ops`).
    pub refreshes_seen: u64,
}

fn record_ns(h: &mut Histogram<u64>, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record(ns.max(1));
}

pub async fn run(env: &Env, ops: usize) -> Durable {
    let root = env.data_root.as_deref();
    let mut rows = Vec::new();

    // The floor of a durable write: one insert of a record-sized value, one flush.
    let dir = fixture::temp_dir(root, "cs-bench-sled-");
    let bare = tokio::task::spawn_blocking(move || {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("accounts").unwrap();
        let mut h = load::histogram();
        for i in 0..ops {
            let value = fixture::random_token("x").repeat(3); // ~ an encoded record
            let t = Instant::now();
            tree.insert(format!("acct-{i:06}"), value.as_bytes())
                .unwrap();
            db.flush().unwrap();
            record_ns(&mut h, t);
        }
        h
    })
    .await
    .unwrap();
    rows.push(("bare sled insert + flush", bare));

    // The service's store: the same write through the group-committing flusher thread.
    let dir = fixture::temp_dir(root, "cs-bench-store-");
    let store = fixture::open_store(dir.path());
    let now = Clock::system().now();
    let mut h = load::histogram();
    for i in 0..ops {
        let id = AccountId::parse(&format!("acct-{i:06}")).unwrap();
        let record = fixture::record(
            now,
            fixture::random_token("eta_"),
            fixture::random_token("etr_"),
        );
        let t = Instant::now();
        store
            .put_account(&id, &record, Expected::Absent)
            .await
            .unwrap();
        record_ns(&mut h, t);
    }
    drop(store);
    rows.push(("SledStore::put_account (insert + group flush)", h));

    // CompleteAuth and refresh through gRPC, against the fake on loopback.
    let clock = Clock::manual();
    let fake = fixture::start_fake(env.runtimes.fake.handle(), &clock).await;
    let dir = fixture::temp_dir(root, "cs-bench-durable-");
    let config = fixture::service_config(
        dir.path(),
        fixture::fake_upstream(&fake),
        BrokerConfig::default(),
        None,
    );
    let server = RunningServer::service(env.runtimes.server.handle(), config, clock.clone()).await;
    let mut client = load::connect(server.addr, 1).await.remove(0);
    let mut complete = load::histogram();
    for i in 0..ops {
        let begun = client
            .begin_auth(BeginAuthRequest {
                account: format!("acct-{i:06}"),
            })
            .await
            .expect("BeginAuth")
            .into_inner();
        let redirect = fake.approve(&begun.authorize_url).await.expect("approval");
        let t = Instant::now();
        client
            .complete_auth(CompleteAuthRequest {
                code: redirect.code,
                state: redirect.state,
            })
            .await
            .expect("CompleteAuth");
        record_ns(&mut complete, t);
    }
    rows.push((
        "CompleteAuth (gRPC: code exchange + durable write)",
        complete,
    ));

    clock.advance(TOKEN_LIFETIME + Duration::from_secs(60));
    let before = fake.stats().refreshes_ok;
    let mut refresh = load::histogram();
    for i in 0..ops {
        let t = Instant::now();
        client
            .get_token(GetTokenRequest {
                account: format!("acct-{i:06}"),
                min_validity: None,
            })
            .await
            .expect("GetToken with a refresh");
        record_ns(&mut refresh, t);
    }
    let refreshes_seen = fake.stats().refreshes_ok - before;
    rows.push((
        "GetToken that refreshes (gRPC: refresh + durable write)",
        refresh,
    ));
    drop(client);
    server.stop().await;
    Durable {
        ops,
        rows,
        refreshes_seen,
    }
}
