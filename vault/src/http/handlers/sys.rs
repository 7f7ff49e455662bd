//! `/v1/sys/...`: health and policies.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;

use super::{data_reply, envelope, is_list};
use crate::auth::revocation::Identity;
use crate::error::Error;
use crate::http::extract::{Audit, JsonBody, SecretBody};
use crate::http::{ApiResult, AppState, json, no_content};
use crate::vault::Caller;

/// `GET /v1/sys/health`: unauthenticated; 200 when storage and the HSM answer, else 503.
pub async fn health(State(state): State<AppState>) -> Response {
    let report = state.vault.health().await;
    let ok = report.storage.is_ok() && report.hsm.is_ok();
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    json(
        status,
        serde_json::json!({
            "initialized": true,
            "sealed": false,
            "standby": false,
            "version": env!("CARGO_PKG_VERSION"),
            "storage": show(&report.storage),
            "hsm": show(&report.hsm),
            "master_key_version": report.master_version,
            "server_time_utc": crate::unix_now(),
        }),
    )
}

/// `LIST /v1/sys/policies/acl`.
pub async fn policies_root(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    caller: Caller,
) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    let names = state.vault.list_policies(&caller).await?;
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "keys": names, "policies": names }))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    #[serde(default)]
    policy: Option<String>,
}

/// `/v1/sys/policies/acl/<name>`: GET, PUT/POST `{"policy": "..."}`, DELETE.
pub async fn policy(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    caller: Caller,
    JsonBody(body): JsonBody<PolicyBody>,
) -> ApiResult<Response> {
    match method {
        Method::GET => {
            let text = state.vault.read_policy(&caller, &name).await?;
            Ok(json(StatusCode::OK, envelope(serde_json::json!({ "name": name, "policy": text }))))
        }
        Method::PUT | Method::POST => {
            let text = body.policy.ok_or_else(|| Error::invalid("missing field `policy`"))?;
            state.vault.put_policy(&caller, &name, &text).await?;
            Ok(no_content())
        }
        Method::DELETE => {
            state.vault.delete_policy(&caller, &name).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// The body of `POST /v1/sys/revoke-identity` and `/restore-identity`: exactly one of
/// the three.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    certificate_sha256: Option<String>,
    #[serde(default)]
    spiffe_id: Option<String>,
}

impl IdentityBody {
    fn identity(self) -> Result<Identity, Error> {
        match (self.role, self.certificate_sha256, self.spiffe_id) {
            (Some(r), None, None) => {
                crate::validate_name("role", &r)?;
                Ok(Identity::Role(r))
            }
            (None, Some(f), None) => Ok(Identity::Certificate(crate::auth::cert::normalize_fingerprint(&f)?)),
            (None, None, Some(s))
                if s.starts_with("spiffe://") && s.len() <= 2048 && !s.chars().any(char::is_control) =>
            {
                Ok(Identity::Spiffe(s))
            }
            (None, None, Some(_)) => Err(Error::invalid("spiffe_id must be a spiffe:// URI")),
            _ => Err(Error::invalid("give exactly one of role, certificate_sha256, spiffe_id")),
        }
    }
}

/// `POST /v1/sys/revoke-identity` (sudo): the kill switch.
pub async fn revoke_identity(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(body): JsonBody<IdentityBody>,
) -> ApiResult<Response> {
    let identity = body.identity()?;
    let at = state.vault.revoke_identity(&caller, &identity).await?;
    audit.detail(format!("kill switch: revoked {} at {at}", identity.describe()));
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "identity": identity.describe(), "revoked_at": at }))))
}

/// `POST /v1/sys/restore-identity` (sudo): lift a revocation.
pub async fn restore_identity(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(body): JsonBody<IdentityBody>,
) -> ApiResult<Response> {
    let identity = body.identity()?;
    state.vault.restore_identity(&caller, &identity).await?;
    audit.detail(format!("restored {}", identity.describe()));
    Ok(no_content())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HashBody {
    #[serde(default)]
    input: Option<secrecy::SecretString>,
}

/// `POST /v1/sys/audit-hash` with `{"input"}`: the HMAC a value would have in this audit
/// log, to search the log for a known token or secret id without it ever being written.
pub async fn audit_hash(State(state): State<AppState>, caller: Caller, body: SecretBody) -> ApiResult<Response> {
    use secrecy::ExposeSecret;
    caller.require("sys/audit-hash", crate::policy::Capability::Update)?;
    let b: HashBody = crate::auth::parse_body(&body.0)?;
    let input = b.input.ok_or_else(|| Error::invalid("missing field `input`"))?;
    let hash = state.audit.hmac(input.expose_secret().as_bytes());
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "hash": hash }))))
}

/// `POST /v1/sys/rotate` (sudo): start a master key rotation.
pub async fn rotate(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(_): JsonBody<super::auth::EmptyBody>,
) -> ApiResult<Response> {
    let v = state.vault.rotate_master(&caller).await?;
    audit.detail(format!("master key rotation to v{} started", v.get()));
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "version": v.get() }))))
}

/// `GET /v1/sys/rotate/status`.
pub async fn rotate_status(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let s = state.vault.rotation_status(&caller).await?;
    data_reply(&s).map_err(Into::into)
}

/// `POST /v1/sys/rotate/retire` (sudo): destroy master versions nothing uses.
pub async fn rotate_retire(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(_): JsonBody<super::auth::EmptyBody>,
) -> ApiResult<Response> {
    let retired = state.vault.retire_master(&caller).await?;
    audit.detail(format!("master key versions retired: {retired:?}"));
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "retired": retired }))))
}

/// `POST /v1/sys/rotate/token-signing` (sudo).
pub async fn rotate_token_signing(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(_): JsonBody<super::auth::EmptyBody>,
) -> ApiResult<Response> {
    let v = state.vault.rotate_token_signing(&caller).await?;
    audit.detail(format!("token-signing key v{} active", v.get()));
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "version": v.get() }))))
}

/// `POST /v1/sys/rotate/token-signing/retire` (sudo).
pub async fn retire_token_signing(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(_): JsonBody<super::auth::EmptyBody>,
) -> ApiResult<Response> {
    let retired = state.vault.retire_token_signing(&caller).await?;
    audit.detail(format!("token-signing versions retired: {retired:?}"));
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "retired": retired }))))
}

/// `GET /v1/auth/jwks`: the public keys that verify KeyVault's tokens (no token needed).
pub async fn jwks(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, state.vault.tokens.jwks())
}
