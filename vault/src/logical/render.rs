//! Replies as JSON text: Vault's envelope around `data` (with `warnings` and the
//! members beside `data`), the `auth` block of a token, or a bare body. The transport
//! sends it; response wrapping seals it.

use serde::Serialize;
use zeroize::Zeroizing;

use super::{Reply, ReplyBody};
use crate::error::{Error, Result};
use crate::token::IssuedToken;
use crate::unix_now;

/// A login or renewal reply: the token in Vault's `auth` block.
#[derive(Serialize)]
struct AuthEnvelope<'a> {
    request_id: &'a str,
    lease_id: &'static str,
    renewable: bool,
    lease_duration: u64,
    data: Option<()>,
    auth: keyvault_api::auth::Auth,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    warnings: &'a [String],
}

fn auth_block(t: &IssuedToken) -> keyvault_api::auth::Auth {
    use secrecy::ExposeSecret;
    let c = &t.claims;
    let renewable = !c.nren;
    keyvault_api::auth::Auth {
        client_token: keyvault_api::Sensitive::new(t.token.expose_secret()),
        accessor: c.acc.clone(),
        policies: c.pol.clone(),
        token_policies: c.pol.clone(),
        metadata: c.role.iter().map(|r| ("role_name".to_owned(), r.clone())).collect(),
        lease_duration: c.exp.saturating_sub(unix_now()),
        renewable,
        token_type: "service".into(),
        orphan: true,
        bound_certificate_x5t_s256: c.cnf.as_ref().map(|x| x.x5t_s256.clone()),
    }
}

/// The JSON text of a reply, and the status it goes with (`None`: no body, 204).
pub fn render(reply: &Reply, request_id: &str) -> Result<Option<(u16, Zeroizing<Vec<u8>>)>> {
    let built = match &reply.body {
        ReplyBody::Empty if reply.warnings.is_empty() && reply.extra.is_empty() => return Ok(None),
        ReplyBody::Empty => (200, envelope(request_id, b"null", &reply.extra, &reply.warnings)?),
        ReplyBody::Data(data) => (reply.status, envelope(request_id, data, &reply.extra, &reply.warnings)?),
        ReplyBody::Bare(body) => (reply.status, body.clone()),
        ReplyBody::Text(body) => (reply.status, Zeroizing::new(body.clone())),
        ReplyBody::Auth(token) => {
            let env = AuthEnvelope {
                request_id,
                lease_id: "",
                renewable: false,
                lease_duration: 0,
                data: None,
                auth: auth_block(token),
                warnings: &reply.warnings,
            };
            (reply.status, super::to_json(&env)?)
        }
        ReplyBody::Login(_) => return Err(Error::Internal("a login outcome reached the transport".into())),
    };
    Ok(Some(built))
}

/// `{"request_id", "lease_id", "renewable", "lease_duration", "data": <data>, extras...,
/// "warnings"}`, assembled around `data` without parsing or copying it out of zeroizing
/// memory (it may be a secret's value exactly as it was written).
pub fn envelope(
    request_id: &str,
    data: &[u8],
    extra: &[(&'static str, Zeroizing<Vec<u8>>)],
    warnings: &[String],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let enc = |v: &dyn erased::Json| v.json();
    let head = format!(
        r#"{{"request_id":{},"lease_id":"","renewable":false,"lease_duration":0,"data":"#,
        enc(&request_id.to_owned())?
    );
    let tail_warnings =
        if warnings.is_empty() { String::new() } else { format!(",\"warnings\":{}", enc(&warnings.to_vec())?) };
    let extra_len: usize = extra.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    let mut buf = Zeroizing::new(Vec::with_capacity(head.len() + data.len() + extra_len + tail_warnings.len() + 1));
    buf.extend_from_slice(head.as_bytes());
    buf.extend_from_slice(data);
    for (name, value) in extra {
        buf.extend_from_slice(format!(",{}:", enc(&(*name).to_owned())?).as_bytes());
        buf.extend_from_slice(value);
    }
    buf.extend_from_slice(tail_warnings.as_bytes());
    buf.push(b'}');
    Ok(buf)
}

/// JSON text of the envelope's small parts.
mod erased {
    use crate::error::Error;

    pub trait Json {
        fn json(&self) -> Result<String, Error>;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String, Error> {
            serde_json::to_string(self).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))
        }
    }
}
