//! Envelope encryption against a real SoftHSM token and a real sled store.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use keyvault::Error;
use keyvault::barrier::{Barrier, BarrierError, KeyTier, Record};
use keyvault::keys::{self, KeyNames, SharedKeyring};
use keyvault::rotation::Rotation;
use keyvault::secrets::{SecretPath, Secrets, data_prefix, parse_data_key, record_context};
use keyvault::store::{SledStore, Store, scan_all};
use keyvault::transit::Transit;
use keyvault_hsm::KeyStore;
use keyvault_hsm::softhsm::testing;

/// The domain parts these tests drive directly (no requests, no authorization).
struct Domain {
    barrier: Barrier,
    secrets: Secrets,
    transit: Transit,
    rotation: Rotation,
}

/// The parts of an initialized installation, as a process opening it would have them.
async fn domain(store: &Arc<dyn Store>, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Domain {
    keyvault::usage::ensure_counted(store.as_ref(), keyvault::secrets::data_prefix()).await.unwrap();
    let keyring = SharedKeyring::open(store.clone()).await.unwrap().unwrap();
    let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone());
    Domain {
        secrets: Secrets::new(store.clone(), barrier.clone(), 100),
        transit: Transit::new(store.clone(), keys.clone(), names.clone()),
        rotation: Rotation::new(store.clone(), keys.clone(), names.clone(), keyring, barrier.clone()),
        barrier,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    vault: Domain,
}

async fn fixture() -> Fixture {
    fixture_on(&testing::token()).await
}

async fn fixture_on(token: &testing::TestToken) -> Fixture {
    let keys: Arc<dyn KeyStore> = token.store.clone();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("storage")).unwrap());
    let names = KeyNames::new("keyvault").unwrap();
    keys::initialize(store.as_ref(), &keys, &names).await.unwrap();
    let vault = domain(&store, &keys, &names).await;
    Fixture { dir, store, keys, names, vault }
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_appears_nowhere_on_disk() {
    let f = fixture().await;
    let path = SecretPath::parse("db/password").unwrap();
    let marker = "plaintext-marker-7f3c9e1a5b";
    let value = format!(r#"{{"value":"{marker}"}}"#);
    for _ in 0..3 {
        f.vault.secrets.write(&path, value.as_bytes()).await.unwrap();
    }
    assert_eq!(f.vault.secrets.read(&path, None).await.unwrap().data.as_slice(), value.as_bytes());
    // Make sure sled has written everything it buffers.
    drop(f.vault);
    drop(f.store);
    assert_eq!(files_containing(f.dir.path(), marker.as_bytes()), Vec::<String>::new());
    assert_eq!(files_containing(&testing::token_dir(), marker.as_bytes()), Vec::<String>::new());
    // The scan itself works: the path (not secret) is on disk.
    assert!(!files_containing(f.dir.path(), b"db/password").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_copied_to_another_path_or_version_fails() {
    let f = fixture().await;
    let a = SecretPath::parse("app/a").unwrap();
    let b = SecretPath::parse("app/b").unwrap();
    f.vault.secrets.write(&a, br#"{"value":"for-a"}"#).await.unwrap();
    f.vault.secrets.write(&b, br#"{"value":"for-b"}"#).await.unwrap();
    f.vault.secrets.write(&b, br#"{"value":"for-b-2"}"#).await.unwrap();
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    let find = |p: &SecretPath, v: u64| {
        records
            .iter()
            .find(|(k, _)| parse_data_key(k) == Some((p.clone(), v)))
            .map(|(k, r)| (k.clone(), r.clone()))
            .unwrap()
    };
    let (_, rec_a) = find(&a, 1);
    let (key_b1, _) = find(&b, 1);
    // Copy a's record over b's version 1: reading b v1 must fail, not return a's value.
    f.store.put(&key_b1, &rec_a).await.unwrap();
    let err = f.vault.secrets.read(&b, Some(1)).await.unwrap_err();
    assert!(matches!(err, Error::Barrier(BarrierError::Integrity)), "{err:?}");
    // Same record, right path, wrong version.
    let barrier = &f.vault.barrier;
    assert!(matches!(barrier.open(&record_context(&a, 2), &rec_a).await, Err(Error::Barrier(BarrierError::Integrity))));
    assert_eq!(barrier.open(&record_context(&a, 1), &rec_a).await.unwrap().as_slice(), br#"{"value":"for-a"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_records_fail() {
    let f = fixture().await;
    let p = SecretPath::parse("x").unwrap();
    let ctx = record_context(&p, 1);
    let sealed = f.vault.barrier.seal(&ctx, br#"{"value":"v"}"#).await.unwrap();
    let parsed = Record::parse(&sealed).unwrap();
    let header = sealed.len() - parsed.ciphertext.len();
    // Flip a bit in the ciphertext, in the tag, in the nonce, in the wrapped key.
    for i in [header, sealed.len() - 1, header - 1, 12] {
        let mut bad = sealed.clone();
        bad[i] ^= 0x01;
        let r = f.vault.barrier.open(&ctx, &bad).await;
        assert!(matches!(r, Err(Error::Barrier(BarrierError::Integrity))), "byte {i}: {r:?}");
    }
    // Truncated and garbage records are refused as malformed.
    assert!(matches!(f.vault.barrier.open(&ctx, &sealed[..20]).await, Err(Error::Barrier(BarrierError::Malformed(_)))));
    assert!(matches!(
        f.vault.barrier.open(&ctx, b"not a record").await,
        Err(Error::Barrier(BarrierError::Malformed(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_under_v1_read_after_v2_is_active() {
    let f = fixture().await;
    let p = SecretPath::parse("rotating").unwrap();
    f.vault.secrets.write(&p, br#"{"value":"old"}"#).await.unwrap();
    let ring = keys::add_version(f.store.as_ref(), &f.keys, &f.names, keys::Family::Master).await.unwrap();
    assert_eq!(ring.master.active.get(), 2);
    // A vault opened after the change (as after a restart) uses v2 for new writes.
    let vault = domain(&f.store, &f.keys, &f.names).await;
    vault.secrets.write(&p, br#"{"value":"new"}"#).await.unwrap();
    assert_eq!(vault.secrets.read(&p, Some(1)).await.unwrap().data.as_slice(), br#"{"value":"old"}"#);
    assert_eq!(vault.secrets.read(&p, Some(2)).await.unwrap().data.as_slice(), br#"{"value":"new"}"#);
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    let versions: Vec<u32> = records.iter().map(|(_, r)| Record::parse(r).unwrap().kek_version.get()).collect();
    assert_eq!(versions, vec![1, 2]);
    // Re-wrapping moves a v1 record to v2 without changing its value.
    let (key, old) = &records[0];
    let (path, version) = parse_data_key(key).unwrap();
    let ctx = record_context(&path, version);
    let rewrapped = vault.barrier.rewrap(&ctx, old, ring.master.active).await.unwrap().unwrap().record;
    assert_eq!(Record::parse(&rewrapped).unwrap().kek_version.get(), 2);
    assert_eq!(Record::parse(&rewrapped).unwrap().ciphertext, Record::parse(old).unwrap().ciphertext);
    assert_eq!(vault.barrier.open(&ctx, &rewrapped).await.unwrap().as_slice(), br#"{"value":"old"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_lose_a_version() {
    let f = fixture().await;
    let secrets = Arc::new(Secrets::new(f.store.clone(), f.vault.barrier.clone(), 100));
    let p = SecretPath::parse("contended").unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = secrets.clone();
            let p = p.clone();
            tokio::spawn(async move { s.write(&p, format!(r#"{{"value":"w{i}"}}"#).as_bytes()).await.unwrap().0 })
        })
        .collect();
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=12).collect::<Vec<_>>());
    let mut values = Vec::new();
    for v in 1..=12 {
        values.push(String::from_utf8(secrets.read(&p, Some(v)).await.unwrap().data.to_vec()).unwrap());
    }
    values.sort();
    let mut expected: Vec<String> = (0..12).map(|i| format!(r#"{{"value":"w{i}"}}"#)).collect();
    expected.sort();
    assert_eq!(values, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_sensitive_and_initialization_is_once() {
    let token = testing::token();
    let f = fixture_on(&token).await;
    f.vault.transit.create("aes", keyvault::transit::KeyType::Aes256Gcm96).await.unwrap();
    f.vault.transit.create("ed", keyvault::transit::KeyType::Ed25519).await.unwrap();
    // Nothing to make at start-up for an installation initialized with every key.
    keyvault::keys::ensure_keys(f.store.as_ref(), &f.keys, &f.names).await.unwrap();
    // Every key the installation made, as the token reports it: sensitive, not
    // extractable, and C_WrapKey of it refused.
    let labels = token.store.list("keyvault/").unwrap();
    assert_eq!(
        labels.len(),
        8,
        "master, token-signing, approle-hmac, audit, audit-hmac, wrapping, two transit keys: {labels:?}"
    );
    for label in &labels {
        let p = token.store.protection(label).unwrap();
        assert!(!p.is_empty(), "{label}");
        for o in p {
            assert!(o.sensitive && !o.extractable && o.wrap_refused, "{label}: {o:?}");
        }
    }

    let err = keys::initialize(f.store.as_ref(), &f.keys, &f.names).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    // A second installation on the same token with an empty store is refused clearly.
    let dir = tempfile::tempdir().unwrap();
    let other: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let err = keys::initialize(other.as_ref(), &f.keys, &f.names).await.unwrap_err().to_string();
    assert!(err.contains("already holds a key"), "{err}");
}

/// Sixteen initializations of one new store at once: one makes the keys, the others are
/// refused, and the token holds each key once (no two processes made one label).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_initializations_make_each_key_once() {
    let token = testing::token();
    let keys: Arc<dyn KeyStore> = token.store.clone();
    let names = KeyNames::new("race").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let mut calls = Vec::new();
    for _ in 0..16 {
        let (store, keys, names) = (store.clone(), keys.clone(), names.clone());
        calls.push(tokio::spawn(async move { keys::initialize(store.as_ref(), &keys, &names).await }));
    }
    let (mut made, mut refused) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => made += 1,
            Err(Error::Conflict(_)) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((made, refused), (1, 15));
    let labels = token.store.list("race/").unwrap();
    assert_eq!(labels.len(), 6, "{labels:?}");
    for label in &labels {
        let p = token.store.protection(label).unwrap();
        assert_eq!(p.iter().filter(|o| o.token_object).count(), 1, "{label}: {p:?}");
    }
    // At start-up, however many replicas start at once: a key an older installation lacks
    // is made, once; one a claimer left half made (an Ed25519 public half alone, and the
    // crashed claimer's expired claim) is replaced; one an older installation made before
    // keys were recorded as made (no record, no claim) is in use and kept as it is.
    let wrapping = names.wrapping();
    let sealed = token.store.wrap_key(&wrapping, &[9u8; 32], b"aad").unwrap();
    assert!(token.store.destroy(&names.audit_hmac()).unwrap());
    let half_public = token.store.ed25519_public_key(&names.audit_signing()).unwrap();
    token.store.destroy_private_half(&names.audit_signing()).unwrap();
    for (key, _) in scan_all(store.as_ref(), "sys/keys-made/").await.unwrap() {
        assert!(store.delete(&key).await.unwrap());
    }
    // The crashed claimer had marked the key as being made; its claim has expired.
    let crashed = format!("sys/keys-making/{}", names.audit_signing());
    store.put(&crashed, b"{}").await.unwrap();
    let mut starts = Vec::new();
    for _ in 0..16 {
        let (store, keys, names) = (store.clone(), keys.clone(), names.clone());
        starts.push(tokio::spawn(async move { keys::ensure_keys(store.as_ref(), &keys, &names).await }));
    }
    for s in starts {
        s.await.unwrap().unwrap();
    }
    for label in [names.audit_hmac(), names.wrapping(), names.audit_signing()] {
        let p = token.store.protection(&label).unwrap();
        assert_eq!(p.iter().filter(|o| o.token_object).count(), 1, "{label}: {p:?}");
    }
    assert_ne!(token.store.ed25519_public_key(&names.audit_signing()).unwrap(), half_public);
    assert_eq!(&token.store.unwrap_key(&wrapping, &sealed, b"aad").unwrap()[..], &[9u8; 32]);
    assert_eq!(scan_all(store.as_ref(), "sys/keys-made/").await.unwrap().len(), 3);
    // And the claims are gone: nothing left to wait for at the next start.
    assert!(scan_all(store.as_ref(), "sys/key-claims/").await.unwrap().is_empty());
    assert!(scan_all(store.as_ref(), "sys/keys-making/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_key_cache_keeps_every_integrity_check() {
    let f = fixture().await;
    let ring = keyvault::keys::load(f.store.as_ref()).await.unwrap().unwrap();
    let keyring = SharedKeyring::new(ring, f.store.clone());
    // The cache is for the token tier (with the epoch tier no read calls the token).
    let cached = keyvault::barrier::Barrier::new(f.keys.clone(), f.names.clone(), keyring)
        .with_key_tier(KeyTier::Token)
        .with_dek_cache(std::time::Duration::from_secs(60), 10);
    let a = SecretPath::parse("cached/a").unwrap();
    let b = SecretPath::parse("cached/b").unwrap();
    let ctx = record_context(&a, 1);
    let sealed = cached.seal(&ctx, br#"{"value":"v"}"#).await.unwrap();
    // Twice: the second open is served from the cache.
    for _ in 0..2 {
        assert_eq!(cached.open(&ctx, &sealed).await.unwrap().as_slice(), br#"{"value":"v"}"#);
    }
    // Another path or version (different associated data): refused despite the cached key.
    assert!(matches!(cached.open(&record_context(&b, 1), &sealed).await, Err(Error::Barrier(BarrierError::Integrity))));
    assert!(matches!(cached.open(&record_context(&a, 2), &sealed).await, Err(Error::Barrier(BarrierError::Integrity))));
    // Tampered ciphertext: refused.
    let mut bad = sealed.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(cached.open(&ctx, &bad).await, Err(Error::Barrier(BarrierError::Integrity))));
    // Tampered wrapped key: a cache miss, refused by the token.
    let mut bad = sealed.clone();
    bad[12] ^= 1;
    assert!(matches!(cached.open(&ctx, &bad).await, Err(Error::Barrier(BarrierError::Integrity))));
    // More records than the capacity still all open.
    for v in 1..=25u64 {
        let c = record_context(&a, v);
        let s = cached.seal(&c, br#"{"n":1}"#).await.unwrap();
        assert!(cached.open(&c, &s).await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_are_repaired_or_set_aside_and_never_stop_a_rotation() {
    let f = fixture().await;
    for i in 0..600 {
        let p = SecretPath::parse(&format!("many/{i:04}")).unwrap();
        f.vault.secrets.write(&p, format!(r#"{{"value":"v{i}"}}"#).as_bytes()).await.unwrap();
    }
    // One record: a bit of its value ciphertext flipped (lost for good).
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    let (damaged_key, raw) = records[300].clone();
    let mut bad = raw.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    f.store.put(&damaged_key, &bad).await.unwrap();
    // Another: its key version bytes set to 99 (the rest intact: repairable).
    let (renamed_key, raw) = records[100].clone();
    let mut renamed = raw.clone();
    renamed[4..8].copy_from_slice(&99u32.to_be_bytes());
    f.store.put(&renamed_key, &renamed).await.unwrap();

    let target = f.vault.rotation.start().await.unwrap();
    assert_eq!(target.get(), 2);
    // A second start while this one runs is refused.
    assert!(matches!(f.vault.rotation.start().await, Err(Error::Conflict(_))));
    let mut steps = 0;
    while f.vault.rotation.step().await.unwrap() {
        steps += 1;
        assert!(steps < 100, "the rotation does not end");
    }
    let status = f.vault.rotation.status().await.unwrap();
    assert_eq!(status.state, "idle");
    // Every record moved to v2 (the renamed one repaired) except the damaged one, set aside.
    assert_eq!(status.records_remaining, 0);
    assert_eq!(status.set_aside, 1);
    assert_eq!(status.records_by_version, [(1, 1), (2, 599)].into());
    assert_eq!(status.versions_in_use, vec![1, 2]);
    assert_eq!(f.store.get(&damaged_key).await.unwrap(), None, "moved aside");
    let report = f.vault.rotation.set_aside_report().await.unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!((report[0].key.as_str(), report[0].counted_under), (damaged_key.as_str(), Some(1)));
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    assert!(records.iter().all(|(_, r)| Record::parse(r).unwrap().kek_version.get() == 2));
    assert_eq!(records.len(), 599);
    let p = SecretPath::parse("many/0100").unwrap();
    assert_eq!(f.vault.secrets.read(&p, None).await.unwrap().data.as_slice(), br#"{"value":"v100"}"#);
    // The set-aside record is counted under v1: retiring refuses, naming it, and the key
    // object stays (a repair might still need it).
    match f.vault.rotation.retire().await {
        Err(Error::Conflict(m)) => assert!(m.contains("set aside"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(f.keys.exists(&f.names.master(keys::KeyVersion::FIRST)).unwrap());
    let p = SecretPath::parse("many/0300").unwrap();
    assert!(matches!(f.vault.secrets.read(&p, None).await, Err(Error::Barrier(BarrierError::Integrity))));
    // Once that secret version is deleted, v1 can go.
    f.vault.secrets.delete_latest(&p).await.unwrap();
    assert_eq!(f.vault.rotation.retire().await.unwrap(), vec![1]);
    assert!(!f.keys.exists(&f.names.master(keys::KeyVersion::FIRST)).unwrap());
    assert_eq!(f.vault.rotation.status().await.unwrap().set_aside, 0);
    for i in (0..600).filter(|i| *i != 300).step_by(37) {
        let p = SecretPath::parse(&format!("many/{i:04}")).unwrap();
        assert_eq!(
            f.vault.secrets.read(&p, None).await.unwrap().data.as_slice(),
            format!(r#"{{"value":"v{i}"}}"#).as_bytes()
        );
    }
}

/// A barrier of its own over the same store and token, as another replica would have.
async fn replica(f: &Fixture, tier: KeyTier) -> Barrier {
    let keyring = SharedKeyring::open(f.store.clone()).await.unwrap().unwrap();
    Barrier::new(f.keys.clone(), f.names.clone(), keyring).with_key_tier(tier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_tier_touches_the_token_only_to_load_its_key_and_the_seal_drops_it() {
    let token = testing::token();
    let f = fixture_on(&token).await;
    let barrier = replica(&f, KeyTier::Epoch).await;
    let p = SecretPath::parse("epoch/a").unwrap();
    let ctx = record_context(&p, 1);
    let sealed = barrier.seal(&ctx, br#"{"value":"e"}"#).await.unwrap();
    let record = Record::parse(&sealed).unwrap();
    assert_eq!(record.wrapped_dek[0], keyvault::epoch::EPOCH_WRAP);
    assert_eq!(record.wrapped_dek.len(), keyvault::epoch::WRAPPED_LEN);
    // The epoch key is stored wrapped by master v1 (not as a key: a token-wrapped blob).
    let blob = f.store.get("sys/epoch/1").await.unwrap().unwrap();
    assert_eq!(blob[0], keyvault_hsm::WrapMechanism::AesGcm as u8);
    assert_eq!(barrier.epoch_keys().loaded_count(), 1);

    // With the token logged out, reads and writes go on: they never call it.
    token.store.seal();
    assert_eq!(barrier.open(&ctx, &sealed).await.unwrap().as_slice(), br#"{"value":"e"}"#);
    let ctx2 = record_context(&p, 2);
    let sealed2 = barrier.seal(&ctx2, br#"{"value":"f"}"#).await.unwrap();
    assert_eq!(barrier.open(&ctx2, &sealed2).await.unwrap().as_slice(), br#"{"value":"f"}"#);
    // Every integrity check holds: other context, flipped wrapped key, flipped value.
    assert!(matches!(barrier.open(&ctx2, &sealed).await, Err(Error::Barrier(BarrierError::Integrity))));
    for i in [11, 30, sealed.len() - 1] {
        let mut bad = sealed.clone();
        bad[i] ^= 1;
        assert!(matches!(barrier.open(&ctx, &bad).await, Err(Error::Barrier(BarrierError::Integrity))), "byte {i}");
    }
    // The emergency seal drops the key: now the record needs the token, which is sealed.
    assert_eq!(barrier.forget_cached_keys(), 1);
    assert_eq!(barrier.epoch_keys().loaded_count(), 0);
    let err = barrier.open(&ctx, &sealed).await.unwrap_err();
    assert!(matches!(err, Error::Hsm(keyvault_hsm::HsmError::Sealed)), "{err:?}");
    // Unsealed, the key is unwrapped again from storage and both records open.
    token.store.unseal(token.config.pin.clone()).unwrap();
    assert_eq!(barrier.open(&ctx, &sealed).await.unwrap().as_slice(), br#"{"value":"e"}"#);
    assert_eq!(barrier.open(&ctx2, &sealed2).await.unwrap().as_slice(), br#"{"value":"f"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_replicas_making_the_first_epoch_key_at_once_agree_on_one() {
    let f = fixture().await;
    let mut replicas = Vec::new();
    for _ in 0..16 {
        replicas.push(replica(&f, KeyTier::Epoch).await);
    }
    let tasks: Vec<_> = replicas
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, b)| {
            tokio::spawn(async move {
                let path = format!("race/{i}");
                let p = SecretPath::parse(&path).unwrap();
                b.seal(&record_context(&p, 1), format!(r#"{{"n":{i}}}"#).as_bytes()).await.unwrap()
            })
        })
        .collect();
    let mut sealed = Vec::new();
    for t in tasks {
        sealed.push(t.await.unwrap());
    }
    // Every replica opens every other's record: one epoch key won.
    for reader in &replicas {
        for (i, s) in sealed.iter().enumerate() {
            let p = SecretPath::parse(&format!("race/{i}")).unwrap();
            assert_eq!(
                reader.open(&record_context(&p, 1), s).await.unwrap().as_slice(),
                format!(r#"{{"n":{i}}}"#).as_bytes()
            );
        }
    }
    let stored = scan_all(f.store.as_ref(), "sys/epoch/").await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_moves_token_wrapped_records_to_the_new_epoch_key_and_retire_drops_the_old() {
    let f = fixture().await;
    // Records of both tiers under v1 (an installation that switched tiers).
    let token_tier = replica(&f, KeyTier::Token).await;
    let token_secrets = Secrets::new(f.store.clone(), token_tier.clone(), 100);
    for i in 0..20 {
        let p = SecretPath::parse(&format!("mixed/t{i}")).unwrap();
        token_secrets.write(&p, format!(r#"{{"t":{i}}}"#).as_bytes()).await.unwrap();
        let p = SecretPath::parse(&format!("mixed/e{i}")).unwrap();
        f.vault.secrets.write(&p, format!(r#"{{"e":{i}}}"#).as_bytes()).await.unwrap();
    }
    let first = |r: &[u8]| Record::parse(r).unwrap().wrapped_dek[0];
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    let kinds: std::collections::BTreeSet<u8> = records.iter().map(|(_, r)| first(r)).collect();
    assert_eq!(kinds, [keyvault_hsm::WrapMechanism::AesGcm as u8, keyvault::epoch::EPOCH_WRAP].into());
    // Each tier reads the other's records.
    let p = SecretPath::parse("mixed/e3").unwrap();
    assert_eq!(token_secrets.read(&p, None).await.unwrap().data.as_slice(), br#"{"e":3}"#);
    let p = SecretPath::parse("mixed/t3").unwrap();
    assert_eq!(f.vault.secrets.read(&p, None).await.unwrap().data.as_slice(), br#"{"t":3}"#);

    f.vault.rotation.start().await.unwrap();
    while f.vault.rotation.step().await.unwrap() {}
    let records = scan_all(f.store.as_ref(), data_prefix()).await.unwrap();
    assert_eq!(records.len(), 40);
    for (k, r) in &records {
        let rec = Record::parse(r).unwrap();
        assert_eq!((rec.kek_version.get(), rec.wrapped_dek[0]), (2, keyvault::epoch::EPOCH_WRAP), "{k}");
    }
    assert!(f.store.get("sys/epoch/2").await.unwrap().is_some());
    assert_eq!(f.vault.rotation.retire().await.unwrap(), vec![1]);
    assert_eq!(f.store.get("sys/epoch/1").await.unwrap(), None, "the stored epoch key of v1 is gone");
    assert_eq!(f.vault.barrier.epoch_keys().loaded_count(), 1, "only v2's is held");
    for i in 0..20 {
        for (kind, want) in [("t", format!(r#"{{"t":{i}}}"#)), ("e", format!(r#"{{"e":{i}}}"#))] {
            let p = SecretPath::parse(&format!("mixed/{kind}{i}")).unwrap();
            assert_eq!(f.vault.secrets.read(&p, None).await.unwrap().data.as_slice(), want.as_bytes());
        }
    }
    // Another replica that still held v1's key drops it when it follows the keyring.
    assert!(token_tier.epoch_keys().loaded_count() >= 1);
    token_tier.follow_keyring().await.unwrap();
    assert!(token_tier.epoch_keys().cached(keys::KeyVersion::FIRST).is_none());
}

/// A rotation of one key family while the other family rotates: both are recorded (the
/// keyring changed under each, but not their claims).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_families_rotate_at_once() {
    let token = testing::token();
    let f = fixture_on(&token).await;
    for round in 0..6u32 {
        let (a, b) = tokio::join!(
            keys::add_version(f.store.as_ref(), &f.keys, &f.names, keys::Family::Master),
            keys::add_version(f.store.as_ref(), &f.keys, &f.names, keys::Family::TokenSigning),
        );
        a.unwrap_or_else(|e| panic!("master, round {round}: {e:?}"));
        b.unwrap_or_else(|e| panic!("token signing, round {round}: {e:?}"));
    }
    let ring = keys::load(f.store.as_ref()).await.unwrap().unwrap();
    assert_eq!((ring.master.active.get(), ring.token_signing.active.get()), (7, 7));
    assert!(ring.master.pending.is_none() && ring.token_signing.pending.is_none());
}
