//! A claim taken over from a claimer that crashed, then given back after the token failed
//! the generation, is given back as no claim at all: never as the crashed claimer's claim,
//! which would let that claimer, were it only slow, record a version whose key the
//! take-over may have replaced. The work runs in a child process of this test binary: the
//! token fault file (`KEYVAULT_TEST_TOKEN_FAULT`, vault/src/faults.rs) is named in the
//! environment, which this process does not change.

use std::sync::Arc;

use keyvault::keys::{self, Family, KEYRING_KEY, KeyNames, KeyVersion, Keyring, PendingVersion};
use keyvault::store::{SledStore, Store, decode_json, encode_json};
use keyvault_hsm::KeyStore;
use keyvault_hsm::softhsm::testing;

const FAULT: &str = "KEYVAULT_TEST_TOKEN_FAULT";

#[test]
fn a_taken_over_claim_is_given_back_as_none_after_a_failed_generation() {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    std::fs::write(&fault, "").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_takes_over_and_fails", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(FAULT, &fault)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the test above in a child process"]
async fn child_takes_over_and_fails() {
    let Some(fault) = std::env::var_os(FAULT).map(std::path::PathBuf::from) else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = testing::token();
    let raw: Arc<dyn KeyStore> = token.store.clone();
    let keys: Arc<dyn KeyStore> = Arc::new(keyvault::metrics::MeteredKeyStore::new(raw));
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("storage")).unwrap());
    let names = KeyNames::new("keyvault").unwrap();
    keys::initialize(store.as_ref(), &keys, &names).await.unwrap();

    // A claimer of master version 2 crashed (or is only slow): its claim has expired.
    let stored = store.get(KEYRING_KEY).await.unwrap().unwrap();
    let mut ring: Keyring = decode_json(KEYRING_KEY, &stored).unwrap();
    let crashed = PendingVersion { version: KeyVersion::new(2).unwrap(), until: 1 };
    ring.master.pending = Some(crashed.clone());
    store.put(KEYRING_KEY, &encode_json(&ring)).await.unwrap();

    // This rotation takes the claim over; the token fails the generation.
    std::fs::write(&fault, "error").unwrap();
    let err = keys::add_version(store.as_ref(), &keys, &names, Family::Master).await.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
    std::fs::write(&fault, "").unwrap();
    let ring: Keyring = decode_json(KEYRING_KEY, &store.get(KEYRING_KEY).await.unwrap().unwrap()).unwrap();
    assert_eq!(ring.master.pending, None, "the crashed claimer's claim was handed back");
    assert_eq!(ring.master.active.get(), 1);

    // The next rotation goes ahead at once, with the same version number.
    let ring = keys::add_version(store.as_ref(), &keys, &names, Family::Master).await.unwrap();
    assert_eq!((ring.master.active.get(), ring.master.pending.is_none()), (2, true));
}
