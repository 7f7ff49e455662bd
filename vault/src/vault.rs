//! The vault: every domain operation, with its authorization. HTTP handlers, the CLI,
//! tests and benchmarks all call these functions; none of them knows about HTTP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyvault_hsm::{KeyStore, Pkcs11Config, Pkcs11KeyStore};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::auth::approle::{AppRole, NewSecretId};
use crate::auth::bootstrap::{Bootstrap, MintRequest, Minted};
use crate::auth::cert::CertAuth;
use crate::auth::kubernetes::{KubeConfig, KubernetesAuth};
use crate::auth::limiter::{FailureLimiter, LimitConfig};
use crate::auth::revocation::{Identity, Revocations};
use crate::auth::userpass::{UserPass, UserView, UserWrite};
use crate::auth::{self, Authenticator, LoginOutcome, LoginRequest, RoleAdmin};
use crate::barrier::Barrier;
use crate::config::{Config, RotationConfig, SecretsConfig, StorageConfig, TokenConfig};
use crate::error::{AuthFailure, Error, Result};
use crate::gateway::{Gateway, Producer, Verdict, VerifyItem};
use crate::keys::{self, KeyNames, SharedKeyring};
use crate::policy::{Acl, Capability, PolicyStore, ROOT_POLICY};
use crate::rotation::Rotation;
use crate::secrets::{SecretPath, SecretPrefix, SecretVersion, Secrets, VersionMeta};
use crate::store::{SledStore, Store};
use crate::tls::ClientCert;
use crate::token::{Claims, Confirmation, IssuedToken, TokenIssuer, TokenSpec};
use crate::transit::{KeyType, Transit, TransitKey};
use crate::unix_now;

/// The longest any token may live (root tokens included); revocation records by accessor
/// are kept this long.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who is on the other end of a request: the connection's address and, over mutual TLS,
/// the verified client certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: SocketAddr,
    pub client_cert: Option<Arc<ClientCert>>,
}

impl Peer {
    /// A peer for in-process calls (CLI, tests, benchmarks).
    pub fn local() -> Self {
        Peer { remote: SocketAddr::from(([127, 0, 0, 1], 0)), client_cert: None }
    }

    fn ip(&self) -> IpAddr {
        self.remote.ip()
    }
}

/// An authenticated caller: verified claims and the ACL of their policies.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Arc<Claims>,
    pub acl: Acl,
    /// True for a direct certificate request (no token): nothing to renew or revoke.
    pub direct: bool,
}

impl Caller {
    /// Fail with 403 unless the caller's policies grant `cap` on `path`.
    pub fn require(&self, path: &str, cap: Capability) -> Result<()> {
        if self.acl.allows(path, cap) {
            Ok(())
        } else {
            tracing::debug!(accessor = %self.claims.acc, path, capability = cap.name(), "permission denied");
            Err(Error::PermissionDenied)
        }
    }

    fn is_root(&self) -> bool {
        self.claims.pol.iter().any(|p| p == ROOT_POLICY)
    }
}

/// Open the configured key store (PKCS#11 token).
pub fn open_keystore(config: &Config) -> Result<Arc<dyn KeyStore>> {
    let pin = config.hsm.pin_source()?.read()?;
    let mut p = Pkcs11Config::new(config.hsm.module.clone(), config.hsm.token_label.clone(), pin);
    p.max_sessions = config.hsm.max_sessions;
    p.wrap = config.hsm.wrap_preference();
    Ok(Pkcs11KeyStore::open(&p)?)
}

/// Open the configured storage engine.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    match &config.storage {
        StorageConfig::Sled { path } => {
            std::fs::create_dir_all(path)
                .map_err(|e| Error::Config(format!("cannot create storage directory {}: {e}", path.display())))?;
            Ok(Arc::new(SledStore::open(path)?))
        }
        StorageConfig::Postgres { url, password_file, tls_ca_file, pool_size } => {
            let password = match password_file {
                Some(f) => Some(
                    keyvault_hsm::PinSource::File(f.clone())
                        .read()
                        .map_err(|e| Error::Config(format!("storage.password_file: {e}")))?,
                ),
                None => None,
            };
            let options = crate::store::PostgresOptions {
                url: url.clone(),
                password,
                tls_ca_file: tls_ca_file.clone(),
                pool_size: *pool_size,
            };
            Ok(Arc::new(crate::store::PostgresStore::open(&options).await?))
        }
    }
}

/// Settings of the vault that are not storage or keys.
#[derive(Debug, Clone, Default)]
pub struct VaultSettings {
    pub tokens: TokenConfig,
    pub secrets: SecretsConfig,
    pub rate_limit: LimitConfig,
    pub rotation: RotationConfig,
}

impl VaultSettings {
    pub fn from_config(c: &Config) -> Self {
        VaultSettings {
            tokens: c.tokens.clone(),
            secrets: c.secrets.clone(),
            rate_limit: c.auth.rate_limit,
            rotation: c.rotation.clone(),
        }
    }
}

pub struct Vault {
    pub store: Arc<dyn Store>,
    pub keys: Arc<dyn KeyStore>,
    pub names: KeyNames,
    pub keyring: SharedKeyring,
    pub barrier: Barrier,
    pub tokens: TokenIssuer,
    pub policies: PolicyStore,
    pub secrets: Secrets,
    pub approle: Arc<AppRole>,
    pub userpass: Arc<UserPass>,
    pub cert: Arc<CertAuth>,
    pub kubernetes: Arc<KubernetesAuth>,
    pub bootstrap: Arc<Bootstrap>,
    pub revocations: Revocations,
    pub transit: Transit,
    pub gateway: Gateway,
    pub rotation: Arc<Rotation>,
    rotation_config: RotationConfig,
    limiter: FailureLimiter,
    authenticators: HashMap<&'static str, Arc<dyn Authenticator>>,
    role_admins: HashMap<&'static str, Arc<dyn RoleAdmin>>,
    token_config: TokenConfig,
    /// When a token signed by an unknown key last made this replica re-read the keyring.
    keyring_refresh: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("store", &self.store).finish_non_exhaustive()
    }
}

/// The fields of a login body that name a role (everything else is ignored here: this
/// parse only feeds the rate limiter and the short form's dispatch).
#[derive(Deserialize, Default)]
struct RoleHint {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    role_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

fn role_hint(body: &[u8]) -> RoleHint {
    serde_json::from_slice(body).unwrap_or_default()
}

impl Vault {
    /// Open an initialized installation from its configuration.
    pub async fn open(config: &Config) -> Result<Arc<Vault>> {
        let keys = open_keystore(config)?;
        let store = open_store(config).await?;
        let names = KeyNames::new(&config.hsm.key_prefix)?;
        Self::from_parts(store, keys, names, VaultSettings::from_config(config)).await
    }

    /// Assemble a vault from an opened store and key store. Fails if not initialized.
    pub async fn from_parts(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        settings: VaultSettings,
    ) -> Result<Arc<Vault>> {
        let ring = keys::load(store.as_ref()).await?.ok_or_else(|| {
            Error::Config("KeyVault is not initialized: run `keyvault operator init --config <file>` first".into())
        })?;
        let keyring: SharedKeyring = Arc::new(ArcSwap::from_pointee(ring));
        let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone())
            .with_store(store.clone())
            .with_dek_cache(settings.secrets.dek_cache_ttl, settings.secrets.dek_cache_capacity);
        let tokens =
            TokenIssuer::new(keys.clone(), names.clone(), keyring.clone(), settings.tokens.issuer.clone()).await?;
        let approle = Arc::new(AppRole::new(store.clone(), keys.clone(), names.clone(), keyring.clone()));
        let userpass = Arc::new(UserPass::new(store.clone()));
        let cert = Arc::new(CertAuth::new(store.clone()));
        let kubernetes = Arc::new(KubernetesAuth::new(store.clone()));
        let bootstrap = Arc::new(Bootstrap::new(store.clone(), keys.clone(), names.clone(), keyring.clone()));
        let authenticators: HashMap<&'static str, Arc<dyn Authenticator>> = [
            (auth::approle::METHOD, approle.clone() as Arc<dyn Authenticator>),
            (auth::userpass::METHOD, userpass.clone()),
            (auth::cert::METHOD, cert.clone()),
            (auth::kubernetes::METHOD, kubernetes.clone()),
            (auth::bootstrap::METHOD, bootstrap.clone()),
        ]
        .into();
        let role_admins: HashMap<&'static str, Arc<dyn RoleAdmin>> = [
            (auth::approle::METHOD, approle.clone() as Arc<dyn RoleAdmin>),
            (auth::cert::METHOD, cert.clone()),
            (auth::kubernetes::METHOD, kubernetes.clone()),
        ]
        .into();
        Ok(Arc::new(Vault {
            policies: PolicyStore::new(store.clone()),
            secrets: Secrets::new(store.clone(), barrier.clone(), settings.secrets.max_versions),
            revocations: Revocations::new(store.clone()),
            transit: Transit::new(store.clone(), keys.clone(), names.clone()),
            gateway: Gateway::new(store.clone()),
            rotation: Arc::new(Rotation::new(
                store.clone(),
                keys.clone(),
                names.clone(),
                keyring.clone(),
                barrier.clone(),
            )),
            rotation_config: settings.rotation.clone(),
            limiter: FailureLimiter::new(settings.rate_limit),
            store,
            keys,
            names,
            keyring,
            barrier,
            tokens,
            approle,
            userpass,
            cert,
            kubernetes,
            bootstrap,
            authenticators,
            role_admins,
            token_config: settings.tokens,
            keyring_refresh: Default::default(),
        }))
    }

    /// Start the background work of this replica: expired-entry purges, following changes
    /// other replicas make (keyring, policies: within a second), driving master key
    /// rotations, and automatic rotation. Returns the task handles.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let purge = {
            let store = self.store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    match store.purge_expired().await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(purged = n, "purged expired entries"),
                        Err(e) => tracing::warn!(error = %e, "purging expired entries failed"),
                    }
                }
            })
        };
        let sync = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut reported = me.barrier.sealed_count();
                let mut last_auto_check = std::time::Instant::now();
                loop {
                    tick.tick().await;
                    if let Err(e) = me.sync_once().await {
                        tracing::warn!(error = %e, "following the keyring failed");
                    }
                    if last_auto_check.elapsed() >= Duration::from_secs(10) {
                        last_auto_check = std::time::Instant::now();
                        let sealed = me.barrier.sealed_count();
                        if let Err(e) = me.auto_rotate(sealed - reported).await {
                            tracing::warn!(error = %e, "automatic rotation check failed");
                        }
                        reported = sealed;
                    }
                }
            })
        };
        vec![purge, sync, self.rotation.spawn_driver()]
    }

    /// Pick up what other replicas changed: the keyring (new or retired versions) and
    /// policies.
    pub async fn sync_once(&self) -> Result<()> {
        self.policies.invalidate();
        self.follow_keyring().await
    }

    /// Re-read the keyring and follow it if another replica changed it.
    async fn follow_keyring(&self) -> Result<()> {
        let Some(ring) = keys::load(self.store.as_ref()).await? else { return Ok(()) };
        let current = self.keyring.load_full();
        if *current != ring {
            let signing_changed = current.token_signing != ring.token_signing;
            self.keyring.store(Arc::new(ring));
            if signing_changed {
                self.tokens.load_public_keys().await?;
            }
            tracing::info!("keyring changed by another replica; following it");
        }
        Ok(())
    }

    /// Start a rotation when the active master version is too old or has sealed too much.
    async fn auto_rotate(&self, newly_sealed: u64) -> Result<()> {
        let active = self.keyring.load().master.clone();
        let key = format!("sys/rotation/encryptions/v{}", active.active.get());
        let mut count = 0;
        if newly_sealed > 0 || self.rotation_config.master_max_encryptions.is_some() {
            loop {
                let raw = self.store.get(&key).await?;
                let old = raw.as_deref().and_then(|r| r.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                count = old + newly_sealed;
                if newly_sealed == 0
                    || self.store.compare_and_swap(&key, raw.as_deref(), Some(&count.to_be_bytes())).await?
                {
                    break;
                }
            }
        }
        let too_old = self
            .rotation_config
            .master_max_age
            .is_some_and(|age| unix_now().saturating_sub(active.activated_at) > age.as_secs());
        let too_used = self.rotation_config.master_max_encryptions.is_some_and(|max| count >= max);
        if too_old || too_used {
            match self.rotation.start().await {
                Ok(v) => tracing::warn!(version = %v, too_old, too_used, "automatic master key rotation started"),
                Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    // ---- rotation ----

    pub async fn rotate_master(&self, caller: &Caller) -> Result<crate::keys::KeyVersion> {
        caller.require("sys/rotate", Capability::Sudo)?;
        self.rotation.start().await
    }

    pub async fn rotation_status(&self, caller: &Caller) -> Result<crate::rotation::Status> {
        caller.require("sys/rotate", Capability::Read)?;
        self.rotation.status().await
    }

    pub async fn retire_master(&self, caller: &Caller) -> Result<Vec<u32>> {
        caller.require("sys/rotate", Capability::Sudo)?;
        self.rotation.retire().await
    }

    /// New token-signing key; tokens signed by older keys stay valid until they expire.
    pub async fn rotate_token_signing(&self, caller: &Caller) -> Result<crate::keys::KeyVersion> {
        caller.require("sys/rotate", Capability::Sudo)?;
        let ring = keys::add_version(self.store.as_ref(), &self.keys, &self.names, keys::Family::TokenSigning).await?;
        let v = ring.token_signing.active;
        self.keyring.store(Arc::new(ring));
        self.tokens.load_public_keys().await?;
        Ok(v)
    }

    /// Retire token-signing versions older than the active one, once every token they
    /// signed has expired (the active version has been in use longer than any token lives).
    pub async fn retire_token_signing(&self, caller: &Caller) -> Result<Vec<u32>> {
        caller.require("sys/rotate", Capability::Sudo)?;
        let fam = self.keyring.load().token_signing.clone();
        let lifetime = MAX_TOKEN_LIFETIME.max(self.token_config.max_ttl).as_secs();
        let since = unix_now().saturating_sub(fam.activated_at);
        if since < lifetime {
            return Err(Error::Conflict(format!(
                "tokens signed by older keys may live {} s more; retire after that",
                lifetime - since
            )));
        }
        let mut retired = Vec::new();
        for v in fam.versions.iter().copied().filter(|v| *v != fam.active) {
            let ring =
                keys::retire_version(self.store.as_ref(), &self.keys, &self.names, keys::Family::TokenSigning, v)
                    .await?;
            self.keyring.store(Arc::new(ring));
            retired.push(v.get());
        }
        self.tokens.load_public_keys().await?;
        Ok(retired)
    }

    // ---- identity ----

    /// The identities a token or a certificate speaks for, for the kill switch.
    fn identities(role: Option<&str>, cert_hex: Option<&str>, spiffe: Option<&str>) -> Vec<Identity> {
        let mut ids = Vec::with_capacity(3);
        if let Some(r) = role {
            ids.push(Identity::Role(r.to_owned()));
        }
        if let Some(c) = cert_hex {
            ids.push(Identity::Certificate(c.to_owned()));
        }
        if let Some(s) = spiffe {
            ids.push(Identity::Spiffe(s.to_owned()));
        }
        ids
    }

    /// Fail with `RevokedIdentity` if any of `ids` was revoked at or after `issued_at` (a
    /// token), or, for a login or direct request (`None`), is revoked and not restored.
    async fn check_identities(&self, ids: &[Identity], issued_at: Option<u64>) -> Result<()> {
        for id in ids {
            let Some((at, blocks_logins)) = self.revocations.identity_revocation(id).await? else {
                continue;
            };
            let refused = match issued_at {
                Some(iat) => iat <= at,
                None => blocks_logins,
            };
            if refused {
                tracing::info!(identity = %id.describe(), "request from a revoked identity");
                return Err(Error::Unauthenticated(AuthFailure::RevokedIdentity));
            }
        }
        Ok(())
    }

    /// Authenticate a request: a token (checked against the connection's certificate when
    /// it is bound to one, against revocations, and resolved to policies, re-read every
    /// time), or with no token, a client certificate matching a cert role that allows
    /// direct requests.
    pub async fn authenticate(&self, token: Option<&str>, peer: &Peer) -> Result<Caller> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return self.authenticate_direct(peer).await;
        };
        let claims = match self.tokens.verify(token) {
            // Signed by a key another replica added less than a sync ago: catch up once.
            // Refreshes run one at a time, and one that started after this request
            // arrived covers it: a flood of such tokens (forged ones included) costs one
            // keyring read at a time, and the policy cache is left alone.
            Err(AuthFailure::UnknownSigningKey) => {
                let arrived = std::time::Instant::now();
                let mut last_started = self.keyring_refresh.lock().await;
                if last_started.is_none_or(|t| t < arrived) {
                    *last_started = Some(std::time::Instant::now());
                    self.follow_keyring().await?;
                }
                drop(last_started);
                self.tokens.verify(token).map_err(Error::Unauthenticated)?
            }
            other => other.map_err(Error::Unauthenticated)?,
        };
        let cert = peer.client_cert.as_deref();
        if let Some(cnf) = &claims.cnf {
            match cert {
                None => return Err(binding_failure(AuthFailure::CertificateRequired, &claims)),
                Some(c) if c.x5t_s256 != cnf.x5t_s256 => {
                    return Err(binding_failure(AuthFailure::CertificateMismatch, &claims));
                }
                Some(_) => {}
            }
        }
        if self.revocations.accessor_revoked(&claims.acc).await? {
            return Err(Error::Unauthenticated(AuthFailure::Revoked));
        }
        let bound_cert = claims.cnf.as_ref().and(cert).map(|c| c.sha256_hex.as_str());
        let ids = Self::identities(claims.role.as_deref(), bound_cert, claims.spiffe.as_deref());
        self.check_identities(&ids, Some(claims.iat)).await?;
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: false })
    }

    async fn authenticate_direct(&self, peer: &Peer) -> Result<Caller> {
        let cert = peer.client_cert.as_deref().ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let (name, role) =
            self.cert.direct_role(cert).await?.ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let ids = Self::identities(Some(&name), Some(&cert.sha256_hex), cert.spiffe_id());
        self.check_identities(&ids, None).await?;
        let now = unix_now();
        let claims = Arc::new(Claims {
            iss: self.token_config.issuer.clone(),
            sub: format!("{}:{name}", auth::cert::METHOD),
            iat: now,
            nbf: now,
            exp: now,
            jti: String::new(),
            acc: format!("direct:{}", &cert.sha256_hex[..16]),
            pol: role.token.token_policies.clone(),
            meth: auth::cert::METHOD.into(),
            role: Some(name),
            max_exp: None,
            cnf: Some(Confirmation { x5t_s256: cert.x5t_s256.clone() }),
            spiffe: cert.spiffe_id().map(str::to_owned),
        });
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: true })
    }

    fn ttls(&self, outcome: &LoginOutcome) -> (u64, u64) {
        let max = outcome.max_ttl.unwrap_or(self.token_config.max_ttl).min(self.token_config.max_ttl);
        let ttl = outcome.ttl.unwrap_or(self.token_config.default_ttl).min(max);
        (ttl.as_secs(), max.as_secs())
    }

    /// Log in with method `method` (`/v1/auth/<method>/login[/<name>]`). Over mutual TLS
    /// the token is bound to the client certificate.
    pub async fn login(&self, method: &str, name: Option<&str>, body: &[u8], peer: &Peer) -> Result<IssuedToken> {
        let authn =
            self.authenticators.get(method).ok_or_else(|| Error::NotFound(format!("no auth method {method:?}")))?;
        let hint = role_hint(body);
        let limit_key = format!(
            "{method}/{}",
            name.or(hint.role.as_deref()).or(hint.name.as_deref()).or(hint.role_id.as_deref()).unwrap_or("-")
        );
        self.limiter.check(&limit_key, peer.ip())?;
        let cert = peer.client_cert.as_deref();
        let outcome = match authn.login(LoginRequest { name, body, client_cert: cert }).await {
            Ok(o) => o,
            Err(e @ Error::Unauthenticated(_)) => {
                self.limiter.record_failure(&limit_key, peer.ip());
                tracing::info!(method, remote = %peer.remote, "login failed");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let ids = Self::identities(
            outcome.role.as_deref(),
            cert.map(|c| c.sha256_hex.as_str()),
            cert.and_then(|c| c.spiffe_id()),
        );
        self.check_identities(&ids, None).await?;
        if outcome.bind_certificate && cert.is_none() {
            return Err(Error::Unauthenticated(AuthFailure::CertificateRequired));
        }
        let (ttl_secs, max_ttl_secs) = self.ttls(&outcome);
        let token = self
            .tokens
            .issue(TokenSpec {
                sub: outcome.sub,
                method: outcome.method.to_owned(),
                role: outcome.role,
                policies: outcome.policies,
                ttl_secs,
                max_ttl_secs,
                cnf: cert.map(|c| Confirmation { x5t_s256: c.x5t_s256.clone() }),
                spiffe: cert.and_then(|c| c.spiffe_id()).map(str::to_owned),
            })
            .await?;
        tracing::info!(method, accessor = %token.claims.acc, sub = %token.claims.sub, bound = token.claims.cnf.is_some(), "login");
        Ok(token)
    }

    /// The short form `POST /v1/auth` with `{"role": ..., credentials}`: the role's method.
    pub async fn login_short(&self, body: &[u8], peer: &Peer) -> Result<IssuedToken> {
        let role = role_hint(body).role.ok_or_else(|| Error::invalid("missing field `role`"))?;
        auth::validate_name("role", &role)?;
        let method = match auth::role_method(self.store.as_ref(), &role).await? {
            Some(m) => m,
            None => {
                self.limiter.check(&format!("-/{role}"), peer.ip())?;
                self.limiter.record_failure(&format!("-/{role}"), peer.ip());
                return Err(Error::Unauthenticated(AuthFailure::InvalidCredentials));
            }
        };
        self.login(&method, None, body, peer).await
    }

    /// A root token (dev mode, `operator init`, `operator root-token`).
    pub async fn issue_root_token(&self, ttl: Duration) -> Result<IssuedToken> {
        if ttl > MAX_TOKEN_LIFETIME {
            return Err(Error::invalid("a root token lives at most 7 days"));
        }
        self.tokens
            .issue(TokenSpec {
                sub: "root".into(),
                method: "root".into(),
                role: None,
                policies: vec![ROOT_POLICY.into()],
                ttl_secs: ttl.as_secs(),
                max_ttl_secs: ttl.as_secs(),
                cnf: None,
                spiffe: None,
            })
            .await
    }

    // ---- token lifecycle ----

    /// A new token for the caller's, with a later expiry (up to its `max_exp`); same
    /// accessor, same binding. The old token stays valid until its own expiry.
    pub async fn renew_self(&self, caller: &Caller, increment: Option<Duration>) -> Result<IssuedToken> {
        if caller.direct {
            return Err(Error::invalid("a direct certificate request has no token to renew"));
        }
        let c = caller.claims.as_ref();
        let now = unix_now();
        let max_exp = c.max_exp.unwrap_or(c.exp);
        let ttl = increment.map(|d| d.as_secs()).unwrap_or(c.exp.saturating_sub(c.iat)).max(1);
        let exp = (now + ttl).min(max_exp);
        if exp <= now {
            return Err(Error::invalid("the token has reached its maximum TTL; log in again"));
        }
        let claims = Claims { iat: now, nbf: now, exp, ..c.clone() };
        let token = self.tokens.sign_claims(claims).await?;
        tracing::info!(accessor = %token.claims.acc, exp, "token renewed");
        Ok(token)
    }

    /// Revoke the caller's token (and its renewals: they share the accessor).
    pub async fn revoke_self(&self, caller: &Caller) -> Result<()> {
        if caller.direct {
            return Err(Error::invalid("a direct certificate request has no token to revoke"));
        }
        let until = caller.claims.max_exp.unwrap_or(caller.claims.exp);
        self.revocations.revoke_accessor(&caller.claims.acc, until).await?;
        tracing::info!(accessor = %caller.claims.acc, "token revoked by its holder");
        Ok(())
    }

    /// Revoke the token(s) with `accessor` (admin).
    pub async fn revoke_accessor(&self, caller: &Caller, accessor: &str) -> Result<()> {
        caller.require("auth/token/revoke-accessor", Capability::Update)?;
        if accessor.is_empty() || accessor.len() > 64 || !accessor.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::invalid("invalid accessor"));
        }
        let until = unix_now() + MAX_TOKEN_LIFETIME.max(self.token_config.max_ttl).as_secs();
        self.revocations.revoke_accessor(accessor, until).await?;
        tracing::info!(accessor, by = %caller.claims.acc, "token revoked by accessor");
        Ok(())
    }

    // ---- the kill switch ----

    /// Revoke an identity everywhere at once: its tokens (issued before now), its logins
    /// and direct requests (until restored), and its certificate pins.
    pub async fn revoke_identity(&self, caller: &Caller, identity: &Identity) -> Result<u64> {
        caller.require("sys/revoke-identity", Capability::Sudo)?;
        let at = self.revocations.revoke_identity(identity, &caller.claims.acc).await?;
        // After the atomic step above (which already refuses everything of this identity),
        // tidy up: certificate pins and gateway producers.
        let producers = match identity {
            Identity::Certificate(fp) => {
                let roles = self.cert.remove_pin(fp).await?;
                tracing::info!(roles, "certificate pin removed from cert roles");
                self.gateway.disable_matching(Some(fp), None).await?
            }
            Identity::Spiffe(id) => self.gateway.disable_matching(None, Some(id)).await?,
            Identity::Role(_) => 0,
        };
        if producers > 0 {
            tracing::info!(producers, "gateway producers disabled");
        }
        tracing::warn!(identity = %identity.describe(), by = %caller.claims.acc, "identity revoked (kill switch)");
        Ok(at)
    }

    pub async fn restore_identity(&self, caller: &Caller, identity: &Identity) -> Result<()> {
        caller.require("sys/revoke-identity", Capability::Sudo)?;
        if !self.revocations.restore_identity(identity).await? {
            return Err(Error::NotFound(format!("{} is not revoked", identity.describe())));
        }
        tracing::warn!(identity = %identity.describe(), by = %caller.claims.acc, "identity restored");
        Ok(())
    }

    // ---- bootstrap tokens ----

    /// Mint a one-time bootstrap token. Its policies must be the caller's own (or the
    /// caller is root): nobody mints more than they have.
    pub async fn mint_bootstrap(&self, caller: &Caller, req: MintRequest) -> Result<Minted> {
        caller.require("auth/bootstrap/token", Capability::Update)?;
        if !caller.is_root() && !req.policies.iter().all(|p| caller.claims.pol.contains(p)) {
            return Err(Error::PermissionDenied);
        }
        if req.policies.iter().any(|p| p == ROOT_POLICY) {
            return Err(Error::invalid("a bootstrap token cannot carry the root policy"));
        }
        self.bootstrap.mint(req).await
    }

    // ---- transit ----

    /// Authorize `cap` on the key's path and load it.
    pub async fn transit_key(&self, caller: &Caller, name: &str, cap: Capability) -> Result<TransitKey> {
        crate::transit::validate_key_name(name)?;
        caller.require(&format!("transit/keys/{name}"), cap)?;
        self.transit.get(name).await
    }

    pub async fn transit_create(&self, caller: &Caller, name: &str, key_type: KeyType) -> Result<TransitKey> {
        crate::transit::validate_key_name(name)?;
        caller.require(&format!("transit/keys/{name}"), Capability::Create)?;
        self.transit.create(name, key_type).await
    }

    pub async fn transit_rotate(&self, caller: &Caller, name: &str) -> Result<TransitKey> {
        crate::transit::validate_key_name(name)?;
        caller.require(&format!("transit/keys/{name}"), Capability::Rotate)?;
        self.transit.rotate(name).await
    }

    pub async fn transit_configure(
        &self,
        caller: &Caller,
        name: &str,
        min_decryption_version: Option<u32>,
        deletion_allowed: Option<bool>,
    ) -> Result<TransitKey> {
        crate::transit::validate_key_name(name)?;
        caller.require(&format!("transit/keys/{name}"), Capability::Update)?;
        self.transit.configure(name, min_decryption_version, deletion_allowed).await
    }

    pub async fn transit_delete(&self, caller: &Caller, name: &str) -> Result<()> {
        crate::transit::validate_key_name(name)?;
        caller.require(&format!("transit/keys/{name}"), Capability::Delete)?;
        self.transit.delete(name).await
    }

    pub async fn transit_list(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("transit/keys/", Capability::List)?;
        self.transit.list().await
    }

    // ---- gateway ----

    pub async fn put_producer(&self, caller: &Caller, identity: &str, p: Producer) -> Result<()> {
        crate::gateway::validate_identity(identity)?;
        let path = format!("gateway/producers/{identity}");
        let cap =
            if self.gateway.producer(identity).await?.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&path, cap)?;
        self.gateway.put_producer(identity, p).await
    }

    pub async fn read_producer(&self, caller: &Caller, identity: &str) -> Result<Producer> {
        crate::gateway::validate_identity(identity)?;
        caller.require(&format!("gateway/producers/{identity}"), Capability::Read)?;
        self.gateway.producer(identity).await?.ok_or_else(|| Error::NotFound(format!("no producer {identity}")))
    }

    pub async fn delete_producer(&self, caller: &Caller, identity: &str) -> Result<()> {
        crate::gateway::validate_identity(identity)?;
        caller.require(&format!("gateway/producers/{identity}"), Capability::Delete)?;
        self.gateway.delete_producer(identity).await
    }

    pub async fn list_producers(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("gateway/producers/", Capability::List)?;
        self.gateway.list_producers().await
    }

    /// The gateway check of journey 2 (needs `verify` on `gateway/verify`).
    pub async fn gateway_verify(&self, caller: &Caller, items: &[VerifyItem]) -> Result<Vec<Verdict>> {
        caller.require("gateway/verify", Capability::Verify)?;
        self.gateway.verify(items, &self.transit, &self.revocations).await
    }

    // ---- secrets ----

    pub async fn read_secret(&self, caller: &Caller, path: &SecretPath, version: Option<u64>) -> Result<SecretVersion> {
        caller.require(&format!("secret/{}", path.as_str()), Capability::Read)?;
        self.secrets.read(path, version).await
    }

    /// Write a new version. Needs `create` for a new secret, `update` for an existing one.
    pub async fn write_secret(&self, caller: &Caller, path: &SecretPath, value: &[u8]) -> Result<(u64, VersionMeta)> {
        let policy_path = format!("secret/{}", path.as_str());
        let cap = if self.secrets.exists(path).await? { Capability::Update } else { Capability::Create };
        caller.require(&policy_path, cap)?;
        self.secrets.write(path, value).await
    }

    pub async fn delete_secret(&self, caller: &Caller, path: &SecretPath) -> Result<()> {
        caller.require(&format!("secret/{}", path.as_str()), Capability::Delete)?;
        self.secrets.delete_latest(path).await
    }

    pub async fn list_secrets(&self, caller: &Caller, prefix: &SecretPrefix) -> Result<Vec<String>> {
        caller.require(&format!("secret/{}", prefix.as_str()), Capability::List)?;
        self.secrets.list(prefix).await
    }

    // ---- policies ----

    pub async fn put_policy(&self, caller: &Caller, name: &str, text: &str) -> Result<()> {
        let path = format!("sys/policies/acl/{name}");
        let cap = if self.policies.get(name).await?.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&path, cap)?;
        self.policies.put(name, text).await
    }

    pub async fn read_policy(&self, caller: &Caller, name: &str) -> Result<String> {
        caller.require(&format!("sys/policies/acl/{name}"), Capability::Read)?;
        if name == ROOT_POLICY {
            return Ok(String::new());
        }
        Ok(self.policies.get(name).await?.ok_or_else(|| Error::NotFound(format!("no policy {name}")))?.text.clone())
    }

    pub async fn delete_policy(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(&format!("sys/policies/acl/{name}"), Capability::Delete)?;
        if !self.policies.delete(name).await? {
            return Err(Error::NotFound(format!("no policy {name}")));
        }
        Ok(())
    }

    pub async fn list_policies(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("sys/policies/acl/", Capability::List)?;
        self.policies.list().await
    }

    // ---- roles of every method (approle, cert, kubernetes) ----

    fn role_admin(&self, method: &str) -> Result<&Arc<dyn RoleAdmin>> {
        self.role_admins
            .get(method)
            .ok_or_else(|| Error::NotFound(format!("no auth method with roles named {method:?}")))
    }

    pub async fn write_role(&self, caller: &Caller, method: &str, name: &str, body: &[u8]) -> Result<()> {
        let admin = self.role_admin(method)?;
        caller.require(&format!("auth/{method}/role/{name}"), Capability::Update)?;
        admin.write_role(name, body).await
    }

    pub async fn read_role(&self, caller: &Caller, method: &str, name: &str) -> Result<serde_json::Value> {
        let admin = self.role_admin(method)?;
        caller.require(&format!("auth/{method}/role/{name}"), Capability::Read)?;
        admin.read_role(name).await
    }

    pub async fn delete_role(&self, caller: &Caller, method: &str, name: &str) -> Result<()> {
        let admin = self.role_admin(method)?;
        caller.require(&format!("auth/{method}/role/{name}"), Capability::Delete)?;
        admin.delete_role(name).await
    }

    pub async fn list_roles(&self, caller: &Caller, method: &str) -> Result<Vec<String>> {
        let admin = self.role_admin(method)?;
        caller.require(&format!("auth/{method}/role/"), Capability::List)?;
        admin.list_roles().await
    }

    pub async fn approle_role_id(&self, caller: &Caller, name: &str) -> Result<String> {
        caller.require(&format!("auth/approle/role/{name}/role-id"), Capability::Read)?;
        self.approle.role_id(name).await
    }

    pub async fn approle_secret_id(&self, caller: &Caller, name: &str) -> Result<NewSecretId> {
        caller.require(&format!("auth/approle/role/{name}/secret-id"), Capability::Update)?;
        self.approle.new_secret_id(name).await
    }

    pub async fn write_kubernetes_config(&self, caller: &Caller, config: KubeConfig) -> Result<()> {
        caller.require("auth/kubernetes/config", Capability::Update)?;
        self.kubernetes.write_config(config).await
    }

    pub async fn read_kubernetes_config(&self, caller: &Caller) -> Result<KubeConfig> {
        caller.require("auth/kubernetes/config", Capability::Read)?;
        self.kubernetes.read_config().await
    }

    // ---- userpass administration ----

    pub async fn write_user(&self, caller: &Caller, name: &str, w: UserWrite) -> Result<()> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Update)?;
        self.userpass.write_user(name, w).await
    }

    pub async fn read_user(&self, caller: &Caller, name: &str) -> Result<UserView> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Read)?;
        self.userpass.read_user(name).await
    }

    pub async fn delete_user(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Delete)?;
        self.userpass.delete_user(name).await
    }

    pub async fn list_users(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("auth/userpass/users/", Capability::List)?;
        self.userpass.list_users().await
    }

    // ---- health ----

    /// Storage and token reachability, for `/v1/sys/health`.
    pub async fn health(&self) -> HealthReport {
        let storage = self.store.ping().await.map_err(|e| e.to_string());
        let label = self.names.master(self.barrier.active_version());
        let hsm = crate::hsm_call(&self.keys, move |k| k.exists(&label))
            .await
            .and_then(|found| if found { Ok(()) } else { Err(Error::Internal("active master key missing".into())) })
            .map_err(|e| e.to_string());
        HealthReport { storage, hsm, master_version: self.barrier.active_version().get() }
    }
}

/// Log why a bound token was refused; the caller gets 401.
fn binding_failure(reason: AuthFailure, claims: &Claims) -> Error {
    tracing::info!(accessor = %claims.acc, reason = reason.code(), "certificate-bound token refused");
    Error::Unauthenticated(reason)
}

/// What `/v1/sys/health` reports.
#[derive(Debug)]
pub struct HealthReport {
    pub storage: std::result::Result<(), String>,
    pub hsm: std::result::Result<(), String>,
    pub master_version: u32,
}

/// Reveal a token string for the one place that must: the login reply.
pub fn token_string(t: &IssuedToken) -> &str {
    t.token.expose_secret()
}
