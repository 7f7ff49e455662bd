//! Request extractors with KeyVault's error shapes.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use super::AppState;
use super::error::ApiError;
use crate::audit::{AuditIdentity, AuditSlot};
use crate::error::{AuthFailure, Error};
use crate::vault::{Caller, Peer};

/// The client token of a request: `X-Vault-Token: <t>` or `Authorization: Bearer <t>`.
pub fn token_from_headers(headers: &HeaderMap) -> Result<Option<String>, Error> {
    if let Some(v) = headers.get("x-vault-token") {
        let t = v.to_str().map_err(|_| Error::Unauthenticated(AuthFailure::MalformedToken))?;
        return Ok(Some(t.trim().to_owned()));
    }
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| Error::Unauthenticated(AuthFailure::MalformedToken))?;
        let (scheme, token) = v.split_once(' ').ok_or(Error::Unauthenticated(AuthFailure::MalformedToken))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Error::Unauthenticated(AuthFailure::MalformedToken));
        }
        return Ok(Some(token.trim().to_owned()));
    }
    Ok(None)
}

/// The connection of a request (inserted by the listener; a local peer otherwise).
pub fn peer_of(parts: &Parts) -> Peer {
    parts.extensions.get::<Peer>().cloned().unwrap_or_else(Peer::local)
}

/// The connection a request came on.
impl FromRequestParts<AppState> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(peer_of(parts))
    }
}

/// An authenticated caller (401 otherwise).
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = Zeroizing::new(token_from_headers(&parts.headers)?);
        let peer = peer_of(parts);
        let slot = parts.extensions.get::<AuditSlot>().cloned();
        if let (Some(slot), Some(t)) = (&slot, token.as_deref()) {
            slot.lock().unwrap_or_else(|p| p.into_inner()).token_hmac = Some(state.audit.hmac(t.as_bytes()));
        }
        let caller = state.vault.authenticate(token.as_deref(), &peer).await?;
        if let Some(slot) = slot {
            record_identity(&slot, &caller.claims, &peer);
        }
        Ok(caller)
    }
}

/// Record who made the request in its audit slot.
pub fn record_identity(slot: &AuditSlot, claims: &crate::token::Claims, peer: &Peer) {
    let mut ctx = slot.lock().unwrap_or_else(|p| p.into_inner());
    ctx.identity = AuditIdentity {
        sub: Some(claims.sub.clone()),
        role: claims.role.clone(),
        accessor: Some(claims.acc.clone()),
        method: Some(claims.meth.clone()),
        cert_sha256: peer.client_cert.as_ref().map(|c| c.sha256_hex.clone()),
    };
}

/// The audit slot of the request (a detached one outside the router).
impl FromRequestParts<AppState> for Audit {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Audit(parts.extensions.get::<AuditSlot>().cloned().unwrap_or_default()))
    }
}

/// Handlers that learn something the audit entry should say take this.
#[derive(Debug, Clone)]
pub struct Audit(pub AuditSlot);

impl Audit {
    pub fn detail(&self, detail: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).detail = Some(detail);
    }
}

/// The raw request body, bounded by `listener.max_request_bytes` (413 beyond), held in
/// zeroizing memory because it may carry a secret or a credential.
pub struct SecretBody(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBody({} bytes)", self.0.len())
    }
}

impl FromRequest<AppState> for SecretBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_body(req, state, state.body.max).await
    }
}

/// The body of a login: refused (429) before it is read if the source address is at its
/// limit of failed logins, and at most [`crate::vault::MAX_LOGIN_BODY`] bytes (413 beyond),
/// so that no credential check, and no parse of a large body, comes before the limiter.
pub struct LoginBody(pub Zeroizing<Vec<u8>>);

impl std::fmt::Debug for LoginBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoginBody({} bytes)", self.0.len())
    }
}

impl FromRequest<AppState> for LoginBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = req.extensions().get::<Peer>().cloned().unwrap_or_else(Peer::local);
        state.vault.check_login_source(&peer)?;
        let limit = crate::vault::MAX_LOGIN_BODY.min(state.body.max);
        Ok(LoginBody(read_body(req, state, limit).await?.0))
    }
}

/// Read a body of at most `limit` bytes: 413 at once for a declared length over it
/// (HTTP/1.1 and HTTP/2 alike), 408 if it does not arrive within the body timeout, 415
/// for a media type that a browser may send across sites without asking (see
/// [`check_content_type`]).
pub async fn read_body(req: Request, state: &AppState, limit: usize) -> Result<SecretBody, ApiError> {
    check_content_type(req.headers())?;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Answer 413 at once, and read (and drop) what the client is still sending for a
        // little while: an HTTP/1.1 client that is still writing its body when the
        // connection closes sees a broken pipe instead of the reply.
        let body = req.into_body();
        let cap = limit.saturating_mul(4).min(16 * 1024 * 1024);
        tokio::spawn(drain(body, cap, state.body.timeout.min(std::time::Duration::from_secs(5))));
        return Err(Error::PayloadTooLarge { limit }.into());
    }
    let deadline = tokio::time::Instant::now() + state.body.timeout;
    // Room in the budget of bodies being received: the declared length, or the limit.
    let want = declared.map(|n| n as usize).unwrap_or(limit).div_ceil(1024).max(1);
    let want = u32::try_from(want).unwrap_or(u32::MAX);
    let _room = match tokio::time::timeout_at(deadline, state.body.budget.clone().acquire_many_owned(want)).await {
        Ok(Ok(permit)) => permit,
        _ => return Err(Error::Unavailable("too many request bodies are being received; retry later".into()).into()),
    };
    let body: Body = req.into_body();
    let read = tokio::time::timeout_at(deadline, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Err(_) => return Err(Error::RequestTimeout("the request body did not arrive in time".into()).into()),
        Ok(r) => r.map_err(|e| {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large { Error::PayloadTooLarge { limit } } else { Error::invalid("could not read the request body") }
        })?,
    };
    // Takes the allocation without copying when this is the only reference.
    Ok(SecretBody(Zeroizing::new(Vec::from(bytes))))
}

/// Read and discard up to `cap` bytes of a body within `within`.
async fn drain(body: Body, cap: usize, within: std::time::Duration) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut seen = 0usize;
    let _ = tokio::time::timeout(within, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += d.len();
            }
            if seen > cap {
                break;
            }
        }
    })
    .await;
}

/// Request bodies are JSON. A `Content-Type` that a web page can send to another site
/// without the browser asking first (`text/plain`, form and multipart bodies) is refused
/// with 415: with certificate-authenticated requests that need no token, it would let a
/// page the user visits act with the user's client certificate. Anything else that is not
/// JSON is refused as well. No `Content-Type` at all is accepted, as Vault does: the Go
/// client of the `vault`/`bao` tools sends none, and a browser cannot send a body without
/// one across sites without a preflight.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let Some(v) = headers.get(axum::http::header::CONTENT_TYPE) else { return Ok(()) };
    let v = v.to_str().map_err(|_| Error::UnsupportedMediaType("invalid Content-Type".into()))?;
    let essence = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(Error::UnsupportedMediaType(format!(
            "request bodies are JSON: send Content-Type: application/json (not {essence:?})"
        )))
    }
}

/// A JSON body deserialized into `T` (which should `deny_unknown_fields`).
pub struct JsonBody<T>(pub T);

impl<T> std::fmt::Debug for JsonBody<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonBody(<redacted>)")
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let SecretBody(bytes) = SecretBody::from_request(req, state).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        Ok(JsonBody(crate::auth::parse_body(bytes)?))
    }
}
