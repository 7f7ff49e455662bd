//! The client: its builder, the token it keeps, and the one way every call is sent
//! (retries with backoff and jitter on 429, 503 and connection errors only).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::auth::{Auth, SecretIdSource};
use crate::error::{Error, Result};
use crate::kv::Scrubbed;

/// When to try a call again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// The first backoff; it doubles per attempt (with full jitter) up to `max_delay`.
    pub base_delay: Duration,
    /// The longest wait between two attempts (a `Retry-After` is capped by it too).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 4, base_delay: Duration::from_millis(50), max_delay: Duration::from_secs(2) }
    }
}

/// Builds a [`Client`]. Nothing is sent until the first call.
pub struct ClientBuilder {
    address: Option<String>,
    ca_pem: Option<Vec<u8>>,
    ca_file: Option<PathBuf>,
    identity: Option<Zeroizing<Vec<u8>>>,
    identity_files: Option<(PathBuf, PathBuf)>,
    connect_timeout: Duration,
    timeout: Duration,
    auth: Option<Auth>,
    retry: RetryPolicy,
    allow_plain_http: bool,
    renew_by_login: bool,
    headers: reqwest::header::HeaderMap,
    max_idle: Option<usize>,
    max_reply_bytes: usize,
}

/// The largest reply read by default (a listing of a few hundred thousand names fits).
pub const DEFAULT_MAX_REPLY_BYTES: usize = 64 << 20;

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("address", &self.address)
            .field("ca_file", &self.ca_file)
            .field("identity_files", &self.identity_files)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            address: None,
            ca_pem: None,
            ca_file: None,
            identity: None,
            identity_files: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            auth: None,
            retry: RetryPolicy::default(),
            allow_plain_http: false,
            renew_by_login: false,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            headers: reqwest::header::HeaderMap::new(),
            max_idle: None,
        }
    }
}

/// The first of the variables set (`KEYVAULT_*` before Vault's own).
fn env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// The prefix of the one family of environment variables a client reads: `VAULT_` when
/// no address is given otherwise (`address_given`), `KEYVAULT_ADDR` is unset and
/// `VAULT_ADDR` is set; else `KEYVAULT_`. Never a mix: a Vault token must not go to the
/// KeyVault `KEYVAULT_ADDR` names, nor the other way.
pub fn env_prefix(address_given: bool) -> &'static str {
    env_family(&|name: &str| env(&[name]), address_given)
}

fn env_family(lookup: &impl Fn(&str) -> Option<String>, address_given: bool) -> &'static str {
    if !address_given && lookup("KEYVAULT_ADDR").is_none() && lookup("VAULT_ADDR").is_some() {
        "VAULT_"
    } else {
        "KEYVAULT_"
    }
}

impl ClientBuilder {
    /// A builder with nothing set (see [`ClientBuilder::from_env`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Settings from the environment, as Vault's tools read them: `KEYVAULT_ADDR`,
    /// `KEYVAULT_CACERT`, `KEYVAULT_CLIENT_CERT` with `KEYVAULT_CLIENT_KEY`, and
    /// `KEYVAULT_TOKEN` as [`Auth::Token`]; or, when `KEYVAULT_ADDR` is unset and
    /// `VAULT_ADDR` is set, Vault's `VAULT_*` names, all of them. Never a mix: a Vault
    /// token must not go to the KeyVault `KEYVAULT_ADDR` names, nor the other way. Later
    /// calls override them.
    pub fn from_env() -> Self {
        Self::from_vars(|name| env(&[name]))
    }

    /// [`ClientBuilder::from_env`] with the variables read by `lookup`.
    fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let prefix = env_family(&lookup, false);
        let var = |name: &str| lookup(&format!("{prefix}{name}"));
        let mut b =
            ClientBuilder { address: var("ADDR"), ca_file: var("CACERT").map(PathBuf::from), ..Self::default() };
        if let (Some(c), Some(k)) = (var("CLIENT_CERT"), var("CLIENT_KEY")) {
            b.identity_files = Some((c.into(), k.into()));
        }
        if let Some(t) = var("TOKEN") {
            b.auth = Some(Auth::token(t));
        }
        b
    }

    /// `https://host:port`.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Trust only the CA certificates of this PEM file.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Trust only these CA certificates (PEM).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// The client certificate and key (PEM files) for mutual TLS.
    pub fn client_identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity_files = Some((cert.into(), key.into()));
        self
    }

    /// The client certificate chain and key as one PEM text.
    pub fn client_identity_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some(Zeroizing::new(pem.into()));
        self
    }

    /// The most a connection (TCP and TLS) may take (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// The most one attempt of a call may take.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// The largest reply body read (default [`DEFAULT_MAX_REPLY_BYTES`]); a larger one
    /// fails the call with [`Error::Transport`] before it is held in memory whole.
    pub fn max_reply_bytes(mut self, n: usize) -> Self {
        self.max_reply_bytes = n;
        self
    }

    /// How the client logs in.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// When calls are tried again (default [`RetryPolicy::default`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Allow `http://` to a host other than the loopback (tokens would cross the network in
    /// clear: for tests behind a TLS-terminating proxy only).
    pub fn allow_plain_http(mut self, allow: bool) -> Self {
        self.allow_plain_http = allow;
        self
    }

    /// At two thirds of the token's lifetime, log in again instead of renewing: every
    /// token then carries its real expiry, which gateways that verify tokens offline need
    /// (a renewal extends a token on the server only). For methods that can log in again.
    pub fn renew_by_login(mut self, yes: bool) -> Self {
        self.renew_by_login = yes;
        self
    }

    /// A header sent with every request (e.g. `Cache-Control: no-cache` to read a proxied
    /// mount's upstream).
    pub fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.insert(name, reqwest::header::HeaderValue::from_static(value));
        self
    }

    /// Keep at most this many idle connections (0: a new connection for every request).
    pub fn max_idle_connections(mut self, n: usize) -> Self {
        self.max_idle = Some(n);
        self
    }

    /// The client; reads the CA and client certificate files now. Nothing is sent yet.
    pub fn build(self) -> Result<Client> {
        let address = self.address.ok_or_else(|| Error::Config("no address (KEYVAULT_ADDR or VAULT_ADDR)".into()))?;
        let url = reqwest::Url::parse(&address).map_err(|e| Error::Config(format!("address {address:?}: {e}")))?;
        let loopback = url.host_str().is_some_and(|h| {
            h == "localhost" || h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        });
        match url.scheme() {
            "https" => {}
            "http" if loopback || self.allow_plain_http => {}
            "http" => {
                return Err(Error::Config(format!("{address}: plain HTTP to another host sends tokens in clear")));
            }
            s => return Err(Error::Config(format!("address {address:?}: scheme {s} (https expected)"))),
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(self.headers);
        if let Some(n) = self.max_idle {
            http = http.pool_max_idle_per_host(n);
        }
        let ca = match (&self.ca_pem, &self.ca_file) {
            (Some(pem), _) => Some(pem.clone()),
            (None, Some(f)) => Some(read(f, "CA file")?.to_vec()),
            (None, None) => None,
        };
        if let Some(pem) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Config(format!("CA: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("CA: no certificate in the PEM".into()));
            }
            http = http.tls_certs_only(certs);
        }
        let identity = match (self.identity, &self.identity_files) {
            (Some(pem), _) => Some(pem),
            (None, Some((cert, key))) => {
                let mut pem = read(cert, "client certificate")?;
                pem.push(b'\n');
                pem.extend_from_slice(&read(key, "client key")?);
                Some(pem)
            }
            (None, None) => None,
        };
        if let Some(pem) = identity {
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|_| Error::Config("the client certificate or key is not valid PEM".into()))?;
            http = http.identity(id);
        }
        let http = http.build().map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let base = format!("{}/v1/", address.trim_end_matches('/'));
        Ok(Client(Arc::new(Inner {
            http,
            base,
            auth: self.auth,
            retry: self.retry,
            renew_by_login: self.renew_by_login,
            max_reply_bytes: self.max_reply_bytes,
            token: tokio::sync::Mutex::new(None),
            unwrapped_secret_id: Mutex::new(None),
            renewer: Mutex::new(None),
            mounts: Mutex::new(HashMap::new()),
        })))
    }
}

fn read(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path).map(Zeroizing::new).map_err(|e| Error::Config(format!("{what} {}: {e}", path.display())))
}

/// The token held, and when to renew it.
struct TokenState {
    token: SecretString,
    obtained: Instant,
    /// Its lifetime when obtained or last renewed (`None`: does not expire).
    ttl: Option<Duration>,
    renewable: bool,
}

/// A token within this of its expiry is not sent: the request might arrive after it.
const SEND_MARGIN: Duration = Duration::from_secs(2);

impl TokenState {
    fn usable(&self) -> bool {
        self.ttl.is_none_or(|ttl| self.obtained.elapsed() + SEND_MARGIN < ttl)
    }
}

/// When to renew a token of lifetime `ttl`, after it was obtained or last renewed: at two
/// thirds of it, and in any case before it comes within [`SEND_MARGIN`] of its expiry
/// (with up to a second, or half the time left, for the renewal's round trip), or a short
/// token would be replaced by a new login at every call made between the two.
fn renew_after(ttl: Duration) -> Duration {
    let two_thirds = ttl / 3 * 2;
    match ttl.checked_sub(SEND_MARGIN).filter(|room| !room.is_zero()) {
        Some(room) => two_thirds.min(room.saturating_sub(Duration::from_secs(1)).max(room / 2)),
        // Never sent anyway: each call logs in.
        None => two_thirds,
    }
}

pub(crate) struct Inner {
    http: reqwest::Client,
    base: String,
    auth: Option<Auth>,
    retry: RetryPolicy,
    renew_by_login: bool,
    max_reply_bytes: usize,
    token: tokio::sync::Mutex<Option<TokenState>>,
    unwrapped_secret_id: Mutex<Option<SecretString>>,
    renewer: Mutex<Option<tokio::task::AbortHandle>>,
    /// Mount path (`kv/`) -> KV version 2. As many entries as the server has mounts.
    pub(crate) mounts: Mutex<HashMap<String, bool>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.renewer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}

/// A KeyVault client. Cheap to clone (one connection pool, one token, shared).
///
/// It logs in at the first call that needs a token, keeps the token in memory only,
/// renews it in the background at two thirds of its lifetime, and logs in again when a
/// renewal or a request is refused with 401 (for methods that can).
#[derive(Clone)]
pub struct Client(pub(crate) Arc<Inner>);

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("address", &self.0.base).field("auth", &self.0.auth).finish_non_exhaustive()
    }
}

/// How a call authenticates.
#[derive(Clone, Copy)]
pub(crate) enum Credential<'a> {
    /// No token (logins, `sys/health`, the JWKS).
    None,
    /// The client's token (logged in on demand).
    Token,
    /// This token (a wrapping token).
    Given(&'a SecretString),
}

/// A body read from the server; zeroized on drop (it may hold secrets).
pub(crate) type Body = Zeroizing<Vec<u8>>;

/// `data` of an envelope, decoded.
pub(crate) fn data<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    let env: keyvault_api::Envelope<T> =
        serde_json::from_slice(body).map_err(|e| Error::Decode(format!("reply: {}", e.classify_name())))?;
    env.data.ok_or_else(|| Error::Decode("a reply without data".into()))
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The kind of a JSON error, never its text (which can quote the input).
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "cannot be read",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "not the expected shape",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

/// Uniform in `0..=max`, from the OS's generator (full jitter).
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return max / 2;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { u64::from_le_bytes(b) % (nanos + 1) })
}

/// `Retry-After` in seconds (an HTTP date is not honoured: KeyVault sends seconds).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Client {
    /// [`ClientBuilder::new`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    /// The server's error messages of a reply body.
    fn errors(body: &[u8]) -> Vec<String> {
        serde_json::from_slice::<keyvault_api::ErrorBody>(body).map(|b| b.errors).unwrap_or_default()
    }

    /// Send one call: `path` under `/v1/`, a JSON body. Retries on 429 and on a 503 with
    /// `Retry-After` (refused before anything was done: sealed, no room for the body),
    /// and on connection errors that sent nothing; a read also on any 503 and on a
    /// timeout. A write (and a gateway check) is not sent again after a 503 or a
    /// timeout: it may have been applied (a proxied write whose upstream answered too
    /// late, storage that failed after its commit, a gateway check whose nonces were taken
    /// before its audit entry failed), and sent again it would be applied twice or be a
    /// replay. Logs in again once on a 401 when the method can.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Body>,
        credential: Credential<'_>,
    ) -> Result<Body> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| Error::Invalid(format!("method {method}")))?;
        let idempotent = matches!(method.as_str(), "GET" | "LIST" | "HEAD");
        let inner = &self.0;
        let url = format!("{}{}", inner.base, path.trim_start_matches('/'));
        let mut relogged = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let token = match credential {
                Credential::None => None,
                Credential::Given(t) => Some(t.clone()),
                Credential::Token => Some(self.token().await?),
            };
            let mut req = inner.http.request(method.clone(), &url);
            if let Some(t) = &token {
                let mut v = reqwest::header::HeaderValue::from_str(t.expose_secret())
                    .map_err(|_| Error::Invalid("a token that is not a header value".into()))?;
                v.set_sensitive(true);
                req = req.header("X-Vault-Token", v);
            }
            if let Some(b) = body {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.to_vec());
            }
            let delay = match req.send().await {
                Err(e) => {
                    let kind = if e.is_timeout() {
                        "timed out"
                    } else if e.is_connect() {
                        "cannot connect"
                    } else {
                        "connection failed"
                    };
                    let retriable = e.is_connect() || idempotent;
                    if !retriable || attempt >= inner.retry.attempts {
                        return Err(Error::Transport(format!("{} /v1/{path}: {kind}", method.as_str())));
                    }
                    tracing::debug!(path, attempt, kind, "retrying");
                    None
                }
                Ok(resp) => {
                    let status = resp.status();
                    let after = retry_after(resp.headers());
                    let body = read_reply(resp, inner.max_reply_bytes)
                        .await
                        .map_err(|why| Error::Transport(format!("{} /v1/{path}: {why}", method.as_str())))?;
                    if status.is_success() {
                        return Ok(body);
                    }
                    // A 503 with `Retry-After` was refused before anything ran (sealed,
                    // no room for the body): safe to send again, writes included.
                    let transient = status == StatusCode::TOO_MANY_REQUESTS
                        || (status == StatusCode::SERVICE_UNAVAILABLE && (idempotent || after.is_some()));
                    if status == StatusCode::UNAUTHORIZED
                        && matches!(credential, Credential::Token)
                        && !relogged
                        && inner.auth.as_ref().is_some_and(Auth::can_login_again)
                    {
                        // The token was refused (expired, revoked): one new login, then again.
                        // Forgotten only if it is still the one held: of calls refused at
                        // once, the first logs in and the others take its new token.
                        relogged = true;
                        if let Some(refused) = &token {
                            let mut held = inner.token.lock().await;
                            // Constant time, as every comparison of a secret.
                            let same = |s: &TokenState| {
                                bool::from(s.token.expose_secret().as_bytes().ct_eq(refused.expose_secret().as_bytes()))
                            };
                            if held.as_ref().is_some_and(same) {
                                *held = None;
                            }
                        }
                        attempt -= 1;
                        continue;
                    }
                    if !transient || attempt >= inner.retry.attempts {
                        return Err(Error::Status { status: status.as_u16(), errors: Self::errors(&body) });
                    }
                    after
                }
            };
            let backoff = inner.retry.base_delay.saturating_mul(1 << (attempt - 1).min(16)).min(inner.retry.max_delay);
            tokio::time::sleep(delay.map(|d| d.min(inner.retry.max_delay)).unwrap_or_else(|| jitter(backoff))).await;
        }
    }

    /// The client's token when it has an auth method; none otherwise.
    fn credential(&self) -> Credential<'static> {
        if self.0.auth.is_some() { Credential::Token } else { Credential::None }
    }

    /// Send `body` as JSON, serialized into a zeroizing buffer (it may carry a secret).
    async fn send_json(&self, method: &str, path: &str, body: Option<&(impl Serialize + ?Sized)>) -> Result<Body> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(Zeroizing::new))
            .transpose()
            .map_err(|_| Error::Invalid("a body that is not JSON".into()))?;
        self.send(method, path, body.as_ref(), self.credential()).await
    }

    /// Any call: `method` (`GET`, `PUT`, `POST`, `DELETE`, `LIST`, `PATCH`), `path` under
    /// `/v1/` (a query string allowed), an optional JSON body. Returns the whole reply
    /// (`None` for an empty one, e.g. 204). Without an auth method no token is sent.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Option<serde_json::Value>> {
        let reply = self.send_json(method, path, body).await?;
        if reply.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&reply).map(Some).map_err(|e| Error::Decode(format!("reply: {}", e.classify_name())))
    }

    /// Like [`Client::request`], with the reply's `data` decoded into `T`.
    pub async fn request_data<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        data(&self.send_json(method, path, body).await?)
    }

    /// A call whose reply has no data worth reading (204, or an acknowledgement).
    pub(crate) async fn call_empty(
        &self,
        method: &str,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<()> {
        self.send_json(method, path, body).await.map(drop)
    }

    // ---- the token ----

    /// The current token, logging in first when there is none or it is about to expire.
    pub async fn token(&self) -> Result<SecretString> {
        let inner = &self.0;
        let mut state = inner.token.lock().await;
        if let Some(s) = state.as_ref().filter(|s| s.usable()) {
            return Ok(s.token.clone());
        }
        let (fresh, _) = Box::pin(self.login()).await?;
        let token = fresh.token.clone();
        let renewable = fresh.renewable && fresh.ttl.is_some();
        *state = Some(fresh);
        drop(state);
        if renewable {
            self.start_renewer();
        }
        Ok(token)
    }

    /// Log in with the configured method (a given token is looked up instead, and used
    /// as it is when the lookup fails: its lifetime is then unknown and it is not renewed).
    async fn login(&self) -> Result<(TokenState, Option<keyvault_api::auth::Auth>)> {
        let inner = &self.0;
        let auth = inner.auth.as_ref().ok_or_else(|| Error::Config("no auth method and no token".into()))?;
        let (path, body) = match auth {
            Auth::Token(t) => {
                let looked_up = match self.send("GET", "auth/token/lookup-self", None, Credential::Given(t)).await {
                    Ok(reply) => data::<keyvault_api::auth::TokenLookup>(&reply).ok(),
                    Err(e) => {
                        tracing::debug!(error = %e, "token lookup failed; using the token as given");
                        None
                    }
                };
                let state = TokenState {
                    token: t.clone(),
                    obtained: Instant::now(),
                    ttl: looked_up.as_ref().filter(|l| l.ttl > 0).map(|l| Duration::from_secs(l.ttl)),
                    renewable: looked_up.is_some_and(|l| l.renewable),
                };
                return Ok((state, None));
            }
            Auth::AppRole { mount, role_id, secret_id } => {
                let secret_id = self.secret_id(secret_id).await?;
                (
                    format!("auth/{mount}/login"),
                    Scrubbed(serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() })),
                )
            }
            Auth::Kubernetes { mount, role, jwt_file } => {
                let jwt = read(jwt_file, "service account token")?;
                let jwt =
                    std::str::from_utf8(&jwt).map_err(|_| Error::Config("service account token: not UTF-8".into()))?;
                (format!("auth/{mount}/login"), Scrubbed(serde_json::json!({ "role": role, "jwt": jwt.trim() })))
            }
            Auth::Cert { mount, role } => {
                (format!("auth/{mount}/login"), Scrubbed(serde_json::json!({ "name": role })))
            }
            Auth::Userpass { username, .. }
                if username.is_empty() || username.contains('/') || username == "." || username == ".." =>
            {
                return Err(Error::Invalid("a userpass user name is one path segment".into()));
            }
            Auth::Userpass { mount, username, password } => (
                format!("auth/{mount}/login/{}", keyvault_api::secret::encode_segments(username)),
                Scrubbed(serde_json::json!({ "password": password.expose_secret() })),
            ),
            Auth::Bootstrap { mount, token } => {
                (format!("auth/{mount}/login"), Scrubbed(serde_json::json!({ "token": token.expose_secret() })))
            }
        };
        let body = Zeroizing::new(serde_json::to_vec(&body.0).map_err(|_| Error::Invalid("login body".into()))?);
        let reply = self.send("POST", &path, Some(&body), Credential::None).await?;
        let env: keyvault_api::Envelope<serde_json::Value> =
            serde_json::from_slice(&reply).map_err(|e| Error::Decode(format!("login reply: {}", e.classify_name())))?;
        let a = env.auth.ok_or_else(|| Error::Decode("a login reply without auth".into()))?;
        tracing::debug!(accessor = %a.accessor, ttl = a.lease_duration, "logged in to KeyVault");
        let state = TokenState {
            token: a.client_token.clone().into_secret(),
            obtained: Instant::now(),
            ttl: (a.lease_duration > 0).then(|| Duration::from_secs(a.lease_duration)),
            renewable: a.renewable,
        };
        Ok((state, Some(a)))
    }

    /// Log in now (even with a token held) and return the login's `auth` block: the new
    /// token, its accessor, policies and lifetime. Not for [`Auth::Token`].
    pub async fn login_now(&self) -> Result<keyvault_api::auth::Auth> {
        let mut state = self.0.token.lock().await;
        let (fresh, auth) = Box::pin(self.login()).await?;
        let auth = auth.ok_or_else(|| Error::Invalid("a given token is not a login".into()))?;
        let renewable = fresh.renewable && fresh.ttl.is_some();
        *state = Some(fresh);
        drop(state);
        if renewable {
            self.start_renewer();
        }
        Ok(auth)
    }

    /// The AppRole secret id: given, read from its file, or unwrapped once.
    async fn secret_id(&self, source: &SecretIdSource) -> Result<SecretString> {
        match source {
            SecretIdSource::Value(v) => Ok(v.clone()),
            SecretIdSource::File(f) => {
                let bytes = read(f, "secret id file")?;
                let text =
                    std::str::from_utf8(&bytes).map_err(|_| Error::Config("secret id file: not UTF-8".into()))?;
                Ok(SecretString::from(text.trim().to_owned()))
            }
            SecretIdSource::Wrapped(wrapping) => {
                if let Some(s) = self.0.unwrapped_secret_id.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(s);
                }
                let empty = Zeroizing::new(b"{}".to_vec());
                let reply = self.send("POST", "sys/wrapping/unwrap", Some(&empty), Credential::Given(wrapping)).await?;
                let sid: keyvault_api::auth::SecretId = data(&reply)?;
                let s = SecretString::from(sid.secret_id.expose().to_owned());
                *self.0.unwrapped_secret_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// Renew the token now (`auth/token/renew-self`).
    pub async fn renew(&self) -> Result<()> {
        let inner = &self.0;
        let mut state = inner.token.lock().await;
        let Some(current) = state.as_ref() else { return Ok(()) };
        let body = Zeroizing::new(b"{}".to_vec());
        let reply = self.send("POST", "auth/token/renew-self", Some(&body), Credential::Given(&current.token)).await?;
        let env: keyvault_api::Envelope<serde_json::Value> = serde_json::from_slice(&reply)
            .map_err(|e| Error::Decode(format!("renewal reply: {}", e.classify_name())))?;
        let a = env.auth.ok_or_else(|| Error::Decode("a renewal reply without auth".into()))?;
        if let Some(s) = state.as_mut() {
            s.obtained = Instant::now();
            // A lease of 0 is a token that never expires only if it never did (root); a
            // renewal in the last second before a token's maximum answers 0 too.
            s.ttl = match (s.ttl, a.lease_duration) {
                (None, 0) => None,
                (_, secs) => Some(Duration::from_secs(secs)),
            };
            s.renewable = a.renewable;
        }
        tracing::debug!(ttl = a.lease_duration, "KeyVault token renewed");
        Ok(())
    }

    fn start_renewer(&self) {
        let mut slot = self.0.renewer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.0);
        *slot = Some(tokio::spawn(renew_loop(weak)).abort_handle());
    }

    /// Drop the token held (the next call logs in again). Does not revoke it.
    pub async fn forget_token(&self) {
        *self.0.token.lock().await = None;
    }
}

/// Renew at two thirds of the lifetime (earlier for short ones, [`renew_after`]); when a
/// renewal is refused (or the maximum is near), log in again; when the server is
/// unreachable, try again shortly.
async fn renew_loop(weak: Weak<Inner>) {
    loop {
        let wait = {
            let Some(inner) = weak.upgrade() else { return };
            let state = inner.token.lock().await;
            match state.as_ref() {
                Some(s) if s.renewable => match s.ttl {
                    // Never sent (each call logs in by itself): not kept alive either.
                    Some(ttl) if ttl <= SEND_MARGIN => return,
                    Some(ttl) => renew_after(ttl).saturating_sub(s.obtained.elapsed()),
                    None => return,
                },
                _ => return,
            }
        };
        tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        let Some(inner) = weak.upgrade() else { return };
        let client = Client(inner);
        if client.0.renew_by_login && client.0.auth.as_ref().is_some_and(Auth::can_login_again) {
            client.forget_token().await;
            if let Err(e) = client.token().await {
                tracing::warn!(error = %e, "KeyVault login failed; the next call tries again");
            }
            continue; // this loop renews the new token
        }
        let before = client.0.token.lock().await.as_ref().and_then(|s| s.ttl);
        match client.renew().await {
            Ok(()) => {
                // A renewal that no longer extends (the token's maximum is near), or leaves
                // a token too short to be sent: a new login before it runs out.
                let after = client.0.token.lock().await.as_ref().and_then(|s| s.ttl);
                if let (Some(b), Some(a)) = (before, after)
                    && (a < b / 2 || (a <= SEND_MARGIN && b > SEND_MARGIN))
                    && client.0.auth.as_ref().is_some_and(Auth::can_login_again)
                {
                    client.forget_token().await;
                    if let Err(e) = client.token().await {
                        tracing::warn!(error = %e, "KeyVault login failed; retrying");
                    }
                    continue; // this loop renews the new token
                }
            }
            Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {
                tracing::info!(error = %e, "KeyVault refused the token's renewal; logging in again");
                client.forget_token().await;
                if client.0.auth.as_ref().is_some_and(Auth::can_login_again)
                    && let Err(e) = client.token().await
                {
                    tracing::warn!(error = %e, "KeyVault login failed; the next call tries again");
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "KeyVault token renewal failed; retrying");
                drop(client);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The reply's body, at most `max` bytes, into a zeroizing buffer; each chunk zeroized
/// after it is copied when this was its only owner. Why not, otherwise.
async fn read_reply(mut resp: reqwest::Response, max: usize) -> std::result::Result<Body, String> {
    let too_large = || format!("the reply is larger than {max} bytes (max_reply_bytes)");
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    // Of a known length, one allocation: no copy left behind by a growing buffer.
    let mut out = Zeroizing::new(Vec::with_capacity(resp.content_length().map_or(0, |n| n as usize)));
    while let Some(chunk) = resp.chunk().await.map_err(|_| "the reply was cut".to_owned())? {
        if out.len() + chunk.len() > max {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
        if let Ok(mut m) = chunk.try_into_mut() {
            m.as_mut().zeroize();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment is read as one family: `KEYVAULT_*`, or all of Vault's `VAULT_*`
    /// when only `VAULT_ADDR` names the server. A token of the other family is not taken
    /// (before, each setting fell back on its own: `KEYVAULT_ADDR` with `VAULT_TOKEN` sent
    /// the Vault token to KeyVault).
    #[test]
    fn the_environment_is_read_as_one_family() {
        let build = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            ClientBuilder::from_vars(|n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()))
        };
        let b = build(&[("KEYVAULT_ADDR", "https://kv:8200"), ("VAULT_TOKEN", "hvs.vault-token")]);
        assert_eq!(b.address.as_deref(), Some("https://kv:8200"));
        assert!(b.auth.is_none(), "the Vault token is not taken for KeyVault");
        let b = build(&[("VAULT_ADDR", "https://vault:8200"), ("KEYVAULT_TOKEN", "kv-token"), ("VAULT_CACERT", "ca")]);
        assert_eq!(b.address.as_deref(), Some("https://vault:8200"));
        assert!(b.auth.is_none(), "KeyVault's token is not sent to the server VAULT_ADDR names");
        assert_eq!(b.ca_file.as_deref(), Some(std::path::Path::new("ca")));
        let b = build(&[("VAULT_ADDR", "https://kv:8200"), ("VAULT_TOKEN", "t")]);
        assert!(b.auth.is_some(), "Vault's names, all of them");
        let b =
            build(&[("KEYVAULT_ADDR", "https://kv:8200"), ("VAULT_ADDR", "https://vault"), ("KEYVAULT_TOKEN", "t")]);
        assert_eq!(b.address.as_deref(), Some("https://kv:8200"));
        assert!(b.auth.is_some());
    }

    /// A token is renewed while it is still sent: before it comes within `SEND_MARGIN` of
    /// its expiry, with room for the round trip; at two thirds of a long lifetime.
    #[test]
    fn tokens_are_renewed_while_they_are_still_sent() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        for (ttl, at) in [
            (s(3), ms(500)),
            (s(4), s(1)),
            (s(6), s(3)),
            (s(10), Duration::from_nanos(6_666_666_666)),
            (s(3600), s(2400)),
        ] {
            assert_eq!(renew_after(ttl), at, "ttl {ttl:?}");
        }
        for ttl in [ms(2500), s(3), s(4), s(5), s(6), s(30), s(3600)] {
            assert!(renew_after(ttl) + SEND_MARGIN < ttl, "ttl {ttl:?}: renewed while it is still sent");
        }
        // Too short to be sent at all: renewed at two thirds (each call logs in anyway).
        assert_eq!(renew_after(s(2)), Duration::from_nanos(1_333_333_332));
        // No overflow for an absurd lifetime from a broken server.
        assert!(renew_after(Duration::MAX) < Duration::MAX);
    }
}
