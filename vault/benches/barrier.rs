//! Criterion: barrier seal/open with the data key wrapped in a real SoftHSM token, next
//! to the raw operations it is made of (token wrap/unwrap, in-process AES-256-GCM).
//!
//!     cargo bench -p keyvault --bench barrier
//!
//! Results and their interpretation: docs/PERFORMANCE.md.
#![allow(clippy::unwrap_used)] // benchmark set-up

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keyvault::barrier::{Barrier, decrypt_value, encrypt_value};
use keyvault::keys::{self, KeyNames, KeyVersion, SharedKeyring};
use keyvault::secrets::{SecretPath, record_context};
use keyvault::store::{SledStore, Store};
use keyvault_hsm::KeyStore;
use keyvault_hsm::softhsm::testing;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let token = testing::token();
    let keys: Arc<dyn KeyStore> = token.store.clone();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let names = KeyNames::new("keyvault").unwrap();
    let ring = rt.block_on(keys::initialize(store.as_ref(), &keys, &names)).unwrap();
    let barrier = Barrier::new(keys.clone(), names.clone(), SharedKeyring::new(ring, store));
    let path = SecretPath::parse("bench/value").unwrap();
    let ctx = record_context(&path, 1);
    let value = vec![b'x'; 1024];
    let sealed = rt.block_on(barrier.seal(&ctx, &value)).unwrap();
    let kek = names.master(KeyVersion::FIRST);
    let dek = [7u8; 32];
    let wrapped = keys.wrap_key(&kek, &dek, b"aad").unwrap();

    let mut g = c.benchmark_group("barrier");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal_1KiB", |b| b.iter(|| rt.block_on(barrier.seal(&ctx, &value)).unwrap()));
    g.bench_function("open_1KiB", |b| b.iter(|| rt.block_on(barrier.open(&ctx, &sealed)).unwrap()));
    g.bench_function("token_wrap_32B", |b| b.iter(|| keys.wrap_key(&kek, &dek, b"aad").unwrap()));
    g.bench_function("token_unwrap_32B", |b| b.iter(|| keys.unwrap_key(&kek, &wrapped, b"aad").unwrap()));
    let nonce = [1u8; 12];
    let ct = encrypt_value(&dek, &nonce, b"aad", &value).unwrap();
    g.bench_function("aes_gcm_encrypt_1KiB_in_process", |b| {
        b.iter(|| encrypt_value(&dek, &nonce, b"aad", &value).unwrap())
    });
    g.bench_function("aes_gcm_decrypt_1KiB_in_process", |b| {
        b.iter(|| decrypt_value(&dek, &nonce, b"aad", &ct).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
