//! Master key rotation while units keep reading and writing, on the embedded store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

async fn wait_idle(c: &Client, root: &str) -> serde_json::Value {
    for _ in 0..600 {
        let r = ok(c.get("sys/rotate/status", root).await, 200);
        if r.body["data"]["state"] == "idle" {
            return r.body["data"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the rotation did not finish");
}

async fn seed(c: &Client, root: &str, n: usize) {
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (c, root) = (c.clone(), root.to_owned());
            tokio::spawn(async move {
                for i in (t..n).step_by(16) {
                    ok(c.put(&format!("secret/seed/{i}"), &root, json!({"value": format!("seed-{i}")})).await, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Units writing and reading their own secrets in a loop; every read must return the last
/// value that unit wrote. Returns (stop flag, request count, failures, handles).
fn load(
    c: &Client,
    root: &str,
    units: usize,
) -> (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (count, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handles = (0..units)
        .map(|u| {
            let (c, root, stop, count, failures) =
                (c.clone(), root.to_owned(), stop.clone(), count.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let path = format!("secret/unit-{u}/config");
                    let value = format!("unit-{u}-value-{n}");
                    let w = c
                        .try_send("PUT", &path, Some(&root), Some(json!({ "value": value }).to_string().into_bytes()))
                        .await;
                    let r = c.try_send("GET", &path, Some(&root), None).await;
                    let good = matches!(&w, Ok(w) if w.status == 200)
                        && matches!(&r, Ok(r) if r.status == 200 && r.body["data"]["value"] == value.as_str());
                    if !good {
                        eprintln!("unit {u}: write {:?} read {:?}", w.map(|x| x.status), r.map(|x| (x.status, x.body)));
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    count.fetch_add(2, Ordering::Relaxed);
                    // Reads of the seeded secrets, older than any rotation.
                    let i = (n as usize * 7 + u) % 400;
                    match c.try_send("GET", &format!("secret/seed/{i}"), Some(&root), None).await {
                        Ok(r) if r.status == 200 && r.body["data"]["value"] == format!("seed-{i}").as_str() => {}
                        other => {
                            eprintln!("seed {i}: {other:?}");
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    (stop, count, failures, handles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_twice_under_load_then_retire_on_sled() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 400).await;
    assert_eq!(s.token_keys("keyvault/master/"), vec!["keyvault/master/v1"]);
    let (stop, count, failures, handles) = load(&c, &root, 8);
    tokio::time::sleep(Duration::from_millis(500)).await;

    for expected in [2, 3] {
        let r = ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
        assert_eq!(r.body["data"]["version"], expected);
        // A second rotation while this one runs is refused.
        let again = c.post("sys/rotate", Some(&root), json!({})).await;
        assert!(again.status == 409 || again.status == 200 && expected == 3, "{again:?}");
        let status = wait_idle(&c, &root).await;
        assert_eq!(status["active_version"], expected);
        assert_eq!(status["versions_in_use"], json!([expected]), "{status}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed during the rotations");
    assert!(count.load(Ordering::Relaxed) > 100, "the load ran: {}", count.load(Ordering::Relaxed));

    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1, 2]));
    assert_eq!(
        s.token_keys("keyvault/master/"),
        vec!["keyvault/master/v3"],
        "old master keys are destroyed in the token"
    );
    // Everything still reads, under v3 only.
    for i in (0..400).step_by(37) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    // Nothing left to retire; only sudo may rotate.
    ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    ok(
        c.put("sys/policies/acl/ro", &root, json!({"policy": "path \"sys/rotate\" { capabilities = [\"read\"] }"}))
            .await,
        204,
    );
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(
        audit.contains("master key rotation to v2 started") && audit.contains("master key versions retired: [1, 2]")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_interrupted_by_kill_9_resumes_after_restart() {
    let mut s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 3000).await;
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
    // Kill while the re-wrap is under way.
    let mut killed_at = None;
    for _ in 0..400 {
        let st = ok(c.get("sys/rotate/status", &root).await, 200).body["data"].clone();
        if st["records_done"].as_u64().unwrap() > 0 && st["state"] == "rewrapping" {
            killed_at = Some(st["records_remaining"].as_u64().unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let remaining = killed_at.expect("caught the rotation half way");
    assert!(remaining > 0);
    s.restart();
    let c = s.client();
    // The restarted process takes the lease over once it expires, and finishes.
    let status = wait_idle(&c, &root).await;
    assert_eq!(status["versions_in_use"], json!([2]), "{status}");
    for i in (0..3000).step_by(101) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    assert!(s.log_text().contains("taking over the master key rotation"));
}

#[tokio::test]
async fn token_signing_rotation_keeps_old_tokens_valid() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let jwks = ok(c.send("GET", "auth/jwks", None, None).await, 200);
    assert_eq!(jwks.body["keys"].as_array().unwrap().len(), 1);
    ok(c.post("sys/rotate/token-signing", Some(&root), json!({})).await, 200);
    let jwks = ok(c.send("GET", "auth/jwks", None, None).await, 200);
    assert_eq!(jwks.body["keys"].as_array().unwrap().len(), 2);
    assert_eq!(jwks.body["keys"][1]["kid"], "v2");
    // The root token was signed with v1 and still works; new tokens are signed with v2.
    ok(c.put("secret/x", &root, json!({"value": "v"})).await, 200);
    ok(c.post("auth/approle/role/r", Some(&root), json!({"token_policies": ["default"]})).await, 204);
    let sid = c.post("auth/approle/role/r/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = ok(c.post("auth", None, json!({"role": "r", "secret_id": sid})).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, t.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], "v2");
    // Retiring v1 now would break live tokens: refused.
    ok(c.post("sys/rotate/token-signing/retire", Some(&root), json!({})).await, 409);
}
