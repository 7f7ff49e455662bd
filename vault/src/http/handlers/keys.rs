//! `/v1/transit/...` (Vault's transit shapes) and `/v1/gateway/...`.

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{data_reply, envelope, is_list, keys_reply, secret_json};
use crate::error::{Error, Result};
use crate::gateway::{Producer, Verdict, VerifyItem};
use crate::http::extract::{JsonBody, SecretBody};
use crate::http::{ApiResult, AppState, json, no_content};
use crate::policy::Capability;
use crate::transit::{KeyType, Transit, TransitKey, b64_field};
use crate::vault::Caller;

fn key_view(name: &str, k: &TransitKey) -> serde_json::Value {
    let keys: serde_json::Map<String, serde_json::Value> = k
        .versions
        .iter()
        .map(|(v, m)| {
            let value = match &m.public_key {
                Some(pk) => serde_json::json!({"creation_time": m.creation_time, "public_key": pk}),
                None => serde_json::json!(m.creation_time),
            };
            (v.to_string(), value)
        })
        .collect();
    let ed = k.key_type == KeyType::Ed25519;
    serde_json::json!({
        "name": name,
        "type": k.key_type,
        "keys": keys,
        "latest_version": k.latest_version,
        "min_decryption_version": k.min_decryption_version,
        "deletion_allowed": k.deletion_allowed,
        "exportable": false,
        "supports_encryption": !ed,
        "supports_decryption": !ed,
        "supports_signing": ed,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default, rename = "type")]
    key_type: Option<KeyType>,
}

/// `/v1/transit/keys/<name>`: POST (create), GET, DELETE.
pub async fn key(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    caller: Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> ApiResult<Response> {
    match method {
        Method::POST | Method::PUT => {
            let k = state.vault.transit_create(&caller, &name, body.key_type.unwrap_or(KeyType::Aes256Gcm96)).await?;
            Ok(json(StatusCode::OK, envelope(key_view(&name, &k))))
        }
        Method::GET => {
            let k = state.vault.transit_key(&caller, &name, Capability::Read).await?;
            Ok(json(StatusCode::OK, envelope(key_view(&name, &k))))
        }
        Method::DELETE => {
            state.vault.transit_delete(&caller, &name).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// `LIST /v1/transit/keys`.
pub async fn keys(State(state): State<AppState>, method: Method, uri: Uri, caller: Caller) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.transit_list(&caller).await?))
}

/// `POST /v1/transit/keys/<name>/rotate`.
pub async fn rotate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
    JsonBody(_): JsonBody<super::auth::EmptyBody>,
) -> ApiResult<Response> {
    let k = state.vault.transit_rotate(&caller, &name).await?;
    Ok(json(StatusCode::OK, envelope(key_view(&name, &k))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigBody {
    #[serde(default)]
    min_decryption_version: Option<u32>,
    #[serde(default)]
    deletion_allowed: Option<bool>,
}

/// `POST /v1/transit/keys/<name>/config`.
pub async fn config(
    State(state): State<AppState>,
    Path(name): Path<String>,
    caller: Caller,
    JsonBody(b): JsonBody<ConfigBody>,
) -> ApiResult<Response> {
    let k = state.vault.transit_configure(&caller, &name, b.min_decryption_version, b.deletion_allowed).await?;
    Ok(json(StatusCode::OK, envelope(key_view(&name, &k))))
}

/// One item of a transit request (the body itself, or an element of `batch_input`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Item {
    #[serde(default)]
    plaintext: Option<SecretString>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    associated_data: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    reference: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Body {
    #[serde(default)]
    plaintext: Option<SecretString>,
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    associated_data: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    batch_input: Option<Vec<Item>>,
}

impl Body {
    /// The items, and whether this was a batch.
    fn items(self) -> Result<(Vec<Item>, bool)> {
        match self.batch_input {
            Some(batch) => {
                let single = self.plaintext.is_some()
                    || self.ciphertext.is_some()
                    || self.input.is_some()
                    || self.signature.is_some()
                    || self.associated_data.is_some();
                if single {
                    return Err(Error::invalid("give either batch_input or the fields of one item"));
                }
                if batch.is_empty() || batch.len() > crate::gateway::MAX_BATCH {
                    return Err(Error::invalid("batch_input holds 1 to 1000 items"));
                }
                Ok((batch, true))
            }
            None => Ok((
                vec![Item {
                    plaintext: self.plaintext,
                    ciphertext: self.ciphertext,
                    associated_data: self.associated_data,
                    input: self.input,
                    signature: self.signature,
                    reference: None,
                }],
                false,
            )),
        }
    }
}

fn aad(item: &Item) -> Result<Vec<u8>> {
    Ok(match &item.associated_data {
        Some(a) => b64_field("associated_data", a)?.to_vec(),
        None => Vec::new(),
    })
}

fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str> {
    v.as_deref().ok_or_else(|| Error::invalid(format!("missing field `{name}`")))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
    Sign,
    Verify,
}

impl Op {
    fn capability(self) -> Capability {
        match self {
            Op::Encrypt | Op::Rewrap => Capability::Encrypt,
            Op::Decrypt => Capability::Decrypt,
            Op::Sign => Capability::Sign,
            Op::Verify => Capability::Verify,
        }
    }
}

async fn one(state: &AppState, name: &str, key: &TransitKey, op: Op, item: &Item) -> Result<serde_json::Value> {
    let t = &state.vault.transit;
    Ok(match op {
        Op::Encrypt => {
            let pt = b64_field(
                "plaintext",
                item.plaintext.as_ref().ok_or_else(|| Error::invalid("missing field `plaintext`"))?.expose_secret(),
            )?;
            serde_json::json!({"ciphertext": t.encrypt(name, key, pt, aad(item)?).await?, "key_version": key.latest_version})
        }
        Op::Decrypt => {
            let pt = t.decrypt(name, key, required(&item.ciphertext, "ciphertext")?, aad(item)?).await?;
            serde_json::json!({"plaintext": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pt.as_slice())})
        }
        Op::Rewrap => {
            serde_json::json!({"ciphertext": t.rewrap(name, key, required(&item.ciphertext, "ciphertext")?, aad(item)?).await?, "key_version": key.latest_version})
        }
        Op::Sign => {
            let input = b64_field("input", required(&item.input, "input")?)?;
            serde_json::json!({"signature": t.sign(name, key, input.to_vec()).await?, "key_version": key.latest_version})
        }
        Op::Verify => {
            let input = b64_field("input", required(&item.input, "input")?)?;
            serde_json::json!({"valid": Transit::verify(key, &input, required(&item.signature, "signature")?)?})
        }
    })
}

/// `POST /v1/transit/{encrypt,decrypt,rewrap,sign,verify}/<name>`, single or `batch_input`
/// (one result per item; a failing item carries `error` and does not fail the others).
pub async fn operation(state: &AppState, caller: &Caller, name: &str, op: Op, body: &[u8]) -> ApiResult<Response> {
    let key = state.vault.transit_key(caller, name, op.capability()).await?;
    let body: Body = crate::auth::parse_body(if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body })?;
    let (items, batch) = body.items()?;
    if !batch {
        let data = one(state, name, &key, op, &items[0]).await?;
        return Ok(secret_json(StatusCode::OK, &envelope(data), 1024)?);
    }
    let mut results = Vec::with_capacity(items.len());
    for item in &items {
        let mut r = match one(state, name, &key, op, item).await {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": crate::http::error::client_message(&e) }),
        };
        if let (Some(reference), Some(obj)) = (&item.reference, r.as_object_mut()) {
            obj.insert("reference".into(), reference.clone().into());
        }
        results.push(r);
    }
    Ok(secret_json(StatusCode::OK, &envelope(serde_json::json!({ "batch_results": results })), 64 * items.len())?)
}

macro_rules! transit_op {
    ($fn_name:ident, $op:expr) => {
        pub async fn $fn_name(
            State(state): State<AppState>,
            Path(name): Path<String>,
            caller: Caller,
            body: SecretBody,
        ) -> ApiResult<Response> {
            operation(&state, &caller, &name, $op, &body.0).await
        }
    };
}

transit_op!(encrypt, Op::Encrypt);
transit_op!(decrypt, Op::Decrypt);
transit_op!(rewrap, Op::Rewrap);
transit_op!(sign, Op::Sign);
transit_op!(verify, Op::Verify);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatakeyBody {
    #[serde(default)]
    associated_data: Option<String>,
}

/// `POST /v1/transit/datakey/{plaintext,wrapped}/<name>`: a fresh 256-bit data key
/// encrypted under the named key (client-side envelope encryption, as AWS KMS
/// GenerateDataKey); `plaintext` also returns the key itself.
pub async fn datakey(
    State(state): State<AppState>,
    Path((kind, name)): Path<(String, String)>,
    caller: Caller,
    JsonBody(b): JsonBody<DatakeyBody>,
) -> ApiResult<Response> {
    let with_plaintext = match kind.as_str() {
        "plaintext" => true,
        "wrapped" => false,
        _ => return Err(Error::NotFound("datakey type is plaintext or wrapped".into()).into()),
    };
    let key = state.vault.transit_key(&caller, &name, Capability::Encrypt).await?;
    let aad = match &b.associated_data {
        Some(a) => b64_field("associated_data", a)?.to_vec(),
        None => Vec::new(),
    };
    let (dk, ct): (Zeroizing<Vec<u8>>, String) = state.vault.transit.datakey(&name, &key, aad).await?;
    let mut data = serde_json::json!({"ciphertext": ct, "key_version": key.latest_version});
    if with_plaintext {
        data["plaintext"] = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, dk.as_slice()).into();
    }
    Ok(secret_json(StatusCode::OK, &envelope(data), 256)?)
}

// ---- gateway ----

/// `/v1/gateway/producers/<identity>`: GET, POST/PUT, DELETE.
pub async fn producer(
    State(state): State<AppState>,
    Path(identity): Path<String>,
    method: Method,
    caller: Caller,
    body: SecretBody,
) -> ApiResult<Response> {
    match method {
        Method::GET => {
            let p = state.vault.read_producer(&caller, &identity).await?;
            data_reply(&p).map_err(Into::into)
        }
        Method::POST | Method::PUT => {
            let p: Producer = crate::auth::parse_body(&body.0)?;
            state.vault.put_producer(&caller, &identity, p).await?;
            Ok(no_content())
        }
        Method::DELETE => {
            state.vault.delete_producer(&caller, &identity).await?;
            Ok(no_content())
        }
        _ => Err(Error::MethodNotAllowed.into()),
    }
}

/// `LIST /v1/gateway/producers`.
pub async fn producers(State(state): State<AppState>, method: Method, uri: Uri, caller: Caller) -> ApiResult<Response> {
    if !is_list(&method, &uri)? {
        return Err(Error::MethodNotAllowed.into());
    }
    Ok(keys_reply(state.vault.list_producers(&caller).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    batch: Vec<VerifyItem>,
}

fn verdict_json(v: &Verdict, with_status: bool) -> serde_json::Value {
    let mut j = serde_json::json!({"valid": v.valid, "reason": v.reason, "key_id": v.key_id});
    if with_status {
        j["status"] = v.status.into();
    }
    j
}

/// `POST /v1/gateway/verify`: one item (the reply's status is the verdict's) or
/// `{"batch": [...]}` (200, each result with its own status). Every verdict is an audit
/// event (`telemetry.accepted` / `telemetry.rejected`).
pub async fn gateway_verify(State(state): State<AppState>, caller: Caller, body: SecretBody) -> ApiResult<Response> {
    let raw: serde_json::Value = crate::auth::parse_body(&body.0)?;
    let (items, batch) = if raw.get("batch").is_some() {
        let b: Batch = serde_json::from_value(raw).map_err(|e| crate::auth::json_error(&e))?;
        if b.batch.is_empty() {
            return Err(Error::invalid("an empty batch").into());
        }
        (b.batch, true)
    } else {
        (vec![serde_json::from_value::<VerifyItem>(raw).map_err(|e| crate::auth::json_error(&e))?], false)
    };
    let verdicts = state.vault.gateway_verify(&caller, &items).await?;
    let events = verdicts
        .iter()
        .map(|v| {
            crate::audit::event(
                "event",
                serde_json::json!({
                    "event": if v.valid { "telemetry.accepted" } else { "telemetry.rejected" },
                    "request_id": crate::http::current_request_id(),
                    "producer": v.identity, "reason": v.reason, "key_id": v.key_id, "status": v.status,
                    "caller": caller.claims.acc,
                }),
            )
        })
        .collect();
    state.audit.append_many(events).await?;
    if batch {
        let results: Vec<serde_json::Value> = verdicts.iter().map(|v| verdict_json(v, true)).collect();
        return Ok(json(StatusCode::OK, envelope(serde_json::json!({ "batch_results": results }))));
    }
    let v = &verdicts[0];
    let status = StatusCode::from_u16(v.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(json(status, envelope(verdict_json(v, false))))
}
