//! The logical layer: every request, whatever it came over, becomes one [`Request`]
//! (operation, path, data, caller, connection facts), is authorized once by the pipeline
//! from what its route declares, and is handled by the [`Engine`] mounted at its path.
//! See docs/architecture.md ("Request pipeline").
//!
//! An engine declares its [`Route`]s: a path pattern relative to its mount, and for each
//! [`Operation`] it supports, the [`Access`] it needs. The pipeline reads only these
//! declarations to authorize; an engine never checks a capability itself (the one check
//! left to engines is [`Caller::check_grant`]: whether the policies a write *assigns* are
//! the caller's to give).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::audit::AuditSlot;
use crate::error::{AuthFailure, Error, Result};
use crate::policy::{Acl, Capability, ROOT_POLICY};
use crate::tls::ClientCert;
use crate::token::{Claims, IssuedToken};

pub mod mounts;
pub mod openapi;
pub mod render;

/// What a request does. HTTP maps onto these as Vault does: `GET` is [`Operation::Read`]
/// (or [`Operation::List`] with `?list=true`), `LIST` is [`Operation::List`], `POST` and
/// `PUT` are both [`Operation::Write`], `DELETE` is [`Operation::Delete`], `PATCH` is
/// [`Operation::Patch`] (a JSON merge patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Read,
    List,
    Write,
    Delete,
    Patch,
}

impl Operation {
    pub const ALL: [Operation; 5] =
        [Operation::Read, Operation::List, Operation::Write, Operation::Delete, Operation::Patch];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::List => "list",
            Operation::Write => "write",
            Operation::Delete => "delete",
            Operation::Patch => "patch",
        }
    }
}

/// Who may perform an operation on a route. The pipeline enforces it before the engine
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed (health, the token-verification keys).
    Public,
    /// A login: no token; the attempt is rate limited (by source and by the identity it
    /// claims) before any credential is looked at, and its body is at most
    /// [`MAX_LOGIN_BODY`] bytes.
    Login,
    /// The short login form `POST /v1/auth` `{"role": ...}`: a [`Access::Login`] to the
    /// method that owns the role.
    LoginByRole,
    /// Any valid token, no capability (the token's own lifecycle).
    AnyToken,
    /// This capability on the route's policy path.
    Needs(Capability),
    /// `create` when nothing is stored at the path, `update` when something is, decided
    /// by the engine's [`Engine::existence`] check (Vault's rule).
    CreateOrUpdate,
    /// This capability and `sudo` on the route's policy path (Vault's root-protected
    /// paths: `sudo` is needed in addition to the operation's capability, never instead).
    Sudo(Capability),
    /// `read` on the route's policy path, unless the configuration opens it to
    /// unauthenticated scrapers (`[telemetry] unauthenticated_metrics_access`, as Vault).
    Telemetry,
}

/// Where the audit intent entry of a request that may change state is written
/// (docs/architecture.md, "Audit intent").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// By the pipeline, before the handler runs (the default).
    BeforeHandler,
    /// By the handler (`Request::intent`), just before the change it makes: a request
    /// that changes nothing waits for one audit fsync, not two (a login with a secret id
    /// of unlimited uses).
    ByHandler,
    /// Never (see [`OpSpec::no_intent`]).
    Never,
}

/// One operation a route supports.
#[derive(Debug, Clone, Copy)]
pub struct OpSpec {
    pub operation: Operation,
    pub access: Access,
    /// Whether it may change stored state. Such requests get an audit intent entry
    /// where `intent` says (and change nothing if it cannot be written).
    pub changes_state: bool,
    /// Where the audit intent of a request that may change state is written.
    pub intent: Intent,
    /// The JSON body it reads (`None`: none, `{}` and `null` accepted). For the OpenAPI
    /// document (docs/openapi.yaml), which is generated from these declarations.
    pub body: Option<openapi::SchemaFn>,
    /// The query parameters it reads.
    pub query: Option<openapi::SchemaFn>,
    /// What a success answers.
    pub reply: openapi::Answer,
    /// Statuses other than 200 that may answer the same envelope and `data` as a success
    /// (a gateway verdict's status; a deleted version's metadata with 404) instead of the
    /// error body.
    pub data_also_on: &'static [&'static str],
}

impl OpSpec {
    const fn new(operation: Operation, access: Access, changes_state: bool) -> Self {
        // A listing answers names; a login answers a token (the pipeline issues it).
        let reply = match (operation, access) {
            (Operation::List, _) => openapi::Answer::Keys,
            (_, Access::Login | Access::LoginByRole) => openapi::Answer::Auth,
            _ => openapi::Answer::Undeclared,
        };
        OpSpec {
            operation,
            access,
            changes_state,
            intent: Intent::BeforeHandler,
            body: None,
            query: None,
            reply,
            data_also_on: &[],
        }
    }
    pub const fn read(access: Access) -> Self {
        Self::new(Operation::Read, access, false)
    }
    pub const fn list(access: Access) -> Self {
        Self::new(Operation::List, access, false)
    }
    /// A write that changes stored state.
    pub const fn write(access: Access) -> Self {
        Self::new(Operation::Write, access, true)
    }
    /// A write that computes and stores nothing (a transit operation, a login that
    /// consumes nothing).
    pub const fn compute(access: Access) -> Self {
        Self::new(Operation::Write, access, false)
    }
    pub const fn delete(access: Access) -> Self {
        Self::new(Operation::Delete, access, true)
    }
    pub const fn patch(access: Access) -> Self {
        Self::new(Operation::Patch, access, true)
    }

    /// Its handler records the audit intent itself, with `Request::intent`, before each
    /// state change it makes (none, for a request that changes nothing).
    pub const fn intent_by_handler(mut self) -> Self {
        self.intent = Intent::ByHandler;
        self
    }

    /// No audit intent at all: the route's only state is a replay cache, and all it
    /// decides is in the request's own entry, on disk before the reply (the gateway check).
    pub const fn no_intent(mut self) -> Self {
        self.intent = Intent::Never;
        self
    }

    /// It reads a JSON body of type `T`.
    pub const fn body<T: utoipa::ToSchema>(mut self) -> Self {
        self.body = Some(openapi::schema_of::<T>);
        self
    }

    /// It reads a JSON body of type `A` or `B` (one item or a batch).
    pub const fn body_either<A: utoipa::ToSchema, B: utoipa::ToSchema>(mut self) -> Self {
        self.body = Some(openapi::either::<A, B>);
        self
    }

    /// A success answers 200 with `A` or `B` as `data` (one item or a batch).
    pub const fn data_either<A: utoipa::ToSchema, B: utoipa::ToSchema>(mut self) -> Self {
        self.reply = openapi::Answer::Data(openapi::either::<A, B>);
        self
    }

    /// It reads a JSON body with the members of both `A` and `B`.
    pub const fn body_both<A: utoipa::ToSchema, B: utoipa::ToSchema>(mut self) -> Self {
        self.body = Some(openapi::both::<A, B>);
        self
    }

    /// A success answers 200 with the members of both `A` and `B` as `data`.
    pub const fn data_both<A: utoipa::ToSchema, B: utoipa::ToSchema>(mut self) -> Self {
        self.reply = openapi::Answer::Data(openapi::both::<A, B>);
        self
    }

    /// It reads a JSON body that is any object (a secret's fields).
    pub const fn any_body(mut self) -> Self {
        self.body = Some(openapi::any_object);
        self
    }

    /// It reads query parameters of type `T` (a struct of scalars).
    pub const fn query<T: utoipa::ToSchema>(mut self) -> Self {
        self.query = Some(openapi::schema_of::<T>);
        self
    }

    /// A success answers 200 with `T` as the envelope's `data`.
    pub const fn data<T: utoipa::ToSchema>(mut self) -> Self {
        self.reply = openapi::Answer::Data(openapi::schema_of::<T>);
        self
    }

    /// These statuses may answer the envelope with the success's `data` as well as the
    /// error body (a verdict, a deleted version).
    pub const fn data_also_on(mut self, statuses: &'static [&'static str]) -> Self {
        self.data_also_on = statuses;
        self
    }

    /// A success answers what `answer` says.
    pub const fn answers(mut self, answer: openapi::Answer) -> Self {
        self.reply = answer;
        self
    }
}

/// The parameters a route captured, after [`Route::normalize`].
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<(&'static str, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &'static str, value: String) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }
}

/// Puts a route's parameters in their one canonical form (lower-case names, parsed
/// paths) before authorization, so that the path authorized is the path acted on.
pub type Normalize = fn(Operation, &mut Params) -> Result<()>;

/// A path an engine serves, relative to its mount.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Segments separated by `/`: literals, `{name}` (one segment), and a last
    /// `{*name}` (one or more segments). `""` is the mount itself.
    pub pattern: &'static str,
    /// The policy path's pattern, when it is not `pattern` itself: transit operations are
    /// authorized on their key (`keys/{name}`), an alias on the path it is an alias of.
    pub policy: Option<&'static str>,
    pub ops: &'static [OpSpec],
    pub normalize: Option<Normalize>,
    /// One line for the docs and the route listing.
    pub summary: &'static str,
    /// Served while the replica is sealed (health, seal status, unseal); every other
    /// route is answered 503 then.
    pub while_sealed: bool,
    /// The pattern its `{name}` and `{user}` parameters follow (what `normalize` checks),
    /// for the OpenAPI document.
    pub names: Option<&'static str>,
}

impl Route {
    pub const fn new(pattern: &'static str, summary: &'static str, ops: &'static [OpSpec]) -> Self {
        Route { pattern, policy: None, ops, normalize: None, summary, while_sealed: false, names: None }
    }

    pub const fn while_sealed(mut self) -> Self {
        self.while_sealed = true;
        self
    }

    pub const fn policy(mut self, pattern: &'static str) -> Self {
        self.policy = Some(pattern);
        self
    }

    pub const fn normalize(mut self, f: Normalize) -> Self {
        self.normalize = Some(f);
        self
    }

    /// Its `{name}`/`{user}` parameters match `pattern` (the rule `normalize` enforces).
    pub const fn names(mut self, pattern: &'static str) -> Self {
        self.names = Some(pattern);
        self
    }

    pub fn op(&self, operation: Operation) -> Option<&OpSpec> {
        self.ops.iter().find(|o| o.operation == operation)
    }

    /// Match decoded path segments; the captured parameters.
    pub fn matches(&self, segments: &[String]) -> Option<Params> {
        let pattern: Vec<&'static str> =
            if self.pattern.is_empty() { Vec::new() } else { self.pattern.split('/').collect() };
        let mut params = Params::default();
        for (i, p) in pattern.iter().enumerate() {
            if let Some(name) = p.strip_prefix("{*").and_then(|n| n.strip_suffix('}')) {
                if i >= segments.len() {
                    return None;
                }
                params.set(name, segments[i..].join("/"));
                return Some(params);
            }
            let seg = segments.get(i)?;
            if let Some(name) = p.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                if seg.is_empty() {
                    return None;
                }
                params.set(name, seg.clone());
            } else if p != seg {
                return None;
            }
        }
        (pattern.len() == segments.len()).then_some(params)
    }

    /// `pattern` (or `policy`) with the parameters filled in.
    pub fn render(&self, params: &Params) -> String {
        let pattern = self.policy.unwrap_or(self.pattern);
        pattern
            .split('/')
            .map(|p| {
                let name = p.strip_prefix("{*").or_else(|| p.strip_prefix('{')).and_then(|n| n.strip_suffix('}'));
                match name {
                    Some(n) => params.get(n).unwrap_or_default().to_owned(),
                    None => p.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// The largest login body accepted (a Kubernetes service-account token is at most 16 KiB).
pub const MAX_LOGIN_BODY: usize = 64 * 1024;

/// What a successful login establishes.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Token subject: `approle:<role>`, `userpass:<user>`, `cert:<role>`, ...
    pub sub: String,
    pub method: &'static str,
    pub role: Option<String>,
    pub policies: Vec<String>,
    /// Token TTL asked for by the role (the server's default when `None`).
    pub ttl: Option<Duration>,
    /// Ceiling for this role's tokens (the server's maximum applies as well).
    pub max_ttl: Option<Duration>,
    /// The role requires the token to be bound to the client certificate of the login.
    pub bind_certificate: bool,
    pub metadata: BTreeMap<String, String>,
    /// The userpass user who logged in (an identity of the kill switch).
    pub user: Option<String>,
    /// The accessor of the one-time credential used (a bootstrap token).
    pub parent: Option<String>,
    /// The role's token attributes and audiences (the `attr` and `aud` claims).
    pub attributes: keyvault_api::auth::Attributes,
    pub audiences: Vec<String>,
}

impl LoginOutcome {
    /// The outcome of a login to role `name` of `method`.
    pub fn for_role(method: &'static str, name: &str, t: &keyvault_api::auth::TokenSettings) -> Self {
        LoginOutcome {
            sub: format!("{method}:{name}"),
            method,
            role: Some(name.to_owned()),
            policies: t.token_policies.clone(),
            ttl: t.token_ttl,
            max_ttl: t.token_max_ttl,
            bind_certificate: t.bind_certificate,
            attributes: t.token_attributes.clone(),
            audiences: t.token_audiences.clone(),
            metadata: [("role_name".to_owned(), name.to_owned())].into(),
            user: None,
            parent: None,
        }
    }
}

/// Who is on the other end of a request: the connection's address and, over mutual TLS,
/// the verified client certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: SocketAddr,
    pub client_cert: Option<Arc<ClientCert>>,
    /// The connection's standing under the listener's current CRLs and client CA
    /// bundle: a certificate revoked, or whose CA was removed, after the connection was
    /// opened is refused at its next request.
    pub trust: Option<crate::tls::ConnectionTrust>,
}

impl Peer {
    /// A peer for in-process calls (the command line, tests, benchmarks).
    pub fn local() -> Self {
        Peer { remote: SocketAddr::from(([127, 0, 0, 1], 0)), client_cert: None, trust: None }
    }

    /// 401 if the connection's client certificate has expired since the handshake, is in
    /// the current CRLs, or is no longer verified by the current client CA bundle.
    pub fn check_certificate(&self) -> Result<()> {
        if let Some(cert) = &self.client_cert
            && cert.not_after < i64::try_from(crate::unix_now()).unwrap_or(i64::MAX)
        {
            tracing::info!(cert_sha256 = %cert.sha256_hex, "request on a connection whose certificate has expired");
            return Err(Error::Unauthenticated(AuthFailure::CertificateExpired));
        }
        let (Some(cert), Some(trust)) = (&self.client_cert, &self.trust) else { return Ok(()) };
        match trust.standing(cert) {
            crate::tls::Standing::Trusted => Ok(()),
            crate::tls::Standing::Revoked => {
                tracing::info!(cert_sha256 = %cert.sha256_hex, "request on a connection whose certificate is now revoked");
                Err(Error::Unauthenticated(AuthFailure::CertificateRevoked))
            }
            crate::tls::Standing::Untrusted => {
                tracing::info!(
                    cert_sha256 = %cert.sha256_hex,
                    "request on a connection whose certificate the reloaded client CA bundle no longer trusts"
                );
                Err(Error::Unauthenticated(AuthFailure::CertificateUntrusted))
            }
        }
    }

    pub fn ip(&self) -> IpAddr {
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

    /// Fail with 403 unless the policies grant `cap` and `sudo` on `path`.
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

impl Caller {
    /// Whether this caller may hand out logins with these token settings: it must be able
    /// to grant their policies ([`Caller::check_grant`]) and their attributes and
    /// audiences ([`Caller::check_attribute_grant`]). Every request that writes a role,
    /// or makes a credential for one (an AppRole secret id), passes this: a credential is
    /// worth what its logins get.
    pub fn check_settings_grant(&self, t: &keyvault_api::auth::TokenSettings) -> Result<()> {
        self.check_grant(&t.token_policies)?;
        self.check_attribute_grant(t)
    }

    /// Whether this caller may hand out logins with any token settings at all: root, or
    /// `sudo` on every path under `sys/policies/grant/`, `sys/token-attributes/grant/` and
    /// `sys/token-attributes/audience/` ([`crate::policy::Acl::grants_all_under`]: a `*`
    /// rule over each, with no narrower rule that refuses a name). For what decides the logins of every role of a
    /// method, now and later (the Kubernetes issuer and keys): checked against the roles
    /// there are now, a caller could set the keys while no role it cannot grant exists
    /// (or delete one first) and sign logins for a role made later.
    pub fn check_any_grant(&self) -> Result<()> {
        if self.is_root() {
            return Ok(());
        }
        for p in ["sys/policies/grant/", "sys/token-attributes/grant/", "sys/token-attributes/audience/"] {
            if !self.acl.grants_all_under(p, Capability::Sudo) {
                tracing::debug!(accessor = %self.claims.acc, path = p, "a grant of everything refused");
                return Err(Error::PermissionDenied);
            }
        }
        Ok(())
    }

    /// Whether this caller may give tokens these attributes and audiences (a role write):
    /// root may; anyone else needs `sudo` on `sys/token-attributes/grant/<name>/<value>`
    /// for each value of each attribute (each element of a list; values and lists are
    /// never empty, `keyvault_api::auth::check_attributes`) and on
    /// `sys/token-attributes/audience/<audience>` for each audience. A
    /// gateway trusts what a token's attributes say (its tenant, its capabilities), so
    /// writing them is a grant, like assigning a policy, and the grant is of the value: a
    /// tenant's administrator gets `grant/tenant_id/<its tenant>`, not every tenant. Names
    /// have no `/`, so the name and the value of a path are never in doubt.
    pub fn check_attribute_grant(&self, t: &keyvault_api::auth::TokenSettings) -> Result<()> {
        use keyvault_api::auth::AttributeValue;
        if self.is_root() {
            return Ok(());
        }
        let grant = |n: &str, v: &str| format!("sys/token-attributes/grant/{n}/{v}");
        let paths = t
            .token_attributes
            .iter()
            .flat_map(|(n, v)| match v {
                AttributeValue::One(one) => vec![grant(n, one)],
                AttributeValue::Many(many) => many.iter().map(|one| grant(n, one)).collect(),
            })
            .chain(t.token_audiences.iter().map(|a| format!("sys/token-attributes/audience/{a}")));
        // An empty list (refused before this by `check_attributes`; were one to pass) needs
        // every value of its name: a grant over every path under `grant/<name>/`, as
        // [`Caller::check_any_grant`] checks it (a literal `*` path would pass a `+` rule).
        let every_value = t.token_attributes.iter().filter_map(|(n, v)| match v {
            AttributeValue::Many(many) if many.is_empty() => Some(format!("sys/token-attributes/grant/{n}/")),
            _ => None,
        });
        for p in paths {
            if !self.acl.allows(&p, Capability::Sudo) {
                tracing::debug!(accessor = %self.claims.acc, path = %p, "token attribute grant refused");
                return Err(Error::PermissionDenied);
            }
        }
        for p in every_value {
            if !self.acl.grants_all_under(&p, Capability::Sudo) {
                tracing::debug!(accessor = %self.claims.acc, path = %p, "token attribute grant refused");
                return Err(Error::PermissionDenied);
            }
        }
        Ok(())
    }
}

/// One request, as an engine sees it: authorized, its parameters normalized.
pub struct Request {
    /// The request's id (the reply's `request_id`, the audit entries').
    pub request_id: String,
    /// The request's path (decoded, without `/v1/`).
    pub path: String,
    pub operation: Operation,
    /// The mount's path (`transit/`).
    pub mount: String,
    pub route: &'static Route,
    pub params: Params,
    /// The path the request was authorized on (`transit/keys/k`).
    pub policy_path: String,
    /// The body: JSON text, `{}` when the request had none (or `null`). Zeroized on drop:
    /// it may carry a secret or a credential.
    pub body: Zeroizing<Vec<u8>>,
    /// The query string, still encoded.
    pub query: String,
    pub peer: Peer,
    /// Set for every access but [`Access::Public`] and the logins.
    pub caller: Option<Caller>,
    /// The client token the request came with (`lookup-self` returns it, as Vault does).
    pub token: Option<Zeroizing<String>>,
    /// Wrap the reply for this long (`X-Vault-Wrap-TTL`; `sys/wrapping/wrap` sets it).
    pub wrap_ttl: Option<std::time::Duration>,
    /// `Cache-Control: no-cache`: a proxied mount reads its upstream, not its cache (what
    /// `operator migrate` compares must be the upstream's own value).
    pub no_cache: bool,
    /// For [`Access::CreateOrUpdate`]: what the existence check found stored (the bytes
    /// a compare-and-swap should expect), `None` if nothing.
    pub existing: Option<Vec<u8>>,
    /// For [`Access::CreateOrUpdate`], when the caller may only update (`Some(true)`) or
    /// only create (`Some(false)`): the handler makes its change only if the thing still
    /// exists (or still does not) when the change commits. Else a change racing the
    /// check would grant what the caller does not hold (an update-only caller creating a
    /// secret deleted meanwhile; a create-only one overwriting one made meanwhile).
    pub must_exist: Option<bool>,
    /// What the audit entry of this request should say.
    pub audit: AuditSlot,
    /// Fields of the body (or query) that no endpoint reads: named in the reply.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("operation", &self.operation)
            .field("policy_path", &self.policy_path)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish_non_exhaustive()
    }
}

impl Request {
    /// A parameter the route captured (empty if the route has none of that name).
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).unwrap_or_default()
    }

    /// Record this request's audit intent, on a route declared `intent_by_handler`,
    /// before the state change that follows; an error means the change must not be made
    /// (return it). Does nothing on other routes (their intent was written before they
    /// ran) or the second time.
    pub async fn intent(&self) -> Result<()> {
        crate::audit::record_intent(&self.audit).await
    }

    /// The authenticated caller (an internal error on a route without one: a route
    /// table mistake, not a client's).
    pub fn caller(&self) -> Result<&Caller> {
        self.caller.as_ref().ok_or_else(|| Error::Internal("route handled without a caller".into()))
    }

    /// The body as `T`: strict JSON (a repeated key is an error), wrong types are errors,
    /// fields `T` does not have are named in the reply's warnings (Vault's convention).
    pub fn data<T: DeserializeOwned>(&mut self) -> Result<T> {
        parse_data(&self.body, &mut self.warnings)
    }

    /// Whether the body (a JSON object) has a member `name`.
    pub fn has_field(&self, name: &str) -> Result<bool> {
        let map: std::collections::HashMap<String, serde::de::IgnoredAny> =
            serde_json::from_slice(&self.body).map_err(|e| crate::json::json_error(&e))?;
        Ok(map.contains_key(name))
    }

    /// The query string as `T` (`list` is the pipeline's and never a warning).
    pub fn query<T: DeserializeOwned + Default>(&mut self) -> Result<T> {
        if self.query.is_empty() {
            return Ok(T::default());
        }
        let mut unknown = Vec::new();
        let pairs = form_urlencoded::parse(self.query.as_bytes());
        let de = serde_urlencoded::Deserializer::new(pairs);
        let value = serde_ignored::deserialize(de, |p| unknown.push(p.to_string()))
            .map_err(|e| Error::invalid(format!("invalid query string: {e}")))?;
        unknown.retain(|u| u != "list");
        self.warn_unknown(unknown);
        Ok(value)
    }

    fn warn_unknown(&mut self, unknown: Vec<String>) {
        if !unknown.is_empty() {
            self.warnings.push(format!("Endpoint ignored these unrecognized parameters: [{}]", unknown.join(" ")));
        }
    }

    /// What the audit entry should say this request did.
    pub fn audit_detail(&self, detail: String) {
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).detail = Some(detail);
    }
}

/// Parse a JSON body as `T`: strict (a repeated key is refused), unknown fields pushed to
/// `warnings` in Vault's words. Error messages name fields, never values (which may be
/// credentials).
pub fn parse_data<T: DeserializeOwned>(body: &[u8], warnings: &mut Vec<String>) -> Result<T> {
    crate::json::check_no_duplicate_keys(body).map_err(|e| crate::json::json_error(&e))?;
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_ignored::deserialize(&mut de, |p| unknown.push(p.to_string()))
        .map_err(|e| crate::json::json_error(&e))?;
    de.end().map_err(|e| crate::json::json_error(&e))?;
    if !unknown.is_empty() {
        warnings.push(format!("Endpoint ignored these unrecognized parameters: [{}]", unknown.join(" ")));
    }
    Ok(value)
}

/// What an engine answers.
#[derive(Debug)]
pub struct Reply {
    /// 200 unless said otherwise (a gateway check answers with its verdict's status).
    pub status: u16,
    pub body: ReplyBody,
    /// Members of the reply beside `data` (a secret's `metadata`, `wrap_info`), as JSON
    /// text (zeroized: `wrap_info` holds a token).
    pub extra: Vec<(&'static str, Zeroizing<Vec<u8>>)>,
    pub warnings: Vec<String>,
}

/// The body of a [`Reply`].
pub enum ReplyBody {
    /// Nothing: 204 (or 200 with the envelope when there are warnings, as Vault does).
    Empty,
    /// The JSON text of `data`, put in the envelope. Zeroized on drop.
    Data(Zeroizing<Vec<u8>>),
    /// The whole body, no envelope (health, the token-verification keys).
    Bare(Zeroizing<Vec<u8>>),
    /// Plain text, not JSON (the Prometheus metrics): sent as `text/plain`.
    Text(Vec<u8>),
    /// A login succeeded: the pipeline turns this into a token.
    Login(Box<LoginOutcome>),
    /// A token was issued: the `auth` block.
    Auth(Box<IssuedToken>),
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyBody::Empty => f.write_str("Empty"),
            ReplyBody::Data(d) => write!(f, "Data(<{} bytes>)", d.len()),
            ReplyBody::Bare(d) => write!(f, "Bare(<{} bytes>)", d.len()),
            ReplyBody::Text(d) => write!(f, "Text(<{} bytes>)", d.len()),
            ReplyBody::Login(_) => f.write_str("Login"),
            ReplyBody::Auth(_) => f.write_str("Auth"),
        }
    }
}

/// Serialize into a buffer reserved up front (so that it never reallocates and leaves
/// copies of a secret behind), zeroized on drop.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(4096));
    let mut probe = SizeProbe(0);
    serde_json::to_writer(&mut probe, value).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    buf.reserve(probe.0);
    serde_json::to_writer(&mut *buf, value).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    Ok(buf)
}

/// Counts the bytes written to it.
struct SizeProbe(usize);

impl std::io::Write for SizeProbe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Reply {
    fn with(body: ReplyBody) -> Self {
        Reply { status: 200, body, extra: Vec::new(), warnings: Vec::new() }
    }

    /// 200 with `data`.
    pub fn data<T: Serialize + ?Sized>(data: &T) -> Result<Self> {
        Ok(Self::with(ReplyBody::Data(to_json(data)?)))
    }

    /// 200 with `data` given as JSON text (a secret's value as it was written).
    pub fn raw_data(json: Zeroizing<Vec<u8>>) -> Self {
        Self::with(ReplyBody::Data(json))
    }

    /// 200 with `{"keys": [...]}`.
    pub fn keys(keys: Vec<String>) -> Result<Self> {
        Self::data(&keyvault_api::KeyList { keys })
    }

    /// 204.
    pub fn empty() -> Self {
        Self::with(ReplyBody::Empty)
    }

    /// The whole body, without the envelope.
    pub fn bare<T: Serialize + ?Sized>(body: &T) -> Result<Self> {
        Ok(Self::with(ReplyBody::Bare(to_json(body)?)))
    }

    /// 200 with a plain text body.
    pub fn text(body: Vec<u8>) -> Self {
        Self::with(ReplyBody::Text(body))
    }

    pub fn login(outcome: LoginOutcome) -> Self {
        Self::with(ReplyBody::Login(Box::new(outcome)))
    }

    pub fn auth(token: IssuedToken) -> Self {
        Self::with(ReplyBody::Auth(Box::new(token)))
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn extra<T: Serialize + ?Sized>(mut self, name: &'static str, value: &T) -> Result<Self> {
        self.extra.push((name, to_json(value)?));
        Ok(self)
    }
}

/// What a kind of engine is: its name (as `sys/mounts` and `sys/auth` list it: `kv`,
/// `transit`, `approle`), one line about it, and every path it serves, relative to its
/// mount.
#[derive(Debug)]
pub struct EngineInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// An auth method (mounted under `auth/`).
    pub auth: bool,
    pub routes: &'static [Route],
}

/// Something mounted at a path: the key/value store, transit, the gateway check, `sys`,
/// each auth method. One trait, implemented once per kind; the pipeline does the rest
/// (authentication, authorization, audit, Vault's conventions).
#[async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// What kind of engine this is.
    fn info(&self) -> &'static EngineInfo;

    /// The kind, as `sys/mounts` and `sys/auth` list it (`kv`, `transit`, `approle`).
    fn kind(&self) -> &'static str {
        self.info().name
    }

    /// One line for `sys/mounts` and `sys/auth`.
    fn description(&self) -> &'static str {
        self.info().description
    }

    /// Every path this engine serves, relative to its mount.
    fn routes(&self) -> &'static [Route] {
        self.info().routes
    }

    /// Options `sys/mounts` shows besides KV's `version` (a proxied mount:
    /// `upstream`, and `versions = "numbered"` where the upstream keeps them).
    fn mount_options(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// For routes with [`Access::CreateOrUpdate`]: what is stored at the request's path
    /// now (`None`: nothing; an existing entry with no bytes to compare: `Some(vec![])`).
    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        let _ = req;
        Err(Error::Internal("this engine declares no existence check".into()))
    }

    /// Serve an authorized request (every access but the logins).
    async fn handle(&self, req: &mut Request) -> Result<Reply>;

    /// Check a login's credentials (routes with [`Access::Login`]). Any wrong or unknown
    /// credential is `Unauthenticated(InvalidCredentials)`: the caller must not learn
    /// whether a role or user exists.
    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let _ = req;
        Err(Error::NotFound("this mount has no login".into()))
    }

    /// The rate limiter's notion of who a login claims to be (the user of the URL, the
    /// role of the body, ...). `None`: the source address alone.
    async fn login_identity(&self, req: &Request) -> Option<String> {
        let _ = req;
        None
    }
}

/// Tests of the route matcher.
#[cfg(test)]
mod tests {
    use super::*;

    const OPS: &[OpSpec] = &[OpSpec::read(Access::Public)];

    fn segs(p: &str) -> Vec<String> {
        if p.is_empty() { Vec::new() } else { p.split('/').map(str::to_owned).collect() }
    }

    #[test]
    fn routes_match_and_render() {
        let r = Route::new("keys/{name}", "", OPS);
        assert_eq!(r.matches(&segs("keys/a")).unwrap().get("name"), Some("a"));
        assert!(r.matches(&segs("keys")).is_none());
        assert!(r.matches(&segs("keys/a/b")).is_none());
        assert!(r.matches(&segs("keys/")).is_none(), "a parameter is never empty");
        let w = Route::new("{*path}", "", OPS);
        assert_eq!(w.matches(&segs("a/b/c")).unwrap().get("path"), Some("a/b/c"));
        assert!(w.matches(&segs("")).is_none());
        let root = Route::new("", "", OPS);
        assert!(root.matches(&segs("")).is_some());
        assert!(root.matches(&segs("x")).is_none());
        let op = Route::new("encrypt/{name}", "", OPS).policy("keys/{name}");
        let p = op.matches(&segs("encrypt/k")).unwrap();
        assert_eq!(op.render(&p), "keys/k");
    }

    #[test]
    fn unknown_fields_become_warnings_and_duplicates_stay_errors() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(default)]
            a: Option<u32>,
        }
        let mut w = Vec::new();
        let t: T = parse_data(br#"{"a": 1, "b": 2, "c": {"d": 3}}"#, &mut w).unwrap();
        assert_eq!(t.a, Some(1));
        assert_eq!(w, vec!["Endpoint ignored these unrecognized parameters: [b c]".to_owned()]);
        assert!(parse_data::<T>(br#"{"a": 1, "a": 2}"#, &mut w).is_err());
        assert!(parse_data::<T>(br#"{"a": "one"}"#, &mut w).is_err());
        assert!(parse_data::<T>(br#"{"a": 1} x"#, &mut w).is_err());
    }
}
