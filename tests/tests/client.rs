//! The Rust client (`keyvault-client`, gateway-client/) against a real KeyVault (SoftHSM,
//! TLS with client certificates): every public call of the crate, token renewal with a
//! short TTL, the server restarted under it, a gateway protected by the verify layer
//! (replays, other tenants, producers signing locally and through transit), offline token
//! verification with attributes, certificate binding, the kill switch and accessor
//! revocation through the feed; and that no token or secret value reaches `Debug`
//! output, error messages or logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use keyvault_client::gateway::{GatewayConfig, Verified, VerifyLayer};
use keyvault_client::offline::{OfflineConfig, Rejection, TokenVerifier};
use keyvault_client::producer::Signer;
use keyvault_client::{Auth, Client, Error, ExposeSecret, RetryPolicy, SecretString};
use keyvault_tests::pki::{Issued, TestCa};
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Reply, json};

const SECRET: &str = "client-test-secret-value-\u{e9}-3f9a1c";
const KV_SECRET: &str = "client-test-kv2-value-77e0b2";

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// Everything this test process logs (the client's `tracing` output at debug level).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let make = move || Sink(writer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("keyvault_client=trace,reqwest=debug,hyper_util=debug")
            .with_writer(make)
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[track_caller]
fn assert_nowhere(what: &str, haystacks: &[(&str, &str)]) {
    for (name, text) in haystacks {
        assert!(!text.contains(what), "{name} contains a secret ({} bytes of it)", what.len());
    }
}

struct World {
    s: TestServer,
    root: String,
    unit: Issued,
    other: Issued,
    producer: Issued,
    /// `app`'s role id and a file with a secret id.
    role_id: String,
    secret_id_file: tempfile::NamedTempFile,
}

const APP_POLICY: &str = r#"
path "secret/app/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "kv/data/app/*" { capabilities = ["create", "read", "update", "delete"] }
path "kv/metadata/app/*" { capabilities = ["read", "list", "delete"] }
path "transit/keys/app-*" { capabilities = ["read", "encrypt", "decrypt", "sign", "verify"] }
"#;

async fn world() -> World {
    let ca = TestCa::new("client CA");
    let unit = ca.leaf("unit", &["unit.corp"], 20, false);
    let other = ca.leaf("unit-2", &["unit-2.corp"], 21, false);
    let producer = ca.leaf("sensor-1", &[], 22, false);
    let s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 1000\nfailures_per_address = 1000\n".into(),
        ..Default::default()
    });
    let (c, root) = (s.client(), s.root.clone());
    ok(c.put("sys/policies/acl/app", &root, json!({ "policy": APP_POLICY })).await, 204);
    ok(c.post("auth/approle/role/app", Some(&root), json!({"token_policies": ["app"], "token_ttl": "1h"})).await, 204);
    let role_id = ok(c.get("auth/approle/role/app/role-id", &root).await, 200).body["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sid =
        ok(c.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let mut secret_id_file = tempfile::NamedTempFile::new().unwrap();
    writeln!(secret_id_file, "{sid}").unwrap();
    World { s, root, unit, other, producer, role_id, secret_id_file }
}

impl World {
    fn builder(&self, id: &Issued) -> keyvault_client::ClientBuilder {
        Client::builder().address(&self.s.addr).ca_file(&self.s.server_ca_file).client_identity_pem(id.identity_pem())
    }

    fn app_client(&self) -> Client {
        self.builder(&self.unit).auth(Auth::approle_file(&self.role_id, self.secret_id_file.path())).build().unwrap()
    }

    /// An AppRole role `name` with `body`, and a client logged in as it.
    /// A token of the `app` role from a client without a certificate (not bound to one).
    async fn unbound_app_token(&self) -> String {
        let app = Client::builder()
            .address(&self.s.addr)
            .ca_file(&self.s.server_ca_file)
            .auth(Auth::approle_file(&self.role_id, self.secret_id_file.path()))
            .build()
            .unwrap();
        app.token().await.unwrap().expose_secret().to_owned()
    }

    async fn role_client(&self, name: &str, body: serde_json::Value) -> Client {
        let c = self.s.client();
        ok(c.post(&format!("auth/approle/role/{name}"), Some(&self.root), body).await, 204);
        let rid =
            ok(c.get(&format!("auth/approle/role/{name}/role-id"), &self.root).await, 200).body["data"]["role_id"]
                .as_str()
                .unwrap()
                .to_owned();
        let sid = ok(c.post(&format!("auth/approle/role/{name}/secret-id"), Some(&self.root), json!({})).await, 200)
            .body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
        self.builder(&self.unit).auth(Auth::approle(rid, sid)).build().unwrap()
    }
}

fn der(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// Every secrets, transit and envelope call of the crate, as a unit with a client
/// certificate and an AppRole secret id read from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_uses_every_call_of_the_client() {
    let logs = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    let client = w.app_client();

    // Key/value version 1.
    client.put("secret/app/db", &json!({ "user": "app", "password": SECRET })).await.unwrap();
    client.put("secret/app/single", &json!({ "value": "one" })).await.unwrap();
    assert_eq!(client.secret_field("secret/app/db", "password").await.unwrap().expose_secret(), SECRET);
    assert_eq!(client.secret("secret/app/single").await.unwrap().expose_secret(), "one");
    let several = client.secret("secret/app/db").await.unwrap_err();
    assert!(matches!(several, Error::Invalid(_)), "{several}");
    let fields = client.secret_fields("secret/app/db").await.unwrap();
    assert_eq!(fields["user"].expose_secret(), "app");
    #[derive(Debug, serde::Deserialize)]
    struct Db {
        user: String,
        password: SecretString,
    }
    let db: Db = client.secret_json("secret/app/db").await.unwrap();
    assert_eq!((db.user.as_str(), db.password.expose_secret()), ("app", SECRET));
    let mut names = client.list("secret/app").await.unwrap();
    names.sort();
    assert_eq!(names, ["db", "single"]);
    assert!(client.list("secret/app/nothing-here").await.unwrap().is_empty());

    // Start-up: all at once, or an error naming each failure.
    let all = client.fetch_all(&["secret/app/single", "kv/app/none-yet"]).await.unwrap_err();
    let Error::Fetch(failed) = &all else { panic!("{all}") };
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].0.as_str(), failed[0].1.status()), ("kv/app/none-yet", Some(404)));
    let denied = client.fetch_all(&["secret/other/x"]).await.unwrap_err();
    assert!(denied.to_string().contains("secret/other/x (403"), "{denied}");

    // Key/value version 2: the client finds the mount's version.
    client.put("kv/app/cfg", &json!({ "value": "first" })).await.unwrap();
    client.put("kv/app/cfg", &json!({ "value": KV_SECRET })).await.unwrap();
    let both = client.fetch_all(&["secret/app/single", "kv/app/cfg"]).await.unwrap();
    assert_eq!(both.iter().map(|s| s.expose_secret().to_owned()).collect::<Vec<_>>(), ["one", KV_SECRET]);
    let versions = ok(c.get("kv/metadata/app/cfg", &root).await, 200);
    assert_eq!(versions.body["data"]["current_version"], 2);
    // A path is names, not URL syntax: each segment is percent-encoded. `%2e%2e` is a name
    // (before, the URL parser made it `..` and `app/sub/%2e%2e/single` read
    // `app/single`); `?` and `#` are parts of a name, not a query or a fragment.
    assert!(client.secret("secret/app/sub/%2e%2e/single").await.unwrap_err().is_not_found());
    assert!(client.secret("kv/app/sub/%2E%2E/cfg").await.unwrap_err().is_not_found());
    assert!(client.secret("secret/app/single?version=1").await.unwrap_err().is_not_found());
    assert!(client.secret("secret/app/single#x").await.unwrap_err().is_not_found());
    let odd = "secret/app/we ird?x=1#f%2F";
    client.put(odd, &json!({"value": "odd"})).await.unwrap();
    assert_eq!(client.secret(odd).await.unwrap().expose_secret(), "odd");
    let stored = ok(c.get("secret/app/we%20ird%3Fx%3D1%23f%252F", &root).await, 200);
    assert_eq!(stored.body["data"]["value"], "odd", "stored under the name given");
    assert!(client.list("secret/app").await.unwrap().contains(&"we ird?x=1#f%2F".to_owned()));
    client.delete(odd).await.unwrap();
    assert_eq!(client.list("kv/app").await.unwrap(), ["cfg"]);
    client.delete("kv/app/cfg").await.unwrap();
    assert!(client.secret("kv/app/cfg").await.unwrap_err().is_not_found());
    client.delete("secret/app/single").await.unwrap();
    assert!(client.secret("secret/app/single").await.unwrap_err().is_not_found());
    // Refused before anything is sent.
    assert!(matches!(client.secret("secret/app/../other").await.unwrap_err(), Error::Invalid(_)));
    assert!(matches!(
        client.put("secret/app/x", &json!(["not", "an", "object"])).await.unwrap_err(),
        Error::Invalid(_)
    ));

    // Transit.
    ok(c.post("transit/keys/app-aes", Some(&root), json!({ "type": "aes256-gcm96" })).await, 200);
    ok(c.post("transit/keys/app-sign", Some(&root), json!({ "type": "ed25519" })).await, 200);
    let ct = client.encrypt("app-aes", SECRET.as_bytes()).await.unwrap();
    assert!(ct.starts_with("vault:v1:"), "{ct}");
    assert_eq!(&client.decrypt("app-aes", &ct).await.unwrap()[..], SECRET.as_bytes());
    let with_aad = client.encrypt_aad("app-aes", b"row 7", Some(b"table=users")).await.unwrap();
    assert_eq!(&client.decrypt_aad("app-aes", &with_aad, Some(b"table=users")).await.unwrap()[..], b"row 7");
    assert_eq!(client.decrypt_aad("app-aes", &with_aad, Some(b"table=other")).await.unwrap_err().status(), Some(400));
    ok(c.post("transit/keys/app-aes/rotate", Some(&root), json!({})).await, 200);
    let rewrapped = client.rewrap("app-aes", &ct).await.unwrap();
    assert!(rewrapped.starts_with("vault:v2:"), "{rewrapped}");
    assert_eq!(&client.decrypt("app-aes", &rewrapped).await.unwrap()[..], SECRET.as_bytes());
    let dk = client.datakey("app-aes").await.unwrap();
    assert_eq!(dk.plaintext.len(), 32);
    assert_eq!(client.decrypt("app-aes", &dk.ciphertext).await.unwrap(), dk.plaintext);
    assert!(!format!("{dk:?}").contains(&base64::engine::general_purpose::STANDARD.encode(&dk.plaintext[..])));
    let wrapped = client.datakey_wrapped("app-aes").await.unwrap();
    assert_eq!(client.decrypt("app-aes", &wrapped).await.unwrap().len(), 32);
    let sig = client.sign("app-sign", b"message").await.unwrap();
    assert!(client.verify("app-sign", b"message", &sig).await.unwrap());
    assert!(!client.verify("app-sign", b"messagE", &sig).await.unwrap());
    let cts = client.encrypt_batch("app-aes", &[b"a", b"bb", b"ccc"]).await.unwrap();
    let cts: Vec<String> = cts.into_iter().map(Result::unwrap).collect();
    let mut refs: Vec<&str> = cts.iter().map(String::as_str).collect();
    refs.push("vault:v1:not-a-ciphertext");
    let pts = client.decrypt_batch("app-aes", &refs).await.unwrap();
    assert_eq!(pts.len(), 4);
    assert_eq!(&pts[2].as_ref().unwrap()[..], b"ccc");
    assert!(pts[3].is_err(), "a bad item fails alone");
    let sigs: Vec<String> =
        client.sign_batch("app-sign", &[b"x", b"y"]).await.unwrap().into_iter().map(Result::unwrap).collect();
    let checks = client.verify_batch("app-sign", &[(b"x", &sigs[0]), (b"x", &sigs[1])]).await.unwrap();
    assert_eq!(checks.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [true, false]);
    assert_eq!(client.encrypt("other-key", b"x").await.unwrap_err().status(), Some(403));

    // Envelope encryption of a large payload: only the data key crosses the network.
    let mut payload = vec![0u8; 1 << 20];
    getrandom::fill(&mut payload).unwrap();
    let sealed = client.seal_envelope("app-aes", &payload).await.unwrap();
    assert_eq!(sealed.len(), payload.len() + 16 + 12 + 4 + 1 + "app-aes".len() + 2 + dk.ciphertext.len());
    assert_eq!(&client.open_envelope(&sealed).await.unwrap()[..], &payload[..]);
    let mut tampered = sealed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(matches!(client.open_envelope(&tampered).await.unwrap_err(), Error::Crypto(_)));
    let mut renamed = sealed.clone();
    renamed[5..12].copy_from_slice(b"app-xyz");
    assert!(client.open_envelope(&renamed).await.is_err(), "the key name is authenticated");

    // Nothing secret in Debug output, errors or logs.
    let token = client.token().await.unwrap().expose_secret().to_owned();
    let sid = std::fs::read_to_string(w.secret_id_file.path()).unwrap().trim().to_owned();
    let debug = format!("{client:?} {:?} {:?} {db:?} {fields:?}", Auth::approle("r", &sid), Auth::token(&token));
    let errors = format!("{several} {all} {denied}");
    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let server_log = w.s.log_text();
    let places =
        [("Debug output", debug.as_str()), ("errors", &errors), ("client log", &log), ("server log", &server_log)];
    for s in [SECRET, KV_SECRET, &token, &sid] {
        assert_nowhere(s, &places);
    }
    assert!(log.contains("logged in to KeyVault"), "the client does log: {log}");
}

/// A token with a 4 s TTL is renewed in the background (before it comes within 2 s of
/// its expiry, past which the client stops sending it) and stays the same; one whose
/// maximum is near is replaced by a new login; a revoked one is replaced at the next
/// call; a secret id delivered by response wrapping is unwrapped once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_renews_its_token_and_logs_in_again_when_it_must() {
    let _ = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    ok(c.put("secret/app/db", &root, json!({ "value": SECRET })).await, 200);

    let short =
        w.role_client("short", json!({"token_policies": ["app"], "token_ttl": "4s", "token_max_ttl": "1h"})).await;
    assert_eq!(short.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
    let first = short.token().await.unwrap().expose_secret().to_owned();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Past its 4 s: the same token, renewed (every second), still accepted (it is bound to the
    // unit's certificate: asked over a connection presenting it).
    assert_eq!(short.token().await.unwrap().expose_secret(), first);
    let cu = w.s.client_with(&w.unit);
    ok(cu.get("secret/app/db", &first).await, 200);
    let lookup = ok(cu.get("auth/token/lookup-self", &first).await, 200);
    assert!(lookup.body["data"]["ttl"].as_u64().unwrap() >= 1, "{lookup:?}");

    // Revoked behind its back: the next call gets 401, logs in again, and succeeds.
    ok(c.post("auth/token/revoke", Some(&root), json!({ "token": first })).await, 204);
    assert_eq!(short.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
    let second = short.token().await.unwrap().expose_secret().to_owned();
    assert_ne!(second, first);

    // A maximum of 6 s: renewals stop extending it, and a new login replaces it (before
    // its maximum, once a renewal leaves it too short to be sent).
    let capped =
        w.role_client("capped", json!({"token_policies": ["app"], "token_ttl": "4s", "token_max_ttl": "6s"})).await;
    let t1 = capped.token().await.unwrap().expose_secret().to_owned();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(capped.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
    assert_ne!(capped.token().await.unwrap().expose_secret(), t1);

    // `renew_by_login`: a fresh token (its own expiry, for offline gateways) where a
    // renewal would be (after 1 s of a 4 s token).
    ok(c.post("auth/approle/role/short/secret-id", Some(&root), json!({})).await, 200);
    let rid = ok(c.get("auth/approle/role/short/role-id", &root).await, 200).body["data"]["role_id"].clone();
    let sid =
        ok(c.post("auth/approle/role/short/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .clone();
    let relogin = w
        .builder(&w.unit)
        .auth(Auth::approle(rid.as_str().unwrap(), sid.as_str().unwrap()))
        .renew_by_login(true)
        .build()
        .unwrap();
    let r1 = relogin.token().await.unwrap().expose_secret().to_owned();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(relogin.token().await.unwrap().expose_secret(), r1);

    // The secret id delivered wrapped: unwrapped at the first login, kept for later ones.
    let wrapped = c
        .http
        .post(c.url("auth/approle/role/app/secret-id"))
        .header("X-Vault-Token", &root)
        .header("X-Vault-Wrap-TTL", "60s")
        .body("{}")
        .send()
        .await
        .unwrap();
    let wrapped = keyvault_tests::Client::reply(wrapped).await;
    let wrapping = ok(wrapped, 200).body["wrap_info"]["token"].as_str().unwrap().to_owned();
    let unwrapped = w.builder(&w.unit).auth(Auth::approle_wrapped(&w.role_id, &wrapping)).build().unwrap();
    assert_eq!(unwrapped.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
    unwrapped.forget_token().await;
    assert_eq!(unwrapped.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
    // Spent: another client cannot use the wrapping token.
    let thief = w.builder(&w.other).auth(Auth::approle_wrapped(&w.role_id, &wrapping)).build().unwrap();
    assert_eq!(thief.secret("secret/app/db").await.unwrap_err().status(), Some(400));

    let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(log.contains("KeyVault token renewed"), "renewals are logged (without the token)");
    for s in [SECRET, &first, &second, &t1, &wrapping] {
        assert_nowhere(s, &[("client log", &log), ("server log", &w.s.log_text())]);
    }
}

/// Sixteen calls in flight when the token is revoked all get 401 at once: the first logs
/// in again and the others take its new token, instead of each forgetting the token the
/// last one got and logging in once more. With a secret id good for two logins, every
/// call succeeds and all end on one new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_at_once_log_in_again_once() {
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    ok(c.put("secret/app/db", &root, json!({ "value": SECRET })).await, 200);
    let client = w.role_client("twice", json!({"token_policies": ["app"], "secret_id_num_uses": 2})).await;
    let first = client.token().await.unwrap().expose_secret().to_owned();
    ok(c.post("auth/token/revoke", Some(&root), json!({ "token": first })).await, 204);
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.secret("secret/app/db").await.map(|s| s.expose_secret().to_owned()) })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), SECRET);
    }
    let second = client.token().await.unwrap().expose_secret().to_owned();
    assert_ne!(second, first);
    ok(w.s.client_with(&w.unit).get("auth/token/lookup-self", &second).await, 200);
}

/// A reply larger than the client's `max_reply_bytes` fails the call (a transport error
/// naming the limit) instead of being read whole; within the default limit it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_limit_is_not_read() {
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    let big = "b".repeat(20_000);
    ok(c.put("secret/app/big", &root, json!({ "value": big })).await, 200);
    let small_limit = w
        .builder(&w.unit)
        .auth(Auth::approle_file(&w.role_id, w.secret_id_file.path()))
        .max_reply_bytes(8_192)
        .build()
        .unwrap();
    let e = small_limit.secret("secret/app/big").await.unwrap_err();
    assert!(matches!(&e, keyvault_client::Error::Transport(m) if m.contains("larger than 8192 bytes")), "{e:?}");
    assert!(!e.to_string().contains(&big[..100]));
    assert_eq!(w.app_client().secret("secret/app/big").await.unwrap().expose_secret(), big);
}

/// The server killed and started again on the same address while a unit reads: the
/// client's retries carry it over, with the same client and the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_recovers_when_the_server_restarts() {
    let _ = logs();
    let mut w = world().await;
    let client = w
        .builder(&w.unit)
        .auth(Auth::approle_file(&w.role_id, w.secret_id_file.path()))
        .retry(RetryPolicy {
            attempts: 60,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
        })
        .build()
        .unwrap();
    client.put("secret/app/db", &json!({ "value": SECRET })).await.unwrap();
    let token = client.token().await.unwrap().expose_secret().to_owned();
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut reads = 0u32;
            for _ in 0..200 {
                assert_eq!(client.secret("secret/app/db").await.unwrap().expose_secret(), SECRET);
                reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = tokio::task::spawn_blocking(move || {
        w.s.restart_same_port();
        w
    })
    .await
    .unwrap();
    assert_eq!(reader.await.unwrap(), 200, "every read succeeded");
    drop(w);
    assert_eq!(client.token().await.unwrap().expose_secret(), token, "the token outlives a restart");
}

/// The gateway body of the tenant rule.
fn telemetry(tenant: &str) -> Vec<u8> {
    json!({
        "tenant_id": tenant, "operator_id": "op-001", "campaign_id": "c-1", "reading": 21.5,
        "signed_metadata": { "tenant_id": tenant, "operator_id": "op-001", "campaign_id": "c-1" }
    })
    .to_string()
    .into_bytes()
}

/// A gateway (axum) behind the verify layer, batching and not: a producer's signed
/// request passes with its identity and key id; a replay is 409, another tenant's body
/// 403, a wrong key 401, missing headers 400, an oversize body 413; a producer whose key
/// is in the HSM signs through transit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_behind_the_layer_accepts_producers_and_refuses_replays_and_other_tenants() {
    use axum::routing::post;
    let _ = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    ok(
        c.post(
            "gateway/producers/sensor-1",
            Some(&root),
            json!({
                "cert_sha256": [w.producer.sha256_hex],
                "keys": [{ "key_id": "k1", "public_key": b64(key.verifying_key().as_bytes()) }],
                "operator_tenants": { "op-001": "t-1" },
            }),
        )
        .await,
        204,
    );
    let gw = w.role_client("gateway", json!({"token_policies": ["gateway"], "token_ttl": "1h"})).await;
    ok(
        c.put(
            "sys/policies/acl/gateway",
            &root,
            json!({"policy": "path \"gateway/verify\" { capabilities = [\"verify\"] }"}),
        )
        .await,
        204,
    );

    let handler = |axum::Extension(v): axum::Extension<Verified>, body: axum::body::Bytes| async move {
        format!("{} {} {}", v.identity, v.key_id.unwrap_or_default(), body.len())
    };
    let mut addrs = Vec::new();
    for batch in [Some(Duration::from_millis(1)), None] {
        let config = GatewayConfig { batch_window: batch, max_body: 64 * 1024, ..Default::default() };
        let app = axum::Router::new().route("/telemetry", post(handler)).layer(VerifyLayer::new(gw.clone(), config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(format!("http://{}/telemetry", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    let http = reqwest::Client::new();
    let signer = Signer::local("sensor-1", &w.producer.sha256_hex, key.clone());
    for url in &addrs {
        let send = |h: http::HeaderMap, body: Vec<u8>| http.post(url.as_str()).headers(h).body(body).send();
        let body = telemetry("t-1");
        let headers = signer.headers(&body).await.unwrap();
        let r = send(headers.clone(), body.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), format!("sensor-1 k1 {}", body.len()));
        let replay = send(headers, body).await.unwrap();
        assert_eq!(replay.status(), 409);
        assert_eq!(replay.json::<serde_json::Value>().await.unwrap()["reason"], "replay");
        let other = telemetry("t-2");
        let r = send(signer.headers(&other).await.unwrap(), other).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["reason"], "tenant_mapping_violation");
        let forger = Signer::local("sensor-1", &w.producer.sha256_hex, ed25519_dalek::SigningKey::from_bytes(&[1; 32]));
        let body = telemetry("t-1");
        let r = send(forger.headers(&body).await.unwrap(), body).await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap()["reason"].clone()),
            (401, json!("invalid_signature"))
        );
        let r = http.post(url.as_str()).body(telemetry("t-1")).send().await.unwrap();
        assert_eq!(r.status(), 400);
        // A header given twice (a terminator that appends its certificate header after
        // the client's own) is 400: neither value is taken.
        let body = telemetry("t-1");
        for name in ["x-keyvault-cert-sha256", "x-keyvault-identity", "x-keyvault-nonce"] {
            let mut h = signer.headers(&body).await.unwrap();
            let first = h.get(name).unwrap().clone();
            h.append(name, first);
            let r = send(h, body.clone()).await.unwrap();
            assert_eq!(r.status(), 400, "{name} twice");
        }
        // On a client of its own: the 413 is answered before the body is read, and the
        // connection closed; a pooled client could otherwise send one of the checks below
        // on that closing connection (a broken pipe, seen once in a full run).
        let big = vec![b' '; 100 * 1024];
        let lone = reqwest::Client::new();
        let r = lone.post(url.as_str()).headers(signer.headers(&big).await.unwrap()).body(big).send().await.unwrap();
        assert_eq!(r.status(), 413);
        // Concurrent checks (batched into few calls where batching is on): all pass.
        let many = (0..64).map(|_| async {
            let body = telemetry("t-1");
            send(signer.headers(&body).await.unwrap(), body).await.unwrap().status().as_u16()
        });
        assert!(futures_util::future::join_all(many).await.iter().all(|s| *s == 200));
    }
    // With the layer's defaults, large bodies among small ones (concurrent, so batched
    // together): a batch carries at most 512 KiB of items, so no verify request exceeds
    // KeyVault's 1 MiB limit and fails every check in it.
    let app = axum::Router::new()
        .route("/telemetry", post(handler))
        .layer(VerifyLayer::new(gw.clone(), GatewayConfig::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/telemetry", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let large = |i: usize| {
        let mut v: serde_json::Value = serde_json::from_slice(&telemetry("t-1")).unwrap();
        v["padding"] = json!("p".repeat(if i.is_multiple_of(4) { 400 * 1024 } else { 64 }));
        v.to_string().into_bytes()
    };
    let mixed = (0..24).map(|i| {
        let (http, url, signer) = (&http, &url, &signer);
        async move {
            let body = large(i);
            http.post(url.as_str())
                .headers(signer.headers(&body).await.unwrap())
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(mixed).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // A producer whose key stays in the HSM: it signs through transit/sign.
    ok(c.post("transit/keys/sensor-2", Some(&root), json!({ "type": "ed25519" })).await, 200);
    ok(
        c.post(
            "gateway/producers/sensor-2",
            Some(&root),
            json!({ "cert_sha256": [w.other.sha256_hex], "transit_key": "sensor-2", "operator_tenants": { "op-001": "t-1" } }),
        )
        .await,
        204,
    );
    ok(
        c.put(
            "sys/policies/acl/sensor-2",
            &root,
            json!({"policy": "path \"transit/keys/sensor-2\" { capabilities = [\"sign\"] }"}),
        )
        .await,
        204,
    );
    let producer_client = w.role_client("sensor-2", json!({"token_policies": ["sensor-2"]})).await;
    let hsm_signer = Signer::transit("sensor-2", &w.other.sha256_hex, producer_client, "sensor-2");
    let body = telemetry("t-1");
    let req = hsm_signer.sign_reqwest(http.post(&addrs[0]), body.clone()).await.unwrap();
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("sensor-2 transit:sensor-2:v1 {}", body.len()));
}

/// Offline verification: a token from a certificate login carries its role's attributes
/// and audience; it is refused with another certificate, for another audience, forged,
/// and after the kill switch or an accessor revocation once the feed is polled (not
/// before: that window is the documented limit). Giving tokens attributes is a grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_verify_offline_with_attributes_until_revoked() {
    let _ = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    let attrs = json!({ "tenant_id": "t-1", "tier": "gold", "capabilities": ["read", "write"] });
    let role = json!({
        "certificate_sha256": [w.unit.sha256_hex], "token_policies": ["app"],
        "token_attributes": attrs, "token_audiences": ["gateway-a"],
    });
    ok(c.post("auth/cert/role/gw-unit", Some(&root), role.clone()).await, 204);
    let shown = ok(c.get("auth/cert/role/gw-unit", &root).await, 200);
    assert_eq!(shown.body["data"]["token_attributes"], attrs);

    // Attributes are a grant, of each value: a role admin without it cannot give them;
    // bounds hold.
    ok(
        c.put(
            "sys/policies/acl/role-admin",
            &root,
            json!({"policy": "path \"auth/cert/role/*\" { capabilities = [\"create\", \"update\", \"read\"] }\n\
                path \"sys/token-attributes/grant/tier/*\" { capabilities = [\"sudo\"] }\n\
                path \"sys/token-attributes/grant/tenant_id/t-2\" { capabilities = [\"sudo\"] }\n\
                path \"sys/token-attributes/grant/capabilities/read\" { capabilities = [\"sudo\"] }"}),
        )
        .await,
        204,
    );
    let admin = w.role_client("role-admin", json!({"token_policies": ["role-admin"]})).await;
    let admin_token = admin.token().await.unwrap().expose_secret().to_owned();
    let ca = w.s.client_with(&w.unit);
    let mut body = json!({"certificate_sha256": [w.other.sha256_hex], "token_attributes": { "tier": "gold" }});
    ok(ca.post("auth/cert/role/admin-made", Some(&admin_token), body.clone()).await, 204);
    for (granted, attributes) in [
        (true, json!({ "tier": "silver", "tenant_id": "t-2", "capabilities": ["read"] })),
        // Another tenant than the one granted; a value of a granted name's prefix.
        (false, json!({ "tier": "gold", "tenant_id": "t-1" })),
        (false, json!({ "tenant_id": "t-2/x" })),
        (false, json!({ "tenant_id": "t-" })),
        // Each element of a list is a value.
        (false, json!({ "capabilities": ["read", "write"] })),
        // A name not granted at all.
        (false, json!({ "region": "eu" })),
    ] {
        body["token_attributes"] = attributes.clone();
        let status = if granted { 204 } else { 403 };
        assert_eq!(
            ca.post("auth/cert/role/admin-made", Some(&admin_token), body.clone()).await.status,
            status,
            "{attributes}"
        );
    }
    body["token_attributes"] = json!({ "tier": "gold", "tenant_id": "t-2" });
    ok(ca.post("auth/cert/role/admin-made", Some(&admin_token), body.clone()).await, 204);
    body["token_attributes"] = json!({ "tier": "gold" });
    body["token_audiences"] = json!(["gateway-a"]);
    ok(ca.post("auth/cert/role/admin-made", Some(&admin_token), body).await, 403);
    let too_many: serde_json::Map<String, serde_json::Value> = (0..17).map(|i| (format!("a{i}"), json!("v"))).collect();
    ok(
        c.post(
            "auth/cert/role/big",
            Some(&root),
            json!({"certificate_sha256": [w.other.sha256_hex], "token_attributes": too_many}),
        )
        .await,
        400,
    );
    ok(
        c.post(
            "auth/cert/role/big",
            Some(&root),
            json!({"certificate_sha256": [w.other.sha256_hex], "token_attributes": {"Bad Name": "v"}}),
        )
        .await,
        400,
    );

    // Every bound, just over it: a value, a list, the whole, the audiences. A value with
    // `/` between ordinary parts is fine.
    ok(
        c.post(
            "auth/cert/role/slashes",
            Some(&root),
            json!({"certificate_sha256": [w.other.sha256_hex], "token_attributes": {"tenant_id": "eu/acme..x"}}),
        )
        .await,
        204,
    );
    ok(c.send("DELETE", "auth/cert/role/slashes", Some(&root), None).await, 204);
    let long = "v".repeat(257);
    let list: Vec<String> = (0..33).map(|i| format!("c{i}")).collect();
    let whole: serde_json::Map<String, serde_json::Value> =
        (0..9).map(|i| (format!("a{i}"), json!("v".repeat(250)))).collect();
    let audiences: Vec<String> = (0..9).map(|i| format!("gw-{i}")).collect();
    for extra in [
        json!({"token_attributes": {"tier": long}}),
        json!({"token_attributes": {"tier": "a\u{7}b"}}),
        json!({"token_attributes": {"capabilities": list}}),
        json!({"token_attributes": whole}),
        json!({"token_attributes": {"tier": 7}}),
        // Empty values, and values a consumer could normalise into another.
        json!({"token_attributes": {"tier": ""}}),
        json!({"token_attributes": {"capabilities": []}}),
        json!({"token_attributes": {"tenant_id": "acme/../globex"}}),
        json!({"token_attributes": {"tenant_id": "acme/./x"}}),
        json!({"token_attributes": {"tenant_id": "acme//x"}}),
        json!({"token_attributes": {"tenant_id": "/acme"}}),
        json!({"token_attributes": {"capabilities": ["read", "x/.."]}}),
        json!({"token_audiences": audiences}),
        json!({"token_audiences": ["with space"]}),
        json!({"token_audiences": [""]}),
    ] {
        let mut body = json!({"certificate_sha256": [w.other.sha256_hex]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ok(c.post("auth/cert/role/big", Some(&root), body).await, 400);
    }
    ok(c.get("auth/cert/role/big", &root).await, 404);

    // The unit logs in with its certificate; the gateway verifies offline.
    let unit = w.builder(&w.unit).auth(Auth::cert(Some("gw-unit"))).build().unwrap();
    let token = unit.token().await.unwrap().expose_secret().to_owned();
    ok(
        c.put(
            "sys/policies/acl/feed",
            &root,
            json!({"policy": "path \"auth/revocations\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    let feed_client = w.role_client("feed", json!({"token_policies": ["feed"]})).await;
    // Polled by hand here: the list is trusted however old (the age limit has its own test).
    let config = OfflineConfig {
        audience: Some("gateway-a".into()),
        revocation_poll: None,
        max_revocation_age: None,
        ..Default::default()
    };
    let verifier = TokenVerifier::new(feed_client.clone(), config.clone()).await.unwrap();
    let (unit_der, other_der) = (der(&w.unit.cert_pem), der(&w.other.cert_pem));
    let v = verifier.verify(&token, Some(&unit_der)).await.unwrap();
    assert_eq!(serde_json::to_value(&v.attributes).unwrap(), attrs);
    assert_eq!((v.role.as_deref(), v.audiences.clone()), (Some("gw-unit"), vec!["gateway-a".to_owned()]));
    assert_eq!(v.bound_certificate_sha256.as_deref(), Some(w.unit.sha256_hex.as_str()));
    let refused = |e: Error| match e {
        Error::Token(r) => r,
        other => panic!("{other}"),
    };
    assert_eq!(refused(verifier.verify(&token, Some(&other_der)).await.unwrap_err()), Rejection::CertificateMismatch);
    assert_eq!(refused(verifier.verify(&token, None).await.unwrap_err()), Rejection::CertificateMismatch);
    let elsewhere =
        TokenVerifier::new(feed_client.clone(), OfflineConfig { audience: Some("gateway-b".into()), ..config.clone() })
            .await
            .unwrap();
    assert_eq!(refused(elsewhere.verify(&token, Some(&unit_der)).await.unwrap_err()), Rejection::WrongAudience);
    // A token with no audience at all (its role names none) is not for a gateway that
    // requires one.
    let no_audience = feed_client.token().await.unwrap().expose_secret().to_owned();
    let claims = no_audience.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert!(claims.get("aud").is_none(), "{claims}");
    for cert in [None, Some(unit_der.as_slice())] {
        assert_eq!(refused(verifier.verify(&no_audience, cert).await.unwrap_err()), Rejection::WrongAudience);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["attr"]["tier"] = json!("platinum");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    assert_eq!(refused(verifier.verify(&forged, Some(&unit_der)).await.unwrap_err()), Rejection::BadSignature);
    assert_eq!(refused(verifier.verify("not.a.token", None).await.unwrap_err()), Rejection::Malformed);

    // A new token-signing key: a token with an unknown `kid` makes the verifier fetch the
    // JWKS again, at most every `min_jwks_refresh`.
    let eager = TokenVerifier::new(
        feed_client.clone(),
        OfflineConfig {
            min_jwks_refresh: Duration::ZERO,
            revocation_poll: None,
            max_revocation_age: None,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let lazy = TokenVerifier::new(
        feed_client.clone(),
        OfflineConfig {
            min_jwks_refresh: Duration::from_secs(3600),
            revocation_poll: None,
            max_revocation_age: None,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    ok(c.post("sys/rotate/token-signing", Some(&root), json!({})).await, 200);
    let newer = w.builder(&w.unit).auth(Auth::cert(Some("gw-unit"))).build().unwrap();
    let newer_token = newer.token().await.unwrap().expose_secret().to_owned();
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();
    assert_ne!(kid(&newer_token), kid(&token), "signed by the new key");
    assert!(eager.verify(&newer_token, Some(&unit_der)).await.is_ok());
    assert_eq!(refused(lazy.verify(&newer_token, Some(&unit_der)).await.unwrap_err()), Rejection::UnknownKey);
    assert!(lazy.verify(&token, Some(&unit_der)).await.is_ok(), "the old key still verifies");

    // The kill switch: refused once the feed is polled.
    ok(c.post("sys/revoke-identity", Some(&root), json!({ "role": "gw-unit" })).await, 200);
    assert!(verifier.verify(&token, Some(&unit_der)).await.is_ok(), "not polled yet: the documented window");
    verifier.refresh_revocations().await.unwrap();
    assert_eq!(refused(verifier.verify(&token, Some(&unit_der)).await.unwrap_err()), Rejection::Revoked);

    // An accessor revocation, through the background poll.
    let polled = TokenVerifier::new(
        feed_client.clone(),
        OfflineConfig { audience: None, revocation_poll: Some(Duration::from_millis(200)), ..Default::default() },
    )
    .await
    .unwrap();
    // A poll no more often than the age limit is refused as a configuration.
    let slow = OfflineConfig {
        revocation_poll: Some(Duration::from_secs(60)),
        max_revocation_age: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let client_for_config = w.role_client("feed-2", json!({"token_policies": ["feed"]})).await;
    assert!(matches!(TokenVerifier::new(client_for_config, slow).await, Err(Error::Config(_))));
    let app_token = w.unbound_app_token().await;
    let v = polled.verify(&app_token, None).await.unwrap();
    assert!(v.attributes.is_empty() && v.bound_certificate_sha256.is_none());
    let accessor = v.accessor.clone();
    ok(c.post("auth/token/revoke-accessor", Some(&root), json!({ "accessor": accessor })).await, 204);
    let mut refused_after = None;
    for i in 0..50 {
        if let Err(e) = polled.verify(&app_token, None).await {
            refused_after = Some((i, e));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, e) = refused_after.expect("the background poll brings the revocation within 5 s");
    assert_eq!(refused(e), Rejection::Revoked);
    // A verifier reading the feed one record per page sees both revocations, at its first
    // read and at a poll.
    let paged = TokenVerifier::new(
        feed_client.clone(),
        OfflineConfig { revocation_poll: None, revocation_page: 1, ..Default::default() },
    )
    .await
    .unwrap();
    paged.refresh_revocations().await.unwrap();
    assert_eq!(refused(paged.verify(&app_token, None).await.unwrap_err()), Rejection::Revoked);
    assert_eq!(refused(paged.verify(&token, Some(&unit_der)).await.unwrap_err()), Rejection::Revoked);
    let first = ok(c.get("auth/revocations?since=0&limit=1", &root).await, 200);
    let next = first.body["data"]["next"].as_str().expect("a next page").to_owned();
    let second = ok(c.get(&format!("auth/revocations?since=0&limit=1&after={next}"), &root).await, 200);
    assert_ne!(first.body["data"], second.body["data"]);
    for bad in ["limit=0", "limit=10001", "limit=-1", "after=%00", "after=bm90IGEgY3Vyc29y"] {
        ok(c.get(&format!("auth/revocations?{bad}"), &root).await, 400);
    }
    for bad in ["since=abc", "since=-1", "since=99999999999999999999999"] {
        ok(c.get(&format!("auth/revocations?{bad}"), &root).await, 400);
    }
    let later = ok(c.get(&format!("auth/revocations?since={}", u64::MAX / 2), &root).await, 200);
    assert_eq!(later.body["data"]["accessors"], json!([]), "nothing revoked after the far future");
    let feed = ok(c.get("auth/revocations?since=0", &root).await, 200);
    assert!(feed.body["data"]["accessors"].as_array().unwrap().iter().any(|a| a["accessor"] == accessor.as_str()));
    assert_eq!(feed.body["data"]["identities"][0]["id"], "gw-unit");
    ok(c.get("auth/revocations", &app_token).await, 401);
    // The feed needs `read` on auth/revocations.
    let other_token = w.app_client().token().await.unwrap().expose_secret().to_owned();
    ok(w.s.client_with(&w.unit).get("auth/revocations", &other_token).await, 403);
}

/// The verify layer bounds what the checks under way hold: a request without the
/// signature headers is refused before its body is read (a body that never ends gets its
/// 400), a body whose declared length is over `max_body` gets 413 unread, and a check that
/// finds no room in `max_pending_bytes` is answered 503 `verifier_busy` at once. The room
/// comes back when a check ends. (Before, every request's body was read and queued in
/// base64 first, whatever its headers, and a flood of large bodies grew memory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_layer_refuses_what_it_has_no_room_for_before_reading_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // KeyVault that never answers: a check sent there stays under way.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = Client::builder().address(format!("http://{}", hole.local_addr().unwrap())).build().unwrap();
    let config = GatewayConfig {
        batch_window: None,
        max_body: 512 * 1024,
        max_pending_bytes: 1024 * 1024,
        ..Default::default()
    };
    let app = axum::Router::new()
        .route("/telemetry", axum::routing::post(|| async { "passed" }))
        .layer(VerifyLayer::new(gw, config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let signed = "x-keyvault-identity: sensor-1\r\nx-keyvault-cert-sha256: 00\r\nx-keyvault-timestamp: 1\r\n\
                  x-keyvault-nonce: n\r\nx-keyvault-signature: s\r\n";
    let post = |headers: &'static str, length: usize, sent: usize| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /telemetry HTTP/1.1\r\nhost: gw\r\n{headers}content-length: {length}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&vec![b'a'; sent]).await.unwrap();
        conn
    };
    let answer = |mut conn: tokio::net::TcpStream| async move {
        let mut buf = vec![0; 4096];
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&got).contains("\"reason\"") {
            let n = tokio::time::timeout_at(deadline, conn.read(&mut buf)).await.expect("an answer").unwrap();
            assert!(n > 0, "closed without an answer: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
        (status, text)
    };

    // No signature headers, a body declared at 400 KiB of which 10 bytes come: 400 now.
    let (status, text) = answer(post("", 400 * 1024, 10).await).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("malformed_request"), "{text}");
    // Over `max_body` by its declared length: 413 before any of it is read.
    let (status, text) = answer(post(signed, 600 * 1024, 10).await).await;
    assert_eq!(status, 413, "{text}");

    // Connections that declare a large body and send none hold no room (room is taken
    // as bytes arrive): they cannot shut the checks out by declaring alone.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(post(signed, 400 * 1024, 0).await);
    }
    // A check of 300 KiB takes 700 KiB of the 1 MiB and stays under way (KeyVault is
    // silent); a second of the same size finds no room: 503 at once.
    let first = post(signed, 300 * 1024, 300 * 1024).await;
    let (upstream, _) = tokio::time::timeout(Duration::from_secs(30), hole.accept()).await.unwrap().unwrap();
    let (status, text) = answer(post(signed, 300 * 1024, 300 * 1024).await).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("verifier_busy"), "{text}");
    // A body of unknown length (chunked) takes room as it arrives: 300 KiB do not fit.
    let mut chunked = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /telemetry HTTP/1.1\r\nhost: gw\r\n{signed}transfer-encoding: chunked\r\n\r\n");
    chunked.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..30 {
        let chunk = format!("2800\r\n{}\r\n", "a".repeat(10 * 1024));
        if chunked.write_all(chunk.as_bytes()).await.is_err() {
            break; // answered and closed before all was sent
        }
    }
    let _ = chunked.write_all(b"0\r\n\r\n").await;
    let (status, text) = answer(chunked).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("verifier_busy"), "{text}");
    // The first check ends (KeyVault gone: 503, fail closed) and gives its room back: a
    // check of the same size is sent to KeyVault again.
    drop(upstream);
    let (status, text) = answer(first).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("verifier_unavailable"), "{text}");
    let _again = post(signed, 300 * 1024, 300 * 1024).await;
    tokio::time::timeout(Duration::from_secs(30), hole.accept()).await.expect("the room came back").unwrap();
    drop(idle);
}

/// A verifier that cannot read the revocation feed (its token lost `read` on
/// `auth/revocations`; KeyVault out of reach is the same) refuses every token once its
/// last whole poll is older than `max_revocation_age`, and accepts them again after the
/// next poll that succeeds. Before, it kept the last list for good: a token revoked
/// meanwhile passed until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_verifier_cut_off_from_the_feed_fails_closed() {
    let _ = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    let feed_policy = json!({"policy": "path \"auth/revocations\" { capabilities = [\"read\"] }"});
    ok(c.put("sys/policies/acl/feed", &root, feed_policy.clone()).await, 204);
    let feed_client = w.role_client("feed", json!({"token_policies": ["feed"]})).await;
    let max_age = Duration::from_secs(2);
    let verifier = TokenVerifier::new(
        feed_client,
        OfflineConfig {
            revocation_poll: Some(Duration::from_millis(200)),
            max_revocation_age: Some(max_age),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let app_token = w.unbound_app_token().await;
    verifier.verify(&app_token, None).await.unwrap();

    // The feed refused: accepted while the list is young, refused once it is too old.
    ok(c.send("DELETE", "sys/policies/acl/feed", Some(&root), None).await, 204);
    let cut_at = std::time::Instant::now();
    let refused = loop {
        match verifier.verify(&app_token, None).await {
            Ok(_) => {}
            Err(e) => break e,
        }
        assert!(cut_at.elapsed() < Duration::from_secs(30), "still accepted 30 s after the feed was refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Accepted while young: the last whole poll began at most a poll period (and a slow
    // poll) before the feed was refused.
    assert!(cut_at.elapsed() >= Duration::from_secs(1), "refused after {:?}", cut_at.elapsed());
    match &refused {
        Error::Transport(why) => assert!(why.contains("max_revocation_age"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Whatever the token (a forged one is still refused for its signature first); a
    // manual refresh fails too.
    assert!(matches!(verifier.verify(&app_token, None).await, Err(Error::Transport(_))));
    assert!(matches!(verifier.verify("not.a.token", None).await, Err(Error::Token(Rejection::Malformed))));
    assert!(verifier.refresh_revocations().await.is_err());

    // The feed readable again: the next poll brings the verifier back.
    ok(c.put("sys/policies/acl/feed", &root, feed_policy).await, 204);
    let back = std::time::Instant::now();
    while verifier.verify(&app_token, None).await.is_err() {
        assert!(back.elapsed() < Duration::from_secs(30), "not accepted again 30 s after the feed came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The other auth methods (Kubernetes, userpass, bootstrap, a given token), and the
/// retries: a sealed server answers 503, and a client whose policy allows enough attempts
/// gets its answer once the server is unsealed; one with a single attempt gets the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_logs_in_and_a_sealed_server_is_retried() {
    use keyvault_tests::kube;
    let _ = logs();
    let w = world().await;
    let (c, root) = (w.s.client(), w.root.clone());
    ok(c.put("secret/app/db", &root, json!({ "value": SECRET })).await, 200);
    let read =
        |client: Client| async move { client.secret("secret/app/db").await.map(|s| s.expose_secret().to_owned()) };

    // Kubernetes: the service account token file is read at each login.
    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    let cluster = kube::Signer::new("k1");
    let config = json!({"issuer": ISS, "public_keys": cluster.public_pem(), "audiences": ["keyvault"]});
    ok(c.post("auth/kubernetes/config", Some(&root), config).await, 204);
    let role = json!({"bound_service_account_names": ["api"], "bound_service_account_namespaces": ["payments"], "token_policies": ["app"]});
    ok(c.post("auth/kubernetes/role/payments-api", Some(&root), role).await, 204);
    let jwt_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(jwt_file.path(), cluster.sign(&kube::claims("payments", "api", "keyvault", ISS, 600))).unwrap();
    let k8s = w.builder(&w.unit).auth(Auth::kubernetes("payments-api", jwt_file.path())).build().unwrap();
    assert_eq!(read(k8s).await.unwrap(), SECRET);

    // Userpass.
    ok(
        c.post(
            "auth/userpass/users/ops",
            Some(&root),
            json!({"password": "a long passphrase", "token_policies": ["app"]}),
        )
        .await,
        204,
    );
    let person = w.builder(&w.unit).auth(Auth::userpass("ops", "a long passphrase")).build().unwrap();
    assert_eq!(read(person.clone()).await.unwrap(), SECRET);
    let wrong = w.builder(&w.unit).auth(Auth::userpass("ops", "not it")).build().unwrap();
    assert_eq!(read(wrong).await.unwrap_err().status(), Some(401));

    // Bootstrap: one login, then the credential is spent.
    let minted = ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["app"]})).await, 200);
    let bootstrap = minted.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let once = w.builder(&w.unit).auth(Auth::bootstrap(&bootstrap)).build().unwrap();
    assert_eq!(read(once.clone()).await.unwrap(), SECRET);
    once.forget_token().await;
    assert_eq!(read(once).await.unwrap_err().status(), Some(401), "a bootstrap token logs in once");

    // A given token (as `VAULT_TOKEN`): used as it is.
    let given = w.builder(&w.unit).auth(Auth::token(&root)).build().unwrap();
    assert_eq!(read(given).await.unwrap(), SECRET);

    // Sealed: 503 until unsealed.
    let patient_with = |auth: Auth| {
        let retry =
            RetryPolicy { attempts: 40, base_delay: Duration::from_millis(100), max_delay: Duration::from_millis(250) };
        w.builder(&w.unit).auth(auth).retry(retry).build().unwrap()
    };
    let patient = patient_with(Auth::token(&root));
    let impatient = w
        .builder(&w.unit)
        .auth(Auth::token(&root))
        .retry(RetryPolicy { attempts: 1, ..Default::default() })
        .build()
        .unwrap();
    patient.token().await.unwrap();
    impatient.token().await.unwrap();
    // One that has not logged in yet: its login (a POST) is retried too, as a sealed
    // server's 503 says with `Retry-After` that nothing was done.
    let fresh = patient_with(Auth::userpass("ops", "a long passphrase"));
    ok(c.send("PUT", "sys/seal", Some(&root), Some(b"{}".to_vec())).await, 204);
    assert_eq!(read(impatient).await.unwrap_err().status(), Some(503));
    let sealed = c.send("GET", "secret/app/db", Some(&root), None).await;
    assert_eq!((sealed.status, sealed.headers.get("retry-after").map(|v| v.to_str().unwrap())), (503, Some("1")));
    let logging_in = tokio::spawn(read(fresh));
    let writing = tokio::spawn({
        let patient = patient.clone();
        async move { patient.put("secret/app/while-sealed", &json!({"value": "w"})).await }
    });
    let waiting = tokio::spawn(read(patient));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "still retrying while sealed");
    let pin = secrecy::ExposeSecret::expose_secret(&w.s.token.pin).to_owned();
    ok(c.send("PUT", "sys/unseal", None, Some(json!({ "key": pin }).to_string().into_bytes())).await, 200);
    assert_eq!(waiting.await.unwrap().unwrap(), SECRET);
    assert_eq!(logging_in.await.unwrap().unwrap(), SECRET);
    writing.await.unwrap().unwrap();
    assert_eq!(ok(c.get("secret/app/while-sealed", &root).await, 200).body["data"]["value"], "w");

    // `sign_http`: the five headers on an `http` request.
    let mut req = http::Request::new(b"{}".to_vec());
    Signer::local("sensor-1", &w.producer.sha256_hex, ed25519_dalek::SigningKey::from_bytes(&[3; 32]))
        .sign_http(&mut req)
        .await
        .unwrap();
    let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("x-keyvault-")));
    assert_nowhere(&bootstrap, &[("server log", &w.s.log_text())]);
}

/// A write answered 503 is not sent again: it may have been applied (a proxied write
/// whose upstream answered after the per-attempt timeout is 503, and the upstream has the
/// value), and each resend would be another write upstream (another AWS version, another
/// KV version 2 version that can push real history out). A read is retried as before.
/// A stub server that answers every request 503 counts what reaches it.
#[tokio::test]
async fn a_write_answered_503_is_not_sent_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let stub = tokio::spawn({
        let seen = seen.clone();
        async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request per connection: headers, then the body they announce.
                        let Ok(n) = conn.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else { continue };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        let line = text.lines().next().unwrap_or_default().to_owned();
                        // The client asks where the mount is first: that is answered.
                        let (status, body) = if line.starts_with("GET /v1/sys/internal/ui/mounts/") {
                            ("200 OK", r#"{"data":{"path":"cloud/","type":"aws","options":{}}}"#)
                        } else {
                            ("503 Service Unavailable", r#"{"errors":["upstream: no answer within 5s"]}"#)
                        };
                        if line.contains(" /v1/cloud/") {
                            seen.lock().unwrap().push(line);
                        }
                        let reply = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(reply.as_bytes()).await;
                        return;
                    }
                });
            }
        }
    });
    let client = Client::builder()
        .address(format!("http://{addr}"))
        .auth(Auth::token("kv.stub"))
        .retry(RetryPolicy { attempts: 4, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(5) })
        .build()
        .unwrap();
    let err = client.put("cloud/db", &json!({"password": "p"})).await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(seen.lock().unwrap().clone(), vec!["PUT /v1/cloud/db HTTP/1.1".to_owned()], "sent once");
    seen.lock().unwrap().clear();
    assert_eq!(client.secret("cloud/db").await.unwrap_err().status(), Some(503));
    assert_eq!(seen.lock().unwrap().len(), 4, "a read is retried: {:?}", seen.lock().unwrap());
    stub.abort();
}
