//! The HTTP adapter (docs/api.md): axum in, the service's pipeline, Vault-shaped replies
//! out. It owns what is HTTP's alone: methods (405), bodies (413, 415, 408), the request
//! id, the reply envelope, and the audit entries written around each request.
//!
//! There is one route, `/v1/*`: the mount table decides the rest. `GET` is a read (a
//! listing with `?list=true`), `LIST` a listing, `POST` and `PUT` the same write, `DELETE`
//! a delete.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::audit::{AuditSlot, AuditState, EntryKind};
use crate::error::{AuthFailure, Error};
use crate::logical::mounts::Resolved;
use crate::logical::render::render;
use crate::logical::{Access, MAX_LOGIN_BODY, Operation, Peer, Reply};
use crate::service::{Incoming, Service};

pub mod body;
pub mod error;
pub mod server;

pub use error::ApiError;

/// Shared state of the adapter.
#[derive(Clone, Debug)]
pub struct AppState {
    pub service: Arc<Service>,
    pub body: BodyLimits,
}

/// How request bodies are read: the largest one (413 beyond), how long it may take to
/// arrive (408 beyond), and a budget of bytes being received at once.
#[derive(Clone, Debug)]
pub struct BodyLimits {
    pub max: usize,
    pub timeout: std::time::Duration,
    /// Permits are KiB of body being received, by authenticated callers.
    pub budget: Arc<tokio::sync::Semaphore>,
    /// The room, apart, of bodies sent before anyone is known (logins, the endpoints
    /// that need no token): a quarter of the budget. Such bodies are small
    /// ([`MAX_LOGIN_BODY`]), and however many an anonymous client sends, they never take
    /// room from an authenticated caller's body.
    pub anonymous: Arc<tokio::sync::Semaphore>,
}

impl BodyLimits {
    pub fn new(max: usize, timeout: std::time::Duration, in_flight_bytes: usize) -> Self {
        let permits = (in_flight_bytes / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        BodyLimits {
            max,
            timeout,
            budget: Arc::new(tokio::sync::Semaphore::new(permits)),
            // At least one login body's worth (a small budget would otherwise leave logins
            // no room at all).
            anonymous: Arc::new(tokio::sync::Semaphore::new((permits / 4).max(MAX_LOGIN_BODY / 1024).min(permits))),
        }
    }

    pub fn from_config(l: &crate::config::ListenerConfig) -> Self {
        Self::new(l.max_request_bytes, l.body_timeout, l.max_body_bytes_in_flight)
    }
}

/// The API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/{*path}", axum::routing::any(handle))
        .route("/metrics", axum::routing::get(prometheus_path))
        .fallback(not_found)
        .with_state(state)
}

/// `/metrics`, Prometheus' default scrape path: `GET /v1/sys/metrics`, authorized and
/// audited the same way.
async fn prometheus_path(state: State<AppState>, mut req: Request) -> Response {
    *req.uri_mut() = axum::http::Uri::from_static("/v1/sys/metrics");
    handle(state, req).await
}

async fn not_found() -> Response {
    ApiError::from(Error::NotFound("no handler for this path".into())).into_response()
}

/// The client token of a request: `X-Vault-Token: <t>` or `Authorization: Bearer <t>`.
pub fn token_from_headers(headers: &HeaderMap) -> Result<Option<Zeroizing<String>>, Error> {
    if let Some(v) = headers.get("x-vault-token") {
        let t = v.to_str().map_err(|_| Error::Unauthenticated(AuthFailure::MalformedToken))?;
        return Ok(Some(Zeroizing::new(t.trim().to_owned())));
    }
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| Error::Unauthenticated(AuthFailure::MalformedToken))?;
        let (scheme, token) = v.split_once(' ').ok_or(Error::Unauthenticated(AuthFailure::MalformedToken))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Error::Unauthenticated(AuthFailure::MalformedToken));
        }
        return Ok(Some(Zeroizing::new(token.trim().to_owned())));
    }
    Ok(None)
}

/// `X-Vault-Wrap-TTL: 5m` (or seconds): wrap the reply (see [`crate::wrapping`]). Its
/// range is checked here, before the request runs: a write refused afterwards for its
/// TTL would have been made all the same.
fn wrap_ttl(headers: &HeaderMap) -> Result<Option<std::time::Duration>, Error> {
    let Some(v) = headers.get("x-vault-wrap-ttl") else { return Ok(None) };
    let text = v.to_str().map_err(|_| Error::invalid("invalid X-Vault-Wrap-TTL"))?;
    let ttl = crate::auth::parse_duration(text)?;
    // 0: no wrapping, as in Vault.
    if ttl.is_zero() {
        return Ok(None);
    }
    crate::wrapping::check_ttl(ttl)?;
    Ok(Some(ttl))
}

/// `Cache-Control: no-cache` (a directive among others, any case).
fn no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// `X-Vault-Namespace`: KeyVault has one namespace. A request meant for another one is
/// refused rather than served from the only one there is (fail closed); the root
/// namespace (empty, `root`) is this one.
fn check_namespace(headers: &HeaderMap) -> Result<(), Error> {
    let Some(v) = headers.get("x-vault-namespace") else { return Ok(()) };
    match v.to_str().map(|s| s.trim().trim_matches('/')) {
        Ok("" | "root") => Ok(()),
        _ => Err(Error::invalid("namespaces are not supported: KeyVault has only the root namespace")),
    }
}

/// Vault's mapping of methods to operations.
fn operation(method: &Method, query: &str) -> Result<Operation, ApiError> {
    let listing =
        || form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "list" && matches!(v.as_ref(), "true" | "1"));
    Ok(match method.as_str() {
        "GET" if listing() => Operation::List,
        "GET" => Operation::Read,
        "LIST" => Operation::List,
        "POST" | "PUT" => Operation::Write,
        "DELETE" => Operation::Delete,
        "PATCH" => Operation::Patch,
        _ => return Err(ApiError::MethodNotAllowed),
    })
}

/// Everything about one request, from its arrival to its audit entry: resolve it, read
/// its body within the limits, record an intent before anything that may change state
/// (fail closed: no entry, no change; or leave it to the handler, on routes declared
/// `intent_by_handler`; none on a route declared `no_intent`), run it through the
/// pipeline, write the outcome entry before the reply leaves (a reply whose entry cannot
/// be written is replaced by 503), and log method, path, status and latency (never
/// headers or bodies).
async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("request", request_id = %id);
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or_else(Peer::local);
    let slot = AuditSlot::default();
    let audit = state.service.audit().clone();
    let ctx = Ctx { id: id.clone(), operation: format!("{} (no route)", method_label(&method)), resolved: false };
    // Owes the outcome entry of a request dropped half way (its client went away) once
    // its intent was queued: an intent without an outcome would keep room reserved for
    // it for good.
    let mut owed = OwedOutcome {
        ctx,
        peer: peer.clone(),
        path: path.clone(),
        slot: slot.clone(),
        audit: audit.clone(),
        armed: true,
    };
    let outcome = run(&state, req, &peer, &slot, &mut owed.ctx).instrument(span.clone()).await;
    let mut resp = match outcome {
        Ok(reply) => render_reply(reply, &id),
        Err(e) => e.into_response(),
    };
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110: a 405 names the methods the path does answer.
        let raw = path.strip_prefix("/v1/").unwrap_or_default();
        if let Some(v) = state.service.allowed_methods(raw).and_then(|m| HeaderValue::from_str(&m).ok()) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
    }
    let (had_intent, intent_refused) = {
        let a = slot.lock().unwrap_or_else(|p| p.into_inner());
        (a.had_intent, a.intent_refused)
    };
    if intent_refused {
        // Refused before it ran because its intent could not be written: nothing happened,
        // and there is nothing more to write.
        owed.armed = false;
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        return resp;
    }
    let status = resp.status();
    let reason = resp.extensions().get::<error::AuditReason>().map(|r| r.0);
    let entry = audit_entry(&owed.ctx, &peer, &path, status, reason, &slot);
    let kind = if had_intent { EntryKind::Outcome(id.clone()) } else { EntryKind::Plain };
    let events = std::mem::take(&mut slot.lock().unwrap_or_else(|p| p.into_inner()).events);
    // Queued at the first poll of the append below: from here the outcome is not owed.
    owed.armed = false;
    let ctx = &owed.ctx;
    if let Err(e) = audit.append_with_events(events, entry, kind).await {
        span.in_scope(|| tracing::error!(error = %e, "audit entry not written: refusing the reply"));
        resp = ApiError::from(e).into_response();
    }
    // Say so when this reply's entry is not on disk yet (buffered mode, failing disk).
    if audit.health().state != AuditState::Writing {
        resp.headers_mut().insert("x-keyvault-audit", HeaderValue::from_static("degraded"));
    }
    let status = resp.status();
    // The route template, never the path (a bounded label): requests that matched no
    // route share one.
    let route = if ctx.resolved { ctx.operation.as_str() } else { "(no route)" };
    crate::metrics::get().request(route, status.as_u16(), started.elapsed());
    span.in_scope(|| {
        let micros = started.elapsed().as_micros() as u64;
        if status.is_server_error() {
            tracing::warn!(%method, path, status = status.as_u16(), micros, "request");
        } else {
            tracing::debug!(%method, path, status = status.as_u16(), micros, remote = %peer.remote, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The outcome entry of a request that is dropped (its client went away, hyper drops
/// the handler) after its intent was queued: written as `cancelled` (status 499), since
/// its change may or may not have been made. Disarmed once the request queues its own.
struct OwedOutcome {
    ctx: Ctx,
    peer: Peer,
    path: String,
    slot: AuditSlot,
    audit: Arc<crate::audit::AuditLog>,
    armed: bool,
}

impl Drop for OwedOutcome {
    fn drop(&mut self) {
        if !self.armed || !self.slot.lock().unwrap_or_else(|p| p.into_inner()).intent_queued {
            return;
        }
        let status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
        let entry = audit_entry(&self.ctx, &self.peer, &self.path, status, Some("cancelled"), &self.slot);
        self.audit.append_detached(entry, EntryKind::Outcome(self.ctx.id.clone()));
    }
}

/// Whether a browser sent the request for a web page: it names the page's origin
/// (`Origin`, sent with every request a page makes but a plain GET) or says the request
/// comes from another site (`Sec-Fetch-Site`). KeyVault has no web interface and sends
/// no CORS headers, so no page has a reason to call it; what such a request cannot have
/// is the ambient authority of the user's client certificate (a direct request, with no
/// token). A page can send a body without a `Content-Type` across sites without a
/// preflight (an `ArrayBuffer` body, `navigator.sendBeacon`), so the JSON-only rule of
/// [`body::check_content_type`] alone does not keep it out.
fn from_a_web_page(headers: &axum::http::HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    headers.contains_key(axum::http::header::ORIGIN) || site.is_some_and(|v| v != b"none" && v != b"same-origin")
}

/// A request's method as its audit entry names it: any method hyper accepts can be
/// hundreds of kilobytes long (a 405), and an audit line must stay short.
fn method_label(method: &axum::http::Method) -> &str {
    if method.as_str().len() <= 16 { method.as_str() } else { "(long method)" }
}

/// The most of a request's path an audit entry keeps (paths KeyVault serves are far
/// shorter; a longer one is cut, marked with `...`).
const AUDIT_PATH_MAX: usize = 4096;

fn audit_path(path: &str) -> String {
    if path.len() <= AUDIT_PATH_MAX {
        return path.to_owned();
    }
    let mut end = AUDIT_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

/// What the audit entry of a request needs from its handling.
struct Ctx {
    id: String,
    /// `POST /v1/transit/encrypt/{name}`.
    operation: String,
    /// Whether `operation` names a route (else the method only).
    resolved: bool,
}

async fn run(state: &AppState, req: Request, peer: &Peer, slot: &AuditSlot, ctx: &mut Ctx) -> Result<Reply, ApiError> {
    let service = &state.service;
    let query = req.uri().query().unwrap_or_default().to_owned();
    let op = operation(req.method(), &query)?;
    let raw = req.uri().path().strip_prefix("/v1/").unwrap_or_default().to_owned();
    let resolved: Resolved = service.resolve(op, &raw)?;
    ctx.operation = resolved.describe(req.method().as_str());
    ctx.resolved = true;
    let token = token_from_headers(req.headers())?;
    let wrap_ttl = wrap_ttl(req.headers())?;
    let no_cache = no_cache(req.headers());
    check_namespace(req.headers())?;
    if let Some(t) = &token {
        slot.lock().unwrap_or_else(|p| p.into_inner()).token_hmac = Some(service.audit_hmac(t.as_bytes()));
    }
    let login = matches!(resolved.spec.access, Access::Login | Access::LoginByRole);
    if login {
        // No credential check, and no parse of a large body, before the limiter.
        service.check_login_source(peer)?;
    }
    // Whoever the route needs is known before the body is read: a client with no
    // credential sends at most a small body, into room of its own (see `BodyLimits`).
    let browser = token.as_deref().is_none_or(|t| t.is_empty()) && from_a_web_page(req.headers());
    let early = service.authenticate_early(&resolved, token.as_deref().map(|t| t.as_str()), browser, peer, slot).await;
    let caller = match early {
        Ok(caller) => caller,
        Err(e) => {
            body::discard(req, &state.body);
            return Err(ApiError::NotStarted(e));
        }
    };
    let authenticated_at = std::time::Instant::now();
    let (limit, room) = match &caller {
        Some(_) => (state.body.max, &state.body.budget),
        None => (MAX_LOGIN_BODY.min(state.body.max), &state.body.anonymous),
    };
    let body = match body::read_body(req, &state.body, limit, room).await {
        Ok(body) => body,
        // No room for the body: nothing was done.
        Err(ApiError::Domain(e @ crate::error::Error::Unavailable(_))) => return Err(ApiError::NotStarted(e)),
        Err(e) => return Err(e),
    };
    // A body that took a while (up to the body timeout): the caller is authenticated
    // again, so that a revocation or a policy change made meanwhile applies, as it would
    // within a second (the time replicas take to follow each other) to any request.
    let caller = caller.filter(|_| authenticated_at.elapsed() < std::time::Duration::from_secs(1));
    if resolved.spec.changes_state && resolved.spec.intent != crate::logical::Intent::Never {
        let intent = crate::audit::event(
            "intent",
            serde_json::json!({
                "request_id": ctx.id, "remote": peer.remote.to_string(), "operation": ctx.operation,
                "path": audit_path(&format!("/v1/{raw}")),
            }),
        );
        let pending =
            crate::audit::PendingIntent { log: service.audit().clone(), request_id: ctx.id.clone(), entry: intent };
        slot.lock().unwrap_or_else(|p| p.into_inner()).pending_intent = Some(pending);
        if resolved.spec.intent == crate::logical::Intent::BeforeHandler {
            // Before the request runs at all.
            crate::audit::record_intent(slot).await?;
        }
    }
    let incoming = Incoming {
        request_id: ctx.id.clone(),
        token,
        body,
        query,
        peer: peer.clone(),
        audit: slot.clone(),
        wrap_ttl,
        no_cache,
        caller,
    };
    Ok(service.dispatch(resolved, incoming).await?)
}

/// The audit entry of one request.
fn audit_entry(
    ctx: &Ctx,
    peer: &Peer,
    path: &str,
    status: StatusCode,
    reason: Option<&str>,
    slot: &AuditSlot,
) -> serde_json::Map<String, serde_json::Value> {
    let a = slot.lock().unwrap_or_else(|p| p.into_inner());
    let outcome = match status.as_u16() {
        200..=399 => "ok",
        // The client went away before the request finished (see `OwedOutcome`).
        499 => "cancelled",
        401 | 403 | 429 => "denied",
        400..=499 => "refused",
        _ => "error",
    };
    let i = &a.identity;
    crate::audit::event(
        "request",
        serde_json::json!({
            "request_id": ctx.id,
            "remote": peer.remote.to_string(),
            "operation": ctx.operation,
            "path": audit_path(path),
            "status": status.as_u16(),
            "outcome": outcome,
            "reason": reason.map(str::to_owned).or_else(|| a.reason.clone()),
            "detail": a.detail,
            "identity": {
                "sub": i.sub, "role": i.role, "accessor": i.accessor, "method": i.method, "cert_sha256": i.cert_sha256,
            },
            "token_hmac": a.token_hmac,
        }),
    )
}

/// A reply body from zeroizing memory, as JSON, never cached.
fn json_response(status: StatusCode, buf: Zeroizing<Vec<u8>>) -> Response {
    let mut resp = Response::new(Body::from(Bytes::from_owner(ZeroizingBody(buf))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Owner handed to `Bytes::from_owner`: zeroizes the buffer when the last reference to
/// the body's bytes is dropped.
struct ZeroizingBody(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Turn a reply into HTTP: its status and the body [`render`] makes (204 for none).
fn render_reply(reply: Reply, request_id: &str) -> Response {
    if let crate::logical::ReplyBody::Text(text) = reply.body {
        let mut resp = Response::new(Body::from(text));
        *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return resp;
    }
    match render(&reply, request_id) {
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Ok(Some((code, buf))) => {
            json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), buf)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Serve `service` over TLS until SIGTERM or SIGINT: bind the configured address (port 0:
/// any free port), start the background work and the TLS file watchers, call
/// `on_listening` with the bound address, serve, then close the audit log cleanly (its
/// last entries and a final checkpoint: a cleanly stopped log verifies as complete).
pub async fn serve(
    service: Service,
    on_listening: impl FnOnce(std::net::SocketAddr, &crate::audit::AuditLog),
) -> crate::error::Result<()> {
    let listening = service
        .listener
        .as_ref()
        .ok_or_else(|| Error::Internal("this service was built for administration, not to serve".into()))?;
    let tls = listening.tls.clone();
    let config = listening.config.clone();
    let watcher = tls.spawn_watchers(std::time::Duration::from_secs(2));
    let listener = server::bind(config.address).await?;
    let addr = listener.local_addr().map_err(|e| Error::Internal(format!("listener address: {e}")))?;
    let background = service.spawn_background();
    let audit = service.audit().clone();
    let app = router(AppState { service: Arc::new(service), body: BodyLimits::from_config(&config) });
    let mut limits = server::Limits::from_config(&config);
    limits.max_connections = server::fit_file_limit(limits.max_connections);
    // Signal handlers first: a stop requested as soon as the address is announced is a
    // graceful one.
    let stop = server::shutdown_signal();
    on_listening(addr, &audit);
    let served = server::serve(listener, tls.current(), tls.trust(), app, limits, stop).await;
    for task in background {
        task.abort();
    }
    watcher.abort();
    audit.shutdown().await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit entry names a request's method and path in bounded space, whatever the
    /// client sent (hyper accepts a method of any length; a path is bounded only by the
    /// header limit).
    #[test]
    fn an_audit_entry_keeps_the_method_and_path_short() {
        let long = axum::http::Method::from_bytes("X".repeat(300_000).as_bytes()).unwrap();
        assert_eq!(method_label(&long), "(long method)");
        assert_eq!(method_label(&axum::http::Method::PATCH), "PATCH");

        let path = format!("/v1/secret/{}", "é".repeat(100_000));
        let kept = audit_path(&path);
        assert!(kept.len() <= AUDIT_PATH_MAX + 3, "{}", kept.len());
        assert!(kept.ends_with("...") && path.starts_with(kept.trim_end_matches("...")));
        assert_eq!(audit_path("/v1/secret/a"), "/v1/secret/a");
    }
}
