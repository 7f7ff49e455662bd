//! Route handlers, one file per API family.

use axum::body::Body;
use axum::extract::Query;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

pub mod auth;
pub mod keys;
pub mod secrets;
pub mod sys;

/// Only `list` is looked at here; each endpoint parses (and checks) its full query.
#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    list: Option<String>,
}

/// Parse the query string into `T` (unknown parameters are refused).
pub(crate) fn query<T: serde::de::DeserializeOwned + Default>(uri: &Uri) -> Result<T> {
    if uri.query().is_none_or(str::is_empty) {
        return Ok(T::default());
    }
    Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| Error::invalid(format!("invalid query string: {}", e.body_text())))
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

/// `LIST`, or `GET` with `?list=true`: Vault's two spellings of a listing.
pub(crate) fn is_list(method: &Method, uri: &Uri) -> Result<bool> {
    if method.as_str() == "LIST" {
        return Ok(true);
    }
    if method == Method::GET {
        let q: ListQuery = query(uri)?;
        return Ok(truthy(q.list.as_deref()));
    }
    Ok(false)
}

/// A JSON reply whose body may hold a secret (a value, a token, a secret id): serialized
/// into a buffer reserved up front (so it never reallocates and leaves copies behind)
/// that is zeroized when the connection has sent it.
pub(crate) fn secret_json<T: Serialize>(status: StatusCode, value: &T, size_hint: usize) -> Result<Response> {
    let mut buf = Zeroizing::new(Vec::with_capacity(size_hint * 2 + 4096));
    serde_json::to_writer(&mut *buf, value).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    secret_bytes(status, buf)
}

/// A reply body from zeroizing memory.
pub(crate) fn secret_bytes(status: StatusCode, buf: Zeroizing<Vec<u8>>) -> Result<Response> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(Bytes::from_owner(ZeroizingBody(buf))))
        .map_err(|e| Error::Internal(format!("building a response: {e}")))
}

/// Owner handed to `Bytes::from_owner`: zeroizes the buffer when the last reference to
/// the body's bytes is dropped.
struct ZeroizingBody(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// `{"data": {"keys": [...]}}`: the reply of every LIST endpoint.
pub(crate) fn keys_reply(keys: Vec<String>) -> Response {
    crate::http::json(StatusCode::OK, envelope(serde_json::json!({ "keys": keys })))
}

/// 200 with a serializable view as `data`.
pub(crate) fn data_reply<T: Serialize>(view: &T) -> Result<Response> {
    let data = serde_json::to_value(view).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    Ok(crate::http::json(StatusCode::OK, envelope(data)))
}

/// The envelope of every Vault-shaped reply.
pub(crate) fn envelope(data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "request_id": crate::http::current_request_id(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
    })
}
