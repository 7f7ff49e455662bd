//! The request pipeline, route by route, generated from the mount table (not from a hand
//! list): every route that is not one of the few public ones refuses a token without the
//! capability (403) or no token at all (401); PUT and POST are the same operation; a `null`
//! body is `{}`; unknown body fields are named in the reply's warnings. A route added
//! later without authorization, or answering PUT differently from POST, fails here.
//!
//! And the mount table itself: `sys/mounts` and `sys/auth` list what the configuration
//! mounts, in Vault's shape, and an engine mounted at another path serves there (and is
//! authorized there).

use std::collections::BTreeSet;

use keyvault::logical::mounts::RouteInfo;
use keyvault::logical::{Access, Operation};
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, Value, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// The routes anyone may call without a token (health, logins, token-verification keys),
/// and those any valid token may call (its own lifecycle). Everything else needs a
/// capability: a new public route must be added here on purpose.
const PUBLIC: &[&str] = &[
    "sys/health",
    "sys/seal-status",
    "sys/leader",
    "sys/unseal",
    "sys/wrapping/unwrap",
    "sys/wrapping/lookup",
    "sys/wrapping/rewrap",
    "auth",
    "auth/jwks",
    "auth/approle/login",
    "auth/userpass/login/{user}",
    "auth/cert/login",
    "auth/kubernetes/login",
    "auth/bootstrap/login",
];
const ANY_TOKEN: &[&str] = &[
    "auth/token/lookup-self",
    "auth/token/renew-self",
    "auth/token/revoke-self",
    "sys/internal/ui/mounts",
    "sys/internal/ui/mounts/{*path}",
    "sys/capabilities-self",
];

/// The route's path with its parameters filled in (`n` keeps paths apart).
fn fill(pattern: &str, n: u32) -> String {
    pattern
        .split('/')
        .map(|seg| match seg {
            "{kind}" => "plaintext".to_owned(),
            s if s.starts_with('{') => format!("p{n}"),
            s => s.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The HTTP requests that are this operation: both PUT and POST for a write, both LIST and
/// `GET ?list=true` for a listing.
fn requests(info: &RouteInfo, n: u32) -> Vec<(&'static str, String)> {
    let path = fill(&info.path, n);
    match info.operation {
        Operation::Read => vec![("GET", path)],
        Operation::List => vec![("LIST", path.clone()), ("GET", format!("{path}?list=true"))],
        Operation::Write => vec![("PUT", path.clone()), ("POST", path)],
        Operation::Delete => vec![("DELETE", path)],
        Operation::Patch => vec![("PATCH", path)],
    }
}

/// A token with no policy at all, from a one-time bootstrap token.
async fn token_without_policies(c: &Client, root: &str) -> String {
    let b = ok(c.post("auth/bootstrap/token", Some(root), json!({"policies": []})).await, 200);
    let t = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let r = ok(c.post("auth/bootstrap/login", None, json!({ "token": t })).await, 200);
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

fn test_server() -> TestServer {
    TestServer::start(ServerOptions {
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 100000\nfailures_per_address = 100000\n".into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn every_route_is_authorized_and_follows_vaults_conventions() {
    let s = test_server();
    let c = s.client();
    let root = s.root.clone();
    let nobody = token_without_policies(&c, &root).await;
    let table = keyvault::service::describe_mounts(&keyvault::config::default_mounts()).unwrap();
    let routes = table.route_info();
    assert!(routes.len() > 60, "{} routes", routes.len());
    let mut n = 0u32;

    // Who may call what: exactly the listed routes are public or open to any token.
    let public: BTreeSet<&str> = routes
        .iter()
        .filter(|r| matches!(r.access, Access::Public | Access::Login | Access::LoginByRole))
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(public, PUBLIC.iter().copied().collect(), "public routes");
    let any: BTreeSet<&str> = routes.iter().filter(|r| r.access == Access::AnyToken).map(|r| r.path.as_str()).collect();
    assert_eq!(any, ANY_TOKEN.iter().copied().collect(), "routes open to any token");

    for info in &routes {
        n += 1;
        for (method, path) in requests(info, n) {
            let what = format!("{method} {path}");
            match info.access {
                Access::Public | Access::Login | Access::LoginByRole => {
                    let r = c.send(method, &path, None, Some(b"{}".to_vec())).await;
                    assert_ne!(r.body["errors"][0], "missing client token", "{what}: {r:?}");
                    assert!(![403, 405].contains(&r.status), "{what}: {r:?}");
                }
                Access::AnyToken => {
                    ok(c.send(method, &path, None, Some(b"{}".to_vec())).await, 401);
                }
                Access::Needs(_) | Access::Sudo(_) | Access::CreateOrUpdate | Access::Telemetry => {
                    ok(c.send(method, &path, None, Some(b"{}".to_vec())).await, 401);
                    let r = c.send(method, &path, Some(&nobody), Some(b"{}".to_vec())).await;
                    assert_eq!(r.status, 403, "{what} with a token of no policy: {r:?}");
                }
            }
        }
    }

    // PUT and POST are one operation: with a malformed body, both get the same answer (a
    // 400 for the body, or the 404 of what the path names) on every write route, logins
    // included; never 405.
    // Not `sys/seal` (it would seal the server for the routes after it) nor `sys/unseal`
    // (Vault's bare seal-status reply has no warnings): tests/tests/seal.rs has both.
    let sealing = |p: &str| matches!(p, "sys/seal" | "sys/unseal");
    for info in routes.iter().filter(|r| r.operation == Operation::Write && !sealing(&r.path)) {
        n += 1;
        let path = fill(&info.path, n);
        let put = c.send("PUT", &path, Some(&root), Some(b"{".to_vec())).await;
        let post = c.send("POST", &path, Some(&root), Some(b"{".to_vec())).await;
        assert!([400, 404].contains(&put.status), "PUT {path}: {put:?}");
        assert_eq!((post.status, &post.body), (put.status, &put.body), "POST {path} and PUT differ");
    }

    // A `null` body is `{}` (what `vault write -f` sends), and unknown fields are named in
    // the warnings, on every write route (the key/value store keeps whatever fields it is
    // given: they are the secret).
    let mut warned = 0;
    // Not `sys/seal` (it would seal the server for the routes after it) nor `sys/unseal`
    // (Vault's bare seal-status reply has no warnings): tests/tests/seal.rs has both.
    let sealing = |p: &str| matches!(p, "sys/seal" | "sys/unseal");
    for info in routes.iter().filter(|r| r.operation == Operation::Write && !sealing(&r.path)) {
        n += 1;
        let (a, b) = (fill(&info.path, n), fill(&info.path, n + 1000));
        let empty = c.send("POST", &a, Some(&root), Some(b"{}".to_vec())).await;
        let null = c.send("POST", &b, Some(&root), Some(b"null".to_vec())).await;
        // A refusal changed nothing, so the same request with `null` is refused alike.
        if empty.status >= 400 {
            let same = |r: &Reply, param: String| (r.status, r.body.to_string().replace(&param, "P"));
            let (pa, pb) = (format!("p{n}"), format!("p{}", n + 1000));
            assert_eq!(same(&null, pb), same(&empty, pa), "POST {b} with null and with {{}}");
        }
        let bad_json = null.body["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("invalid request body") && !e.contains("missing field"));
        assert!(!bad_json, "POST {b} with null: {null:?}");
        if info.path.starts_with("secret/") {
            continue;
        }
        n += 1;
        let path = fill(&info.path, n);
        let r = c.send("POST", &path, Some(&root), Some(br#"{"zz_unknown": 1}"#.to_vec())).await;
        if r.status < 300 {
            let warnings = r.body["warnings"].to_string();
            assert!(warnings.contains("zz_unknown"), "POST {path}: {r:?}");
            warned += 1;
        } else {
            let error = r.body["errors"][0].as_str().unwrap_or_default();
            assert!(!error.contains("zz_unknown"), "POST {path} refused the unknown field: {r:?}");
        }
    }
    // (The authorization table test sends valid bodies with an unknown field to every
    // write route; here, with made-up parameters, few get that far.)
    assert!(warned >= 3, "only {warned} write routes accepted a body of one unknown field");
}

/// A `null` body is `{}` where it matters to the CLI: `vault write -f transit/keys/k/rotate`.
#[tokio::test]
async fn null_bodies_and_put_work_like_the_vault_cli_sends_them() {
    let s = test_server();
    let c = s.client();
    let root = s.root.clone();
    ok(c.send("PUT", "transit/keys/k", Some(&root), Some(b"null".to_vec())).await, 200);
    let r = ok(c.send("PUT", "transit/keys/k/rotate", Some(&root), Some(b"null".to_vec())).await, 200);
    assert_eq!(r.body["data"]["latest_version"], 2);
    let r = ok(c.send("PUT", "auth/approle/role/web", Some(&root), None).await, 204);
    assert_eq!(r.body, Value::Null);
    let r = ok(c.send("PUT", "auth/approle/role/web/secret-id", Some(&root), Some(b"null".to_vec())).await, 200);
    assert!(r.body["data"]["secret_id"].is_string(), "{r:?}");
    // The warning names every unknown field, nested ones included.
    let r = ok(c.put("sys/policies/acl/p", &root, json!({"policy": "", "a": 1, "b": {"c": 2}})).await, 200);
    assert_eq!(r.body["warnings"], json!(["Endpoint ignored these unrecognized parameters: [a b]"]));
    // Duplicate keys and wrong types stay errors.
    let dup = br#"{"policy": "", "policy": "path \"*\" { capabilities = [\"sudo\"] }"}"#.to_vec();
    ok(c.send("PUT", "sys/policies/acl/p", Some(&root), Some(dup)).await, 400);
    ok(c.put("sys/policies/acl/p", &root, json!({"policy": 7})).await, 400);
}

#[tokio::test]
async fn sys_mounts_and_sys_auth_list_the_default_mounts_in_vaults_shape() {
    let s = test_server();
    let c = s.client();
    let root = s.root.clone();
    let r = ok(c.get("sys/mounts", &root).await, 200);
    let mounts = r.body["data"].as_object().unwrap();
    let kinds: Vec<(String, String)> =
        mounts.iter().map(|(k, v)| (k.clone(), v["type"].as_str().unwrap().to_owned())).collect();
    assert_eq!(
        kinds,
        vec![
            ("gateway/".into(), "gateway".into()),
            ("kv/".into(), "kv".into()),
            ("secret/".into(), "kv".into()),
            ("sys/".into(), "system".into()),
            ("transit/".into(), "transit".into()),
        ]
    );
    assert_eq!(mounts["secret/"]["options"]["version"], "1");
    assert_eq!(mounts["kv/"]["options"]["version"], "2");
    assert!(mounts["secret/"]["accessor"].as_str().unwrap().starts_with("kv_"));
    let r = ok(c.get("sys/auth", &root).await, 200);
    let methods: Vec<(&String, &str)> =
        r.body["data"].as_object().unwrap().iter().map(|(k, v)| (k, v["type"].as_str().unwrap())).collect();
    let expect = [
        ("approle/", "approle"),
        ("bootstrap/", "bootstrap"),
        ("cert/", "cert"),
        ("kubernetes/", "kubernetes"),
        ("token/", "token"),
        ("userpass/", "userpass"),
    ];
    assert_eq!(methods.len(), expect.len(), "{methods:?}");
    for ((k, t), (ek, et)) in methods.iter().zip(expect) {
        assert_eq!((k.as_str(), *t), (ek, et));
    }
}

#[tokio::test]
async fn an_engine_mounted_at_another_path_serves_and_is_authorized_there() {
    let mounts = r#"
[[mounts]]
path = "kv"
type = "kv"

[[mounts]]
path = "auth/machines"
type = "approle"

[[mounts]]
path = "auth/bootstrap"
type = "bootstrap"
"#;
    let s = TestServer::start(ServerOptions { extra: mounts.into(), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    // Served at the configured paths, and only there.
    ok(c.put("kv/app/db", &root, json!({"value": "v1"})).await, 200);
    assert_eq!(ok(c.get("kv/app/db", &root).await, 200).body["data"]["value"], "v1");
    ok(c.get("secret/app/db", &root).await, 404);
    ok(c.get("transit/keys", &root).await, 404);
    let r = ok(c.get("sys/mounts", &root).await, 200);
    let paths: Vec<&String> = r.body["data"].as_object().unwrap().keys().collect();
    assert_eq!(paths, vec!["kv/", "sys/"]);
    let r = ok(c.get("sys/auth", &root).await, 200);
    let paths: Vec<&String> = r.body["data"].as_object().unwrap().keys().collect();
    assert_eq!(paths, vec!["bootstrap/", "machines/", "token/"]);
    // AppRole at auth/machines: roles, secret ids and logins there; authorized on that path.
    ok(
        c.post(
            "sys/policies/acl/reader",
            Some(&root),
            json!({"policy": "path \"kv/app/*\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(c.post("auth/machines/role/web", Some(&root), json!({"token_policies": ["reader"]})).await, 204);
    ok(c.get("auth/approle/role/web", &root).await, 404);
    let role_id = ok(c.get("auth/machines/role/web/role-id", &root).await, 200).body["data"]["role_id"].clone();
    let sid =
        ok(c.post("auth/machines/role/web/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .clone();
    let t = ok(c.post("auth/machines/login", None, json!({"role_id": role_id, "secret_id": sid})).await, 200);
    let token = t.body["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(ok(c.get("kv/app/db", &token).await, 200).body["data"]["value"], "v1");
    // The short form finds the method wherever it is mounted.
    let sid =
        ok(c.post("auth/machines/role/web/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .clone();
    ok(c.post("auth", None, json!({"role": "web", "secret_id": sid})).await, 200);
    // A policy on the old path grants nothing at the new one.
    ok(
        c.post(
            "sys/policies/acl/old",
            Some(&root),
            json!({"policy": "path \"auth/approle/role/*\" { capabilities = [\"create\", \"update\", \"read\"] }"}),
        )
        .await,
        204,
    );
    ok(
        c.post(
            "sys/policies/acl/new",
            Some(&root),
            json!({"policy": "path \"auth/machines/role/*\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    let mint = |policies: Value| {
        let c = c.clone();
        let root = root.clone();
        async move {
            let b = ok(c.post("auth/bootstrap/token", Some(&root), json!({ "policies": policies })).await, 200);
            let t = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
            let r = ok(c.post("auth/bootstrap/login", None, json!({ "token": t })).await, 200);
            r.body["auth"]["client_token"].as_str().unwrap().to_owned()
        }
    };
    let old = mint(json!(["old"])).await;
    ok(c.get("auth/machines/role/web", &old).await, 403);
    let new = mint(json!(["new"])).await;
    ok(c.get("auth/machines/role/web", &new).await, 200);
}

#[tokio::test]
async fn a_configuration_with_overlapping_or_misplaced_mounts_is_refused_at_start() {
    for (mounts, expect) in [
        (
            "[[mounts]]\npath = \"secret\"\ntype = \"kv\"\n[[mounts]]\npath = \"secret/inner\"\ntype = \"transit\"\n",
            "overlaps",
        ),
        ("[[mounts]]\npath = \"approle\"\ntype = \"approle\"\n", "auth methods are mounted under auth/"),
        ("[[mounts]]\npath = \"auth/kv\"\ntype = \"kv\"\n", "auth methods are mounted under auth/"),
        ("[[mounts]]\npath = \"sys/kv\"\ntype = \"kv\"\n", "reserved"),
        ("[[mounts]]\npath = \"a\"\ntype = \"kv\"\n[[mounts]]\npath = \"b\"\ntype = \"kv\"\n", "mounted twice"),
        ("[[mounts]]\npath = \"x\"\ntype = \"nosuch\"\n", "unknown type"),
        ("[[mounts]]\npath = \"a/../b\"\ntype = \"kv\"\n", "not a valid path"),
        (
            "[[mounts]]\npath = \"a\"\ntype = \"kv\"\n[mounts.options]\nversion = 2\n",
            "kv takes no options (got version)",
        ),
    ] {
        let config: keyvault::config::Config = toml::from_str(&format!(
            "[listener]\naddress = \"127.0.0.1:0\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\n\
             [storage]\ntype = \"sled\"\npath = \"s\"\n[hsm]\nmodule = \"m\"\ntoken_label = \"t\"\npin_file = \"p\"\n\
             [audit]\npath = \"a\"\n{mounts}"
        ))
        .unwrap();
        let e = keyvault::service::describe_mounts(&config.mounts).unwrap_err().to_string();
        assert!(e.contains(expect), "{mounts}: {e}");
    }
}

/// `X-Vault-Namespace` naming another namespace is refused, not served from the only one
/// KeyVault has; the root namespace is this one.
#[tokio::test]
async fn a_request_for_another_namespace_is_refused() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("secret/ns", &root, json!({"v": "root namespace"})).await, 200);
    let with_ns = |ns: &str| {
        c.http.get(c.url("secret/ns")).header("X-Vault-Token", root.as_str()).header("X-Vault-Namespace", ns).send()
    };
    for ns in ["team1", "team1/", "admin/team1"] {
        let r = Client::reply(with_ns(ns).await.unwrap()).await;
        assert_eq!(r.status, 400, "{ns}: {r:?}");
        assert_eq!(r.body["errors"][0], "namespaces are not supported: KeyVault has only the root namespace");
    }
    for ns in ["", "root", "root/"] {
        let r = Client::reply(with_ns(ns).await.unwrap()).await;
        assert_eq!(r.body["data"]["v"], "root namespace", "{ns:?}: {r:?}");
    }
}
