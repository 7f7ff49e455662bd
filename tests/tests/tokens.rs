//! Vault's token endpoints: child tokens (policies the parent may give, no longer-lived
//! than the parent could be, dead with it, whatever the depth), orphans (sudo), lookup and
//! revocation of another token.

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

/// A token with these policies (through a bootstrap token, as an admin would hand one out).
async fn token_with(c: &Client, root: &str, policies: serde_json::Value) -> String {
    let b = ok(c.post("auth/bootstrap/token", Some(root), json!({ "policies": policies })).await, 200);
    let t = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    token(&c.post("auth/bootstrap/login", None, json!({ "token": t })).await)
}

#[tokio::test]
async fn child_tokens_die_with_their_parents_and_never_hold_more() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let policy = |path: &str, caps: &str| json!({"policy": format!("path \"{path}\" {{ capabilities = [{caps}] }}")});
    ok(c.put("sys/policies/acl/app", &root, policy("secret/app/*", "\"read\"")).await, 204);
    ok(c.put("sys/policies/acl/other", &root, policy("secret/other/*", "\"read\"")).await, 204);
    ok(c.put("sys/policies/acl/maker", &root, policy("auth/token/create", "\"update\"")).await, 204);
    ok(c.put("secret/app/x", &root, json!({"value": "v"})).await, 200);
    let parent = token_with(&c, &root, json!(["app", "maker"])).await;

    // A child with some of the parent's policies.
    let child =
        token(&c.post("auth/token/create", Some(&parent), json!({"policies": ["app", "maker"], "ttl": "5m"})).await);
    ok(c.get("secret/app/x", &child).await, 200);
    let l = ok(c.post("auth/token/lookup-self", Some(&child), json!({})).await, 200);
    assert_eq!(l.body["data"]["orphan"], false);
    // Not more than the parent holds, never root, no orphan through `create`.
    ok(c.post("auth/token/create", Some(&parent), json!({"policies": ["other"]})).await, 403);
    ok(c.post("auth/token/create", Some(&parent), json!({"policies": ["root"]})).await, 400);
    ok(c.post("auth/token/create", Some(&parent), json!({"no_parent": true})).await, 400);
    ok(c.post("auth/token/create", Some(&parent), json!({"num_uses": 3})).await, 400);
    // Orphans need sudo on create-orphan.
    ok(c.post("auth/token/create-orphan", Some(&parent), json!({"policies": ["app"]})).await, 403);
    let orphan = token(&c.post("auth/token/create-orphan", Some(&root), json!({"policies": ["app"]})).await);

    // A grandchild; revoking the parent revokes both generations, not the orphan.
    let made = ok(c.post("auth/token/create", Some(&child), json!({"policies": ["app"]})).await, 200);
    let grandchild = token(&made);
    // Tokens made by create are recorded by accessor (without the token); a login's is not.
    let acc = made.body["auth"]["accessor"].as_str().unwrap().to_owned();
    let l = ok(c.post("auth/token/lookup-accessor", Some(&root), json!({"accessor": acc})).await, 200);
    assert_eq!(l.body["data"]["accessor"], acc.as_str());
    assert_eq!(l.body["data"]["id"], "");
    assert_eq!(l.body["data"]["policies"], json!(["app"]));
    assert_eq!(l.body["data"]["orphan"], false);
    assert!(!l.body.to_string().contains(&grandchild));
    let login_acc = ok(c.get("auth/token/lookup-self", &parent).await, 200).body["data"]["accessor"].clone();
    let r = ok(c.post("auth/token/lookup-accessor", Some(&root), json!({"accessor": login_acc})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("only tokens made by auth/token/create"), "{r:?}");
    ok(c.post("auth/token/lookup-accessor", Some(&parent), json!({"accessor": acc})).await, 403);
    ok(c.get("secret/app/x", &grandchild).await, 200);
    ok(c.post("auth/token/revoke-self", Some(&parent), json!({})).await, 204);
    for t in [&parent, &child, &grandchild] {
        let r = ok(c.get("secret/app/x", t).await, 401);
        assert_eq!(r.body["errors"][0], "token revoked");
    }
    ok(c.get("secret/app/x", &orphan).await, 200);
    // A revoked line is not looked up by accessor either.
    ok(c.post("auth/token/lookup-accessor", Some(&root), json!({"accessor": acc})).await, 400);

    // Lookup and revoke of another token (update on the path).
    let l = ok(c.post("auth/token/lookup", Some(&root), json!({"token": orphan})).await, 200);
    assert_eq!(l.body["data"]["policies"], json!(["app"]));
    assert_eq!(l.body["data"]["orphan"], true);
    ok(c.post("auth/token/lookup", Some(&root), json!({"token": parent})).await, 400);
    let caps = json!({"token": orphan, "paths": ["secret/app/x"]});
    let r = ok(c.post("sys/capabilities", Some(&root), caps.clone()).await, 200);
    assert_eq!(r.body["data"]["capabilities"], json!(["read"]), "{r:?}");
    ok(c.post("auth/token/revoke", Some(&root), json!({"token": orphan})).await, 204);
    ok(c.get("secret/app/x", &orphan).await, 401);
    // Nothing answers for a revoked token: not sys/capabilities either (it did, found in
    // review), nor for a revoked line (the parent's children).
    let r = ok(c.post("sys/capabilities", Some(&root), caps).await, 400);
    assert_eq!(r.body["errors"][0], "invalid token");
    ok(c.post("sys/capabilities", Some(&root), json!({"token": child, "paths": ["secret/app/x"]})).await, 400);
}

#[tokio::test]
async fn a_child_lives_no_longer_than_its_parent_could() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put(
            "sys/policies/acl/maker",
            &root,
            json!({"policy": "path \"auth/token/create\" { capabilities = [\"update\"] }"}),
        )
        .await,
        204,
    );
    ok(
        c.post(
            "auth/approle/role/short",
            Some(&root),
            json!({"token_policies": ["maker"], "token_ttl": "60s", "token_max_ttl": "90s"}),
        )
        .await,
        204,
    );
    let sid =
        ok(c.post("auth/approle/role/short/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .clone();
    let parent = token(&c.post("auth", None, json!({"role": "short", "secret_id": sid})).await);
    let r = ok(c.post("auth/token/create", Some(&parent), json!({"ttl": "1h", "explicit_max_ttl": "2h"})).await, 200);
    let lease = r.body["auth"]["lease_duration"].as_u64().unwrap();
    assert!((85..=90).contains(&lease), "capped at the parent's maximum: {lease}");
    let child = r.body["auth"]["client_token"].as_str().unwrap().to_owned();
    // Renewing the child cannot take it past the parent's maximum either.
    let r = ok(c.post("auth/token/renew-self", Some(&child), json!({"increment": "1h"})).await, 200);
    assert!(r.body["auth"]["lease_duration"].as_u64().unwrap() <= 90);
}
