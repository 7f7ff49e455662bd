//! `/v1/transit/...`: named keys in the HSM and the operations on them (Vault's transit
//! shapes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Sensitive;

/// The kinds of named key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum KeyType {
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    #[serde(rename = "ed25519")]
    Ed25519,
}

/// `POST /v1/transit/keys/<name>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateKey {
    /// `aes256-gcm96` when absent.
    #[serde(default, rename = "type")]
    pub key_type: Option<KeyType>,
    /// Vault's key derivation from a per-request `context`: not supported, refused when
    /// true (a ciphertext is bound to its key and its `associated_data` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<bool>,
    /// Refused when true (needs derivation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergent_encryption: Option<bool>,
    /// Refused when true: no key leaves the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exportable: Option<bool>,
    /// Refused when true: no key leaves the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext_backup: Option<bool>,
    /// Refused unless 0: keys are rotated by `keys/<name>/rotate` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rotate_period: Option<Period>,
}

/// A period as Vault takes it: seconds, or a duration text (`"24h"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Period {
    Seconds(u64),
    Text(String),
}

impl Period {
    /// Whether it says "never" (0, `"0"`, `"0s"`, empty).
    pub fn is_zero(&self) -> bool {
        match self {
            Period::Seconds(s) => *s == 0,
            Period::Text(t) => {
                let digits = t.trim().trim_end_matches(['s', 'm', 'h']);
                digits.is_empty() || digits.bytes().all(|b| b == b'0')
            }
        }
    }
}

/// `POST /v1/transit/keys/<name>/config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyConfig {
    #[serde(default)]
    pub min_decryption_version: Option<u32>,
    #[serde(default)]
    pub deletion_allowed: Option<bool>,
    /// Vault's fields that would change what the key does: refused unless they ask for
    /// nothing (0 or false). There is no automatic rotation, every version encrypts
    /// until rotated, and no key leaves the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rotate_period: Option<Period>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_encryption_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exportable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plaintext_backup: Option<bool>,
}

/// One version of a key as `GET` shows it: its creation time, or for Ed25519 keys also
/// its public key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum VersionInfo {
    Created(String),
    Signing { creation_time: String, public_key: String },
}

/// A key as `GET /v1/transit/keys/<name>` (and create, rotate, config) show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub key_type: KeyType,
    pub keys: BTreeMap<String, VersionInfo>,
    pub latest_version: u32,
    pub min_decryption_version: u32,
    pub deletion_allowed: bool,
    /// Always false: no key leaves the HSM.
    pub exportable: bool,
    pub supports_encryption: bool,
    pub supports_decryption: bool,
    pub supports_signing: bool,
}

/// One item of an operation: the body itself, or an element of `batch_input`. Which
/// fields an operation reads: encrypt `plaintext`; decrypt and rewrap `ciphertext`; sign
/// `input`; verify `input` and `signature`; `associated_data` for the AES ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Item {
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Sensitive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_data: Option<String>,
    /// Base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Vault's derivation context: refused unless empty (keys are not derived; a
    /// context that was silently ignored would bind nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Vault's convergent-encryption nonce: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Refused when true: signatures are over the input itself (Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prehashed: Option<bool>,
    /// Echoed in the item's result (batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The version to encrypt, rewrap or sign with (absent or 0: the latest); it must
    /// exist and not be below `min_decryption_version`. Refused on decrypt and verify
    /// (their version is the one their text names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
}

/// `POST /v1/transit/{encrypt,decrypt,rewrap,sign,verify}/<name>`: one item's fields, or
/// `batch_input` (1 to 1000 items).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperationRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Sensitive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Vault's derivation context: refused unless empty (keys are not derived; a
    /// context that was silently ignored would bind nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Vault's convergent-encryption nonce: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Refused when true: signatures are over the input itself (Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prehashed: Option<bool>,
    /// As an item's `key_version`; with `batch_input`, for the items that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_input: Option<Vec<Item>>,
}

/// The result of one item. Which fields are set depends on the operation; a failed
/// batch item carries `error` only (and its `reference`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Sensitive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// The `data` of a batch operation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResults {
    pub batch_results: Vec<ItemResult>,
}

/// `POST /v1/transit/datakey/{plaintext,wrapped}/<name>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DatakeyRequest {
    /// Base64.
    #[serde(default)]
    pub associated_data: Option<String>,
    /// Refused unless empty, as for the other operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// A fresh data key, encrypted under the named key; `plaintext` (base64) only for the
/// `plaintext` kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Datakey {
    pub ciphertext: String,
    pub key_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Sensitive>,
}
