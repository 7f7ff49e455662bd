//! The running service and its one request pipeline. A [`Service`] is made by the
//! [`Builder`] from a configuration; every request, over HTTP or in process, goes through
//! [`Service::resolve`] (which engine, which route, which policy path) and
//! [`Service::dispatch`] (authenticate, authorize once from the route's declaration,
//! run the engine, turn a login into a token). See docs/architecture.md.

use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::audit::{AuditIdentity, AuditLog, AuditSlot};
use crate::error::{Error, Result};
use crate::logical::mounts::{MountTable, Resolved, RouteInfo};
use crate::logical::{Access, Caller, Operation, Peer, Reply, ReplyBody, Request};
use crate::policy::Capability;
use crate::token::{Claims, IssuedToken};

mod builder;

pub(crate) use crate::shared::Core;
pub use crate::shared::{MAX_TOKEN_LIFETIME, Settings};
pub use builder::{Builder, Init, describe_mounts, open_keystore, open_store};

/// What the transport knows of a request besides its operation and path.
pub struct Incoming {
    /// The request's id.
    pub request_id: String,
    /// The client token (`X-Vault-Token` or a bearer token), if any.
    pub token: Option<Zeroizing<String>>,
    /// The body as received (empty, `null`, or JSON).
    pub body: Zeroizing<Vec<u8>>,
    /// The query string, still encoded.
    pub query: String,
    pub peer: Peer,
    /// Where the request's audit entry collects what it should say.
    pub audit: AuditSlot,
    /// Wrap the reply for this long (`X-Vault-Wrap-TTL`).
    pub wrap_ttl: Option<Duration>,
    /// `Cache-Control: no-cache`: a proxied mount reads its upstream, not its cache.
    pub no_cache: bool,
    /// The caller, when the transport authenticated it before reading the body
    /// ([`Service::authenticate_early`]).
    pub(crate) caller: Option<Caller>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Incoming {
    /// An in-process request (the command line, tests).
    pub fn local(token: Option<&str>, body: &[u8]) -> Self {
        Incoming {
            request_id: uuid::Uuid::new_v4().to_string(),
            token: token.map(|t| Zeroizing::new(t.to_owned())),
            body: Zeroizing::new(body.to_vec()),
            query: String::new(),
            peer: Peer::local(),
            audit: AuditSlot::default(),
            wrap_ttl: None,
            no_cache: false,
            caller: None,
        }
    }
}

/// A running KeyVault: its engines at their mounts, and the shared core. Its state is
/// private; everything goes through the pipeline.
pub struct Service {
    core: Arc<Core>,
    mounts: Arc<MountTable>,
    /// The TLS configuration and listener settings of `keyvault server` and `dev`.
    pub(crate) listener: Option<builder::Listening>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("mounts", &self.mounts.mounts().len()).finish_non_exhaustive()
    }
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Record who made a request in its audit entry.
fn record_identity(slot: &AuditSlot, claims: &Claims, peer: &Peer) {
    let mut ctx = slot.lock().unwrap_or_else(|p| p.into_inner());
    ctx.identity = AuditIdentity {
        sub: Some(claims.sub.clone()),
        role: claims.role.clone(),
        accessor: Some(claims.acc.clone()),
        method: Some(claims.meth.clone()),
        cert_sha256: peer.client_cert.as_ref().map(|c| c.sha256_hex.clone()),
    };
}

/// What a route's access rule allows or refuses before anything of the request is read
/// (its body, or on a create-or-update route the existing value): the operation's
/// capability, sudo, and for create-or-update at least one of the two. The transport
/// asks before it reads the body ([`Service::authenticate_early`]), and [`Service::run`]
/// asks again when the request runs.
fn authorize_without_body(caller: &Caller, access: Access, policy_path: &str) -> Result<()> {
    match access {
        Access::Needs(cap) => caller.require(policy_path, cap),
        Access::Sudo(cap) => caller.require_sudo(policy_path, cap),
        Access::CreateOrUpdate if !caller.acl.allows(policy_path, Capability::Create) => {
            caller.require(policy_path, Capability::Update)
        }
        _ => Ok(()),
    }
}

/// A body that is empty, white space or `null` is `{}` (Vault's rule: `vault write -f`
/// sends `null`).
fn normalize_body(body: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    let text = body.trim_ascii();
    if text.is_empty() || text == b"null" { Zeroizing::new(b"{}".to_vec()) } else { body }
}

impl Service {
    /// The audit log (the transport writes each request's entries).
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.core.audit
    }

    /// The mount table.
    pub fn mounts(&self) -> &MountTable {
        &self.mounts
    }

    /// Every route of every mount (for the docs and the authorization tests).
    pub fn route_info(&self) -> Vec<RouteInfo> {
        self.mounts.route_info()
    }

    /// Which engine, route and policy path serve `operation` on `raw_path` (after `/v1/`,
    /// still percent-encoded).
    pub fn resolve(&self, operation: Operation, raw_path: &str) -> Result<Resolved> {
        self.mounts.resolve(operation, raw_path)
    }

    /// The methods a path answers (for the `Allow` header of a 405).
    pub fn allowed_methods(&self, raw_path: &str) -> Option<String> {
        self.mounts.allowed_methods(raw_path)
    }

    /// 429 at once if `peer` is at its limit of failed logins: the transport asks before
    /// it reads a login's body.
    pub fn check_login_source(&self, peer: &Peer) -> Result<()> {
        self.core.check_login_source(peer)
    }

    /// The HMAC of a value in this installation's audit log.
    pub fn audit_hmac(&self, value: &[u8]) -> String {
        self.core.audit.hmac(value)
    }

    /// Authenticate a request before its body is read, if its route needs a caller (a
    /// token, or a direct certificate request): a client with no credential cannot make
    /// the server hold a large body for it. `None` for the routes anyone may call (logins,
    /// health, unseal, wrapping tokens). `from_a_web_page`: a browser sent the request for
    /// a page, which is refused the ambient authority of a client certificate (a direct
    /// request): 401 as for a missing token.
    pub async fn authenticate_early(
        &self,
        resolved: &Resolved,
        token: Option<&str>,
        from_a_web_page: bool,
        peer: &Peer,
        audit: &AuditSlot,
    ) -> Result<Option<Caller>> {
        if !resolved.route.while_sealed && self.core.is_sealed() {
            return Err(crate::error::Error::Hsm(keyvault_hsm::HsmError::Sealed));
        }
        let needs_caller = match resolved.spec.access {
            Access::AnyToken | Access::Needs(_) | Access::Sudo(_) | Access::CreateOrUpdate => true,
            Access::Telemetry => !self.core.settings.telemetry.unauthenticated_metrics_access,
            Access::Public | Access::Login | Access::LoginByRole => false,
        };
        if !needs_caller {
            return Ok(None);
        }
        let token = token.filter(|t| !t.is_empty());
        if token.is_none() && from_a_web_page {
            return Err(Error::Unauthenticated(crate::error::AuthFailure::MissingToken));
        }
        let caller = self.core.authenticate(token, peer).await?;
        record_identity(audit, &caller.claims, peer);
        // What the policy can say without the body, it says now: a caller whose policies
        // do not allow the operation does not get its body read (and held) either. The
        // same checks run again when the request runs ([`Service::run`]).
        authorize_without_body(&caller, resolved.spec.access, &resolved.policy_path)?;
        Ok(Some(caller))
    }

    /// Run one resolved request: authenticate and authorize it as its route declares, run
    /// its engine, and turn a successful login into a token. Unknown body fields end up in
    /// the reply's warnings.
    pub async fn dispatch(&self, resolved: Resolved, incoming: Incoming) -> Result<Reply> {
        let Resolved { mount, route, spec, params, policy_path, path } = resolved;
        if !route.while_sealed && self.core.is_sealed() {
            return Err(crate::error::Error::Hsm(keyvault_hsm::HsmError::Sealed));
        }
        let engine = mount.engine.clone();
        let early = incoming.caller;
        let mut req = Request {
            request_id: incoming.request_id,
            path,
            operation: spec.operation,
            mount: mount.path.clone(),
            route,
            params,
            policy_path,
            body: normalize_body(incoming.body),
            query: incoming.query,
            peer: incoming.peer,
            caller: None,
            token: incoming.token,
            wrap_ttl: incoming.wrap_ttl,
            no_cache: incoming.no_cache,
            existing: None,
            must_exist: None,
            audit: incoming.audit,
            warnings: Vec::new(),
        };
        let reply = self.run(&engine, spec.access, &mut req, early).await?;
        match req.wrap_ttl {
            Some(ttl) => self.wrap(reply, ttl, &req).await,
            None => Ok(reply),
        }
    }

    /// Authorize as the route declares and run the engine (or the login).
    async fn run(
        &self,
        engine: &Arc<dyn crate::logical::Engine>,
        access: Access,
        req: &mut Request,
        early: Option<Caller>,
    ) -> Result<Reply> {
        let token = req.token.clone();
        let token = token.as_ref().map(|t| t.as_str());
        let mut early = early;
        match access {
            // Nobody is known: no reply is wrapped (as in Vault, whose unauthenticated
            // endpoints ignore the header). Wrapping costs token calls and a stored
            // record; an anonymous client must not be able to make the server spend them.
            Access::Public => req.wrap_ttl = None,
            Access::Login => {
                let issued = self.core.login(engine.as_ref(), req).await?;
                return Ok(self.login_reply(req, issued));
            }
            Access::LoginByRole => {
                let issued = self.login_by_role(req).await?;
                return Ok(self.login_reply(req, issued));
            }
            Access::AnyToken => req.caller = Some(self.authenticate(early.take(), token, req).await?),
            Access::Needs(_) => {
                let caller = self.authenticate(early.take(), token, req).await?;
                authorize_without_body(&caller, access, &req.policy_path)?;
                req.caller = Some(caller);
            }
            Access::Telemetry if self.core.settings.telemetry.unauthenticated_metrics_access => req.wrap_ttl = None,
            Access::Telemetry => {
                let caller = self.authenticate(early.take(), token, req).await?;
                caller.require(&req.policy_path, Capability::Read)?;
                req.caller = Some(caller);
            }
            Access::Sudo(_) => {
                let caller = self.authenticate(early.take(), token, req).await?;
                authorize_without_body(&caller, access, &req.policy_path)?;
                req.caller = Some(caller);
            }
            Access::CreateOrUpdate => {
                let caller = self.authenticate(early.take(), token, req).await?;
                // A caller who may do neither is refused before the existence check, which
                // reads (on a proxy mount, from the upstream, with KeyVault's credentials).
                authorize_without_body(&caller, access, &req.policy_path)?;
                req.existing = engine.existence(req).await?;
                let (cap, other) = if req.existing.is_some() {
                    (Capability::Update, Capability::Create)
                } else {
                    (Capability::Create, Capability::Update)
                };
                caller.require(&req.policy_path, cap)?;
                if !caller.acl.allows(&req.policy_path, other) {
                    req.must_exist = Some(req.existing.is_some());
                }
                req.caller = Some(caller);
            }
        }
        let mut reply = engine.handle(req).await?;
        reply.warnings.append(&mut req.warnings);
        Ok(reply)
    }

    /// Response wrapping (`X-Vault-Wrap-TTL`): the reply is sealed and stored, and the
    /// caller gets `wrap_info` with a single-use wrapping token instead (see
    /// [`crate::wrapping`]). Only a successful reply with a body is wrapped.
    async fn wrap(&self, reply: Reply, ttl: Duration, req: &Request) -> Result<Reply> {
        if reply.status != 200 {
            return Ok(reply);
        }
        let Some((_, inner)) = crate::logical::render::render(&reply, &req.request_id)? else {
            return Ok(reply);
        };
        let info = self.core.wrapping.wrap(&inner, ttl, &req.path).await?;
        req.audit_detail(format!("reply wrapped (wrapping token accessor {})", info.accessor));
        let wrap_info = keyvault_api::sys::WrapInfo {
            token: info.token.into(),
            accessor: info.accessor,
            ttl: info.ttl,
            creation_time: rfc3339(info.creation_time),
            creation_path: info.creation_path,
            wrapped_accessor: String::new(),
        };
        Reply::raw_data(Zeroizing::new(b"null".to_vec())).extra("wrap_info", &wrap_info)
    }

    /// The caller `early` if the transport authenticated it already, else authenticate.
    async fn authenticate(&self, early: Option<Caller>, token: Option<&str>, req: &Request) -> Result<Caller> {
        if let Some(caller) = early {
            return Ok(caller);
        }
        let caller = self.core.authenticate(token, &req.peer).await?;
        record_identity(&req.audit, &caller.claims, &req.peer);
        Ok(caller)
    }

    fn login_reply(&self, req: &Request, issued: IssuedToken) -> Reply {
        record_identity(&req.audit, &issued.claims, &req.peer);
        let mut reply = Reply::auth(issued);
        reply.warnings = req.warnings.clone();
        reply
    }

    /// `POST /v1/auth` `{"role": ...}`: log in to the method that owns the role.
    async fn login_by_role(&self, req: &mut Request) -> Result<IssuedToken> {
        crate::json::check_no_duplicate_keys(&req.body).map_err(|e| crate::auth::json_error(&e))?;
        let hint: keyvault_api::auth::RoleHint =
            serde_json::from_slice(&req.body).map_err(|e| crate::auth::json_error(&e))?;
        let role = hint.role.ok_or_else(|| Error::invalid("missing field `role`"))?;
        crate::validate_name("role", &role)?;
        let method = crate::auth::role_method(self.core.store.as_ref(), &role).await?;
        let mount = method.as_deref().and_then(|m| self.mounts.by_kind(m)).filter(|m| m.is_auth());
        match mount {
            Some(m) => self.core.login(m.engine.as_ref(), req).await,
            None => self.core.unknown_role(&role, &req.peer).await,
        }
    }

    /// One request in process: resolve and dispatch (the command line, `dev` set-up).
    pub async fn request(
        &self,
        operation: Operation,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> Result<Reply> {
        let resolved = self.resolve(operation, path)?;
        let body = serde_json::to_vec(body).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
        self.dispatch(resolved, Incoming::local(token, &body)).await
    }

    /// A root token (`dev`, `operator init`, `operator root-token`).
    pub async fn issue_root_token(&self, ttl: Duration) -> Result<IssuedToken> {
        self.core.issue_root_token(ttl).await
    }

    /// Start this replica's background work (purges, following other replicas, the
    /// clock check, rotations).
    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.core.spawn_background()
    }

    /// Follow other replicas' changes now (what the background work does every second).
    pub async fn sync_once(&self) -> Result<()> {
        self.core.sync_once().await
    }
}

/// The JSON of a reply's `data`, if it has one (the command line reads replies with it).
pub fn reply_data<T: serde::de::DeserializeOwned>(reply: &Reply) -> Result<T> {
    match &reply.body {
        ReplyBody::Data(d) => serde_json::from_slice(d).map_err(|e| Error::Internal(format!("reading a reply: {e}"))),
        _ => Err(Error::Internal("the reply has no data".into())),
    }
}
