//! Criterion: the raw rates the key-operation endpoints are compared with — Ed25519
//! verification in process (single and `verify_batch`), and the token's Ed25519 signing,
//! AES-GCM encryption and HMAC (SoftHSM), one thread; each through the store's session
//! copy of the key (the default, and what the server does) and, `_token_object`, through
//! the token object itself (`hsm.session_copies = 0`).
//!
//!     cargo bench -p keyvault --bench keyops
#![allow(clippy::unwrap_used)] // benchmark set-up

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use keyvault_hsm::softhsm::testing;
use keyvault_hsm::{KeyKind, KeyLabel, KeyStore};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("keyops");
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let vk = key.verifying_key();
    let msgs: Vec<Vec<u8>> =
        (0..100).map(|i| format!("1795622646.nonce-{i:016}.{{\"reading\":21.5}}").into_bytes()).collect();
    let sigs: Vec<Signature> = msgs.iter().map(|m| key.sign(m)).collect();
    g.throughput(Throughput::Elements(1));
    g.bench_function("dalek_verify_strict", |b| b.iter(|| vk.verify_strict(&msgs[0], &sigs[0]).unwrap()));
    g.throughput(Throughput::Elements(100));
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    let vks: Vec<VerifyingKey> = vec![vk; 100];
    g.bench_function("dalek_verify_batch_100", |b| b.iter(|| ed25519_dalek::verify_batch(&refs, &sigs, &vks).unwrap()));

    let signing = KeyLabel::new("bench/transit/sign/v1").unwrap();
    let aes = KeyLabel::new("bench/transit/enc/v1").unwrap();
    let hmac = KeyLabel::new("bench/approle-hmac/v1").unwrap();
    g.throughput(Throughput::Elements(1));
    for (suffix, copies) in [("", keyvault_hsm::DEFAULT_SESSION_COPIES), ("_token_object", 0)] {
        let token = testing::token_with(|c| c.session_copies = copies);
        let keys: Arc<dyn KeyStore> = token.store.clone();
        keys.generate(&signing, KeyKind::Ed25519).unwrap();
        keys.generate(&aes, KeyKind::Aes256Gcm).unwrap();
        keys.generate(&hmac, KeyKind::HmacSha256).unwrap();
        g.bench_function(format!("softhsm_eddsa_sign{suffix}"), |b| {
            b.iter(|| keys.sign_ed25519(&signing, b"bench input").unwrap())
        });
        g.bench_function(format!("softhsm_aes_gcm_encrypt_32B{suffix}"), |b| {
            b.iter(|| keys.encrypt_aes_gcm(&aes, &[1u8; 32], b"").unwrap())
        });
        g.bench_function(format!("softhsm_hmac_sha256{suffix}"), |b| {
            b.iter(|| keys.hmac_sha256(&hmac, b"a secret id").unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
