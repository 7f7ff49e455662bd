//! Authorization, route by route: for every route of the API, a table row says which
//! capabilities on which policy path it needs (Vault's rules: `create` for a new entry and
//! `update` for an existing one, decided by an existence check; `sudo` only in addition to
//! the operation's capability on root-protected paths). For each row a token holding
//! exactly those capabilities gets through, and tokens missing any one of them, or holding
//! every other capability, get 403. A route without a row fails the test by itself.
//!
//! And the grant rule: no request assigns a policy its caller does not hold, and `root`
//! is never assignable, through any endpoint that assigns policies.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyvault::logical::Operation;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, Value, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// Every capability a policy can grant (but `deny`).
const ALL: [&str; 11] =
    ["read", "create", "update", "delete", "list", "sudo", "sign", "verify", "encrypt", "decrypt", "rotate"];

/// Who may call a route.
#[derive(Clone, Copy, Debug)]
enum Needs {
    /// No token at all (health, logins, JWKS).
    Nobody,
    /// Any valid token (the token's own lifecycle).
    AnyToken,
    /// Any valid token, and then the engine's own check (Vault's preflight of
    /// `sys/internal/ui/mounts/<path>`: a token that may do nothing under the mount is 403).
    Preflight,
    /// These capabilities on this policy path.
    Caps(&'static str, &'static [&'static str]),
    /// These capabilities on this policy path, checked as [`Needs::Caps`], with this
    /// further policy (HCL) held throughout (the Kubernetes keys also need a grant of
    /// everything: `authz::no_credential_is_made_for_more_than_its_caller_holds`).
    CapsWith(&'static str, &'static [&'static str], &'static str),
}

/// A grant of every policy, attribute value and audience.
const GRANT_EVERYTHING: &str = "path \"sys/policies/grant/*\" { capabilities = [\"sudo\"] }\n\
    path \"sys/token-attributes/grant/*\" { capabilities = [\"sudo\"] }\n\
    path \"sys/token-attributes/audience/*\" { capabilities = [\"sudo\"] }";

struct Row {
    method: &'static str,
    /// `{n}` is replaced by a number unique to each request.
    path: &'static str,
    body: Value,
    needs: Needs,
}

fn row(method: &'static str, path: &'static str, body: Value, needs: Needs) -> Row {
    Row { method, path, body, needs }
}

/// The operation of a row, as the pipeline sees it.
fn operation(method: &str, path: &str) -> Operation {
    match method {
        "GET" if path.contains("list=true") => Operation::List,
        "GET" => Operation::Read,
        "LIST" => Operation::List,
        "POST" | "PUT" => Operation::Write,
        "DELETE" => Operation::Delete,
        "PATCH" => Operation::Patch,
        other => panic!("method {other}"),
    }
}

/// A token with exactly `policy` (HCL), made with a one-time bootstrap token.
async fn token_with(c: &Client, root: &str, name: &str, policy: Option<String>) -> String {
    let policies: Vec<&str> = match &policy {
        Some(p) => {
            ok(c.put(&format!("sys/policies/acl/{name}"), root, json!({ "policy": p })).await, 204);
            vec![name]
        }
        None => vec![],
    };
    let b = ok(c.post("auth/bootstrap/token", Some(root), json!({ "policies": policies })).await, 200);
    let t = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let r = ok(c.post("auth/bootstrap/login", None, json!({ "token": t })).await, 200);
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

fn hcl(path: &str, caps: &[&str]) -> String {
    let caps: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
    format!("path \"{path}\" {{ capabilities = [{}] }}", caps.join(", "))
}

async fn fixtures(c: &Client, root: &str) -> (String, String) {
    for p in ["upd", "del", "del2"] {
        ok(c.put(&format!("sys/policies/acl/{p}"), root, json!({"policy": hcl("secret/x", &["read"])})).await, 204);
    }
    ok(c.put("secret/app/x", root, json!({"value": "v"})).await, 200);
    for p in ["app", "kdel", "kdel2", "kdel3", "dir/x"] {
        ok(c.put(&format!("kv/data/{p}"), root, json!({"data": {"a": "1"}})).await, 200);
    }
    ok(c.put("secret/sdel", root, json!({"value": "v"})).await, 200);
    // Deleted: writing it again is a create, as in Vault's KV version 1.
    ok(c.put("secret/sgone", root, json!({"value": "v"})).await, 200);
    ok(c.send("DELETE", "secret/sgone", Some(root), None).await, 204);
    for r in ["r1", "rdel", "victim"] {
        ok(c.post(&format!("auth/approle/role/{r}"), Some(root), json!({})).await, 204);
    }
    for r in ["c1", "cdel", "cdel2"] {
        ok(c.post(&format!("auth/cert/certs/{r}"), Some(root), json!({"allowed_common_names": ["x"]})).await, 204);
    }
    let kube = json!({"bound_service_account_names": ["*"], "bound_service_account_namespaces": ["*"]});
    for r in ["k1", "kdel"] {
        ok(c.post(&format!("auth/kubernetes/role/{r}"), Some(root), kube.clone()).await, 204);
    }
    for u in ["u1", "udel"] {
        ok(
            c.post(&format!("auth/userpass/users/{u}"), Some(root), json!({"password": "a long passphrase"})).await,
            204,
        );
    }
    ok(c.post("transit/keys/ta", Some(root), json!({"type": "aes256-gcm96"})).await, 200);
    ok(c.post("transit/keys/te", Some(root), json!({"type": "ed25519"})).await, 200);
    ok(c.post("transit/keys/tdel", Some(root), json!({})).await, 200);
    ok(c.post("transit/keys/tdel/config", Some(root), json!({"deletion_allowed": true})).await, 200);
    for p in ["prod1", "pdel"] {
        ok(c.post(&format!("gateway/producers/{p}"), Some(root), producer()).await, 204);
    }
    let ct = ok(c.post("transit/encrypt/ta", Some(root), json!({"plaintext": STANDARD.encode("hi")})).await, 200).body
        ["data"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let sig = ok(c.post("transit/sign/te", Some(root), json!({"input": STANDARD.encode("hi")})).await, 200).body
        ["data"]["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    (ct, sig)
}

fn producer() -> Value {
    json!({"cert_sha256": ["ab".repeat(32)], "keys": [{"key_id": "k1", "public_key": STANDARD.encode(ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().as_bytes())}]})
}

fn rows(ct: &str, sig: &str) -> Vec<Row> {
    use Needs::*;
    let e = json!({});
    let pw = json!({"password": "a long passphrase"});
    let cert = json!({"allowed_common_names": ["x"]});
    let kube = json!({"bound_service_account_names": ["*"], "bound_service_account_namespaces": ["*"]});
    vec![
        row("GET", "sys/health", Value::Null, Nobody),
        row("LIST", "sys/policies/acl", Value::Null, Caps("sys/policies/acl/", &["list"])),
        row("LIST", "sys/policies/acl/", Value::Null, Caps("sys/policies/acl/", &["list"])),
        row("GET", "sys/policies/acl/upd", e.clone(), Caps("sys/policies/acl/upd", &["read"])),
        row(
            "PUT",
            "sys/policies/acl/new-{n}",
            json!({"policy": hcl("secret/y", &["read"])}),
            Caps("sys/policies/acl/new-*", &["create"]),
        ),
        row(
            "PUT",
            "sys/policies/acl/upd",
            json!({"policy": hcl("secret/z", &["read"])}),
            Caps("sys/policies/acl/upd", &["update"]),
        ),
        row("DELETE", "sys/policies/acl/del", e.clone(), Caps("sys/policies/acl/del", &["delete"])),
        row("POST", "sys/revoke-identity", json!({"role": "victim"}), Caps("sys/revoke-identity", &["update", "sudo"])),
        row(
            "POST",
            "sys/restore-identity",
            json!({"role": "victim"}),
            Caps("sys/restore-identity", &["update", "sudo"]),
        ),
        row("POST", "sys/audit-hash", json!({"input": "x"}), Caps("sys/audit-hash", &["update"])),
        row("POST", "sys/rotate", e.clone(), Caps("sys/rotate", &["update", "sudo"])),
        row("GET", "sys/rotate/status", Value::Null, Caps("sys/rotate/status", &["read"])),
        row("POST", "sys/rotate/retire", e.clone(), Caps("sys/rotate/retire", &["update", "sudo"])),
        row("GET", "sys/rotate/set-aside", Value::Null, Caps("sys/rotate/set-aside", &["read"])),
        row("POST", "sys/rotate/token-signing", e.clone(), Caps("sys/rotate/token-signing", &["update", "sudo"])),
        row(
            "POST",
            "sys/rotate/token-signing/retire",
            e.clone(),
            Caps("sys/rotate/token-signing/retire", &["update", "sudo"]),
        ),
        row("GET", "auth/jwks", Value::Null, Nobody),
        row("GET", "auth/revocations", Value::Null, Caps("auth/revocations", &["read"])),
        row("POST", "auth", json!({"role": "r1", "secret_id": "0"}), Nobody),
        row("POST", "auth/approle/login", json!({"role_id": "x", "secret_id": "0"}), Nobody),
        row("GET", "auth/approle/role/r1/role-id", Value::Null, Caps("auth/approle/role/r1/role-id", &["read"])),
        row("POST", "auth/approle/role/r1/secret-id", e.clone(), Caps("auth/approle/role/r1/secret-id", &["update"])),
        row("POST", "auth/approle/tidy/secret-id", e.clone(), Caps("auth/approle/tidy/secret-id", &["update"])),
        row("POST", "auth/cert/login", e.clone(), Nobody),
        row("LIST", "auth/cert/certs", Value::Null, Caps("auth/cert/role/", &["list"])),
        row("GET", "auth/cert/certs/c1", Value::Null, Caps("auth/cert/role/c1", &["read"])),
        row("POST", "auth/cert/certs/new-{n}", cert.clone(), Caps("auth/cert/role/new-*", &["create"])),
        row("POST", "auth/cert/certs/c1", cert.clone(), Caps("auth/cert/role/c1", &["update"])),
        row("DELETE", "auth/cert/certs/cdel", Value::Null, Caps("auth/cert/role/cdel", &["delete"])),
        row("POST", "auth/kubernetes/login", json!({"role": "k", "jwt": "a.b.c"}), Nobody),
        row("GET", "auth/kubernetes/config", Value::Null, Caps("auth/kubernetes/config", &["read"])),
        row(
            "POST",
            "auth/kubernetes/config",
            json!({"issuer": "i", "public_keys": "x", "audiences": ["a"]}),
            CapsWith("auth/kubernetes/config", &["update", "sudo"], GRANT_EVERYTHING),
        ),
        row("POST", "auth/bootstrap/token", e.clone(), Caps("auth/bootstrap/token", &["update", "sudo"])),
        row("POST", "auth/bootstrap/login", json!({"token": "kvb.x"}), Nobody),
        row("LIST", "auth/approle/role", Value::Null, Caps("auth/approle/role/", &["list"])),
        row("GET", "sys/mounts", Value::Null, Caps("sys/mounts", &["read"])),
        row("GET", "sys/metrics", Value::Null, Caps("sys/metrics", &["read"])),
        // KV version 2 at kv/.
        row("GET", "kv/config", Value::Null, Caps("kv/config", &["read"])),
        row("POST", "kv/config", json!({"max_versions": 20}), Caps("kv/config", &["update"])),
        row("GET", "kv/data/app", Value::Null, Caps("kv/data/app", &["read"])),
        row("POST", "kv/data/new-{n}", json!({"data": {"a": "1"}}), Caps("kv/data/new-*", &["create"])),
        row("POST", "kv/data/app", json!({"data": {"a": "2"}}), Caps("kv/data/app", &["update"])),
        row("PATCH", "kv/data/app", json!({"data": {"b": "1"}}), Caps("kv/data/app", &["update"])),
        row("DELETE", "kv/data/kdel", Value::Null, Caps("kv/data/kdel", &["delete"])),
        row("POST", "kv/delete/app", json!({"versions": [1]}), Caps("kv/delete/app", &["update"])),
        row("POST", "kv/undelete/app", json!({"versions": [1]}), Caps("kv/undelete/app", &["update"])),
        row("POST", "kv/destroy/kdel2", json!({"versions": [1]}), Caps("kv/destroy/kdel2", &["update"])),
        row("LIST", "kv/metadata", Value::Null, Caps("kv/metadata/", &["list"])),
        row("LIST", "kv/metadata/dir", Value::Null, Caps("kv/metadata/dir/", &["list"])),
        row("GET", "kv/metadata/app", Value::Null, Caps("kv/metadata/app", &["read"])),
        row("POST", "kv/metadata/meta-{n}", json!({"max_versions": 3}), Caps("kv/metadata/meta-*", &["create"])),
        row("POST", "kv/metadata/app", json!({"max_versions": 30}), Caps("kv/metadata/app", &["update"])),
        row("DELETE", "kv/metadata/kdel3", Value::Null, Caps("kv/metadata/kdel3", &["delete"])),
        row("GET", "kv/subkeys/app", Value::Null, Caps("kv/subkeys/app", &["read"])),
        row("GET", "sys/seal-status", Value::Null, Nobody),
        row("GET", "sys/leader", Value::Null, Nobody),
        row("POST", "sys/wrapping/unwrap", json!({"token": "kvw.x"}), Nobody),
        row("POST", "sys/wrapping/lookup", json!({"token": "kvw.x"}), Nobody),
        row("GET", "sys/wrapping/lookup?token=kvw.x", Value::Null, Nobody),
        row("POST", "sys/wrapping/rewrap", json!({"token": "kvw.x"}), Nobody),
        row("POST", "sys/wrapping/wrap", json!({"k": "v"}), Caps("sys/wrapping/wrap", &["update"])),
        row("GET", "sys/internal/ui/mounts", Value::Null, AnyToken),
        row("POST", "sys/capabilities-self", json!({"path": "secret/x"}), AnyToken),
        row("GET", "sys/internal/ui/mounts/secret/x", Value::Null, Preflight),
        row(
            "POST",
            "sys/capabilities",
            json!({"path": "secret/x", "token": "x"}),
            Caps("sys/capabilities", &["update"]),
        ),
        // Vault's older policy paths, authorized as the paths they alias.
        row("GET", "sys/policy", Value::Null, Caps("sys/policies/acl/", &["list"])),
        row("LIST", "sys/policy", Value::Null, Caps("sys/policies/acl/", &["list"])),
        row("GET", "sys/policy/upd", Value::Null, Caps("sys/policies/acl/upd", &["read"])),
        row("PUT", "sys/policy/new-{n}", json!({"policy": ""}), Caps("sys/policies/acl/new-*", &["create"])),
        row("PUT", "sys/policy/upd", json!({"policy": ""}), Caps("sys/policies/acl/upd", &["update"])),
        row("DELETE", "sys/policy/del2", Value::Null, Caps("sys/policies/acl/del2", &["delete"])),
        row("GET", "sys/auth", Value::Null, Caps("sys/auth", &["read"])),
        // Cert roles at `role/` (and their alias `certs/`, authorized as `role/`).
        row("LIST", "auth/cert/role", Value::Null, Caps("auth/cert/role/", &["list"])),
        row("GET", "auth/cert/role/c1", Value::Null, Caps("auth/cert/role/c1", &["read"])),
        row("POST", "auth/cert/role/new-{n}", cert.clone(), Caps("auth/cert/role/new-*", &["create"])),
        row("POST", "auth/cert/role/c1", cert.clone(), Caps("auth/cert/role/c1", &["update"])),
        row("DELETE", "auth/cert/role/cdel2", Value::Null, Caps("auth/cert/role/cdel2", &["delete"])),
        row("GET", "auth/kubernetes/role/k1", Value::Null, Caps("auth/kubernetes/role/k1", &["read"])),
        row("POST", "auth/kubernetes/role/new-{n}", kube.clone(), Caps("auth/kubernetes/role/new-*", &["create"])),
        row("POST", "auth/kubernetes/role/k1", kube.clone(), Caps("auth/kubernetes/role/k1", &["update"])),
        row("DELETE", "auth/kubernetes/role/kdel", Value::Null, Caps("auth/kubernetes/role/kdel", &["delete"])),
        row("LIST", "auth/kubernetes/role/", Value::Null, Caps("auth/kubernetes/role/", &["list"])),
        row("GET", "auth/approle/role/r1", Value::Null, Caps("auth/approle/role/r1", &["read"])),
        row("POST", "auth/approle/role/new-{n}", e.clone(), Caps("auth/approle/role/new-*", &["create"])),
        row("POST", "auth/approle/role/r1", e.clone(), Caps("auth/approle/role/r1", &["update"])),
        row("DELETE", "auth/approle/role/rdel", Value::Null, Caps("auth/approle/role/rdel", &["delete"])),
        row("POST", "auth/userpass/login/u1", json!({"password": "wrong password!"}), Nobody),
        row("LIST", "auth/userpass/users", Value::Null, Caps("auth/userpass/users/", &["list"])),
        row("LIST", "auth/userpass/users/", Value::Null, Caps("auth/userpass/users/", &["list"])),
        row("GET", "auth/userpass/users/u1", Value::Null, Caps("auth/userpass/users/u1", &["read"])),
        row("POST", "auth/userpass/users/new-{n}", pw.clone(), Caps("auth/userpass/users/new-*", &["create"])),
        row("POST", "auth/userpass/users/u1", json!({"token_ttl": "5m"}), Caps("auth/userpass/users/u1", &["update"])),
        row("DELETE", "auth/userpass/users/udel", Value::Null, Caps("auth/userpass/users/udel", &["delete"])),
        row("GET", "auth/token/lookup-self", Value::Null, AnyToken),
        row("POST", "auth/token/renew-self", e.clone(), AnyToken),
        row("POST", "auth/token/lookup-self", e.clone(), AnyToken),
        row("POST", "auth/token/renew", json!({"token": "x"}), Caps("auth/token/renew", &["update"])),
        row("POST", "auth/token/create", json!({"policies": []}), Caps("auth/token/create", &["update"])),
        row(
            "POST",
            "auth/token/create-orphan",
            json!({"policies": []}),
            Caps("auth/token/create-orphan", &["update", "sudo"]),
        ),
        row("POST", "auth/token/lookup", json!({"token": "x"}), Caps("auth/token/lookup", &["update"])),
        row("POST", "auth/token/revoke", json!({"token": "x"}), Caps("auth/token/revoke", &["update"])),
        row("POST", "auth/token/revoke-self", e.clone(), AnyToken),
        row(
            "POST",
            "auth/token/lookup-accessor",
            json!({"accessor": "0123456789abcdef"}),
            Caps("auth/token/lookup-accessor", &["update"]),
        ),
        row(
            "POST",
            "auth/token/revoke-accessor",
            json!({"accessor": "0123456789abcdef"}),
            Caps("auth/token/revoke-accessor", &["update"]),
        ),
        row("LIST", "transit/keys", Value::Null, Caps("transit/keys/", &["list"])),
        row("LIST", "transit/keys/", Value::Null, Caps("transit/keys/", &["list"])),
        row("GET", "transit/keys/ta", Value::Null, Caps("transit/keys/ta", &["read"])),
        row("POST", "transit/keys/new-{n}", e.clone(), Caps("transit/keys/new-*", &["create"])),
        row("DELETE", "transit/keys/tdel", Value::Null, Caps("transit/keys/tdel", &["delete"])),
        row("POST", "transit/keys/ta/rotate", e.clone(), Caps("transit/keys/ta", &["rotate"])),
        row(
            "POST",
            "transit/keys/ta/config",
            json!({"min_decryption_version": 1}),
            Caps("transit/keys/ta", &["update"]),
        ),
        row("POST", "transit/encrypt/ta", json!({"plaintext": "aGk="}), Caps("transit/keys/ta", &["encrypt"])),
        row("POST", "transit/decrypt/ta", json!({"ciphertext": ct}), Caps("transit/keys/ta", &["decrypt"])),
        row("POST", "transit/rewrap/ta", json!({"ciphertext": ct}), Caps("transit/keys/ta", &["encrypt"])),
        row("POST", "transit/sign/te", json!({"input": "aGk="}), Caps("transit/keys/te", &["sign"])),
        row(
            "POST",
            "transit/verify/te",
            json!({"input": "aGk=", "signature": sig}),
            Caps("transit/keys/te", &["verify"]),
        ),
        row("POST", "transit/datakey/wrapped/ta", e.clone(), Caps("transit/keys/ta", &["encrypt"])),
        row("LIST", "gateway/producers", Value::Null, Caps("gateway/producers/", &["list"])),
        row("LIST", "gateway/producers/", Value::Null, Caps("gateway/producers/", &["list"])),
        row("GET", "gateway/producers/prod1", Value::Null, Caps("gateway/producers/prod1", &["read"])),
        row("POST", "gateway/producers/new-{n}", producer(), Caps("gateway/producers/new-*", &["create"])),
        row("POST", "gateway/producers/prod1", producer(), Caps("gateway/producers/prod1", &["update"])),
        row("DELETE", "gateway/producers/pdel", Value::Null, Caps("gateway/producers/pdel", &["delete"])),
        row("POST", "gateway/verify", json!({"identity": "prod1"}), Caps("gateway/verify", &["verify"])),
        row("LIST", "secret", Value::Null, Caps("secret/", &["list"])),
        row("LIST", "secret/", Value::Null, Caps("secret/", &["list"])),
        row("GET", "secret/app/x", Value::Null, Caps("secret/app/x", &["read"])),
        row("PUT", "secret/new-{n}", json!({"value": "v"}), Caps("secret/new-*", &["create"])),
        row("PUT", "secret/app/x", json!({"value": "w"}), Caps("secret/app/x", &["update"])),
        row("PUT", "secret/sgone", json!({"value": "w"}), Caps("secret/sgone", &["create"])),
        row("DELETE", "secret/sdel", Value::Null, Caps("secret/sdel", &["delete"])),
        row("LIST", "secret/app/", Value::Null, Caps("secret/app/", &["list"])),
    ]
}

async fn send(c: &Client, r: &Row, n: &mut u32, token: Option<&str>) -> Reply {
    send_with(c, r, n, token, &r.body).await
}

async fn send_with(c: &Client, r: &Row, n: &mut u32, token: Option<&str>, body: &Value) -> Reply {
    *n += 1;
    let path = r.path.replace("{n}", &n.to_string());
    let body = (!body.is_null()).then(|| body.to_string().into_bytes());
    c.send(r.method, &path, token, body).await
}

/// The row's body with one more field no endpoint reads (not for the key/value store,
/// whose fields are the secret).
fn with_unknown_field(r: &Row) -> Option<Value> {
    let mut body = r.body.clone();
    // Free-form bodies: a secret's fields and the data to wrap are the caller's own.
    if r.path.starts_with("secret/") || r.path == "sys/wrapping/wrap" || !matches!(r.method, "POST" | "PUT" | "PATCH") {
        return None;
    }
    body.as_object_mut()?.insert("zz_unknown".into(), json!(1));
    Some(body)
}

/// `GET sys/internal/ui/mounts` lists only the mounts a token may do something under, as
/// Vault does (before, every mount to any token): a token with rules under `secret/app/`
/// and `auth/approle/` sees `secret/` and `approle/`, not `kv/`, `transit/` or the other
/// auth methods; a token of no policy sees no secret mount; root sees every one.
#[tokio::test]
async fn the_mount_listing_shows_a_token_only_the_mounts_it_may_use() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let names = |r: &Reply, kind: &str| -> Vec<String> {
        let mut v: Vec<String> = r.body["data"][kind].as_object().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    let all = ok(c.get("sys/internal/ui/mounts", &root).await, 200);
    for m in ["secret/", "kv/", "transit/"] {
        assert!(names(&all, "secret").contains(&m.to_owned()), "root sees {m}: {all:?}");
    }
    assert!(names(&all, "auth").contains(&"approle/".to_owned()), "{all:?}");
    let policy = format!("{}\n{}", hcl("secret/app/*", &["read"]), hcl("auth/approle/role/+/role-id", &["read"]));
    let t = token_with(&c, &root, "some", Some(policy)).await;
    let mine = ok(c.get("sys/internal/ui/mounts", &t).await, 200);
    assert_eq!(names(&mine, "secret"), ["secret/"], "{mine:?}");
    assert!(names(&mine, "auth").contains(&"approle/".to_owned()), "{mine:?}");
    for hidden in ["cert/", "userpass/", "kubernetes/"] {
        assert!(!names(&mine, "auth").contains(&hidden.to_owned()), "{hidden}: {mine:?}");
    }
    let none = token_with(&c, &root, "unused", None).await;
    let nothing = ok(c.get("sys/internal/ui/mounts", &none).await, 200);
    assert!(names(&nothing, "secret").is_empty(), "{nothing:?}");
}

#[tokio::test]
async fn every_route_authorizes_by_vault_rules() {
    let s = TestServer::start(ServerOptions {
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 1000\nfailures_per_address = 1000\n".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    let (ct, sig) = fixtures(&c, &root).await;
    let mut table = rows(&ct, &sig);
    // Last: the emergency seal, then the unseal that reopens the token for the next test.
    let pin = secrecy::ExposeSecret::expose_secret(&s.token.pin).to_owned();
    table.push(row("PUT", "sys/seal", json!({}), Needs::Caps("sys/seal", &["update", "sudo"])));
    table.push(row("PUT", "sys/unseal", json!({ "key": pin }), Needs::Nobody));

    // Every route and operation of the mount table has a row.
    let mounts = keyvault::service::describe_mounts(&keyvault::config::default_mounts()).unwrap();
    let mut covered = BTreeSet::new();
    for r in &table {
        let op = operation(r.method, r.path);
        let path = r.path.replace("{n}", "1");
        let raw = path.split('?').next().unwrap();
        let resolved = mounts.resolve(op, raw).unwrap_or_else(|e| panic!("{} {}: {e}", r.method, r.path));
        covered.insert((resolved.describe("").trim().to_owned(), op));
    }
    let missing: Vec<String> = mounts
        .route_info()
        .into_iter()
        .filter(|info| !covered.contains(&(format!("/v1/{}", info.path), info.operation)))
        .map(|info| format!("{} /v1/{}", info.operation.name(), info.path))
        .collect();
    assert!(missing.is_empty(), "routes without a row in the authorization table: {missing:#?}");

    let mut n = 0u32;
    let mut policy = 0u32;
    let mut checked = 0;
    let mut warned = 0;
    for r in &table {
        let what = format!("{} {}", r.method, r.path);
        match r.needs {
            Needs::Nobody => {
                let reply = send(&c, r, &mut n, None).await;
                assert_ne!(reply.status, 403, "{what}: {reply:?}");
                assert_ne!(reply.body["errors"][0], "missing client token", "{what} must not need a token");
            }
            Needs::AnyToken => {
                let none = send(&c, r, &mut n, None).await;
                assert_eq!(none.status, 401, "{what} without a token: {none:?}");
                let t = token_with(&c, &root, "unused", None).await;
                let reply = send(&c, r, &mut n, Some(&t)).await;
                assert!(reply.status < 300, "{what} with a token of no policy: {reply:?}");
            }
            Needs::Preflight => {
                assert_eq!(send(&c, r, &mut n, None).await.status, 401, "{what} without a token");
                let t = token_with(&c, &root, "unused", None).await;
                assert_eq!(send(&c, r, &mut n, Some(&t)).await.status, 403, "{what} with a token of no policy");
                let t = token_with(&c, &root, "preflight", Some(hcl("secret/x", &["read"]))).await;
                let reply = send(&c, r, &mut n, Some(&t)).await;
                assert_eq!(reply.status, 200, "{what} with read on secret/x: {reply:?}");
            }
            Needs::Caps(path, caps) | Needs::CapsWith(path, caps, _) => {
                let with = match &r.needs {
                    Needs::CapsWith(_, _, extra) => format!("\n{extra}"),
                    _ => String::new(),
                };
                // Without a token: 401.
                assert_eq!(send(&c, r, &mut n, None).await.status, 401, "{what} without a token");
                // Every capability but the ones needed: 403.
                let others: Vec<&str> = ALL.iter().copied().filter(|a| !caps.contains(a)).collect();
                policy += 1;
                let t = token_with(&c, &root, &format!("t{policy}"), Some(hcl(path, &others) + &with)).await;
                let reply = send(&c, r, &mut n, Some(&t)).await;
                assert_eq!(reply.status, 403, "{what} with {others:?} on {path}: {reply:?}");
                // All but one of the ones needed: 403 (e.g. `sudo` without `update`).
                for missing in caps.iter().filter(|_| caps.len() > 1) {
                    let partial: Vec<&str> = caps.iter().copied().filter(|c| c != missing).collect();
                    policy += 1;
                    let t = token_with(&c, &root, &format!("t{policy}"), Some(hcl(path, &partial) + &with)).await;
                    let reply = send(&c, r, &mut n, Some(&t)).await;
                    assert_eq!(reply.status, 403, "{what} with {partial:?} on {path}: {reply:?}");
                }
                // Exactly the ones needed: through; and a field no endpoint reads is named
                // in the warnings, not refused (Vault's convention).
                policy += 1;
                let t = token_with(&c, &root, &format!("t{policy}"), Some(hcl(path, caps) + &with)).await;
                let body = with_unknown_field(r).unwrap_or_else(|| r.body.clone());
                let reply = send_with(&c, r, &mut n, Some(&t), &body).await;
                assert!(![401, 403].contains(&reply.status), "{what} with {caps:?} on {path}: {reply:?}");
                if with_unknown_field(r).is_some() && reply.status < 300 {
                    let warnings = reply.body["warnings"].to_string();
                    assert!(warnings.contains("zz_unknown"), "{what}: {reply:?}");
                    warned += 1;
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{checked} rows checked");
    assert!(warned > 20, "{warned} rows warned of an unknown field");
}

/// No request grants a policy its caller does not hold; `root` is never assignable.
#[tokio::test]
async fn no_request_grants_more_than_its_caller_holds() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("sys/policies/acl/admin", &root, json!({"policy": hcl("*", &ALL)})).await, 204);
    // The finding: a token whose only policy manages userpass users.
    let manage = ["create", "read", "update", "delete", "list"];
    let policy = [
        hcl("auth/userpass/users/*", &manage),
        hcl("auth/approle/role/*", &manage),
        hcl("auth/cert/role/*", &manage),
        hcl("auth/kubernetes/role/*", &manage),
        hcl("auth/bootstrap/token", &["update", "sudo"]),
    ]
    .join("\n");
    let mgr = token_with(&c, &root, "user-manager", Some(policy)).await;
    // Every endpoint that assigns policies, with the root policy in every spelling, and
    // with a policy the caller does not hold.
    type BodyFor = Box<dyn Fn(Value) -> Value>;
    let endpoints: Vec<(&str, BodyFor)> = vec![
        ("auth/userpass/users/mallory", Box::new(|p| json!({"password": "a long passphrase", "token_policies": p}))),
        ("auth/approle/role/mallory-a", Box::new(|p| json!({"token_policies": p}))),
        ("auth/cert/certs/mallory-c", Box::new(|p| json!({"allowed_common_names": ["m"], "token_policies": p}))),
        ("auth/cert/role/mallory-c2", Box::new(|p| json!({"allowed_common_names": ["m"], "token_policies": p}))),
        (
            "auth/kubernetes/role/mallory-k",
            Box::new(
                |p| json!({"bound_service_account_names": ["*"], "bound_service_account_namespaces": ["*"], "token_policies": p}),
            ),
        ),
        ("auth/bootstrap/token", Box::new(|p| json!({"policies": p}))),
    ];
    for (path, body) in &endpoints {
        for root_spelling in
            [json!(["root"]), json!("root"), json!(" ROOT "), json!("user-manager,root"), json!(["Root"])]
        {
            for who in [&mgr, &root] {
                let r = c.post(path, Some(who), body(root_spelling.clone())).await;
                assert_eq!(r.status, 400, "{path} {root_spelling}: {r:?}");
                assert!(r.body["errors"][0].as_str().unwrap().contains("root policy cannot be assigned"), "{r:?}");
            }
        }
        let r = c.post(path, Some(&mgr), body(json!(["admin"]))).await;
        assert_eq!(r.status, 403, "{path}: a policy the caller does not hold: {r:?}");
        // Its own policy it may hand on.
        let r = c.post(path, Some(&mgr), body(json!(["user-manager"]))).await;
        assert!(r.status < 300, "{path}: {r:?}");
    }
    // mallory exists with the caller's policy, never with root or admin.
    let r = ok(c.post("auth/userpass/login/mallory", None, json!({"password": "a long passphrase"})).await, 200);
    assert_eq!(r.body["auth"]["policies"], json!(["user-manager"]));
    // Updating a user without naming policies leaves them; naming one not held is refused.
    ok(c.post("auth/userpass/users/mallory", Some(&mgr), json!({"token_ttl": "5m"})).await, 204);
    ok(c.post("auth/userpass/users/mallory", Some(&mgr), json!({"token_policies": "admin"})).await, 403);
    let r = ok(c.get("auth/userpass/users/mallory", &root).await, 200);
    assert_eq!(r.body["data"]["token_policies"], json!(["user-manager"]));
    // `sudo` on sys/policies/grant/<name> lets an administrator hand out a policy it
    // does not use itself.
    let granter = token_with(
        &c,
        &root,
        "granter",
        Some(format!("{}\n{}", hcl("auth/approle/role/*", &manage), hcl("sys/policies/grant/admin", &["sudo"]))),
    )
    .await;
    ok(c.post("auth/approle/role/ops", Some(&granter), json!({"token_policies": ["admin"]})).await, 204);
    ok(c.post("auth/approle/role/ops2", Some(&granter), json!({"token_policies": ["user-manager"]})).await, 403);
}

/// The class beyond assigning policies: a request that makes a credential for something
/// that already has policies (a password reset, an AppRole secret id, the keys that sign
/// Kubernetes logins) hands out what that credential's logins get, so it needs the
/// caller to hold it too.
#[tokio::test]
async fn no_credential_is_made_for_more_than_its_caller_holds() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("sys/policies/acl/admin", &root, json!({"policy": hcl("*", &ALL)})).await, 204);
    let manage = ["create", "read", "update", "delete", "list", "sudo"];
    let policy = [
        hcl("auth/userpass/users/*", &manage),
        hcl("auth/approle/role/*", &manage),
        hcl("auth/kubernetes/config", &manage),
    ]
    .join("\n");
    let mgr = token_with(&c, &root, "manager", Some(policy)).await;

    // A password reset of a user whose logins get a policy the caller does not hold.
    let pw = json!({"password": "the owner's passphrase"});
    let mut alice = pw.clone();
    alice["token_policies"] = json!(["admin"]);
    ok(c.post("auth/userpass/users/alice", Some(&root), alice).await, 204);
    ok(c.post("auth/userpass/users/alice", Some(&mgr), json!({"password": "the attacker's passphrase"})).await, 403);
    ok(c.post("auth/userpass/users/alice", Some(&mgr), json!({"token_ttl": "1h"})).await, 403);
    ok(c.post("auth/userpass/login/alice", None, json!({"password": "the attacker's passphrase"})).await, 401);
    ok(c.post("auth/userpass/login/alice", None, pw.clone()).await, 200);
    // A user of the caller's own policy it may reset.
    let mut bob = pw.clone();
    bob["token_policies"] = json!(["manager"]);
    ok(c.post("auth/userpass/users/bob", Some(&root), bob).await, 204);
    ok(c.post("auth/userpass/users/bob", Some(&mgr), json!({"password": "a new passphrase here"})).await, 204);
    ok(c.post("auth/userpass/login/bob", None, json!({"password": "a new passphrase here"})).await, 200);

    // A secret id for a role whose logins get a policy, or an attribute, the caller does not hold.
    ok(c.post("auth/approle/role/prod", Some(&root), json!({"token_policies": ["admin"]})).await, 204);
    ok(c.post("auth/approle/role/tenant", Some(&root), json!({"token_attributes": {"tenant_id": "t1"}})).await, 204);
    ok(c.post("auth/approle/role/mine", Some(&root), json!({"token_policies": ["manager"]})).await, 204);
    for role in ["prod", "tenant"] {
        let r = c.post(&format!("auth/approle/role/{role}/secret-id"), Some(&mgr), json!({})).await;
        assert_eq!(r.status, 403, "{role}: {r:?}");
        assert!(r.body["data"].is_null(), "no secret id is shown: {r:?}");
    }
    let sid =
        ok(c.post("auth/approle/role/mine/secret-id", Some(&mgr), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    ok(c.post("auth", None, json!({"role": "mine", "secret_id": sid})).await, 200);

    // The Kubernetes issuer and keys sign a login for every role of the method, now and
    // later: no role that the caller could not grant exists yet, and still 403 (before,
    // the keys were set here, and signed logins for the role root makes next).
    let config = json!({"issuer": "https://attacker", "public_keys": "x", "audiences": ["a"]});
    ok(c.post("auth/kubernetes/config", Some(&mgr), config.clone()).await, 403);
    // A grant of everything a role can carry gets past the grant (to the keys' own check).
    let everything = [
        hcl("auth/kubernetes/config", &manage),
        hcl("sys/policies/grant/*", &["sudo"]),
        hcl("sys/token-attributes/grant/*", &["sudo"]),
        hcl("sys/token-attributes/audience/*", &["sudo"]),
    ];
    let kube_admin = token_with(&c, &root, "kube-admin", Some(everything.join("\n"))).await;
    ok(c.post("auth/kubernetes/config", Some(&kube_admin), config.clone()).await, 400);
    for missing in 1..everything.len() {
        let partial: Vec<&str> =
            everything.iter().enumerate().filter(|(i, _)| *i != missing).map(|(_, h)| h.as_str()).collect();
        let t = token_with(&c, &root, &format!("kube-partial-{missing}"), Some(partial.join("\n"))).await;
        ok(c.post("auth/kubernetes/config", Some(&t), config.clone()).await, 403);
    }
    // Not everything: a `+` where attribute grants have two segments (name, value), or a
    // narrower rule that refuses one policy.
    let narrow = [
        everything.join("\n").replace("sys/token-attributes/grant/*", "sys/token-attributes/grant/+"),
        format!("{}\n{}", everything.join("\n"), hcl("sys/policies/grant/admin", &["deny"])),
        format!("{}\n{}", everything.join("\n"), hcl("sys/token-attributes/audience/+", &["read"])),
    ];
    for (i, policy) in narrow.into_iter().enumerate() {
        let t = token_with(&c, &root, &format!("kube-narrow-{i}"), Some(policy)).await;
        ok(c.post("auth/kubernetes/config", Some(&t), config.clone()).await, 403);
    }
    ok(
        c.post(
            "auth/kubernetes/role/prod-k8s",
            Some(&root),
            json!({"bound_service_account_names": ["*"], "bound_service_account_namespaces": ["*"], "token_policies": ["admin"]}),
        )
        .await,
        204,
    );
    ok(c.post("auth/kubernetes/config", Some(&mgr), config.clone()).await, 403);
    // Root may (and gets past the grant to the keys' own check).
    ok(c.post("auth/kubernetes/config", Some(&root), config).await, 400);
}
