//! The metrics endpoint (`/v1/sys/metrics`, `/metrics`): who may scrape it, what it
//! shows, that labels never carry what a client sent, and the storage-write and token-call
//! counts per login and per read that docs/PERFORMANCE.md quotes.

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json, metric_sum};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

/// The text of a scrape.
async fn scrape(c: &Client, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut req = c.http.get(format!("{}{path}", c.base));
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, ctype, resp.text().await.unwrap())
}

/// A token of one policy, made by root.
async fn token_with(c: &Client, root: &str, policy: &str) -> String {
    let r = ok(c.post("auth/token/create", Some(root), json!({"policies": [policy]})).await, 200);
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

async fn approle_login(c: &Client, role_id: &str, secret_id: &str) -> String {
    let r = ok(c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": secret_id})).await, 200);
    r.body["auth"]["client_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_needs_read_on_sys_metrics_and_shows_every_family() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put(
            "sys/policies/acl/scraper",
            &root,
            json!({"policy": "path \"sys/metrics\" { capabilities = [\"read\"] }"}),
        )
        .await,
        204,
    );
    ok(
        c.put("sys/policies/acl/other", &root, json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"}))
            .await,
        204,
    );
    let scraper = token_with(&c, &root, "scraper").await;
    let other = token_with(&c, &root, "other").await;
    for path in ["/v1/sys/metrics", "/metrics"] {
        assert_eq!(scrape(&c, path, None).await.0, 401, "{path} without a token");
        assert_eq!(scrape(&c, path, Some(&other)).await.0, 403, "{path} without read on sys/metrics");
        assert_eq!(scrape(&c, path, Some("hvs.forged")).await.0, 401, "{path} with a forged token");
    }
    assert_eq!(scrape(&c, "/v1/sys/metrics?format=json", Some(&scraper)).await.0, 400);

    // Traffic of every kind the families count, and a path that names a secret.
    ok(c.put("secret/metrics-probe-7f3a", &root, json!({"v": "1"})).await, 200);
    ok(c.get("secret/metrics-probe-7f3a", &root).await, 200);
    ok(c.post("transit/keys/m", Some(&root), json!({"type": "ed25519"})).await, 200);
    ok(c.post("gateway/verify", Some(&root), json!({})).await, 400);
    ok(c.post("transit/sign/m", Some(&root), json!({"input": "aGk="})).await, 200);
    ok(c.send("GET", "no-such-mount-9c1e/x", Some(&root), None).await, 404);

    let (status, ctype, text) = scrape(&c, "/metrics", Some(&scraper)).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    for (family, kind) in [
        ("keyvault_requests", "counter"),
        ("keyvault_request_duration_seconds", "histogram"),
        ("keyvault_token_operations", "counter"),
        ("keyvault_token_operation_duration_seconds", "histogram"),
        ("keyvault_token_queue_depth", "gauge"),
        ("keyvault_store_operations", "counter"),
        ("keyvault_store_operation_duration_seconds", "histogram"),
        ("keyvault_store_writes", "counter"),
        ("keyvault_gateway_verdicts", "counter"),
        ("keyvault_audit_queue_depth", "gauge"),
        ("keyvault_audit_fsync_duration_seconds", "histogram"),
        ("keyvault_rotation_active", "gauge"),
        ("keyvault_rotation_records_done", "gauge"),
        ("keyvault_open_connections", "gauge"),
        ("keyvault_epoch_keys_loaded", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {family} {kind}\n")), "{family} missing from:\n{text}");
    }
    // Route templates, never paths: the secret's name and the unknown mount appear nowhere.
    assert!(
        metric_sum(&text, "keyvault_requests_total", &["route=\"GET /v1/secret/{*path}\"", "status=\"200\""]) >= 1.0,
        "{text}"
    );
    assert!(metric_sum(&text, "keyvault_requests_total", &["route=\"(no route)\"", "status=\"404\""]) >= 1.0, "{text}");
    assert!(!text.contains("metrics-probe-7f3a") && !text.contains("no-such-mount-9c1e"), "{text}");
    assert!(metric_sum(&text, "keyvault_token_operations_total", &["op=\"sign_ed25519\"", "result=\"ok\""]) >= 1.0);
    assert!(metric_sum(&text, "keyvault_open_connections", &[]) >= 1.0);
    assert_eq!(metric_sum(&text, "keyvault_gateway_verdicts_total", &["reason=\"malformed_request\""]), 1.0, "{text}");
    assert_eq!(metric_sum(&text, "keyvault_epoch_keys_loaded", &[]), 1.0);
    assert!(metric_sum(&text, "keyvault_audit_fsync_duration_seconds_count", &[]) >= 1.0);
    // The scrapes were audited like any request.
    assert!(std::fs::read_to_string(s.audit_log()).unwrap().contains("/v1/sys/metrics"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_scraping_when_configured() {
    let s = TestServer::start(ServerOptions {
        extra: "[telemetry]\nunauthenticated_metrics_access = true\n".into(),
        ..Default::default()
    });
    let c = s.client();
    ok(c.send("GET", "sys/health", None, None).await, 200);
    let (status, _, text) = scrape(&c, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(text.contains("keyvault_requests_total{route=\"GET /v1/sys/health\",status=\"200\"}"), "{text}");
}

/// Logins write nothing to storage and call the token twice (the secret id's HMAC and the
/// token's signature); reads write nothing and, with the default epoch key tier, never
/// call the token. Counted from the server's own metrics across 25 of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_reads_write_nothing_and_reads_make_no_token_call() {
    // The automatic rotation check (a counter write every 10 s after records were sealed)
    // is background work, not the requests': kept out of the window counted.
    let s = TestServer::start(ServerOptions {
        extra: "[rotation]\ncheck_interval = \"1h\"\n".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(
        c.put("sys/policies/acl/app", &root, json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"}))
            .await,
        204,
    );
    ok(
        c.post("auth/approle/role/app", Some(&root), json!({"token_policies": ["app"], "secret_id_num_uses": 0})).await,
        204,
    );
    let role_id = ok(c.get("auth/approle/role/app/role-id", &root).await, 200).body["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id =
        ok(c.post("auth/approle/role/app/secret-id", Some(&root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    ok(c.put("secret/db", &root, json!({"password": "metrics-secret-value"})).await, 200);
    // Warm: the first login and read load keys and caches.
    let token = approle_login(&c, &role_id, &secret_id).await;
    ok(c.get("secret/db", &token).await, 200);

    let counts = |text: &str| {
        (metric_sum(text, "keyvault_store_writes_total", &[]), metric_sum(text, "keyvault_token_operations_total", &[]))
    };
    let (_, _, before) = scrape(&c, "/metrics", Some(&root)).await;
    let mut tokens = Vec::new();
    for _ in 0..25 {
        tokens.push(approle_login(&c, &role_id, &secret_id).await);
    }
    let (_, _, after_logins) = scrape(&c, "/metrics", Some(&root)).await;
    for t in &tokens {
        assert_eq!(ok(c.get("secret/db", t).await, 200).body["data"]["password"], "metrics-secret-value");
    }
    let (_, _, after_reads) = scrape(&c, "/metrics", Some(&root)).await;

    let (w0, t0) = counts(&before);
    let (w1, t1) = counts(&after_logins);
    let (w2, t2) = counts(&after_reads);
    assert_eq!(w1 - w0, 0.0, "storage writes for 25 logins");
    assert_eq!(t1 - t0, 50.0, "token calls for 25 logins (HMAC and signature each)");
    assert_eq!(w2 - w1, 0.0, "storage writes for 25 reads");
    assert_eq!(t2 - t1, 0.0, "token calls for 25 reads (epoch key tier)");
    let logins = |t: &str| {
        metric_sum(t, "keyvault_requests_total", &["route=\"POST /v1/auth/approle/login\"", "status=\"200\""])
    };
    assert_eq!(logins(&after_logins) - logins(&before), 25.0);
}
