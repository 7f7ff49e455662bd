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
use crate::auth::revocation::{Generations, Identity, Revocations};
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

/// The largest login body accepted (a Kubernetes service-account token is at most 16 KiB).
pub const MAX_LOGIN_BODY: usize = 64 * 1024;

/// Who is on the other end of a request: the connection's address and, over mutual TLS,
/// the verified client certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: SocketAddr,
    pub client_cert: Option<Arc<ClientCert>>,
    /// The listener's current CRL contents: a certificate revoked after the connection
    /// was opened is refused at its next request.
    pub revoked: Option<crate::tls::SharedRevoked>,
}

impl Peer {
    /// A peer for in-process calls (CLI, tests, benchmarks).
    pub fn local() -> Self {
        Peer { remote: SocketAddr::from(([127, 0, 0, 1], 0)), client_cert: None, revoked: None }
    }

    /// 401 if the connection's client certificate is in the current CRLs.
    fn check_certificate(&self) -> Result<()> {
        if let (Some(cert), Some(revoked)) = (&self.client_cert, &self.revoked)
            && revoked.load().contains(cert)
        {
            tracing::info!(cert_sha256 = %cert.sha256_hex, "request on a connection whose certificate is now revoked");
            return Err(Error::Unauthenticated(AuthFailure::CertificateRevoked));
        }
        Ok(())
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

    /// Fail with 403 unless the policies grant `cap` and `sudo` on `path`: the rule of
    /// Vault's root-protected paths, where `sudo` is needed in addition to the
    /// capability of the operation, never instead of it.
    pub fn require_sudo(&self, path: &str, cap: Capability) -> Result<()> {
        self.require(path, cap)?;
        self.require(path, Capability::Sudo)
    }

    fn is_root(&self) -> bool {
        self.claims.pol.iter().any(|p| p == ROOT_POLICY)
    }

    /// The one check of every request that assigns policies to something that will later
    /// log in or act (a role of any auth method, a userpass user, a bootstrap token): no
    /// request grants what its caller does not hold. The `root` policy is never
    /// assignable (root tokens come only from `operator init` and `operator root-token`);
    /// any other policy needs the caller to hold it, or `sudo` on
    /// `sys/policies/grant/<name>` (for administrators who hand out policies they do not
    /// use themselves; see docs/api.md).
    pub fn check_grant(&self, policies: &[String]) -> Result<()> {
        if policies.iter().any(|p| p == ROOT_POLICY) {
            return Err(Error::invalid(
                "the root policy cannot be assigned; root tokens come only from `keyvault operator init` \
                 and `keyvault operator root-token`",
            ));
        }
        if self.is_root() {
            return Ok(());
        }
        for p in policies {
            let held = self.claims.pol.iter().any(|mine| mine == p);
            if !held && !self.acl.allows(&format!("sys/policies/grant/{p}"), Capability::Sudo) {
                tracing::debug!(accessor = %self.claims.acc, policy = %p, "policy grant refused");
                return Err(Error::PermissionDenied);
            }
        }
        Ok(())
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
    /// This replica's clock against the storage's.
    clock: ClockWatch,
}

/// The last measured offset of this replica's clock from the storage's clock.
#[derive(Debug, Default)]
struct ClockWatch {
    /// Milliseconds, storage minus local; meaningful when `measured`.
    offset_ms: std::sync::atomic::AtomicI64,
    measured: std::sync::atomic::AtomicBool,
    /// The offset exceeds `max`: requests are refused until it does not.
    refusing: std::sync::atomic::AtomicBool,
    max_ms: i64,
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
        crate::usage::ensure_counted(store.as_ref()).await?;
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
            clock: ClockWatch {
                max_ms: i64::try_from(settings.tokens.max_clock_offset.as_millis()).unwrap_or(i64::MAX),
                ..Default::default()
            },
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
                    if last_auto_check.elapsed() >= me.rotation_config.check_interval {
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
        let limiter = {
            let limiter = self.limiter.clone();
            tokio::spawn(async move {
                let period = limiter.window().clamp(Duration::from_secs(1), Duration::from_secs(60));
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    let n = limiter.purge();
                    if n > 0 {
                        tracing::debug!(purged = n, "expired login rate-limit counters removed");
                    }
                }
            })
        };
        vec![purge, sync, limiter, self.rotation.spawn_driver()]
    }

    /// Pick up what other replicas changed: the keyring (new or retired versions) and
    /// policies; measure this replica's clock against the storage's.
    pub async fn sync_once(&self) -> Result<()> {
        self.policies.invalidate();
        self.measure_clock().await?;
        self.follow_keyring().await
    }

    /// Compare the local clock with the storage's (half the round trip is allowed for).
    async fn measure_clock(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let before = std::time::SystemTime::now();
        let Some(theirs) = self.store.clock().await? else { return Ok(()) };
        let after = std::time::SystemTime::now();
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
        };
        let local = (ms(before) + ms(after)) / 2;
        let offset = ms(theirs) - local;
        let c = &self.clock;
        c.offset_ms.store(offset, Ordering::Relaxed);
        c.measured.store(true, Ordering::Relaxed);
        let too_far = offset.abs() > c.max_ms;
        if c.refusing.swap(too_far, Ordering::Relaxed) != too_far {
            if too_far {
                tracing::error!(
                    offset_ms = offset,
                    max_ms = c.max_ms,
                    "this replica's clock is too far from the storage's: refusing requests until it is fixed"
                );
            } else {
                tracing::warn!(offset_ms = offset, "this replica's clock agrees with the storage's again: serving");
            }
        }
        Ok(())
    }

    /// 503 while this replica's clock is too far from the storage's.
    fn check_clock(&self) -> Result<()> {
        if self.clock.refusing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Unavailable(
                "this replica's clock disagrees with the storage's; it does not serve until that is fixed".into(),
            ));
        }
        Ok(())
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
        caller.require_sudo("sys/rotate", Capability::Update)?;
        self.rotation.start().await
    }

    pub async fn rotation_status(&self, caller: &Caller) -> Result<crate::rotation::Status> {
        caller.require("sys/rotate/status", Capability::Read)?;
        self.rotation.status().await
    }

    pub async fn rotation_set_aside(&self, caller: &Caller) -> Result<Vec<crate::rotation::SetAsideView>> {
        caller.require("sys/rotate/set-aside", Capability::Read)?;
        self.rotation.set_aside_report().await
    }

    pub async fn retire_master(&self, caller: &Caller) -> Result<Vec<u32>> {
        caller.require_sudo("sys/rotate/retire", Capability::Update)?;
        self.rotation.retire().await
    }

    /// New token-signing key; tokens signed by older keys stay valid until they expire.
    pub async fn rotate_token_signing(&self, caller: &Caller) -> Result<crate::keys::KeyVersion> {
        caller.require_sudo("sys/rotate/token-signing", Capability::Update)?;
        let ring = keys::add_version(self.store.as_ref(), &self.keys, &self.names, keys::Family::TokenSigning).await?;
        let v = ring.token_signing.active;
        self.keyring.store(Arc::new(ring));
        self.tokens.load_public_keys().await?;
        Ok(v)
    }

    /// Retire token-signing versions older than the active one, once every token they
    /// signed has expired (the active version has been in use longer than any token lives).
    pub async fn retire_token_signing(&self, caller: &Caller) -> Result<Vec<u32>> {
        caller.require_sudo("sys/rotate/token-signing/retire", Capability::Update)?;
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

    /// The identities a token, a login or a certificate speaks for, for the kill switch.
    fn identities(
        role: Option<&str>,
        user: Option<&str>,
        cert_hex: Option<&str>,
        spiffe: Option<&str>,
    ) -> Vec<Identity> {
        let mut ids = Vec::with_capacity(3);
        if let Some(r) = role {
            ids.push(Identity::Role(r.to_owned()));
        }
        if let Some(u) = user {
            ids.push(Identity::User(u.to_owned()));
        }
        if let Some(c) = cert_hex {
            ids.push(Identity::Certificate(c.to_owned()));
        }
        if let Some(s) = spiffe {
            ids.push(Identity::Spiffe(s.to_owned()));
        }
        ids
    }

    /// For a login or a direct request: refuse (`RevokedIdentity`) if any of `ids` is
    /// revoked and not restored; else the generations to put in the new token.
    async fn admit_identities(&self, ids: &[Identity]) -> Result<Generations> {
        let mut generations = Generations::new();
        for id in ids {
            let state = self.revocations.identity_state(id).await?;
            if state.blocks_logins {
                tracing::info!(identity = %id.describe(), "login or direct request from a revoked identity");
                return Err(Error::Unauthenticated(AuthFailure::RevokedIdentity));
            }
            if state.generation > 0 {
                generations.insert(id.kind().to_owned(), state.generation);
            }
        }
        Ok(generations)
    }

    /// For a token: refuse (`RevokedIdentity`) if any of its identities was revoked after
    /// it was issued (its generation there is older than the identity's).
    async fn check_token_identities(&self, ids: &[Identity], claims: &Claims) -> Result<()> {
        for id in ids {
            let state = self.revocations.identity_state(id).await?;
            let issued_with = claims.idg.get(id.kind()).copied().unwrap_or(0);
            if state.generation > issued_with {
                tracing::info!(identity = %id.describe(), accessor = %claims.acc, "token of a revoked identity");
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
        self.check_clock()?;
        peer.check_certificate()?;
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
        if let Some(parent) = &claims.par
            && self.revocations.accessor_revoked(parent).await?
        {
            return Err(Error::Unauthenticated(AuthFailure::Revoked));
        }
        let bound_cert = claims.cnf.as_ref().and(cert).map(|c| c.sha256_hex.as_str());
        let user = claims.sub.strip_prefix("userpass:").filter(|_| claims.meth == auth::userpass::METHOD);
        let ids = Self::identities(claims.role.as_deref(), user, bound_cert, claims.spiffe.as_deref());
        self.check_token_identities(&ids, &claims).await?;
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: false })
    }

    async fn authenticate_direct(&self, peer: &Peer) -> Result<Caller> {
        let cert = peer.client_cert.as_deref().ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let (name, role) =
            self.cert.direct_role(cert).await?.ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let ids = Self::identities(Some(&name), None, Some(&cert.sha256_hex), cert.spiffe_id());
        self.admit_identities(&ids).await?;
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
            idg: Generations::new(),
            par: None,
        });
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: true })
    }

    fn ttls(&self, outcome: &LoginOutcome) -> (u64, u64) {
        let max = outcome.max_ttl.unwrap_or(self.token_config.max_ttl).min(self.token_config.max_ttl);
        let ttl = outcome.ttl.unwrap_or(self.token_config.default_ttl).min(max);
        (ttl.as_secs(), max.as_secs())
    }

    /// 429 at once if `peer`'s address is at its limit of failed logins (before a login
    /// body is read).
    pub fn check_login_source(&self, peer: &Peer) -> Result<()> {
        self.limiter.check_source(peer.ip())
    }

    /// Who a login body claims to be, for the rate limiter: the user of the URL, the
    /// role, role id or cert role of the body, or for a bootstrap login a digest of the
    /// token presented (so that one failing unit behind a NAT address does not lock the
    /// others out). `None`: the source address alone.
    fn login_identity(method: &str, name: Option<&str>, body: &[u8]) -> Option<String> {
        if let Some(n) = name {
            return Some(n.to_owned());
        }
        if method == auth::bootstrap::METHOD {
            #[derive(Deserialize)]
            struct TokenHint {
                #[serde(default)]
                token: Option<secrecy::SecretString>,
            }
            use sha2::Digest;
            let hint: TokenHint = serde_json::from_slice(body).unwrap_or(TokenHint { token: None });
            return hint.token.map(|t| hex::encode(sha2::Sha256::digest(t.expose_secret().as_bytes())));
        }
        let hint = role_hint(body);
        hint.role.or(hint.name).or(hint.role_id)
    }

    /// Log in with method `method` (`/v1/auth/<method>/login[/<name>]`). Over mutual TLS
    /// the token is bound to the client certificate.
    ///
    /// The attempt takes its place in the rate limiter before any credential is looked
    /// at, and gives it back only when the login succeeds (check and count are one step:
    /// parallel attempts cannot get more guesses than the limit).
    pub async fn login(&self, method: &str, name: Option<&str>, body: &[u8], peer: &Peer) -> Result<IssuedToken> {
        let authn =
            self.authenticators.get(method).ok_or_else(|| Error::NotFound(format!("no auth method {method:?}")))?;
        self.check_clock()?;
        peer.check_certificate()?;
        if body.len() > MAX_LOGIN_BODY {
            return Err(Error::PayloadTooLarge { limit: MAX_LOGIN_BODY });
        }
        let identity = Self::login_identity(method, name, body);
        let reservation = self.limiter.reserve(method, identity.as_deref(), peer.ip()).await?;
        match self.login_checked(authn.as_ref(), method, name, body, peer).await {
            Ok(token) => {
                reservation.succeeded();
                Ok(token)
            }
            Err(e @ Error::Unauthenticated(_)) => {
                drop(reservation);
                tracing::info!(method, remote = %peer.remote, reason = e.audit_code(), "login failed");
                Err(e)
            }
            Err(e) => {
                reservation.not_counted();
                Err(e)
            }
        }
    }

    async fn login_checked(
        &self,
        authn: &dyn Authenticator,
        method: &str,
        name: Option<&str>,
        body: &[u8],
        peer: &Peer,
    ) -> Result<IssuedToken> {
        let cert = peer.client_cert.as_deref();
        let outcome = authn.login(LoginRequest { name, body, client_cert: cert }).await?;
        // From here on the credentials were right: a refusal must not say so (the
        // caller gets the generic answer; the reason goes to the logs and audit entry).
        let ids = Self::identities(
            outcome.role.as_deref(),
            outcome.user.as_deref(),
            cert.map(|c| c.sha256_hex.as_str()),
            cert.and_then(|c| c.spiffe_id()),
        );
        let generations = match self.admit_identities(&ids).await {
            Err(Error::Unauthenticated(AuthFailure::RevokedIdentity)) => {
                return Err(Error::Unauthenticated(AuthFailure::LoginRevokedIdentity));
            }
            other => other?,
        };
        if let Some(parent) = &outcome.parent
            && self.revocations.accessor_revoked(parent).await?
        {
            return Err(Error::Unauthenticated(AuthFailure::LoginRevokedIdentity));
        }
        if outcome.bind_certificate && cert.is_none() {
            return Err(Error::Unauthenticated(AuthFailure::LoginCertificateRequired));
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
                generations,
                parent: outcome.parent,
            })
            .await?;
        tracing::info!(method, accessor = %token.claims.acc, sub = %token.claims.sub, bound = token.claims.cnf.is_some(), "login");
        Ok(token)
    }

    /// The short form `POST /v1/auth` with `{"role": ..., credentials}`: the role's method.
    pub async fn login_short(&self, body: &[u8], peer: &Peer) -> Result<IssuedToken> {
        if body.len() > MAX_LOGIN_BODY {
            return Err(Error::PayloadTooLarge { limit: MAX_LOGIN_BODY });
        }
        let role = role_hint(body).role.ok_or_else(|| Error::invalid("missing field `role`"))?;
        auth::validate_name("role", &role)?;
        let method = match auth::role_method(self.store.as_ref(), &role).await? {
            Some(m) => m,
            None => {
                // An unknown role is a failed attempt like any other (and answers the same).
                drop(self.limiter.reserve("-", Some(&role), peer.ip()).await?);
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
                generations: Generations::new(),
                parent: None,
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
        if increment.is_some_and(|d| d > MAX_TOKEN_LIFETIME) {
            return Err(Error::invalid(format!("increment out of range (at most {} s)", MAX_TOKEN_LIFETIME.as_secs())));
        }
        let ttl = increment.map(|d| d.as_secs()).unwrap_or(c.exp.saturating_sub(c.iat)).max(1);
        let exp = now.checked_add(ttl).ok_or_else(|| Error::invalid("increment out of range"))?.min(max_exp);
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
        validate_accessor(accessor)?;
        let until = unix_now().saturating_add(MAX_TOKEN_LIFETIME.max(self.token_config.max_ttl).as_secs());
        self.revocations.revoke_accessor(accessor, until).await?;
        tracing::info!(accessor, by = %caller.claims.acc, "token revoked by accessor");
        Ok(())
    }

    // ---- the kill switch ----

    /// Revoke an identity everywhere at once: its tokens (every one issued so far, on
    /// every replica, whatever the clocks say), its logins and direct requests (until
    /// restored), its certificate pins and gateway producers. A role or user that does
    /// not exist is 404. Returns the identity's new generation.
    pub async fn revoke_identity(&self, caller: &Caller, identity: &Identity) -> Result<u64> {
        caller.require_sudo("sys/revoke-identity", Capability::Update)?;
        self.identity_exists(identity).await?;
        let generation = self.revocations.revoke_identity(identity, &caller.claims.acc).await?;
        // After the atomic step above (which already refuses everything of this identity),
        // tidy up: certificate pins and gateway producers.
        let producers = match identity {
            Identity::Certificate(fp) => {
                let roles = self.cert.remove_pin(fp).await?;
                tracing::info!(roles, "certificate pin removed from cert roles");
                self.gateway.disable_matching(Some(fp), None).await?
            }
            Identity::Spiffe(id) => self.gateway.disable_matching(None, Some(id)).await?,
            Identity::Role(_) | Identity::User(_) => 0,
        };
        if producers > 0 {
            tracing::info!(producers, "gateway producers disabled");
        }
        tracing::warn!(identity = %identity.describe(), generation, by = %caller.claims.acc, "identity revoked (kill switch)");
        Ok(generation)
    }

    /// 404 for a role or user this installation does not know (certificates and SPIFFE
    /// IDs come from the PKI and may be revoked before they are ever seen).
    async fn identity_exists(&self, identity: &Identity) -> Result<()> {
        match identity {
            Identity::Role(r) if auth::role_method(self.store.as_ref(), r).await?.is_none() => {
                Err(Error::NotFound(format!("no role {r} in any auth method")))
            }
            Identity::User(u) if self.userpass.current(u).await?.is_none() => {
                Err(Error::NotFound(format!("no userpass user {u}")))
            }
            _ => Ok(()),
        }
    }

    /// The kill switch for one credential: the token(s) with this accessor, every token
    /// issued from it (a bootstrap token's login), and the bootstrap token itself if it
    /// is still unused.
    pub async fn revoke_identity_accessor(&self, caller: &Caller, accessor: &str) -> Result<()> {
        caller.require_sudo("sys/revoke-identity", Capability::Update)?;
        validate_accessor(accessor)?;
        let until = unix_now().saturating_add(MAX_TOKEN_LIFETIME.max(self.token_config.max_ttl).as_secs());
        self.revocations.revoke_accessor(accessor, until).await?;
        let unused = self.bootstrap.revoke_accessor(accessor).await?;
        tracing::warn!(accessor, unused_bootstrap_tokens = unused, by = %caller.claims.acc, "accessor revoked (kill switch)");
        Ok(())
    }

    pub async fn restore_identity(&self, caller: &Caller, identity: &Identity) -> Result<()> {
        caller.require_sudo("sys/restore-identity", Capability::Update)?;
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
        caller.check_grant(&req.policies)?;
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
        let current = self.gateway.producer_raw(identity).await?;
        let cap = if current.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&path, cap)?;
        self.gateway.put_producer(identity, p, current.as_deref()).await
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
        let name = &name.to_ascii_lowercase();
        let path = format!("sys/policies/acl/{name}");
        let current = self.policies.raw(name).await?;
        let cap = if current.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&path, cap)?;
        self.policies.put_if(name, text, current.as_deref()).await
    }

    pub async fn read_policy(&self, caller: &Caller, name: &str) -> Result<String> {
        let name = &name.to_ascii_lowercase();
        caller.require(&format!("sys/policies/acl/{name}"), Capability::Read)?;
        if name == ROOT_POLICY {
            return Ok(String::new());
        }
        Ok(self.policies.get(name).await?.ok_or_else(|| Error::NotFound(format!("no policy {name}")))?.text.clone())
    }

    pub async fn delete_policy(&self, caller: &Caller, name: &str) -> Result<()> {
        let name = &name.to_ascii_lowercase();
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

    /// Create (needs `create`) or update (needs `update`) a role; the policies it assigns
    /// must pass [`Caller::check_grant`].
    pub async fn write_role(&self, caller: &Caller, method: &str, name: &str, body: &[u8]) -> Result<()> {
        let admin = self.role_admin(method)?;
        auth::validate_name("role", name)?;
        let current = admin.current(name).await?;
        let cap = if current.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&format!("auth/{method}/role/{name}"), cap)?;
        caller.check_grant(&auth::requested_policies(body)?)?;
        admin.write_role(name, body, current.as_deref()).await
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

    /// Create (needs `create`) or update (needs `update`) a user; the policies it
    /// assigns must pass [`Caller::check_grant`].
    pub async fn write_user(&self, caller: &Caller, name: &str, w: UserWrite) -> Result<()> {
        let name = auth::userpass::normalize_user(name)?;
        let current = self.userpass.current(&name).await?;
        let cap = if current.is_some() { Capability::Update } else { Capability::Create };
        caller.require(&format!("auth/userpass/users/{name}"), cap)?;
        if let Some(p) = &w.token_policies {
            caller.check_grant(p)?;
        }
        self.userpass.write_user(&name, w, current.as_deref()).await
    }

    pub async fn read_user(&self, caller: &Caller, name: &str) -> Result<UserView> {
        let name = &auth::userpass::normalize_user(name)?;
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Read)?;
        self.userpass.read_user(name).await
    }

    pub async fn delete_user(&self, caller: &Caller, name: &str) -> Result<()> {
        let name = &auth::userpass::normalize_user(name)?;
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Delete)?;
        self.userpass.delete_user(name).await
    }

    pub async fn list_users(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("auth/userpass/users/", Capability::List)?;
        self.userpass.list_users().await
    }

    // ---- health ----

    /// Storage and token reachability, the clock, and missing keys, for
    /// `/v1/sys/health`. Details of a failure go to the log, not to the (unauthenticated)
    /// caller.
    pub async fn health(&self) -> HealthReport {
        use std::sync::atomic::Ordering;
        let storage = match self.store.ping().await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "health: storage check failed");
                "unavailable"
            }
        };
        let label = self.names.master(self.barrier.active_version());
        let shown = label.clone();
        let hsm = match crate::hsm_call(&self.keys, move |k| k.exists(&label)).await {
            Ok(true) => "ok",
            Ok(false) => {
                tracing::error!(key = %shown, "health: the active master key is missing from the HSM");
                "key_missing"
            }
            Err(e) => {
                tracing::warn!(error = %e, "health: HSM check failed");
                "unavailable"
            }
        };
        let measured = self.clock.measured.load(Ordering::Relaxed);
        HealthReport {
            storage,
            hsm,
            master_version: self.barrier.active_version().get(),
            clock_offset_ms: measured.then(|| self.clock.offset_ms.load(Ordering::Relaxed)),
            clock_ok: !self.clock.refusing.load(Ordering::Relaxed),
            missing_key_errors: crate::http::error::MISSING_KEY_ERRORS.load(Ordering::Relaxed),
        }
    }
}

/// Accessors are 1-64 ASCII letters and digits.
fn validate_accessor(accessor: &str) -> Result<()> {
    if accessor.is_empty() || accessor.len() > 64 || !accessor.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Error::invalid("invalid accessor"));
    }
    Ok(())
}

/// Log why a bound token was refused; the caller gets 401.
fn binding_failure(reason: AuthFailure, claims: &Claims) -> Error {
    tracing::info!(accessor = %claims.acc, reason = reason.code(), "certificate-bound token refused");
    Error::Unauthenticated(reason)
}

/// What `/v1/sys/health` reports.
#[derive(Debug)]
pub struct HealthReport {
    /// `ok` or `unavailable`.
    pub storage: &'static str,
    /// `ok`, `unavailable` or `key_missing`.
    pub hsm: &'static str,
    pub master_version: u32,
    /// Storage clock minus this replica's clock (shared storage only).
    pub clock_offset_ms: Option<i64>,
    /// False while the offset exceeds `tokens.max_clock_offset` (requests get 503).
    pub clock_ok: bool,
    /// Requests that failed on a key missing from the HSM since start.
    pub missing_key_errors: u64,
}

impl HealthReport {
    pub fn ok(&self) -> bool {
        self.storage == "ok" && self.hsm == "ok" && self.clock_ok
    }
}

/// Reveal a token string for the one place that must: the login reply.
pub fn token_string(t: &IssuedToken) -> &str {
    t.token.expose_secret()
}
