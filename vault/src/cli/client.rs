//! A small HTTP/1.1 client over rustls (or plain TCP) for the CLI: the load generator
//! and the operator commands that talk to a running server.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use keyvault::error::{Error, Result};

/// A server to talk to.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://host:port` or `http://host:port`.
    pub address: String,
    /// CA certificate for https.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub token: Option<String>,
    pub token_header: String,
}

/// A resolved endpoint: where to connect and how.
pub struct Target {
    pub host: String,
    pub port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Endpoint {
    pub fn target(&self) -> Result<Target> {
        parse_target(self)
    }
}

fn parse_target(o: &Endpoint) -> Result<Target> {
    let (scheme, rest) =
        o.address.split_once("://").ok_or_else(|| Error::invalid("address must start with https:// or http://"))?;
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| Error::invalid("address needs a port"))?;
    let port: u16 = port.parse().map_err(|_| Error::invalid("bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let tls = match scheme {
        "http" => None,
        "https" => {
            let mut roots = rustls::RootCertStore::empty();
            let ca = o.ca_file.as_ref().ok_or_else(|| Error::invalid("https needs --ca-file"))?;
            for c in keyvault::tls::load_certs(ca)? {
                roots.add(c).map_err(|e| Error::Config(format!("CA file: {e}")))?;
            }
            let builder = rustls::ClientConfig::builder_with_provider(keyvault::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Config(e.to_string()))?
                .with_root_certificates(roots);
            let mut config = match (&o.client_cert, &o.client_key) {
                (Some(c), Some(k)) => builder
                    .with_client_auth_cert(keyvault::tls::load_certs(c)?, keyvault::tls::load_key(k)?)
                    .map_err(|e| Error::Config(format!("client certificate: {e}")))?,
                (None, None) => builder.with_no_client_auth(),
                _ => return Err(Error::invalid("give both --client-cert and --client-key")),
            };
            // Every connection is a full handshake (the handshake benchmark counts them).
            config.resumption = rustls::client::Resumption::disabled();
            let name = ServerName::try_from(host.clone()).map_err(|_| Error::invalid("bad host name"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        }
        _ => {
            return Err(Error::invalid("address must start with https:// or http://"));
        }
    };
    Ok(Target { host, port, tls })
}

pub type Sender = http1::SendRequest<Full<Bytes>>;

pub async fn connect(t: &Target) -> Result<Sender> {
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
            let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(io_err)?;
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

/// Send one request on a one-off connection. Returns status and JSON body (Null if none).
pub async fn request(
    e: &Endpoint,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    let target = parse_target(e)?;
    let mut sender = connect(&target).await?;
    let mut b =
        Request::builder().method(method).uri(format!("/v1/{path}")).header(hyper::header::HOST, target.host.as_str());
    if let Some(t) = &e.token {
        b = b.header(e.token_header.as_str(), t.as_str());
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let req = b.body(Full::new(body)).map_err(|e| Error::Internal(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| Error::Internal(format!("request: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(|e| Error::Internal(e.to_string()))?.to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, json))
}

/// Send one request and read the `data` of its reply as `T` (a 2xx reply with data), or
/// fail with the status and the server's error messages.
pub async fn call<T: serde::de::DeserializeOwned>(
    e: &Endpoint,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<T> {
    let (status, reply) = request(e, method, path, body).await?;
    if !(200..300).contains(&status) {
        let errors = serde_json::from_value::<keyvault_api::ErrorBody>(reply)
            .map(|b| b.errors.join("; "))
            .unwrap_or_else(|_| "no error message".into());
        return Err(Error::Internal(format!("{method} /v1/{path} answered {status}: {errors}")));
    }
    let envelope: keyvault_api::Envelope<T> = serde_json::from_value(reply)
        .map_err(|err| Error::Internal(format!("{method} /v1/{path}: unexpected reply: {err}")))?;
    envelope.data.ok_or_else(|| Error::Internal(format!("{method} /v1/{path}: the reply has no data")))
}
