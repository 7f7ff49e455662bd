//! The producer side of the gateway contract: sign an outgoing request with the five
//! headers, with a local Ed25519 key or through KeyVault's `transit/sign` (the key stays
//! in the HSM). The signing input is `keyvault_api::gateway::signing_input`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::Signer as _;
use http::{HeaderMap, HeaderValue};
use keyvault_api::gateway::{
    HEADER_CERT_SHA256, HEADER_IDENTITY, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, signing_input,
};

use crate::client::Client;
use crate::error::{Error, Result};

enum Key {
    Local(Box<ed25519_dalek::SigningKey>),
    Transit { client: Client, key: String },
}

/// Signs requests as one producer.
pub struct Signer {
    identity: String,
    cert_sha256: String,
    key: Key,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match &self.key {
            Key::Local(_) => "local [redacted]".to_owned(),
            Key::Transit { key, .. } => format!("transit/{key}"),
        };
        f.debug_struct("Signer").field("identity", &self.identity).field("key", &key).finish()
    }
}

/// A fresh nonce: 24 random bytes as base64url (32 characters of `[A-Za-z0-9_-]`).
pub fn nonce() -> Result<String> {
    let mut b = [0u8; 24];
    getrandom::fill(&mut b).map_err(|_| Error::Crypto("no randomness".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

fn value(v: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(v).map_err(|_| Error::Invalid("a header value that is not ASCII".into()))
}

impl Signer {
    /// Sign with a local key (its public half registered with the producer).
    pub fn local(identity: impl Into<String>, cert_sha256: impl Into<String>, key: ed25519_dalek::SigningKey) -> Self {
        Signer { identity: identity.into(), cert_sha256: cert_sha256.into(), key: Key::Local(Box::new(key)) }
    }

    /// Sign through KeyVault's `transit/sign/<key>` (the producer registered with
    /// `transit_key`); the client's token needs `sign` on `transit/keys/<key>`.
    pub fn transit(
        identity: impl Into<String>,
        cert_sha256: impl Into<String>,
        client: Client,
        key: impl Into<String>,
    ) -> Self {
        Signer {
            identity: identity.into(),
            cert_sha256: cert_sha256.into(),
            key: Key::Transit { client, key: key.into() },
        }
    }

    /// The five headers for `body`, signed now with a fresh nonce.
    pub async fn headers(&self, body: &[u8]) -> Result<HeaderMap> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Error::Crypto("the clock is before 1970".into()))?
            .as_secs()
            .to_string();
        let nonce = nonce()?;
        let input = signing_input(&now, &nonce, body);
        let signature = match &self.key {
            Key::Local(k) => STANDARD.encode(k.sign(&input).to_bytes()),
            Key::Transit { client, key } => {
                let s = client.sign(key, &input).await?;
                // `vault:v<N>:<base64>`: the gateway contract carries the base64 alone.
                s.rsplit(':').next().unwrap_or_default().to_owned()
            }
        };
        let mut h = HeaderMap::new();
        h.insert(HEADER_IDENTITY, value(&self.identity)?);
        h.insert(HEADER_CERT_SHA256, value(&self.cert_sha256)?);
        h.insert(HEADER_TIMESTAMP, value(&now)?);
        h.insert(HEADER_NONCE, value(&nonce)?);
        h.insert(HEADER_SIGNATURE, value(&signature)?);
        Ok(h)
    }

    /// Add the headers to a `reqwest` request builder for `body` (which it then carries).
    pub async fn sign_reqwest(
        &self,
        builder: reqwest::RequestBuilder,
        body: Vec<u8>,
    ) -> Result<reqwest::RequestBuilder> {
        let h = self.headers(&body).await?;
        Ok(builder.headers(h).body(body))
    }

    /// Add the headers to an `http` request whose body is bytes.
    pub async fn sign_http<B: AsRef<[u8]>>(&self, req: &mut http::Request<B>) -> Result<()> {
        let h = self.headers(req.body().as_ref()).await?;
        req.headers_mut().extend(h);
        Ok(())
    }
}
