//! The HTTP API (DESIGN §6), Vault-shaped, over TLS. Handlers are thin: parse, call the
//! vault (which authorizes), shape the reply.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use tracing::Instrument;

use crate::audit::{AuditLog, AuditSlot, AuditState, EntryKind};
use crate::error::Error;
use crate::vault::Vault;
use error::AuditReason;

pub mod error;
pub mod extract;
mod handlers;
pub mod server;

pub use error::ApiError;

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub vault: Arc<Vault>,
    pub audit: Arc<AuditLog>,
    pub body: BodyLimits,
}

/// How request bodies are read: the largest one (413 beyond), how long it may take to
/// arrive (408 beyond), and a budget of bytes being received at once.
#[derive(Clone, Debug)]
pub struct BodyLimits {
    pub max: usize,
    pub timeout: std::time::Duration,
    /// Permits are KiB of body being received.
    pub budget: Arc<tokio::sync::Semaphore>,
}

impl BodyLimits {
    pub fn new(max: usize, timeout: std::time::Duration, in_flight_bytes: usize) -> Self {
        let permits = (in_flight_bytes / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        BodyLimits { max, timeout, budget: Arc::new(tokio::sync::Semaphore::new(permits)) }
    }

    pub fn from_config(l: &crate::config::ListenerConfig) -> Self {
        Self::new(l.max_request_bytes, l.body_timeout, l.max_body_bytes_in_flight)
    }
}

/// What the server knows about the connection a request came on.
pub use crate::vault::Peer as ConnInfo;

/// The request id, also returned as `X-Request-Id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

tokio::task_local! {
    /// The id of the request this task serves (for reply envelopes).
    static REQUEST_ID: String;
}

/// The id of the current request (a fresh one outside a request).
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_else(|_| uuid::Uuid::new_v4().to_string())
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Every route of the API, as (path pattern, handlers by method). The authorization
/// tests walk this list, so a route added here without a row in their table fails them.
fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    use handlers::{auth, keys, secrets, sys};
    vec![
        ("/v1/sys/health", get(sys::health)),
        ("/v1/sys/policies/acl", any(sys::policies_root)),
        ("/v1/sys/policies/acl/", any(sys::policies_root)),
        ("/v1/sys/policies/acl/{name}", any(sys::policy)),
        ("/v1/sys/revoke-identity", post(sys::revoke_identity)),
        ("/v1/sys/restore-identity", post(sys::restore_identity)),
        ("/v1/sys/audit-hash", post(sys::audit_hash)),
        ("/v1/sys/rotate", post(sys::rotate)),
        ("/v1/sys/rotate/status", get(sys::rotate_status)),
        ("/v1/sys/rotate/retire", post(sys::rotate_retire)),
        ("/v1/sys/rotate/set-aside", get(sys::rotate_set_aside)),
        ("/v1/sys/rotate/token-signing", post(sys::rotate_token_signing)),
        ("/v1/sys/rotate/token-signing/retire", post(sys::retire_token_signing)),
        ("/v1/auth/jwks", get(sys::jwks)),
        ("/v1/auth", post(auth::login_short)),
        ("/v1/auth/approle/login", post(auth::approle_login)),
        ("/v1/auth/approle/role/{name}/role-id", get(auth::approle_role_id)),
        ("/v1/auth/approle/role/{name}/secret-id", post(auth::approle_secret_id).put(auth::approle_secret_id)),
        ("/v1/auth/cert/login", post(auth::cert_login)),
        ("/v1/auth/cert/certs", any(auth::cert_roles)),
        ("/v1/auth/cert/certs/{name}", any(auth::cert_role)),
        ("/v1/auth/kubernetes/login", post(auth::kubernetes_login)),
        ("/v1/auth/kubernetes/config", get(auth::kubernetes_config_read).post(auth::kubernetes_config_write)),
        ("/v1/auth/bootstrap/token", post(auth::bootstrap_mint)),
        ("/v1/auth/bootstrap/login", post(auth::bootstrap_login)),
        ("/v1/auth/{method}/role", any(auth::roles)),
        ("/v1/auth/{method}/role/", any(auth::roles)),
        ("/v1/auth/{method}/role/{name}", any(auth::role)),
        ("/v1/auth/userpass/login/{user}", post(auth::userpass_login)),
        ("/v1/auth/userpass/users", any(auth::userpass_users)),
        ("/v1/auth/userpass/users/", any(auth::userpass_users)),
        ("/v1/auth/userpass/users/{name}", any(auth::userpass_user)),
        ("/v1/auth/token/lookup-self", get(auth::lookup_self)),
        ("/v1/auth/token/renew-self", post(auth::renew_self)),
        ("/v1/auth/token/revoke-self", post(auth::revoke_self)),
        ("/v1/auth/token/revoke-accessor", post(auth::revoke_accessor)),
        ("/v1/transit/keys", any(keys::keys)),
        ("/v1/transit/keys/", any(keys::keys)),
        ("/v1/transit/keys/{name}", any(keys::key)),
        ("/v1/transit/keys/{name}/rotate", post(keys::rotate)),
        ("/v1/transit/keys/{name}/config", post(keys::config)),
        ("/v1/transit/encrypt/{name}", post(keys::encrypt)),
        ("/v1/transit/decrypt/{name}", post(keys::decrypt)),
        ("/v1/transit/rewrap/{name}", post(keys::rewrap)),
        ("/v1/transit/sign/{name}", post(keys::sign)),
        ("/v1/transit/verify/{name}", post(keys::verify)),
        ("/v1/transit/datakey/{kind}/{name}", post(keys::datakey)),
        ("/v1/gateway/producers", any(keys::producers)),
        ("/v1/gateway/producers/", any(keys::producers)),
        ("/v1/gateway/producers/{*identity}", any(keys::producer)),
        ("/v1/gateway/verify", post(keys::gateway_verify)),
        ("/v1/secret", any(secrets::root)),
        ("/v1/secret/", any(secrets::root)),
        ("/v1/secret/{*path}", any(secrets::secret)),
    ]
}

/// The path patterns of every route (for the authorization tests and the docs).
pub fn route_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(p, _)| p).collect()
}

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, handlers) in routes() {
        router = router.route(path, handlers);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_context))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError(Error::NotFound("no handler for this path".into()))
}

async fn method_not_allowed() -> ApiError {
    ApiError(Error::MethodNotAllowed)
}

/// Give every request an id and a span, write its audit entry before the reply leaves
/// (fail closed: if the entry cannot be written, the reply is replaced by 503 and its body
/// dropped), and log its outcome (method, path without query, status, latency): never
/// headers or bodies, which carry tokens and secrets.
async fn request_context(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    req.extensions_mut().insert(RequestId(id.clone()));
    let slot: AuditSlot = Default::default();
    req.extensions_mut().insert(slot.clone());
    let span = tracing::info_span!("request", request_id = %id);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let operation = match req.extensions().get::<MatchedPath>() {
        Some(m) => format!("{method} {}", m.as_str()),
        None => format!("{method} (no route)"),
    };
    let remote = req.extensions().get::<crate::vault::Peer>().map(|p| p.remote.to_string());
    let start = Instant::now();
    // A request that may change state is recorded before it runs: if that entry cannot be
    // written, nothing happens (fail closed). Reads are recorded once, with their outcome,
    // and their reply is withheld if that entry cannot be written.
    let had_intent = changes_state(&method, &operation);
    if had_intent {
        let intent = crate::audit::event(
            "intent",
            serde_json::json!({"request_id": id, "remote": remote, "operation": operation, "path": path}),
        );
        if let Err(e) = state.audit.append_kind(intent, EntryKind::Intent(id.clone())).await {
            span.in_scope(|| tracing::error!(error = %e, "audit entry not written: refusing the request"));
            let mut resp = ApiError(e).into_response();
            if let Ok(v) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert("x-request-id", v);
            }
            return resp;
        }
    }
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req).instrument(span.clone())).await;
    let status = resp.status();
    let entry =
        audit_entry(&id, remote, &operation, &path, status, resp.extensions().get::<AuditReason>().map(|r| r.0), &slot);
    let kind = if had_intent { EntryKind::Outcome(id.clone()) } else { EntryKind::Plain };
    if let Err(e) = state.audit.append_kind(entry, kind).await {
        span.in_scope(|| tracing::error!(error = %e, "audit entry not written: refusing the reply"));
        resp = ApiError(e).into_response();
    }
    // Say so when this reply's entry is not on disk yet (buffered mode, failing disk).
    if state.audit.health().state != AuditState::Writing {
        resp.headers_mut().insert("x-keyvault-audit", HeaderValue::from_static("degraded"));
    }
    let status = resp.status();
    span.in_scope(|| {
        let micros = start.elapsed().as_micros() as u64;
        if status.is_server_error() {
            tracing::warn!(%method, path, status = status.as_u16(), micros, "request");
        } else {
            tracing::debug!(%method, path, status = status.as_u16(), micros, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Whether a request may change stored state (and so gets an audit `intent` entry before
/// it runs). Reads, listings, logins and pure key operations do not; anything not listed
/// here is treated as state-changing.
fn changes_state(method: &axum::http::Method, operation: &str) -> bool {
    if matches!(method.as_str(), "GET" | "HEAD" | "LIST") {
        return false;
    }
    let route = operation.split_once(' ').map(|(_, r)| r).unwrap_or("");
    let pure = route.starts_with("/v1/transit/") && !route.starts_with("/v1/transit/keys");
    // Logins that consume nothing (a bootstrap token or an AppRole secret id with a
    // number of uses may be consumed, and are state changes like any other).
    let login = matches!(
        route,
        "/v1/auth/cert/login"
            | "/v1/auth/kubernetes/login"
            | "/v1/auth/userpass/login/{user}"
            | "/v1/auth/token/renew-self"
            | "/v1/sys/audit-hash"
    );
    !(pure || login)
}

/// The audit entry of one request.
fn audit_entry(
    id: &str,
    remote: Option<String>,
    operation: &str,
    path: &str,
    status: StatusCode,
    reason: Option<&str>,
    slot: &AuditSlot,
) -> serde_json::Map<String, serde_json::Value> {
    let ctx = slot.lock().unwrap_or_else(|p| p.into_inner());
    let outcome = match status.as_u16() {
        200..=399 => "ok",
        401 | 403 | 429 => "denied",
        400..=499 => "refused",
        _ => "error",
    };
    let i = &ctx.identity;
    let identity = serde_json::json!({
        "sub": i.sub, "role": i.role, "accessor": i.accessor, "method": i.method, "cert_sha256": i.cert_sha256,
    });
    crate::audit::event(
        "request",
        serde_json::json!({
            "request_id": id,
            "remote": remote,
            "operation": operation,
            "path": path,
            "status": status.as_u16(),
            "outcome": outcome,
            "reason": reason.map(str::to_owned).or_else(|| ctx.reason.clone()),
            "detail": ctx.detail,
            "identity": identity,
            "token_hmac": ctx.token_hmac,
        }),
    )
}

/// A JSON reply with a status.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, axum::Json(value)).into_response()
}

/// 204 No Content.
pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
