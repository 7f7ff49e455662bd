//! The walking skeleton end to end: a real `keyvault dev` process (SoftHSM token, TLS,
//! sled) driven over HTTPS the way a unit's start-up script and an admin drive it.

use keyvault_tests::{Client, DevServer, Value, json};

const SECRET_VALUE: &str = "db-password-3f9a61c2e7";
const PASSWORD: &str = "alice-password-8d2b74e0aa";

struct Approle {
    role_id: String,
    secret_id: String,
}

async fn make_approle(c: &Client, root: &str, name: &str, policies: &[&str], ttl: &str) -> Approle {
    let r = c
        .post(
            &format!("auth/approle/role/{name}"),
            Some(root),
            json!({"token_policies": policies, "token_ttl": ttl, "token_max_ttl": "15m"}),
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.get(&format!("auth/approle/role/{name}/role-id"), root).await;
    assert_eq!(r.status, 200, "{r:?}");
    let role_id = r.body["data"]["role_id"].as_str().unwrap().to_owned();
    let r = c.post(&format!("auth/approle/role/{name}/secret-id"), Some(root), json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let secret_id = r.body["data"]["secret_id"].as_str().unwrap().to_owned();
    assert_eq!(secret_id.len(), 64, "256-bit secret ids");
    Approle { role_id, secret_id }
}

async fn put_policy(c: &Client, root: &str, name: &str, text: &str) {
    let r = c.put(&format!("sys/policies/acl/{name}"), root, json!({ "policy": text })).await;
    assert_eq!(r.status, 204, "{r:?}");
}

fn token_of(r: &keyvault_tests::Reply) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn unit_start_up_and_admin_flows_over_tls() {
    let s = DevServer::start();
    let c = s.client();
    let root = s.root_token.clone();

    let r = c.send("GET", "sys/health", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["hsm"], "ok");
    assert_eq!(r.body["storage"], "ok");

    put_policy(&c, &root, "web-read", r#"path "secret/db/*" { capabilities = ["read"] }"#).await;
    put_policy(&c, &root, "batch-read", r#"{"path": {"secret/batch/*": {"capabilities": ["read", "list"]}}}"#).await;
    let web = make_approle(&c, &root, "web", &["web-read"], "5m").await;
    let batch = make_approle(&c, &root, "batch", &["batch-read"], "5m").await;

    let r = c.put("secret/db/password", &root, json!({ "value": SECRET_VALUE })).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["data"]["version"], 1);

    // The unit's start-up: short form login, then read.
    let r = c.post("auth", None, json!({"role": "web", "secret_id": web.secret_id})).await;
    let unit = token_of(&r);
    assert_eq!(r.body["auth"]["policies"], json!(["web-read"]));
    assert_eq!(r.body["auth"]["lease_duration"], 300);
    assert_eq!(r.body["auth"]["renewable"], true, "renewable up to token_max_ttl");
    assert!(r.body["auth"]["accessor"].as_str().unwrap().len() >= 16);
    assert_eq!(r.headers.get("cache-control").unwrap(), "no-store");
    let r = c.get("secret/db/password", &unit).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["data"]["value"], SECRET_VALUE);
    assert_eq!(r.body["metadata"]["version"], 1);
    assert!(r.body["metadata"]["created_time"].as_str().unwrap().ends_with('Z'));

    // The Vault-shaped login, and the Bearer header.
    let r = c.post("auth/approle/login", None, json!({"role_id": web.role_id, "secret_id": web.secret_id})).await;
    let unit2 = token_of(&r);
    let resp = c.http.get(c.url("secret/db/password")).bearer_auth(&unit2).send().await.unwrap();
    let r = Client::reply(resp).await;
    assert_eq!(r.body["data"]["value"], SECRET_VALUE);

    // Policy: read only, and only under secret/db/.
    assert_eq!(c.put("secret/db/password", &unit, json!({"value": "x"})).await.status, 403);
    assert_eq!(c.get("secret/batch/job", &unit).await.status, 403);
    assert_eq!(c.send("LIST", "secret/db", Some(&unit), None).await.status, 403);
    // A token of another role.
    let batch_token = token_of(&c.post("auth", None, json!({"role": "batch", "secret_id": batch.secret_id})).await);
    assert_eq!(c.get("secret/db/password", &batch_token).await.status, 403);
    // Admin endpoints are closed to units.
    assert_eq!(
        c.put("sys/policies/acl/evil", &unit, json!({"policy": "path \"*\" { capabilities = [\"sudo\"] }"}))
            .await
            .status,
        403
    );
    assert_eq!(c.post("auth/approle/role/web/secret-id", Some(&unit), json!({})).await.status, 403);

    // Wrong credentials: 401, and the caller cannot tell which part was wrong.
    for body in [
        json!({"role": "web", "secret_id": "0".repeat(64)}),
        json!({"role": "nope", "secret_id": web.secret_id}),
        json!({"role": "batch", "secret_id": web.secret_id}),
        json!({"role_id": web.role_id, "secret_id": batch.secret_id}),
        json!({"role_id": "00000000-0000-0000-0000-000000000000", "secret_id": web.secret_id}),
    ] {
        let r = c.post("auth", None, body.clone()).await;
        let r = if body.get("role_id").is_some() { c.post("auth/approle/login", None, body).await } else { r };
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.body["errors"][0], "invalid credentials");
    }

    // Removing a capability takes effect on the next request (policies are re-read).
    put_policy(&c, &root, "web-read", r#"path "secret/other/*" { capabilities = ["read"] }"#).await;
    assert_eq!(c.get("secret/db/password", &unit).await.status, 403);
    put_policy(&c, &root, "web-read", r#"path "secret/db/*" { capabilities = ["read"] }"#).await;
    assert_eq!(c.get("secret/db/password", &unit).await.status, 200);

    // userpass for a human admin.
    put_policy(
        &c,
        &root,
        "admin",
        r#"path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }"#,
    )
    .await;
    let r = c
        .post("auth/userpass/users/alice", Some(&root), json!({"password": PASSWORD, "token_policies": "admin"}))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = c.post("auth/userpass/users/bob", Some(&root), json!({"password": "short"})).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = c.get("auth/userpass/users/alice", &root).await;
    assert_eq!(r.body["data"]["token_policies"], json!(["admin"]));
    assert!(r.body.to_string().find("argon2").is_none(), "the hash is never shown");
    let alice = token_of(&c.post("auth/userpass/login/alice", None, json!({"password": PASSWORD})).await);
    assert_eq!(c.post("auth/userpass/login/alice", None, json!({"password": "wrong-password-123"})).await.status, 401);
    assert_eq!(c.post("auth/userpass/login/mallory", None, json!({"password": PASSWORD})).await.status, 401);
    let r = c.get("sys/policies/acl/web-read", &alice).await;
    assert_eq!(r.status, 200);
    assert!(r.body["data"]["policy"].as_str().unwrap().contains("secret/db/*"));
    assert_eq!(c.get("secret/db/password", &alice).await.status, 403);
    let r = c.send("LIST", "sys/policies/acl", Some(&alice), None).await;
    assert_eq!(r.status, 200);
    let names = r.body["data"]["keys"].as_array().unwrap();
    assert!(names.contains(&json!("admin")) && names.contains(&json!("root")));

    // AppRole administration reads.
    let r = c.get("auth/approle/role/web", &root).await;
    assert_eq!(r.body["data"]["token_policies"], json!(["web-read"]));
    assert_eq!(r.body["data"]["token_ttl"], 300);
    let r = c.get("auth/approle/role?list=true", &root).await;
    assert_eq!(r.body["data"]["keys"], json!(["batch", "web"]));
    // A role name is one namespace across methods.
    assert_eq!(c.send("DELETE", "auth/approle/role/batch", Some(&root), None).await.status, 204);
    assert_eq!(c.post("auth", None, json!({"role": "batch", "secret_id": batch.secret_id})).await.status, 401);

    // Secret versions, delete, list.
    assert_eq!(c.put("secret/db/password", &root, json!({"value": "second"})).await.body["data"]["version"], 2);
    assert_eq!(c.get("secret/db/password?version=1", &root).await.body["data"]["value"], SECRET_VALUE);
    assert_eq!(c.get("secret/db/password", &root).await.body["data"]["value"], "second");
    assert_eq!(c.send("DELETE", "secret/db/password", Some(&root), None).await.status, 204);
    assert_eq!(c.get("secret/db/password", &root).await.status, 404);
    assert_eq!(c.get("secret/db/password?version=1", &root).await.body["data"]["value"], SECRET_VALUE);
    assert_eq!(c.put("secret/db/password", &root, json!({"value": "third"})).await.body["data"]["version"], 3);
    c.put("secret/db/replica/password", &root, json!({"value": "r"})).await;
    let r = c.send("LIST", "secret/db/", Some(&root), None).await;
    assert_eq!(r.body["data"]["keys"], json!(["password", "replica/"]));
    assert_eq!(c.get("secret/db?list=true", &root).await.body["data"]["keys"], json!(["password", "replica/"]));
    assert_eq!(c.send("LIST", "secret/", Some(&root), None).await.body["data"]["keys"], json!(["db/"]));

    // A bootstrap token, minted and used.
    let minted = c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["web-read"]})).await;
    let bootstrap = minted.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let from_bootstrap = token_of(&c.post("auth/bootstrap/login", None, json!({"token": bootstrap})).await);

    // Nothing secret reached the server log (debug level), though the requests did, nor
    // any file in the data directory (storage, audit log, token directory).
    let log = s.log_text();
    assert!(log.contains("request"), "the log is being written");
    let secrets = [
        SECRET_VALUE,
        PASSWORD,
        &web.secret_id,
        &batch.secret_id,
        &bootstrap,
        &unit,
        &unit2,
        &alice,
        &root,
        &batch_token,
        &from_bootstrap,
    ];
    for (i, secret) in secrets.iter().enumerate() {
        assert!(!log.contains(secret), "secret {i} reached the log");
        let hits = keyvault_tests::files_containing(&s.data_dir, secret.as_bytes());
        assert!(hits.is_empty(), "secret {i} is in {hits:?}");
    }
}

#[tokio::test]
async fn bad_input_gets_4xx_and_changes_nothing() {
    let s = DevServer::start();
    let c = s.client();
    let root = s.root_token.clone();
    assert_eq!(c.put("secret/app/key", &root, json!({"value": "original"})).await.status, 200);
    let unchanged = |r: Value| assert_eq!(r["data"]["value"], "original");

    let raw = |m: &'static str, p: &'static str, b: &'static [u8]| {
        let c = c.clone();
        let root = root.clone();
        async move { c.send(m, p, Some(&root), Some(b.to_vec())).await }
    };
    // Malformed JSON, not an object, trailing garbage.
    for body in [&b"{\"value\": "[..], b"[1,2]", b"\"str\"", b"{} x", b"\xff\xfe"] {
        let r = c.send("PUT", "secret/app/key", Some(&root), Some(body.to_vec())).await;
        assert_eq!(r.status, 400, "{body:?}: {r:?}");
        assert!(r.body["errors"][0].as_str().unwrap().contains("JSON"), "{r:?}");
    }
    unchanged(c.get("secret/app/key", &root).await.body);
    // Oversize body: 413, nothing written.
    let big = format!(r#"{{"value":"{}"}}"#, "x".repeat(1024 * 1024));
    let r = c.send("PUT", "secret/app/key", Some(&root), Some(big.into_bytes())).await;
    assert_eq!(r.status, 413, "{r:?}");
    let r = c.get("secret/app/key", &root).await;
    unchanged(r.body.clone());
    assert_eq!(r.body["metadata"]["version"], 1);
    // A field of the wrong type: 400, nothing created.
    let r = raw("POST", "auth/approle/role/x", br#"{"token_policies": [], "secret_id_num_uses": "many"}"#).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(c.get("auth/approle/role/x", &root).await.status, 404, "nothing created");
    // Unknown fields: ignored and named in the reply's warnings (Vault's convention).
    let r = raw("POST", "auth/approle/role/x", br#"{"token_policies": [], "bogus": 1}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [bogus]", "{r:?}");
    assert_eq!(c.get("auth/approle/role/x", &root).await.status, 200);
    // A login with an unknown field is judged on its credentials.
    let r = c.post("auth/approle/login", None, json!({"role_id": "x", "secret_id": "s", "extra": true})).await;
    assert_eq!(r.status, 401, "{r:?}");
    let r =
        raw("PUT", "sys/policies/acl/p", br#"{"policy": "path \"a\" { capabilities = [\"read\"] }", "x": 1}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [x]", "{r:?}");
    // Wrong types never echo the value.
    let r = raw("POST", "auth/approle/role/x", br#"{"token_ttl": {"nested": "s3cr3t-in-body"}}"#).await;
    assert_eq!(r.status, 400);
    assert!(!r.body.to_string().contains("s3cr3t-in-body"));
    // Bad policies.
    let r = c.put("sys/policies/acl/p", &root, json!({"policy": "path \"a/*/b\" { capabilities = [\"read\"] }"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(c.put("sys/policies/acl/root", &root, json!({"policy": ""})).await.status, 400);
    // Paths: dot segments (encoded, since clients normalize plain ones), control
    // characters, invalid UTF-8, encoded slashes, empty segments, overlong.
    let long = format!("secret/{}", "a".repeat(600));
    for p in [
        "/v1/secret/app/../key",
        "/v1/secret/./app/key",
        "/v1/secret/app/%2E%2E/key",
        "/v1/secret/%2e/key",
        "/v1/secret/a/..",
        "/v1/secret/../sys/health",
    ] {
        for m in ["GET", "PUT", "DELETE"] {
            assert_eq!(keyvault_tests::raw_status(&s.addr, &s.ca, m, p, &root).await, 400, "{m} {p}");
        }
    }
    for p in ["secret/app%0Akey", "secret/app/%FF", "secret/a%2Fb", "secret/app//key", "secret/app/key/", long.as_str()]
    {
        let r = c.get(p, &root).await;
        assert_eq!(r.status, 400, "{p}: {r:?}");
        let r = c.put(p, &root, json!({"value": "v"})).await;
        assert_eq!(r.status, 400, "{p}: {r:?}");
    }
    // Query strings.
    assert_eq!(c.get("secret/app/key?version=0", &root).await.status, 400);
    assert_eq!(c.get("secret/app/key?version=abc", &root).await.status, 400);
    let r = c.get("secret/app/key?bogus=1", &root).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [bogus]", "{r:?}");
    assert_eq!(c.get("secret/app/key?version=9", &root).await.status, 404);
    // Tokens: missing, malformed, forged, wrong scheme.
    assert_eq!(c.send("GET", "secret/app/key", None, None).await.status, 401);
    assert_eq!(c.get("secret/app/key", "not-a-token").await.status, 401);
    let mut forged = root.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = c.get("secret/app/key", &forged).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["errors"][0], "invalid token");
    let resp =
        c.http.get(c.url("secret/app/key")).header("Authorization", format!("Basic {root}")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Methods and routes.
    // A 405 names what the path does answer (RFC 9110), also for a method nobody serves.
    let r = c.send("PATCH", "secret/app/key", Some(&root), None).await;
    assert_eq!((r.status, r.headers["allow"].to_str().unwrap()), (405, "GET, LIST, POST, PUT, DELETE"));
    let r = c.send("DELETE", "auth/approle/role/x/role-id", Some(&root), None).await;
    assert_eq!((r.status, r.headers["allow"].to_str().unwrap()), (405, "GET"));
    let r = c.send("TRACE", "transit/keys/", Some(&root), None).await;
    assert_eq!((r.status, r.headers["allow"].to_str().unwrap()), (405, "LIST, GET"));
    let r = c.send("TRACE", "no/such/route", Some(&root), None).await;
    assert_eq!(r.status, 405);
    assert!(r.headers.get("allow").is_none(), "{r:?}");
    assert_eq!(c.get("no/such/route", &root).await.status, 404);
    assert_eq!(c.send("LIST", "secret/none/", Some(&root), None).await.status, 404);
    // Deleting what is not there is a 204, as in Vault (KV version 1 delete is idempotent).
    let r = c.send("DELETE", "secret/none", Some(&root), None).await;
    assert_eq!(r.status, 204);
    assert_eq!(c.get("secret/none", &root).await.status, 404);
    // After all that, the value is intact.
    let r = c.get("secret/app/key", &root).await;
    unchanged(r.body.clone());
    assert_eq!(r.body["metadata"]["version"], 1);
}

#[tokio::test]
async fn expired_tokens_get_401() {
    let mut s = DevServer::start_with_clock();
    let c = s.client();
    let root = s.root_token.clone();
    put_policy(&c, &root, "r", r#"path "secret/*" { capabilities = ["read"] }"#).await;
    let short = make_approle(&c, &root, "short", &["r"], "1s").await;
    c.put("secret/k", &root, json!({"value": "v"})).await;
    let t = token_of(&c.post("auth", None, json!({"role": "short", "secret_id": short.secret_id})).await);
    assert_eq!(c.get("secret/k", &t).await.status, 200);
    // Within the TTL plus the 5 s clock-skew leeway it works; past it, not.
    s.advance_clock(3);
    assert_eq!(c.get("secret/k", &t).await.status, 200);
    s.advance_clock(4);
    let r = c.get("secret/k", &t).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["errors"][0], "token expired");
}

#[tokio::test]
async fn dev_mode_offers_mtls_and_certificate_login() {
    let s = DevServer::start();
    let out = s.stdout.join("\n");
    let field = |name: &str| {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| panic!("{name} not printed:\n{out}"))
    };
    // The printed paths exist and the printed curl line's shape is there.
    let (cert, key) = (field("KEYVAULT_CLIENT_CERT"), field("KEYVAULT_CLIENT_KEY"));
    assert!(out.contains("/v1/auth/cert/login"), "{out}");
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    let c = Client::with_identity(&s.addr, &s.ca, Some(&pem));
    c.put("secret/dev/x", &s.root_token, json!({"value": "v"})).await;
    let r = c.post("auth/cert/login", None, json!({"name": "dev-client"})).await;
    let t = token_of(&r);
    assert_eq!(c.get("secret/dev/x", &t).await.body["data"]["value"], "v");
    // Direct request: the certificate is the credential.
    assert_eq!(c.send("GET", "secret/dev/x", None, None).await.body["data"]["value"], "v");
    // The bound token is useless without the certificate.
    assert_eq!(s.client().get("secret/dev/x", &t).await.status, 401);
}

#[tokio::test]
async fn dev_mode_audit_log_verifies_with_the_printed_command() {
    let mut s = DevServer::start();
    let c = s.client();
    assert_eq!(c.put("secret/a", &s.root_token, json!({"value": "audited"})).await.status, 200);
    assert_eq!(c.get("secret/a", "bad").await.status, 401);
    s.stop();
    let line = s.stdout.iter().find(|l| l.contains("Audit log:")).expect("the audit log is printed");
    let words: Vec<&str> = line.split_whitespace().collect();
    let key = words.iter().position(|w| *w == "--public-key").map(|i| words[i + 1]).unwrap();
    let log = words[2];
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["audit", "verify", "--public-key", key, log.trim_end_matches(')')])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(log).unwrap();
    assert!(!text.contains("audited") && !text.contains(&s.root_token));
}
