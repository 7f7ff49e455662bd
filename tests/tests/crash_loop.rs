//! Crash safety at random moments: 100 times, a mixed stream of secret writes, transit
//! encryptions, transit key rotations and master key rotations runs against the server,
//! which is killed with SIGKILL at a random moment and started again on the same data.
//! Afterwards every acknowledged write reads back with its value, every acknowledged
//! ciphertext decrypts to its plaintext, the master key rotation in progress finishes, the
//! token holds every key version the state names, and the audit log verifies.
//! `KEYVAULT_CRASH_ITERATIONS` changes the count (docs/RELIABILITY.md has the figures).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, json, random_u64, wait_rotation_idle};

#[derive(Default)]
struct Acknowledged {
    writes: Vec<(String, String)>,
    ciphertexts: Vec<(String, String)>,
    statuses: std::collections::BTreeMap<u16, u64>,
    connection_errors: u64,
}

/// One request of the stream; a reply is recorded, a connection error (the server was
/// killed under it) is counted.
async fn send(c: &Client, acked: &Mutex<Acknowledged>, method: &str, path: &str, root: &str, body: serde_json::Value) {
    let r = c.try_send(method, path, Some(root), Some(body.to_string().into_bytes())).await;
    let mut a = acked.lock().unwrap();
    match r {
        Ok(r) => {
            *a.statuses.entry(r.status).or_insert(0) += 1;
            if r.status == 200 && path.starts_with("secret/") {
                a.writes.push((path.to_owned(), body["value"].as_str().unwrap().to_owned()));
            }
            if r.status == 200 && path.starts_with("transit/encrypt/") {
                let ct = r.body["data"]["ciphertext"].as_str().unwrap().to_owned();
                a.ciphertexts.push((ct, body["plaintext"].as_str().unwrap().to_owned()));
            }
        }
        Err(_) => a.connection_errors += 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_kill_9_at_random_moments_lose_nothing_acknowledged() {
    let iterations: u64 = std::env::var("KEYVAULT_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let mut s = TestServer::start(ServerOptions::default());
    let root = s.root.clone();
    assert_eq!(s.client().post("transit/keys/k", Some(&root), json!({})).await.status, 200);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let started = Instant::now();
    let mut rotations_started = 0;
    for iter in 0..iterations {
        let c = s.client();
        // A master key rotation now and then; one that runs across kills resumes.
        if iter % 10 == 3 {
            let r = c.try_send("POST", "sys/rotate", Some(&root), Some(b"{}".to_vec())).await;
            if r.as_ref().is_ok_and(|r| r.status == 200) {
                rotations_started += 1;
            }
        }
        let mut tasks = Vec::new();
        for w in 0..3u64 {
            let (c, acked, root) = (c.clone(), acked.clone(), root.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..10_000u64 {
                    let path = format!("secret/crash/{iter}/{w}/{n}");
                    let value = format!("v-{iter}-{w}-{n}-{:x}", random_u64());
                    send(&c, &acked, "PUT", &path, &root, json!({"value": value})).await;
                    if acked.lock().unwrap().connection_errors > 0 {
                        return;
                    }
                }
            }));
        }
        {
            let (c, acked, root) = (c.clone(), acked.clone(), root.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0..10_000u64 {
                    if n % 7 == 6 {
                        send(&c, &acked, "POST", "transit/keys/k/rotate", &root, json!({})).await;
                    } else {
                        let plaintext = STANDARD.encode(format!("p-{iter}-{n}-{:x}", random_u64()));
                        send(&c, &acked, "POST", "transit/encrypt/k", &root, json!({"plaintext": plaintext})).await;
                    }
                    if acked.lock().unwrap().connection_errors > 0 {
                        return;
                    }
                }
            }));
        }
        // Kill at a random moment 20-600 ms into the stream.
        tokio::time::sleep(Duration::from_millis(20 + random_u64() % 580)).await;
        s.child.kill().unwrap();
        s.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        acked.lock().unwrap().connection_errors = 0;
        s.restart();
    }
    let elapsed = started.elapsed();

    let c = s.client();
    let a = std::mem::take(&mut *acked.lock().unwrap());
    for status in a.statuses.keys() {
        assert!(matches!(status, 200 | 204 | 409 | 503), "a request answered {status}: {:?}", a.statuses);
    }
    assert!(a.writes.len() as u64 > iterations, "too few writes were acknowledged: {}", a.writes.len());
    for (path, value) in &a.writes {
        let r = c.get(path, &root).await;
        assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some(value.as_str())), "{path}: {r:?}");
    }
    for (ct, pt) in &a.ciphertexts {
        let r = c.post("transit/decrypt/k", Some(&root), json!({"ciphertext": ct})).await;
        assert_eq!((r.status, r.body["data"]["plaintext"].as_str()), (200, Some(pt.as_str())), "{ct}: {r:?}");
    }
    // The rotation that was running at the last kill finishes.
    let status = wait_rotation_idle(&c, &root).await;
    // Every master and transit key version the state names is in the token.
    let key = c.get("transit/keys/k", &root).await;
    assert_eq!(key.status, 200);
    let latest = key.body["data"]["latest_version"].as_u64().unwrap();
    let objects = s.token_keys("keyvault/");
    for v in 1..=latest {
        let label = format!("keyvault/transit/k/v{v}");
        assert!(objects.contains(&label), "transit key version {v} is missing from the token: {objects:?}");
    }
    let active = status["active_version"].as_u64().unwrap();
    let mut master: Vec<u64> =
        status["versions_in_use"].as_array().unwrap().iter().filter_map(|v| v.as_u64()).collect();
    master.push(active);
    for v in master {
        let label = format!("keyvault/master/v{v}");
        assert!(objects.contains(&label), "master key version {v} is missing from the token: {objects:?}");
    }
    let summary = format!(
        "{iterations} kills in {:.0} s: {} writes and {} encryptions acknowledged and checked, transit key at v{latest}, {rotations_started} master rotations started, statuses {:?}, rotation {status}",
        elapsed.as_secs_f64(),
        a.writes.len(),
        a.ciphertexts.len(),
        a.statuses
    );
    // A clean stop, then the whole audit chain (across every kill) verifies.
    s.stop();
    let (verified, report) = s.verify_audit_log();
    assert!(verified, "the audit log does not verify after {iterations} kills: {report}");
    println!("{summary}; audit: {report}");
}
