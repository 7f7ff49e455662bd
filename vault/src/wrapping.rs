//! Response wrapping (Vault's): a reply is sealed and stored, and the caller gets a
//! single-use wrapping token instead. Whoever holds the token unwraps the reply once; a
//! second unwrap fails, so a deployer can hand a unit its secret id without seeing it,
//! and the unit knows if someone else did.
//!
//! A wrapping token is 256 random bits (`kvw.<hex>`), stored only as a keyed hash computed
//! in the HSM (like bootstrap tokens). The reply is sealed under its own data key, wrapped
//! by the wrapping key in the HSM (`keyvault/wrapping/v1`, which master key rotation does
//! not touch: a wrapped reply lives at most [`MAX_TTL`]). Unwrapping deletes the record
//! first: of two concurrent unwraps exactly one gets the reply.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyvault_hsm::KeyStore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::barrier::{decrypt_value, encrypt_value, random};
use crate::error::{Error, Result};
use crate::hsm_call;
use crate::keys::{KeyNames, SharedKeyring, keyed_hash};
use crate::store::{Store, decode_json, encode_json};
use crate::unix_now;

/// The longest a wrapped reply waits to be unwrapped.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// A wrapping TTL is 1 s to [`MAX_TTL`].
pub fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(Error::invalid("the wrapping TTL is 1 s to 24 h"));
    }
    Ok(())
}

const PREFIX: &str = "sys/wrapping/";

/// A wrapped reply as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    accessor: String,
    creation_time: u64,
    ttl: u64,
    creation_path: String,
    /// The data key, wrapped by the wrapping key (base64).
    wrapped_dek: String,
    nonce: String,
    ciphertext: String,
}

/// What a wrapping produced (the reply's `wrap_info`).
pub struct WrapInfo {
    pub token: SecretString,
    pub accessor: String,
    pub ttl: u64,
    pub creation_time: u64,
    pub creation_path: String,
}

impl std::fmt::Debug for WrapInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapInfo").field("accessor", &self.accessor).finish_non_exhaustive()
    }
}

/// What `sys/wrapping/lookup` tells of a wrapping token.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub creation_time: u64,
    pub ttl: u64,
    pub creation_path: String,
}

#[derive(Debug)]
pub struct Wrapping {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
}

fn invalid() -> Error {
    Error::invalid("wrapping token is not valid or does not exist")
}

fn aad(key: &str) -> Vec<u8> {
    format!("keyvault.wrapping.v1\0{key}").into_bytes()
}

impl Wrapping {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring) -> Self {
        Wrapping { store, keys, names, keyring }
    }

    async fn key_of(&self, token: &str) -> Result<String> {
        // The exact form tokens are made in (`wrap`): anything else is refused before the
        // keyed hash, which costs a token call an anonymous caller could otherwise spend.
        let well_formed = token
            .strip_prefix("kvw.")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        if !well_formed {
            return Err(invalid());
        }
        let mac =
            keyed_hash(&self.keys, &self.names, &self.keyring, "keyvault.wrapping.v1", &[token.as_bytes()]).await?;
        Ok(format!("{PREFIX}{}", hex::encode(mac)))
    }

    /// Seal `reply` and store it for `ttl`; the wrapping token.
    pub async fn wrap(&self, reply: &[u8], ttl: Duration, creation_path: &str) -> Result<WrapInfo> {
        check_ttl(ttl)?;
        let token = SecretString::from(format!("kvw.{}", hex::encode(random::<32>()?)));
        let accessor = hex::encode(random::<12>()?);
        let key = self.key_of(token.expose_secret()).await?;
        let dek = Zeroizing::new(random::<32>()?);
        let nonce = random::<12>()?;
        let ciphertext = encrypt_value(&dek, &nonce, &aad(&key), reply)?;
        let label = self.names.wrapping();
        let (d, a) = (Zeroizing::new(dek.to_vec()), aad(&key));
        let wrapped = hsm_call(&self.keys, move |k| k.wrap_key(&label, &d, &a)).await?;
        let stored = Stored {
            accessor: accessor.clone(),
            creation_time: unix_now(),
            ttl: ttl.as_secs(),
            creation_path: creation_path.to_owned(),
            wrapped_dek: STANDARD.encode(wrapped),
            nonce: STANDARD.encode(nonce),
            ciphertext: STANDARD.encode(ciphertext),
        };
        if !self.store.insert_if_absent(&key, &encode_json(&stored), Some(ttl)).await? {
            return Err(Error::Internal("wrapping token collision".into()));
        }
        Ok(WrapInfo {
            token,
            accessor,
            ttl: ttl.as_secs(),
            creation_time: stored.creation_time,
            creation_path: creation_path.to_owned(),
        })
    }

    async fn load(&self, token: &str) -> Result<(String, Vec<u8>, Stored)> {
        let key = self.key_of(token).await?;
        let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
        let stored: Stored = decode_json(&key, &raw)?;
        Ok((key, raw, stored))
    }

    async fn open(&self, key: &str, stored: &Stored) -> Result<Zeroizing<Vec<u8>>> {
        let b64 = |s: &str| STANDARD.decode(s).map_err(|_| Error::Internal("stored wrapped reply".into()));
        let (wrapped, a, label) = (b64(&stored.wrapped_dek)?, aad(key), self.names.wrapping());
        let dek = hsm_call(&self.keys, move |k| k.unwrap_key(&label, &wrapped, &a)).await?;
        let nonce: [u8; 12] =
            b64(&stored.nonce)?.try_into().map_err(|_| Error::Internal("stored wrapped reply".into()))?;
        decrypt_value(&dek, &nonce, &aad(key), &b64(&stored.ciphertext)?)
    }

    /// The wrapped reply, once. It is opened first and consumed second: of concurrent
    /// unwraps only the one whose delete removed the record returns it, and an unwrap that
    /// fails to open it (the token unavailable) leaves it for the next try.
    pub async fn unwrap(&self, token: &str) -> Result<(Zeroizing<Vec<u8>>, String)> {
        let (key, _, stored) = self.load(token).await?;
        let reply = self.open(&key, &stored).await?;
        if !self.store.delete(&key).await? {
            return Err(invalid());
        }
        Ok((reply, stored.accessor))
    }

    pub async fn lookup(&self, token: &str) -> Result<Lookup> {
        let (_, _, s) = self.load(token).await?;
        Ok(Lookup { creation_time: s.creation_time, ttl: s.ttl, creation_path: s.creation_path })
    }

    /// A new wrapping token for the same reply (with its remaining TTL); the old one is
    /// spent.
    /// The new one is stored before the old one is consumed, so a failure on the way
    /// (the token unavailable) loses nothing; of concurrent uses of the old token only one
    /// wins, and a rewrap that lost takes its new record back.
    pub async fn rewrap(&self, token: &str) -> Result<WrapInfo> {
        let (key, _, stored) = self.load(token).await?;
        let reply = self.open(&key, &stored).await?;
        let left = (stored.creation_time + stored.ttl).saturating_sub(unix_now()).max(1);
        let info = self.wrap(&reply, Duration::from_secs(left), &stored.creation_path).await?;
        if !self.store.delete(&key).await? {
            let new_key = self.key_of(info.token.expose_secret()).await?;
            self.store.delete(&new_key).await?;
            return Err(invalid());
        }
        Ok(info)
    }
}
