//! Criterion: audit entries appended per second, waiting for durability (fail_closed), with
//! one appender (one fsync per entry) and with 64 concurrent appenders (the writer batches
//! them into one write and one fsync).
//!
//!     cargo bench -p keyvault --bench audit
#![allow(clippy::unwrap_used)] // benchmark set-up

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keyvault::audit::{AuditConfig, AuditLog, event};
use keyvault::keys::KeyNames;
use keyvault_hsm::KeyStore;
use keyvault_hsm::softhsm::testing;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let token = testing::token();
    let keys: Arc<dyn KeyStore> = token.store.clone();
    let names = KeyNames::new("keyvault").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AuditConfig::at(dir.path().join("audit.log"));
    config.max_file_bytes = u64::MAX;
    keys.generate(&names.audit_signing(), keyvault_hsm::KeyKind::Ed25519).unwrap();
    keys.generate(&names.audit_hmac(), keyvault_hsm::KeyKind::HmacSha256).unwrap();
    let log = rt.block_on(AuditLog::open(&config, &keys, &names)).unwrap();
    let entry = || {
        event(
            "request",
            serde_json::json!({"request_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "operation": "GET /v1/secret/{*path}",
                "path": "/v1/secret/app/db", "status": 200, "outcome": "ok", "remote": "127.0.0.1:50000",
                "identity": {"sub": "approle:app", "accessor": "39f0c4fa9df34bd794ee199b1ff8059a"},
                "token_hmac": "hmac-sha256:2545ebeee96a1bcc6f2126a8e632f2e3ef49e5634ac0032ad7d394c11fe31542"}),
        )
    };
    let mut g = c.benchmark_group("audit");
    for concurrency in [1usize, 64] {
        g.throughput(Throughput::Elements(concurrency as u64));
        g.bench_function(format!("append_durable_{concurrency}_concurrent"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..concurrency {
                            let log = log.clone();
                            let e = entry();
                            set.spawn(async move { log.append(e).await.unwrap() });
                        }
                        // A failed append (or a panic in a task) fails the benchmark
                        // rather than being timed as if it had succeeded.
                        while let Some(done) = set.join_next().await {
                            done.expect("append task");
                        }
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    rt.block_on(log.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
