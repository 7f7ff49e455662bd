//! `keyvault bench`: a load generator for any Vault-API server (KeyVault, OpenBao,
//! HashiCorp Vault), so that one run measures them side by side on one machine.
//!
//! Each connection is a task with its own keep-alive HTTP/1.1 connection (TLS or plain)
//! sending requests back to back; latencies are recorded per request and merged at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `GET /v1/<path>` with a token.
    Read,
    /// `POST /v1/auth/approle/login` with a role id and secret id.
    ApproleLogin,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `https://host:port` or `http://host:port`.
    pub address: String,
    pub ca_file: Option<std::path::PathBuf>,
    pub token: Option<String>,
    pub token_header: String,
    pub scenario: Scenario,
    /// Secret path for `read`, under `/v1/` (e.g. `secret/bench`).
    pub path: String,
    pub role_id: Option<String>,
    pub secret_id: Option<String>,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
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

struct Target {
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

fn parse_target(o: &BenchOptions) -> Result<Target> {
    let (scheme, rest) = o
        .address
        .split_once("://")
        .ok_or_else(|| Error::invalid("address must start with https:// or http://"))?;
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| Error::invalid("address needs a port"))?;
    let port: u16 = port.parse().map_err(|_| Error::invalid("bad port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = match scheme {
        "http" => None,
        "https" => {
            let mut roots = rustls::RootCertStore::empty();
            let ca = o
                .ca_file
                .as_ref()
                .ok_or_else(|| Error::invalid("https needs --ca-file"))?;
            for c in crate::tls::load_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| Error::Config(format!("CA file: {e}")))?;
            }
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name =
                ServerName::try_from(host.clone()).map_err(|_| Error::invalid("bad host name"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        }
        _ => {
            return Err(Error::invalid(
                "address must start with https:// or http://",
            ));
        }
    };
    Ok(Target { host, port, tls })
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> Result<Sender> {
    let tcp = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| Error::Internal(format!("connect {}:{}: {e}", t.host, t.port)))?;
    let _ = tcp.set_nodelay(true);
    let io_err = |e: hyper::Error| Error::Internal(format!("HTTP handshake: {e}"));
    match &t.tls {
        Some((connector, name)) => {
            let stream = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| Error::Internal(format!("TLS handshake: {e}")))?;
            let (sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(io_err)?;
            tokio::spawn(conn);
            Ok(sender)
        }
        None => {
            let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(io_err)?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }
}

fn build_request(o: &BenchOptions, host: &str) -> Result<Request<Full<Bytes>>> {
    let mut b = Request::builder().header(hyper::header::HOST, host);
    if let Some(t) = &o.token {
        b = b.header(o.token_header.as_str(), t.as_str());
    }
    let req = match o.scenario {
        Scenario::Read => b
            .method("GET")
            .uri(format!("/v1/{}", o.path))
            .body(Full::new(Bytes::new())),
        Scenario::ApproleLogin => {
            let body = serde_json::json!({
                "role_id": o.role_id.as_deref().unwrap_or_default(),
                "secret_id": o.secret_id.as_deref().unwrap_or_default(),
            });
            b.method("POST")
                .uri("/v1/auth/approle/login")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
        }
    };
    req.map_err(|e| Error::Internal(format!("building request: {e}")))
}

/// Send one request on a one-off connection (set-up calls). Returns status and body.
pub async fn one_shot(
    o: &BenchOptions,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let target = parse_target(o)?;
    let mut sender = connect(&target).await?;
    let mut b = Request::builder()
        .method(method)
        .uri(format!("/v1/{path}"))
        .header(hyper::header::HOST, target.host.as_str());
    if let Some(t) = &o.token {
        b = b.header(o.token_header.as_str(), t.as_str());
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let req = b
        .body(Full::new(body))
        .map_err(|e| Error::Internal(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::Internal(format!("request: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// Run the load and report.
pub async fn run(o: BenchOptions) -> Result<BenchReport> {
    let target = Arc::new(parse_target(&o)?);
    let template = Arc::new(o.clone());
    let start = Instant::now() + o.warmup;
    let end = start + o.duration;
    let mut tasks = Vec::with_capacity(o.connections);
    for _ in 0..o.connections.max(1) {
        let target = target.clone();
        let o = template.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut sender = connect(&target).await?;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let req = build_request(&o, &target.host)?;
                let t0 = Instant::now();
                let ok = match sender.send_request(req).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        let drained = resp.into_body().collect().await.is_ok();
                        good && drained
                    }
                    Err(_) => false,
                };
                let micros = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                if t0 >= start {
                    if ok {
                        lat.push(micros);
                    } else {
                        errors += 1;
                    }
                }
                if !ok && (sender.ready().await.is_err()) {
                    sender = connect(&target).await?;
                }
            }
            Ok::<_, Error>((lat, errors))
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t
            .await
            .map_err(|e| Error::Internal(format!("load task: {e}")))??;
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
    let seconds = o.duration.as_secs_f64();
    Ok(BenchReport {
        scenario: o.scenario,
        address: o.address.clone(),
        connections: o.connections,
        seconds,
        requests: all.len() as u64,
        errors,
        requests_per_second: all.len() as f64 / seconds,
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
    let (s, _) = one_shot(
        o,
        "PUT",
        &o.path,
        Some(serde_json::json!({"value": "bench-value-not-secret"})),
    )
    .await?;
    if !(200..300).contains(&s) {
        return Err(Error::Internal(format!("writing {} answered {s}", o.path)));
    }
    if o.scenario != Scenario::ApproleLogin {
        return Ok(None);
    }
    // OpenBao and Vault need the method mounted; KeyVault has it built in (404 here).
    let _ = one_shot(
        o,
        "POST",
        "sys/auth/approle",
        Some(serde_json::json!({"type": "approle"})),
    )
    .await?;
    let (s, _) = one_shot(
        o,
        "POST",
        "auth/approle/role/bench",
        Some(serde_json::json!({"token_policies": ["default"], "token_ttl": "10m"})),
    )
    .await?;
    if !(200..300).contains(&s) {
        return Err(Error::Internal(format!(
            "creating the bench role answered {s}"
        )));
    }
    let (_, r) = one_shot(o, "GET", "auth/approle/role/bench/role-id", None).await?;
    let (_, sid) = one_shot(
        o,
        "POST",
        "auth/approle/role/bench/secret-id",
        Some(serde_json::json!({})),
    )
    .await?;
    let role_id = r["data"]["role_id"]
        .as_str()
        .ok_or_else(|| Error::Internal("no role_id".into()))?
        .to_owned();
    let secret_id = sid["data"]["secret_id"]
        .as_str()
        .ok_or_else(|| Error::Internal("no secret_id".into()))?
        .to_owned();
    Ok(Some((role_id, secret_id)))
}
