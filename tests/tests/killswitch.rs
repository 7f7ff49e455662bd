//! The kill switch does not depend on the replicas' clocks agreeing, and reaches every kind
//! of identity. Two replicas share a PostgreSQL database; one runs with its clock ahead
//! (libfaketime). A third, whose clock is further off than it allows, refuses to serve.

use std::time::Duration;

use keyvault_tests::postgres::TestPostgres;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn token(r: &Reply) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

/// A replica whose wall clock is `offset` ahead (monotonic time is left alone, so timers work).
fn ahead(offset: &str, storage: &str, token: &keyvault_hsm::Pkcs11Config, extra: &str) -> TestServer {
    TestServer::start(ServerOptions {
        storage: Some(storage.to_owned()),
        token: Some(token.clone()),
        skip_init: true,
        extra: extra.to_owned(),
        env: vec![
            ("LD_PRELOAD".into(), keyvault_tests::faketime_lib().display().to_string()),
            ("FAKETIME".into(), offset.to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
        ..Default::default()
    })
}

async fn approle_login(c: &Client, root: &str, role: &str) -> String {
    let sid = ok(c.post(&format!("auth/approle/role/{role}/secret-id"), Some(root), json!({})).await, 200).body["data"]
        ["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    token(&c.post("auth", None, json!({"role": role, "secret_id": sid})).await)
}

async fn health(c: &Client) -> Reply {
    c.send("GET", "sys/health", None, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_holds_across_replicas_whose_clocks_differ() {
    let pg = TestPostgres::start();
    let url = pg.database("killswitch");
    let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4");
    let a = TestServer::start(ServerOptions { storage: Some(storage.clone()), ..Default::default() });
    // B's clock is 4 s ahead (within the token leeway, so A accepts B's tokens); it is
    // allowed to be up to a minute off.
    let b = ahead("+4s", &storage, &a.token, "[tokens]\nmax_clock_offset = \"60s\"\n");
    let (ca, cb) = (a.client(), b.client());
    let root = a.root.clone();
    ok(
        ca.put(
            "sys/policies/acl/read-app",
            &root,
            json!({"policy": "path \"secret/app\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(ca.put("secret/app", &root, json!({"value": "v"})).await, 200);
    ok(
        ca.post("auth/approle/role/app", Some(&root), json!({"token_policies": ["read-app"], "token_max_ttl": "1h"}))
            .await,
        204,
    );

    // The audit HMAC of a value is the same on every replica (their logs are in
    // different places), so one search finds a token in all of them.
    let ha = ok(ca.post("sys/audit-hash", Some(&root), json!({"input": "some token"})).await, 200).body["data"]["hash"]
        .clone();
    let hb = ok(cb.post("sys/audit-hash", Some(&root), json!({"input": "some token"})).await, 200).body["data"]["hash"]
        .clone();
    assert_ne!(a.audit_log(), b.audit_log());
    assert_eq!(ha, hb);

    // B measures its clock against the database's.
    let mut offset = None;
    for _ in 0..100 {
        let h = ok(health(&cb).await, 200);
        if let Some(ms) = h.body["clock_offset_ms"].as_i64() {
            offset = Some(ms);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let offset = offset.expect("B reports its clock offset");
    assert!((-5500..=-2500).contains(&offset), "storage minus B's clock is about -4 s: {offset}");

    // The finding: a token issued by B (its iat 4 s ahead) outlived a revocation made on
    // A a moment later. Revocation by generation compares no clocks.
    let t_b = approle_login(&cb, &root, "app").await;
    ok(cb.get("secret/app", &t_b).await, 200);
    ok(ca.get("secret/app", &t_b).await, 200);
    ok(ca.post("sys/revoke-identity", Some(&root), json!({"role": "app"})).await, 200);
    for c in [&ca, &cb] {
        let r = ok(c.get("secret/app", &t_b).await, 401);
        assert_eq!(r.body["errors"][0], "identity revoked");
    }
    ok(cb.post("auth/token/renew-self", Some(&t_b), json!({})).await, 401);
    // Restored: new logins on either replica work, the old token stays dead.
    ok(ca.post("sys/restore-identity", Some(&root), json!({"role": "app"})).await, 204);
    let fresh = approle_login(&cb, &root, "app").await;
    ok(ca.get("secret/app", &fresh).await, 200);
    ok(cb.get("secret/app", &t_b).await, 401);
    // Revoked again: the fresh token goes too, on both.
    ok(cb.post("sys/revoke-identity", Some(&root), json!({"role": "app"})).await, 200);
    ok(ca.get("secret/app", &fresh).await, 401);
    ok(cb.get("secret/app", &fresh).await, 401);

    // A replica further off than it allows (default 2 s) refuses to serve.
    let c_srv = ahead("+4s", &storage, &a.token, "");
    let cc = c_srv.client();
    let mut refused = false;
    for _ in 0..100 {
        let h = health(&cc).await;
        if h.status == 503 {
            assert_eq!(h.body["clock"], "offset_too_large", "{h:?}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the replica reports its clock and refuses");
    let r = ok(cc.get("secret/app", &root).await, 503);
    assert!(r.body["errors"][0].as_str().unwrap().contains("clock"), "{r:?}");
}

#[tokio::test]
async fn the_kill_switch_reaches_every_kind_of_identity() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put(
            "sys/policies/acl/read-app",
            &root,
            json!({"policy": "path \"secret/app\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(c.put("secret/app", &root, json!({"value": "v"})).await, 200);

    // A userpass user: not a role (404 for an identity it does not know), revoked as a user.
    ok(
        c.post(
            "auth/userpass/users/carol",
            Some(&root),
            json!({"password": "carol's passphrase", "token_policies": ["read-app"]}),
        )
        .await,
        204,
    );
    let login = || c.post("auth/userpass/login/carol", None, json!({"password": "carol's passphrase"}));
    let t = token(&login().await);
    ok(c.post("sys/revoke-identity", Some(&root), json!({"role": "carol"})).await, 404);
    ok(c.post("sys/revoke-identity", Some(&root), json!({"user": "nobody"})).await, 404);
    ok(c.post("sys/revoke-identity", Some(&root), json!({"user": "Carol"})).await, 200);
    ok(c.get("secret/app", &t).await, 401);
    let r = ok(login().await, 401);
    assert_eq!(r.body["errors"][0], "invalid credentials", "the same answer as a wrong password");
    ok(c.post("sys/restore-identity", Some(&root), json!({"user": "carol"})).await, 204);
    let t2 = token(&login().await);
    ok(c.get("secret/app", &t2).await, 200);
    ok(c.get("secret/app", &t).await, 401);

    // A bootstrap token, unused: revoked by its accessor, it cannot be exchanged.
    let mint = || c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["read-app"]}));
    let m = ok(mint().await, 200);
    let (bt, acc) = (m.body["data"]["bootstrap_token"].clone(), m.body["data"]["accessor"].clone());
    ok(c.post("sys/revoke-identity", Some(&root), json!({"accessor": acc})).await, 200);
    ok(c.post("auth/bootstrap/login", None, json!({"token": bt})).await, 401);
    // Used: the token it was exchanged for goes with it.
    let m = ok(mint().await, 200);
    let (bt, acc) = (m.body["data"]["bootstrap_token"].clone(), m.body["data"]["accessor"].clone());
    let t = token(&c.post("auth/bootstrap/login", None, json!({"token": bt})).await);
    ok(c.get("secret/app", &t).await, 200);
    ok(c.post("sys/revoke-identity", Some(&root), json!({"accessor": acc})).await, 200);
    ok(c.get("secret/app", &t).await, 401);
    // Exactly one kind per request.
    ok(c.post("sys/revoke-identity", Some(&root), json!({"user": "carol", "role": "x"})).await, 400);
    ok(c.post("sys/revoke-identity", Some(&root), json!({})).await, 400);
}

/// Vault's renewal semantics: the client keeps the token it holds. A token renewed on one
/// replica is accepted by the other past its own expiry, until the renewal's, and never
/// past its maximum; a token that was not renewed expires on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_token_outlives_its_own_expiry_on_every_replica() {
    let pg = TestPostgres::start();
    let url = pg.database("renewal");
    let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4");
    // Both clocks are moved together, ahead of the database's: allow it.
    let extra = "[tokens]\nmax_clock_offset = \"2h\"\n".to_owned();
    let mut a = TestServer::start(ServerOptions {
        storage: Some(storage.clone()),
        settable_clock: true,
        extra: extra.clone(),
        ..Default::default()
    });
    let mut b = TestServer::start(ServerOptions {
        storage: Some(storage),
        token: Some(a.token.clone()),
        skip_init: true,
        settable_clock: true,
        extra,
        ..Default::default()
    });
    let (ca, cb) = (a.client(), b.client());
    let root = a.root.clone();
    ok(
        ca.put(
            "sys/policies/acl/read-app",
            &root,
            json!({"policy": "path \"secret/app\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(ca.put("secret/app", &root, json!({"value": "v"})).await, 200);
    let role = json!({"token_policies": ["read-app"], "token_ttl": "60s", "token_max_ttl": "15m"});
    ok(ca.post("auth/approle/role/app", Some(&root), role).await, 204);
    let renewed = approle_login(&ca, &root, "app").await;
    let plain = approle_login(&ca, &root, "app").await;

    let r = ok(ca.post("auth/token/renew-self", Some(&renewed), json!({"increment": "10m"})).await, 200);
    assert_eq!(r.body["auth"]["client_token"], renewed.as_str(), "the same token");
    let lease = r.body["auth"]["lease_duration"].as_u64().unwrap();
    assert!((595..=600).contains(&lease), "{lease}");

    // Two minutes on: past both tokens' own expiry.
    a.advance_clock(120);
    b.advance_clock(120);
    for c in [&ca, &cb] {
        ok(c.get("secret/app", &renewed).await, 200);
        let r = ok(c.get("secret/app", &plain).await, 401);
        assert_eq!(r.body["errors"][0], "token expired");
    }
    // Renewed again on B, beyond the maximum: capped at it (15 min after login).
    let r = ok(cb.post("auth/token/renew-self", Some(&renewed), json!({"increment": "1h"})).await, 200);
    let lease = r.body["auth"]["lease_duration"].as_u64().unwrap();
    assert!((775..=780).contains(&lease), "capped at token_max_ttl: {lease}");
    // Past the first renewal, within the second: still valid on A (which read B's renewal).
    a.advance_clock(600);
    b.advance_clock(600);
    ok(ca.get("secret/app", &renewed).await, 200);
    // Past the maximum: expired everywhere, and no renewal brings it back.
    a.advance_clock(300);
    b.advance_clock(300);
    for c in [&ca, &cb] {
        let r = ok(c.get("secret/app", &renewed).await, 401);
        assert_eq!(r.body["errors"][0], "token expired");
    }
    ok(cb.post("auth/token/renew-self", Some(&renewed), json!({})).await, 401);
    drop(pg);
}
