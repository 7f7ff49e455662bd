//! `/v1/auth/...`: logins, roles of every method, userpass users, bootstrap tokens and
//! the token lifecycle.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{data_reply, envelope, is_list, keys_reply, secret_json};
use crate::auth::bootstrap::MintRequest;
use crate::auth::kubernetes::KubeConfig;
use crate::auth::userpass::UserWrite;
use crate::auth::{approle, bootstrap, cert, kubernetes, userpass, vault_duration};
use crate::error::Error;
use crate::http::extract::{Audit, JsonBody, LoginBody, SecretBody};
use crate::http::{ApiResult, AppState, json, no_content};
use crate::token::IssuedToken;
use crate::unix_now;
use crate::vault::{Caller, Peer, token_string};

#[derive(Serialize)]
struct AuthReply<'a> {
    request_id: String,
    lease_id: &'static str,
    renewable: bool,
    lease_duration: u64,
    data: Option<()>,
    auth: AuthBlock<'a>,
}

#[derive(Serialize)]
struct AuthBlock<'a> {
    client_token: &'a str,
    accessor: &'a str,
    policies: &'a [String],
    token_policies: &'a [String],
    metadata: serde_json::Value,
    lease_duration: u64,
    renewable: bool,
    token_type: &'static str,
    orphan: bool,
    /// RFC 8705: the thumbprint of the client certificate the token is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    bound_certificate_x5t_s256: Option<&'a str>,
}

/// Record a new token's identity in the request's audit entry, then reply.
fn login_reply(audit: &Audit, peer: &Peer, t: &IssuedToken) -> ApiResult<Response> {
    crate::http::extract::record_identity(&audit.0, &t.claims, peer);
    auth_reply(t)
}

/// The login (and renewal) reply, Vault's shape.
fn auth_reply(t: &IssuedToken) -> ApiResult<Response> {
    let c = &t.claims;
    let metadata = match &c.role {
        Some(r) => serde_json::json!({ "role_name": r }),
        None => serde_json::json!({}),
    };
    let reply = AuthReply {
        request_id: crate::http::current_request_id(),
        lease_id: "",
        renewable: c.max_exp.is_some_and(|m| m > c.exp),
        lease_duration: 0,
        data: None,
        auth: AuthBlock {
            client_token: token_string(t),
            accessor: &c.acc,
            policies: &c.pol,
            token_policies: &c.pol,
            metadata,
            lease_duration: c.exp.saturating_sub(unix_now()),
            renewable: c.max_exp.is_some_and(|m| m > c.exp),
            token_type: "service",
            orphan: true,
            bound_certificate_x5t_s256: c.cnf.as_ref().map(|x| x.x5t_s256.as_str()),
        },
    };
    Ok(secret_json(StatusCode::OK, &reply, token_string(t).len())?)
}

/// `POST /v1/auth` with `{"role": ..., credentials}`.
pub async fn login_short(
    State(state): State<AppState>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    login_reply(&audit, &peer, &state.vault.login_short(&body.0, &peer).await?)
}

async fn method_login(state: &AppState, method: &str, audit: &Audit, peer: &Peer, body: &[u8]) -> ApiResult<Response> {
    login_reply(audit, peer, &state.vault.login(method, None, body, peer).await?)
}

/// `POST /v1/auth/approle/login` with `{"role_id", "secret_id"}`.
pub async fn approle_login(
    State(state): State<AppState>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    method_login(&state, approle::METHOD, &audit, &peer, &body.0).await
}

/// `POST /v1/auth/cert/login` (over mutual TLS) with optional `{"name": role}`.
pub async fn cert_login(
    State(state): State<AppState>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    method_login(&state, cert::METHOD, &audit, &peer, &body.0).await
}

/// `POST /v1/auth/kubernetes/login` with `{"role", "jwt"}`.
pub async fn kubernetes_login(
    State(state): State<AppState>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    method_login(&state, kubernetes::METHOD, &audit, &peer, &body.0).await
}

/// `POST /v1/auth/bootstrap/login` with `{"token"}`: consumes the bootstrap token.
pub async fn bootstrap_login(
    State(state): State<AppState>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    method_login(&state, bootstrap::METHOD, &audit, &peer, &body.0).await
}

/// `POST /v1/auth/userpass/login/<user>` with `{"password"}`.
pub async fn userpass_login(
    State(state): State<AppState>,
    Path(user): Path<String>,
    audit: Audit,
    peer: Peer,
    body: LoginBody,
) -> ApiResult<Response> {
    login_reply(&audit, &peer, &state.vault.login(userpass::METHOD, Some(&user), &body.0, &peer).await?)
}

/// `LIST /v1/auth/<method>/role` (approle, cert, kubernetes).
pub async fn roles(
    State(state): State<AppState>,
    Path(method): Path<String>,
    http_method: Method,
    uri: Uri,
    caller: Caller,
) -> ApiResult<Response> {
    if !is_list(&http_method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.list_roles(&caller, &method).await?))
}

/// `/v1/auth/<method>/role/<name>`: GET, POST/PUT, DELETE.
pub async fn role(
    State(state): State<AppState>,
    Path((method, name)): Path<(String, String)>,
    http_method: Method,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    role_crud(&state, &caller, &method, &name, http_method, &body.0).await
}

async fn role_crud(
    state: &AppState,
    caller: &Caller,
    method: &str,
    name: &str,
    http_method: Method,
    body: &[u8],
) -> ApiResult<Response> {
    match http_method {
        Method::GET => Ok(json(StatusCode::OK, envelope(state.vault.read_role(caller, method, name).await?))),
        Method::POST | Method::PUT => {
            state.vault.write_role(caller, method, name, body).await?;
            Ok(no_content())
        }
        Method::DELETE => {
            state.vault.delete_role(caller, method, name).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// Vault's path for cert roles: `/v1/auth/cert/certs/<name>`.
pub async fn cert_role(
    State(state): State<AppState>,
    Path(name): Path<String>,
    http_method: Method,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    role_crud(&state, &caller, cert::METHOD, &name, http_method, &body.0).await
}

/// `LIST /v1/auth/cert/certs`.
pub async fn cert_roles(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    caller: Caller,
) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.list_roles(&caller, cert::METHOD).await?))
}

/// `GET /v1/auth/approle/role/<name>/role-id`.
pub async fn approle_role_id(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
) -> ApiResult<Response> {
    let role_id = state.vault.approle_role_id(&caller, &name).await?;
    Ok(json(StatusCode::OK, envelope(serde_json::json!({ "role_id": role_id }))))
}

/// Endpoints that take no parameters still refuse unknown ones.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// `POST /v1/auth/approle/role/<name>/secret-id`: the secret id, shown once.
pub async fn approle_secret_id(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
    JsonBody(_): JsonBody<EmptyBody>,
) -> ApiResult<Response> {
    use secrecy::ExposeSecret;
    let s = state.vault.approle_secret_id(&caller, &name).await?;
    let data = serde_json::json!({
        "secret_id": s.secret_id.expose_secret(),
        "secret_id_accessor": s.accessor,
        "secret_id_ttl": s.ttl.map(|t| t.as_secs()).unwrap_or(0),
        "secret_id_num_uses": s.num_uses,
    });
    Ok(secret_json(
        StatusCode::OK,
        &serde_json::json!({"request_id": crate::http::current_request_id(), "data": data}),
        256,
    )?)
}

/// `GET /v1/auth/kubernetes/config`.
pub async fn kubernetes_config_read(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let c = state.vault.read_kubernetes_config(&caller).await?;
    data_reply(&c).map_err(Into::into)
}

/// `POST /v1/auth/kubernetes/config`.
pub async fn kubernetes_config_write(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(config): JsonBody<KubeConfig>,
) -> ApiResult<Response> {
    state.vault.write_kubernetes_config(&caller, config).await?;
    Ok(no_content())
}

/// `POST /v1/auth/bootstrap/token`: mint a one-time token (shown once).
pub async fn bootstrap_mint(State(state): State<AppState>, caller: Caller, body: SecretBody) -> ApiResult<Response> {
    let req: MintRequest =
        crate::auth::parse_body(if body.0.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body.0 })?;
    use secrecy::ExposeSecret;
    let m = state.vault.mint_bootstrap(&caller, req).await?;
    let data = serde_json::json!({
        "bootstrap_token": m.token.expose_secret(),
        "accessor": m.accessor,
        "ttl": m.ttl.as_secs(),
    });
    Ok(secret_json(
        StatusCode::OK,
        &serde_json::json!({"request_id": crate::http::current_request_id(), "data": data}),
        256,
    )?)
}

/// `LIST /v1/auth/userpass/users`.
pub async fn userpass_users(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    caller: Caller,
) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.list_users(&caller).await?))
}

/// `/v1/auth/userpass/users/<name>`: GET, POST/PUT, DELETE.
pub async fn userpass_user(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    match method {
        Method::GET => {
            let view = state.vault.read_user(&caller, &name).await?;
            data_reply(&view).map_err(Into::into)
        }
        Method::POST | Method::PUT => {
            let w: UserWrite = crate::auth::parse_body(&body.0)?;
            state.vault.write_user(&caller, &name, w).await?;
            Ok(no_content())
        }
        Method::DELETE => {
            state.vault.delete_user(&caller, &name).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// `GET /v1/auth/token/lookup-self`: the caller's token, without the token itself.
pub async fn lookup_self(caller: Caller) -> ApiResult<Response> {
    let c = caller.claims.as_ref();
    let now = unix_now();
    Ok(json(
        StatusCode::OK,
        envelope(serde_json::json!({
            "accessor": c.acc,
            "policies": c.pol,
            "display_name": c.sub,
            "meta": { "role_name": c.role },
            "path": format!("auth/{}/login", c.meth),
            "issue_time": humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.iat)).to_string(),
            "creation_time": c.iat,
            "expire_time": humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.exp)).to_string(),
            "ttl": c.exp.saturating_sub(now),
            "explicit_max_ttl": c.max_exp.map(|m| m.saturating_sub(c.iat)).unwrap_or(0),
            "renewable": !caller.direct && c.max_exp.is_some_and(|m| m > c.exp),
            "bound_certificate_x5t_s256": c.cnf.as_ref().map(|x| &x.x5t_s256),
            "spiffe_id": c.spiffe,
            "type": if caller.direct { "direct-certificate" } else { "service" },
        })),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// Requested new TTL from now (capped by the token's maximum).
    #[serde(default, with = "vault_duration")]
    increment: Option<std::time::Duration>,
}

/// `POST /v1/auth/token/renew-self`: a new token with a later expiry.
pub async fn renew_self(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<RenewBody>,
) -> ApiResult<Response> {
    auth_reply(&state.vault.renew_self(&caller, b.increment).await?)
}

/// `POST /v1/auth/token/revoke-self`.
pub async fn revoke_self(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(_): JsonBody<EmptyBody>,
) -> ApiResult<Response> {
    state.vault.revoke_self(&caller).await?;
    Ok(no_content())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AccessorBody {
    #[serde(default)]
    accessor: String,
}

/// `POST /v1/auth/token/revoke-accessor` with `{"accessor"}`.
pub async fn revoke_accessor(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(b): JsonBody<AccessorBody>,
) -> ApiResult<Response> {
    state.vault.revoke_accessor(&caller, &b.accessor).await?;
    Ok(no_content())
}
