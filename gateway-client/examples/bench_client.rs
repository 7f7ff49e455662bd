//! The client's benchmark (run by `scripts/bench-client.sh` against `keyvault dev`):
//!
//! - gateway checks per second through [`VerifyLayer`], with concurrent batching (1 ms
//!   window) and with one verify request per check, in the same run: `connections`
//!   producers sign requests (local Ed25519 keys) and post them to an axum gateway in this
//!   process, on keep-alive connections, for `seconds` each;
//! - a unit's start-up: a new client (a new mutual TLS connection), an AppRole login, ten
//!   secrets read with `fetch_all`, `startups` times; p50 and p99.
//!
//! Environment: `KEYVAULT_ADDR`, `KEYVAULT_CACERT`, `KEYVAULT_CLIENT_CERT`,
//! `KEYVAULT_CLIENT_KEY` and a root `KEYVAULT_TOKEN` (for the set-up only). Arguments:
//! `[seconds] [connections] [startups]` (`startups` 0: no start-up case). Prints one JSON object per case; a case counts
//! only when `errors` is 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::routing::post;
use base64::Engine;
use keyvault_client::gateway::{GatewayConfig, VerifyLayer};
use keyvault_client::producer::Signer;
use keyvault_client::{Auth, Client, ClientBuilder};
use serde_json::json;

const CERT: &str = "abababababababababababababababababababababababababababababababab";
const BODY: &[u8] = br#"{"reading":21.5,"unit":"celsius"}"#;

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]) / 1000.0
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// An AppRole role `name` with a policy of the same name: its role id and a secret id.
async fn role(root: &Client, name: &str, policy: &str) -> Result<(String, String), Error> {
    root.request("PUT", &format!("sys/policies/acl/{name}"), Some(&json!({ "policy": policy }))).await?;
    root.request(
        "POST",
        &format!("auth/approle/role/{name}"),
        Some(&json!({"token_policies": [name], "token_ttl": "10m"})),
    )
    .await?;
    let rid: keyvault_api::auth::RoleId =
        root.request_data("GET", &format!("auth/approle/role/{name}/role-id"), None::<&()>).await?;
    let sid: keyvault_api::auth::SecretId =
        root.request_data("POST", &format!("auth/approle/role/{name}/secret-id"), Some(&json!({}))).await?;
    Ok((rid.role_id, sid.secret_id.expose().to_owned()))
}

/// `connections` producers posting signed requests to `url` for `seconds`.
async fn load(url: &str, seconds: u64, connections: usize) -> serde_json::Value {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let signer = Arc::new(Signer::local("bench-layer", CERT, key));
    let end = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (signer, errors, url) = (signer.clone(), errors.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().http1_only().pool_max_idle_per_host(1).build().unwrap_or_default();
            let mut lat = Vec::new();
            while Instant::now() < end {
                let Ok(h) = signer.headers(BODY).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let t0 = Instant::now();
                let ok = match http.post(&url).headers(h).body(BODY).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    lat.push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_unstable();
    json!({
        "checks_per_second": all.len() as f64 / seconds as f64,
        "p50_ms": percentile(&all, 0.5),
        "p99_ms": percentile(&all, 0.99),
        "errors": errors.load(Ordering::Relaxed),
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap_or(0)).collect();
    let seconds = args.first().copied().filter(|s| *s > 0).unwrap_or(8);
    let connections = args.get(1).copied().filter(|s| *s > 0).unwrap_or(32) as usize;
    let startups = args.get(2).copied().unwrap_or(200) as usize;
    let root = ClientBuilder::from_env().build()?;

    // Set-up: a producer, a gateway role, a unit role and its ten secrets.
    let public = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]).verifying_key();
    let b64 = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
    root.request(
        "POST",
        "gateway/producers/bench-layer",
        Some(&json!({"cert_sha256": [CERT], "keys": [{"key_id": "k1", "public_key": b64}]})),
    )
    .await?;
    let (gw_role, gw_secret) =
        role(&root, "bench-gw", "path \"gateway/verify\" { capabilities = [\"verify\"] }").await?;
    let (unit_role, unit_secret) =
        role(&root, "bench-unit", "path \"secret/bench-unit/*\" { capabilities = [\"read\"] }").await?;
    let paths: Vec<String> = (0..10).map(|i| format!("secret/bench-unit/s{i}")).collect();
    for p in &paths {
        root.put(p, &json!({ "value": format!("not-a-secret-{p}") })).await?;
    }

    // Gateways: batching and not.
    let gw = ClientBuilder::from_env().auth(Auth::approle(gw_role, gw_secret)).build()?;
    let mut urls = Vec::new();
    for batch in [Some(Duration::from_millis(1)), None] {
        let config = GatewayConfig { batch_window: batch, ..Default::default() };
        let app = axum::Router::new()
            .route("/telemetry", post(|| async { "ok" }))
            .layer(VerifyLayer::new(gw.clone(), config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}/telemetry", listener.local_addr()?));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    // Warm up (logins, connections), then measure each.
    let _ = load(&urls[0], 1, connections).await;
    let _ = load(&urls[1], 1, connections).await;
    for (case, url) in [("layer, batched (1 ms window)", &urls[0]), ("layer, one verify request per check", &urls[1])] {
        let mut r = load(url, seconds, connections).await;
        r["case"] = json!(case);
        r["connections"] = json!(connections);
        println!("{r}");
    }

    if startups == 0 {
        return Ok(());
    }
    // A unit's start-up, again and again, with its phases: the client built (certificates
    // read), the handshake and login (the first call), the ten reads.
    let mut lat = Vec::with_capacity(startups);
    let mut phases: [Vec<u32>; 3] = Default::default();
    let mut errors = 0u64;
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let micros = |t: Instant| t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
    for _ in 0..startups {
        let t0 = Instant::now();
        let ok = async {
            let unit = ClientBuilder::from_env().auth(Auth::approle(&unit_role, &unit_secret)).build()?;
            let t1 = Instant::now();
            unit.token().await?;
            let t2 = Instant::now();
            let n = unit.fetch_all(&refs).await?.len();
            Ok::<_, keyvault_client::Error>((n == 10, [t1 - t0, t2 - t1, t2.elapsed()]))
        }
        .await;
        match ok {
            Ok((true, p)) => {
                lat.push(micros(t0));
                for (v, d) in phases.iter_mut().zip(p) {
                    v.push(d.as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            _ => errors += 1,
        }
    }
    lat.sort_unstable();
    phases.iter_mut().for_each(|v| v.sort_unstable());
    println!(
        "{}",
        json!({
            "case": "unit start-up: mutual TLS handshake, AppRole login, 10 secrets",
            "startups": startups, "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99), "errors": errors,
            "p50_build_ms": percentile(&phases[0], 0.5), "p50_handshake_login_ms": percentile(&phases[1], 0.5),
            "p50_ten_reads_ms": percentile(&phases[2], 0.5),
        })
    );
    Ok(())
}
