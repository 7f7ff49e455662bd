//! Faults in the PKCS#11 module, injected under the server's key store (debug builds honour
//! `KEYVAULT_TEST_TOKEN_FAULT=<file>`: vault/src/faults.rs): a failing device, a hung call,
//! slow calls, calls failing at random, and a token that goes away and comes back. In each
//! case the server stays up, answers what needs the token with 503 and a reason, serves
//! what does not, says why in health, and recovers when the fault ends.

use std::path::Path;
use std::time::{Duration, Instant};

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, json, wait_for};
use serde_json::Value;

const UNAVAILABLE: &str = "the key store (HSM) is unavailable, retry later";

fn set(fault: &Path, mode: &str) {
    std::fs::write(fault, mode).unwrap();
}

/// A server whose key store calls read their fault from a file (empty: none), with
/// `options` for the rest; the directory holding the file, and the file.
fn with_faults(options: ServerOptions) -> (TestServer, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    set(&fault, "");
    let env = vec![("KEYVAULT_TEST_TOKEN_FAULT".into(), fault.display().to_string())];
    (TestServer::start(ServerOptions { env, ..options }), dir, fault)
}

/// Every secret `secret/r/<i>` of `0..n` reads back its value `v<i>`.
async fn read_back(c: &Client, root: &str, n: usize) {
    for i in 0..n {
        let r = c.get(&format!("secret/r/{i}"), root).await;
        assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some(format!("v{i}").as_str())), "{r:?}");
    }
}

async fn encrypt(c: &Client, root: &str) -> (u16, Value) {
    let r = c.post("transit/encrypt/k", Some(root), json!({"plaintext": "aGk="})).await;
    (r.status, r.body)
}

async fn health(c: &Client) -> (u16, Option<String>) {
    let h = c.send("GET", "sys/health", None, None).await;
    (h.status, h.body["hsm"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hung_slow_or_flaky_token_is_a_503_with_a_reason_and_the_server_recovers() {
    let (s, _dir, fault) =
        with_faults(ServerOptions { hsm_extra: "call_timeout = \"2s\"".into(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(c.put("secret/a", &root, json!({"value": "v"})).await.status, 200);
    assert_eq!(c.post("transit/keys/k", Some(&root), json!({})).await.status, 200);
    assert_eq!(c.post("transit/keys/r", Some(&root), json!({})).await.status, 200);
    assert_eq!(encrypt(&c, &root).await.0, 200);
    assert_eq!(health(&c).await, (200, Some("ok".into())));

    // The device fails: what needs the token is 503 with the reason; secrets are served
    // from the epoch key in memory (reads and writes make no token call).
    set(&fault, "error");
    let (status, body) = encrypt(&c, &root).await;
    assert_eq!((status, body["errors"][0].as_str()), (503, Some(UNAVAILABLE)), "{body}");
    let r = c.post("auth/token/create", Some(&root), json!({"policies": ["default"]})).await;
    assert_eq!((r.status, r.body["errors"][0].as_str()), (503, Some(UNAVAILABLE)), "{r:?}");
    assert_eq!(c.get("secret/a", &root).await.body["data"]["value"], "v");
    assert_eq!(c.put("secret/b", &root, json!({"value": "w"})).await.status, 200);
    assert_eq!(health(&c).await, (503, Some("unavailable".into())));
    // Key rotations fail the same way, and give back their claim on the new version: once
    // the token is back, the next rotation goes ahead at once (no 409 for the lease).
    for route in ["transit/keys/k/rotate", "sys/rotate"] {
        let r = c.post(route, Some(&root), json!({})).await;
        assert_eq!((r.status, r.body["errors"][0].as_str()), (503, Some(UNAVAILABLE)), "{route}: {r:?}");
    }
    set(&fault, "");
    assert_eq!(encrypt(&c, &root).await.0, 200);
    assert_eq!(health(&c).await, (200, Some("ok".into())));
    let r = c.post("transit/keys/k/rotate", Some(&root), json!({})).await;
    assert_eq!((r.status, r.body["data"]["latest_version"].as_u64()), (200, Some(2)), "{r:?}");
    let r = c.post("sys/rotate", Some(&root), json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let status = keyvault_tests::wait_rotation_idle(&c, &root).await;
    assert_eq!(status["active_version"], 2, "{status}");

    // A call hangs: the request is answered 503 once `call_timeout` (2 s) has passed, not
    // held; everything that needs no token is still served while the workers are stuck.
    set(&fault, "hang");
    let t = Instant::now();
    let (status, body) = encrypt(&c, &root).await;
    let waited = t.elapsed();
    assert_eq!((status, body["errors"][0].as_str()), (503, Some(UNAVAILABLE)), "{body}");
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(20), "answered after {waited:?}");
    assert_eq!(c.get("secret/b", &root).await.body["data"]["value"], "w");
    assert_eq!(health(&c).await.0, 503);
    // A rotation whose key generation times out keeps its claim on the new version (unlike
    // one the token refused, above): the token may still be making that key, and no one
    // else may make its label until the claim's lease is out.
    let r = c.post("transit/keys/r/rotate", Some(&root), json!({})).await;
    assert_eq!((r.status, r.body["errors"][0].as_str()), (503, Some(UNAVAILABLE)), "{r:?}");
    let log = s.log_text();
    assert!(log.contains("did not answer within 2 s") || log.contains("unavailable"), "no reason logged");
    set(&fault, "");
    // The hung calls return; calls whose callers gave up are not made at all.
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..50 {
        if encrypt(&c, &root).await.0 == 200 {
            ok.store(true, std::sync::atomic::Ordering::Relaxed);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok.load(std::sync::atomic::Ordering::Relaxed), "transit did not recover after the hang");
    assert_eq!(health(&c).await, (200, Some("ok".into())));
    let r = c.post("transit/keys/r/rotate", Some(&root), json!({})).await;
    assert_eq!(r.status, 409, "the timed-out rotation's claim was given back: {r:?}");
    assert!(s.log_text().contains("its claim expires with its lease"));
    let r = c.post("transit/encrypt/r", Some(&root), json!({"plaintext": "aGk="})).await;
    assert_eq!((r.status, r.body["data"]["ciphertext"].as_str().map(|c| &c[..9])), (200, Some("vault:v1:")), "{r:?}");

    // Slow calls (300 ms each, under the timeout) succeed.
    set(&fault, "slow 300");
    let (status, body) = encrypt(&c, &root).await;
    assert_eq!(status, 200, "{body}");
    set(&fault, "");

    // Half the calls fail at random: every answer is 200 or a 503 with the reason, never
    // another status, and the server is healthy afterwards.
    set(&fault, "flaky 50");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let (status, body) = encrypt(&c, &root).await;
        if status == 503 {
            assert_eq!(body["errors"][0], UNAVAILABLE);
        }
        *seen.entry(status).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![200, 503], "{seen:?}");
    set(&fault, "");
    assert_eq!(encrypt(&c, &root).await.0, 200);
    assert_eq!(health(&c).await, (200, Some("ok".into())));
    // Nothing the faults touched was lost.
    assert_eq!(c.get("secret/a", &root).await.body["data"]["value"], "v");
    assert_eq!(c.get("secret/b", &root).await.body["data"]["value"], "w");
}

/// The token's directory disappears (SoftHSM's way of pulling the token out) and comes
/// back: 503 while it is gone, served again once it is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_goes_away_and_comes_back_is_served_again() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(c.post("transit/keys/k", Some(&root), json!({})).await.status, 200);
    assert_eq!(encrypt(&c, &root).await.0, 200);
    let dir = s.token_directory();
    // Out of SoftHSM's token directory (it would find the token in any directory there).
    let away = tempfile::tempdir_in(keyvault_hsm::softhsm::testing::token_dir().parent().unwrap()).unwrap();
    let aside = away.path().join("token");
    std::fs::rename(&dir, &aside).unwrap();
    // The key's session copy lives in the module, not in the directory: it may serve until
    // the store checks the key's token object again (docs/architecture.md, "Session copies").
    tokio::time::sleep(keyvault_hsm::COPY_RECHECK + Duration::from_millis(100)).await;
    let (status, body) = encrypt(&c, &root).await;
    assert_eq!(status, 503, "{body}");
    let (h, why) = health(&c).await;
    assert_eq!(h, 503);
    assert!(matches!(why.as_deref(), Some("unavailable" | "key_missing")), "{why:?}");
    std::fs::rename(&aside, &dir).unwrap();
    let c2 = c.clone();
    let root2 = root.clone();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = served.clone();
    let probe = tokio::spawn(async move {
        for _ in 0..60 {
            if encrypt(&c2, &root2).await.0 == 200 {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    probe.await.unwrap();
    wait_for(Duration::from_secs(1), "transit served again after the token came back", || {
        served.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    assert_eq!(health(&c).await, (200, Some("ok".into())));
}

/// The audit log's checkpoints are signed in the token; a token that fails, or hangs,
/// does not stop the audit writer: requests that need no token call go on being served
/// and audited (a checkpoint every 5 entries), the failure is logged, and once the token
/// is back a checkpoint signs everything written meanwhile (`audit verify` passes).
/// Before, a failed signature failed every batch past the checkpoint (503 for every
/// request) and a hung one held every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hung_token_does_not_stop_the_audit_log() {
    let (s, _dir, fault) = with_faults(ServerOptions {
        hsm_extra: "call_timeout = \"1s\"".into(),
        audit_extra: "checkpoint_every = 5".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(c.put("secret/a", &root, json!({"value": "v"})).await.status, 200);
    for mode in ["error sign_ed25519", "hang"] {
        set(&fault, mode);
        for i in 0..20 {
            let r = tokio::time::timeout(Duration::from_secs(20), c.get("secret/a", &root))
                .await
                .unwrap_or_else(|_| panic!("{mode}: request {i} answered"));
            assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some("v")), "{mode}: {r:?}");
        }
        set(&fault, "");
    }
    assert!(s.log_text().contains("audit checkpoint not signed"));
    // Back: after the retry pause, a checkpoint again.
    let before = std::fs::read_to_string(s.audit_log()).unwrap().lines().count();
    let c2 = c.clone();
    let root2 = root.clone();
    let mut checkpointed = false;
    for _ in 0..30 {
        for _ in 0..5 {
            assert_eq!(c2.get("secret/a", &root2).await.status, 200);
        }
        let text = std::fs::read_to_string(s.audit_log()).unwrap();
        if text.lines().skip(before).any(|l| l.contains("\"type\":\"checkpoint\"")) {
            checkpointed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(checkpointed, "a checkpoint once the token is back");
    let key = s.export_audit_key();
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["audit", "verify", "--live", "--public-key"])
        .arg(&key)
        .arg(s.audit_log())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// A token call that fails once during a re-wrap, in the way SoftHSM reports a failed
/// integrity check (`CKR_GENERAL_ERROR`, read as a bad tag), sets no secret aside: the
/// record gets a second try, and every secret reads back after the rotation. (Before,
/// the one failure took an acknowledged secret out of service for good: 500 on read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_token_call_in_a_rewrap_sets_no_secret_aside() {
    let (s, _dir, fault) =
        with_faults(ServerOptions { extra: "[secrets]\nkey_tier = \"token\"\n".into(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    for i in 0..5 {
        assert_eq!(c.put(&format!("secret/r/{i}"), &root, json!({"value": format!("v{i}")})).await.status, 200);
    }
    // The first data-key unwrap from here on is the re-wrap's.
    set(&fault, "bad_tag_once unwrap_key");
    assert_eq!(c.post("sys/rotate", Some(&root), json!({})).await.status, 200);
    let status = keyvault_tests::wait_rotation_idle(&c, &root).await;
    assert_eq!((status["active_version"].as_u64(), status["set_aside"].as_u64()), (Some(2), Some(0)), "{status}");
    read_back(&c, &root, 5).await;
    assert!(!s.log_text().contains("setting it aside"), "a record was set aside");

    // A token that fails every unwrap for a while: the records fail both tries, but the
    // token fails its own wrap-and-unwrap check too, so none is set aside; the rotation
    // waits, and finishes once the token is back.
    set(&fault, "bad_tag unwrap_key");
    assert_eq!(c.post("sys/rotate", Some(&root), json!({})).await.status, 200);
    wait_for(Duration::from_secs(30), "the token's failed check in the log", || {
        s.log_text().contains("records it cannot open now are not set aside")
    })
    .await;
    let status = c.get("sys/rotate/status", &root).await.body["data"].clone();
    assert_eq!((status["state"].as_str(), status["set_aside"].as_u64()), (Some("rewrapping"), Some(0)), "{status}");
    set(&fault, "");
    let status = keyvault_tests::wait_rotation_idle(&c, &root).await;
    assert_eq!((status["active_version"].as_u64(), status["set_aside"].as_u64()), (Some(3), Some(0)), "{status}");
    read_back(&c, &root, 5).await;
    assert!(!s.log_text().contains("setting it aside"), "a record was set aside");
}

/// A transit rotation that fails after its version's token object was made (here the
/// public key read fails) gives the key back still naming that version: a delete of the
/// key then destroys the object. (Before, it was given back naming none, and version 2's
/// object outlived the delete.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transit_rotation_leaves_nothing_a_delete_misses() {
    let (s, _dir, fault) = with_faults(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(c.post("transit/keys/k", Some(&root), json!({"type": "ed25519"})).await.status, 200);
    assert_eq!(c.post("transit/keys/k/config", Some(&root), json!({"deletion_allowed": true})).await.status, 200);
    set(&fault, "error ed25519_public_key");
    let r = c.post("transit/keys/k/rotate", Some(&root), json!({})).await;
    assert_eq!(r.status, 503, "{r:?}");
    set(&fault, "");
    let label = keyvault_hsm::KeyLabel::new("keyvault/transit/k/v2").unwrap();
    {
        use keyvault_hsm::KeyStore;
        let token = keyvault_hsm::Pkcs11KeyStore::open(&s.token).unwrap();
        assert!(token.exists(&label).unwrap(), "the failed rotation made version 2's object");
    }
    assert_eq!(c.send("DELETE", "transit/keys/k", Some(&root), None).await.status, 204);
    use keyvault_hsm::KeyStore;
    let token = keyvault_hsm::Pkcs11KeyStore::open(&s.token).unwrap();
    assert!(!token.exists(&label).unwrap(), "version 2's object outlived the delete of its key");
    assert!(!token.exists(&keyvault_hsm::KeyLabel::new("keyvault/transit/k/v1").unwrap()).unwrap());
}
