//! Master key rotation (issue 6), in one process and one run: the token's raw
//! unwrap-then-wrap rate (one data key unwrapped under master v1 and wrapped under v2,
//! back to back on one thread, the work a re-wrap cannot avoid), then a real rotation of
//! `ROTATION_RECORDS` (default 100,000) stored secrets driven to the end, and the ratio.
//!
//!     taskset -c 0 cargo bench -p keyvault --bench rotation
//!
//! Storage is sled in a temporary directory (`ROTATION_STORE=postgres` with
//! `ROTATION_PG_URL` for PostgreSQL); the token is a fresh SoftHSM token. The server-level
//! figures (re-wrap rate and read latency under HTTP load) are `scripts/bench-rotation.sh`.
#![allow(clippy::unwrap_used, clippy::print_stdout)] // benchmark set-up and report

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyvault::barrier::Barrier;
use keyvault::keys::{self, Family, KeyNames, KeyVersion, SharedKeyring};
use keyvault::rotation::Rotation;
use keyvault::secrets::{SecretPath, Secrets};
use keyvault::store::{PostgresOptions, PostgresStore, SledStore, Store};
use keyvault_hsm::KeyStore;
use keyvault_hsm::softhsm::testing;

const RAW_SECONDS: f64 = 3.0;

fn main() {
    // `cargo bench` passes `--bench`; any filter argument is ignored.
    let records: usize = std::env::var("ROTATION_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let token = testing::token();
    let keys: Arc<dyn KeyStore> = token.store.clone();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = match std::env::var("ROTATION_STORE").as_deref() {
        Ok("postgres") => {
            let url = std::env::var("ROTATION_PG_URL").expect("ROTATION_PG_URL");
            let options = PostgresOptions { url, password: None, tls_ca_file: None, pool_size: 16 };
            Arc::new(rt.block_on(PostgresStore::open(&options)).unwrap())
        }
        _ => Arc::new(SledStore::open(dir.path()).unwrap()),
    };
    let names = KeyNames::new("keyvault").unwrap();
    let ring = rt.block_on(keys::initialize(store.as_ref(), &keys, &names)).unwrap();
    rt.block_on(keyvault::usage::ensure_counted(store.as_ref(), keyvault::secrets::data_prefix())).unwrap();
    let keyring = SharedKeyring::new(ring, store.clone());
    let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone());
    let secrets = Arc::new(Secrets::new(store.clone(), barrier.clone(), 100));
    let rotation = Rotation::new(store.clone(), keys.clone(), names.clone(), keyring, barrier);

    // The stored secrets, 64 writers at a time (their fsyncs are shared).
    let t0 = Instant::now();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..64 {
            let secrets = secrets.clone();
            set.spawn(async move {
                for i in (w..records).step_by(64) {
                    let path = SecretPath::parse(&format!("bench/rotation/{i:07}")).unwrap();
                    secrets.write(&path, format!("{{\"value\":\"value-{i}\"}}").as_bytes()).await.unwrap();
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
    println!("rotation/setup: {records} secrets written in {:.1} s", t0.elapsed().as_secs_f64());

    // Raw: unwrap under v1, wrap under v2, one thread, no storage.
    rt.block_on(keys::add_version(store.as_ref(), &keys, &names, Family::Master)).unwrap();
    let (v1, v2) = (names.master(KeyVersion::FIRST), names.master(KeyVersion::FIRST.next()));
    let aad = b"secret/bench/rotation/0000001\x001".to_vec();
    let wrapped = keys.wrap_key(&v1, &[7u8; 32], &aad).unwrap();
    let raw = || {
        let t0 = Instant::now();
        let mut ops = 0u64;
        while t0.elapsed().as_secs_f64() < RAW_SECONDS {
            let dek = keys.unwrap_key(&v1, &wrapped, &aad).unwrap();
            std::hint::black_box(keys.wrap_key(&v2, &dek, &aad).unwrap());
            ops += 1;
        }
        ops as f64 / t0.elapsed().as_secs_f64()
    };
    let raw_before = raw();
    println!("rotation/raw_unwrap_wrap_before: {raw_before:.0} records/s (one thread, SoftHSM)");

    // The rotation itself, driven to the end as the background driver would.
    let t0 = Instant::now();
    let rate = rt.block_on(async {
        let target = rotation.start().await.unwrap();
        assert_eq!(target.get(), 3);
        while rotation.step().await.unwrap() {}
        let elapsed = t0.elapsed().as_secs_f64();
        let status = rotation.status().await.unwrap();
        assert_eq!(status.versions_in_use, vec![3], "every record re-wrapped to v3");
        assert_eq!(status.state, "idle");
        records as f64 / elapsed
    });
    let elapsed = t0.elapsed().as_secs_f64();
    // The token's rate drifts on a shared machine: measure it on both sides.
    let raw_after = raw();
    println!("rotation/raw_unwrap_wrap_after: {raw_after:.0} records/s (one thread, SoftHSM)");
    let raw_rate = (raw_before + raw_after) / 2.0;
    println!(
        "rotation/rewrap: {records} records in {elapsed:.1} s: {rate:.0} records/s = {:.0}% of the raw rate ({raw_rate:.0}/s)",
        rate * 100.0 / raw_rate
    );
    drop((secrets, rotation));
    std::thread::sleep(Duration::from_millis(10));
}
