//! Tests against a real SoftHSM2 token created for the test run.

use std::sync::Arc;

use cryptoki::object::{AttributeInfo, ObjectClass};
use ed25519_dalek::{Signature, VerifyingKey};

use crate::softhsm::testing;
use crate::{HsmError, KeyKind, KeyLabel, KeyStore, Pkcs11KeyStore, WrapMechanism, WrapPreference};

fn label(s: &str) -> KeyLabel {
    KeyLabel::new(s).unwrap()
}

#[test]
fn master_key_value_cannot_be_read() {
    let t = testing::token();
    let kek = label("keyvault/master/v1");
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    assert!(
        matches!(t.store.value_attribute_info(&kek, ObjectClass::SECRET_KEY).unwrap(), AttributeInfo::Sensitive),
        "CKA_VALUE of the master key must be refused"
    );
    assert_eq!(t.store.value_attributes_returned(&kek, ObjectClass::SECRET_KEY).unwrap(), 0);

    let hmac = label("keyvault/hmac/v1");
    t.store.generate(&hmac, KeyKind::HmacSha256).unwrap();
    assert!(matches!(t.store.value_attribute_info(&hmac, ObjectClass::SECRET_KEY).unwrap(), AttributeInfo::Sensitive));

    let signing = label("keyvault/token-signing/v1");
    t.store.generate(&signing, KeyKind::Ed25519).unwrap();
    assert!(matches!(
        t.store.value_attribute_info(&signing, ObjectClass::PRIVATE_KEY).unwrap(),
        AttributeInfo::Sensitive
    ));
}

fn round_trips(t: &testing::TestToken) {
    let kek = label("keyvault/master/v1");
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    let dek = [0x5au8; 32];
    let wrapped = t.store.wrap_key(&kek, &dek, b"ctx").unwrap();
    assert_eq!(wrapped[0], t.store.wrap_mechanism() as u8);
    assert!(!wrapped.windows(32).any(|w| w == dek), "wrapped key contains the plaintext");
    let unwrapped = t.store.unwrap_key(&kek, &wrapped, b"ctx").unwrap();
    assert_eq!(unwrapped.as_slice(), &dek);

    // Two wraps of one key differ (fresh IV) where the mechanism is randomized.
    if t.store.wrap_mechanism() == WrapMechanism::AesGcm {
        assert_ne!(wrapped, t.store.wrap_key(&kek, &dek, b"ctx").unwrap());
        // The associated data is bound.
        let r = t.store.unwrap_key(&kek, &wrapped, b"other");
        assert!(matches!(r, Err(HsmError::InvalidCiphertext)), "{r:?}");
    }

    // Every single flipped bit is detected.
    for i in 1..wrapped.len() {
        for bit in [0u8, 3, 7] {
            let mut bad = wrapped.clone();
            bad[i] ^= 1 << bit;
            let r = t.store.unwrap_key(&kek, &bad, b"ctx");
            assert!(matches!(r, Err(HsmError::InvalidCiphertext)), "byte {i} bit {bit}: {r:?}");
        }
    }
    // Truncated, empty, unknown mechanism byte.
    assert!(matches!(t.store.unwrap_key(&kek, &wrapped[..10], b"ctx"), Err(HsmError::InvalidCiphertext)));
    assert!(matches!(t.store.unwrap_key(&kek, &[], b"ctx"), Err(HsmError::InvalidCiphertext)));
    let mut bad = wrapped.clone();
    bad[0] = 99;
    assert!(matches!(t.store.unwrap_key(&kek, &bad, b"ctx"), Err(HsmError::InvalidCiphertext)));

    // Another master key version cannot unwrap it.
    let kek2 = label("keyvault/master/v2");
    t.store.generate(&kek2, KeyKind::Aes256).unwrap();
    assert!(matches!(t.store.unwrap_key(&kek2, &wrapped, b"ctx"), Err(HsmError::InvalidCiphertext)));
    // The master key's own value cannot be read even when wrapping is the mechanism.
    assert!(matches!(t.store.value_attribute_info(&kek, ObjectClass::SECRET_KEY).unwrap(), AttributeInfo::Sensitive));
}

#[test]
fn wrap_unwrap_round_trip_aes_gcm() {
    let t = testing::token_with(|c| c.wrap = WrapPreference::Only(WrapMechanism::AesGcm));
    assert_eq!(t.store.wrap_mechanism(), WrapMechanism::AesGcm);
    round_trips(&t);
}

#[test]
fn wrap_unwrap_round_trip_aes_key_wrap_pad() {
    let t = testing::token_with(|c| c.wrap = WrapPreference::Only(WrapMechanism::AesKeyWrapPad));
    assert_eq!(t.store.wrap_mechanism(), WrapMechanism::AesKeyWrapPad);
    round_trips(&t);
}

#[test]
fn auto_prefers_aes_gcm_on_softhsm() {
    let t = testing::token();
    assert_eq!(t.store.wrap_mechanism(), WrapMechanism::AesGcm);
}

#[test]
fn ed25519_signature_verifies_with_dalek() {
    let t = testing::token();
    let key = label("keyvault/token-signing/v1");
    t.store.generate(&key, KeyKind::Ed25519).unwrap();
    let public = t.store.ed25519_public_key(&key).unwrap();
    let vk = VerifyingKey::from_bytes(&public).unwrap();
    let msg = b"header.claims";
    let sig = Signature::from_bytes(&t.store.sign_ed25519(&key, msg).unwrap());
    vk.verify_strict(msg, &sig).unwrap();
    assert!(vk.verify_strict(b"header.claimz", &sig).is_err());
}

#[test]
fn hmac_is_keyed_and_deterministic() {
    let t = testing::token();
    let k1 = label("keyvault/hmac/v1");
    let k2 = label("keyvault/hmac/v2");
    t.store.generate(&k1, KeyKind::HmacSha256).unwrap();
    t.store.generate(&k2, KeyKind::HmacSha256).unwrap();
    let a = t.store.hmac_sha256(&k1, b"secret-id").unwrap();
    assert_eq!(a, t.store.hmac_sha256(&k1, b"secret-id").unwrap());
    assert_ne!(a, t.store.hmac_sha256(&k1, b"secret-ie").unwrap());
    assert_ne!(a, t.store.hmac_sha256(&k2, b"secret-id").unwrap());
}

#[test]
fn keys_are_found_by_label_after_reopen() {
    let t = testing::token();
    let kek = label("keyvault/master/v1");
    let sig = label("keyvault/token-signing/v1");
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    t.store.generate(&sig, KeyKind::Ed25519).unwrap();
    let wrapped = t.store.wrap_key(&kek, &[1u8; 32], b"").unwrap();
    let public = t.store.ed25519_public_key(&sig).unwrap();

    // A second store on the same token (a restarted process looks keys up the same way).
    let again = Pkcs11KeyStore::open(&t.config).unwrap();
    assert_eq!(again.unwrap_key(&kek, &wrapped, b"").unwrap().as_slice(), &[1u8; 32]);
    assert_eq!(again.ed25519_public_key(&sig).unwrap(), public);
    assert!(again.exists(&kek).unwrap());
    assert_eq!(again.list("keyvault/").unwrap(), vec![kek.clone(), sig.clone()]);
    assert!(matches!(again.generate(&kek, KeyKind::Aes256), Err(HsmError::KeyExists(_))));
    assert!(matches!(again.wrap_key(&label("nope"), &[1u8; 32], b""), Err(HsmError::KeyNotFound(_))));

    // Destroy: gone for both stores (the first one's cached handle is stale, and the key
    // is looked for again by label: it is missing, and the token still has other keys).
    assert!(again.destroy(&kek).unwrap());
    assert!(!again.exists(&kek).unwrap());
    assert!(matches!(t.store.unwrap_key(&kek, &wrapped, b""), Err(HsmError::KeyNotFound(_))));
    assert!(!again.destroy(&kek).unwrap());
    // Made again under the same label by the other store: the first store's stale handle
    // is dropped and the new object found by its label.
    again.generate(&kek, KeyKind::Aes256).unwrap();
    let rewrapped = t.store.wrap_key(&kek, &[5u8; 32], b"").unwrap();
    assert_eq!(again.unwrap_key(&kek, &rewrapped, b"").unwrap().as_slice(), &[5u8; 32]);
}

#[test]
fn wrong_pin_and_unknown_token_are_clear_errors() {
    // PKCS#11 logins belong to the application, not the session: test the wrong PIN on
    // a token this process has not logged in to yet.
    let mut bad = testing::token_config();
    let good_pin = bad.pin.clone();
    bad.pin = testing::wrong_pin();
    let err = Pkcs11KeyStore::open(&bad).unwrap_err();
    assert!(matches!(err, HsmError::PinIncorrect), "{err:?}");
    assert!(!err.to_string().contains(secrecy::ExposeSecret::expose_secret(&good_pin)));

    let t = testing::token();

    let mut missing = t.config.clone();
    missing.token_label = "no-such-token".into();
    missing.discovery_timeout = std::time::Duration::from_millis(50);
    let err = Pkcs11KeyStore::open(&missing).unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");

    let mut module = t.config.clone();
    module.module = "/nonexistent/libpkcs11.so".into();
    let err = Pkcs11KeyStore::open(&module).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/libpkcs11.so"), "{err}");
}

#[test]
fn sixty_four_concurrent_wrap_unwrap_calls_succeed() {
    let t = testing::token();
    let kek = label("keyvault/master/v1");
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    let store: Arc<Pkcs11KeyStore> = t.store.clone();
    let threads: Vec<_> = (0..64u8)
        .map(|i| {
            let store = store.clone();
            let kek = kek.clone();
            std::thread::spawn(move || {
                let dek = [i; 32];
                let aad = [i];
                let wrapped = store.wrap_key(&kek, &dek, &aad).unwrap();
                let back = store.unwrap_key(&kek, &wrapped, &aad).unwrap();
                assert_eq!(back.as_slice(), &dek);
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
}

#[test]
fn labels_are_validated() {
    assert!(KeyLabel::new("").is_err());
    assert!(KeyLabel::new("a b").is_err());
    assert!(KeyLabel::new("x".repeat(65)).is_err());
    assert!(KeyLabel::new("keyvault/transit/orders-v2.key_1").is_ok());
}

#[test]
fn aes_gcm_data_encryption_in_the_token() {
    let t = testing::token();
    let key = label("keyvault/transit/orders/v1");
    t.store.generate(&key, KeyKind::Aes256Gcm).unwrap();
    let ct = t.store.encrypt_aes_gcm(&key, b"hello transit", b"ctx").unwrap();
    assert_eq!(ct.len(), 12 + 13 + 16);
    assert_eq!(t.store.decrypt_aes_gcm(&key, &ct, b"ctx").unwrap().as_slice(), b"hello transit");
    assert!(matches!(t.store.decrypt_aes_gcm(&key, &ct, b"other"), Err(HsmError::InvalidCiphertext)));
    let mut bad = ct.clone();
    bad[20] ^= 1;
    assert!(matches!(t.store.decrypt_aes_gcm(&key, &bad, b"ctx"), Err(HsmError::InvalidCiphertext)));
    assert!(matches!(t.store.value_attribute_info(&key, ObjectClass::SECRET_KEY).unwrap(), AttributeInfo::Sensitive));
    // Empty plaintexts are fine too.
    let ct = t.store.encrypt_aes_gcm(&key, b"", b"").unwrap();
    assert!(t.store.decrypt_aes_gcm(&key, &ct, b"").unwrap().is_empty());
}

#[test]
fn a_sealed_store_refuses_every_call_until_unsealed_with_the_pin() {
    let t = testing::token();
    let kek = label("keyvault/master/v1");
    t.store.generate(&kek, KeyKind::Aes256).unwrap();
    let wrapped = t.store.wrap_key(&kek, &[7u8; 32], b"aad").unwrap();
    // A call on loan while the store is sealed finishes; its session is closed after.
    let lease_holder = {
        let store = t.store.clone();
        let kek = kek.clone();
        std::thread::spawn(move || store.unwrap_key(&kek, &wrapped, b"aad").map(|k| k.to_vec()))
    };
    let wrapped = t.store.wrap_key(&kek, &[7u8; 32], b"aad").unwrap();
    t.store.seal();
    assert!(t.store.is_sealed());
    let _ = lease_holder.join().unwrap();
    for err in [
        t.store.unwrap_key(&kek, &wrapped, b"aad").map(|_| ()).unwrap_err(),
        t.store.exists(&kek).map(|_| ()).unwrap_err(),
        t.store.generate(&label("keyvault/other"), KeyKind::Aes256).unwrap_err(),
    ] {
        assert!(matches!(err, HsmError::Sealed), "{err:?}");
        assert!(err.is_unavailable());
    }
    // The token's login ended with the last session: a wrong PIN is checked and refused.
    let err = t.store.unseal(testing::wrong_pin()).unwrap_err();
    assert!(matches!(err, HsmError::PinIncorrect), "{err:?}");
    assert!(t.store.is_sealed());
    // Sixteen unseals with the right PIN at once: all succeed, the store works again.
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (store, pin) = (t.store.clone(), t.config.pin.clone());
            std::thread::spawn(move || store.unseal(pin))
        })
        .collect();
    for th in threads {
        th.join().unwrap().unwrap();
    }
    assert!(!t.store.is_sealed());
    assert_eq!(t.store.unwrap_key(&kek, &wrapped, b"aad").unwrap().as_slice(), &[7u8; 32]);
    // Unsealing an unsealed store checks nothing.
    t.store.unseal(testing::wrong_pin()).unwrap();
}

/// Use each kind of key once, so that the store makes its session copies.
fn use_keys(store: &Pkcs11KeyStore, aes: &KeyLabel, hmac: &KeyLabel, ed: &KeyLabel) -> Result<(), HsmError> {
    store.encrypt_aes_gcm(aes, b"x", b"")?;
    store.hmac_sha256(hmac, b"x")?;
    store.sign_ed25519(ed, b"x")?;
    Ok(())
}

/// Per key: (token objects, session copies) among its private and secret objects, after
/// checking that every one of them is sensitive, unextractable and refuses `C_WrapKey`.
fn objects_of(store: &Pkcs11KeyStore, key: &KeyLabel) -> (usize, usize) {
    let mut counts = (0, 0);
    for o in store.protection(key).unwrap() {
        assert!(o.sensitive && !o.extractable && o.wrap_refused, "{key}: {o:?}");
        if o.token_object {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    counts
}

#[test]
fn keys_are_used_through_session_copies_as_protected_as_their_originals() {
    let t = testing::token();
    let (aes, hmac, ed) = (label("keyvault/transit/a"), label("keyvault/hmac/v1"), label("keyvault/signing/v1"));
    t.store.generate(&aes, KeyKind::Aes256Gcm).unwrap();
    t.store.generate(&hmac, KeyKind::HmacSha256).unwrap();
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    for key in [&aes, &hmac, &ed] {
        assert_eq!(objects_of(&t.store, key), (1, 0), "{key}: no copy before the first use");
    }
    // Sixteen threads use the keys at once: one copy per key, never more.
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| use_keys(&t.store, &aes, &hmac, &ed).unwrap());
        }
    });
    for key in [&aes, &hmac, &ed] {
        assert_eq!(objects_of(&t.store, key), (1, 1), "{key}");
    }
    // A copy signs with the key itself.
    let public = VerifyingKey::from_bytes(&t.store.ed25519_public_key(&ed).unwrap()).unwrap();
    let sig = t.store.sign_ed25519(&ed, b"message").unwrap();
    public.verify_strict(b"message", &Signature::from_bytes(&sig)).unwrap();

    // Sealing closes the session that owns the copies: they are gone with it.
    t.store.seal();
    t.store.unseal(t.config.pin.clone()).unwrap();
    for key in [&aes, &hmac, &ed] {
        assert_eq!(objects_of(&t.store, key), (1, 0), "{key}: copies survived the seal");
    }

    // Destroying a key destroys its copy; the other keys keep theirs.
    use_keys(&t.store, &aes, &hmac, &ed).unwrap();
    assert!(t.store.destroy(&aes).unwrap());
    assert_eq!(objects_of(&t.store, &aes), (0, 0));
    assert_eq!(objects_of(&t.store, &hmac), (1, 1));
    assert!(matches!(t.store.encrypt_aes_gcm(&aes, b"x", b""), Err(HsmError::KeyNotFound(_))));
    // Made again under the same label: a new key, a new copy.
    t.store.generate(&aes, KeyKind::Aes256Gcm).unwrap();
    let ct = t.store.encrypt_aes_gcm(&aes, b"again", b"").unwrap();
    assert_eq!(t.store.decrypt_aes_gcm(&aes, &ct, b"").unwrap().as_slice(), b"again");
    assert_eq!(objects_of(&t.store, &aes), (1, 1));
}

#[test]
fn session_copies_stop_at_the_configured_number_and_can_be_turned_off() {
    let keys: Vec<KeyLabel> = (0..3).map(|i| label(&format!("keyvault/transit/k{i}"))).collect();
    for (limit, copies) in [(2usize, 2usize), (0, 0)] {
        let t = testing::token_with(|c| c.session_copies = limit);
        for k in &keys {
            t.store.generate(k, KeyKind::Aes256Gcm).unwrap();
            t.store.encrypt_aes_gcm(k, b"x", b"").unwrap();
        }
        let made: usize = keys.iter().map(|k| objects_of(&t.store, k).1).sum();
        assert_eq!(made, copies, "limit {limit}");
        // Keys beyond the limit work all the same, through their token objects.
        for k in &keys {
            let ct = t.store.encrypt_aes_gcm(k, b"y", b"").unwrap();
            assert_eq!(t.store.decrypt_aes_gcm(k, &ct, b"").unwrap().as_slice(), b"y");
        }
    }
}

/// The environment variables through which [`a_key_destroyed_by_another_process_is_not_used_after_the_recheck`]
/// tells its child process what to destroy (the PIN is passed in a file, never in the
/// environment).
const CHILD_TOKEN: &str = "KEYVAULT_TEST_CHILD_TOKEN";
const CHILD_PIN_FILE: &str = "KEYVAULT_TEST_CHILD_PIN_FILE";
const CHILD_KEY: &str = "KEYVAULT_TEST_CHILD_KEY";

/// Run as a child process by the test below: destroy one key in a token, as another
/// replica sharing the token would. Does nothing when run on its own.
#[test]
#[ignore = "a helper that the test below runs in a child process"]
fn child_destroys_a_key() {
    let (Ok(token), Ok(pin_file), Ok(key)) =
        (std::env::var(CHILD_TOKEN), std::env::var(CHILD_PIN_FILE), std::env::var(CHILD_KEY))
    else {
        return;
    };
    let pin = crate::pin::PinSource::File(pin_file.into()).read().unwrap();
    let module = crate::softhsm::find_module().unwrap();
    let store = Pkcs11KeyStore::open(&crate::Pkcs11Config::new(module, token, pin)).unwrap();
    assert!(store.destroy(&label(&key)).unwrap(), "the child found no key to destroy");
}

#[test]
fn a_key_destroyed_by_another_process_is_not_used_after_the_recheck() {
    use secrecy::ExposeSecret;
    let t = testing::token();
    let key = label("keyvault/transit/shared");
    t.store.generate(&key, KeyKind::Aes256Gcm).unwrap();
    // Another key, so that the token is not left empty (an empty token is taken for a
    // missing one).
    t.store.generate(&label("keyvault/master/v1"), KeyKind::Aes256).unwrap();
    let ct = t.store.encrypt_aes_gcm(&key, b"x", b"").unwrap();
    assert_eq!(objects_of(&t.store, &key), (1, 1));

    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, t.config.pin.expose_secret()).unwrap();
    std::fs::set_permissions(&pin_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tests::child_destroys_a_key", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_TOKEN, &t.config.token_label)
        .env(CHILD_PIN_FILE, &pin_file)
        .env(CHILD_KEY, key.as_str())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("1 passed"), "child: {stdout}");

    // Within the recheck interval this process may still use its copy; after it, the
    // store finds the original gone and answers as for any missing key.
    std::thread::sleep(crate::pkcs11::COPY_RECHECK + std::time::Duration::from_millis(100));
    let err = t.store.decrypt_aes_gcm(&key, &ct, b"").unwrap_err();
    assert!(matches!(err, HsmError::KeyNotFound(_)), "{err:?}");
    assert_eq!(objects_of(&t.store, &key), (0, 0), "the copy outlived its original");
}

#[test]
fn a_label_on_two_objects_is_refused_for_use_and_destruction() {
    let t = testing::token();
    let key = label("keyvault/transit/twice/v1");
    t.store.generate(&key, KeyKind::Aes256Gcm).unwrap();
    t.store.make_second_object(&key, KeyKind::Aes256Gcm).unwrap();
    // Which one holds the key is unknown, so neither is used.
    let err = t.store.encrypt_aes_gcm(&key, b"x", b"").unwrap_err();
    assert!(matches!(&err, HsmError::DuplicateLabel(l) if l == key.as_str()), "{err:?}");
    assert!(err.may_be_stale_view());
    let err = t.store.decrypt_aes_gcm(&key, &[1u8; 40], b"").unwrap_err();
    assert!(matches!(&err, HsmError::DuplicateLabel(_)), "{err:?}");
    // Nor does a destroy pick: both objects stay.
    let err = t.store.destroy(&key).unwrap_err();
    assert!(matches!(&err, HsmError::DuplicateLabel(_)), "{err:?}");
    assert_eq!(objects_of(&t.store, &key).0, 2);
    // An Ed25519 key's two objects (private and public) under one label are not a duplicate.
    let ed = label("keyvault/transit/pair/v1");
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    assert!(t.store.destroy(&ed).unwrap());
    assert!(!t.store.exists(&ed).unwrap());
}

#[test]
fn a_broken_leftover_under_a_label_is_replaced_and_a_key_is_not() {
    let t = testing::token();
    // A key as made: generating it again is refused (the caller, holding the label's
    // claim, adopts it).
    let key = label("keyvault/master/v1");
    t.store.generate(&key, KeyKind::Aes256).unwrap();
    let sealed = t.store.wrap_key(&key, &[7u8; 32], b"aad").unwrap();
    assert!(matches!(t.store.generate(&key, KeyKind::Aes256), Err(HsmError::KeyExists(_))));
    assert_eq!(&t.store.unwrap_key(&key, &sealed, b"aad").unwrap()[..], &[7u8; 32]);
    // A key of another kind under the label (a failed claimer's, with another key type
    // asked for) is not the key wanted: it is replaced, not adopted.
    let other = label("keyvault/transit/kind/v1");
    t.store.generate(&other, KeyKind::Aes256Gcm).unwrap();
    t.store.generate(&other, KeyKind::Ed25519).unwrap();
    t.store.ed25519_public_key(&other).unwrap();
    assert!(t.store.encrypt_aes_gcm(&other, b"x", b"").is_err());
    // An HMAC key is a secret key too, but not an AES key.
    t.store.generate(&other, KeyKind::HmacSha256).unwrap();
    t.store.generate(&other, KeyKind::Aes256Gcm).unwrap();
    t.store.encrypt_aes_gcm(&other, b"x", b"").unwrap();
    // An Ed25519 public half alone (a pair whose private half is gone) is no key: the
    // generation replaces it with a whole pair.
    let ed = label("keyvault/transit/half/v1");
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    let public = t.store.ed25519_public_key(&ed).unwrap();
    t.store.destroy_class(&ed, ObjectClass::PRIVATE_KEY).unwrap();
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    assert_ne!(t.store.ed25519_public_key(&ed).unwrap(), public);
    assert_eq!(objects_of(&t.store, &ed), (1, 0));
    // Nor is a private half alone: no adoption of a key without its public half.
    let public = t.store.ed25519_public_key(&ed).unwrap();
    t.store.destroy_class(&ed, ObjectClass::PUBLIC_KEY).unwrap();
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    assert_ne!(t.store.ed25519_public_key(&ed).unwrap(), public);
    // Two objects under the label are no key either.
    let twice = label("keyvault/transit/twice/v1");
    t.store.generate(&twice, KeyKind::Aes256Gcm).unwrap();
    t.store.make_second_object(&twice, KeyKind::Aes256Gcm).unwrap();
    t.store.generate(&twice, KeyKind::Aes256Gcm).unwrap();
    assert_eq!(objects_of(&t.store, &twice), (1, 0));
    t.store.encrypt_aes_gcm(&twice, b"x", b"").unwrap();
}

#[test]
fn a_generation_past_its_claim_makes_and_destroys_nothing() {
    let t = testing::token();
    let over = std::time::Instant::now() - std::time::Duration::from_millis(1);
    let key = label("keyvault/transit/late/v1");
    let err = t.store.generate_claimed(&key, KeyKind::Aes256Gcm, over).unwrap_err();
    assert!(matches!(&err, HsmError::ClaimExpired(l) if l == key.as_str()), "{err:?}");
    assert!(err.is_unavailable());
    assert!(!t.store.exists(&key).unwrap());
    // What is under the label stays as it is, even what a claimer in time would replace.
    let ed = label("keyvault/transit/late-half/v1");
    t.store.generate(&ed, KeyKind::Ed25519).unwrap();
    let public = t.store.ed25519_public_key(&ed).unwrap();
    t.store.destroy_private_half(&ed).unwrap();
    assert!(matches!(t.store.generate_claimed(&ed, KeyKind::Ed25519, over), Err(HsmError::ClaimExpired(_))));
    assert_eq!(t.store.ed25519_public_key(&ed).unwrap(), public);
}
