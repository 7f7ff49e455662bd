//! `/v1/secret/<path>`: read, write, delete, list.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{envelope, is_list, keys_reply, query, secret_bytes};
use crate::error::Error;
use crate::http::extract::SecretBody;
use crate::http::{ApiResult, AppState, json, no_content};
use crate::secrets::{SecretPath, SecretPrefix, SecretVersion};
use crate::vault::Caller;

const PREFIX: &str = "/v1/secret/";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    #[serde(default)]
    version: Option<u64>,
    /// Accepted here, acted on by `is_list`.
    #[serde(default, rename = "list")]
    _list: Option<String>,
}

/// `/v1/secret` and `/v1/secret/`: only listing the root makes sense.
pub async fn root(State(state): State<AppState>, method: Method, uri: Uri, caller: Caller) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    list(&state, &caller, "").await
}

pub async fn secret(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    let raw = uri.path().strip_prefix(PREFIX).unwrap_or_default();
    if is_list(&method, &uri)? {
        return list(&state, &caller, raw).await;
    }
    let path = SecretPath::from_url(raw)?;
    match method {
        Method::GET => {
            let q: ReadQuery = query(&uri)?;
            if q.version == Some(0) {
                return Err(Error::invalid("versions start at 1").into());
            }
            let v = state.vault.read_secret(&caller, &path, q.version).await?;
            Ok(read_reply(v)?)
        }
        Method::PUT | Method::POST => {
            let (version, meta) = state.vault.write_secret(&caller, &path, &body.0).await?;
            Ok(json(
                StatusCode::OK,
                envelope(serde_json::json!({"version": version, "created_time": meta.created_time})),
            ))
        }
        Method::DELETE => {
            state.vault.delete_secret(&caller, &path).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

async fn list(state: &AppState, caller: &Caller, raw: &str) -> ApiResult<Response> {
    let prefix = SecretPrefix::from_url(raw)?;
    let keys = state.vault.list_secrets(caller, &prefix).await?;
    Ok(keys_reply(keys))
}

/// `{"request_id", ..., "data": <the value as written>, "metadata": {...}}`, assembled
/// around the decrypted value without parsing or copying it, in zeroizing memory.
fn read_reply(v: SecretVersion) -> crate::error::Result<Response> {
    let head = format!(
        r#"{{"request_id":"{}","lease_id":"","renewable":false,"lease_duration":0,"data":"#,
        crate::http::current_request_id()
    );
    let tail = format!(
        r#","metadata":{{"version":{},"created_time":{},"deletion_time":"","destroyed":false}}}}"#,
        v.version,
        serde_json::Value::String(v.meta.created_time.clone())
    );
    let mut buf = Zeroizing::new(Vec::with_capacity(head.len() + v.data.len() + tail.len()));
    buf.extend_from_slice(head.as_bytes());
    buf.extend_from_slice(&v.data);
    buf.extend_from_slice(tail.as_bytes());
    secret_bytes(StatusCode::OK, buf)
}
