//! Master key rotation while units keep reading and writing, on the embedded store (and
//! on PostgreSQL where a test holds a row lock to stop a start at one point).

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

/// The rotation test hook of debug builds (`KEYVAULT_TEST_HOLD_ROTATION`): a file that
/// holds the rotation once a number of records are re-wrapped.
struct Hold {
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

impl Hold {
    fn new() -> Hold {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hold");
        Hold { _dir: dir, file }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("KEYVAULT_TEST_HOLD_ROTATION".into(), self.file.display().to_string())]
    }

    /// Hold the rotation once `records` are re-wrapped.
    fn at(&self, records: u64) {
        std::fs::write(&self.file, records.to_string()).unwrap();
    }

    fn release(&self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Wait until the load made `n` more requests.
async fn ran(count: &AtomicU64, n: u64) {
    let start = count.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Relaxed) < start + n {
        assert!(std::time::Instant::now() < deadline, "the load does not run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
/// value that unit wrote; and reads of the `seeded` secrets of [`seed`]. Returns (stop
/// flag, request count, failures, handles).
fn load(
    c: &Client,
    root: &str,
    units: usize,
    seeded: usize,
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
                    let i = (n as usize * 7 + u) % seeded;
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
    let hold = Hold::new();
    let s = TestServer::start(ServerOptions { env: hold.env(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 400).await;
    assert_eq!(s.token_keys("keyvault/master/"), vec!["keyvault/master/v1"]);
    let (stop, count, failures, handles) = load(&c, &root, 8, 400);
    ran(&count, 30).await;

    for expected in [2, 3] {
        // Held at its start: the rotation is certainly running when the second start
        // comes, which is refused.
        hold.at(0);
        let r = ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
        assert_eq!(r.body["data"]["version"], expected);
        let again = ok(c.post("sys/rotate", Some(&root), json!({})).await, 409);
        assert!(again.body["errors"][0].as_str().unwrap().contains("already running"), "{again:?}");
        hold.release();
        let status = wait_idle(&c, &root).await;
        assert_eq!(status["active_version"], expected);
        assert_eq!(status["versions_in_use"], json!([expected]), "{status}");
        ran(&count, 30).await;
    }
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
    // Nothing left to retire.
    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([]));
    // Only `update` with `sudo` may rotate or retire: a token with everything else on
    // these paths is refused, and nothing happens.
    let all_but = r#"path "sys/rotate*" { capabilities = ["read", "create", "delete", "list", "sudo"] }"#;
    ok(c.put("sys/policies/acl/ro", &root, json!({ "policy": all_but })).await, 204);
    ok(c.post("auth/approle/role/ro", Some(&root), json!({"token_policies": ["ro"]})).await, 204);
    let sid = ok(c.post("auth/approle/role/ro/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ro = ok(c.post("auth", None, json!({"role": "ro", "secret_id": sid})).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in ["sys/rotate", "sys/rotate/retire", "sys/rotate/token-signing", "sys/rotate/token-signing/retire"] {
        ok(c.post(path, Some(&ro), json!({})).await, 403);
    }
    ok(c.get("sys/rotate/status", &ro).await, 200);
    assert_eq!(ok(c.get("sys/rotate/status", &root).await, 200).body["data"]["active_version"], 3);
    assert_eq!(ok(c.send("GET", "auth/jwks", None, None).await, 200).body["keys"].as_array().unwrap().len(), 1);
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(
        audit.contains("master key rotation to v2 started") && audit.contains("master key versions retired: [1, 2]")
    );
}

/// A start cut short at its worst point (killed right after its new version became
/// active: the older version not yet closed, no re-wrap recorded) is finished by the
/// restarted process once the start's claim expires: the re-wrap runs to the end and the
/// old version can be retired. (Before, the rotation stayed `starting` for good: nothing
/// re-wrapped, and retire refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_start_cut_short_after_its_new_version_is_finished_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash-now");
    let mut s = TestServer::start(ServerOptions {
        env: vec![("KEYVAULT_TEST_CRASH_ROTATION_START".into(), crash.display().to_string())],
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 300).await;
    std::fs::write(&crash, "").unwrap();
    let r = c.try_send("POST", "sys/rotate", Some(&root), Some(b"{}".to_vec())).await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status >= 500), "{r:?}");
    assert!(s.child.wait().unwrap().code().is_none(), "the server died of a signal");
    std::fs::remove_file(&crash).unwrap();
    s.restart();
    let c = s.client();
    version_2_alone_then_retire_1(&c, &root).await;
    for i in (0..300).step_by(37) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    assert!(s.log_text().contains("finishing a master key rotation that was cut short"));
}

/// Wait (up to 60 s) until version 2 is active, idle and the only one wrapping records;
/// then retire: version 1 goes.
async fn version_2_alone_then_retire_1(c: &Client, root: &str) {
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        last = ok(c.get("sys/rotate/status", root).await, 200).body["data"].clone();
        if last["active_version"] == 2 && last["versions_in_use"] == json!([2]) && last["state"] == "idle" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((&last["active_version"], &last["versions_in_use"]), (&json!(2), &json!([2])), "{last}");
    let r = ok(c.post("sys/rotate/retire", Some(root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1]), "{r:?}");
}

/// Sixteen retires at once, while reads go on: each answers 200 or 409, each old version
/// is retired by exactly one of them, the token keeps only the active version, and every
/// secret still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_retires_at_once_retire_each_version_once() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 50).await;
    for expected in [2, 3] {
        ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
        assert_eq!(wait_idle(&c, &root).await["versions_in_use"], json!([expected]));
    }
    let (stop, count, failures, handles) = load(&c, &root, 4, 50);
    ran(&count, 10).await;
    let retires: Vec<_> = (0..16)
        .map(|_| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(async move { c.post("sys/rotate/retire", Some(&root), json!({})).await })
        })
        .collect();
    let mut retired = Vec::new();
    for r in retires {
        let r = r.await.unwrap();
        assert!([200, 409].contains(&r.status), "{r:?}");
        if r.status == 200 {
            retired.extend(r.body["data"]["retired"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()));
        }
    }
    retired.sort_unstable();
    assert_eq!(retired, vec![1, 2], "each old version retired once");
    ran(&count, 10).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no request failed during the retires");
    assert_eq!(s.token_keys("keyvault/master/"), vec!["keyvault/master/v3"]);
    for i in (0..50).step_by(7) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    assert_eq!(ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200).body["data"]["retired"], json!([]));
}

/// A retire whose destroy fails (the token refuses it) after the keyring no longer lists
/// the version is finished by the next retire: the retired key does not stay in the token
/// for good. (Before, the next retire found nothing to retire and the key stayed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retire_cut_short_is_finished_by_the_next() {
    let fault = keyvault_tests::TokenFault::new();
    let s = TestServer::start(ServerOptions { env: vec![fault.env()], ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 50).await;
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
    let status = wait_idle(&c, &root).await;
    assert_eq!(status["versions_in_use"], json!([2]), "{status}");
    let master = || {
        let mut v = s.token_keys("keyvault/master/");
        v.sort();
        v
    };
    assert_eq!(master().len(), 2);
    fault.set("error destroy");
    assert_eq!(c.post("sys/rotate/retire", Some(&root), json!({})).await.status, 503);
    fault.set("");
    ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(master(), vec!["keyvault/master/v2".to_owned()]);
    assert_eq!(ok(c.get("secret/seed/7", &root).await, 200).body["data"]["value"], "seed-7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_interrupted_by_kill_9_resumes_after_restart() {
    let hold = Hold::new();
    let mut s = TestServer::start(ServerOptions { env: hold.env(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 3000).await;
    // Held after its first 1000 records: killed for certain in the middle of the re-wrap.
    hold.at(1000);
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
    let mut caught = None;
    for _ in 0..600 {
        let st = ok(c.get("sys/rotate/status", &root).await, 200).body["data"].clone();
        if st["records_done"].as_u64().unwrap() >= 1000 {
            caught = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = caught.expect("the rotation reached its checkpoint");
    assert_eq!(st["state"], "rewrapping");
    let done = st["records_done"].as_u64().unwrap();
    assert!(done < 3000 && st["records_remaining"] == 3000 - done, "{st}");
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    hold.release();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotation_by_age_and_by_encryptions() {
    let mut s = TestServer::start(ServerOptions {
        extra: "[rotation]\nmaster_max_age = \"30d\"\nmaster_max_encryptions = 20\ncheck_interval = \"1s\"\n".into(),
        settable_clock: true,
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    let active = |c: Client, root: String| async move {
        ok(c.get("sys/rotate/status", &root).await, 200).body["data"]["active_version"].as_u64().unwrap()
    };
    let wait_for_version = |c: Client, root: String, v: u64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = ok(c.get("sys/rotate/status", &root).await, 200).body["data"].clone();
            if st["active_version"] == v && st["state"] == "idle" {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no automatic rotation to v{v}: {st}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // Below both limits: nothing happens.
    seed(&c, &root, 10).await;
    assert_eq!(active(c.clone(), root.clone()).await, 1);
    // More records sealed under v1 than allowed: a rotation starts by itself.
    for i in 0..15 {
        ok(c.put(&format!("secret/more/{i}"), &root, json!({"value": "v"})).await, 200);
    }
    wait_for_version(c.clone(), root.clone(), 2).await;
    // The active version grows older than allowed: another one. (A month on, the root
    // token has expired: a watcher logs in then, with a secret id that does not expire.)
    let watch = r#"path "sys/rotate/status" { capabilities = ["read"] }"#;
    ok(c.put("sys/policies/acl/watch", &root, json!({ "policy": watch })).await, 204);
    ok(
        c.post("auth/approle/role/watcher", Some(&root), json!({"token_policies": ["watch"], "secret_id_ttl": 0}))
            .await,
        204,
    );
    let sid =
        ok(c.post("auth/approle/role/watcher/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    s.advance_clock(31 * 24 * 3600);
    let watcher =
        ok(c.post("auth", None, json!({"role": "watcher", "secret_id": sid})).await, 200).body["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_owned();
    wait_for_version(c.clone(), watcher.clone(), 3).await;
    assert!(s.log_text().contains("automatic master key rotation started"));
    // No request asked for these rotations: the audit log has an event for each.
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    let started: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "master_rotation_started")
        .collect();
    assert_eq!(started.len(), 2, "{started:?}");
    assert!(started.iter().all(|e| e["automatic"] == true), "{started:?}");
    let st = ok(c.get("sys/rotate/status", &watcher).await, 200).body["data"].clone();
    assert_eq!(st["records_by_version"], json!({"3": 25}), "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_command_shows_progress_and_retires() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 300).await;
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "rotate", "--retire", "--address", &s.addr, "--ca-file"])
        .arg(&s.server_ca_file)
        .env("KEYVAULT_TOKEN", &root)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("master key v2 is active; re-wrapping stored data keys"), "{stdout}");
    // The progress line: percentage, records done of all, rate, versions in use.
    let progress = stderr.split('\r').map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default().to_owned();
    assert!(progress.starts_with("100.0%") && progress.contains("300/300 records"), "{stderr:?}");
    assert!(stdout.contains("re-wrap finished") && stdout.contains("retired master key versions [1]"), "{stdout}");
    assert_eq!(s.token_keys("keyvault/master/"), vec!["keyvault/master/v2"]);
    // Without a token: a clear error, exit status 1.
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "rotate", "--address", &s.addr, "--ca-file"])
        .arg(&s.server_ca_file)
        .env_remove("KEYVAULT_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("POST /v1/sys/rotate: 401: missing client token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_token_signing_version_verifies_nothing_any_more() {
    let mut s = TestServer::start(ServerOptions { settable_clock: true, ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    // An administrator who can log in later (a secret id that does not expire).
    let admin = r#"path "sys/rotate/*" { capabilities = ["update", "sudo"] }"#;
    ok(c.put("sys/policies/acl/admin", &root, json!({ "policy": admin })).await, 204);
    ok(
        c.post("auth/approle/role/admin", Some(&root), json!({"token_policies": ["admin"], "secret_id_ttl": 0})).await,
        204,
    );
    let sid =
        ok(c.post("auth/approle/role/admin/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let login = || c.post("auth", None, json!({"role": "admin", "secret_id": sid}));
    let old = ok(login().await, 200).body["auth"]["client_token"].as_str().unwrap().to_owned();
    ok(c.post("sys/rotate/token-signing", Some(&old), json!({})).await, 200);
    ok(c.post("sys/rotate/token-signing/retire", Some(&old), json!({})).await, 409);
    // Once the longest token lifetime has passed, retiring works...
    s.advance_clock(7 * 24 * 3600 + 60);
    let fresh = ok(login().await, 200).body["auth"]["client_token"].as_str().unwrap().to_owned();
    let r = ok(c.post("sys/rotate/token-signing/retire", Some(&fresh), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1]));
    assert_eq!(s.token_keys("keyvault/token-signing/"), vec!["keyvault/token-signing/v2"]);
    let jwks = ok(c.send("GET", "auth/jwks", None, None).await, 200);
    assert_eq!(jwks.body["keys"].as_array().unwrap().len(), 1);
    // ...and a token v1 signed is refused for its key, not only for its age.
    ok(c.get("auth/token/lookup-self", &old).await, 401);
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(audit.contains("\"reason\":\"unknown_signing_key\""), "the refusal names the retired key");
    ok(c.get("auth/token/lookup-self", &fresh).await, 200);
}

/// A rotation start slower than its lease (the token takes 12 s to make the new master
/// key; meanwhile the driver takes the start for one cut short before its version was made
/// and puts the record back to idle) still records its re-wrap once the version is made:
/// the rotation runs to the end and the old version can be retired. (Before, the start
/// answered 500 and left the new version active with no re-wrap and the old one open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_start_slower_than_its_lease_still_rewraps() {
    let fault = keyvault_tests::TokenFault::new();
    let s = TestServer::start(ServerOptions {
        env: vec![fault.env()],
        hsm_extra: "call_timeout = \"60s\"".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    for i in 0..5 {
        ok(c.put(&format!("secret/slow/{i}"), &root, json!({"value": format!("v{i}")})).await, 200);
    }
    fault.set("slow 12000 generate");
    let r = ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
    fault.set("");
    assert_eq!(r.body["data"]["version"], 2);
    let st = keyvault_tests::wait_rotation_idle(&c, &root).await;
    assert_eq!(st["active_version"], 2, "{st}");
    assert_eq!(st["records_remaining"], 0, "{st}");
    assert!(st["records_by_version"].get("1").is_none(), "{st}");
    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1]));
    for i in 0..5 {
        assert_eq!(ok(c.get(&format!("secret/slow/{i}"), &root).await, 200).body["data"]["value"], format!("v{i}"));
    }
    let log = s.log_text();
    assert!(
        log.contains("a master key rotation was cut short before its new version was made"),
        "the driver took the start over"
    );
    assert!(log.contains("its re-wrap is recorded"), "the start recorded its re-wrap afterwards");
}

/// A start slower than its lease that dies once its version is made, after the driver put
/// its claim back to `idle`: no `starting` claim is left to finish, the new version is
/// active and the old one still open and wrapping records. The driver (after the restart)
/// sees that no re-wrap was recorded to the active version and records it; the rotation
/// runs to the end and the old version can be retired. (Before, it stayed so for good:
/// retire refused with "rotate first".)
/// Both where the start dies before it closes the older versions and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_made_with_no_rewrap_recorded_is_rewrapped_by_the_driver() {
    version_made_with_no_rewrap_recorded("KEYVAULT_TEST_CRASH_ROTATION_START").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_made_and_the_older_closed_with_no_rewrap_recorded_is_rewrapped_by_the_driver() {
    version_made_with_no_rewrap_recorded("KEYVAULT_TEST_CRASH_ROTATION_CLOSED").await;
}

async fn version_made_with_no_rewrap_recorded(crash_at: &str) {
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash-now");
    let fault = keyvault_tests::TokenFault::new();
    let mut s = TestServer::start(ServerOptions {
        env: vec![fault.env(), (crash_at.into(), crash.display().to_string())],
        hsm_extra: "call_timeout = \"60s\"".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 50).await;
    fault.set("slow 12000 generate");
    std::fs::write(&crash, "").unwrap();
    let r = c.try_send("POST", "sys/rotate", Some(&root), Some(b"{}".to_vec())).await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status >= 500), "{r:?}");
    assert!(s.child.wait().unwrap().code().is_none(), "the server died of a signal");
    let log = s.log_text();
    assert!(log.contains("a master key rotation was cut short before its new version was made"), "{log}");
    std::fs::remove_file(&crash).unwrap();
    fault.set("");
    s.restart();
    let c = s.client();
    version_2_alone_then_retire_1(&c, &root).await;
    for i in (0..50).step_by(7) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    assert!(s.log_text().contains("which no rotation had recorded"));
}

/// Two starts, each cut short, the second claimed after the first made its version: a
/// slow start S (a token call past the lease) is put back to `idle` by the driver before
/// v2 is made; S makes v2 and is held (a row lock on a v1 counter, on PostgreSQL) before
/// it records its re-wrap; a second start B claims the record, naming v2 as the version
/// active at its claim, and the server is killed while B makes its own version. After the
/// restart the driver puts B's claim back to `idle`, which must not name v2 as re-wrapped
/// to: it gets its re-wrap recorded, and v1 can be retired. (Before, the `idle` record
/// named v2, nothing recorded a re-wrap to it, and retire refused with "rotate first"
/// until the next rotation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_claimed_after_a_slow_start_made_its_version_and_then_killed_leaves_it_rewrapped() {
    let pg = keyvault_tests::postgres::TestPostgres::start();
    let url = pg.database("twostarts");
    let fault = keyvault_tests::TokenFault::new();
    let mut s = TestServer::start(ServerOptions {
        env: vec![fault.env()],
        hsm_extra: "call_timeout = \"60s\"".into(),
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 8")),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    seed(&c, &root, 40).await;
    let (psql, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let counter: String = psql
        .query_one("SELECT key FROM keyvault_counters WHERE key LIKE 'master/v1/%' ORDER BY key LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    // Closing v1 takes its counters in key order: the first one held stops every close.
    psql.batch_execute(&format!("BEGIN; SELECT 1 FROM keyvault_counters WHERE key = '{counter}' FOR UPDATE"))
        .await
        .unwrap();
    fault.set("slow 13000 generate");
    let slow = {
        let (c, root) = (c.clone(), root.clone());
        tokio::spawn(async move { c.try_send("POST", "sys/rotate", Some(&root), Some(b"{}".to_vec())).await })
    };
    keyvault_tests::wait_for(Duration::from_secs(30), "the driver to put the slow start back", || {
        s.log_text().contains("a master key rotation was cut short before its new version was made")
    })
    .await;
    // S made v2 and waits to close v1 (so may the driver, repairing).
    keyvault_tests::postgres::wait_for_a_lock_wait(&psql, "closing v1").await;
    let second = {
        let (c, root) = (c.clone(), root.clone());
        tokio::spawn(async move { c.try_send("POST", "sys/rotate", Some(&root), Some(b"{}".to_vec())).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let raw: Vec<u8> =
            psql.query_one("SELECT value FROM keyvault_kv WHERE key = 'sys/rotation'", &[]).await.unwrap().get(0);
        let record: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        if record["state"] == "starting" {
            // B's claim: taken with v2 active, the re-wrap last recorded to none.
            assert_eq!((&record["claimed_at"], &record["target"]), (&json!(2), &json!(0)), "{record}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the second start never claimed the record: {record}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B is making its version (13 s in the token): kill -9.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    for r in [slow.await.unwrap(), second.await.unwrap()] {
        assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status >= 500), "{r:?}");
    }
    psql.batch_execute("ROLLBACK").await.unwrap();
    fault.set("");
    s.restart();
    let c = s.client();
    version_2_alone_then_retire_1(&c, &root).await;
    for i in (0..40).step_by(7) {
        assert_eq!(ok(c.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"], format!("seed-{i}"));
    }
    let log = s.log_text();
    assert!(log.contains("which no rotation had recorded"), "the driver's repair recorded the re-wrap: {log}");
}
