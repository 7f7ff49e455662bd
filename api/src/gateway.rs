//! The gateway contract: what a producer signs, how a gateway asks KeyVault to check it
//! (`POST /v1/gateway/verify`), and how producers are registered
//! (`/v1/gateway/producers/<identity>`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Nonces: 16 to 128 characters of `[A-Za-z0-9_-]` (base64url), so that the signing input
/// splits one way only (neither the timestamp nor the nonce can contain `.`).
pub const NONCE_MIN: usize = 16;
pub const NONCE_MAX: usize = 128;
/// The five headers of a signed request, as a producer sends them and a gateway reads
/// them (docs/api.md, "Gateway"). The certificate fingerprint is the SHA-256 (hex) of the
/// producer's client certificate: a gateway takes it from its own TLS connection (or from
/// the TLS terminator in front of it), never from what the producer claims.
pub const HEADER_IDENTITY: &str = "x-keyvault-identity";
pub const HEADER_CERT_SHA256: &str = "x-keyvault-cert-sha256";
pub const HEADER_TIMESTAMP: &str = "x-keyvault-timestamp";
pub const HEADER_NONCE: &str = "x-keyvault-nonce";
pub const HEADER_SIGNATURE: &str = "x-keyvault-signature";

/// The most items in one `batch`.
pub const MAX_BATCH: usize = 1000;

/// Whether `nonce` is a valid nonce ([`NONCE_MIN`]-[`NONCE_MAX`] characters of
/// `[A-Za-z0-9_-]`).
pub fn valid_nonce(nonce: &str) -> bool {
    (NONCE_MIN..=NONCE_MAX).contains(&nonce.len())
        && nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `timestamp` is a valid timestamp: 1-12 decimal digits (Unix seconds).
pub fn valid_timestamp(timestamp: &str) -> bool {
    !timestamp.is_empty() && timestamp.len() <= 12 && timestamp.bytes().all(|b| b.is_ascii_digit())
}

/// The domain tag that starts every signing input. A signature made with a producer's key
/// for anything else (another protocol, a document, a token) is over bytes that do not start
/// with it, so it never verifies as a gateway request, whatever those bytes are.
pub const SIGNING_TAG: &[u8] = b"keyvault/gateway/request/v1\n";

/// The bytes a producer signs with Ed25519: [`SIGNING_TAG`] then
/// `"{timestamp}.{nonce}." + body`. With a timestamp of digits and a nonce of
/// `[A-Za-z0-9_-]` (neither contains `.`), the input splits back one way only: no two
/// (timestamp, nonce, body) give the same bytes.
pub fn signing_input(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_TAG.len() + timestamp.len() + nonce.len() + 2 + body.len());
    message.extend_from_slice(SIGNING_TAG);
    push_untagged(&mut message, timestamp, nonce, body);
    message
}

/// The signing input of producers registered before [`SIGNING_TAG`]:
/// `"{timestamp}.{nonce}." + body`, with no tag. Accepted only from producers whose
/// `signing_input` is [`SigningInput::TaggedOrUntagged`].
pub fn untagged_signing_input(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(timestamp.len() + nonce.len() + 2 + body.len());
    push_untagged(&mut message, timestamp, nonce, body);
    message
}

fn push_untagged(message: &mut Vec<u8>, timestamp: &str, nonce: &str, body: &[u8]) {
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(nonce.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
}

/// Which signing inputs a producer's signatures may be over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SigningInput {
    /// [`signing_input`] only: what a producer registered now accepts.
    #[default]
    Tagged,
    /// Also [`untagged_signing_input`]: what a producer registered before the tag accepts,
    /// until its signers are upgraded and it is set to `tagged`.
    TaggedOrUntagged,
}

/// One signing key of a producer. Several at once give a dual-validation window during a
/// key rotation; `not_after` closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProducerKey {
    pub key_id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// A registered producer (`POST /v1/gateway/producers/<identity>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Producer {
    /// SHA-256 fingerprints (hex) of the client certificates this producer presents.
    pub cert_sha256: Vec<String>,
    #[serde(default)]
    pub keys: Vec<ProducerKey>,
    /// A named Ed25519 transit key in this HSM instead of (or besides) `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transit_key: Option<String>,
    /// operator id → tenant id; when set, bodies must carry matching signed metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operator_tenants: BTreeMap<String, String>,
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    #[serde(default = "default_nonce_ttl")]
    pub nonce_ttl_seconds: u64,
    /// Set by the kill switch: every request of this producer is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Which signing inputs its signatures may be over. Left out of a write: `tagged` for a
    /// new producer, what it was for one replaced. Stored without it (registered before the
    /// tag): `tagged_or_untagged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_input: Option<SigningInput>,
}

fn default_skew() -> u64 {
    30
}

fn default_nonce_ttl() -> u64 {
    120
}

/// A timestamp as decimal text (the header value) or a JSON number.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Timestamp {
    Text(String),
    Number(u64),
}

/// One check: the producer's header values and the body it signed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifyItem {
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub cert_sha256: Option<String>,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    /// Base64 of the raw body.
    #[serde(default)]
    pub body: Option<String>,
}

/// The request of `POST /v1/gateway/verify` for several items at once (one item is sent
/// as a [`VerifyItem`] on its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifyBatch {
    pub batch: Vec<VerifyItem>,
}

/// The verdict on one item. A single check answers with the verdict's `status`; in a
/// batch each result carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Verdict {
    pub valid: bool,
    pub reason: Option<String>,
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// The `data` of a batch check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchVerdicts {
    pub batch_results: Vec<Verdict>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_input_splits_one_way() {
        assert_eq!(
            signing_input("1700000000", "abcdefghijklmnop", b"{}"),
            b"keyvault/gateway/request/v1\n1700000000.abcdefghijklmnop.{}".to_vec()
        );
        assert_eq!(
            untagged_signing_input("1700000000", "abcdefghijklmnop", b"{}"),
            b"1700000000.abcdefghijklmnop.{}".to_vec()
        );
        // No untagged input is a tagged one: an untagged input starts with a digit.
        assert!(SIGNING_TAG[0].is_ascii_alphabetic());
        assert!(valid_nonce("abcdefghijklmnop"));
        assert!(!valid_nonce("abcdefghijklmno."));
        assert!(!valid_nonce("short"));
        assert!(valid_timestamp("1700000000"));
        assert!(!valid_timestamp("17.5"));
        assert!(!valid_timestamp(""));
    }
}
