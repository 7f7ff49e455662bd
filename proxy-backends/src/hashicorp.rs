//! HashiCorp Vault and OpenBao KV mounts (version 1 or 2) as a [`SecretBackend`].
//!
//! Built on `reqwest` (already KeyVault's HTTP client elsewhere: one HTTP and TLS stack in
//! the binary) rather than a Vault client crate: this adapter needs five KV calls, two
//! auth calls and full control of timeouts, retries and what is kept of a response body;
//! `vaultrs` would bring its own HTTP stack and hide those. See docs/architecture.md.
//!
//! Upstream authentication: a token (read from a file; renewed before expiry when it is
//! renewable; the file is read again when the upstream refuses it) or AppRole (the
//! secret id read from a file at each login; the token renewed before expiry, and a new
//! login when a renewal or a request is refused). The upstream token is held in memory
//! only (`secrecy`), sent only to the upstream, never logged.
//!
//! What is not zeroized: the buffers inside the HTTP client that carried a response body
//! (the value is copied into zeroizing memory at once, and the client's buffer freed).

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::http::transport_error;
use crate::{BackendError, Capabilities, SecretBackend, SecretData, SecretValue, Version};
// Each segment percent-encoded (every byte but letters, digits and `-._~`).
use keyvault_api::secret::encode_segments as encode_path;

/// `[[mounts]] type = "hashicorp"`, `[mounts.options]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashicorpConfig {
    /// `https://vault.example:8200` (`http://` only for a local development server).
    pub address: String,
    /// The upstream KV mount, e.g. `secret`.
    pub mount: String,
    /// 1 or 2 (default 2).
    #[serde(default = "default_kv_version")]
    pub kv_version: u8,
    /// An upstream namespace (Vault Enterprise, OpenBao), sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// CA certificates (PEM) to verify the upstream's TLS certificate with, instead of
    /// the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub auth: AuthConfig,
}

fn default_kv_version() -> u8 {
    2
}

/// How KeyVault authenticates to the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// `auth = { token = { token_file = "/etc/keyvault/upstream-token" } }`
    Token { token_file: PathBuf },
    /// `auth = { approle = { role_id = "...", secret_id_file = "...", mount = "approle" } }`
    Approle {
        role_id: String,
        secret_id_file: PathBuf,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}

/// The upstream token and when to renew it.
struct TokenState {
    token: SecretString,
    /// Renew from this moment on (two thirds of the lease), when renewable.
    renew_at: Option<Instant>,
    /// The lease asked for again at each renewal.
    lease: Duration,
}

struct Auth {
    config: AuthConfig,
    state: tokio::sync::Mutex<Option<TokenState>>,
    renewer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("method", &self.method()).finish_non_exhaustive()
    }
}

impl Auth {
    fn method(&self) -> &'static str {
        match self.config {
            AuthConfig::Token { .. } => "token",
            AuthConfig::Approle { .. } => "approle",
        }
    }
}

impl Drop for Auth {
    fn drop(&mut self) {
        if let Some(h) = self.renewer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}

/// A KV mount of a HashiCorp Vault or OpenBao server.
#[derive(Debug)]
pub struct Hashicorp {
    http: reqwest::Client,
    base: String,
    mount: String,
    v2: bool,
    namespace: Option<String>,
    auth: Arc<Auth>,
}

/// A credential file that cannot be read at run time (a login again) is KeyVault's own
/// failure, not the caller's: the detail (the file's path) goes to the server log, the
/// caller gets a summary (503).
fn at_run_time(e: BackendError) -> BackendError {
    tracing::error!(error = %e, "upstream credential file");
    BackendError::Unavailable("KeyVault's upstream credential file cannot be read (see the server log)".into())
}

fn read_secret_file(path: &std::path::Path, what: &str) -> Result<SecretString, BackendError> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            BackendError::Invalid(format!("cannot read the upstream {what} file {}: {e}", path.display()))
        })?);
    let value = text.trim();
    if value.is_empty() {
        return Err(BackendError::Invalid(format!("the upstream {what} file {} is empty", path.display())));
    }
    Ok(SecretString::from(value.to_owned()))
}

/// The upstream's `{"errors": [...]}`, joined (its own words, never our request).
fn upstream_errors(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    let msg = serde_json::from_slice::<Errors>(body).map(|e| e.errors.join("; ")).unwrap_or_default();
    let mut msg: String = msg.chars().take(200).collect();
    if msg.is_empty() {
        msg = "no error message".into();
    }
    msg
}

/// An answer with a non-success status, as our error.
fn status_error(status: StatusCode, body: &[u8], what: &str) -> BackendError {
    let msg = upstream_errors(body);
    match status.as_u16() {
        404 => BackendError::NotFound,
        403 | 401 => BackendError::Denied(format!("{what}: {status}: {msg}")),
        409 => BackendError::Conflict(msg),
        400 if msg.contains("check-and-set") => BackendError::Conflict(msg),
        429 | 500..=599 => BackendError::Unavailable(format!("{what}: {status}: {msg}")),
        _ => BackendError::Invalid(format!("{what}: upstream answered {status}: {msg}")),
    }
}

#[derive(Deserialize)]
struct AuthReply {
    auth: AuthBlock,
}

#[derive(Deserialize)]
struct AuthBlock {
    client_token: String,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

#[derive(Deserialize)]
struct LookupReply {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

impl Hashicorp {
    /// Check the configuration and build the client (no network yet: the first call logs
    /// in).
    pub fn new(config: HashicorpConfig) -> Result<Self, BackendError> {
        let invalid = BackendError::Invalid;
        let base = config.address.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(invalid(format!("address {base:?}: give https://host:port")));
        }
        if !matches!(config.kv_version, 1 | 2) {
            return Err(invalid("kv_version is 1 or 2".into()));
        }
        let mount = config.mount.trim_matches('/').to_owned();
        if mount.is_empty() {
            return Err(invalid("mount: the upstream KV mount, e.g. \"secret\"".into()));
        }
        let http = crate::http::client(config.ca_file.as_deref())?;
        // The credential files must be readable now: a mistake shows at start.
        match &config.auth {
            AuthConfig::Token { token_file } => drop(read_secret_file(token_file, "token")?),
            AuthConfig::Approle { secret_id_file, role_id, .. } => {
                drop(read_secret_file(secret_id_file, "secret id")?);
                if role_id.is_empty() {
                    return Err(invalid("auth.approle.role_id is empty".into()));
                }
            }
        }
        Ok(Hashicorp {
            http,
            base,
            mount,
            v2: config.kv_version == 2,
            namespace: config.namespace.filter(|n| !n.is_empty()),
            auth: Arc::new(Auth {
                config: config.auth,
                state: tokio::sync::Mutex::new(None),
                renewer: std::sync::Mutex::new(None),
            }),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    fn request(&self, method: Method, path: &str, token: Option<&SecretString>) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.header("X-Vault-Token", t.expose_secret());
        }
        if let Some(ns) = &self.namespace {
            r = r.header("X-Vault-Namespace", ns);
        }
        r
    }

    /// Send and read the whole body into zeroizing memory.
    async fn send(
        &self,
        r: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), BackendError> {
        let resp = r.send().await.map_err(|e| transport_error(&e, what))?;
        let status = resp.status();
        let body = crate::http::read_limited(resp, what).await?;
        Ok((status, body))
    }

    /// Log in (AppRole) or take the token from its file, and learn its lease.
    async fn obtain(&self) -> Result<TokenState, BackendError> {
        match &self.auth.config {
            AuthConfig::Approle { role_id, secret_id_file, mount } => {
                let secret_id = read_secret_file(secret_id_file, "secret id").map_err(at_run_time)?;
                let mut body = Zeroizing::new(Vec::new());
                serde_json::to_writer(
                    &mut *body,
                    &serde_json::json!({"role_id": role_id, "secret_id": secret_id.expose_secret()}),
                )
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
                let what = "upstream AppRole login";
                let r = self
                    .request(Method::POST, &format!("auth/{}/login", mount.trim_matches('/')), None)
                    .header("Content-Type", "application/json")
                    .body(body.to_vec());
                let (status, reply) = self.send(r, what).await?;
                if !status.is_success() {
                    return Err(status_error(status, &reply, what));
                }
                let a: AuthReply = serde_json::from_slice(&reply)
                    .map_err(|_| BackendError::Unavailable(format!("{what}: bad reply")))?;
                let lease = crate::upstream_life(a.auth.lease_duration);
                tracing::info!(upstream = %self.base, lease_secs = lease.as_secs(), "logged in to the upstream (AppRole)");
                Ok(TokenState {
                    token: SecretString::from(a.auth.client_token),
                    renew_at: (a.auth.renewable && !lease.is_zero()).then(|| Instant::now() + lease * 2 / 3),
                    lease,
                })
            }
            AuthConfig::Token { token_file } => {
                let token = read_secret_file(token_file, "token").map_err(at_run_time)?;
                let what = "upstream token lookup";
                let (status, reply) =
                    self.send(self.request(Method::GET, "auth/token/lookup-self", Some(&token)), what).await?;
                if !status.is_success() {
                    return Err(status_error(status, &reply, what));
                }
                let l: LookupReply = serde_json::from_slice(&reply)
                    .map_err(|_| BackendError::Unavailable(format!("{what}: bad reply")))?;
                let lease = crate::upstream_life(l.data.ttl);
                Ok(TokenState {
                    token,
                    renew_at: (l.data.renewable && !lease.is_zero()).then(|| Instant::now() + lease * 2 / 3),
                    lease,
                })
            }
        }
    }

    /// The upstream token: the one held, or a new one.
    async fn token(self: &Arc<Self>) -> Result<SecretString, BackendError> {
        let mut st = self.auth.state.lock().await;
        if let Some(s) = st.as_ref() {
            return Ok(s.token.clone());
        }
        let fresh = self.obtain().await?;
        let token = fresh.token.clone();
        *st = Some(fresh);
        drop(st);
        self.ensure_renewer();
        Ok(token)
    }

    /// Whether the upstream says `token` is gone (expired, revoked): its own lookup is
    /// refused. Anything else (the lookup answers, or cannot be made) keeps the token.
    async fn token_gone(&self, token: &SecretString) -> bool {
        let lookup = self.request(Method::GET, "auth/token/lookup-self", Some(token));
        matches!(self.send(lookup, "upstream token lookup").await, Ok((StatusCode::FORBIDDEN, _)))
    }

    /// Forget a token the upstream refused (the next call obtains a new one), unless it
    /// was replaced already.
    async fn refused(&self, token: &SecretString) {
        let mut st = self.auth.state.lock().await;
        // Constant time, as every comparison of a secret (docs/threat-model.md).
        let same =
            |s: &TokenState| bool::from(s.token.expose_secret().as_bytes().ct_eq(token.expose_secret().as_bytes()));
        if st.as_ref().is_some_and(same) {
            tracing::warn!(upstream = %self.base, method = self.auth.method(), "the upstream refused its token; obtaining a new one");
            *st = None;
        }
    }

    /// One background task per backend renews the token before it expires, and obtains
    /// a new one when a renewal is refused.
    fn ensure_renewer(self: &Arc<Self>) {
        let mut slot = self.auth.renewer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        *slot = Some(tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                let next = me.auth.state.lock().await.as_ref().and_then(|s| s.renew_at);
                drop(me);
                let Some(at) = next else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                tokio::time::sleep_until(at.into()).await;
                let Some(me) = weak.upgrade() else { return };
                me.renew().await;
            }
        }));
    }

    async fn renew(&self) {
        let mut st = self.auth.state.lock().await;
        let Some(s) = st.as_mut() else { return };
        if s.renew_at.is_none_or(|at| Instant::now() < at) {
            return;
        }
        let what = "upstream token renewal";
        let body = serde_json::json!({"increment": format!("{}s", s.lease.as_secs())}).to_string();
        let r = self
            .request(Method::POST, "auth/token/renew-self", Some(&s.token))
            .header("Content-Type", "application/json")
            .body(body);
        match self.send(r, what).await {
            Ok((status, reply)) if status.is_success() => match serde_json::from_slice::<AuthReply>(&reply) {
                Ok(a) => {
                    let lease = crate::upstream_life(a.auth.lease_duration);
                    tracing::debug!(upstream = %self.base, lease_secs = lease.as_secs(), "upstream token renewed");
                    s.renew_at = (a.auth.renewable && !lease.is_zero()).then(|| Instant::now() + lease * 2 / 3);
                }
                Err(_) => s.renew_at = Some(Instant::now() + Duration::from_secs(1)),
            },
            Ok((status, reply)) => {
                tracing::warn!(upstream = %self.base, error = %status_error(status, &reply, what), "upstream token renewal refused; obtaining a new token");
                match self.obtain().await {
                    Ok(fresh) => *s = fresh,
                    Err(e) => {
                        tracing::warn!(upstream = %self.base, error = %e, "obtaining a new upstream token failed");
                        *st = None;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(upstream = %self.base, error = %e, "upstream token renewal failed; retrying");
                s.renew_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    /// A call with the token; when the upstream refuses it (403) and the token is gone
    /// there, once more with a new token (a 403 then is the upstream's policy).
    async fn call(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<&Zeroizing<Vec<u8>>>,
        what: &str,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), BackendError> {
        let mut retried = false;
        loop {
            let token = self.token().await?;
            let mut r = self.request(method.clone(), path, Some(&token));
            if let Some(b) = body {
                r = r.header("Content-Type", "application/json").body(b.to_vec());
            }
            let (status, reply) = self.send(r, what).await?;
            if status == StatusCode::FORBIDDEN && !retried {
                retried = true;
                // Vault answers 403 both for a token it no longer knows and for a path its
                // policy denies. A new login for the second would change nothing, use up
                // a secret id use each time and leave a token behind: ask which first.
                if !self.token_gone(&token).await {
                    return Ok((status, reply));
                }
                self.refused(&token).await;
                continue;
            }
            return Ok((status, reply));
        }
    }

    fn data_path(&self, path: &str) -> String {
        if self.v2 {
            format!("{}/data/{}", self.mount, encode_path(path))
        } else {
            format!("{}/{}", self.mount, encode_path(path))
        }
    }
}

#[derive(Deserialize)]
struct V1Read<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct V2Read<'a> {
    #[serde(borrow)]
    data: V2Data<'a>,
}

#[derive(Deserialize)]
struct V2Data<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    metadata: V2Meta,
}

#[derive(Deserialize)]
struct V2Meta {
    version: u64,
    #[serde(default)]
    created_time: Option<String>,
}

#[derive(Deserialize)]
struct V2Written {
    data: V2Meta,
}

#[derive(Deserialize)]
struct Keys {
    data: KeysData,
}

#[derive(Deserialize)]
struct KeysData {
    #[serde(default)]
    keys: Vec<String>,
}

/// The shared half of [`Hashicorp`] (its token renewer holds a weak reference to it).
#[derive(Debug, Clone)]
pub struct HashicorpBackend(Arc<Hashicorp>);

impl HashicorpBackend {
    pub fn new(config: HashicorpConfig) -> Result<Self, BackendError> {
        Ok(HashicorpBackend(Arc::new(Hashicorp::new(config)?)))
    }
}

#[async_trait]
impl SecretBackend for HashicorpBackend {
    fn kind(&self) -> &'static str {
        "hashicorp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            versions: self.0.v2,
            version_ids: false,
            version_stages: false,
            writes: true,
            deletes: true,
            list: true,
        }
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        let h = &self.0;
        let what = "upstream read";
        let mut p = h.data_path(path);
        match version {
            Version::Number(v) if h.v2 => p = format!("{p}?version={v}"),
            Version::Number(_) => {
                return Err(BackendError::Unsupported("versions (the upstream mount is KV version 1)"));
            }
            Version::Id(_) | Version::Stage(_) => return Err(BackendError::Unsupported("version ids and stages")),
            Version::Latest => {}
        }
        let (status, body) = h.call(Method::GET, &p, None, what).await?;
        if !status.is_success() {
            return Err(status_error(status, &body, what));
        }
        let bad = || BackendError::Unavailable(format!("{what}: a reply not in KV's shape"));
        if h.v2 {
            let r: V2Read = serde_json::from_slice(&body).map_err(|_| bad())?;
            // A deleted or destroyed version: no data.
            let data = r.data.data.filter(|d| d.get() != "null").ok_or(BackendError::NotFound)?;
            Ok(SecretValue {
                data: SecretData::from_json(Zeroizing::new(data.get().as_bytes().to_vec()))?,
                version: Some(r.data.metadata.version),
                version_id: None,
                created_time: r.data.metadata.created_time,
            })
        } else {
            let r: V1Read = serde_json::from_slice(&body).map_err(|_| bad())?;
            Ok(SecretValue {
                data: SecretData::from_json(Zeroizing::new(r.data.get().as_bytes().to_vec()))?,
                version: None,
                version_id: None,
                created_time: None,
            })
        }
    }

    /// KV version 2 answers a read of a soft-deleted or destroyed latest version 404,
    /// with its metadata: the secret still has that version, and a write of it is an
    /// update (a check-and-set against it), as Vault's own existence check says.
    async fn current_version(&self, path: &str) -> Result<Option<u64>, BackendError> {
        let h = &self.0;
        if !h.v2 {
            return crate::current_version_by_read(self, path).await;
        }
        let what = "upstream read";
        let (status, body) = h.call(Method::GET, &h.data_path(path), None, what).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            if let Ok(r) = serde_json::from_slice::<V2Read>(&body) {
                return Ok(Some(r.data.metadata.version));
            }
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            return Err(BackendError::Unavailable(format!("{what}: a reply not in KV's shape")));
        }
        Err(status_error(status, &body, what))
    }

    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        let h = &self.0;
        let what = "upstream write";
        let body = if h.v2 {
            let mut b = Zeroizing::new(Vec::with_capacity(data.len() + 48));
            b.extend_from_slice(b"{\"data\":");
            b.extend_from_slice(data.as_bytes());
            if let Some(cas) = expected {
                b.extend_from_slice(format!(",\"options\":{{\"cas\":{cas}}}").as_bytes());
            }
            b.push(b'}');
            b
        } else {
            Zeroizing::new(data.as_bytes().to_vec())
        };
        let (status, reply) = h.call(Method::POST, &h.data_path(path), Some(&body), what).await?;
        if !status.is_success() {
            return Err(status_error(status, &reply, what));
        }
        if h.v2 {
            let w: V2Written = serde_json::from_slice(&reply)
                .map_err(|_| BackendError::Unavailable(format!("{what}: a reply not in KV's shape")))?;
            Ok(Some(w.data.version))
        } else {
            Ok(None)
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let h = &self.0;
        let what = "upstream list";
        let prefix = prefix.trim_matches('/');
        let encoded = if prefix.is_empty() { String::new() } else { format!("{}/", encode_path(prefix)) };
        let p = if h.v2 { format!("{}/metadata/{encoded}", h.mount) } else { format!("{}/{encoded}", h.mount) };
        // Invariant: "LIST" is a valid method token.
        let list = Method::from_bytes(b"LIST").expect("LIST is a method token");
        let (status, body) = h.call(list, &p, None, what).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(Vec::new()),
            s if s.is_success() => {
                let k: Keys = serde_json::from_slice(&body)
                    .map_err(|_| BackendError::Unavailable(format!("{what}: a reply not in KV's shape")))?;
                Ok(k.data.keys)
            }
            s => Err(status_error(s, &body, what)),
        }
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let h = &self.0;
        let what = "upstream delete";
        let (status, body) = h.call(Method::DELETE, &h.data_path(path), None, what).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(status_error(status, &body, what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_and_errors_summarized() {
        assert_eq!(encode_path("a b/c?d/%"), "a%20b/c%3Fd/%25");
        let e = status_error(StatusCode::BAD_REQUEST, br#"{"errors":["check-and-set parameter did not match"]}"#, "w");
        assert!(matches!(e, BackendError::Conflict(_)));
        assert_eq!(status_error(StatusCode::NOT_FOUND, b"", "r"), BackendError::NotFound);
        assert!(status_error(StatusCode::SERVICE_UNAVAILABLE, b"", "r").is_transient());
        assert!(matches!(status_error(StatusCode::FORBIDDEN, b"{}", "r"), BackendError::Denied(_)));
    }

    #[test]
    fn configuration_mistakes_show_at_once() {
        let dir = std::env::temp_dir();
        let cfg = |address: &str, kv: u8, file: PathBuf| HashicorpConfig {
            address: address.into(),
            mount: "secret".into(),
            kv_version: kv,
            namespace: None,
            ca_file: None,
            auth: AuthConfig::Token { token_file: file },
        };
        let missing = dir.join("no-such-upstream-token");
        let e = Hashicorp::new(cfg("https://v:8200", 2, missing)).unwrap_err().to_string();
        assert!(e.contains("cannot read the upstream token file"), "{e}");
        assert!(Hashicorp::new(cfg("v:8200", 2, dir.clone())).unwrap_err().to_string().contains("https://"));
        assert!(Hashicorp::new(cfg("https://v", 3, dir)).unwrap_err().to_string().contains("kv_version"));
    }
}
