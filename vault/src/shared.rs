//! What every request may need, shared by the pipeline and the engines: storage, the key
//! store and keyring, tokens, policies, revocations, the login limiter, the audit log, and
//! this replica's clock against the storage's. Authentication and the login flow live
//! here: they are the same for every route and every auth method.

use std::sync::Arc;
use std::time::Duration;

use keyvault_hsm::KeyStore;

use crate::audit::AuditLog;
use crate::auth::cert::CertAuth;
use crate::auth::limiter::FailureLimiter;
use crate::auth::revocation::{Generations, Identity, Revocations};
use crate::auth::{self, LoginOutcome};
use crate::barrier::Barrier;
use crate::config::{RotationConfig, SecretsConfig, TokenConfig};
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, SharedKeyring};
use crate::logical::{Caller, Engine, Peer, Request};
use crate::policy::{PolicyStore, ROOT_POLICY};
use crate::rotation::Rotation;
use crate::store::Store;
use crate::token::{Claims, Confirmation, IssuedToken, TokenIssuer, TokenSpec};
use crate::unix_now;

/// The longest any token may live (root tokens included); revocation records by accessor
/// are kept this long.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of the service that are not storage, keys or mounts.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub tokens: TokenConfig,
    pub secrets: SecretsConfig,
    pub rate_limit: crate::auth::limiter::LimitConfig,
    pub rotation: RotationConfig,
    pub telemetry: crate::config::TelemetryConfig,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Settings {
            tokens: c.tokens.clone(),
            secrets: c.secrets.clone(),
            rate_limit: c.auth.rate_limit,
            rotation: c.rotation.clone(),
            telemetry: c.telemetry.clone(),
        }
    }
}

/// The last measured offset of this replica's clock from the storage's clock.
#[derive(Debug, Default)]
pub(crate) struct ClockWatch {
    /// Milliseconds, storage minus local; meaningful when `measured`.
    offset_ms: std::sync::atomic::AtomicI64,
    measured: std::sync::atomic::AtomicBool,
    /// The offset exceeds `max`: requests are refused until it does not.
    refusing: std::sync::atomic::AtomicBool,
    max_ms: i64,
}

/// The shared parts of a running service. Engines hold an `Arc` of it and take what they
/// need; nothing outside the crate sees it.
pub struct Core {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) keys: Arc<dyn KeyStore>,
    pub(crate) names: KeyNames,
    pub(crate) keyring: SharedKeyring,
    pub(crate) barrier: Barrier,
    pub(crate) tokens: TokenIssuer,
    /// Renewals of tokens past their own `exp`.
    pub(crate) renewals: crate::token::Renewals,
    /// Wrapped replies (`X-Vault-Wrap-TTL`, `sys/wrapping/*`).
    pub(crate) wrapping: crate::wrapping::Wrapping,
    pub(crate) policies: PolicyStore,
    pub(crate) revocations: Revocations,
    pub(crate) rotation: Arc<Rotation>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) settings: Settings,
    pub(crate) limiter: FailureLimiter,
    /// Cert roles, for requests authenticated by their client certificate alone.
    cert: CertAuth,
    /// When a token signed by an unknown key last made this replica re-read the keyring.
    keyring_refresh: tokio::sync::Mutex<Option<std::time::Instant>>,
    pub(crate) clock: ClockWatch,
    /// This installation's id (`sys/seal-status`, `sys/health`), made once, stored.
    pub(crate) cluster_id: String,
    /// What `sys/mounts` and `sys/auth` list (set once the mounts are built).
    pub(crate) mounts: std::sync::OnceLock<(keyvault_api::sys::Mounts, keyvault_api::sys::Mounts)>,
    /// Wrong PINs tried by `sys/unseal` since the last seal (serializes unseals).
    unseal_failures: tokio::sync::Mutex<u32>,
}

/// Wrong PINs `sys/unseal` tries against the token per seal. Tokens lock their user PIN
/// after a number of failed logins (often 10); stopping well before keeps a stranger from
/// locking it while the replica is sealed. Past it, restarting the replica unseals it.
pub const MAX_UNSEAL_FAILURES: u32 = 3;

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("store", &self.store).finish_non_exhaustive()
    }
}

/// The installation's id: a random UUID made by the first process that asks (any replica),
/// the same for every replica after.
async fn cluster_id(store: &dyn Store) -> Result<String> {
    const KEY: &str = "sys/cluster-id";
    let fresh = uuid::Uuid::new_v4().to_string();
    store.insert_if_absent(KEY, fresh.as_bytes(), None).await?;
    let stored = store.get(KEY).await?.ok_or_else(|| Error::Internal("the cluster id vanished".into()))?;
    String::from_utf8(stored).map_err(|_| Error::Internal("the stored cluster id is not text".into()))
}

/// Log why a bound token was refused; the caller gets 401.
fn binding_failure(reason: AuthFailure, claims: &Claims) -> Error {
    tracing::info!(accessor = %claims.acc, reason = reason.code(), "certificate-bound token refused");
    Error::Unauthenticated(reason)
}

/// The identities a token, a login or a certificate speaks for, for the kill switch.
fn identities(role: Option<&str>, user: Option<&str>, cert_hex: Option<&str>, spiffe: Option<&str>) -> Vec<Identity> {
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

impl Core {
    /// Assemble the core from opened storage and key store, and the keyring read from it.
    pub(crate) async fn new(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        keyring: SharedKeyring,
        audit: Arc<AuditLog>,
        settings: Settings,
    ) -> Result<Core> {
        let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone())
            .with_key_tier(settings.secrets.key_tier)
            .with_dek_cache(settings.secrets.dek_cache_ttl, settings.secrets.dek_cache_capacity);
        let tokens =
            TokenIssuer::new(keys.clone(), names.clone(), keyring.clone(), settings.tokens.issuer.clone()).await?;
        let rotation =
            Arc::new(Rotation::new(store.clone(), keys.clone(), names.clone(), keyring.clone(), barrier.clone()));
        let cluster_id = cluster_id(store.as_ref()).await?;
        Ok(Core {
            policies: PolicyStore::new(store.clone()),
            revocations: Revocations::new(store.clone()),
            renewals: crate::token::Renewals::new(store.clone()),
            wrapping: crate::wrapping::Wrapping::new(store.clone(), keys.clone(), names.clone(), keyring.clone()),
            cert: CertAuth::new(store.clone()),
            limiter: FailureLimiter::new(settings.rate_limit),
            clock: ClockWatch {
                max_ms: i64::try_from(settings.tokens.max_clock_offset.as_millis()).unwrap_or(i64::MAX),
                ..Default::default()
            },
            keyring_refresh: Default::default(),
            mounts: Default::default(),
            unseal_failures: Default::default(),
            cluster_id,
            store,
            keys,
            names,
            keyring,
            barrier,
            tokens,
            rotation,
            audit,
            settings,
        })
    }

    // ---- emergency seal ----

    /// Whether this replica is sealed (`sys/seal`).
    pub(crate) fn is_sealed(&self) -> bool {
        self.keys.is_sealed()
    }

    /// Seal this replica: close every session with the token and forget the PIN and key
    /// handles, then drop every cached data key and verified token. From the first step
    /// on, requests other than health, seal status and unseal are answered 503.
    pub(crate) async fn seal(&self) {
        let mut failures = self.unseal_failures.lock().await;
        self.keys.seal();
        *failures = 0;
        let deks = self.barrier.forget_cached_keys();
        let tokens = self.tokens.forget_verified();
        tracing::warn!(epoch_and_data_keys = deks, verified_tokens = tokens, "KeyVault sealed");
    }

    /// Unseal with the token's user PIN (checked by logging in to the token). A store
    /// that is not sealed is left as it is. At most [`MAX_UNSEAL_FAILURES`] wrong PINs per
    /// seal reach the token; after that every attempt is refused without trying.
    pub(crate) async fn unseal(&self, pin: secrecy::SecretString) -> Result<()> {
        let mut failures = self.unseal_failures.lock().await;
        if !self.is_sealed() {
            return Ok(());
        }
        if *failures >= MAX_UNSEAL_FAILURES {
            return Err(Error::Unavailable(format!(
                "{MAX_UNSEAL_FAILURES} wrong PINs were given since the seal; no more are tried (restart this replica to unseal it)"
            )));
        }
        match crate::hsm_call(&self.keys, move |k| k.unseal(pin)).await {
            Ok(()) => {
                tracing::warn!("KeyVault unsealed");
                Ok(())
            }
            Err(Error::Hsm(keyvault_hsm::HsmError::PinIncorrect)) => {
                *failures += 1;
                tracing::warn!(failures = *failures, "unseal refused: the token refused the PIN");
                Err(Error::invalid("the token refused the PIN"))
            }
            Err(e) => Err(e),
        }
    }

    /// `sys/mounts` (`auth == false`) or `sys/auth` (`auth == true`).
    pub(crate) fn mount_listing(&self, auth: bool) -> keyvault_api::sys::Mounts {
        self.mounts.get().map(|(m, a)| if auth { a.clone() } else { m.clone() }).unwrap_or_default()
    }

    // ---- the clock and the keyring of other replicas ----

    /// Pick up what other replicas changed: the keyring (new or retired versions, token
    /// verification keys with it) and policies; measure this replica's clock against the
    /// storage's.
    pub(crate) async fn sync_once(&self) -> Result<()> {
        self.policies.invalidate();
        self.measure_clock().await?;
        self.follow_keyring().await
    }

    /// Follow the stored keyring, and load the token verification keys it names.
    pub(crate) async fn follow_keyring(&self) -> Result<()> {
        self.keyring.follow().await?;
        self.barrier.forget_retired_epochs();
        self.tokens.sync_public_keys().await
    }

    /// Compare the local clock with the storage's (half the round trip is allowed for).
    async fn measure_clock(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let Some(offset) = self.store.clock_offset_ms().await? else { return Ok(()) };
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

    /// The last measured clock offset (storage minus this replica), and whether requests
    /// are served.
    pub(crate) fn clock_state(&self) -> (Option<i64>, bool) {
        use std::sync::atomic::Ordering;
        let measured = self.clock.measured.load(Ordering::Relaxed);
        (measured.then(|| self.clock.offset_ms.load(Ordering::Relaxed)), !self.clock.refusing.load(Ordering::Relaxed))
    }

    /// 503 while this replica's clock is too far from the storage's.
    pub(crate) fn check_clock(&self) -> Result<()> {
        if self.clock.refusing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Unavailable(
                "this replica's clock disagrees with the storage's; it does not serve until that is fixed".into(),
            ));
        }
        Ok(())
    }

    // ---- identities and the kill switch ----

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

    // ---- authentication ----

    /// Authenticate a request: a token (checked against the connection's certificate when
    /// it is bound to one, against revocations, and resolved to policies, re-read every
    /// time), or with no token, a client certificate matching a cert role that allows
    /// direct requests.
    pub(crate) async fn authenticate(&self, token: Option<&str>, peer: &Peer) -> Result<Caller> {
        self.check_clock()?;
        peer.check_certificate()?;
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return self.authenticate_direct(peer).await;
        };
        let (claims, expired) = match self.tokens.verify_signature(token) {
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
                self.tokens.verify_signature(token).map_err(Error::Unauthenticated)?
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
        let bound_cert = claims.cnf.as_ref().and(cert).map(|c| c.sha256_hex.clone());
        self.check_token_standing(&claims, expired, bound_cert.as_deref()).await?;
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: false })
    }

    /// What a token needs besides its signature and the connection: not past its expiry
    /// unless renewed (a renewal is read once, then kept in memory until it ends), no
    /// accessor of its line revoked (its own, its parent's, its ancestors'), none of its
    /// identities revoked since it was issued. `bound_cert`: the hex SHA-256 of the
    /// certificate it is bound to.
    pub(crate) async fn check_token_standing(
        &self,
        claims: &Claims,
        expired: bool,
        bound_cert: Option<&str>,
    ) -> Result<()> {
        if expired && self.renewals.valid_until(claims).await? <= unix_now() {
            return Err(Error::Unauthenticated(AuthFailure::Expired));
        }
        for acc in std::iter::once(&claims.acc).chain(claims.par.iter()).chain(&claims.anc) {
            if self.revocations.accessor_revoked(acc).await? {
                return Err(Error::Unauthenticated(AuthFailure::Revoked));
            }
        }
        let user = claims.sub.strip_prefix("userpass:").filter(|_| claims.meth == auth::userpass::METHOD);
        let ids = identities(claims.role.as_deref(), user, bound_cert, claims.spiffe.as_deref());
        self.check_token_identities(&ids, claims).await
    }

    /// [`Core::check_token_standing`] for a token that is not the caller's (lookup,
    /// renew, revoke, lookup by accessor): its binding is taken from the token itself.
    pub(crate) async fn check_other_token(&self, claims: &Claims, expired: bool) -> Result<()> {
        use base64::Engine as _;
        let bound = match &claims.cnf {
            Some(cnf) => Some(hex::encode(
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&cnf.x5t_s256)
                    .map_err(|_| Error::Unauthenticated(AuthFailure::MalformedToken))?,
            )),
            None => None,
        };
        self.check_token_standing(claims, expired, bound.as_deref()).await
    }

    async fn authenticate_direct(&self, peer: &Peer) -> Result<Caller> {
        let cert = peer.client_cert.as_deref().ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let (name, role) =
            self.cert.direct_role(cert).await?.ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let ids = identities(Some(&name), None, Some(&cert.sha256_hex), cert.spiffe_id());
        self.admit_identities(&ids).await?;
        let now = unix_now();
        let claims = Arc::new(Claims {
            iss: self.settings.tokens.issuer.clone(),
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
            anc: Vec::new(),
            nren: true,
            attr: role.token.token_attributes.clone(),
            aud: role.token.token_audiences.clone(),
        });
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl, direct: true })
    }

    // ---- logins ----

    fn ttls(&self, outcome: &LoginOutcome) -> (u64, u64) {
        let t = &self.settings.tokens;
        let max = outcome.max_ttl.unwrap_or(t.max_ttl).min(t.max_ttl);
        let ttl = outcome.ttl.unwrap_or(t.default_ttl).min(max);
        (ttl.as_secs(), max.as_secs())
    }

    /// 429 at once if `peer`'s address is at its limit of failed logins (before a login
    /// body is read).
    pub(crate) fn check_login_source(&self, peer: &Peer) -> Result<()> {
        self.limiter.check_source(peer.ip())
    }

    /// A login through `engine`. The attempt takes its place in the rate limiter before
    /// any credential is looked at, and gives it back only when the login succeeds (check
    /// and count are one step: parallel attempts cannot get more guesses than the limit).
    /// Over mutual TLS the token is bound to the client certificate.
    pub(crate) async fn login(&self, engine: &dyn Engine, req: &mut Request) -> Result<IssuedToken> {
        self.check_clock()?;
        req.peer.check_certificate()?;
        let identity = engine.login_identity(req).await;
        let reservation = self.limiter.reserve(engine.kind(), identity.as_deref(), req.peer.ip()).await?;
        match self.login_checked(engine, req).await {
            Ok(token) => {
                reservation.succeeded();
                Ok(token)
            }
            Err(e @ Error::Unauthenticated(_)) => {
                drop(reservation);
                tracing::info!(method = engine.kind(), remote = %req.peer.remote, reason = e.audit_code(), "login failed");
                Err(e)
            }
            Err(e) => {
                reservation.not_counted();
                Err(e)
            }
        }
    }

    /// A use of a wrapping token (unwrap, lookup, rewrap). It needs no other credential,
    /// and each costs a keyed hash in the token before the store can say whether the
    /// wrapping token exists: so it takes its place in the login limiter of its source
    /// (by address, as a login that names no identity), and a token that is not valid or
    /// does not exist counts as a failed attempt. A source guessing wrapping tokens gets
    /// 429 after its limit, and never has more attempts in flight than that limit.
    pub(crate) async fn wrapping_use<T>(
        &self,
        peer: &Peer,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let reservation = self.limiter.reserve("wrapping", None, peer.ip()).await?;
        match op.await {
            Ok(v) => {
                reservation.succeeded();
                Ok(v)
            }
            Err(e @ Error::InvalidRequest(_)) => {
                drop(reservation);
                Err(e)
            }
            Err(e) => {
                reservation.not_counted();
                Err(e)
            }
        }
    }

    /// An unknown role in the short login form: a failed attempt like any other (and
    /// answered the same).
    pub(crate) async fn unknown_role(&self, role: &str, peer: &Peer) -> Result<IssuedToken> {
        drop(self.limiter.reserve("-", Some(role), peer.ip()).await?);
        Err(Error::Unauthenticated(AuthFailure::InvalidCredentials))
    }

    async fn login_checked(&self, engine: &dyn Engine, req: &mut Request) -> Result<IssuedToken> {
        let outcome = engine.login(req).await?;
        let cert = req.peer.client_cert.as_deref();
        // From here on the credentials were right: a refusal must not say so (the
        // caller gets the generic answer; the reason goes to the logs and audit entry).
        let ids = identities(
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
                attributes: outcome.attributes,
                audiences: outcome.audiences,
            })
            .await?;
        let method = engine.kind();
        tracing::info!(method, accessor = %token.claims.acc, sub = %token.claims.sub, bound = token.claims.cnf.is_some(), "login");
        Ok(token)
    }

    /// A root token (dev mode, `operator init`, `operator root-token`).
    pub(crate) async fn issue_root_token(&self, ttl: Duration) -> Result<IssuedToken> {
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
                attributes: Default::default(),
                audiences: Vec::new(),
            })
            .await
    }

    /// How long revocation records by accessor must be kept: as long as any token lives.
    pub(crate) fn revocation_horizon(&self) -> u64 {
        unix_now().saturating_add(MAX_TOKEN_LIFETIME.max(self.settings.tokens.max_ttl).as_secs())
    }

    // ---- automatic rotation ----

    /// Start a rotation when the active master version is too old or has sealed too much.
    /// `unreported`: records sealed since the last count stored; 0 once they are counted.
    pub(crate) async fn auto_rotate(&self, unreported: &mut u64) -> Result<()> {
        let cfg = &self.settings.rotation;
        let active = self.keyring.load().master.clone();
        let key = format!("sys/rotation/encryptions/v{}", active.active.get());
        let mut count = 0;
        let newly_sealed = *unreported;
        if newly_sealed > 0 || cfg.master_max_encryptions.is_some() {
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
        // Counted: only now are they reported (a store that failed keeps them for the
        // next check, so the count a rotation is started by is not short).
        *unreported = 0;
        let too_old =
            cfg.master_max_age.is_some_and(|age| unix_now().saturating_sub(active.activated_at) > age.as_secs());
        let too_used = cfg.master_max_encryptions.is_some_and(|max| count >= max);
        if too_old || too_used {
            match self.rotation.start().await {
                Ok(v) => {
                    tracing::warn!(version = %v, too_old, too_used, "automatic master key rotation started");
                    // No request asked for it: the audit log records it as an event.
                    let entry = crate::audit::event(
                        "event",
                        serde_json::json!({"event": "master_rotation_started", "version": v.get(),
                                           "automatic": true, "too_old": too_old, "too_used": too_used}),
                    );
                    if let Err(e) = self.audit.append(entry).await {
                        tracing::error!(error = %e, "the automatic rotation's audit event was not written");
                    }
                }
                Err(Error::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Start the background work of this replica: expired-entry purges, following changes
    /// other replicas make (keyring, policies: within a second), the clock check, driving
    /// master key rotations, and automatic rotation. Returns the task handles.
    pub(crate) fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
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
                loop {
                    tick.tick().await;
                    if let Err(e) = me.sync_once().await {
                        tracing::warn!(error = %e, "following the keyring failed");
                    }
                }
            })
        };
        // Apart from the sync above: starting a rotation makes a key in the token (seconds
        // on a slow one), and the policies other replicas change must still reach this
        // one within a second meanwhile.
        let auto = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(me.settings.rotation.check_interval.max(Duration::from_secs(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                let mut seen = me.barrier.sealed_count();
                let mut unreported = 0;
                loop {
                    tick.tick().await;
                    if me.is_sealed() {
                        continue;
                    }
                    let sealed = me.barrier.sealed_count();
                    unreported += sealed - seen;
                    seen = sealed;
                    if let Err(e) = me.auto_rotate(&mut unreported).await {
                        tracing::warn!(error = %e, "automatic rotation check failed");
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
        vec![purge, sync, auto, limiter, self.rotation.spawn_driver()]
    }
}
