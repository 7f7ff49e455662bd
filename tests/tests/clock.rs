//! The server's wall clock jumps forward and back (libfaketime; monotonic time is left
//! alone): token expiry follows the clock both ways, gateway replay protection holds in
//! both directions (a nonce seen before the jump is refused after it, an old timestamp is
//! out of skew), and a master key rotation whose lease the jump expired still finishes
//! once, with every secret readable.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer as _, SigningKey};
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Reply, json, wait_rotation_idle};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn item(key: &SigningKey, cert: &str, identity: &str, ts: u64, nonce: &str) -> serde_json::Value {
    let body = br#"{"reading":1}"#;
    let msg = keyvault_api::gateway::signing_input(&ts.to_string(), nonce, body);
    json!({"identity": identity, "cert_sha256": cert, "timestamp": ts.to_string(), "nonce": nonce,
           "signature": STANDARD.encode(key.sign(&msg).to_bytes()), "body": STANDARD.encode(body)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_jumps_keep_expiry_replay_protection_and_rotation_leases_safe() {
    let hold_dir = tempfile::tempdir().unwrap();
    let hold = hold_dir.path().join("hold");
    let mut s = TestServer::start(ServerOptions {
        settable_clock: true,
        env: vec![("KEYVAULT_TEST_HOLD_ROTATION".into(), hold.display().to_string())],
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();

    // Token expiry follows the wall clock, forward and back.
    let t = ok(c.post("auth/token/create", Some(&root), json!({"ttl": "60s", "policies": ["default"]})).await, 200)
        .body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(c.get("auth/token/lookup-self", &t).await, 200);
    s.advance_clock(120);
    ok(c.get("auth/token/lookup-self", &t).await, 401);
    s.advance_clock(-120);
    ok(c.get("auth/token/lookup-self", &t).await, 200);

    // Gateway: replay protection across jumps in both directions.
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let cert = "cd".repeat(32);
    let id = "sensor-1";
    ok(
        c.post(
            &format!("gateway/producers/{id}"),
            Some(&root),
            json!({"cert_sha256": [cert], "keys": [{"key_id": "k1", "public_key": STANDARD.encode(key.verifying_key().as_bytes())}],
                   "clock_skew_seconds": 30, "nonce_ttl_seconds": 120}),
        )
        .await,
        204,
    );
    let verify = |it: serde_json::Value| {
        let (c, root) = (c.clone(), root.clone());
        async move { c.post("gateway/verify", Some(&root), it).await }
    };
    let first = item(&key, &cert, id, now(), "nonce-clock-000001");
    assert_eq!(verify(first.clone()).await.status, 200);
    // Forward by 5 minutes: the old item is out of skew (its nonce may be forgotten by
    // then, the timestamp check covers it); a fresh one passes.
    s.advance_clock(300);
    let r = verify(first.clone()).await;
    assert_eq!((r.status, r.body["data"]["reason"].as_str()), (401, Some("timestamp_out_of_skew")), "{r:?}");
    let later = item(&key, &cert, id, now() + 300, "nonce-clock-000002");
    assert_eq!(verify(later.clone()).await.status, 200);
    // Back to the start: the first item is inside the skew again, and still a replay.
    s.advance_clock(-300);
    let r = verify(first.clone()).await;
    assert_eq!((r.status, r.body["data"]["reason"].as_str()), (409, Some("replay")), "{r:?}");
    // The item from "the future" is out of skew now, and a replay once the clock is there.
    assert_eq!(verify(later.clone()).await.status, 401);
    s.advance_clock(300);
    let r = verify(later.clone()).await;
    assert_eq!((r.status, r.body["data"]["reason"].as_str()), (409, Some("replay")), "{r:?}");
    s.advance_clock(-300);

    // A master key rotation held after 10 records; the clock jumps an hour forward (its
    // lease expires by the wall clock) and back. It still finishes exactly once.
    for i in 0..60 {
        ok(c.put(&format!("secret/clock/{i}"), &root, json!({"value": format!("v{i}")})).await, 200);
    }
    std::fs::write(&hold, "10").unwrap();
    let v = ok(c.post("sys/rotate", Some(&root), json!({})).await, 200).body["data"]["version"].as_u64().unwrap();
    let mut held = false;
    for _ in 0..500 {
        let st = ok(c.get("sys/rotate/status", &root).await, 200).body["data"].clone();
        if st["state"] == "rewrapping" && st["records_done"].as_u64().unwrap() >= 10 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "the rotation did not reach its hold");
    s.advance_clock(3600);
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 409);
    s.advance_clock(-3600);
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 409);
    std::fs::remove_file(&hold).unwrap();
    let st = wait_rotation_idle(&c, &root).await;
    assert_eq!(st["active_version"].as_u64(), Some(v), "{st}");
    assert_eq!(st["versions_in_use"], json!([v]), "{st}");
    for i in 0..60 {
        assert_eq!(ok(c.get(&format!("secret/clock/{i}"), &root).await, 200).body["data"]["value"], format!("v{i}"));
    }
}

/// A producer's clock skew raised after a request was accepted (edits apply at once)
/// must not let that request be accepted again: its nonce is remembered until its
/// timestamp is out of the largest skew a producer may have (300 s), whatever the nonce
/// TTL was when it was seen. Before, the nonce went with the old TTL (61 s) and the
/// request, replayed 200 s later under the raised skew, was accepted a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_clock_skew_does_not_let_a_request_be_accepted_twice() {
    let mut s = TestServer::start(ServerOptions { settable_clock: true, ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let cert = "ef".repeat(32);
    let id = "sensor-skew";
    let producer = |skew: u64, ttl: u64| {
        json!({"cert_sha256": [cert], "keys": [{"key_id": "k1", "public_key": STANDARD.encode(key.verifying_key().as_bytes())}],
               "clock_skew_seconds": skew, "nonce_ttl_seconds": ttl})
    };
    ok(c.post(&format!("gateway/producers/{id}"), Some(&root), producer(30, 61)).await, 204);
    let first = item(&key, &cert, id, now(), "nonce-skew-000001");
    assert_eq!(c.post("gateway/verify", Some(&root), first.clone()).await.status, 200);
    ok(c.post(&format!("gateway/producers/{id}"), Some(&root), producer(300, 601)).await, 204);
    s.advance_clock(200);
    let r = c.post("gateway/verify", Some(&root), first).await;
    assert_eq!((r.status, r.body["data"]["reason"].as_str()), (409, Some("replay")), "{r:?}");
}
