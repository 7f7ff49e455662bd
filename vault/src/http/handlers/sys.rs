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

/// `GET /v1/sys/health`: unauthenticated; 200 when storage and the HSM answer and the
/// clock agrees with the storage's, else 503. Status words only: the reasons are logged.
pub async fn health(State(state): State<AppState>) -> Response {
    let report = state.vault.health().await;
    let audit = state.audit.health();
    let audit_ok = audit.state != crate::audit::AuditState::Failed;
    let status = if report.ok() && audit_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(
        status,
        serde_json::json!({
            "initialized": true,
            "sealed": false,
            "standby": false,
            "version": env!("CARGO_PKG_VERSION"),
            "storage": report.storage,
            "hsm": report.hsm,
            "clock": if report.clock_ok { "ok" } else { "offset_too_large" },
            "clock_offset_ms": report.clock_offset_ms,
            "missing_key_errors": report.missing_key_errors,
            "audit": audit.state.name(),
            "audit_failed_writes": audit.failed_writes,
            "audit_refused_entries": audit.refused_entries,
            "audit_waiting_entries": audit.waiting_entries,
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
/// `role`, `user`, `certificate_sha256`, `spiffe_id` (and, for revoke only, `accessor`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    certificate_sha256: Option<String>,
    #[serde(default)]
    spiffe_id: Option<String>,
    #[serde(default)]
    accessor: Option<String>,
}

/// What the kill switch is asked to revoke.
enum Target {
    Identity(Identity),
    Accessor(String),
}

impl IdentityBody {
    fn target(self) -> Result<Target, Error> {
        let given = [
            self.role.is_some(),
            self.user.is_some(),
            self.certificate_sha256.is_some(),
            self.spiffe_id.is_some(),
            self.accessor.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(Error::invalid("give exactly one of role, user, certificate_sha256, spiffe_id, accessor"));
        }
        if let Some(r) = self.role {
            crate::validate_name("role", &r)?;
            return Ok(Target::Identity(Identity::Role(r)));
        }
        if let Some(u) = self.user {
            return Ok(Target::Identity(Identity::User(crate::auth::userpass::normalize_user(&u)?)));
        }
        if let Some(f) = self.certificate_sha256 {
            return Ok(Target::Identity(Identity::Certificate(crate::auth::cert::normalize_fingerprint(&f)?)));
        }
        if let Some(s) = self.spiffe_id {
            if s.starts_with("spiffe://") && s.len() <= 2048 && !s.chars().any(char::is_control) {
                return Ok(Target::Identity(Identity::Spiffe(s)));
            }
            return Err(Error::invalid("spiffe_id must be a spiffe:// URI"));
        }
        Ok(Target::Accessor(self.accessor.unwrap_or_default()))
    }

    fn identity(self) -> Result<Identity, Error> {
        match self.target()? {
            Target::Identity(i) => Ok(i),
            Target::Accessor(_) => Err(Error::invalid("an accessor cannot be restored; issue a new credential")),
        }
    }
}

/// `POST /v1/sys/revoke-identity` (update + sudo): the kill switch.
pub async fn revoke_identity(
    State(state): State<AppState>,
    audit: Audit,
    caller: Caller,
    JsonBody(body): JsonBody<IdentityBody>,
) -> ApiResult<Response> {
    let (described, generation) = match body.target()? {
        Target::Identity(identity) => {
            let g = state.vault.revoke_identity(&caller, &identity).await?;
            (identity.describe(), Some(g))
        }
        Target::Accessor(acc) => {
            state.vault.revoke_identity_accessor(&caller, &acc).await?;
            (format!("accessor {acc}"), None)
        }
    };
    audit.detail(format!("kill switch: revoked {described} (generation {generation:?})"));
    Ok(json(
        StatusCode::OK,
        envelope(serde_json::json!({
            "identity": described,
            "generation": generation,
            "revoked_at": crate::unix_now(),
        })),
    ))
}

/// `POST /v1/sys/restore-identity` (update + sudo): lift a revocation.
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

/// `GET /v1/sys/rotate/set-aside`: the records a rotation could not re-wrap.
pub async fn rotate_set_aside(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let list = state.vault.rotation_set_aside(&caller).await?;
    data_reply(&serde_json::json!({ "records": list })).map_err(Into::into)
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
