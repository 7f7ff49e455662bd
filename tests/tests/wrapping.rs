//! Response wrapping: `X-Vault-Wrap-TTL` returns a single-use wrapping token instead of
//! the reply; the reply is sealed at rest and unwrapped exactly once, even by sixteen
//! concurrent unwraps.

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

async fn wrapped(c: &Client, method: &str, path: &str, token: &str, body: serde_json::Value, ttl: &str) -> Reply {
    let req = c
        .http
        .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), c.url(path))
        .header("X-Vault-Token", token)
        .header("X-Vault-Wrap-TTL", ttl)
        .body(body.to_string());
    Client::reply(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrapped_secret_id_is_unwrapped_exactly_once() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("auth/approle/role/web", Some(&root), json!({})).await, 204);
    let r = ok(wrapped(&c, "POST", "auth/approle/role/web/secret-id", &root, json!({}), "5m").await, 200);
    assert_eq!(r.body["data"], serde_json::Value::Null, "the reply itself is not shown: {r:?}");
    let info = &r.body["wrap_info"];
    assert_eq!(info["creation_path"], "auth/approle/role/web/secret-id");
    assert_eq!(info["ttl"], 300);
    let w = info["token"].as_str().unwrap().to_owned();
    assert!(w.starts_with("kvw."));

    // Lookup tells when and where; it does not spend the token.
    let l = ok(c.post("sys/wrapping/lookup", None, json!({ "token": w })).await, 200);
    assert_eq!(l.body["data"]["creation_ttl"], 300);
    // Sixteen unwraps at once: exactly one gets the secret id.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, w) = (c.clone(), w.clone());
            tokio::spawn(async move { c.send("POST", "sys/wrapping/unwrap", Some(&w), None).await })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => got.push(r.body["data"]["secret_id"].as_str().unwrap().to_owned()),
            400 => assert_eq!(r.body["errors"][0], "wrapping token is not valid or does not exist"),
            other => panic!("unwrap answered {other}: {r:?}"),
        }
    }
    assert_eq!(got.len(), 1, "exactly one unwrap wins");
    // The secret id works, and the wrapped reply is no longer stored.
    let role_id = ok(c.get("auth/approle/role/web/role-id", &root).await, 200).body["data"]["role_id"].clone();
    ok(c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": got[0]})).await, 200);
    ok(c.post("sys/wrapping/lookup", None, json!({ "token": w })).await, 400);
    // At rest, the wrapped reply was sealed: the secret id is in no file of the install.
    assert!(keyvault_tests::files_containing(s.dir.path(), got[0].as_bytes()).is_empty());
    // Audited as Vault does: the wrapping request names the wrap by its accessor; neither
    // the wrapping token nor the secret id appears in the log.
    let log = std::fs::read_to_string(s.audit_log()).unwrap();
    let accessor = info["accessor"].as_str().unwrap();
    assert!(log.contains(&format!("reply wrapped (wrapping token accessor {accessor})")), "{log}");
    assert!(log.contains("sys/wrapping/unwrap"), "{log}");
    assert!(!log.contains(&w) && !log.contains(&got[0]));
}

#[tokio::test]
async fn reads_writes_and_wrap_itself_can_be_wrapped_and_rewrapped() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("secret/db", &root, json!({"password": "s3cret-wrapped"})).await, 200);
    let r = ok(wrapped(&c, "GET", "secret/db", &root, json!({}), "60").await, 200);
    let w = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
    // Rewrap: a new token for the same reply, the old one spent.
    let r = ok(c.post("sys/wrapping/rewrap", None, json!({ "token": w })).await, 200);
    let w2 = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
    ok(c.post("sys/wrapping/unwrap", None, json!({ "token": w })).await, 400);
    let u = ok(c.post("sys/wrapping/unwrap", None, json!({ "token": w2 })).await, 200);
    assert_eq!(u.body["data"]["password"], "s3cret-wrapped");
    assert_eq!(u.body["metadata"]["version"], 1);
    // sys/wrapping/wrap wraps what it is given (default TTL 5 minutes).
    let r = ok(c.post("sys/wrapping/wrap", Some(&root), json!({"k": "v"})).await, 200);
    assert_eq!(r.body["wrap_info"]["ttl"], 300);
    let w3 = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
    let u = ok(c.post("sys/wrapping/unwrap", None, json!({ "token": w3 })).await, 200);
    assert_eq!(u.body["data"]["k"], "v");
    // A TTL beyond a day, or nonsense, is refused; errors are never wrapped.
    ok(wrapped(&c, "GET", "secret/db", &root, json!({}), "48h").await, 400);
    ok(wrapped(&c, "GET", "secret/db", &root, json!({}), "soon").await, 400);
    let r = ok(wrapped(&c, "GET", "secret/nope", &root, json!({}), "5m").await, 404);
    assert!(r.body.get("wrap_info").is_none());
    // Refused before the request runs: a write with a TTL out of range changes nothing.
    let r = ok(wrapped(&c, "PUT", "secret/db", &root, json!({"password": "overwritten"}), "48h").await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("1 s to 24 h"), "{r:?}");
    ok(wrapped(&c, "PUT", "secret/refused-write", &root, json!({"v": "x"}), "48h").await, 400);
    assert_eq!(ok(c.get("secret/db", &root).await, 200).body["data"]["password"], "s3cret-wrapped");
    ok(c.get("secret/refused-write", &root).await, 404);
    // A TTL of 0 asks for no wrapping (as in Vault): the reply comes plain.
    let r = ok(wrapped(&c, "GET", "secret/db", &root, json!({}), "0").await, 200);
    assert_eq!((r.body["data"]["password"].as_str(), r.body.get("wrap_info")), (Some("s3cret-wrapped"), None));
    ok(c.post("sys/wrapping/unwrap", None, json!({"token": "kvw.0000"})).await, 400);
    ok(c.post("sys/wrapping/unwrap", None, json!({})).await, 400);
    // Anything but the form tokens are made in (`kvw.` and 64 lower-case hex digits) is
    // refused before its keyed hash (a token call an anonymous caller could spend).
    let hex = "ab".repeat(32);
    for bad in [
        format!("kvw.{}", hex.to_uppercase()),
        format!("kvw.{}", &hex[..62]),
        format!("kvw.{hex}0"),
        format!("kvw.{}g", &hex[..63]),
        format!("kvx.{hex}"),
        format!(" kvw.{hex}"),
    ] {
        ok(c.post("sys/wrapping/unwrap", None, json!({ "token": bad })).await, 400);
        ok(c.post("sys/wrapping/lookup", None, json!({ "token": bad })).await, 400);
    }
    // A well-formed one that was never issued is looked up (one keyed hash) and refused alike.
    ok(c.post("sys/wrapping/lookup", None, json!({ "token": format!("kvw.{hex}") })).await, 400);
}

/// An anonymous client cannot have replies wrapped: the endpoints that need no token
/// answer plainly whatever `X-Vault-Wrap-TTL` says (as Vault's do), and store nothing
/// (a wrapped reply costs token calls and a stored record for its whole TTL).
#[tokio::test]
async fn replies_of_endpoints_without_a_token_are_never_wrapped() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let writes = |text: &str| keyvault_tests::metric_sum(text, "keyvault_store_writes_total", &[]);
    let scrape = || async {
        let r = c.http.get(format!("{}/metrics", c.base)).header("X-Vault-Token", &s.root).send().await.unwrap();
        r.text().await.unwrap()
    };
    let before = writes(&scrape().await);
    for path in ["sys/health", "sys/seal-status", "sys/leader", "auth/jwks"] {
        for _ in 0..5 {
            let req = c.http.get(c.url(path)).header("X-Vault-Wrap-TTL", "24h");
            let r = Client::reply(req.send().await.unwrap()).await;
            assert!(r.status < 300, "{path}: {r:?}");
            assert!(r.body["wrap_info"].is_null(), "{path} was wrapped: {r:?}");
        }
    }
    assert_eq!(writes(&scrape().await), before, "nothing was stored");
}

/// A wrapped reply is opened before it is consumed: an unwrap or a rewrap that fails on
/// the way (the token cannot unwrap the reply's key) leaves the wrapping token good for
/// the next try, and the reply is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unwrap_or_rewrap_loses_nothing() {
    let fault = keyvault_tests::TokenFault::new();
    let s = TestServer::start(ServerOptions { env: vec![fault.env()], ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("secret/w", &root, json!({"value": "wrapped value"})).await, 200);
    let r = ok(wrapped(&c, "GET", "secret/w", &root, serde_json::Value::Null, "5m").await, 200);
    let mut w = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
    for path in ["sys/wrapping/rewrap", "sys/wrapping/unwrap"] {
        fault.set("error unwrap_key");
        let r = c.send("POST", path, Some(&w), None).await;
        assert_eq!(r.status, 503, "{path}: {r:?}");
        fault.set("");
        let r = ok(c.send("POST", path, Some(&w), None).await, 200);
        if path.ends_with("rewrap") {
            let old = w.clone();
            w = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
            assert_ne!(old, w);
            assert_eq!(c.send("POST", "sys/wrapping/unwrap", Some(&old), None).await.status, 400, "spent");
        } else {
            assert_eq!(r.body["data"]["value"], "wrapped value", "{r:?}");
        }
    }
    assert_eq!(c.send("POST", "sys/wrapping/unwrap", Some(&w), None).await.status, 400, "used once");

    // Sixteen rewraps of one token at once: one new token, and it unwraps the reply.
    let r = ok(wrapped(&c, "GET", "secret/w", &root, serde_json::Value::Null, "5m").await, 200);
    let w = r.body["wrap_info"]["token"].as_str().unwrap().to_owned();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, w) = (c.clone(), w.clone());
            tokio::spawn(async move { c.send("POST", "sys/wrapping/rewrap", Some(&w), None).await })
        })
        .collect();
    let mut new_tokens = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => new_tokens.push(r.body["wrap_info"]["token"].as_str().unwrap().to_owned()),
            400 => {}
            other => panic!("{other}: {r:?}"),
        }
    }
    assert_eq!(new_tokens.len(), 1, "exactly one rewrap wins");
    let r = ok(c.send("POST", "sys/wrapping/unwrap", Some(&new_tokens[0]), None).await, 200);
    assert_eq!(r.body["data"]["value"], "wrapped value");
}

/// Guessing wrapping tokens is rate limited like logins: each guess costs a keyed hash in
/// the token before the store can say the wrapping token does not exist, and it needs no
/// other credential. A source's failed guesses count against its login limit (20 per
/// address by default); past it, guesses are refused with 429 before any token call, and
/// a real wrapping token from that source waits for the window as well.
#[tokio::test]
async fn guessing_wrapping_tokens_is_rate_limited_before_any_token_call() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let hmacs =
        |text: &str| keyvault_tests::metric_sum(text, "keyvault_token_operations_total", &["op=\"hmac_sha256\""]);
    let scrape = || async {
        let r = c.http.get(format!("{}/metrics", c.base)).header("X-Vault-Token", &s.root).send().await.unwrap();
        r.text().await.unwrap()
    };
    let guess = |i: u32| format!("kvw.{:064x}", 0xfeed_0000u64 + u64::from(i));
    for i in 0..20 {
        let path = if i % 2 == 0 { "sys/wrapping/lookup" } else { "sys/wrapping/unwrap" };
        let r = ok(c.post(path, None, json!({ "token": guess(i) })).await, 400);
        assert_eq!(r.body["errors"][0], "wrapping token is not valid or does not exist");
    }
    let before = hmacs(&scrape().await);
    for i in 20..60 {
        for path in ["sys/wrapping/lookup", "sys/wrapping/unwrap", "sys/wrapping/rewrap"] {
            let r = c.post(path, None, json!({ "token": guess(i) })).await;
            assert_eq!(r.status, 429, "{path}: {r:?}");
        }
        let r = c.send("GET", &format!("sys/wrapping/lookup?token={}", guess(i)), None, None).await;
        assert_eq!(r.status, 429, "{r:?}");
    }
    assert_eq!(hmacs(&scrape().await), before, "a refused guess cost a token call");
    // Logins from the guessing source wait for the window too (the same counter).
    ok(c.post("auth/approle/login", None, json!({"role_id": "r", "secret_id": "s"})).await, 429);
}
