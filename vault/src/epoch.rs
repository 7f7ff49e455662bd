//! The epoch key tier (docs/architecture.md, "Key hierarchy: epoch keys").
//!
//! One AES-256 epoch key per master key version. It is generated from the token's random
//! number generator, wrapped by that master key version inside the token, and stored
//! wrapped at `sys/epoch/<version>`; each replica unwraps it once (at the first record it
//! seals or opens under that version) and keeps it in locked, zeroized memory. Data keys
//! of new records are then wrapped by the epoch key in process, so a read or write touches
//! the token only when an epoch key is first needed: at start-up, after a rotation, after
//! an unseal.
//!
//! The master key never leaves the token; the epoch key does (into this process), which is
//! the trade HashiCorp Vault's keyring makes too: an attacker who can read this process's
//! memory can read every record sealed under a loaded epoch key, where with the token tier
//! (`[secrets] key_tier = "token"`) they could read only the data keys in use at that
//! moment. A master key rotation makes a new epoch key and re-wraps every record under it;
//! retiring the old master version deletes the stored epoch key and every replica drops
//! its copy; the emergency seal drops every copy at once.
//!
//! Wrapped data key format (the record's `wrapped_dek`):
//!
//! ```text
//! 0x45 ('E') | nonce: 12 | AES-256-GCM(epoch key, dek, aad = dek_aad) ciphertext+tag: 48
//! ```
//!
//! The record header's key version names the epoch key (and so the master key version
//! that wraps it); the first byte never collides with a token wrap mechanism byte.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use keyvault_hsm::KeyStore;
use zeroize::Zeroizing;

use crate::error::{BarrierError, Error, Result};
use crate::hsm_call;
use crate::keys::{KeyNames, KeyVersion};
use crate::store::Store;

/// First byte of a data key wrapped by an epoch key.
pub const EPOCH_WRAP: u8 = 0x45;
const NONCE_LEN: usize = 12;
/// Length of a wrapped 256-bit data key: marker, nonce, key, tag.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + 32 + 16;

/// Where the wrapped epoch key of master version `v` is stored.
pub fn storage_key(v: KeyVersion) -> String {
    format!("{STORAGE_PREFIX}{}", v.get())
}

/// Where the wrapped epoch keys are stored, one per master version.
pub const STORAGE_PREFIX: &str = "sys/epoch/";

/// Associated data of an epoch key's wrap in the token: it binds the blob to its version.
fn wrap_aad(v: KeyVersion) -> Vec<u8> {
    let mut aad = b"keyvault.epoch.v1\0".to_vec();
    aad.extend_from_slice(&v.get().to_be_bytes());
    aad
}

/// One epoch key in memory: on the heap, locked against swapping where the system allows
/// it, zeroized when dropped.
pub struct EpochKey {
    /// The key in the first 32 bytes of a page of its own: locking it locks nothing else,
    /// and unlocking it (when the key is dropped) unlocks nothing else.
    page: Box<Zeroizing<KeyPage>>,
    /// The page's lock, released in [`Drop`] after the key is zeroized and before its
    /// memory is freed. (Released after the free, as field order had it, the unlock could
    /// undo the lock of another key placed in the freed page meanwhile: locks of one page
    /// do not nest.)
    locked: Option<region::LockGuard>,
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self.page.as_mut());
        drop(self.locked.take());
    }
}

/// A page-sized, page-aligned block (4 KiB; on systems with larger pages, a lock covers
/// the larger page: see [`EpochKey::new`]).
#[repr(C, align(4096))]
struct KeyPage([u8; 4096]);

impl zeroize::Zeroize for KeyPage {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochKey(..)")
    }
}

impl EpochKey {
    pub(crate) fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            return Err(Error::Barrier(BarrierError::Malformed("epoch key is not 256 bits")));
        }
        // Straight into its page: no other copy of the key.
        let mut page = Box::new(Zeroizing::new(KeyPage([0; 4096])));
        page.0[..32].copy_from_slice(bytes);
        // With all memory locked (`mlockall`), the page is locked already, and a lock of
        // its own would, when the key is dropped, unlock the page (munlock does not count)
        // for good, whatever of the process lands in it later.
        let locked = if crate::hardening::all_memory_locked() {
            None
        } else {
            match region::lock(page.0.as_ptr(), 32) {
                Ok(g) => Some(g),
                Err(e) => {
                    static WARN: crate::ratelog::RateLimitedLog = crate::ratelog::RateLimitedLog::new();
                    WARN.warn("cannot lock an epoch key in memory; it may be swapped out", &e);
                    None
                }
            }
        };
        Ok(EpochKey { page, locked })
    }

    fn key(&self) -> &[u8; 32] {
        self.page.0.first_chunk().expect("a page holds 32 bytes")
    }

    /// Wrap a data key for `aad` (the record context's `dek_aad`, see the barrier).
    pub fn wrap(&self, dek: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| Error::Internal(format!("OS RNG failed: {e}")))?;
        let cipher = Aes256Gcm::new(self.key().into());
        let sealed = cipher
            .encrypt((&nonce).into(), Payload { msg: dek, aad })
            .map_err(|_| Error::Internal("AES-GCM encryption failed".into()))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(EPOCH_WRAP);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Unwrap a data key wrapped by [`EpochKey::wrap`]; any damage is an integrity error.
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if wrapped.len() != WRAPPED_LEN || wrapped[0] != EPOCH_WRAP {
            return Err(Error::Barrier(BarrierError::Integrity));
        }
        let (nonce, sealed) = wrapped[1..].split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Error::Barrier(BarrierError::Integrity))?;
        let cipher = Aes256Gcm::new(self.key().into());
        cipher
            .decrypt((&nonce).into(), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| Error::Barrier(BarrierError::Integrity))
    }
}

/// Whether a wrapped data key was wrapped by an epoch key (rather than in the token).
pub fn is_epoch_wrapped(wrapped: &[u8]) -> bool {
    wrapped.first() == Some(&EPOCH_WRAP)
}

/// This replica's epoch keys, loaded on first use.
pub struct EpochKeys {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    loaded: RwLock<HashMap<KeyVersion, Arc<EpochKey>>>,
    /// Bumped (under `loaded`'s write lock) each time keys are dropped ([`EpochKeys::forget`],
    /// and [`EpochKeys::keep_only`] when it drops one): a load that began before does not
    /// put its key back.
    generation: std::sync::atomic::AtomicU64,
    /// One load at a time (a burst of first reads after start-up unwraps once).
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKeys").field("loaded", &self.loaded_count()).finish_non_exhaustive()
    }
}

impl EpochKeys {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames) -> Self {
        EpochKeys {
            store,
            keys,
            names,
            loaded: RwLock::new(HashMap::new()),
            generation: Default::default(),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The epoch key of master version `v` if this replica holds it already.
    pub fn cached(&self, v: KeyVersion) -> Option<Arc<EpochKey>> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).get(&v).cloned()
    }

    /// The epoch key of master version `v`: from memory, else unwrapped in the token from
    /// storage. With `create`, one is made if the version has none yet (of concurrent
    /// creators, on any replica, the first stored wins and the others adopt it). Without
    /// it, a version that has none is an integrity error (a record names a key that was
    /// never made).
    pub async fn get(&self, v: KeyVersion, create: bool) -> Result<Arc<EpochKey>> {
        if let Some(k) = self.cached(v) {
            return Ok(k);
        }
        let _one = self.loading.lock().await;
        if let Some(k) = self.cached(v) {
            return Ok(k);
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let at = storage_key(v);
        let blob = match self.store.get(&at).await? {
            Some(b) => b,
            None if create => {
                let fresh = self.generate(v).await?;
                if self.store.insert_if_absent(&at, &fresh, None).await? {
                    tracing::info!(master = %v, "made the epoch key of a master key version");
                    fresh
                } else {
                    self.store.get(&at).await?.ok_or(Error::Barrier(BarrierError::UnknownKeyVersion(v.get())))?
                }
            }
            None => return Err(Error::Barrier(BarrierError::UnknownKeyVersion(v.get()))),
        };
        let (label, aad) = (self.names.master(v), wrap_aad(v));
        let plain = match hsm_call(&self.keys, move |k| k.unwrap_key(&label, &blob, &aad)).await {
            Err(Error::Hsm(keyvault_hsm::HsmError::InvalidCiphertext)) => Err(Error::Barrier(BarrierError::Integrity)),
            other => other,
        }?;
        let key = Arc::new(EpochKey::new(&plain)?);
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        // Keys dropped meanwhile (an emergency seal, a retired version): this caller uses
        // the key once, nothing keeps it.
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation {
            map.insert(v, key.clone());
        }
        crate::metrics::get().epoch_keys_loaded.set(map.len() as i64);
        Ok(key)
    }

    /// A fresh epoch key from the token's random number generator, wrapped by master
    /// version `v` in the token. The plaintext exists only inside this call.
    async fn generate(&self, v: KeyVersion) -> Result<Vec<u8>> {
        let (label, aad) = (self.names.master(v), wrap_aad(v));
        hsm_call(&self.keys, move |k| {
            let fresh = k.random_bytes(32)?;
            k.wrap_key(&label, &fresh, &aad)
        })
        .await
    }

    /// Drop (and zeroize) every loaded epoch key (emergency seal); how many there were.
    pub fn forget(&self) -> usize {
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let n = map.len();
        map.clear();
        crate::metrics::get().epoch_keys_loaded.set(0);
        n
    }

    /// Drop the epoch keys of versions that are no longer in the keyring (retired).
    pub fn keep_only(&self, versions: &[KeyVersion]) {
        let mut map = self.loaded.write().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|v, _| versions.contains(v));
        // Only when a key went: this runs on every keyring sync, and a bump throws away
        // the loads under way (a load of a version retired meanwhile that this misses is
        // dropped by the next sync).
        if map.len() != before {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        crate::metrics::get().epoch_keys_loaded.set(map.len() as i64);
    }

    pub fn loaded_count(&self) -> usize {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{Keyed, PauseAt, TestStore};

    /// Each epoch key has a page of its own (what its lock covers, and what dropping it
    /// unlocks); under `mlockall` it takes no lock of its own (dropping one would unlock
    /// its page for good).
    #[test]
    fn an_epoch_key_has_a_page_of_its_own() {
        let a = EpochKey::new(&[1; 32]).unwrap();
        let b = EpochKey::new(&[2; 32]).unwrap();
        for k in [&a, &b] {
            assert_eq!(k.key().as_ptr() as usize % 4096, 0);
        }
        assert_ne!(a.key().as_ptr() as usize / 4096, b.key().as_ptr() as usize / 4096);
        assert_eq!((a.key(), b.key()), (&[1; 32], &[2; 32]));
        crate::hardening::set_all_memory_locked_for_test(true);
        let c = EpochKey::new(&[3; 32]).unwrap();
        crate::hardening::set_all_memory_locked_for_test(false);
        assert!(c.locked.is_none());
    }

    /// An emergency seal while an epoch key is being loaded: the load finishes for its
    /// caller, but the key is not kept (before, it was put back after the seal had
    /// dropped every key, and stayed in memory).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_that_began_before_a_seal_keeps_nothing() {
        let k = Keyed::new().await;
        let v = k.keyring.load().master.active;
        let store = Arc::new(TestStore::holding(k.store.clone(), PauseAt::Get, &storage_key(v)));
        let epochs = Arc::new(EpochKeys::new(store.clone(), k.keys.clone(), k.names.clone()));
        store.arm();
        let load = tokio::spawn({
            let epochs = epochs.clone();
            async move { epochs.get(v, true).await.map(|_| ()) }
        });
        store.reached.notified().await;
        epochs.forget();
        store.go.notify_one();
        load.await.unwrap().unwrap();
        assert_eq!(epochs.loaded_count(), 0, "the seal dropped every key; the load put one back");
        // A load after it keeps its key.
        epochs.get(v, false).await.unwrap();
        assert_eq!(epochs.loaded_count(), 1);
    }
}
