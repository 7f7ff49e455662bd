//! Emergency seal: `sys/seal` drops the replica's sessions with the token, its PIN, key
//! handles and caches; every request but health, seal status and unseal is answered 503
//! until `sys/unseal` (or `keyvault operator unseal`) logs in to the token again. The seal
//! is per replica.

use std::process::Command;

use keyvault_tests::postgres::TestPostgres;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json, keyvault_bin};
use secrecy::ExposeSecret;

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

async fn unseal(c: &Client, key: &str) -> Reply {
    c.send("PUT", "sys/unseal", None, Some(json!({ "key": key }).to_string().into_bytes())).await
}

#[track_caller]
fn sealed_refusal(r: Reply) {
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.body["errors"][0], "KeyVault is sealed", "{r:?}");
}

fn operator_unseal(s: &TestServer) -> std::process::Output {
    Command::new(keyvault_bin())
        .args(["operator", "unseal", "--address", &s.addr, "--ca-file"])
        .arg(&s.server_ca_file)
        .arg("--config")
        .arg(&s.config_file)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_replica_answers_only_health_seal_status_and_unseal() {
    let s = TestServer::start(ServerOptions {
        // A data-key cache, so that sealing has cached keys to drop.
        extra: "[secrets]\ndek_cache_ttl = \"5m\"\n".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("secret/db", &root, json!({"password": "sealed-away-7"})).await, 200);
    ok(c.get("secret/db", &root).await, 200);
    ok(c.post("auth/approle/role/web", Some(&root), json!({"token_policies": ["default"]})).await, 204);
    let role_id = ok(c.get("auth/approle/role/web/role-id", &root).await, 200).body["data"]["role_id"].clone();
    let secret_id =
        ok(c.post("auth/approle/role/web/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .clone();
    let login = json!({"role_id": role_id, "secret_id": secret_id});
    let web = ok(c.post("auth/approle/login", None, login.clone()).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // Sealing needs sudo on sys/seal: a token without it is refused and nothing changes.
    ok(c.send("PUT", "sys/seal", Some(&web), None).await, 403);
    ok(c.get("secret/db", &root).await, 200);

    // Sixteen seals at once: each one either seals (204) or finds the replica sealed
    // already (503, as Vault answers); it ends sealed.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(async move { c.send("PUT", "sys/seal", Some(&root), None).await })
        })
        .collect();
    let mut sealed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 204 {
            sealed += 1;
        } else {
            sealed_refusal(r);
        }
    }
    assert!(sealed >= 1);

    // Everything but health, seal status and unseal: 503, whoever asks.
    sealed_refusal(c.get("secret/db", &root).await);
    sealed_refusal(c.put("secret/other", &root, json!({"v": "1"})).await);
    sealed_refusal(c.post("auth/approle/login", None, login.clone()).await);
    sealed_refusal(c.get("auth/token/lookup-self", &web).await);
    sealed_refusal(c.get("sys/leader", &root).await);
    sealed_refusal(c.post("transit/keys/k", Some(&root), json!({})).await);
    sealed_refusal(c.send("PUT", "sys/seal", Some(&root), None).await);
    let st = ok(c.send("GET", "sys/seal-status", None, None).await, 200);
    assert_eq!(st.body["sealed"], true);
    assert_eq!(st.body["initialized"], true);
    assert_eq!(st.body["type"], "pkcs11");
    let h = ok(c.send("GET", "sys/health", None, None).await, 503);
    assert_eq!(h.body["sealed"], true);
    assert_eq!(h.body["hsm"], "sealed");
    assert!(h.body["server_time_utc"].as_u64().unwrap() > 0);
    assert_eq!(h.body["cluster_name"], "keyvault");

    // Unseal: no PIN is a 400; a wrong PIN is refused by the token and changes nothing.
    ok(c.send("PUT", "sys/unseal", None, Some(b"{}".to_vec())).await, 400);
    let r = ok(unseal(&c, "0000000000000000").await, 400);
    assert_eq!(r.body["errors"][0], "the token refused the PIN");
    assert_eq!(ok(c.send("GET", "sys/seal-status", None, None).await, 200).body["sealed"], true);

    // `keyvault operator unseal` reads the PIN file named by the configuration.
    let out = operator_unseal(&s);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sealed: false");
    assert_eq!(ok(c.send("GET", "sys/seal-status", None, None).await, 200).body["sealed"], false);
    ok(c.send("GET", "sys/health", None, None).await, 200);

    // The same tokens work again (verified afresh), and the secret is read through the
    // token again.
    let r = ok(c.get("secret/db", &root).await, 200);
    assert_eq!(r.body["data"]["password"], "sealed-away-7");
    ok(c.get("auth/token/lookup-self", &web).await, 200);
    ok(c.post("auth/approle/login", None, login).await, 200);
    // Unsealing an unsealed replica tries nothing and says so.
    assert_eq!(ok(unseal(&c, "wrong").await, 200).body["sealed"], false);

    // The audit log says who sealed it; the PIN is in no log.
    let log = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(log.contains("this replica was sealed"));
    let pin = s.token.pin.expose_secret().to_owned();
    assert!(!log.contains(&pin) && !s.log_text().contains(&pin));
}

/// A stranger cannot lock the token's PIN through `sys/unseal`: after three wrong PINs
/// per seal, no attempt reaches the token (not even the right PIN) until a restart.
#[tokio::test]
async fn at_most_three_wrong_pins_reach_the_token_per_seal() {
    let mut s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.send("PUT", "sys/seal", Some(&root), None).await, 204);
    for _ in 0..3 {
        ok(unseal(&c, "1111111111111111").await, 400);
    }
    let pin = s.token.pin.expose_secret().to_owned();
    let r = ok(unseal(&c, &pin).await, 503);
    assert!(r.body["errors"][0].as_str().unwrap().contains("restart this replica"), "{r:?}");
    assert!(!r.body.to_string().contains(&pin));
    // A restart reads the PIN source and opens the token again.
    s.stop();
    s.restart();
    let c = s.client();
    ok(c.get("auth/token/lookup-self", &root).await, 200);
}

/// The seal is per replica: the other replica keeps serving, and takes over a running
/// rotation's work (the sealed one renews no lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seal_is_per_replica() {
    let pg = TestPostgres::start();
    let url = pg.database("seal");
    let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4");
    let a = TestServer::start(ServerOptions { storage: Some(storage.clone()), ..Default::default() });
    let b = TestServer::start(ServerOptions {
        storage: Some(storage),
        token: Some(a.token.clone()),
        skip_init: true,
        ..Default::default()
    });
    let (ca, cb) = (a.client(), b.client());
    let root = a.root.clone();
    ok(ca.put("secret/shared", &root, json!({"v": "one"})).await, 200);
    ok(ca.send("PUT", "sys/seal", Some(&root), None).await, 204);
    sealed_refusal(ca.get("secret/shared", &root).await);
    // B is unaffected: it reads, writes, and reports itself unsealed.
    assert_eq!(ok(cb.get("secret/shared", &root).await, 200).body["data"]["v"], "one");
    ok(cb.put("secret/shared", &root, json!({"v": "two"})).await, 200);
    assert_eq!(ok(cb.send("GET", "sys/seal-status", None, None).await, 200).body["sealed"], false);
    // A master key rotation started on B completes while A is sealed.
    ok(cb.post("sys/rotate", Some(&root), json!({})).await, 200);
    keyvault_tests::wait_rotation_idle(&cb, &root).await;
    let out = operator_unseal(&a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ok(ca.get("secret/shared", &root).await, 200).body["data"]["v"], "two");
}

/// A checkpoint falls due while the replica is sealed (nothing can be signed then): the
/// audit log waits for the unseal instead of failing, so health, seal status and the
/// unseal itself keep working, and the log verifies afterwards. (The time-based
/// checkpoint used to fail the audit write: every request, the unseal among them, was 503
/// until a retry; seen once in a full run under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_due_while_sealed_waits_for_the_unseal() {
    let mut s =
        TestServer::start(ServerOptions { audit_extra: "checkpoint_interval = \"1s\"".into(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("secret/a", &root, json!({"value": "v"})).await, 200);
    ok(c.put("sys/seal", &root, json!({})).await, 204);
    // Three checkpoint intervals pass while sealed; everything a sealed replica answers
    // is answered all along.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(3500);
    while std::time::Instant::now() < until {
        assert_eq!(ok(c.send("GET", "sys/seal-status", None, None).await, 200).body["sealed"], true);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let pin = s.token.pin.expose_secret().to_owned();
    assert_eq!(ok(unseal(&c, &pin).await, 200).body["sealed"], false);
    assert_eq!(ok(c.get("secret/a", &root).await, 200).body["data"]["value"], "v");
    s.stop();
    let (verified, report) = s.verify_audit_log();
    assert!(verified, "{report}");
}
