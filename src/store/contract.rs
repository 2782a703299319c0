//! The contract every [`Store`] backend must pass: the same tests, run against each backend, are what
//! make "the store" one concept. A backend's test module calls [`contract_tests!`] with something
//! that opens it.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};

use super::{Claim, ClaimMode, Expected, Resealed, Store, StoreError};
use crate::{
    account::AccountId,
    clock::from_unix_ms,
    sealing::Keyring,
    tokens::{
        AccountRecord, AccountStatus, LastRefresh, PendingAuth, RefreshOutcome, Team, Teams,
        TokenSet,
    },
};

/// Opens one backend's storage, again and again (the same data each time), with the keys given.
/// The caller drops the previous handle before opening again.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    async fn open(&self, keys: Keyring) -> Arc<dyn Store>;
}

/// One test per contract clause, for the backend `$make` builds (a fresh, empty one per test).
macro_rules! contract_tests {
    ($make:expr) => {
        mod contract {
            use super::*;
            use $crate::store::contract as c;

            #[tokio::test]
            async fn accounts_survive_reopening() {
                c::accounts_survive_reopening(&$make).await
            }
            #[tokio::test]
            async fn versions_fence_every_write() {
                c::versions_fence_every_write(&$make).await
            }
            #[tokio::test]
            async fn a_state_is_taken_once_however_many_ask() {
                c::a_state_is_taken_once_however_many_ask(&$make).await
            }
            #[tokio::test]
            async fn expired_states_are_purged() {
                c::expired_states_are_purged(&$make).await
            }
            #[tokio::test]
            async fn refresh_claims_are_fenced_on_the_version_seen() {
                c::refresh_claims_are_fenced_on_the_version_seen(&$make).await
            }
            #[tokio::test]
            async fn many_concurrent_writes_all_land() {
                c::many_concurrent_writes_all_land(&$make).await
            }
            #[tokio::test]
            async fn reseal_moves_every_record_to_the_current_key() {
                c::reseal_moves_every_record_to_the_current_key(&$make).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reseal_while_accounts_are_written_loses_no_write() {
                c::reseal_while_accounts_are_written_loses_no_write(&$make).await
            }
            #[tokio::test]
            async fn a_record_sealed_with_a_key_not_held_is_named_not_fatal() {
                c::a_record_sealed_with_a_key_not_held_is_named_not_fatal(&$make).await
            }
            #[tokio::test]
            async fn an_export_restores_as_stored_with_its_versions() {
                c::an_export_restores_as_stored_with_its_versions(&$make).await
            }
        }
    };
}
pub(crate) use contract_tests;

fn id(name: &str) -> AccountId {
    AccountId::parse(name).unwrap()
}

/// A record whose every field differs from the defaults, so a lost field shows.
pub(crate) fn record(access: &str, refresh: Option<&str>) -> AccountRecord {
    AccountRecord {
        tokens: Arc::new(TokenSet {
            access_token: access.into(),
            refresh_token: refresh.map(SecretString::from),
            token_type: "Bearer".into(),
            issued_at: from_unix_ms(1_000),
            expires_at: from_unix_ms(7_201_000),
        }),
        status: AccountStatus::NeedsReauth,
        last_refresh: Some(LastRefresh {
            at: from_unix_ms(5_000),
            outcome: RefreshOutcome::Failed,
        }),
        teams: Some(Arc::new(Teams {
            team_id: "team-2".into(),
            teams: vec![
                Team {
                    id: "team-1".into(),
                    name: "Acme EU".into(),
                },
                Team {
                    id: "team-2".into(),
                    name: String::new(),
                },
            ],
            learned_at: from_unix_ms(6_000),
        })),
    }
}

fn pending(account: &str, expires_in: Duration) -> PendingAuth {
    PendingAuth {
        account: id(account),
        verifier: "verifier".into(),
        expires_at: std::time::SystemTime::now() + expires_in,
    }
}

fn access(store_record: &AccountRecord) -> &str {
    store_record.tokens.access_token.expose_secret()
}

pub(crate) async fn accounts_survive_reopening(b: &dyn Backend) {
    let keys = Keyring::ephemeral();
    {
        let store = b.open(keys.clone()).await;
        store
            .put_account(&id("acme"), &record("at-1", Some("rt-1")), Expected::Absent)
            .await
            .unwrap();
        store
            .put_account(&id("bare"), &record("at-2", None), Expected::Absent)
            .await
            .unwrap();
    }
    let store = b.open(keys).await;
    let mut loaded = store.load_accounts().await.unwrap();
    loaded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(loaded.len(), 2);
    let (name, stored) = &loaded[0];
    assert_eq!(name, &id("acme"));
    assert_eq!(stored.version, 1);
    let rec = &stored.record;
    assert_eq!(access(rec), "at-1");
    assert_eq!(
        rec.tokens.refresh_token.as_ref().unwrap().expose_secret(),
        "rt-1"
    );
    assert_eq!(rec.tokens.issued_at, from_unix_ms(1_000));
    assert_eq!(rec.tokens.expires_at, from_unix_ms(7_201_000));
    assert_eq!(rec.status, AccountStatus::NeedsReauth);
    assert_eq!(rec.last_refresh, record("", None).last_refresh);
    assert_eq!(rec.teams, record("", None).teams);
    assert!(loaded[1].1.record.tokens.refresh_token.is_none());
    let one = store.load_account(&id("acme")).await.unwrap().unwrap();
    assert_eq!((one.version, access(&one.record)), (1, "at-1"));
    assert!(store.load_account(&id("nobody")).await.unwrap().is_none());
}

pub(crate) async fn versions_fence_every_write(b: &dyn Backend) {
    let store = b.open(Keyring::ephemeral()).await;
    let acme = id("acme");
    fn conflict<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::Conflict(a)) if a == id("acme"))
    }

    let v1 = store
        .put_account(&acme, &record("at-1", Some("rt")), Expected::Absent)
        .await
        .unwrap();
    assert_eq!(v1, 1);
    assert!(
        conflict(
            store
                .put_account(&acme, &record("at-x", None), Expected::Absent)
                .await
        ),
        "a second create loses"
    );
    let v2 = store
        .put_account(&acme, &record("at-2", Some("rt")), Expected::Version(v1))
        .await
        .unwrap();
    assert_eq!(v2, 2);
    assert!(
        conflict(
            store
                .put_account(&acme, &record("at-stale", None), Expected::Version(v1))
                .await
        ),
        "a writer who read version 1 lost the race"
    );
    assert!(conflict(store.delete_account(&acme, v1).await));
    let stored = store.load_account(&acme).await.unwrap().unwrap();
    assert_eq!((stored.version, access(&stored.record)), (2, "at-2"));

    store.delete_account(&acme, v2).await.unwrap();
    assert!(store.load_account(&acme).await.unwrap().is_none());
    store
        .delete_account(&acme, v2)
        .await
        .expect("deleting a missing account is a no-op");
    assert_eq!(
        store
            .put_account(&acme, &record("at-3", None), Expected::Absent)
            .await
            .unwrap(),
        1,
        "a new account starts again"
    );
}

pub(crate) async fn a_state_is_taken_once_however_many_ask(b: &dyn Backend) {
    let store = b.open(Keyring::ephemeral()).await;
    store
        .put_pending("s-live", &pending("acme", Duration::from_secs(600)))
        .await
        .unwrap();
    let takers: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take_pending("s-live").await.unwrap() })
        })
        .collect();
    let mut won = Vec::new();
    for t in takers {
        if let Some(p) = t.await.unwrap() {
            won.push(p);
        }
    }
    assert_eq!(won.len(), 1, "exactly one taker wins");
    assert_eq!(won[0].account, id("acme"));
    assert_eq!(won[0].verifier.expose_secret(), "verifier");
    assert!(store.take_pending("s-live").await.unwrap().is_none());
    assert!(store.take_pending("never-issued").await.unwrap().is_none());
}

pub(crate) async fn expired_states_are_purged(b: &dyn Backend) {
    let store = b.open(Keyring::ephemeral()).await;
    store
        .put_pending("s-live", &pending("acme", Duration::from_secs(600)))
        .await
        .unwrap();
    store
        .put_pending("s-old", &pending("acme", Duration::from_secs(1)))
        .await
        .unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    assert_eq!(store.purge_expired_pending(later).await.unwrap(), 1);
    assert_eq!(store.purge_expired_pending(later).await.unwrap(), 0);
    assert!(store.take_pending("s-old").await.unwrap().is_none());
    assert!(store.take_pending("s-live").await.unwrap().is_some());
}

pub(crate) async fn refresh_claims_are_fenced_on_the_version_seen(b: &dyn Backend) {
    let store = b.open(Keyring::ephemeral()).await;
    let acme = id("acme");
    assert!(matches!(
        store
            .claim_refresh(&acme, 1, ClaimMode::Wait)
            .await
            .unwrap(),
        Claim::Gone
    ));
    let v1 = store
        .put_account(&acme, &record("at-1", Some("rt")), Expected::Absent)
        .await
        .unwrap();
    let Claim::Granted(claim) = store
        .claim_refresh(&acme, v1, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("the current version is claimable");
    };
    assert_eq!(claim.version(), v1);
    let v2 = claim.commit(&record("at-2", Some("rt"))).await.unwrap();
    assert_eq!(v2, v1 + 1);

    // Someone judged version 1 stale after version 2 was written: take version 2, no refresh.
    match store
        .claim_refresh(&acme, v1, ClaimMode::Wait)
        .await
        .unwrap()
    {
        Claim::Superseded(newer) => {
            assert_eq!((newer.version, access(&newer.record)), (v2, "at-2"));
        }
        other => panic!("expected Superseded, got {other:?}"),
    }
    // A claim dropped without a commit writes nothing and leaves the account claimable.
    let Claim::Granted(dropped) = store
        .claim_refresh(&acme, v2, ClaimMode::Wait)
        .await
        .unwrap()
    else {
        panic!("claimable");
    };
    drop(dropped);
    assert!(matches!(
        store
            .claim_refresh(&acme, v2, ClaimMode::Wait)
            .await
            .unwrap(),
        Claim::Granted(_)
    ));
    let stored = store.load_account(&acme).await.unwrap().unwrap();
    assert_eq!((stored.version, access(&stored.record)), (v2, "at-2"));
}

pub(crate) async fn many_concurrent_writes_all_land(b: &dyn Backend) {
    let store = b.open(Keyring::ephemeral()).await;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let account = id(&format!("a{i}"));
                store
                    .put_account(&account, &record("at", Some("rt")), Expected::Absent)
                    .await?;
                store
                    .put_pending(&format!("s{i}"), &pending("a", Duration::from_secs(60)))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.load_accounts().await.unwrap().len(), 300);
}

pub(crate) async fn reseal_moves_every_record_to_the_current_key(b: &dyn Backend) {
    let (a, k) = (rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>());
    let acme = id("acme");
    {
        let store = b.open(Keyring::from_keys(&a, &[])).await;
        store
            .put_account(&acme, &record("at", Some("rt")), Expected::Absent)
            .await
            .unwrap();
        store
            .put_pending("s", &pending("acme", Duration::from_secs(600)))
            .await
            .unwrap();
    }
    let key_id = Keyring::from_keys(&k, &[]).current_id();
    {
        let store = b.open(Keyring::from_keys(&k, &[a])).await;
        let done = store.reseal_all().await.unwrap();
        assert_eq!(
            done,
            Resealed {
                key_id: key_id.clone(),
                resealed: 2,
                current: 0,
                remaining: Default::default(),
            }
        );
        let again = store.reseal_all().await.unwrap();
        assert_eq!((again.resealed, again.current), (0, 2));
        assert!(again.remaining.is_empty());
    }
    let store = b.open(Keyring::from_keys(&k, &[])).await;
    let loaded = store.load_accounts().await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].1.version, 1, "resealing is not a new version");
    assert!(store.take_pending("s").await.unwrap().is_some());
}

/// The fence: writers keep writing every account (each write naming the version it replaces)
/// while the key rotates again and again, each time followed by a reseal of every record, so
/// re-seals keep racing the writes. No writer meets a conflict a reseal caused, no write is
/// undone by a reseal's stale copy, and afterwards every record opens with the last key alone.
pub(crate) async fn reseal_while_accounts_are_written_loses_no_write(b: &dyn Backend) {
    const ACCOUNTS: usize = 40;
    const WRITES: usize = 15;
    let (a, mut k) = (rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>());
    let mut held = vec![a];
    let names: Vec<AccountId> = (0..ACCOUNTS).map(|i| id(&format!("a{i:02}"))).collect();
    {
        let store = b.open(Keyring::from_keys(&a, &[])).await;
        for name in &names {
            store
                .put_account(name, &record("at-0", Some("rt")), Expected::Absent)
                .await
                .unwrap();
        }
    }
    {
        let store = b.open(Keyring::from_keys(&k, &[a])).await;
        // Pass p starts once every writer may make writes up to 3p: the writes span passes.
        let (passes, started) = tokio::sync::watch::channel(0usize);
        let writers: Vec<_> = names
            .iter()
            .map(|name| {
                let (store, name, mut started) = (store.clone(), name.clone(), started.clone());
                tokio::spawn(async move {
                    let mut version = 1;
                    for n in 1..=WRITES {
                        started.wait_for(|p| *p >= n / 3).await.unwrap();
                        let written = format!("at-{n}");
                        version = store
                            .put_account(
                                &name,
                                &record(&written, Some("rt")),
                                Expected::Version(version),
                            )
                            .await
                            .unwrap_or_else(|e| panic!("write {n} of {name}: {e}"));
                    }
                    version
                })
            })
            .collect();
        drop(started);
        while !writers.iter().all(|w| w.is_finished()) {
            if *passes.borrow() > 0 {
                held.push(k);
                k = rand::random();
                store.keyring().set(Keyring::from_keys(&k, &held));
            }
            passes.send_modify(|p| *p += 1);
            let done = store.reseal_all().await.unwrap();
            assert!(done.remaining.is_empty(), "{:?}", done.remaining);
        }
        for w in writers {
            assert_eq!(w.await.unwrap(), 1 + WRITES as u64);
        }
        // (A write sealed just before the last key change may have landed after the last pass.)
        let done = store.reseal_all().await.unwrap();
        assert_eq!(done.resealed + done.current, ACCOUNTS);
        assert!(done.remaining.is_empty(), "{:?}", done.remaining);
    }
    let store = b.open(Keyring::from_keys(&k, &[])).await;
    let loaded = store.load_accounts().await.unwrap();
    assert_eq!(loaded.len(), ACCOUNTS);
    for (name, stored) in loaded {
        assert_eq!(stored.version, 1 + WRITES as u64, "{name}");
        assert_eq!(access(&stored.record), format!("at-{WRITES}"), "{name}");
    }
}

/// A record sealed with a key this process does not hold (another replica already seals with a
/// newer one) fails to open with an error that names the key, and does not stop a reseal: it
/// is left as it is and counted under its key id, never with key bytes.
pub(crate) async fn a_record_sealed_with_a_key_not_held_is_named_not_fatal(b: &dyn Backend) {
    let (a, c) = (rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>());
    let c_id = Keyring::from_keys(&c, &[]).current_id();
    {
        let store = b.open(Keyring::from_keys(&c, &[])).await;
        store
            .put_account(&id("newer"), &record("at-c", Some("rt")), Expected::Absent)
            .await
            .unwrap();
    }
    let store = b.open(Keyring::from_keys(&a, &[])).await;
    store
        .put_account(&id("older"), &record("at-a", Some("rt")), Expected::Absent)
        .await
        .unwrap();
    let e = store.load_account(&id("newer")).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::KeyNotHeld { key_id, .. } if *key_id == c_id),
        "{e}"
    );
    assert!(e.to_string().contains("account newer"), "{e}");
    let mut scanned = store.scan_accounts().await.unwrap();
    scanned.sort_by(|x, y| x.0.cmp(&y.0));
    assert!(matches!(scanned[0].1, Err(StoreError::KeyNotHeld { .. })));
    assert_eq!(access(&scanned[1].1.as_ref().unwrap().record), "at-a");
    assert!(
        store.load_accounts().await.is_err(),
        "start-up stays strict"
    );
    let done = store.reseal_all().await.unwrap();
    assert_eq!((done.resealed, done.current), (0, 1));
    assert_eq!(done.remaining, [(c_id, 1)].into());
}

pub(crate) async fn an_export_restores_as_stored_with_its_versions(b: &dyn Backend) {
    let keys = Keyring::ephemeral();
    let (acme, globex) = (id("acme"), id("globex"));
    let store = b.open(keys.clone()).await;
    let active = AccountRecord {
        status: AccountStatus::Active,
        ..record("at-acme", Some("rt-acme"))
    };
    let mut v = store
        .put_account(&acme, &active, Expected::Absent)
        .await
        .unwrap();
    for _ in 0..2 {
        v = store
            .put_account(&acme, &active, Expected::Version(v))
            .await
            .unwrap();
    }
    store
        .put_account(&globex, &record("at-globex", None), Expected::Absent)
        .await
        .unwrap();
    store
        .put_pending("s", &pending("acme", Duration::from_secs(600)))
        .await
        .unwrap();

    let exported = store.export_accounts().await.unwrap();
    let summary: Vec<_> = exported
        .iter()
        .map(|r| (r.account.as_str(), r.version, r.needs_reauth))
        .collect();
    assert_eq!(summary, [("acme", 3, false), ("globex", 1, true)]);
    assert_eq!(exported[0].key_id(), Some(keys.current_id()));
    let text = String::from_utf8_lossy(&exported[0].sealed);
    assert!(!text.contains("at-acme") && !text.contains("rt-acme"));

    // Never mixed into accounts already there, and refused before anything is written.
    let refused = store.restore_accounts(&exported[..1], false).await;
    assert!(
        matches!(refused, Err(StoreError::NotEmpty { accounts: 2 })),
        "{refused:?}"
    );
    assert_eq!(store.export_accounts().await.unwrap(), exported);

    // A newer acme and no globex, then the backup again: versions as they were in it.
    store
        .put_account(&acme, &active, Expected::Version(3))
        .await
        .unwrap();
    store.delete_account(&globex, 1).await.unwrap();
    assert_eq!(store.restore_accounts(&exported, true).await.unwrap(), 2);
    drop(store);
    let store = b.open(keys).await;
    assert_eq!(store.export_accounts().await.unwrap(), exported);
    let loaded = store.load_account(&acme).await.unwrap().unwrap();
    assert_eq!((loaded.version, access(&loaded.record)), (3, "at-acme"));
    assert_eq!(
        loaded.record.teams, active.teams,
        "the team survives a restore"
    );
    assert!(
        store.take_pending("s").await.unwrap().is_some(),
        "pending states stay"
    );

    // Writers fence on the restored versions.
    let stale = store
        .put_account(&acme, &active, Expected::Version(2))
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
    assert_eq!(
        store
            .put_account(&acme, &active, Expected::Version(3))
            .await
            .unwrap(),
        4
    );

    // Replacing with nothing empties the accounts; an empty store takes a backup without --replace.
    assert_eq!(store.restore_accounts(&[], true).await.unwrap(), 0);
    assert!(store.export_accounts().await.unwrap().is_empty());
    assert_eq!(store.restore_accounts(&exported, false).await.unwrap(), 2);
    assert_eq!(store.export_accounts().await.unwrap(), exported);
}
