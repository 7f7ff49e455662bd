//! Mounts served by OpenBao (`type = "hashicorp"`), against a real OpenBao dev server
//! started here (TLS with its own CA): the unit's journey over mutual TLS through
//! KeyVault, versions, policies and audit as for an embedded mount, AppRole and token
//! auth to the upstream, the upstream token renewed, the upstream restarted and down
//! (with and without `stale_if_error`, the circuit breaker); and the conformance suite,
//! against the adapter on OpenBao (KV versions 1 and 2) and on KeyVault's own KV engines.

use std::path::Path;

use keyvault_proxy_backends::hashicorp::{AuthConfig, HashicorpBackend, HashicorpConfig};
use keyvault_tests::bao::OpenBaoDev;
use keyvault_tests::pki::TestCa;
use keyvault_tests::server::{ServerOptions, TestServer, default_mounts_toml};
use keyvault_tests::{Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// On the upstream: `kv/` (version 2) besides the dev server's `secret/` (version 1), a
/// policy for KeyVault and an AppRole role with it (token TTL `ttl`). Writes KeyVault's
/// upstream credentials into `dir`: `upstream-token` (the root token, for token auth)
/// and `secret-id`. Returns the role id.
fn prepare_upstream(bao: &OpenBaoDev, dir: &Path, ttl: &str) -> String {
    if !bao.ok(&["secrets", "list"]).contains("kv/") {
        bao.ok(&["secrets", "enable", "-path=kv", "kv-v2"]);
        bao.ok(&["auth", "enable", "approle"]);
    }
    let policy = dir.join("keyvault.hcl");
    std::fs::write(&policy, "path \"secret/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\npath \"kv/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\n").unwrap();
    bao.ok(&["policy", "write", "keyvault", policy.to_str().unwrap()]);
    bao.ok(&[
        "write",
        "auth/approle/role/keyvault",
        "token_policies=keyvault",
        &format!("token_ttl={ttl}"),
        "token_max_ttl=1h",
    ]);
    let role_id = bao.ok(&["read", "-field=role_id", "auth/approle/role/keyvault/role-id"]);
    let secret_id = bao.ok(&["write", "-f", "-field=secret_id", "auth/approle/role/keyvault/secret-id"]);
    std::fs::write(dir.join("secret-id"), secret_id).unwrap();
    std::fs::write(dir.join("upstream-token"), &bao.root).unwrap();
    role_id
}

/// Where KeyVault's upstream credentials are (see [`prepare_upstream`]).
struct Upstream<'a> {
    bao: &'a OpenBaoDev,
    dir: &'a Path,
    role_id: &'a str,
}

/// A `[[mounts]]` entry of type `hashicorp`; `auth` is `token` or `approle`.
fn mount(u: &Upstream, path: &str, upstream: &str, kv: u8, auth: &str, extra: &str) -> String {
    let (bao, dir, role_id) = (u.bao, u.dir, u.role_id);
    let auth = match auth {
        "token" => format!("auth = {{ token = {{ token_file = \"{}\" }} }}", dir.join("upstream-token").display()),
        _ => format!(
            "auth = {{ approle = {{ role_id = \"{role_id}\", secret_id_file = \"{}\" }} }}",
            dir.join("secret-id").display()
        ),
    };
    let ca = bao.ca_file.as_ref().map(|f| format!("ca_file = \"{}\"\n", f.display())).unwrap_or_default();
    format!(
        "[[mounts]]\npath = \"{path}\"\ntype = \"hashicorp\"\n[mounts.options]\naddress = \"{}\"\nmount = \"{upstream}\"\n\
         kv_version = {kv}\n{ca}{auth}\n{extra}\n",
        bao.addr,
    )
}

fn keyvault_with(mounts: &str, ca: Option<&TestCa>) -> TestServer {
    TestServer::start(ServerOptions {
        client_auth: if ca.is_some() { "optional" } else { "" },
        client_ca_pem: ca.map(TestCa::pem),
        extra: format!("{}{mounts}", default_mounts_toml()),
        ..Default::default()
    })
}

/// The adapter pointed at a Vault-API server: OpenBao, or KeyVault itself.
fn adapter(address: &str, ca: &Path, mount: &str, kv: u8, token_file: &Path) -> HashicorpBackend {
    HashicorpBackend::new(HashicorpConfig {
        address: address.into(),
        mount: mount.into(),
        kv_version: kv,
        namespace: None,
        ca_file: Some(ca.to_owned()),
        auth: AuthConfig::Token { token_file: token_file.to_owned() },
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_reads_secrets_kept_in_openbao_through_keyvault() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    bao.ok(&["kv", "put", "-mount=kv", "app/db", "password=from-openbao-1"]);
    bao.ok(&["kv", "put", "-mount=kv", "app/db", "password=from-openbao-2"]);
    bao.ok(&["kv", "put", "-mount=secret", "app/api", "key=v1-upstream"]);
    let ca = TestCa::new("unit CA");
    let unit = ca.leaf("unit-a", &[], 21, false);
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let mounts = mount(&up, "legacy", "kv", 2, "approle", "") + &mount(&up, "legacy1", "secret", 1, "token", "");
    let s = keyvault_with(&mounts, Some(&ca));
    let c = s.client();
    let root = s.root.clone();

    // The unit: a cert role, a policy on the proxied mount, mutual TLS, nothing else.
    let policy =
        "path \"legacy/app/*\" { capabilities = [\"read\"] }\npath \"legacy1/app/*\" { capabilities = [\"read\"] }";
    ok(c.put("sys/policies/acl/unit", &root, json!({ "policy": policy })).await, 204);
    let role = json!({"certificate_sha256": [unit.sha256_hex], "token_policies": ["unit"]});
    ok(c.post("auth/cert/role/unit", Some(&root), role).await, 204);
    let u = s.client_with(&unit);
    let login = ok(u.post("auth/cert/login", None, json!({"name": "unit"})).await, 200);
    let t = login.body["auth"]["client_token"].as_str().unwrap().to_owned();
    let r = ok(u.get("legacy/app/db", &t).await, 200);
    assert_eq!(r.body["data"]["password"], "from-openbao-2");
    assert_eq!(r.body["metadata"]["version"], 2);
    let r = ok(u.get("legacy/app/db?version=1", &t).await, 200);
    assert_eq!(r.body["data"]["password"], "from-openbao-1");
    let r = ok(u.get("legacy1/app/api", &t).await, 200);
    assert_eq!(r.body["data"]["key"], "v1-upstream");
    // KeyVault's policies hold on the proxied mount: no write, nothing outside app/.
    ok(u.put("legacy/app/db", &t, json!({"password": "mine"})).await, 403);
    ok(u.get("legacy/other", &t).await, 403);
    // Asking for the upstream itself changes nothing to authorization.
    let no_cache =
        |path: &str| u.http.get(u.url(path)).header("X-Vault-Token", &t).header("Cache-Control", "no-cache").send();
    assert_eq!(no_cache("legacy/other").await.unwrap().status(), 403);
    assert_eq!(no_cache("legacy/app/db").await.unwrap().status(), 200);
    ok(u.get("legacy/app/missing", &t).await, 404);
    // The same token is bound to the unit's certificate, on this mount as on any.
    ok(c.get("legacy/app/db", &t).await, 401);

    // Writes go through to the upstream (a version there), and are read back at once.
    let w = ok(c.put("legacy/app/db", &root, json!({"password": "from-keyvault-3"})).await, 200);
    assert_eq!(w.body["data"]["version"], 3);
    assert_eq!(bao.ok(&["kv", "get", "-mount=kv", "-field=password", "app/db"]), "from-keyvault-3");
    assert_eq!(ok(u.get("legacy/app/db", &t).await, 200).body["data"]["password"], "from-keyvault-3");
    // Sixteen updates at once: each is a check-and-set on the version it saw, so none is
    // lost: every 200 made exactly one version, the others are 409.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(
                async move { c.put("legacy/app/db", &root, json!({ "password": format!("racer-{i}") })).await },
            )
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => won += 1,
            409 => {}
            _ => panic!("{r:?}"),
        }
    }
    assert!(won >= 1);
    let meta = bao.ok(&["kv", "metadata", "get", "-mount=kv", "-format=json", "app/db"]);
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["data"]["current_version"], 3 + won, "one version per successful write");
    // A caller that may only update: an update of a KV version 2 upstream's secret is a
    // check-and-set, so it goes through; a write of a secret that does not exist is a
    // create (403). One that may only create: refused before anything is sent (no
    // upstream has a create-only-if-absent this mount uses), on either mount.
    let only = |cap: &'static str| {
        let (c, root) = (c.clone(), root.clone());
        async move {
            let policy = format!(
                "path \"legacy/app/*\" {{ capabilities = [\"{cap}\"] }}\npath \"legacy1/app/*\" {{ capabilities = [\"{cap}\"] }}"
            );
            ok(c.put(&format!("sys/policies/acl/only-{cap}"), &root, json!({ "policy": policy })).await, 204);
            let r =
                ok(c.post("auth/token/create", Some(&root), json!({ "policies": [format!("only-{cap}")] })).await, 200);
            r.body["auth"]["client_token"].as_str().unwrap().to_owned()
        }
    };
    let (updater, creator) = (only("update").await, only("create").await);
    let before = meta["data"]["current_version"].as_u64().unwrap();
    let w = ok(c.put("legacy/app/db", &updater, json!({"password": "updated-only"})).await, 200);
    assert_eq!(w.body["data"]["version"], before + 1);
    ok(c.put("legacy/app/new-one", &updater, json!({"password": "x"})).await, 403);
    ok(c.put("legacy/app/fresh", &creator, json!({"password": "x"})).await, 403);
    ok(c.put("legacy/app/db", &creator, json!({"password": "x"})).await, 403);
    ok(c.put("legacy1/app/fresh", &creator, json!({"key": "x"})).await, 403);
    assert_eq!(bao.ok(&["kv", "get", "-mount=kv", "-field=password", "app/db"]), "updated-only");
    // Its latest version soft-deleted upstream: the secret keeps that version (the
    // upstream answers its read 404 with the metadata), so writing it is an update, a
    // check-and-set on that version, as Vault's own existence check says.
    bao.ok(&["kv", "delete", "-mount=kv", "app/db"]);
    ok(c.get("legacy/app/db", &root).await, 404);
    let w = ok(c.put("legacy/app/db", &updater, json!({"password": "after-delete"})).await, 200);
    assert_eq!(w.body["data"]["version"], before + 2);
    assert_eq!(bao.ok(&["kv", "get", "-mount=kv", "-field=password", "app/db"]), "after-delete");
    let absent = bao.cli(&["kv", "get", "-mount=kv", "app/fresh"]);
    assert!(!absent.status.success(), "nothing was sent upstream for the create-only caller");
    let l = ok(c.send("LIST", "legacy/app", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["db"]));
    ok(c.send("DELETE", "legacy1/app/api", Some(&root), None).await, 204);
    ok(c.get("legacy1/app/api", &root).await, 404);
    // Vault's tools see a KV version 1 mount.
    let m = ok(c.get("sys/internal/ui/mounts/legacy", &root).await, 200);
    assert_eq!(m.body["data"]["options"]["version"], "1", "{m:?}");

    // Audited as an embedded request: the path, never the value.
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(audit.contains("legacy/app/db"));
    // The upstream's credentials are in no reply and no log line of KeyVault.
    let secret_id = std::fs::read_to_string(dir.path().join("secret-id")).unwrap();
    let log = s.log_text();
    for (what, v) in [("upstream root token", bao.root.as_str()), ("upstream secret id", secret_id.trim())] {
        assert!(!log.contains(v) && !audit.contains(v), "{what} leaked");
    }
    for v in ["from-openbao-1", "from-openbao-2", "from-keyvault-3"] {
        assert!(!log.contains(v) && !audit.contains(v), "a secret value is in a log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_adapter_and_keyvaults_own_engines_pass_the_conformance_suite() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let bao_ca = bao.ca_file.clone().unwrap();
    let token = dir.path().join("upstream-token");
    // The adapter on OpenBao, KV version 1 and 2.
    let v1 = adapter(&bao.addr, &bao_ca, "secret", 1, &token);
    keyvault_proxy_backends::conformance::run(&v1, "conf-v1").await;
    let v2 = adapter(&bao.addr, &bao_ca, "kv", 2, &token);
    keyvault_proxy_backends::conformance::run(&v2, "conf-v2").await;

    // KeyVault's own engines (secret/ and kv/), and a proxied mount, through the same
    // adapter: KeyVault speaks Vault's API.
    let s = keyvault_with(&mount(&up, "legacy", "kv", 2, "token", ""), None);
    let kv_token = dir.path().join("keyvault-token");
    std::fs::write(&kv_token, &s.root).unwrap();
    let embedded1 = adapter(&s.addr, &s.server_ca_file, "secret", 1, &kv_token);
    keyvault_proxy_backends::conformance::run(&embedded1, "conf-embedded-v1").await;
    let embedded2 = adapter(&s.addr, &s.server_ca_file, "kv", 2, &kv_token);
    keyvault_proxy_backends::conformance::run(&embedded2, "conf-embedded-v2").await;
    let proxied = adapter(&s.addr, &s.server_ca_file, "legacy", 1, &kv_token);
    keyvault_proxy_backends::conformance::run(&proxied, "conf-proxied").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_restarts_or_dies_is_retried_served_stale_or_503() {
    // Plain HTTP: a restarted `-dev-tls` server makes itself a new CA.
    let mut bao = OpenBaoDev::start(false);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    bao.ok(&["kv", "put", "-mount=secret", "db", "password=before"]);
    // `fresh`: no cache. `stale`: a value 1 ms old is past its ttl, and served for
    // an hour more while the upstream is down.
    let stale = "[mounts.options.cache]\nttl = \"1ms\"\nnegative_ttl = \"1ms\"\nstale_if_error = \"1h\"\n\
                 [mounts.options.resilience]\ntimeout = \"2s\"\nattempts = 2\nbreaker_failures = 3\nbreaker_cooldown = \"1h\"\n";
    let fresh = "[mounts.options.cache]\nttl = 0\n[mounts.options.resilience]\ntimeout = \"2s\"\nattempts = 2\nbreaker_failures = 3\nbreaker_cooldown = \"1h\"\n";
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let mounts = mount(&up, "fresh", "secret", 1, "token", fresh) + &mount(&up, "stale", "secret", 1, "token", stale);
    let s = keyvault_with(&mounts, None);
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(ok(c.get("fresh/db", &root).await, 200).body["data"]["password"], "before");
    assert_eq!(ok(c.get("stale/db", &root).await, 200).body["data"]["password"], "before");

    // Restarted (in memory, so empty; same root token): KeyVault reconnects.
    bao.restart();
    ok(c.get("stale/db", &root).await, 404);
    bao.ok(&["kv", "put", "-mount=secret", "db", "password=after"]);
    assert_eq!(ok(c.get("fresh/db", &root).await, 200).body["data"]["password"], "after");
    assert_eq!(ok(c.get("stale/db", &root).await, 200).body["data"]["password"], "after");

    // Down: without stale_if_error, 503 naming the upstream's failure (never its
    // credentials); with it, the last value.
    bao.stop();
    let r = ok(c.get("fresh/db", &root).await, 503);
    let msg = r.body["errors"][0].as_str().unwrap().to_owned();
    assert!(msg.starts_with("upstream unavailable: upstream read: cannot connect"), "{msg}");
    assert!(!msg.contains(&bao.root));
    assert_eq!(ok(c.get("stale/db", &root).await, 200).body["data"]["password"], "after");
    // A path never read has no stale value.
    ok(c.get("stale/never-read", &root).await, 503);
    // After 3 failed calls the breaker opens: calls fail at once, without trying.
    for _ in 0..3 {
        ok(c.get("fresh/other", &root).await, 503);
    }
    let r = ok(c.get("fresh/db", &root).await, 503);
    assert!(r.body["errors"][0].as_str().unwrap().contains("circuit open"), "{r:?}");
    // Writes are not served from a cache: 503.
    ok(c.put("stale/db", &root, json!({"password": "x"})).await, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyvault_renews_its_short_lived_upstream_token() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    // 6 s leases: renewed at 4 s, 2 s before OpenBao would refuse them.
    let role_id = prepare_upstream(&bao, dir.path(), "6s");
    bao.ok(&["kv", "put", "-mount=kv", "app/db", "password=renewed"]);
    let nocache = "[mounts.options.cache]\nttl = 0\n";
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let s = keyvault_with(&mount(&up, "legacy", "kv", 2, "approle", nocache), None);
    let c = s.client();
    let root = s.root.clone();
    ok(c.get("legacy/app/db", &root).await, 200);
    // Renewed at two thirds of each 6 s lease: two renewals take at least 8 s, past the
    // first lease.
    keyvault_tests::wait_for(std::time::Duration::from_secs(60), "two upstream token renewals", || {
        s.log_text().matches("upstream token renewed").count() >= 2
    })
    .await;
    assert_eq!(ok(c.get("legacy/app/db", &root).await, 200).body["data"]["password"], "renewed");
    let log = s.log_text();
    assert!(log.matches("upstream token renewed").count() >= 2, "renewals: {log}");
    assert_eq!(log.matches("logged in to the upstream (AppRole)").count(), 1, "one login, then renewals");
    assert!(!log.contains("obtaining a new token"));
}

/// Vault answers 403 both for a token it no longer knows and for a path its policy
/// denies. A path the upstream denies does not make KeyVault log in again at each read
/// (each login would use up a use of the secret id and leave a token behind): it asks
/// whether its token still stands first. A revoked token is still replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_the_upstream_denies_does_not_make_keyvault_log_in_again() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    // A mount KeyVault's upstream policy does not cover.
    bao.ok(&["secrets", "enable", "-path=closed", "kv-v2"]);
    bao.ok(&["kv", "put", "-mount=closed", "x", "password=not-for-keyvault"]);
    bao.ok(&["kv", "put", "-mount=kv", "app/db", "password=open"]);
    let nocache = "[mounts.options.cache]\nttl = 0\n[mounts.options.resilience]\nbreaker_failures = 100\n";
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let mounts = mount(&up, "shut", "closed", 2, "approle", nocache) + &mount(&up, "open", "kv", 2, "approle", nocache);
    let s = keyvault_with(&mounts, None);
    let c = s.client();
    let root = s.root.clone();
    for _ in 0..5 {
        let r = c.get("shut/x", &root).await;
        assert_ne!(r.status, 200, "{r:?}");
        assert!(!r.body.to_string().contains("not-for-keyvault"), "{r:?}");
    }
    let logins = |log: &str| log.matches("logged in to the upstream (AppRole)").count();
    assert_eq!(logins(&s.log_text()), 1, "one login for the denied mount: {}", s.log_text());
    assert_eq!(ok(c.get("open/app/db", &root).await, 200).body["data"]["password"], "open");
    // KeyVault's token on the upstream revoked behind its back: the next read logs in again.
    bao.ok(&["lease", "revoke", "-prefix", "auth/approle/login"]);
    assert_eq!(ok(c.get("open/app/db", &root).await, 200).body["data"]["password"], "open");
    assert_eq!(logins(&s.log_text()), 3, "{}", s.log_text());
}

/// `keyvault operator migrate`: success, and its stdout, or failure, and its stderr.
fn try_migrate(s: &TestServer, from: &str, to: &str, extra: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "migrate", "--address", &s.addr, "--ca-file"])
        .arg(&s.server_ca_file)
        .args(["--from", from, "--to", to, "--prefix", "mig"])
        .args(extra)
        .env("KEYVAULT_TOKEN", &s.root)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[track_caller]
fn migrate(s: &TestServer, from: &str, to: &str, extra: &[&str]) -> String {
    try_migrate(s, from, to, extra).unwrap_or_else(|e| panic!("migrate {from} -> {to}: {e}"))
}

/// 1,000 secrets from the embedded store to OpenBao and back into the embedded KV version
/// 2 engine: every value equal; a dry run writes nothing; a second run copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_secrets_move_to_openbao_and_back_by_configuration() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let s = keyvault_with(&mount(&up, "legacy", "kv", 2, "approle", ""), None);
    let c = s.client();
    let root = s.root.clone();
    let value = |i: usize| format!("value-{i}-\u{e9}\"{}", i * 7919);
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        let writes = chunk.iter().map(|&i| {
            let (c, root) = (c.clone(), root.clone());
            async move { c.put(&format!("secret/mig/d{}/s{i}", i % 10), &root, json!({ "v": value(i), "n": i })).await }
        });
        for r in futures_util::future::join_all(writes).await {
            ok(r, 200);
        }
    }

    assert_eq!(
        migrate(&s, "secret", "legacy", &["--dry-run"]),
        "would copy 1000 secrets from secret to legacy; 0 already equal"
    );
    ok(c.get("legacy/mig/d3/s3", &root).await, 404);
    assert_eq!(migrate(&s, "secret", "legacy", &[]), "copied 1000 secrets from secret to legacy; 0 already equal");
    // In OpenBao itself.
    assert_eq!(bao.ok(&["kv", "get", "-mount=kv", "-field=v", "mig/d7/s997"]), value(997));
    // Again: nothing to do (how a run that stopped half way resumes).
    assert_eq!(migrate(&s, "secret", "legacy", &[]), "copied 0 secrets from secret to legacy; 1000 already equal");
    // And back, into the embedded KV version 2 engine.
    assert_eq!(migrate(&s, "legacy", "kv", &[]), "copied 1000 secrets from legacy to kv; 0 already equal");
    for i in 0..1000 {
        let r = ok(c.get(&format!("kv/data/mig/d{}/s{i}", i % 10), &root).await, 200);
        assert_eq!(r.body["data"]["data"]["v"], value(i));
        assert_eq!(r.body["data"]["data"]["n"], i);
    }
}

/// `--all-versions`: every live version of the embedded KV version 2 engine's secrets,
/// oldest first, into OpenBao's KV version 2 through a proxied mount; a deleted version
/// is skipped; a later run copies only the versions written since; a destination whose
/// history differs is left alone and named; a mount without numbered versions is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_moves_where_both_sides_keep_versions() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let s = keyvault_with(&mount(&up, "legacy", "kv", 2, "token", ""), None);
    let (c, root) = (s.client(), s.root.clone());
    let options = ok(c.get("sys/internal/ui/mounts/legacy", &root).await, 200).body["data"]["options"].clone();
    assert_eq!(options, json!({ "version": "1", "upstream": "hashicorp", "versions": "numbered" }));

    for (name, values) in [("a", &["a1", "a2", "a3"][..]), ("b", &["b1", "b2"][..]), ("c", &["c1"][..])] {
        for v in values {
            ok(c.put(&format!("kv/data/mig/{name}"), &root, json!({ "data": { "v": v } })).await, 200);
        }
    }
    ok(c.post("kv/delete/mig/b", Some(&root), json!({ "versions": [1] })).await, 204);

    let refused = try_migrate(&s, "kv", "secret", &["--all-versions"]).unwrap_err();
    assert!(refused.contains("secret/ does not"), "{refused}");
    assert_eq!(
        migrate(&s, "kv", "legacy", &["--all-versions", "--dry-run"]),
        "would copy 3 secrets (5 versions) from kv to legacy; 0 already equal"
    );
    ok(c.get("legacy/mig/a", &root).await, 404);
    assert_eq!(
        migrate(&s, "kv", "legacy", &["--all-versions"]),
        "copied 3 secrets (5 versions) from kv to legacy; 0 already equal"
    );
    let upstream = |args: &[&str]| bao.ok(&[&["kv", "get", "-mount=kv", "-field=v"][..], args].concat());
    assert_eq!(upstream(&["-version=1", "mig/a"]), "a1");
    assert_eq!(upstream(&["-version=2", "mig/a"]), "a2");
    assert_eq!(upstream(&["mig/a"]), "a3");
    assert_eq!(upstream(&["mig/b"]), "b2", "the deleted b1 is not copied");
    let meta: serde_json::Value =
        serde_json::from_str(&bao.ok(&["kv", "metadata", "get", "-mount=kv", "-format=json", "mig/b"])).unwrap();
    assert_eq!(meta["data"]["current_version"], 1, "{meta}");
    let r = ok(c.get("legacy/mig/a?version=2", &root).await, 200);
    assert_eq!((r.body["data"]["v"].as_str(), r.body["metadata"]["version"].as_u64()), (Some("a2"), Some(2)));

    // Resumes: only what was written since.
    ok(c.put("kv/data/mig/a", &root, json!({ "data": { "v": "a4" } })).await, 200);
    assert_eq!(
        migrate(&s, "kv", "legacy", &["--all-versions"]),
        "copied 1 secrets (1 versions) from kv to legacy; 2 already equal"
    );
    assert_eq!(upstream(&["-version=4", "mig/a"]), "a4");

    // A name with characters a URL reads as syntax (a space, `?`, an encoded dot) moves
    // as that name (before, migrate put names into paths as they were: `?` began a query).
    ok(c.put("kv/data/mig/we%20ird%3F%252e", &root, json!({ "data": { "v": "odd" } })).await, 200);
    assert_eq!(
        migrate(&s, "kv", "legacy", &["--all-versions"]),
        "copied 1 secrets (1 versions) from kv to legacy; 3 already equal"
    );
    let r = ok(c.get("legacy/mig/we%20ird%3F%252e", &root).await, 200);
    assert_eq!(r.body["data"]["v"], "odd");

    // A history of its own upstream is not overwritten.
    bao.ok(&["kv", "put", "-mount=kv", "mig/c", "v=changed-upstream"]);
    let conflict = try_migrate(&s, "kv", "legacy", &["--all-versions"]).unwrap_err();
    assert!(
        conflict.contains("1 secrets hold another value at legacy and were left alone") && conflict.contains("mig/c"),
        "{conflict}"
    );
    assert_eq!(upstream(&["mig/c"]), "changed-upstream");
}

/// An upstream namespace: the mount reads the namespace's KV mount, not the root one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_reads_an_upstream_namespace() {
    let bao = OpenBaoDev::start(true);
    let dir = tempfile::tempdir().unwrap();
    let role_id = prepare_upstream(&bao, dir.path(), "1h");
    bao.ok(&["namespace", "create", "team1"]);
    bao.ok(&["secrets", "enable", "-ns=team1", "-path=kv", "kv-v2"]);
    bao.ok(&["kv", "put", "-ns=team1", "-mount=kv", "app/db", "password=in-team1"]);
    bao.ok(&["kv", "put", "-mount=kv", "app/db", "password=in-root"]);
    let up = Upstream { bao: &bao, dir: dir.path(), role_id: &role_id };
    let mounts =
        mount(&up, "team1", "kv", 2, "token", "namespace = \"team1\"") + &mount(&up, "rootns", "kv", 2, "token", "");
    let s = keyvault_with(&mounts, None);
    let c = s.client();
    let root = s.root.clone();
    assert_eq!(ok(c.get("team1/app/db", &root).await, 200).body["data"]["password"], "in-team1");
    assert_eq!(ok(c.get("rootns/app/db", &root).await, 200).body["data"]["password"], "in-root");
    ok(c.put("team1/app/new", &root, json!({"password": "written-in-team1"})).await, 200);
    assert_eq!(bao.ok(&["kv", "get", "-ns=team1", "-mount=kv", "-field=password", "app/new"]), "written-in-team1");
    assert!(!bao.cli(&["kv", "get", "-mount=kv", "app/new"]).status.success(), "not in the root namespace");
}
