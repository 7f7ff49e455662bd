//! `/v1/auth/...`: logins, AppRole and userpass administration.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde::Serialize;

use super::{envelope, is_list, secret_json};
use crate::auth::LoginRequest;
use crate::auth::approle::{self, RoleConfig};
use crate::auth::userpass::{self, UserWrite};
use crate::error::Error;
use crate::http::extract::{JsonBody, SecretBody};
use crate::http::{ApiResult, AppState, json, no_content};
use crate::token::IssuedToken;
use crate::vault::{Caller, token_string};

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
}

/// The login reply, Vault's shape.
fn auth_reply(t: &IssuedToken) -> ApiResult<Response> {
    let c = &t.claims;
    let metadata = match &c.role {
        Some(r) => serde_json::json!({ "role_name": r }),
        None => serde_json::json!({}),
    };
    let reply = AuthReply {
        request_id: crate::http::current_request_id(),
        lease_id: "",
        renewable: false,
        lease_duration: 0,
        data: None,
        auth: AuthBlock {
            client_token: token_string(t),
            accessor: &c.acc,
            policies: &c.pol,
            token_policies: &c.pol,
            metadata,
            lease_duration: c.exp.saturating_sub(c.iat),
            renewable: false,
            token_type: "service",
            orphan: true,
        },
    };
    Ok(secret_json(StatusCode::OK, &reply, token_string(t).len())?)
}

/// `POST /v1/auth` with `{"role": ..., credentials}`.
pub async fn login_short(State(state): State<AppState>, body: SecretBody) -> ApiResult<Response> {
    let token = state.vault.login_short(&body.0).await?;
    auth_reply(&token)
}

/// `POST /v1/auth/approle/login` with `{"role_id", "secret_id"}`.
pub async fn approle_login(State(state): State<AppState>, body: SecretBody) -> ApiResult<Response> {
    let token = state
        .vault
        .login(
            approle::METHOD,
            LoginRequest {
                name: None,
                body: &body.0,
            },
        )
        .await?;
    auth_reply(&token)
}

/// `POST /v1/auth/userpass/login/<user>` with `{"password"}`.
pub async fn userpass_login(
    State(state): State<AppState>,
    Path(user): Path<String>,
    body: SecretBody,
) -> ApiResult<Response> {
    let token = state
        .vault
        .login(
            userpass::METHOD,
            LoginRequest {
                name: Some(&user),
                body: &body.0,
            },
        )
        .await?;
    auth_reply(&token)
}

fn keys_reply(keys: Vec<String>) -> Response {
    json(
        StatusCode::OK,
        envelope(serde_json::json!({ "keys": keys })),
    )
}

/// `LIST /v1/auth/approle/role`.
pub async fn approle_roles(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    caller: Caller,
) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.list_approles(&caller).await?))
}

/// `/v1/auth/approle/role/<name>`: GET, POST/PUT, DELETE.
pub async fn approle_role(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    match method {
        Method::GET => {
            let view = state.vault.read_approle(&caller, &name).await?;
            Ok(json(
                StatusCode::OK,
                envelope(serde_json::to_value(view).map_err(|e| Error::Internal(e.to_string()))?),
            ))
        }
        Method::POST | Method::PUT => {
            let bytes: &[u8] = if body.0.iter().all(u8::is_ascii_whitespace) {
                b"{}"
            } else {
                &body.0
            };
            let config: RoleConfig = crate::auth::parse_body(bytes)?;
            state.vault.write_approle(&caller, &name, config).await?;
            Ok(no_content())
        }
        Method::DELETE => {
            state.vault.delete_approle(&caller, &name).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// `GET /v1/auth/approle/role/<name>/role-id`.
pub async fn approle_role_id(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
) -> ApiResult<Response> {
    let role_id = state.vault.approle_role_id(&caller, &name).await?;
    Ok(json(
        StatusCode::OK,
        envelope(serde_json::json!({ "role_id": role_id })),
    ))
}

#[derive(Serialize)]
struct SecretIdReply<'a> {
    request_id: String,
    data: SecretIdData<'a>,
}

#[derive(Serialize)]
struct SecretIdData<'a> {
    secret_id: &'a str,
    secret_id_accessor: &'a str,
    secret_id_ttl: u64,
    secret_id_num_uses: u64,
}

/// `POST /v1/auth/approle/role/<name>/secret-id`: the secret id, shown once.
pub async fn approle_secret_id(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
    JsonBody(_ignored): JsonBody<EmptyBody>,
) -> ApiResult<Response> {
    use secrecy::ExposeSecret;
    let s = state.vault.approle_secret_id(&caller, &name).await?;
    let reply = SecretIdReply {
        request_id: crate::http::current_request_id(),
        data: SecretIdData {
            secret_id: s.secret_id.expose_secret(),
            secret_id_accessor: &s.accessor,
            secret_id_ttl: s.ttl.map(|t| t.as_secs()).unwrap_or(0),
            secret_id_num_uses: 0,
        },
    };
    Ok(secret_json(StatusCode::OK, &reply, 256)?)
}

/// Endpoints that take no parameters still refuse unknown ones.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

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
            Ok(json(
                StatusCode::OK,
                envelope(serde_json::to_value(view).map_err(|e| Error::Internal(e.to_string()))?),
            ))
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
