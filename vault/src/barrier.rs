//! Envelope encryption (docs/architecture.md): every stored value is sealed under its own data key.
//!
//! `seal`: a fresh random 256-bit data key (DEK) encrypts the value with AES-256-GCM in
//! process; the associated data binds the record to its purpose, path and version, so a
//! record copied elsewhere fails to open. The DEK is then wrapped inside the token by the
//! active master key version and zeroized. `open` reverses it: one unwrap call into the
//! token, one AES-GCM decryption here.
//!
//! Record format, version 1 (all integers big-endian):
//!
//! ```text
//! "KVR" | 0x01 | kek_version: u32 | wrapped_len: u16 | wrapped_dek | nonce: 12 | ciphertext+tag
//! ```
//!
//! `wrapped_dek` starts with the wrap mechanism byte (see `keyvault_hsm::WrapMechanism`).
//! Re-wrapping (master key rotation) replaces `kek_version` and `wrapped_dek` only: the
//! value's ciphertext is untouched.
//!
//! Key tiers (`[secrets] key_tier`): with `epoch` (the default), the data key is wrapped in
//! process by the epoch key of the master version (see [`crate::epoch`]; `wrapped_dek`
//! then starts with [`crate::epoch::EPOCH_WRAP`]), so reads and writes do not call the
//! token; with `token`, every data key is wrapped and unwrapped inside the token. Records
//! of either kind open under either setting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use keyvault_hsm::KeyStore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::epoch::{EpochKey, EpochKeys, is_epoch_wrapped};
use crate::error::{Error, Result};
use crate::hsm_call;
use crate::keys::{KeyNames, KeyVersion, SharedKeyring};

const MAGIC: &[u8; 3] = b"KVR";
const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 3 + 1 + 4 + 2;

/// What a record is bound to. The same value sealed for another path or version is a
/// different record.
#[derive(Debug, Clone, Copy)]
pub struct RecordContext<'a> {
    /// The subsystem: `"kv"` for secrets.
    pub purpose: &'static str,
    pub path: &'a str,
    pub version: u64,
}

impl RecordContext<'_> {
    fn aad(&self, domain: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(domain.len() + self.purpose.len() + self.path.len() + 20);
        aad.extend_from_slice(domain);
        aad.push(0);
        aad.extend_from_slice(self.purpose.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&(self.path.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.path.as_bytes());
        aad.extend_from_slice(&self.version.to_be_bytes());
        aad
    }

    /// Associated data of the value's AES-GCM encryption.
    pub fn value_aad(&self) -> Vec<u8> {
        self.aad(b"keyvault.record.v1")
    }

    /// Associated data of the DEK wrap in the token (where the mechanism takes any).
    pub fn dek_aad(&self) -> Vec<u8> {
        self.aad(b"keyvault.dek.v1")
    }
}

/// Why a record could not be opened (defined with the domain error, which carries it).
pub use crate::error::BarrierError;

/// A parsed record, borrowing from the stored bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kek_version: KeyVersion,
    pub wrapped_dek: &'a [u8],
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: &'a [u8],
}

impl<'a> Record<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BarrierError> {
        if bytes.len() < HEADER_LEN {
            return Err(BarrierError::Malformed("shorter than the header"));
        }
        if &bytes[..3] != MAGIC {
            return Err(BarrierError::Malformed("bad magic"));
        }
        if bytes[3] != FORMAT_V1 {
            return Err(BarrierError::Malformed("unknown format version"));
        }
        let kek = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let kek_version = KeyVersion::new(kek).ok_or(BarrierError::Malformed("key version 0"))?;
        let wrapped_len = usize::from(u16::from_be_bytes([bytes[8], bytes[9]]));
        let rest = &bytes[HEADER_LEN..];
        if wrapped_len == 0 || rest.len() < wrapped_len + NONCE_LEN + TAG_LEN {
            return Err(BarrierError::Malformed("truncated"));
        }
        let (wrapped_dek, rest) = rest.split_at(wrapped_len);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        Ok(Record { kek_version, wrapped_dek, nonce: n, ciphertext })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.wrapped_dek.len() + NONCE_LEN + self.ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.kek_version.get().to_be_bytes());
        // Wrapped keys are at most a few dozen bytes; seal() checks the bound.
        out.extend_from_slice(&(self.wrapped_dek.len() as u16).to_be_bytes());
        out.extend_from_slice(self.wrapped_dek);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(self.ciphertext);
        out
    }
}

/// AES-256-GCM of `plaintext` under `dek`: the in-process half of sealing.
pub fn encrypt_value(dek: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = Aes256Gcm::new(dek.into());
    cipher
        .encrypt(nonce.into(), Payload { msg: plaintext, aad })
        .map_err(|_| Error::Internal("AES-GCM encryption failed".into()))
}

/// The in-process half of opening.
pub fn decrypt_value(dek: &[u8], nonce: &[u8; NONCE_LEN], aad: &[u8], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let cipher = Aes256Gcm::new_from_slice(dek).map_err(|_| Error::Barrier(BarrierError::Integrity))?;
    cipher
        .decrypt(nonce.into(), Payload { msg: ciphertext, aad })
        .map(Zeroizing::new)
        .map_err(|_| Error::Barrier(BarrierError::Integrity))
}

/// Random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Internal(format!("OS RNG failed: {e}")))?;
    Ok(b)
}

/// Unwrapped data keys, kept for a short time so that reading the same record again
/// does not cost a round trip to the token. Off unless configured
/// (`secrets.dek_cache_ttl`): it trades the promise "a data key is in process memory only
/// while used" for a window of `ttl` per recently used record (see docs/architecture.md).
/// Keys are zeroized when evicted or expired.
struct DekCache {
    ttl: Duration,
    capacity: usize,
    map: Mutex<HashMap<[u8; 32], CachedDek>>,
    /// Bumped (under `map`'s lock) by [`DekCache::forget`]: an unwrap that began before
    /// does not put its key back after an emergency seal.
    generation: std::sync::atomic::AtomicU64,
}

/// Expiry and value of one cached data key.
type CachedDek = (Instant, Zeroizing<[u8; 32]>);

impl DekCache {
    /// Cache key: a digest of everything the unwrap depends on.
    fn key(kek: KeyVersion, wrapped: &[u8], aad: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(kek.get().to_be_bytes());
        h.update((wrapped.len() as u32).to_be_bytes());
        h.update(wrapped);
        h.update(aad);
        h.finalize().into()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((expires, dek)) if *expires > Instant::now() => Some(dek.clone()),
            _ => None,
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drop (and zeroize) every cached key; how many.
    fn forget(&self) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let n = map.len();
        map.clear();
        n
    }

    /// Cache a key unwrapped by a call that began at `generation` (see
    /// [`DekCache::generation`]); not if the cache was emptied since.
    fn insert(&self, key: [u8; 32], dek: &[u8], generation: u64) {
        let Ok(fixed) = <[u8; 32]>::try_from(dek) else {
            return;
        };
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation() != generation {
            return;
        }
        if map.len() >= self.capacity {
            map.retain(|_, (expires, _)| *expires > now);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(key, (now + self.ttl, Zeroizing::new(fixed)));
    }
}

/// One stored record to re-wrap, with the associated data of its context
/// ([`RecordContext::dek_aad`], [`RecordContext::value_aad`]).
#[derive(Debug, Clone)]
pub struct RewrapItem {
    pub stored: Vec<u8>,
    pub dek_aad: Vec<u8>,
    pub value_aad: Vec<u8>,
}

/// A record re-wrapped: its new bytes, and the version its data key was wrapped under
/// (the one it was counted under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    pub record: Vec<u8>,
    pub from: KeyVersion,
}

/// The work of one re-wrap, on a blocking thread: unwrap under the record's version,
/// prove the value intact, wrap under `to`. A record whose version bytes were damaged (or
/// name a version that does not exist) is tried under each version of `known`: the one
/// that opens it is the one it was sealed, and counted, under; the record is repaired.
fn rewrap_in_token(
    k: &dyn KeyStore,
    names: &KeyNames,
    item: &RewrapItem,
    to: KeyVersion,
    known: &[KeyVersion],
    epochs: &RewrapEpochs,
) -> Result<Option<Rewrapped>> {
    let record = Record::parse(&item.stored)?;
    if record.kek_version == to {
        return Ok(None);
    }
    let mut tries: Vec<KeyVersion> = Vec::with_capacity(known.len() + 1);
    if known.contains(&record.kek_version) {
        tries.push(record.kek_version);
    }
    tries.extend(known.iter().rev().copied().filter(|v| *v != record.kek_version));
    for v in tries {
        let dek = if is_epoch_wrapped(record.wrapped_dek) {
            match epochs.loaded.get(&v).map(|e| e.unwrap(record.wrapped_dek, &item.dek_aad)) {
                Some(Ok(d)) => d,
                _ => continue,
            }
        } else {
            match k.unwrap_key(&names.master(v), record.wrapped_dek, &item.dek_aad) {
                Ok(d) => d,
                Err(keyvault_hsm::HsmError::InvalidCiphertext) => continue,
                Err(e) => return Err(Error::Hsm(e)),
            }
        };
        if decrypt_value(&dek, &record.nonce, &item.value_aad, record.ciphertext).is_err() {
            continue;
        }
        let dek: Zeroizing<[u8; 32]> = Zeroizing::new(
            dek.as_slice()
                .try_into()
                .map_err(|_| Error::Barrier(BarrierError::Malformed("data key is not 256 bits")))?,
        );
        if v != record.kek_version {
            tracing::warn!(
                recorded = record.kek_version.get(),
                actual = v.get(),
                "a record's key version was damaged; repaired"
            );
        }
        let wrapped = match &epochs.to {
            Some(e) => e.wrap(&dek, &item.dek_aad)?,
            None => k.wrap_key(&names.master(to), dek.as_slice(), &item.dek_aad).map_err(Error::Hsm)?,
        };
        return Ok(Some(Rewrapped {
            record: Record { kek_version: to, wrapped_dek: &wrapped, ..record }.encode(),
            from: v,
        }));
    }
    Err(Error::Barrier(BarrierError::Integrity))
}

/// The epoch keys a re-wrap batch may use, loaded before it leaves the runtime.
struct RewrapEpochs {
    /// Versions' epoch keys that records of the batch may be wrapped under.
    loaded: HashMap<KeyVersion, Arc<EpochKey>>,
    /// The target version's, when new wraps go to the epoch tier.
    to: Option<Arc<EpochKey>>,
}

/// Where data keys of new records are wrapped (`[secrets] key_tier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyTier {
    /// In process, by the master version's epoch key (docs/architecture.md).
    #[default]
    Epoch,
    /// Inside the token, by the master key: one token call per read and write.
    Token,
}

/// Seals and opens records with data keys wrapped by an epoch key or by the master key
/// in the token.
#[derive(Clone)]
pub struct Barrier {
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
    epochs: Arc<EpochKeys>,
    tier: KeyTier,
    dek_cache: Option<Arc<DekCache>>,
    /// Records sealed by this process (automatic rotation by number of encryptions).
    sealed: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier").field("active_master", &self.active_version()).finish_non_exhaustive()
    }
}

impl Barrier {
    pub fn new(keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring) -> Self {
        let epochs = Arc::new(EpochKeys::new(keyring.store(), keys.clone(), names.clone()));
        Barrier { keys, names, keyring, epochs, tier: KeyTier::default(), dek_cache: None, sealed: Default::default() }
    }

    /// Wrap data keys of new records in `tier`.
    pub fn with_key_tier(mut self, tier: KeyTier) -> Self {
        self.tier = tier;
        self
    }

    /// This replica's epoch keys.
    pub fn epoch_keys(&self) -> &EpochKeys {
        &self.epochs
    }

    /// Make sure master key version `v` is in the keyring, following the stored keyring
    /// when it is not (another replica rotated less than a sync ago).
    async fn ensure_known(&self, v: KeyVersion) -> Result<()> {
        if self.keyring.load().master.versions.contains(&v) {
            return Ok(());
        }
        // Whether this call or a concurrent one took the change, look again.
        self.keyring.follow().await?;
        if self.keyring.load().master.versions.contains(&v) {
            return Ok(());
        }
        Err(Error::Barrier(BarrierError::UnknownKeyVersion(v.get())))
    }

    /// Keep unwrapped data keys for `ttl` (at most `capacity` of them). See [`DekCache`].
    pub fn with_dek_cache(mut self, ttl: Duration, capacity: usize) -> Self {
        if !ttl.is_zero() && capacity > 0 {
            self.dek_cache = Some(Arc::new(DekCache {
                ttl,
                capacity,
                map: Mutex::new(HashMap::new()),
                generation: Default::default(),
            }));
        }
        self
    }

    /// Drop (and zeroize) every epoch key and cached data key (emergency seal); how many.
    pub fn forget_cached_keys(&self) -> usize {
        let epochs = self.epochs.forget();
        let Some(cache) = &self.dek_cache else { return epochs };
        cache.forget() + epochs
    }

    /// The master key version new records are wrapped with.
    pub fn active_version(&self) -> KeyVersion {
        self.keyring.load().master.active
    }

    /// Follow the stored keyring (a rotation closed the version this process sealed
    /// under); whether anything changed.
    pub async fn follow_keyring(&self) -> Result<bool> {
        let changed = self.keyring.follow().await?;
        self.forget_retired_epochs();
        Ok(changed)
    }

    /// Drop the epoch keys of master versions no longer in this replica's keyring.
    pub fn forget_retired_epochs(&self) {
        self.epochs.keep_only(&self.keyring.load().master.versions);
    }

    /// Records sealed by this process so far.
    pub fn sealed_count(&self) -> u64 {
        self.sealed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seal `plaintext` for `ctx` under the active master key version. A version another
    /// replica has retired since this one last looked (its token object gone) makes it
    /// re-read the keyring and seal under the new active version.
    pub async fn seal(&self, ctx: &RecordContext<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut used = self.active_version();
        // A version this replica took for active may be retired under it (another replica
        // rotated and retired meanwhile, possibly several times): follow the keyring and
        // seal again under the version active now, as long as it keeps moving. A key still
        // missing while the keyring names it active is a real fault.
        for _ in 0..16 {
            match self.seal_once(ctx, plaintext, used).await {
                Err(Error::Hsm(keyvault_hsm::HsmError::KeyNotFound(label))) => {
                    // The periodic sync may have caught up meanwhile: compare with the
                    // version this attempt used, not with what was known a moment ago.
                    self.keyring.follow().await?;
                    let active = self.active_version();
                    if active == used {
                        return Err(Error::Hsm(keyvault_hsm::HsmError::KeyNotFound(label)));
                    }
                    used = active;
                }
                other => return other,
            }
        }
        Err(Error::Unavailable("the master key changed under every attempt to seal; retry".into()))
    }

    async fn seal_once(&self, ctx: &RecordContext<'_>, plaintext: &[u8], kek_version: KeyVersion) -> Result<Vec<u8>> {
        self.sealed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dek = Zeroizing::new(random::<32>()?);
        let nonce = random::<NONCE_LEN>()?;
        let ciphertext = encrypt_value(&dek, &nonce, &ctx.value_aad(), plaintext)?;
        let wrapped_dek = match self.tier {
            KeyTier::Epoch => self.epochs.get(kek_version, true).await?.wrap(&dek, &ctx.dek_aad())?,
            KeyTier::Token => self.wrap(kek_version, dek, ctx.dek_aad()).await?,
        };
        if wrapped_dek.len() > usize::from(u16::MAX) {
            return Err(Error::Internal("wrapped data key too long".into()));
        }
        Ok(Record { kek_version, wrapped_dek: &wrapped_dek, nonce, ciphertext: &ciphertext }.encode())
    }

    /// Open a record sealed for `ctx`.
    pub async fn open(&self, ctx: &RecordContext<'_>, stored: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let record = Record::parse(stored)?;
        let dek = if is_epoch_wrapped(record.wrapped_dek) {
            let epoch = match self.epochs.cached(record.kek_version) {
                Some(e) => e,
                None => {
                    self.ensure_known(record.kek_version).await?;
                    self.epochs.get(record.kek_version, false).await?
                }
            };
            epoch.unwrap(record.wrapped_dek, &ctx.dek_aad())?
        } else {
            self.unwrap(record.kek_version, record.wrapped_dek.to_vec(), ctx.dek_aad()).await?
        };
        decrypt_value(&dek, &record.nonce, &ctx.value_aad(), record.ciphertext)
    }

    /// Re-wrap a record's data key under master key `to` without touching the value's
    /// ciphertext (master key rotation). Returns `None` if it already uses `to`.
    pub async fn rewrap(&self, ctx: &RecordContext<'_>, stored: &[u8], to: KeyVersion) -> Result<Option<Rewrapped>> {
        let item = RewrapItem { stored: stored.to_vec(), dek_aad: ctx.dek_aad(), value_aad: ctx.value_aad() };
        self.rewrap_batch(vec![item], to).await?.pop().unwrap_or(Ok(None))
    }

    /// [`Barrier::rewrap`] for many records in one trip off the runtime: the token calls
    /// of a batch run back to back on one background thread (lower priority than
    /// requests: see [`crate::hsm_call_background`]) instead of paying a hand-off each.
    /// One result per item, in order: `Ok(None)` if it already uses `to`; an item that is
    /// malformed or fails its integrity check under every known version is an `Err` of
    /// its own. A failure of the token itself (unavailable, key missing) fails the whole
    /// call.
    pub async fn rewrap_batch(&self, items: Vec<RewrapItem>, to: KeyVersion) -> Result<Vec<Result<Option<Rewrapped>>>> {
        // Versions this replica has not heard of yet: re-read the keyring once (a version
        // that is still unknown then is damage, tried under every known version).
        let ring = self.keyring.load_full();
        let unknown = items
            .iter()
            .any(|i| Record::parse(&i.stored).is_ok_and(|r| !ring.master.versions.contains(&r.kek_version)));
        if unknown || !ring.master.versions.contains(&to) {
            self.keyring.follow().await?;
        }
        self.ensure_known(to).await?;
        let known = self.keyring.load().master.versions.clone();
        let names = self.names.clone();
        let epochs = self.rewrap_epochs(&items, to, &known).await?;
        crate::hsm_call_background(&self.keys, move |k| {
            let mut out = Vec::with_capacity(items.len());
            for item in &items {
                out.push(match rewrap_in_token(k, &names, item, to, &known, &epochs) {
                    Err(Error::Hsm(e)) if !matches!(e, keyvault_hsm::HsmError::InvalidCiphertext) => return Err(e),
                    other => other,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Load the epoch keys a re-wrap batch needs: of every known version, if any record of
    /// the batch is epoch-wrapped (a record whose version bytes were damaged is tried under
    /// each), and of the target when new wraps go to the epoch tier.
    async fn rewrap_epochs(&self, items: &[RewrapItem], to: KeyVersion, known: &[KeyVersion]) -> Result<RewrapEpochs> {
        let mut loaded = HashMap::new();
        let any_epoch = items.iter().any(|i| Record::parse(&i.stored).is_ok_and(|r| is_epoch_wrapped(r.wrapped_dek)));
        if any_epoch {
            for v in known {
                match self.epochs.get(*v, false).await {
                    Ok(e) => {
                        loaded.insert(*v, e);
                    }
                    Err(Error::Barrier(BarrierError::UnknownKeyVersion(_))) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let to = match self.tier {
            KeyTier::Epoch => Some(self.epochs.get(to, true).await?),
            KeyTier::Token => None,
        };
        Ok(RewrapEpochs { loaded, to })
    }

    /// Whether the token wraps and unwraps a fresh key under master version `v` as it
    /// should: told apart from damaged records, a token that fails such calls (SoftHSM
    /// answers a failed tag check and some of its own faults alike) is unavailable, and
    /// nothing may be judged damaged on its word.
    pub async fn token_answers(&self, v: KeyVersion) -> Result<()> {
        let probe = Zeroizing::new(random::<32>()?);
        let aad = b"keyvault.token-probe.v1".to_vec();
        let wrapped = self.wrap(v, probe.clone(), aad.clone()).await?;
        let label = self.names.master(v);
        match hsm_call(&self.keys, move |k| k.unwrap_key(&label, &wrapped, &aad)).await {
            Ok(back) if back.as_slice() == probe.as_slice() => Ok(()),
            Ok(_) | Err(Error::Hsm(keyvault_hsm::HsmError::InvalidCiphertext)) => Err(Error::Unavailable(
                "the token did not unwrap a key it had just wrapped; records it cannot open now are not set aside"
                    .into(),
            )),
            Err(e) => Err(e),
        }
    }

    async fn wrap(&self, v: KeyVersion, dek: Zeroizing<[u8; 32]>, aad: Vec<u8>) -> Result<Vec<u8>> {
        let label = self.names.master(v);
        hsm_call(&self.keys, move |k| k.wrap_key(&label, dek.as_ref(), &aad)).await
    }

    async fn unwrap(&self, v: KeyVersion, wrapped: Vec<u8>, aad: Vec<u8>) -> Result<Zeroizing<Vec<u8>>> {
        let generation = self.dek_cache.as_ref().map(|c| c.generation());
        self.ensure_known(v).await?;
        let cache_key = self.dek_cache.as_ref().map(|_| DekCache::key(v, &wrapped, &aad));
        if let (Some(cache), Some(k)) = (&self.dek_cache, &cache_key)
            && let Some(dek) = cache.get(k)
        {
            return Ok(Zeroizing::new(dek.to_vec()));
        }
        let label = self.names.master(v);
        let dek = match hsm_call(&self.keys, move |k| k.unwrap_key(&label, &wrapped, &aad)).await {
            Err(Error::Hsm(keyvault_hsm::HsmError::InvalidCiphertext)) => Err(Error::Barrier(BarrierError::Integrity)),
            other => other,
        }?;
        if let (Some(cache), Some(k), Some(g)) = (&self.dek_cache, cache_key, generation) {
            cache.insert(k, &dek, g);
        }
        Ok(dek)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data key unwrapped by a call that began before an emergency seal emptied the
    /// cache is not cached after it; one from a call that began after is.
    #[test]
    fn a_key_unwrapped_across_a_seal_is_not_cached() {
        let cache = DekCache {
            ttl: Duration::from_secs(60),
            capacity: 10,
            map: Mutex::new(HashMap::new()),
            generation: Default::default(),
        };
        let before = cache.generation();
        cache.insert([1; 32], &[7; 32], before);
        assert!(cache.get(&[1; 32]).is_some());
        let began = cache.generation();
        assert_eq!(cache.forget(), 1);
        cache.insert([2; 32], &[8; 32], began);
        assert!(cache.get(&[2; 32]).is_none(), "put back after the seal");
        cache.insert([3; 32], &[9; 32], cache.generation());
        assert!(cache.get(&[3; 32]).is_some());
    }

    #[test]
    fn record_parse_rejects_garbage() {
        assert_eq!(Record::parse(b""), Err(BarrierError::Malformed("shorter than the header")));
        assert_eq!(Record::parse(b"XYZ\x01\0\0\0\x01\0\x01"), Err(BarrierError::Malformed("bad magic")));
        assert_eq!(Record::parse(b"KVR\x02\0\0\0\x01\0\x01"), Err(BarrierError::Malformed("unknown format version")));
        assert_eq!(Record::parse(b"KVR\x01\0\0\0\0\0\x01"), Err(BarrierError::Malformed("key version 0")));
        assert_eq!(Record::parse(b"KVR\x01\0\0\0\x01\0\x05abc"), Err(BarrierError::Malformed("truncated")));
    }

    #[test]
    fn record_encode_parse_round_trip() {
        let r = Record {
            kek_version: KeyVersion::new(7).unwrap(),
            wrapped_dek: &[1, 2, 3],
            nonce: [9; 12],
            ciphertext: &[5; 20],
        };
        let bytes = r.encode();
        assert_eq!(Record::parse(&bytes).unwrap(), r);
    }

    /// The on-disk format, pinned by a test vector kept as a file: a known DEK, nonce and
    /// context give exactly this record body, and the record parses to these fields.
    #[test]
    fn record_v1_test_vector() {
        let text = include_str!("../tests/vectors/record-v1.txt");
        let field = |name: &str| -> Vec<u8> {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} = "))).unwrap();
            hex::decode(line.split(" = ").nth(1).unwrap().trim()).unwrap()
        };
        let text_field = |name: &str| -> String {
            let line = text.lines().find(|l| l.starts_with(&format!("{name} = "))).unwrap();
            line.split(" = ").nth(1).unwrap().trim().to_owned()
        };
        let dek: [u8; 32] = field("dek").try_into().unwrap();
        let nonce: [u8; 12] = field("nonce").try_into().unwrap();
        let path = text_field("path");
        let version: u64 = text_field("version").parse().unwrap();
        let ctx = RecordContext { purpose: "kv", path: &path, version };
        let plaintext = field("plaintext");
        let ciphertext = encrypt_value(&dek, &nonce, &ctx.value_aad(), &plaintext).unwrap();
        assert_eq!(hex::encode(&ciphertext), hex::encode(field("ciphertext")));
        let record = field("record");
        let parsed = Record::parse(&record).unwrap();
        assert_eq!(parsed.kek_version.get(), text_field("kek_version").parse::<u32>().unwrap());
        assert_eq!(parsed.wrapped_dek, field("wrapped_dek").as_slice());
        assert_eq!(parsed.nonce, nonce);
        assert_eq!(parsed.ciphertext, ciphertext.as_slice());
        assert_eq!(decrypt_value(&dek, &nonce, &ctx.value_aad(), parsed.ciphertext).unwrap().as_slice(), plaintext);
        // The same bytes under another path or version do not decrypt.
        let other = RecordContext { purpose: "kv", path: "other", version };
        assert!(decrypt_value(&dek, &nonce, &other.value_aad(), parsed.ciphertext).is_err());
    }
}
