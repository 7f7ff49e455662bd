//! The `KeyStore` trait: everything the rest of KeyVault may ask of a key store.
//!
//! It is deliberately narrow. There is no operation that returns a private or secret
//! key's value: keys are generated inside the token and only their public halves, and
//! the results of operations with them, come out.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::{HsmError, Result};

/// The name of a key object in the token (`CKA_LABEL`). Parse, don't validate: a
/// `KeyLabel` always holds 1 to 64 characters of `[A-Za-z0-9._/-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyLabel(String);

impl KeyLabel {
    pub const MAX_LEN: usize = 64;

    pub fn new(label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let ok = !label.is_empty()
            && label.len() <= Self::MAX_LEN
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
        if ok {
            Ok(KeyLabel(label))
        } else {
            Err(HsmError::BadAttribute("key label must be 1-64 characters of [A-Za-z0-9._/-]"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The kinds of key the token generates for KeyVault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// AES-256 secret key: master keys (KEKs) and AES transit keys.
    Aes256,
    /// Ed25519 key pair: token signing, audit checkpoints, transit signing keys.
    Ed25519,
    /// 256-bit generic secret for HMAC-SHA256 (keyed hashes of AppRole secret ids, audit HMACs).
    HmacSha256,
    /// AES-256 for encrypting data with AES-GCM in the token (transit keys), whatever
    /// mechanism the token wraps data keys with.
    Aes256Gcm,
}

/// How a data key was wrapped; recorded in the first byte of every wrapped key so that a
/// token (or configuration) change never strands old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapMechanism {
    /// `CKM_AES_GCM` via `C_Encrypt`/`C_Decrypt`: 12-byte random IV, 16-byte tag,
    /// associated data bound. Preferred: authenticated, binds the context, and needs no
    /// key object for the data key (FACTS: 2.7x the rate of `C_WrapKey` on SoftHSM).
    AesGcm = 1,
    /// `CKM_AES_KEY_WRAP_PAD` (RFC 5649) via `C_WrapKey`/`C_UnwrapKey`: for tokens that do
    /// not offer AES-GCM; authenticated by its integrity check value, no associated data.
    AesKeyWrapPad = 2,
}

impl WrapMechanism {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(WrapMechanism::AesGcm),
            2 => Some(WrapMechanism::AesKeyWrapPad),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WrapMechanism::AesGcm => "CKM_AES_GCM",
            WrapMechanism::AesKeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
        }
    }
}

/// A key store backed by a PKCS#11 token (the only implementation today, but the seam
/// every other crate talks to). All calls block: async callers run them on a blocking
/// thread.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// Generate a new key inside the token: persistent, private, sensitive, not
    /// extractable, and read back as such before this returns.
    ///
    /// The caller holds a claim on `label` in KeyVault's store until `claim_ends` (a
    /// pending version in the keyring, a transit key's operation, an initialization or
    /// start-up claim), so no other caller, in this process or another, makes the label
    /// meanwhile. What is already under the label was then made by an earlier claimer
    /// that did not finish, and no committed state names it: a whole key of `kind` (one
    /// protected object of its class and key type, generated in the token, and one public
    /// half for Ed25519) gives [`HsmError::KeyExists`] (the caller adopts it); anything
    /// else (half a key pair, an unprotected object, a key of another kind, two objects)
    /// is destroyed and the key made afresh. A generation the token fails with
    /// `CKR_GENERAL_ERROR` or stores wrongly is cleaned up and tried again, a few times;
    /// other errors return at once and may leave objects under the label for the next
    /// claimer to replace. Past `claim_ends` nothing more is made or destroyed
    /// ([`HsmError::ClaimExpired`]): another claimer may own the label by then.
    fn generate_claimed(&self, label: &KeyLabel, kind: KeyKind, claim_ends: Instant) -> Result<()>;

    /// [`KeyStore::generate_claimed`] with a claim that does not end: for tests, and for
    /// tools that own the token alone.
    fn generate(&self, label: &KeyLabel, kind: KeyKind) -> Result<()> {
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        self.generate_claimed(label, kind, far)
    }

    /// True if any token object carries this label (a key, or part of one).
    fn exists(&self, label: &KeyLabel) -> Result<bool>;

    /// Labels of the keys whose label starts with `prefix` (one entry per key, not per
    /// object of a key pair), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<KeyLabel>>;

    /// Destroy every object carrying this label. Returns false if there was none. Two
    /// objects of one class under the label are refused with
    /// [`HsmError::DuplicateLabel`]: which one is the key is not for this call to settle.
    fn destroy(&self, label: &KeyLabel) -> Result<bool>;

    /// Wrap a data key (16 to 64 bytes) under the AES key `kek`, binding `aad` where the
    /// mechanism allows it. Output: one mechanism byte, then the mechanism's output.
    fn wrap_key(&self, kek: &KeyLabel, key: &[u8], aad: &[u8]) -> Result<Vec<u8>>;

    /// Unwrap what [`KeyStore::wrap_key`] produced; any tampering gives
    /// [`HsmError::InvalidCiphertext`].
    fn unwrap_key(&self, kek: &KeyLabel, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// AES-256-GCM encryption of `plaintext` inside the token under `label` (a
    /// [`KeyKind::Aes256Gcm`] key): returns `iv (12) || ciphertext || tag (16)`, random IV.
    fn encrypt_aes_gcm(&self, label: &KeyLabel, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>>;

    /// The inverse of [`KeyStore::encrypt_aes_gcm`]; tampering gives
    /// [`HsmError::InvalidCiphertext`].
    fn decrypt_aes_gcm(&self, label: &KeyLabel, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// Sign `message` with the Ed25519 private key `label` (`CKM_EDDSA`, pure Ed25519).
    fn sign_ed25519(&self, label: &KeyLabel, message: &[u8]) -> Result<[u8; 64]>;

    /// The 32-byte Ed25519 public key of the pair `label`.
    fn ed25519_public_key(&self, label: &KeyLabel) -> Result<[u8; 32]>;

    /// HMAC-SHA256 of `message` under the generic secret `label`, computed in the token.
    fn hmac_sha256(&self, label: &KeyLabel, message: &[u8]) -> Result<[u8; 32]>;

    /// `len` bytes from the token's random number generator (`C_GenerateRandom`).
    fn random_bytes(&self, len: usize) -> Result<Zeroizing<Vec<u8>>>;

    /// Re-initialise the module (`C_Finalize`, `C_Initialize`) and find the token again:
    /// how a token that went away and came back is found, where the library only looks
    /// for tokens when it is initialised (SoftHSM). The caller guarantees that no other
    /// call into the module is in flight (KeyVault holds its token gate exclusively).
    /// Ok(true) when the token is there afterwards.
    fn reinitialize(&self) -> Result<bool> {
        Ok(false)
    }

    /// The mechanism new wraps use.
    fn wrap_mechanism(&self) -> WrapMechanism;

    /// Emergency seal: close every session (which logs the application out of the
    /// token), forget every object handle and the PIN. Until [`KeyStore::unseal`], every
    /// call fails with [`HsmError::Sealed`]. Calls running when it is sealed finish; their
    /// sessions are closed, not reused.
    fn seal(&self);

    /// Log in again with `pin`. A PIN the token refuses leaves the store sealed (and
    /// counts against the token's PIN retry limit, as any login does). Unsealing a store
    /// that is not sealed checks nothing and succeeds.
    fn unseal(&self, pin: SecretString) -> Result<()>;

    /// True between [`KeyStore::seal`] and a successful [`KeyStore::unseal`].
    fn is_sealed(&self) -> bool;
}
