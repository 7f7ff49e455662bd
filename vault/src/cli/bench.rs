//! `keyvault bench`: a load generator for any Vault-API server (KeyVault, OpenBao,
//! HashiCorp Vault), so that one run measures them side by side on one machine.
//!
//! Each connection is a task with its own `keyvault-client` client (its own keep-alive
//! connection, TLS or plain) sending requests back to back, with no retries; latencies are
//! recorded per request and merged at the end. The handshake scenario opens TLS
//! connections itself (a full handshake each, no resumption, nothing sent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use keyvault_client::{Client, RetryPolicy};
use serde::Serialize;
use serde_json::{Value, json};

use super::Endpoint;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `GET /v1/<path>` with a token.
    Read,
    /// `PUT /v1/<path>/<n>`: a new secret per request, `n` counting up from 0 across
    /// connections (`--requests` bounds the run: a way to fill a server).
    Write,
    /// `POST /v1/auth/approle/login` with a role id and secret id.
    ApproleLogin,
    /// `POST /v1/auth/cert/login` over mutual TLS (needs `--client-cert`/`--client-key`).
    CertLogin,
    /// A new connection per iteration: a full TLS handshake (no resumption), nothing sent.
    Handshake,
    /// `POST /v1/gateway/verify`, one freshly signed item per request.
    GatewayVerify,
    /// `POST /v1/gateway/verify` with a batch of 100 freshly signed items.
    GatewayVerifyBatch,
    /// `POST /v1/transit/sign/bench-sign` (Ed25519 in the HSM).
    TransitSign,
    /// `POST /v1/transit/encrypt/bench-enc` of 32 bytes (AES-GCM in the HSM).
    TransitEncrypt,
}

impl Scenario {
    /// Operations per request (gateway batches carry 100).
    pub fn items_per_request(self) -> u64 {
        if self == Scenario::GatewayVerifyBatch { BATCH } else { 1 }
    }
}

const BATCH: u64 = 100;
const PRODUCER: &str = "bench-producer";
const PRODUCER_SEED: [u8; 32] = [7u8; 32];
static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn producer_cert() -> String {
    "ee".repeat(32)
}

/// One gateway item, signed now by the bench producer with a nonce never used before.
fn signed_item(key: &ed25519_dalek::SigningKey) -> serde_json::Value {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ts = keyvault::unix_now();
    let n = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nonce = format!("bench-{}-{n:016}", std::process::id());
    let body = br#"{"reading":21.5}"#;
    let ts = ts.to_string();
    let msg = keyvault_api::gateway::signing_input(&ts, &nonce, body);
    let item = keyvault_api::gateway::VerifyItem {
        identity: Some(PRODUCER.into()),
        cert_sha256: Some(producer_cert()),
        timestamp: Some(keyvault_api::gateway::Timestamp::Text(ts)),
        nonce: Some(nonce),
        signature: Some(b64(&key.sign(&msg).to_bytes())),
        body: Some(b64(body)),
    };
    serde_json::to_value(item).unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The server, its CA, the client certificate (mutual TLS) and the token.
    pub endpoint: Endpoint,
    pub scenario: Scenario,
    /// Secret path for `read`, under `/v1/` (e.g. `secret/bench`).
    pub path: String,
    /// Cert role for `cert-login`.
    pub role: String,
    pub role_id: Option<String>,
    pub secret_id: Option<String>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Stop after this many requests in all (or at the end of `duration`).
    pub requests: Option<u64>,
    /// `read`: over this many secrets `<path>/NNNNNNNN` instead of one.
    pub spread: Option<u64>,
    /// `read` straight from a proxied mount's upstream through its adapter (no KeyVault
    /// server in between), at this path relative to the mount.
    pub upstream: Option<(Arc<dyn keyvault_proxy_backends::SecretBackend>, String)>,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub scenario: Scenario,
    pub address: String,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    /// Operations per second (gateway batches: 100 per request).
    pub items_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {} conns={} requests={} errors={} rps={:.0} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms",
            self.scenario,
            self.address,
            self.connections,
            self.requests,
            self.errors,
            self.requests_per_second,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

/// The request of one iteration: method, path, body.
fn build_request(o: &BenchOptions, n: u64) -> Result<(&'static str, String, Option<Value>)> {
    Ok(match o.scenario {
        Scenario::Handshake => bail!("the handshake scenario sends no request"),
        Scenario::CertLogin => ("POST", "auth/cert/login".into(), Some(json!({"name": o.role}))),
        Scenario::Read => match o.spread {
            // A multiplicative step co-prime with most sizes scatters consecutive reads
            // across the key space (no two connections walk it in order).
            Some(k) => ("GET", format!("{}/{:08}", o.path, n.wrapping_mul(2_654_435_761) % k), None),
            None => ("GET", o.path.clone(), None),
        },
        Scenario::Write => ("PUT", format!("{}/{n:08}", o.path), Some(json!({"value": format!("bench-value-{n}")}))),
        Scenario::GatewayVerify | Scenario::GatewayVerifyBatch => {
            let key = ed25519_dalek::SigningKey::from_bytes(&PRODUCER_SEED);
            let body = if o.scenario == Scenario::GatewayVerify {
                signed_item(&key)
            } else {
                json!({"batch": (0..BATCH).map(|_| signed_item(&key)).collect::<Vec<_>>()})
            };
            ("POST", "gateway/verify".into(), Some(body))
        }
        Scenario::TransitSign => ("POST", "transit/sign/bench-sign".into(), Some(json!({"input": "YmVuY2ggaW5wdXQ="}))),
        Scenario::TransitEncrypt => (
            "POST",
            "transit/encrypt/bench-enc".into(),
            Some(json!({"plaintext": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="})),
        ),
        Scenario::ApproleLogin => (
            "POST",
            "auth/approle/login".into(),
            Some(json!({
                "role_id": o.role_id.as_deref().unwrap_or_default(),
                "secret_id": o.secret_id.as_deref().unwrap_or_default(),
            })),
        ),
    })
}

/// A full TLS handshake to the endpoint (no session resumption); the connection is
/// dropped.
struct Handshaker {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
    addr: String,
}

impl Handshaker {
    fn new(e: &Endpoint) -> Result<Self> {
        let url = reqwest::Url::parse(&e.address).map_err(|err| anyhow!("address {}: {err}", e.address))?;
        if url.scheme() != "https" {
            bail!("the handshake scenario needs https");
        }
        let host = url.host_str().ok_or_else(|| anyhow!("address without a host"))?.trim_matches(['[', ']']).to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        let ca = e.ca_file.as_ref().ok_or_else(|| anyhow!("https needs --ca-file"))?;
        for c in keyvault::tls::load_certs(ca)? {
            roots.add(c)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(keyvault::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match (&e.client_cert, &e.client_key) {
            (Some(c), Some(k)) => {
                builder.with_client_auth_cert(keyvault::tls::load_certs(c)?, keyvault::tls::load_key(k)?)?
            }
            _ => builder.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        Ok(Handshaker {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
            addr: format!("{host}:{port}"),
        })
    }

    async fn once(&self) -> bool {
        let Ok(tcp) = tokio::net::TcpStream::connect(&self.addr).await else { return false };
        self.connector.connect(self.name.clone(), tcp).await.is_ok()
    }
}

/// One load connection's client: no retries (a failure is counted), the token when the
/// scenario needs one.
fn load_client(o: &BenchOptions) -> Result<Client> {
    let mut b = o.endpoint.builder()?.retry(RetryPolicy { attempts: 1, ..Default::default() }).max_idle_connections(1);
    if o.scenario != Scenario::ApproleLogin
        && let Some(auth) = o.endpoint.auth()
    {
        b = b.auth(auth);
    }
    Ok(b.build()?)
}

/// Run the load and report.
pub async fn run(o: BenchOptions) -> Result<BenchReport> {
    let handshaker = if o.scenario == Scenario::Handshake && o.upstream.is_none() {
        Some(Arc::new(Handshaker::new(&o.endpoint)?))
    } else {
        None
    };
    let template = Arc::new(o.clone());
    let start = Instant::now() + o.warmup;
    let end = start + o.duration;
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(o.connections);
    for _ in 0..o.connections.max(1) {
        let handshaker = handshaker.clone();
        let o = template.clone();
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut record = |t0: Instant, ok: bool| {
                let micros = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                // A failure counts even during the warm-up: a run is good only if every
                // response was 2xx.
                if !ok {
                    errors += 1;
                } else if t0 >= start {
                    lat.push(micros);
                }
            };
            if let Some((backend, path)) = &o.upstream {
                let latest = keyvault_proxy_backends::Version::Latest;
                while Instant::now() < end {
                    let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if o.requests.is_some_and(|max| n >= max) {
                        break;
                    }
                    let t0 = Instant::now();
                    let ok = backend.read(path, &latest).await.is_ok();
                    record(t0, ok);
                }
                return Ok::<_, anyhow::Error>((lat, errors));
            }
            if let Some(h) = handshaker {
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let ok = h.once().await;
                    record(t0, ok);
                }
                return Ok((lat, errors));
            }
            let client = load_client(&o)?;
            while Instant::now() < end {
                let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if o.requests.is_some_and(|max| n >= max) {
                    break;
                }
                let (method, path, body) = build_request(&o, n)?;
                let t0 = Instant::now();
                let ok = client.request(method, &path, body.as_ref()).await.is_ok();
                record(t0, ok);
            }
            Ok((lat, errors))
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(|e| anyhow!("load task: {e}"))??;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        f64::from(all[i]) / 1000.0
    };
    // A run bounded by `requests` may end before `duration`.
    let seconds = Instant::now().min(end).saturating_duration_since(start).as_secs_f64().max(1e-3);
    Ok(BenchReport {
        scenario: o.scenario,
        address: match &o.upstream {
            Some((b, _)) => format!("{} upstream, directly", b.kind()),
            None => o.endpoint.address.clone(),
        },
        connections: o.connections,
        seconds,
        requests: all.len() as u64,
        errors,
        requests_per_second: all.len() as f64 / seconds,
        items_per_second: (all.len() as u64 * o.scenario.items_per_request()) as f64 / seconds,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|m| f64::from(*m) / 1000.0).unwrap_or(0.0),
    })
}

/// Prepare a server for a run: write the secret, and for logins create an AppRole role
/// (enabling the AppRole mount first on servers that need it, such as OpenBao).
/// Returns the role id and secret id for `approle-login`.
pub async fn setup(o: &BenchOptions) -> Result<Option<(String, String)>> {
    if let Some((backend, path)) = &o.upstream {
        let value = keyvault_proxy_backends::SecretData::from_fields([("value", "bench-value-not-secret")]);
        backend.write(path, &value, None).await.map_err(|e| anyhow!("writing {path} upstream: {e}"))?;
        return Ok(None);
    }
    let c = o.endpoint.client()?;
    c.request("PUT", &o.path, Some(&json!({"value": "bench-value-not-secret"})))
        .await
        .map_err(|e| anyhow!("writing {}: {e}", o.path))?;
    match o.scenario {
        Scenario::Handshake | Scenario::CertLogin => return Ok(None),
        Scenario::GatewayVerify | Scenario::GatewayVerifyBatch => {
            use base64::Engine;
            let public = ed25519_dalek::SigningKey::from_bytes(&PRODUCER_SEED).verifying_key();
            let producer = json!({"cert_sha256": [producer_cert()],
                "keys": [{"key_id": "bench", "public_key": base64::engine::general_purpose::STANDARD.encode(public.as_bytes())}]});
            c.request("POST", &format!("gateway/producers/{PRODUCER}"), Some(&producer))
                .await
                .map_err(|e| anyhow!("registering the bench producer: {e}"))?;
            return Ok(None);
        }
        Scenario::TransitSign | Scenario::TransitEncrypt => {
            let (name, kind) = if o.scenario == Scenario::TransitSign {
                ("bench-sign", "ed25519")
            } else {
                ("bench-enc", "aes256-gcm96")
            };
            c.request("POST", &format!("transit/keys/{name}"), Some(&json!({"type": kind})))
                .await
                .map_err(|e| anyhow!("creating the transit key: {e}"))?;
            return Ok(None);
        }
        Scenario::Read | Scenario::Write | Scenario::ApproleLogin => {}
    }
    if o.scenario != Scenario::ApproleLogin {
        return Ok(None);
    }
    // OpenBao and Vault need the method mounted; KeyVault has it built in (an error here).
    let _ = c.request("POST", "sys/auth/approle", Some(&json!({"type": "approle"}))).await;
    c.request("POST", "auth/approle/role/bench", Some(&json!({"token_policies": ["default"], "token_ttl": "10m"})))
        .await
        .map_err(|e| anyhow!("creating the bench role: {e}"))?;
    let r: keyvault_api::auth::RoleId = c.request_data("GET", "auth/approle/role/bench/role-id", None::<&()>).await?;
    let sid: keyvault_api::auth::SecretId =
        c.request_data("POST", "auth/approle/role/bench/secret-id", Some(&json!({}))).await?;
    Ok(Some((r.role_id, sid.secret_id.expose().to_owned())))
}
