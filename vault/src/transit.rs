//! Named keys for gateways and services (HashiCorp Vault's transit engine shapes): AES-256
//! encryption and Ed25519 signatures, the keys generated in the HSM and used there. Only
//! Ed25519 public keys leave it (verification runs in process).
//!
//! Metadata lives in the store at `transit/keys/<name>`; each version is a token object
//! labelled `<prefix>/transit/<name>/v<N>`. Ciphertexts and signatures are
//! `vault:v<N>:<base64>`; a ciphertext is `iv (12) || ciphertext || tag (16)`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use keyvault_hsm::{HsmError, KeyKind, KeyLabel, KeyStore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::hsm_call;
use crate::keys::KeyNames;
use crate::store::{Store, decode_json, encode_json};
use crate::unix_now;

const PREFIX: &str = "transit/keys/";

pub use keyvault_api::transit::KeyType;

/// The token object kind of a key type.
fn token_kind(t: KeyType) -> KeyKind {
    match t {
        KeyType::Aes256Gcm96 => KeyKind::Aes256Gcm,
        KeyType::Ed25519 => KeyKind::Ed25519,
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
    /// A change in progress (create, rotate, delete) that touches the token: claimed in
    /// the store before any token object is made or destroyed, so that of concurrent
    /// requests exactly one does it, on any replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// A claimed change of a transit key (see [`TransitKey::operation`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// `create`, `rotate` or `delete`.
    pub kind: String,
    /// The version being made (create, rotate); for a delete, a version an interrupted
    /// create or rotation may have left in the token (0: none).
    pub version: u32,
    pub owner: String,
    /// Unix seconds after which another request may take the operation over (its owner
    /// crashed): it finishes it, adopting a token object the owner left.
    pub until: u64,
}

/// How long a claimed operation is its owner's alone.
const OPERATION_LEASE: u64 = 60;

/// The most versions a key keeps (rotations past it are refused): every operation reads
/// the key's record, which lists them all, and a caller allowed to rotate must not be able
/// to make it grow without end.
pub const MAX_KEY_VERSIONS: usize = 1000;

/// How long a deleted key's name stays taken (an entry at `transit/deleted/<name>` that
/// expires by the store's clock, the same for every replica): longer than another replica
/// may go on using a session copy of a destroyed key (`keyvault_hsm::COPY_RECHECK`, 1 s,
/// by its own monotonic clock), with a margin for an operation under way. A key made
/// again under the name sooner would share its token labels with the deleted key while
/// such a copy of it is still used, and what that replica encrypted could not be
/// decrypted by anyone.
const DELETED_HOLD: Duration = Duration::from_secs(3);

fn deleted_path(name: &str) -> String {
    format!("transit/deleted/{name}")
}

impl TransitKey {
    /// Usable for operations: not being created or deleted.
    fn usable(&self) -> bool {
        !matches!(self.operation.as_ref().map(|o| o.kind.as_str()), Some("create" | "delete"))
    }

    fn busy(&self, now: u64) -> Option<&Operation> {
        self.operation.as_ref().filter(|o| o.until > now)
    }
}

/// [`validate_key_name`] as a regular expression (for the OpenAPI document).
pub const KEY_NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,32}$";

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
    // One spelling per version: digits, no sign, no leading zero (`v+1`, `v01` are
    // refused, so one ciphertext or signature has one text).
    if !v.bytes().all(|b| b.is_ascii_digit()) || v.starts_with('0') {
        return Err(bad());
    }
    let v: u32 = v.parse().map_err(|_| bad())?;
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
        self.load_raw(name)
            .await?
            .map(|(_, k)| k)
            .filter(TransitKey::usable)
            .ok_or_else(|| Error::NotFound(format!("no transit key {name}")))
    }

    /// Make version `v` of a key in the token, or adopt the object an owner that crashed
    /// left under that label (it was never referenced by committed state, so nothing was
    /// encrypted or signed with it). Only the holder of the key's operation calls this.
    /// Make version `v` in the token, under a claim that is safely this caller's until `ends`.
    async fn new_version(&self, name: &str, key_type: KeyType, v: u32, ends: Instant) -> Result<KeyVersionMeta> {
        let label = self.label(name, v)?;
        let l = label.clone();
        match hsm_call(&self.keys, move |k| k.generate_claimed(&l, token_kind(key_type), ends)).await {
            Ok(()) => {}
            Err(Error::Hsm(HsmError::KeyExists(_))) => {
                tracing::warn!(
                    key = name,
                    version = v,
                    "adopting the whole key under the label (left by an interrupted operation, or shown twice by the token and looked at again)"
                );
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

    fn claim(&self, kind: &str, version: u32) -> Operation {
        Operation {
            kind: kind.to_owned(),
            version,
            owner: uuid::Uuid::new_v4().simple().to_string(),
            until: unix_now().saturating_add(OPERATION_LEASE),
        }
    }

    fn conflict(name: &str) -> Error {
        Error::Conflict(format!("transit key {name} is being changed by another request; retry"))
    }

    /// After a failed token call of a claimed create or rotate: put back the metadata as
    /// it was before the claim, without a claim (the token cleans up a failed generation,
    /// or leaves what the next claimer replaces), so that the next
    /// request can go ahead at once instead of getting 409 until the claim's lease runs
    /// out. If the metadata changed meanwhile, or the call timed out, the claim expires as
    /// before. `e` is passed through.
    async fn give_back(&self, name: &str, claimed: &[u8], before: Option<&[u8]>, e: Error) -> Error {
        // A call that timed out may still be making the key in the token: no one else may
        // make its label until the claim's lease is out.
        if crate::keys::token_call_may_still_run(&e) {
            tracing::warn!(key = name, "the token did not answer a key generation; its claim expires with its lease");
            return e;
        }
        if !matches!(self.store.compare_and_swap(&key_path(name), Some(claimed), before).await, Ok(true)) {
            tracing::warn!(
                key = name,
                "could not give back the claim of a failed transit key change; it expires with its lease"
            );
        }
        e
    }

    /// Replace the stored metadata if it is still `expected`; 409 otherwise.
    async fn swap(&self, name: &str, expected: Option<&[u8]>, key: Option<&TransitKey>) -> Result<Vec<u8>> {
        let new = key.map(encode_json);
        if !self.store.compare_and_swap(&key_path(name), expected, new.as_deref()).await? {
            return Err(Self::conflict(name));
        }
        Ok(new.unwrap_or_default())
    }

    /// Create a key (version 1). Creating an existing key of the same type is a no-op; of
    /// concurrent creates of a new key, one makes it and the others get 409.
    pub async fn create(&self, name: &str, key_type: KeyType) -> Result<TransitKey> {
        let now = unix_now();
        let record = self.load_raw(name).await?;
        if record.is_none() {
            // Every version a new key may have must have a label: checked here, not at the
            // rotation that would need it (a name that fits a long key prefix for version
            // 9 only could never be rotated past it, even after a compromise).
            self.label(name, MAX_KEY_VERSIONS as u32)?;
            // A key deleted moments ago keeps its name (see `DELETED_HOLD`). Checked after
            // the record was found absent: a delete makes this entry before it removes the
            // record, so a record gone by then left its entry before. (Read the other way
            // round, a delete that ran between the two reads went unseen, and its name was
            // used again at once.)
            if self.store.get(&deleted_path(name)).await?.is_some() {
                return Err(Error::Conflict(format!(
                    "transit key {name} was deleted less than {} s ago; its name can be used again after that",
                    DELETED_HOLD.as_secs()
                )));
            }
        }
        let (expected, mut key) = match record {
            // The key exists (a rotation in progress, or one a crashed owner left, does
            // not change that): as for any existing key, nothing to do.
            Some((_, existing)) if existing.usable() => {
                if existing.key_type != key_type {
                    return Err(Error::Conflict(format!("transit key {name} exists with another type")));
                }
                return Ok(TransitKey { operation: None, ..existing });
            }
            Some((_, existing)) if existing.busy(now).is_some() => return Err(Self::conflict(name)),
            // An interrupted create (take it over) or an interrupted delete (refuse).
            Some((raw, existing)) => {
                if existing.operation.as_ref().is_some_and(|o| o.kind != "create") {
                    return Err(Self::conflict(name));
                }
                (Some(raw), existing)
            }
            None => (
                None,
                TransitKey {
                    key_type,
                    versions: BTreeMap::new(),
                    latest_version: 0,
                    min_decryption_version: 1,
                    deletion_allowed: false,
                    operation: None,
                },
            ),
        };
        let ends = crate::keys::claim_ends(Duration::from_secs(OPERATION_LEASE));
        key.operation = Some(self.claim("create", 1));
        let claimed = self.swap(name, expected.as_deref(), Some(&key)).await?;
        let v1 = match self.new_version(name, key.key_type, 1, ends).await {
            Ok(v1) => v1,
            // Given back as no key at all: an interrupted create this one took over is not
            // handed back to its slow owner (whose key this one may have replaced).
            Err(e) => return Err(self.give_back(name, &claimed, None, e).await),
        };
        key.versions.insert(1, v1);
        key.latest_version = 1;
        key.operation = None;
        self.swap(name, Some(&claimed), Some(&key)).await?;
        tracing::info!(key = name, ?key_type, "transit key created");
        Ok(key)
    }

    /// Add a version and make it the one new operations use. Of concurrent rotations one
    /// wins; the others get 409 and change nothing.
    pub async fn rotate(&self, name: &str) -> Result<TransitKey> {
        let (raw, mut key) =
            self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
        if !key.usable() && key.operation.as_ref().is_some_and(|o| o.kind != "rotate") {
            return Err(Error::NotFound(format!("no transit key {name}")));
        }
        if key.busy(unix_now()).is_some() {
            return Err(Self::conflict(name));
        }
        // A rotation a crashed owner left is finished with its version number.
        let v = match &key.operation {
            Some(o) => o.version,
            None => key.latest_version + 1,
        };
        if key.versions.len() >= MAX_KEY_VERSIONS {
            return Err(Error::invalid(format!(
                "transit key {name} has {MAX_KEY_VERSIONS} versions, the most a key keeps: create a new key for new data"
            )));
        }
        let ends = crate::keys::claim_ends(Duration::from_secs(OPERATION_LEASE));
        // Given back with an operation that has ended: a rotation this one took over is not
        // handed back to its slow owner (whose key this one may have replaced), and the
        // version is still named, since its token object may be there (made by this call
        // before it failed, or by the owner this one took over from): the next rotation
        // makes the same version number, and a delete destroys it. (Given back with no
        // operation, that object outlived a delete of the key.)
        let ended = Operation { kind: "rotate".into(), version: v, owner: String::new(), until: 0 };
        let released = encode_json(&TransitKey { operation: Some(ended), ..key.clone() });
        key.operation = Some(self.claim("rotate", v));
        let claimed = self.swap(name, Some(&raw), Some(&key)).await?;
        let meta = match self.new_version(name, key.key_type, v, ends).await {
            Ok(meta) => meta,
            Err(e) => return Err(self.give_back(name, &claimed, Some(&released), e).await),
        };
        key.versions.insert(v, meta);
        key.latest_version = v;
        key.operation = None;
        self.swap(name, Some(&claimed), Some(&key)).await?;
        tracing::info!(key = name, version = v, "transit key rotated");
        Ok(key)
    }

    /// Change settings; of concurrent changes one wins, the others get 409.
    pub async fn configure(
        &self,
        name: &str,
        min_decryption_version: Option<u32>,
        deletion_allowed: Option<bool>,
    ) -> Result<TransitKey> {
        let (raw, mut key) = self
            .load_raw(name)
            .await?
            .filter(|(_, k)| k.usable())
            .ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
        if let Some(m) = min_decryption_version {
            if m == 0 || m > key.latest_version {
                return Err(Error::invalid("min_decryption_version must be between 1 and the latest version"));
            }
            key.min_decryption_version = m;
        }
        if let Some(d) = deletion_allowed {
            key.deletion_allowed = d;
        }
        self.swap(name, Some(&raw), Some(&key)).await?;
        Ok(key)
    }

    /// Delete a key whose `deletion_allowed` is set: it is marked as being deleted (from
    /// then on it is 404 and cannot be created again), its token objects are destroyed,
    /// then the name is held for [`DELETED_HOLD`] (a create answers 409 until then) and
    /// the metadata removed. A delete interrupted half way is finished by the next.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let (raw, mut key) =
            self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no transit key {name}")))?;
        let resuming = key.operation.as_ref().is_some_and(|o| o.kind == "delete");
        if !resuming && !key.usable() {
            return Err(Error::NotFound(format!("no transit key {name}")));
        }
        if !key.deletion_allowed {
            return Err(Error::invalid("deletion is not allowed for this key (set deletion_allowed first)"));
        }
        if key.busy(unix_now()).is_some() {
            return Err(Self::conflict(name));
        }
        // The versions made, and the one an interrupted rotation or create may have left
        // in the token without committing it (recorded in the delete's claim, for a
        // delete that is itself interrupted): a key made again under this name must not
        // adopt it.
        let uncommitted =
            key.operation.as_ref().map(|o| o.version).filter(|v| *v != 0 && !key.versions.contains_key(v));
        let mut versions: Vec<u32> = key.versions.keys().copied().collect();
        versions.extend(uncommitted);
        key.operation = Some(self.claim("delete", uncommitted.unwrap_or(0)));
        let claimed = self.swap(name, Some(&raw), Some(&key)).await?;
        for v in versions {
            let label = self.label(name, v)?;
            hsm_call(&self.keys, move |k| k.destroy(&label)).await?;
        }
        // The name stays taken for a while (see `DELETED_HOLD`), from before the record
        // goes: a create reads this entry first. One left by an earlier attempt of this
        // delete is older, and its objects were destroyed as long ago.
        self.store.insert_if_absent(&deleted_path(name), b"", Some(DELETED_HOLD)).await?;
        self.swap(name, Some(&claimed), None).await?;
        tracing::info!(key = name, "transit key deleted");
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (k, raw) in crate::store::scan_all(self.store.as_ref(), PREFIX).await? {
            let key: TransitKey = decode_json(&k, &raw)?;
            if key.usable() {
                names.push(k[PREFIX.len()..].to_owned());
            }
        }
        if names.is_empty() {
            return Err(Error::NotFound("no transit keys".into()));
        }
        Ok(names)
    }

    pub fn usable(key: &TransitKey, v: u32) -> Result<()> {
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
        self.encrypt_with(name, key, key.latest_version, plaintext, aad).await
    }

    /// Encrypt under version `v` (checked by the caller: [`Transit::usable`]).
    pub async fn encrypt_with(
        &self,
        name: &str,
        key: &TransitKey,
        v: u32,
        plaintext: Zeroizing<Vec<u8>>,
        aad: Vec<u8>,
    ) -> Result<String> {
        if key.key_type != KeyType::Aes256Gcm96 {
            return Err(Error::invalid("this key does not support encryption"));
        }
        let label = self.label(name, v)?;
        let ct = match hsm_call(&self.keys, move |k| k.encrypt_aes_gcm(&label, &plaintext, &aad)).await {
            Err(e) => return Err(self.deleted_meanwhile(name, e).await),
            Ok(ct) => ct,
        };
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
            Err(e) => Err(self.deleted_meanwhile(name, e).await),
            ok => ok,
        }
    }

    /// A token call on key `name` failed with `e`: if the key's object is missing because
    /// the key was deleted (or the version trimmed) after this request loaded it, that is
    /// a 404, not a key missing from the HSM (500, and a health alarm).
    async fn deleted_meanwhile(&self, name: &str, e: Error) -> Error {
        if !matches!(e, Error::Hsm(HsmError::KeyNotFound(_))) {
            return e;
        }
        match self.load_raw(name).await {
            Ok(Some((_, k))) if TransitKey::usable(&k) => e,
            Ok(_) => Error::NotFound(format!("transit key {name} was deleted")),
            Err(_) => e,
        }
    }

    /// Re-encrypt under the latest version; the plaintext never leaves this function.
    pub async fn rewrap(&self, name: &str, key: &TransitKey, v: u32, ciphertext: &str, aad: Vec<u8>) -> Result<String> {
        let plaintext = self.decrypt(name, key, ciphertext, aad.clone()).await?;
        self.encrypt_with(name, key, v, plaintext, aad).await
    }

    /// A fresh 256-bit data key and its encryption under the named key.
    pub async fn datakey(&self, name: &str, key: &TransitKey, aad: Vec<u8>) -> Result<(Zeroizing<Vec<u8>>, String)> {
        let dk = Zeroizing::new(crate::barrier::random::<32>()?.to_vec());
        let ct = self.encrypt(name, key, dk.clone(), aad).await?;
        Ok((dk, ct))
    }

    /// Sign inside the token with version `v` (checked by the caller: [`Transit::usable`]).
    pub async fn sign(&self, name: &str, key: &TransitKey, v: u32, input: Vec<u8>) -> Result<String> {
        if key.key_type != KeyType::Ed25519 {
            return Err(Error::invalid("this key does not support signing"));
        }
        let label = self.label(name, v)?;
        let sig = match hsm_call(&self.keys, move |k| k.sign_ed25519(&label, &input)).await {
            Err(e) => return Err(self.deleted_meanwhile(name, e).await),
            Ok(sig) => sig,
        };
        Ok(format_versioned(v, &sig))
    }

    /// The verifying keys of every version at or above `min_decryption_version`.
    pub fn public_keys(key: &TransitKey) -> Result<Vec<(u32, VerifyingKey)>> {
        key.versions
            .range(key.min_decryption_version..)
            .map(|(v, meta)| Ok((*v, Self::public_key(*v, meta)?)))
            .collect()
    }

    /// The verifying key of one version.
    fn public_key(v: u32, meta: &KeyVersionMeta) -> Result<VerifyingKey> {
        let raw = meta.public_key.as_deref().ok_or_else(|| Error::invalid("this key does not support verification"))?;
        let raw: [u8; 32] = STANDARD
            .decode(raw)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Internal(format!("stored public key of version {v} is corrupt")))?;
        VerifyingKey::from_bytes(&raw).map_err(|e| Error::Internal(format!("public key: {e}")))
    }

    /// Verify a `vault:v<N>:` signature in process.
    pub fn verify(key: &TransitKey, input: &[u8], signature: &str) -> Result<bool> {
        if key.key_type != KeyType::Ed25519 {
            return Err(Error::invalid("this key does not support verification"));
        }
        let (v, sig) = parse_versioned(signature)?;
        Self::usable(key, v)?;
        // Only the version named is decoded: a key rotated a thousand times costs a
        // verification no more than a new one.
        let Some(meta) = key.versions.get(&v).filter(|_| v >= key.min_decryption_version) else {
            return Ok(false);
        };
        let vk = Self::public_key(v, meta)?;
        let Ok(sig) = Signature::from_slice(&sig) else { return Ok(false) };
        Ok(vk.verify_strict(input, &sig).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One text per version: a sign, a leading zero or no digits at all are refused.
    #[test]
    fn versioned_texts_have_one_spelling() {
        assert_eq!(parse_versioned("vault:v12:AAAA").unwrap(), (12, vec![0, 0, 0]));
        for bad in
            ["vault:v+1:AAAA", "vault:v01:AAAA", "vault:v0:AAAA", "vault:v:AAAA", "vault:v-1:AAAA", "vault:v 1:AAAA"]
        {
            assert!(parse_versioned(bad).is_err(), "{bad}");
        }
        assert!(parse_versioned("vault:v4294967296:AAAA").is_err(), "past u32");
    }

    /// A key keeps at most `MAX_KEY_VERSIONS` versions: the rotation past it is refused
    /// and changes nothing.
    #[tokio::test]
    async fn rotations_stop_at_the_most_versions_a_key_keeps() {
        let k = crate::test_support::Keyed::new().await;
        let t = Transit::new(k.store.clone(), k.keys.clone(), k.names.clone());
        let key = t.create("k", KeyType::Aes256Gcm96).await.unwrap();
        // As if rotated to the limit (the record only: no token call is made past it).
        let mut full = key.clone();
        for v in 2..=MAX_KEY_VERSIONS as u32 {
            full.versions.insert(v, key.versions[&1].clone());
        }
        full.latest_version = MAX_KEY_VERSIONS as u32;
        k.store.put(&key_path("k"), &encode_json(&full)).await.unwrap();
        let e = t.rotate("k").await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(ref m) if m.contains("the most a key keeps")), "{e:?}");
        assert_eq!(t.get("k").await.unwrap().latest_version, MAX_KEY_VERSIONS as u32);
        assert!(!k.keys.exists(&t.label("k", MAX_KEY_VERSIONS as u32 + 1).unwrap()).unwrap());
    }

    /// As if `name` had been deleted [`DELETED_HOLD`] ago.
    async fn lift_hold(k: &crate::test_support::Keyed, name: &str) {
        assert!(k.store.delete(&deleted_path(name)).await.unwrap(), "no hold on the name");
    }

    /// A deleted key's name stays taken for `DELETED_HOLD`: a create answers 409 (another
    /// replica may still use a session copy of the destroyed key for up to a second, and
    /// a key made again would share its labels); the key is gone for everything else
    /// (404, not listed); after the hold, the name is free.
    #[tokio::test]
    async fn a_deleted_keys_name_is_taken_for_a_while() {
        let k = crate::test_support::Keyed::new().await;
        let t = Transit::new(k.store.clone(), k.keys.clone(), k.names.clone());
        t.create("k", KeyType::Aes256Gcm96).await.unwrap();
        t.create("other", KeyType::Aes256Gcm96).await.unwrap();
        t.configure("k", None, Some(true)).await.unwrap();
        t.delete("k").await.unwrap();
        let again = t.create("k", KeyType::Aes256Gcm96).await.unwrap_err();
        assert!(matches!(again, Error::Conflict(ref m) if m.contains("deleted less than")), "{again:?}");
        assert!(matches!(t.get("k").await, Err(Error::NotFound(_))));
        assert!(matches!(t.rotate("k").await, Err(Error::NotFound(_))));
        assert!(matches!(t.configure("k", None, Some(true)).await, Err(Error::NotFound(_))));
        assert!(matches!(t.delete("k").await, Err(Error::NotFound(_))));
        assert_eq!(t.list().await.unwrap(), vec!["other".to_owned()]);

        lift_hold(&k, "k").await;
        let made = t.create("k", KeyType::Ed25519).await.unwrap();
        assert_eq!((made.latest_version, made.key_type, made.operation), (1, KeyType::Ed25519, None));
        assert_eq!(t.get("k").await.unwrap().key_type, KeyType::Ed25519);
    }

    /// A rotation whose owner crashed after making its version in the token (its claim
    /// expired, its version not committed): creating the key again is the no-op it is
    /// for any existing key (it was 409), and deleting the key destroys that version's
    /// token object too, even when the delete is itself interrupted and finished by
    /// another (it was left, for a key made again under the name to adopt).
    #[tokio::test]
    async fn an_interrupted_rotation_neither_blocks_a_create_nor_outlives_a_delete() {
        let k = crate::test_support::Keyed::new().await;
        let t = Transit::new(k.store.clone(), k.keys.clone(), k.names.clone());
        // The record of `key` with an operation of `kind` on `version` whose owner is gone.
        let interrupted = |key: &TransitKey, kind: &str, version: u32| {
            let mut key = key.clone();
            key.operation = Some(Operation { kind: kind.into(), version, owner: "gone".into(), until: unix_now() - 1 });
            encode_json(&key)
        };
        for interrupted_delete in [false, true] {
            t.create("k", KeyType::Aes256Gcm96).await.unwrap();
            let key = t.configure("k", None, Some(true)).await.unwrap();
            let ends = crate::keys::claim_ends(Duration::from_secs(OPERATION_LEASE));
            t.new_version("k", KeyType::Aes256Gcm96, 2, ends).await.unwrap();
            k.store.put(&key_path("k"), &interrupted(&key, "rotate", 2)).await.unwrap();
            let label = t.label("k", 2).unwrap();
            assert!(k.keys.exists(&label).unwrap());

            let again = t.create("k", KeyType::Aes256Gcm96).await.unwrap();
            assert_eq!((again.latest_version, &again.operation), (1, &None));
            if interrupted_delete {
                // A delete that claimed the key and stopped before the token calls.
                k.store.put(&key_path("k"), &interrupted(&again, "delete", 2)).await.unwrap();
            }
            t.delete("k").await.unwrap();
            assert!(!k.keys.exists(&label).unwrap(), "version 2 of the deleted key is left in the token");
            assert!(!k.keys.exists(&t.label("k", 1).unwrap()).unwrap());
            lift_hold(&k, "k").await;
        }
    }

    /// A name is taken only if every version the key may have gets a label under this
    /// installation's key prefix: with a 20-character prefix a 32-character name is
    /// refused at create (before, it was made, and its rotation to version 10 failed for
    /// good), a 29-character one is made and rotates past version 9.
    #[tokio::test]
    async fn a_key_name_fits_every_version_it_may_have() {
        let k = crate::test_support::Keyed::new().await;
        let names = KeyNames::new(&"p".repeat(20)).unwrap();
        let t = Transit::new(k.store.clone(), k.keys.clone(), names);
        let e = t.create(&"n".repeat(32), KeyType::Aes256Gcm96).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(ref m) if m.contains("too long")), "{e:?}");
        assert!(t.load_raw(&"n".repeat(32)).await.unwrap().is_none());
        let name = "n".repeat(29);
        t.create(&name, KeyType::Aes256Gcm96).await.unwrap();
        for _ in 0..9 {
            t.rotate(&name).await.unwrap();
        }
        assert_eq!(t.get(&name).await.unwrap().latest_version, 10);
        assert!(t.label(&name, MAX_KEY_VERSIONS as u32).is_ok());
    }

    /// A delete that runs to its end between a create's reads is seen: the create answers
    /// 409, and the deleted name is not used again at once. (The create read the hold
    /// first, found none, then found no record: it made version 1 again, milliseconds
    /// after the old one was destroyed.)
    #[tokio::test]
    async fn a_create_does_not_miss_a_delete_that_ends_between_its_reads() {
        use crate::test_support::{Keyed, PauseAt, TestStore};
        let k = Keyed::new().await;
        let t = Transit::new(k.store.clone(), k.keys.clone(), k.names.clone());
        t.create("k", KeyType::Aes256Gcm96).await.unwrap();
        t.configure("k", None, Some(true)).await.unwrap();
        // The create's read of the record, or of the hold, is held (if the create makes
        // it), and the whole delete runs meanwhile.
        for held_read in [key_path("k"), deleted_path("k")] {
            let paused = Arc::new(TestStore::holding(k.store.clone(), PauseAt::Get, &held_read));
            let slow = Transit::new(paused.clone(), k.keys.clone(), k.names.clone());
            paused.arm();
            let create = tokio::spawn(async move { slow.create("k", KeyType::Aes256Gcm96).await });
            let held = tokio::time::timeout(Duration::from_secs(2), paused.reached.notified()).await.is_ok();
            if held {
                t.delete("k").await.unwrap();
                paused.go.notify_one();
            }
            match create.await.unwrap() {
                // The create found the key there: it answered with it, as a create that
                // came before the delete.
                Ok(key) => assert_eq!(key.latest_version, 1),
                Err(Error::Conflict(m)) => assert!(m.contains("deleted less than"), "{m}"),
                Err(e) => panic!("holding the read of {held_read}: {e:?}"),
            }
            if !held {
                paused.go.notify_one(); // (in case the read comes after all)
                t.delete("k").await.unwrap();
            }
            assert!(t.load_raw("k").await.unwrap().is_none(), "the deleted name was used again at once");
            assert!(!k.keys.exists(&t.label("k", 1).unwrap()).unwrap());
            lift_hold(&k, "k").await;
            t.create("k", KeyType::Aes256Gcm96).await.unwrap();
            t.configure("k", None, Some(true)).await.unwrap();
        }
    }

    /// A verification decodes the public key of the version it names, not of every
    /// version kept: with 5,000 versions whose other keys would not even decode, version
    /// 1's signature verifies. (Before, every version's key was decoded per item.)
    #[test]
    fn a_verification_decodes_only_the_version_it_names() {
        use ed25519_dalek::Signer;
        let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut versions = BTreeMap::new();
        versions.insert(
            1,
            KeyVersionMeta {
                creation_time: "2026-01-01T00:00:00Z".into(),
                public_key: Some(STANDARD.encode(signer.verifying_key().as_bytes())),
            },
        );
        for v in 2..=5000 {
            versions.insert(
                v,
                KeyVersionMeta { creation_time: "2026-01-01T00:00:00Z".into(), public_key: Some("corrupt".into()) },
            );
        }
        let key = TransitKey {
            key_type: KeyType::Ed25519,
            versions,
            latest_version: 5000,
            min_decryption_version: 1,
            deletion_allowed: false,
            operation: None,
        };
        let sig = format_versioned(1, &signer.sign(b"message").to_bytes());
        assert!(Transit::verify(&key, b"message", &sig).unwrap());
        assert!(!Transit::verify(&key, b"other", &sig).unwrap());
        let below = TransitKey { min_decryption_version: 2, ..key };
        assert!(Transit::verify(&below, b"message", &sig).is_err(), "below min_decryption_version");
    }
}
