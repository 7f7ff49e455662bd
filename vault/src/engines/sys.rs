//! `sys/`: health, policies, the kill switch, master and token-signing key rotation, the
//! audit HMAC, and the mount listings. Mounted by KeyVault itself.

use std::sync::Arc;

use async_trait::async_trait;
use keyvault_api::sys::{
    AuditHash, AuditHashRequest, CapabilitiesRequest, Health, IdentityTarget, Leader, MountInfo, PolicyList,
    PolicyRead, PolicyWrite, Retired, Revoked, Rotated, RotationStatus, SealStatus, SetAside, UiMount, UiMounts,
    UnsealRequest, WrappingLookup, WrappingToken,
};

use super::EngineKind;
use super::auth::bootstrap::Bootstrap;
use super::auth::userpass::UserPass;
use crate::auth::cert::CertAuth;
use crate::auth::revocation::Identity;
use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::keys::Family;
use crate::logical::openapi::{Answer, capability_names, schema_of};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::{Capability, ROOT_POLICY};
use crate::shared::{Core, MAX_TOKEN_LIFETIME};
use crate::unix_now;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "system",
        description: "system endpoints: health, policies, kill switch, key rotation, mounts",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: Some("sys/"),
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(Sys::new(core))),
};

/// Policy names are case-insensitive: lower case before authorization, so that the path
/// authorized is the policy written.
fn policy_name(_: Operation, p: &mut Params) -> Result<()> {
    let name = p.get("name").unwrap_or_default().to_ascii_lowercase();
    crate::policy::validate_name(&name)?;
    p.set("name", name);
    Ok(())
}

/// `sudo` and `update`, an empty body.
const fn sudo_update() -> OpSpec {
    OpSpec::write(Access::Sudo(Capability::Update)).body::<keyvault_api::Empty>()
}

/// A policy: read, write, delete.
const POLICY_OPS: &[OpSpec] = &[
    OpSpec::read(Access::Needs(Capability::Read)).data::<PolicyRead>(),
    OpSpec::write(Access::CreateOrUpdate).body::<PolicyWrite>().answers(Answer::Empty),
    OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
];

const ROUTES: &[Route] = &[
    Route::new(
        "health",
        "storage, HSM, clock, audit and seal status (no token)",
        &[OpSpec::read(Access::Public).answers(Answer::Health(schema_of::<Health>))],
    )
    .while_sealed(),
    Route::new(
        "seal-status",
        "Vault's seal status (no token)",
        &[OpSpec::read(Access::Public).answers(Answer::Bare(schema_of::<SealStatus>))],
    )
    .while_sealed(),
    Route::new(
        "seal",
        "emergency seal of this replica: sessions, key handles, PIN and caches dropped",
        &[sudo_update().answers(Answer::Empty)],
    ),
    Route::new(
        "unseal",
        "unseal this replica with the token's PIN (`key`; no token)",
        &[OpSpec::write(Access::Public).body::<UnsealRequest>().answers(Answer::Bare(schema_of::<SealStatus>))],
    )
    .while_sealed(),
    Route::new(
        "leader",
        "Vault's HA status (no token): every replica is active",
        &[OpSpec::read(Access::Public).answers(Answer::Bare(schema_of::<Leader>))],
    ),
    Route::new(
        "internal/ui/mounts",
        "the mounts, for Vault's tools",
        &[OpSpec::read(Access::AnyToken).data::<UiMounts>()],
    ),
    Route::new(
        "internal/ui/mounts/{*path}",
        "the mount serving a path (how the CLI learns a KV mount's version)",
        &[OpSpec::read(Access::AnyToken).data::<UiMount>()],
    ),
    Route::new(
        "capabilities-self",
        "the caller's capabilities on paths",
        &[OpSpec::compute(Access::AnyToken).body::<CapabilitiesRequest>().answers(Answer::Map(capability_names))],
    ),
    Route::new(
        "capabilities",
        "another token's capabilities on paths",
        &[OpSpec::compute(Access::Needs(Capability::Update))
            .body::<CapabilitiesRequest>()
            .answers(Answer::Map(capability_names))],
    ),
    // Response wrapping: the wrapping token is the credential.
    Route::new(
        "wrapping/unwrap",
        "the wrapped reply, once",
        &[OpSpec::write(Access::Public).body::<WrappingToken>().answers(Answer::Unwrapped)],
    ),
    Route::new(
        "wrapping/lookup",
        "when and where a wrapping token was made (GET: `?token=`, as Vault's agent asks)",
        &[
            OpSpec::compute(Access::Public).body::<WrappingToken>().data::<WrappingLookup>(),
            OpSpec::read(Access::Public).query::<WrappingToken>().data::<WrappingLookup>(),
        ],
    ),
    Route::new(
        "wrapping/rewrap",
        "a new wrapping token for the same reply",
        &[OpSpec::write(Access::Public).body::<WrappingToken>().answers(Answer::Wrapped)],
    ),
    Route::new(
        "wrapping/wrap",
        "wrap the body (for `X-Vault-Wrap-TTL`, default 5 minutes)",
        &[OpSpec::write(Access::Needs(Capability::Update)).any_body().answers(Answer::Wrapped)],
    ),
    // Vault's older policy endpoints, authorized as the paths they alias.
    Route::new(
        "policy",
        "list policies (Vault's older path)",
        &[
            OpSpec::read(Access::Needs(Capability::List)).data::<PolicyList>(),
            OpSpec::list(Access::Needs(Capability::List)).data::<PolicyList>(),
        ],
    )
    .policy("policies/acl/"),
    Route::new("policy/{name}", "read, write, delete a policy (Vault's older path)", POLICY_OPS)
        .policy("policies/acl/{name}")
        .normalize(policy_name)
        .names(crate::NAME_PATTERN),
    Route::new(
        "metrics",
        "metrics in Prometheus' text format (`read`, unless `telemetry.unauthenticated_metrics_access`; also at `/metrics`)",
        &[OpSpec::read(Access::Telemetry).answers(Answer::Text)],
    ),
    Route::new(
        "mounts",
        "the mounted engines (Vault's shape)",
        &[OpSpec::read(Access::Needs(Capability::Read)).answers(Answer::Map(schema_of::<MountInfo>))],
    ),
    Route::new(
        "auth",
        "the mounted auth methods (Vault's shape)",
        &[OpSpec::read(Access::Needs(Capability::Read)).answers(Answer::Map(schema_of::<MountInfo>))],
    ),
    Route::new("policies/acl", "list policies", &[OpSpec::list(Access::Needs(Capability::List)).data::<PolicyList>()]),
    Route::new("policies/acl/{name}", "read, write (`policy`: HCL or JSON), delete a policy", POLICY_OPS)
        .normalize(policy_name)
        .names(crate::NAME_PATTERN),
    Route::new(
        "revoke-identity",
        "the kill switch: revoke an identity everywhere",
        &[OpSpec::write(Access::Sudo(Capability::Update)).body::<IdentityTarget>().data::<Revoked>()],
    ),
    Route::new(
        "restore-identity",
        "lift a revocation of an identity",
        &[OpSpec::write(Access::Sudo(Capability::Update)).body::<IdentityTarget>().answers(Answer::Empty)],
    ),
    Route::new(
        "audit-hash",
        "the HMAC a value has in the audit log",
        &[OpSpec::compute(Access::Needs(Capability::Update)).body::<AuditHashRequest>().data::<AuditHash>()],
    ),
    Route::new("rotate", "start a master key rotation", &[sudo_update().data::<Rotated>()]),
    Route::new(
        "rotate/status",
        "rotation progress",
        &[OpSpec::read(Access::Needs(Capability::Read)).data::<RotationStatus>()],
    ),
    Route::new("rotate/retire", "destroy master key versions nothing uses", &[sudo_update().data::<Retired>()]),
    Route::new(
        "rotate/set-aside",
        "records a rotation set aside as damaged",
        &[OpSpec::read(Access::Needs(Capability::Read)).data::<SetAside>()],
    ),
    Route::new("rotate/token-signing", "new token-signing key", &[sudo_update().data::<Rotated>()]),
    Route::new(
        "rotate/token-signing/retire",
        "destroy token-signing versions no token needs",
        &[sudo_update().data::<Retired>()],
    ),
];

#[derive(Debug)]
pub struct Sys {
    core: Arc<Core>,
    cert: CertAuth,
    gateway: Gateway,
    bootstrap: Bootstrap,
    userpass: UserPass,
}

/// What the kill switch is asked to revoke.
enum Target {
    Identity(Identity),
    Accessor(String),
}

fn target(t: IdentityTarget) -> Result<Target> {
    let given = [
        t.role.is_some(),
        t.user.is_some(),
        t.certificate_sha256.is_some(),
        t.spiffe_id.is_some(),
        t.accessor.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(Error::invalid("give exactly one of role, user, certificate_sha256, spiffe_id, accessor"));
    }
    if let Some(r) = t.role {
        crate::validate_name("role", &r)?;
        return Ok(Target::Identity(Identity::Role(r)));
    }
    if let Some(u) = t.user {
        return Ok(Target::Identity(Identity::User(crate::auth::userpass::normalize_user(&u)?)));
    }
    if let Some(f) = t.certificate_sha256 {
        return Ok(Target::Identity(Identity::Certificate(crate::auth::cert::normalize_fingerprint(&f)?)));
    }
    if let Some(s) = t.spiffe_id {
        if s.starts_with("spiffe://") && s.len() <= 2048 && !s.chars().any(char::is_control) {
            return Ok(Target::Identity(Identity::Spiffe(s)));
        }
        return Err(Error::invalid("spiffe_id must be a spiffe:// URI"));
    }
    Ok(Target::Accessor(t.accessor.unwrap_or_default()))
}

/// The capabilities an ACL grants on each path asked about: `root` for a root token,
/// `deny` for nothing (Vault's words).
fn capabilities(acl: &crate::policy::Acl, b: keyvault_api::sys::CapabilitiesRequest) -> Result<Reply> {
    let mut paths = b.paths;
    paths.extend(b.path);
    if paths.is_empty() {
        return Err(Error::invalid("give `path` or `paths`"));
    }
    let mut out = keyvault_api::sys::Capabilities::new();
    for p in &paths {
        let p = p.trim_start_matches('/');
        let names: Vec<String> = if acl.is_root() {
            vec!["root".into()]
        } else {
            let caps = acl.capabilities(p).names();
            if caps.is_empty() { vec!["deny".into()] } else { caps.into_iter().map(str::to_owned).collect() }
        };
        out.insert(p.to_owned(), names);
    }
    if paths.len() == 1 {
        let only = out.values().next().cloned().unwrap_or_default();
        out.insert("capabilities".into(), only);
    }
    Reply::data(&out)
}

/// The wrapping token of a `sys/wrapping/*` request: in the body's `token`, or in
/// `X-Vault-Token` (Vault takes both).
fn wrapping_token(req: &mut Request) -> Result<zeroize::Zeroizing<String>> {
    // `GET sys/wrapping/lookup?token=...` is how Vault's agent looks a wrapped secret id up.
    let b: keyvault_api::sys::WrappingToken = if req.operation == Operation::Read { req.query()? } else { req.data()? };
    match (b.token, req.token.as_deref()) {
        (Some(t), _) => Ok(zeroize::Zeroizing::new(t.expose().to_owned())),
        (None, Some(t)) if !t.is_empty() => Ok(zeroize::Zeroizing::new(t.clone())),
        _ => Err(Error::invalid("give the wrapping token in `token` or in X-Vault-Token")),
    }
}

/// Accessors are 1-64 ASCII letters and digits.
pub(crate) fn validate_accessor(accessor: &str) -> Result<()> {
    if accessor.is_empty() || accessor.len() > 64 || !accessor.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(Error::invalid("invalid accessor"));
    }
    Ok(())
}

impl Sys {
    fn new(core: &Arc<Core>) -> Self {
        let store = core.store.clone();
        Sys {
            cert: CertAuth::new(store.clone()),
            gateway: Gateway::new(store.clone()),
            bootstrap: Bootstrap::new(store.clone(), core.keys.clone(), core.names.clone(), core.keyring.clone()),
            userpass: UserPass::new(store),
            core: core.clone(),
        }
    }

    /// Vault's seal status: never sealed unless `sys/seal` sealed this replica.
    fn seal_status(&self) -> keyvault_api::sys::SealStatus {
        keyvault_api::sys::SealStatus {
            seal_type: "pkcs11".into(),
            initialized: true,
            sealed: self.core.is_sealed(),
            t: 1,
            n: 1,
            progress: 0,
            nonce: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            build_date: String::new(),
            migration: false,
            cluster_name: "keyvault".into(),
            cluster_id: self.core.cluster_id.clone(),
            recovery_seal: false,
            storage_type: self.core.store.kind().into(),
        }
    }

    /// The mount serving a path, if the caller may do anything under it (Vault's
    /// preflight check: mounts are not listed to whoever asks).
    fn ui_mount(&self, req: &Request) -> Result<Reply> {
        let path = req.param("path").trim_matches('/').to_owned() + "/";
        let caller = req.caller()?;
        let (listing, key, prefix) = match path.strip_prefix("auth/") {
            Some(rest) => (self.core.mount_listing(true), rest.to_owned(), "auth/"),
            None => (self.core.mount_listing(false), path.clone(), ""),
        };
        let found = listing.into_iter().filter(|(m, _)| key.starts_with(m.as_str())).max_by_key(|(m, _)| m.len());
        let Some((mount, info)) = found else {
            return Err(Error::invalid(format!("no mount serves {path}")));
        };
        let full = format!("{prefix}{mount}");
        if !caller.acl.is_root() && caller.acl.capabilities(path.trim_end_matches('/')).names().is_empty() {
            let any_under = caller.acl.grants_under(&full);
            if !any_under {
                return Err(Error::PermissionDenied);
            }
        }
        Reply::data(&keyvault_api::sys::UiMount { path: full, info })
    }

    /// `GET /v1/sys/health`: 200 when storage and the HSM answer, the clock agrees with
    /// the storage's and the audit log is not failed; else 503. Status words only: the
    /// reasons are logged, not told to an unauthenticated caller.
    async fn health(&self) -> Result<Reply> {
        let core = &self.core;
        let storage = match core.store.ping().await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "health: storage check failed");
                "unavailable"
            }
        };
        let active = core.barrier.active_version();
        let label = core.names.master(active);
        let shown = label.clone();
        let hsm = if core.is_sealed() {
            "sealed"
        } else {
            match crate::hsm_call(&core.keys, move |k| k.exists(&label)).await {
                Ok(true) => "ok",
                Ok(false) => {
                    tracing::error!(key = %shown, "health: the active master key is missing from the HSM");
                    "key_missing"
                }
                Err(e) => {
                    tracing::warn!(error = %e, "health: HSM check failed");
                    "unavailable"
                }
            }
        };
        let (clock_offset_ms, clock_ok) = core.clock_state();
        let audit = core.audit.health();
        let audit_ok = audit.state != crate::audit::AuditState::Failed;
        let ok = storage == "ok" && hsm == "ok" && clock_ok && audit_ok;
        let health = Health {
            initialized: true,
            sealed: hsm == "sealed",
            standby: false,
            version: env!("CARGO_PKG_VERSION").into(),
            storage: storage.into(),
            hsm: hsm.into(),
            clock: if clock_ok { "ok" } else { "offset_too_large" }.into(),
            clock_offset_ms,
            missing_key_errors: crate::error::MISSING_KEY_ERRORS.load(std::sync::atomic::Ordering::Relaxed),
            audit: audit.state.name().into(),
            audit_failed_writes: audit.failed_writes,
            audit_refused_entries: audit.refused_entries,
            audit_waiting_entries: audit.waiting_entries,
            master_key_version: active.get(),
            server_time_utc: unix_now(),
            replication_performance_mode: "disabled".into(),
            replication_dr_mode: "disabled".into(),
            cluster_name: "keyvault".into(),
            cluster_id: core.cluster_id.clone(),
        };
        Ok(Reply::bare(&health)?.status(if ok { 200 } else { 503 }))
    }

    /// Revoke an identity everywhere at once: its tokens (every one issued so far, on
    /// every replica, whatever the clocks say), its logins and direct requests (until
    /// restored), its certificate pins and gateway producers. A role or user that does
    /// not exist is 404. Or, for an accessor: the token(s) with it, every token issued from
    /// it (a bootstrap token's login), and the bootstrap token itself if still unused.
    async fn revoke_identity(&self, req: &mut Request) -> Result<Reply> {
        let by = req.caller()?.claims.acc.clone();
        let (described, generation) = match target(req.data()?)? {
            Target::Identity(identity) => {
                self.identity_exists(&identity).await?;
                let generation = self.core.revocations.revoke_identity(&identity, &by).await?;
                // After the atomic step above (which already refuses everything of this
                // identity), tidy up: certificate pins and gateway producers.
                let producers = match &identity {
                    Identity::Certificate(fp) => {
                        // Both tidy-ups run, whatever the first one's outcome.
                        let roles = self.cert.remove_pin(fp).await;
                        let producers = self.gateway.disable_matching(Some(fp), None).await;
                        tracing::info!(roles = roles?, "certificate pin removed from cert roles");
                        producers?
                    }
                    Identity::Spiffe(id) => self.gateway.disable_matching(None, Some(id)).await?,
                    Identity::Role(_) | Identity::User(_) => 0,
                };
                if producers > 0 {
                    tracing::info!(producers, "gateway producers disabled");
                }
                tracing::warn!(identity = %identity.describe(), generation, by = %by, "identity revoked (kill switch)");
                (identity.describe(), Some(generation))
            }
            Target::Accessor(accessor) => {
                validate_accessor(&accessor)?;
                self.core.revocations.revoke_accessor(&accessor, self.core.revocation_horizon()).await?;
                let unused = self.bootstrap.revoke_accessor(&accessor).await?;
                tracing::warn!(accessor, unused_bootstrap_tokens = unused, by = %by, "accessor revoked (kill switch)");
                (format!("accessor {accessor}"), None)
            }
        };
        req.audit_detail(format!("kill switch: revoked {described} (generation {generation:?})"));
        Reply::data(&Revoked { identity: described, generation, revoked_at: unix_now() })
    }

    /// 404 for a role or user this installation does not know (certificates and SPIFFE
    /// IDs come from the PKI and may be revoked before they are ever seen).
    async fn identity_exists(&self, identity: &Identity) -> Result<()> {
        match identity {
            Identity::Role(r) if crate::auth::role_method(self.core.store.as_ref(), r).await?.is_none() => {
                Err(Error::NotFound(format!("no role {r} in any auth method")))
            }
            Identity::User(u) if self.userpass.current(u).await?.is_none() => {
                Err(Error::NotFound(format!("no userpass user {u}")))
            }
            _ => Ok(()),
        }
    }

    async fn restore_identity(&self, req: &mut Request) -> Result<Reply> {
        let identity = match target(req.data()?)? {
            Target::Identity(i) => i,
            Target::Accessor(_) => {
                return Err(Error::invalid("an accessor cannot be restored; issue a new credential"));
            }
        };
        if !self.core.revocations.restore_identity(&identity).await? {
            return Err(Error::NotFound(format!("{} is not revoked", identity.describe())));
        }
        let by = &req.caller()?.claims.acc;
        tracing::warn!(identity = %identity.describe(), by = %by, "identity restored");
        req.audit_detail(format!("restored {}", identity.describe()));
        Ok(Reply::empty())
    }

    /// New token-signing key; tokens signed by older keys stay valid until they expire.
    async fn rotate_token_signing(&self, req: &mut Request) -> Result<Reply> {
        req.data::<keyvault_api::Empty>()?;
        let core = &self.core;
        let ring = core.keyring.add_version(&core.keys, &core.names, Family::TokenSigning).await?;
        core.tokens.sync_public_keys().await?;
        let v = ring.token_signing.active.get();
        req.audit_detail(format!("token-signing key v{v} active"));
        Reply::data(&Rotated { version: v })
    }

    /// Retire token-signing versions older than the active one, once every token they
    /// signed has expired (the active version has been in use longer than any token lives).
    async fn retire_token_signing(&self, req: &mut Request) -> Result<Reply> {
        req.data::<keyvault_api::Empty>()?;
        let core = &self.core;
        let retired =
            crate::keys::retiring_alone(&core.store, Family::TokenSigning, self.retire_token_signing_claimed()).await?;
        req.audit_detail(format!("token-signing versions retired: {retired:?}"));
        Reply::data(&Retired { retired })
    }

    async fn retire_token_signing_claimed(&self) -> Result<Vec<u32>> {
        let core = &self.core;
        core.keyring.finish_retiring(&core.keys, &core.names, Family::TokenSigning).await?;
        // Decide on the keyring as stored: another replica may have made a newer version
        // active less than a sync ago, and its predecessor signed tokens until then.
        core.keyring.follow().await?;
        let fam = core.keyring.load().token_signing.clone();
        let lifetime = MAX_TOKEN_LIFETIME.max(core.settings.tokens.max_ttl).as_secs();
        let since = unix_now().saturating_sub(fam.activated_at);
        if since < lifetime {
            return Err(Error::Conflict(format!(
                "tokens signed by older keys may live {} s more; retire after that",
                lifetime - since
            )));
        }
        let mut retired = Vec::new();
        for v in fam.versions.iter().copied().filter(|v| *v != fam.active) {
            if core.keyring.retire_version(&core.keys, &core.names, Family::TokenSigning, v).await? {
                retired.push(v.get());
            }
        }
        core.tokens.sync_public_keys().await?;
        Ok(retired)
    }
}

#[async_trait]
impl Engine for Sys {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.core.policies.raw(req.param("name")).await
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let core = &self.core;
        let name = req.param("name").to_owned();
        match (req.route.pattern, req.operation) {
            ("health", _) => self.health().await,
            ("metrics", _) => {
                let format = form_urlencoded::parse(req.query.as_bytes()).find(|(k, _)| k == "format").map(|(_, v)| v);
                if format.is_some_and(|f| f != "prometheus") {
                    return Err(Error::invalid("only `format=prometheus` is served (the default)"));
                }
                Ok(Reply::text(crate::metrics::get().encode().into_bytes()))
            }
            ("mounts", _) => Reply::data(&core.mount_listing(false)),
            ("auth", _) => Reply::data(&core.mount_listing(true)),
            ("policies/acl" | "policy", _) => {
                let names = core.policies.list().await?;
                Reply::data(&PolicyList { keys: names.clone(), policies: names })
            }
            ("seal-status", _) => Reply::bare(&self.seal_status()),
            ("seal", _) => {
                req.data::<keyvault_api::Empty>()?;
                core.seal().await;
                req.audit_detail("this replica was sealed".into());
                Ok(Reply::empty())
            }
            ("unseal", _) => {
                let b: keyvault_api::sys::UnsealRequest = req.data()?;
                if let Some(pin) = b.key {
                    core.unseal(pin.into_secret()).await?;
                } else if core.is_sealed() && !b.reset {
                    return Err(Error::invalid("give the token's user PIN in `key`"));
                }
                Reply::bare(&self.seal_status())
            }
            ("wrapping/unwrap", _) => {
                let token = wrapping_token(req)?;
                let (reply, accessor) = core.wrapping_use(&req.peer, core.wrapping.unwrap(&token)).await?;
                req.audit_detail(format!("wrapped reply unwrapped (wrapping token accessor {accessor})"));
                Ok(Reply {
                    status: 200,
                    body: crate::logical::ReplyBody::Bare(reply),
                    extra: Vec::new(),
                    warnings: Vec::new(),
                })
            }
            ("wrapping/lookup", _) => {
                let token = wrapping_token(req)?;
                let l = core.wrapping_use(&req.peer, core.wrapping.lookup(&token)).await?;
                Reply::data(&keyvault_api::sys::WrappingLookup {
                    creation_path: l.creation_path,
                    creation_time: humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(l.creation_time),
                    )
                    .to_string(),
                    creation_ttl: l.ttl,
                })
            }
            ("wrapping/rewrap", _) => {
                let token = wrapping_token(req)?;
                let info = core.wrapping_use(&req.peer, core.wrapping.rewrap(&token)).await?;
                req.audit_detail(format!("wrapped reply rewrapped (new wrapping token accessor {})", info.accessor));
                let wrap_info = keyvault_api::sys::WrapInfo {
                    token: info.token.into(),
                    accessor: info.accessor,
                    ttl: info.ttl,
                    creation_time: humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(info.creation_time),
                    )
                    .to_string(),
                    creation_path: info.creation_path,
                    wrapped_accessor: String::new(),
                };
                Reply::raw_data(zeroize::Zeroizing::new(b"null".to_vec())).extra("wrap_info", &wrap_info)
            }
            ("wrapping/wrap", _) => {
                // The body is the data; the pipeline wraps the reply.
                req.data::<std::collections::HashMap<String, serde::de::IgnoredAny>>()?;
                if req.wrap_ttl.is_none() {
                    req.wrap_ttl = Some(std::time::Duration::from_secs(300));
                }
                Ok(Reply::raw_data(req.body.clone()))
            }
            ("leader", _) => Reply::bare(&keyvault_api::sys::Leader {
                ha_enabled: false,
                is_self: false,
                active_time: "0001-01-01T00:00:00Z".into(),
                leader_address: String::new(),
                leader_cluster_address: String::new(),
                performance_standby: false,
                performance_standby_last_remote_wal: 0,
            }),
            ("internal/ui/mounts", _) => {
                // Only the mounts the token may do something under, as Vault lists them
                // (the same preflight as the one-mount form below): mount names and kinds
                // are not every token's to learn.
                let acl = &req.caller()?.acl;
                let visible = |listing: keyvault_api::sys::Mounts, prefix: &str| -> keyvault_api::sys::Mounts {
                    listing
                        .into_iter()
                        .filter(|(m, _)| acl.is_root() || acl.grants_under(&format!("{prefix}{m}")))
                        .collect()
                };
                Reply::data(&keyvault_api::sys::UiMounts {
                    secret: visible(core.mount_listing(false), ""),
                    auth: visible(core.mount_listing(true), "auth/"),
                })
            }
            ("internal/ui/mounts/{*path}", _) => self.ui_mount(req),
            ("capabilities-self", _) => {
                let b: keyvault_api::sys::CapabilitiesRequest = req.data()?;
                let acl = req.caller()?.acl.clone();
                capabilities(&acl, b)
            }
            ("capabilities", _) => {
                let mut b: keyvault_api::sys::CapabilitiesRequest = req.data()?;
                let token = b.token.take().ok_or_else(|| Error::invalid("missing field `token`"))?;
                // The same standing as any other token named in a body: signature, expiry
                // with renewals, revocation of it and its ancestors, the kill switch.
                let invalid = || Error::invalid("invalid token");
                let (claims, expired) = core.tokens.verify_signature(token.expose()).map_err(|_| invalid())?;
                match core.check_other_token(&claims, expired).await {
                    Ok(()) => {}
                    Err(Error::Unauthenticated(_)) => return Err(invalid()),
                    Err(e) => return Err(e),
                }
                let acl = core.policies.acl(&claims.pol).await?;
                capabilities(&acl, b)
            }
            ("policies/acl/{name}" | "policy/{name}", Operation::Read) => {
                let policy = if name == ROOT_POLICY {
                    String::new()
                } else {
                    let p = core.policies.get(&name).await?;
                    p.ok_or_else(|| Error::NotFound(format!("no policy {name}")))?.text.clone()
                };
                Reply::data(&PolicyRead { name, policy })
            }
            ("policies/acl/{name}" | "policy/{name}", Operation::Write) => {
                let b: PolicyWrite = req.data()?;
                let text = b.policy.ok_or_else(|| Error::invalid("missing field `policy`"))?;
                core.policies.put_if(&name, &text, req.existing.as_deref()).await?;
                Ok(Reply::empty())
            }
            ("policies/acl/{name}" | "policy/{name}", Operation::Delete) => {
                // Deleting a policy that does not exist succeeds, as in Vault.
                core.policies.delete(&name).await?;
                Ok(Reply::empty())
            }
            ("revoke-identity", _) => self.revoke_identity(req).await,
            ("restore-identity", _) => self.restore_identity(req).await,
            ("audit-hash", _) => {
                let b: AuditHashRequest = req.data()?;
                let input = b.input.ok_or_else(|| Error::invalid("missing field `input`"))?;
                Reply::data(&AuditHash { hash: core.audit.hmac(input.expose().as_bytes()) })
            }
            ("rotate", _) => {
                req.data::<keyvault_api::Empty>()?;
                let v = core.rotation.start().await?;
                req.audit_detail(format!("master key rotation to v{} started", v.get()));
                Reply::data(&Rotated { version: v.get() })
            }
            ("rotate/status", _) => Reply::data(&core.rotation.status().await?),
            ("rotate/set-aside", _) => Reply::data(&SetAside { records: core.rotation.set_aside_report().await? }),
            ("rotate/retire", _) => {
                req.data::<keyvault_api::Empty>()?;
                let retired = core.rotation.retire().await?;
                req.audit_detail(format!("master key versions retired: {retired:?}"));
                Reply::data(&Retired { retired })
            }
            ("rotate/token-signing", _) => self.rotate_token_signing(req).await,
            ("rotate/token-signing/retire", _) => self.retire_token_signing(req).await,
            _ => Err(Error::UnsupportedOperation),
        }
    }
}
