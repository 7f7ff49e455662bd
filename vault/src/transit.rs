//! Named keys for gateways and services (HashiCorp Vault's transit engine shapes): AES-256
//! encryption and Ed25519 signatures, the keys generated in the HSM and used there. Only
//! Ed25519 public keys leave it (verification runs in process).
//!
//! Metadata lives in the store at `transit/keys/<name>`; each version is a token object
//! labelled `<prefix>/transit/<name>/v<N>`. Ciphertexts and signatures are
//! `vault:v<N>:<base64>`; a ciphertext is `iv (12) || ciphertext || tag (16)`.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use keyvault_hsm::{HsmError, KeyKind, KeyLabel, KeyStore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::hsm_call;
use crate::keys::KeyNames;
use crate::store::{Store, decode_json, encode_json, list_names};

const PREFIX: &str = "transit/keys/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl KeyType {
    fn kind(self) -> KeyKind {
        match self {
            KeyType::Aes256Gcm96 => KeyKind::Aes256Gcm,
            KeyType::Ed25519 => KeyKind::Ed25519,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyVersionMeta {
    pub creation_time: String,
    /// Ed25519 only: the public key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// A named key's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitKey {
    #[serde(rename = "type")]
    pub key_type: KeyType,
    pub versions: BTreeMap<u32, KeyVersionMeta>,
    pub latest_version: u32,
    pub min_decryption_version: u32,
    pub deletion_allowed: bool,
}

/// Transit key names: 1-32 characters of `[A-Za-z0-9._-]` (they become HSM labels).
pub fn validate_key_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(Error::invalid("invalid key name: use 1-32 characters of [A-Za-z0-9._-]")) }
}

/// `vault:v<N>:<base64>` → (N, bytes).
pub fn parse_versioned(s: &str) -> Result<(u32, Vec<u8>)> {
    let bad = || Error::invalid("expected vault:v<N>:<base64>");
    let rest = s.strip_prefix("vault:v").ok_or_else(bad)?;
    let (v, b64) = rest.split_once(':').ok_or_else(bad)?;
    let v: u32 = v.parse().map_err(|_| bad())?;
    if v == 0 {
        return Err(bad());
    }
    let bytes = STANDARD.decode(b64).map_err(|_| Error::invalid("invalid base64 in the ciphertext or signature"))?;
    Ok((v, bytes))
}

pub fn format_versioned(v: u32, bytes: &[u8]) -> String {
    format!("vault:v{v}:{}", STANDARD.encode(bytes))
}

/// Decode a base64 field of a request.
pub fn b64_field(name: &str, value: &str) -> Result<Zeroizing<Vec<u8>>> {
    STANDARD.decode(value).map(Zeroizing::new).map_err(|_| Error::invalid(format!("{name} is not valid base64")))
}

fn key_path(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The transit engine.
#[derive(Debug)]
pub struct Transit {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
}

impl Transit {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames) -> Self {
        Transit { store, keys, names }
    }

    fn label(&self, name: &str, v: u32) -> Result<KeyLabel> {
        self.names.transit(name, v)
    }

    async fn load_raw(&self, name: &str) -> Result<Option<(Vec<u8>, TransitKey)>> {
        validate_key_name(name)?;
        let k = key_path(name);
        match self.store.get(&k).await? {
            Some(raw) => {
                let key = decode_json(&k, &raw)?;
                Ok(Some((raw, key)))
            }
            None => Ok(None),
        }
    }

    pub async fn get(&self, name: &str) -> Result<TransitKey> {
        self.load_raw(name).await?.map(|(_, k)| k).ok_or_else(|| Error::NotFound(format!("no transit key {name}")))
    }

    async fn new_version(&self, name: &str, key_type: KeyType, v: u32) -> Result<KeyVersionMeta> {
        let label = self.label(name, v)?;
        let l = label.clone();
        match hsm_call(&self.keys, move |k| k.generate(&l, key_type.kind())).await {
            Ok(()) => {}
            // Left over from an interrupted create or rotation: start that version afresh.
            Err(Error::Hsm(HsmError::KeyExists(_))) => {
                let l = label.clone();
                hsm_call(&self.keys, move |k| k.destroy(&l)).await?;
                let l = label.clone();
                hsm_call(&self.keys, move |k| k.generate(&l, key_type.kind())).await?;
            }
            Err(e) => return Err(e),
        }
        let public_key = match key_type {
            KeyType::Ed25519 => {
                let l = label.clone();
                Some(STANDARD.encode(hsm_call(&self.keys, move |k| k.ed25519_public_key(&l)).await?))
            }
            KeyType::Aes256Gcm96 => None,
        };
        Ok(KeyVersionMeta { creation_time: now_rfc3339(), public_key })
    }

    /// Create a key (version 1). Creating an existing key of the same type is a no-op.
    pub async fn create(&self, name: &str, key_type: KeyType) -> Result<TransitKey> {
        if let Some((_, existing)) = self.load_raw(name).await? {
            if existing.key_type != key_type {
                return Err(Error::Conflict(format!("transit key {name} exists with another type")));
            }
            return Ok(existing);
        }
        let v1 = self.new_version(name, key_type, 1).await?;
        let key = TransitKey {
            key_type,
            versions: [(1, v1)].into(),
            latest_version: 1,
            min_decryption_version: 1,
            deletion_allowed: false,
        };
        if !self.store.insert_if_absent(&key_path(name), &encode_json(&key), None).await? {
            return Err(Error::Conflict(format!("transit key {name} is being created concurrently")));
        }
        tracing::info!(key = name, ?key_type, "transit key created");
        Ok(key)
    }

    /// Add a version and make it the one new operations use.
    pub async fn rotate(&self, name: &str) -> Result<TransitKey> {
        let (raw, mut key) =
            self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
        let v = key.latest_version + 1;
        let meta = self.new_version(name, key.key_type, v).await?;
        key.versions.insert(v, meta);
        key.latest_version = v;
        if !self.store.compare_and_swap(&key_path(name), Some(&raw), Some(&encode_json(&key))).await? {
            let label = self.label(name, v)?;
            let _ = hsm_call(&self.keys, move |k| k.destroy(&label)).await;
            return Err(Error::Conflict(format!("transit key {name} changed concurrently; retry")));
        }
        tracing::info!(key = name, version = v, "transit key rotated");
        Ok(key)
    }

    pub async fn configure(
        &self,
        name: &str,
        min_decryption_version: Option<u32>,
        deletion_allowed: Option<bool>,
    ) -> Result<TransitKey> {
        loop {
            let (raw, mut key) =
                self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
            if let Some(m) = min_decryption_version {
                if m == 0 || m > key.latest_version {
                    return Err(Error::invalid("min_decryption_version must be between 1 and the latest version"));
                }
                key.min_decryption_version = m;
            }
            if let Some(d) = deletion_allowed {
                key.deletion_allowed = d;
            }
            if self.store.compare_and_swap(&key_path(name), Some(&raw), Some(&encode_json(&key))).await? {
                return Ok(key);
            }
        }
    }

    /// Delete a key whose `deletion_allowed` is set: its token objects are destroyed.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let (raw, key) = self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
        if !key.deletion_allowed {
            return Err(Error::invalid("deletion is not allowed for this key (set deletion_allowed first)"));
        }
        if !self.store.compare_and_swap(&key_path(name), Some(&raw), None).await? {
            return Err(Error::Conflict(format!("transit key {name} changed concurrently; retry")));
        }
        for v in key.versions.keys() {
            let label = self.label(name, *v)?;
            hsm_call(&self.keys, move |k| k.destroy(&label)).await?;
        }
        tracing::info!(key = name, "transit key deleted");
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<String>> {
        let names = list_names(self.store.as_ref(), PREFIX).await?;
        if names.is_empty() {
            return Err(Error::NotFound("no transit keys".into()));
        }
        Ok(names)
    }

    fn usable(key: &TransitKey, v: u32) -> Result<()> {
        if !key.versions.contains_key(&v) {
            return Err(Error::invalid(format!("key version {v} does not exist")));
        }
        if v < key.min_decryption_version {
            return Err(Error::invalid(format!(
                "key version {v} is below min_decryption_version {}",
                key.min_decryption_version
            )));
        }
        Ok(())
    }

    /// Encrypt under the latest version (AES-GCM inside the token).
    pub async fn encrypt(
        &self,
        name: &str,
        key: &TransitKey,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<String> {
        if key.key_type != KeyType::Aes256Gcm96 {
            return Err(Error::invalid("this key does not support encryption"));
        }
        let v = key.latest_version;
        let label = self.label(name, v)?;
        let ct = hsm_call(&self.keys, move |k| k.encrypt_aes_gcm(&label, &plaintext, &aad)).await?;
        Ok(format_versioned(v, &ct))
    }

    /// Decrypt a `vault:v<N>:` ciphertext; versions below `min_decryption_version` are refused.
    pub async fn decrypt(
        &self,
        name: &str,
        key: &TransitKey,
        ciphertext: &str,
        aad: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        if key.key_type != KeyType::Aes256Gcm96 {
            return Err(Error::invalid("this key does not support decryption"));
        }
        let (v, bytes) = parse_versioned(ciphertext)?;
        Self::usable(key, v)?;
        let label = self.label(name, v)?;
        match hsm_call(&self.keys, move |k| k.decrypt_aes_gcm(&label, &bytes, &aad)).await {
            Err(Error::Hsm(HsmError::InvalidCiphertext)) => Err(Error::invalid("the ciphertext failed authentication")),
            other => other,
        }
    }

    /// Re-encrypt under the latest version; the plaintext never leaves this function.
    pub async fn rewrap(&self, name: &str, key: &TransitKey, ciphertext: &str, aad: Vec<u8>) -> Result<String> {
        let plaintext = self.decrypt(name, key, ciphertext, aad.clone()).await?;
        self.encrypt(name, key, plaintext, aad).await
    }

    /// A fresh 256-bit data key and its encryption under the named key.
    pub async fn datakey(&self, name: &str, key: &TransitKey, aad: Vec<u8>) -> Result<(Zeroizing<Vec<u8>>, String)> {
        let dk = Zeroizing::new(crate::barrier::random::<32>()?.to_vec());
        let ct = self.encrypt(name, key, dk.clone(), aad).await?;
        Ok((dk, ct))
    }

    /// Sign inside the token with the latest version.
    pub async fn sign(&self, name: &str, key: &TransitKey, input: Vec<u8>) -> Result<String> {
        if key.key_type != KeyType::Ed25519 {
            return Err(Error::invalid("this key does not support signing"));
        }
        let v = key.latest_version;
        let label = self.label(name, v)?;
        let sig = hsm_call(&self.keys, move |k| k.sign_ed25519(&label, &input)).await?;
        Ok(format_versioned(v, &sig))
    }

    /// The verifying keys of every version at or above `min_decryption_version`.
    pub fn public_keys(key: &TransitKey) -> Result<Vec<(u32, VerifyingKey)>> {
        let mut out = Vec::new();
        for (v, meta) in key.versions.range(key.min_decryption_version..) {
            let raw =
                meta.public_key.as_deref().ok_or_else(|| Error::invalid("this key does not support verification"))?;
            let raw: [u8; 32] = STANDARD
                .decode(raw)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Error::Internal(format!("stored public key of version {v} is corrupt")))?;
            out.push((*v, VerifyingKey::from_bytes(&raw).map_err(|e| Error::Internal(format!("public key: {e}")))?));
        }
        Ok(out)
    }

    /// Verify a `vault:v<N>:` signature in process.
    pub fn verify(key: &TransitKey, input: &[u8], signature: &str) -> Result<bool> {
        if key.key_type != KeyType::Ed25519 {
            return Err(Error::invalid("this key does not support verification"));
        }
        let (v, sig) = parse_versioned(signature)?;
        Self::usable(key, v)?;
        let Some((_, vk)) = Self::public_keys(key)?.into_iter().find(|(kv, _)| *kv == v) else {
            return Ok(false);
        };
        let Ok(sig) = Signature::from_slice(&sig) else { return Ok(false) };
        Ok(vk.verify_strict(input, &sig).is_ok())
    }
}
