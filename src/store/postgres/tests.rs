//! The PostgreSQL store against a real server: the store contract, TLS, migrations, the fleet's
//! claims and back-offs, and coherence between replicas. Each test binary starts a private
//! cluster (`pg-cluster`).

use async_trait::async_trait;
use secrecy::ExposeSecret;

use super::{migrate::MIGRATIONS, *};
use crate::{
    sealing::Keyring,
    store::contract::{Backend, contract_tests, record},
};

struct Pg(PostgresConfig);

#[async_trait]
impl Backend for Pg {
    async fn open(&self, keys: Keyring) -> Arc<dyn Store> {
        Arc::new(PostgresStore::open(&self.0, keys).await.unwrap())
    }
}

/// A fresh database on this test binary's private cluster.
fn fresh() -> Pg {
    let cluster = pg_cluster::Cluster::shared();
    let db = cluster.create_database();
    Pg(PostgresConfig::parse(
        &format!("{}?sslmode=disable", db.url()),
        Some(cluster.password().into()),
        None,
    )
    .unwrap())
}

contract_tests!(fresh());

fn acme() -> AccountId {
    AccountId::parse("acme").unwrap()
}

/// Two replicas: the same database, the same key, two stores.
async fn replicas(n: usize) -> Vec<Arc<dyn Store>> {
    let db = fresh();
    let keys = Keyring::ephemeral();
    let opened = futures::future::join_all((0..n).map(|_| db.open(keys.clone()))).await;
    assert_eq!(opened.len(), n);
    opened
}

/// A CA and a server certificate for 127.0.0.1 signed by it (PEM), plus the CA.
fn pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    (leaf.pem(), key.serialize_pem(), ca_pem)
}

#[tokio::test]
async fn tls_to_postgresql_verifies_the_server_against_the_ca_file() {
    let (cert, key, ca) = pki();
    let cluster = pg_cluster::Cluster::start_with_tls(&cert, &key);
    let db = cluster.create_database();
    let config = |mode: &str, ca: Option<&str>| {
        PostgresConfig::parse(
            &format!("{}?sslmode={mode}", db.url()),
            Some(cluster.password().into()),
            ca.map(|c| c.as_bytes().to_vec()),
        )
        .unwrap()
    };
    let encrypted = async |store: &PostgresStore| -> bool {
        let client = store.db.client().await.unwrap();
        client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    };

    // verify-full with the right CA: the session is encrypted and the store works.
    let store = PostgresStore::open(&config("verify-full", Some(&ca)), Keyring::ephemeral())
        .await
        .unwrap();
    assert!(encrypted(&store).await);
    store
        .put_account(&acme(), &record("at", Some("rt")), Expected::Absent)
        .await
        .unwrap();
    assert!(store.load_account(&acme()).await.unwrap().is_some());
    // require without a CA: encrypted, not authenticated (as libpq does it).
    let store = PostgresStore::open(&config("require", None), Keyring::ephemeral())
        .await
        .unwrap();
    assert!(encrypted(&store).await);

    // A server whose certificate another CA signed is refused, and the message says why.
    let (_, _, other_ca) = pki();
    let refused = PostgresStore::open(
        &config("verify-full", Some(&other_ca)),
        Keyring::ephemeral(),
    )
    .await
    .unwrap_err();
    assert!(refused.is_unavailable(), "{refused:?}");
    assert!(refused.to_string().contains("certificate"), "{refused}");
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = fresh();
    let keys = Keyring::ephemeral();
    // Eight at once: without the advisory lock, CREATE TABLE races and some fail.
    let stores =
        futures::future::join_all((0..8).map(|_| PostgresStore::open(&db.0, keys.clone()))).await;
    for store in &stores {
        assert!(store.is_ok(), "{store:?}");
    }
    let client = stores[0].as_ref().unwrap().db.client().await.unwrap();
    let version: i64 = client
        .query_one("SELECT version FROM credential_service_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
    client
        .execute(
            "UPDATE credential_service_schema SET version = version + 1",
            &[],
        )
        .await
        .unwrap();
    drop(client);
    match PostgresStore::open(&db.0, keys).await {
        Err(StoreError::SchemaTooNew { found, known }) => assert_eq!(found, known + 1),
        other => panic!("a newer schema must be refused: {other:?}"),
    }
}

/// A database that schema 1 wrote, with an account backing off, migrates to the current
/// schema at the next start and keeps the account, its version and its back-off.
#[tokio::test]
async fn a_schema_1_database_with_data_migrates_and_keeps_it() {
    let db = fresh();
    let keys = Keyring::ephemeral();
    let store = PostgresStore::open(&db.0, keys.clone()).await.unwrap();
    let v1 = store
        .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
        .await
        .unwrap();
    // Back to what schema 1 had (dropping `outage` drops its index), the account backing off.
    let client = store.db.client().await.unwrap();
    client
        .batch_execute(
            "ALTER TABLE accounts DROP COLUMN outage, DROP COLUMN hold_until;
             UPDATE credential_service_schema SET version = 1;
             UPDATE accounts SET failures = 2, retry_at = now() + interval '600 seconds';",
        )
        .await
        .unwrap();
    drop((client, store));
    let retry_at = SystemTime::now() + Duration::from_secs(600);

    let store = PostgresStore::open(&db.0, keys).await.unwrap();
    let stored = store.load_account(&acme()).await.unwrap().expect("kept");
    assert_eq!(stored.version, v1);
    assert_eq!(stored.record.tokens.access_token.expose_secret(), "at-1");
    let now = SystemTime::now();
    match store
        .claim_refresh(&acme(), v1, ClaimMode::Skip { now })
        .await
        .unwrap()
    {
        Claim::BackingOff(b) => {
            assert_eq!(b.failures, 2);
            assert!(b.retry_at > now && b.retry_at <= retry_at + Duration::from_secs(5));
            assert!(
                !b.outage,
                "schema 1 did not say why: not ended by EdgeTag's return"
            );
            assert_eq!(b.hold_until, None);
        }
        other => panic!("the back-off is kept: {other:?}"),
    }
    assert_eq!(store.end_outage_backoffs().await.unwrap(), 0);
}

#[tokio::test]
async fn a_claim_waits_for_another_replicas_refresh_and_takes_its_result() {
    let r = replicas(2).await;
    let v1 = r[0]
        .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
        .await
        .unwrap();
    let Claim::Granted(first) = r[0]
        .claim_refresh(&acme(), v1, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("claimable");
    };
    // The scheduler elsewhere does not queue behind it.
    let now = SystemTime::now();
    assert!(matches!(
        r[1].claim_refresh(&acme(), v1, ClaimMode::Skip { now })
            .await
            .unwrap(),
        Claim::Busy
    ));
    // A caller elsewhere waits for it, then takes the new record instead of refreshing.
    let waiting = {
        let other = r[1].clone();
        tokio::spawn(async move { other.claim_refresh(&acme(), v1, ClaimMode::Wait).await })
    };
    let v2 = first.commit(&record("at-2", Some("rt-2"))).await.unwrap();
    match waiting.await.unwrap().unwrap() {
        Claim::Superseded(newer) => {
            assert_eq!(newer.version, v2);
            assert_eq!(newer.record.tokens.access_token.expose_secret(), "at-2");
        }
        other => panic!("expected Superseded, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_refresh_backs_the_whole_fleet_off_but_not_callers() {
    let r = replicas(2).await;
    let v1 = r[0]
        .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
        .await
        .unwrap();
    let Claim::Granted(claim) = r[0]
        .claim_refresh(&acme(), v1, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("claimable");
    };
    let now = SystemTime::now();
    let retry_at = now + Duration::from_secs(60);
    claim
        .fail(Backoff {
            failures: 3,
            retry_at,
            outage: false,
            hold_until: None,
        })
        .await
        .unwrap();
    match r[1]
        .claim_refresh(&acme(), v1, ClaimMode::Skip { now })
        .await
        .unwrap()
    {
        Claim::BackingOff(b) => {
            assert_eq!(b.failures, 3);
            let off = b
                .retry_at
                .duration_since(retry_at)
                .unwrap_or_else(|e| e.duration());
            assert!(off < Duration::from_millis(1), "{off:?}"); // microsecond precision
        }
        other => panic!("expected BackingOff, got {other:?}"),
    }
    // Past the back-off, or for a caller who needs the token, it is claimable again.
    let later = retry_at + Duration::from_secs(1);
    assert!(matches!(
        r[1].claim_refresh(&acme(), v1, ClaimMode::Skip { now: later })
            .await
            .unwrap(),
        Claim::Granted(_)
    ));
    let Claim::Granted(claim) = r[1]
        .claim_refresh(&acme(), v1, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("a caller may probe through the back-off");
    };
    // A success clears the fleet's back-off.
    let v2 = claim.commit(&record("at-2", Some("rt-2"))).await.unwrap();
    assert!(matches!(
        r[0].claim_refresh(&acme(), v2, ClaimMode::Skip { now })
            .await
            .unwrap(),
        Claim::Granted(_)
    ));
}

/// EdgeTag's return ends the fleet's outage back-offs in the store and tells every replica;
/// a `Retry-After` still holds, and back-offs for other causes stay.
#[tokio::test]
async fn edgetags_return_ends_outage_back_offs_fleet_wide() {
    let r = replicas(2).await;
    let mut heard = r[1].changes();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases = [
        ("down", true, None),
        ("held", true, Some(now + hour / 2)),
        ("malformed", false, None),
    ];
    let mut versions = Vec::new();
    for (name, outage, hold_until) in cases {
        let account = AccountId::parse(name).unwrap();
        let v = r[0]
            .put_account(&account, &record("at", Some("rt")), Expected::Absent)
            .await
            .unwrap();
        assert!(matches!(
            next(&mut heard).await,
            Some(Change::Account { .. })
        ));
        let Claim::Granted(claim) = r[0]
            .claim_refresh(&account, v, ClaimMode::Wait)
            .await
            .unwrap()
        else {
            panic!("claimable");
        };
        let backoff = Backoff {
            failures: 4,
            retry_at: now + hour,
            outage,
            hold_until,
        };
        claim.fail(backoff).await.unwrap();
        versions.push((account, v));
    }
    let claim = |i: usize| {
        let (account, v) = versions[i].clone();
        let store = r[1].clone();
        async move {
            store
                .claim_refresh(&account, v, ClaimMode::Skip { now })
                .await
                .unwrap()
        }
    };
    match claim(1).await {
        Claim::BackingOff(b) => {
            assert!(b.outage);
            assert!(same_time(b.retry_at, now + hour));
            let held = b.hold_until.expect("the Retry-After is shared");
            assert!(same_time(held, now + hour / 2));
        }
        other => panic!("expected BackingOff, got {other:?}"),
    }

    assert_eq!(r[0].end_outage_backoffs().await.unwrap(), 2);
    assert_eq!(next(&mut heard).await, Some(Change::Recovered));
    assert!(
        matches!(claim(0).await, Claim::Granted(_)),
        "refreshes at once"
    );
    match claim(1).await {
        Claim::BackingOff(b) => {
            assert!(!b.outage);
            assert!(same_time(b.retry_at, now + hour / 2));
        }
        other => panic!("Retry-After still holds: expected BackingOff, got {other:?}"),
    }
    assert!(
        matches!(claim(2).await, Claim::BackingOff(b) if !b.outage),
        "its own answers were unusable: still backs off"
    );
    // Nothing left to end: no second notification comes before the next write's.
    assert_eq!(r[1].end_outage_backoffs().await.unwrap(), 0);
    put_acme_and_hear(&*r[0], &mut heard).await;
}

/// Connects acme through `store` and waits until `heard` announces it; returns its version.
async fn put_acme_and_hear(store: &dyn Store, heard: &mut BoxStream<'static, Change>) -> Version {
    let v = store
        .put_account(&acme(), &record("at-1", Some("rt-1")), Expected::Absent)
        .await
        .unwrap();
    assert_eq!(
        next(heard).await,
        Some(Change::Account {
            account: acme(),
            version: Some(v)
        })
    );
    v
}

/// Equal at PostgreSQL's microsecond precision.
fn same_time(a: SystemTime, b: SystemTime) -> bool {
    let apart = a.duration_since(b).unwrap_or_else(|e| e.duration());
    apart < Duration::from_micros(1)
}

async fn next(heard: &mut BoxStream<'static, Change>) -> Option<Change> {
    tokio::time::timeout(Duration::from_secs(10), heard.next())
        .await
        .expect("a notification arrives")
}

#[tokio::test]
async fn every_replica_hears_of_every_write_with_its_version() {
    let r = replicas(2).await;
    let mut heard = r[1].changes();
    let v1 = put_acme_and_hear(&*r[0], &mut heard).await;
    let Claim::Granted(claim) = r[0]
        .claim_refresh(&acme(), v1, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("claimable");
    };
    let v2 = claim.commit(&record("at-2", Some("rt-2"))).await.unwrap();
    assert_eq!(
        next(&mut heard).await,
        Some(Change::Account {
            account: acme(),
            version: Some(v2)
        })
    );
    r[0].delete_account(&acme(), v2).await.unwrap();
    assert_eq!(
        next(&mut heard).await,
        Some(Change::Account {
            account: acme(),
            version: None
        })
    );
}
