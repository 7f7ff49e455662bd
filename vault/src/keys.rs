//! The key hierarchy (docs/architecture.md): which keys exist in the token, under which labels, and
//! which version of each is active. The keyring lives in the store so that every replica
//! agrees on it; the keys themselves live only in the token.

use std::sync::Arc;

use arc_swap::ArcSwap;
use keyvault_hsm::{HsmError, KeyKind, KeyLabel, KeyStore};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hsm_call;
use crate::store::{Store, decode_json, encode_json, get_json};

/// A key version: 1, 2, ... Version 0 does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyVersion(u32);

impl KeyVersion {
    pub const FIRST: KeyVersion = KeyVersion(1);

    pub fn new(v: u32) -> Option<Self> {
        (v > 0).then_some(KeyVersion(v))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn next(self) -> KeyVersion {
        KeyVersion(self.0 + 1)
    }
}

impl std::fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// Labels of KeyVault's keys in the token, under a configurable prefix so that several
/// installations can share one token.
#[derive(Debug, Clone)]
pub struct KeyNames {
    prefix: String,
}

impl KeyNames {
    pub fn new(prefix: &str) -> Result<Self> {
        // Validate once: the longest label built from it must still be a valid label.
        KeyLabel::new(format!("{prefix}/token-signing/v4294967295")).map_err(|_| {
            Error::Config(format!("hsm.key_prefix {prefix:?}: use up to 30 characters of [A-Za-z0-9._-]"))
        })?;
        Ok(KeyNames { prefix: prefix.to_owned() })
    }

    fn label(&self, family: &str, v: KeyVersion) -> KeyLabel {
        // Invariant: `new` checked that the longest label of this form is valid.
        KeyLabel::new(format!("{}/{family}/v{}", self.prefix, v.0)).expect("validated in KeyNames::new")
    }

    /// AES-256 master key (KEK) version `v`.
    pub fn master(&self, v: KeyVersion) -> KeyLabel {
        self.label("master", v)
    }

    /// Ed25519 key that signs access tokens, version `v`.
    pub fn token_signing(&self, v: KeyVersion) -> KeyLabel {
        self.label("token-signing", v)
    }

    /// HMAC key for AppRole secret ids (keyed hashes, computed in the token).
    pub fn approle_hmac(&self, v: KeyVersion) -> KeyLabel {
        self.label("approle-hmac", v)
    }

    /// Version `v` of the transit key `name` (a valid transit name keeps the label short
    /// enough; a label that is still too long is a clear error, not a panic).
    pub fn transit(&self, name: &str, v: u32) -> Result<KeyLabel> {
        KeyLabel::new(format!("{}/transit/{name}/v{v}", self.prefix))
            .map_err(|_| Error::invalid("the transit key name is too long for this installation's key prefix"))
    }

    /// Ed25519 key that signs audit checkpoints.
    pub fn audit_signing(&self) -> KeyLabel {
        self.label("audit", KeyVersion::FIRST)
    }

    /// HMAC key from which each audit log's HMAC key is derived.
    pub fn audit_hmac(&self) -> KeyLabel {
        self.label("audit-hmac", KeyVersion::FIRST)
    }

    /// AES key that wraps the data keys of wrapped replies (response wrapping).
    pub fn wrapping(&self) -> KeyLabel {
        self.label("wrapping", KeyVersion::FIRST)
    }
}

/// Where the claim on a key being made outside any versioned record lives (see
/// [`LabelClaim`]).
fn claim_key(label: &KeyLabel) -> String {
    format!("sys/key-claims/{label}")
}

/// How long a claim on a label is its claimer's alone (a claimer that crashed leaves it
/// to expire). Its generation stops [`CLAIM_MARGIN`] before that.
const LABEL_CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long before its lease's end a claimer stops touching the token: a margin for clocks
/// (a keyring or transit claim's end is wall-clock seconds, compared on every replica) and
/// for the call in flight.
const CLAIM_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The instant until which a claim taken from now on with `lease` is safely its
/// claimer's, for [`KeyStore::generate_claimed`]. Taken before the claim is stored, so
/// that the store's latency comes out of the lease, not out of the margin.
pub(crate) fn claim_ends(lease: std::time::Duration) -> std::time::Instant {
    std::time::Instant::now() + lease.saturating_sub(CLAIM_MARGIN)
}

/// Where a key made by [`ensure_keys`] (or at initialization) is recorded as made.
fn made_key(label: &KeyLabel) -> String {
    format!("sys/keys-made/{label}")
}

/// Where a key being made by [`ensure_keys`] is marked as being made, from just before
/// its generation until it is recorded as made: what a claimer finds under a label so
/// marked is an earlier claimer's leftover, to replace.
fn making_key(label: &KeyLabel) -> String {
    format!("sys/keys-making/{label}")
}

/// A claim held on a label (or on the first initialization), stored at `key` so that of
/// concurrent claimers on every replica exactly one holds it. [`KeyStore::generate_claimed`]
/// relies on it: what it finds under a claimed label no one else is making. Its record
/// names its owner and expires with its lease by the store's clock (PostgreSQL's on every
/// replica), never a replica's own.
struct LabelClaim {
    key: String,
    owner: Vec<u8>,
    /// Until when the claimer may touch the token.
    ends: std::time::Instant,
}

impl LabelClaim {
    /// Take the claim if it is free (absent or expired); `None` if another holds it.
    async fn take(store: &dyn Store, key: String) -> Result<Option<LabelClaim>> {
        let ends = claim_ends(LABEL_CLAIM_LEASE);
        let owner = uuid::Uuid::new_v4().simple().to_string().into_bytes();
        if store.insert_if_absent(&key, &owner, Some(LABEL_CLAIM_LEASE)).await? {
            return Ok(Some(LabelClaim { key, owner, ends }));
        }
        Ok(None)
    }

    /// Let go, if it is still ours. Not after a failed call that may still run in the
    /// token: then it runs out its lease.
    async fn release(self, store: &dyn Store, failed: Option<&Error>) {
        if failed.is_some_and(token_call_may_still_run) {
            return;
        }
        if !matches!(store.compare_and_swap(&self.key, Some(&self.owner), None).await, Ok(true)) {
            tracing::warn!(claim = %self.key, "could not release a claim; it expires with its lease");
        }
    }
}

/// The keys an installation has beside its keyring's versioned families, one version each:
/// made at initialization, or by [`ensure_keys`] for an installation older than they are.
fn unversioned_keys(names: &KeyNames) -> [(KeyLabel, KeyKind); 3] {
    [
        (names.audit_signing(), KeyKind::Ed25519),
        (names.audit_hmac(), KeyKind::HmacSha256),
        (names.wrapping(), KeyKind::Aes256),
    ]
}

/// Make the keys an installation needs beyond its keyring if it has none yet (the audit
/// and response-wrapping keys of an installation initialized before they existed), each
/// under a claim in the store: of replicas starting at once one makes a key and the others
/// wait for it. A key made is recorded in the store (`sys/keys-made/<label>`), and the
/// record, not the token, says it is done: a replica whose view of a shared token is stale
/// would not see a key another replica just made, and a key a crashed claimer left half
/// made is in the token but not done. A key in the token under a label no one ever
/// claimed is an older installation's, made before these records and in use: it is
/// recorded as it is, never replaced.
pub async fn ensure_keys(store: &dyn Store, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Result<()> {
    for (label, kind) in unversioned_keys(names) {
        let deadline = std::time::Instant::now() + LABEL_CLAIM_LEASE + std::time::Duration::from_secs(5);
        while store.get(&made_key(&label)).await?.is_none() {
            if let Some(claim) = LabelClaim::take(store, claim_key(&label)).await? {
                let made = make_claimed(store, keys, &label, kind, &claim).await;
                claim.release(store, made.as_ref().err()).await;
                made?;
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Conflict(format!("key {label} is being made by another process; retry")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// [`ensure_keys`] for one label, its claim held.
async fn make_claimed(
    store: &dyn Store,
    keys: &Arc<dyn KeyStore>,
    label: &KeyLabel,
    kind: KeyKind,
    claim: &LabelClaim,
) -> Result<()> {
    // Made by the claimer just before this one, which recorded it before letting go.
    if store.get(&made_key(label)).await?.is_some() {
        return Ok(());
    }
    let l = label.clone();
    let making = store.get(&making_key(label)).await?.is_some();
    if !making && hsm_call(keys, move |k| k.exists(&l)).await? {
        tracing::info!(key = %label, "recording a key this installation made before keys were recorded");
        store.put(&made_key(label), b"{}").await?;
        return Ok(());
    }
    store.put(&making_key(label), b"{}").await?;
    let (l, ends) = (label.clone(), claim.ends);
    match hsm_call(keys, move |k| k.generate_claimed(&l, kind, ends)).await {
        Ok(()) => tracing::info!(key = %label, "made a key this installation did not have yet"),
        Err(Error::Hsm(HsmError::KeyExists(_))) => {}
        Err(e) => return Err(e),
    }
    store.put(&made_key(label), b"{}").await?;
    store.delete(&making_key(label)).await?;
    Ok(())
}

/// Whether a token call that failed with `e` may still be running in the token: one that
/// timed out (its caller gave up, the token had not answered). What it makes is still its
/// claimer's, so its claim is not given back: it expires with its lease.
pub(crate) fn token_call_may_still_run(e: &Error) -> bool {
    matches!(e, Error::Hsm(HsmError::CallTimeout { .. }))
}

/// One family of versioned keys: which version new operations use, which still exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFamily {
    pub active: KeyVersion,
    pub versions: Vec<KeyVersion>,
    /// When `active` last changed (unix seconds).
    #[serde(default)]
    pub activated_at: u64,
    /// A version being generated: claimed in the keyring before its token object is made,
    /// so that of concurrent rotations exactly one makes it (see [`add_version`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingVersion>,
    /// Versions taken out of `versions` whose token objects may still exist: a retire
    /// marks a version here in the same write that removes it, destroys its object, then
    /// unmarks it. A retire cut short (a failed destroy, a crash) is finished by the next
    /// one ([`finish_retiring`]), so no retired key stays in the token for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<KeyVersion>,
}

/// A version whose token object is being generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingVersion {
    pub version: KeyVersion,
    /// Unix seconds after which another request may finish it (its owner crashed).
    pub until: u64,
}

/// How long a pending version is its claimer's alone.
const PENDING_LEASE: u64 = 60;

impl KeyFamily {
    fn first() -> Self {
        KeyFamily {
            active: KeyVersion::FIRST,
            versions: vec![KeyVersion::FIRST],
            activated_at: crate::unix_now(),
            pending: None,
            retiring: Vec::new(),
        }
    }
}

/// The keyring record, stored at [`KEYRING_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keyring {
    pub master: KeyFamily,
    pub token_signing: KeyFamily,
    pub approle_hmac: KeyFamily,
}

pub const KEYRING_KEY: &str = "sys/keyring";

/// This process's copy of the keyring, and its one owner: everything reads the keyring
/// through a handle, and the copy changes in two ways only, both here: this process
/// commits a change to the stored keyring ([`SharedKeyring::add_version`],
/// [`SharedKeyring::retire_version`]), or it follows the stored keyring after another
/// replica changed it ([`SharedKeyring::follow`]). Cloning shares the copy.
#[derive(Clone)]
pub struct SharedKeyring {
    ring: Arc<ArcSwap<Keyring>>,
    store: Arc<dyn Store>,
    /// Taken for each read of the stored keyring that this copy then takes, so that the
    /// copy is always the last read's: a slower caller cannot put back a keyring it read
    /// (or committed) before a later change another caller already took.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeyring").field("master", &self.ring.load().master.active).finish_non_exhaustive()
    }
}

impl SharedKeyring {
    /// The owner of a keyring read from (or just written to) `store`.
    pub fn new(ring: Keyring, store: Arc<dyn Store>) -> Self {
        SharedKeyring { ring: Arc::new(ArcSwap::from_pointee(ring)), store, turn: Default::default() }
    }

    /// Load the stored keyring; `None` if the installation is not initialized.
    pub async fn open(store: Arc<dyn Store>) -> Result<Option<Self>> {
        Ok(load(store.as_ref()).await?.map(|ring| Self::new(ring, store)))
    }

    /// The store the keyring lives in.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Keyring>> {
        self.ring.load()
    }

    pub fn load_full(&self) -> Arc<Keyring> {
        self.ring.load_full()
    }

    /// Re-read the stored keyring and take it if it differs from this copy. Returns
    /// whether anything changed. The one way another replica's change reaches this one
    /// (the periodic sync, a record or token naming a version this copy lacks, a key
    /// another replica retired).
    pub async fn follow(&self) -> Result<bool> {
        let _turn = self.turn.lock().await;
        let Some(fresh) = load(self.store.as_ref()).await? else { return Ok(false) };
        let current = self.ring.load_full();
        if *current == fresh {
            return Ok(false);
        }
        tracing::info!(
            master = %fresh.master.active,
            token_signing = %fresh.token_signing.active,
            "keyring changed by another replica; following it"
        );
        self.ring.store(Arc::new(fresh));
        Ok(true)
    }

    /// Generate version N+1 of `family` and make it active (see [`add_version`]).
    pub async fn add_version(&self, keys: &Arc<dyn KeyStore>, names: &KeyNames, family: Family) -> Result<Keyring> {
        let ring = add_version(self.store.as_ref(), keys, names, family).await?;
        self.take_stored(&ring).await;
        Ok(ring)
    }

    /// Take the stored keyring after this process changed it (`committed`: the keyring its
    /// change left). Read again, in turn with every other read this copy takes: the
    /// keyring `committed` was read from may already have been changed again by a caller
    /// that took its own result first, and taking `committed` would put that change back
    /// (until the next sync). Only if the store cannot be read is `committed` taken.
    async fn take_stored(&self, committed: &Keyring) {
        let _turn = self.turn.lock().await;
        match load(self.store.as_ref()).await {
            Ok(Some(fresh)) => self.ring.store(Arc::new(fresh)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the keyring could not be read again after a change; taking the change");
                self.ring.store(Arc::new(committed.clone()));
            }
        }
    }

    /// Retire version `v` of `family` (see [`retire_version`]): whether this call
    /// retired it (false: it was no longer in the keyring).
    pub async fn retire_version(
        &self,
        keys: &Arc<dyn KeyStore>,
        names: &KeyNames,
        family: Family,
        v: KeyVersion,
    ) -> Result<bool> {
        let (ring, retired) = retire_version(self.store.as_ref(), keys, names, family, v).await?;
        self.take_stored(&ring).await;
        Ok(retired)
    }

    /// Finish the retires of `family` that were cut short ([`finish_retiring`]); the
    /// versions it finished.
    pub async fn finish_retiring(
        &self,
        keys: &Arc<dyn KeyStore>,
        names: &KeyNames,
        family: Family,
    ) -> Result<Vec<KeyVersion>> {
        let (ring, finished) = finish_retiring(self.store.as_ref(), keys, names, family).await?;
        if let Some(ring) = ring {
            self.take_stored(&ring).await;
        }
        Ok(finished)
    }
}

/// Load the keyring; `None` if this installation is not initialized.
pub async fn load(store: &dyn Store) -> Result<Option<Keyring>> {
    Ok(get_json(store, KEYRING_KEY).await?)
}

/// The claim of a first-time initialization (see [`initialize`]).
const INIT_CLAIM_KEY: &str = "sys/key-claims/init";

/// First-time initialization: generate version 1 of every key inside the token and record
/// the keyring. Refuses if the store already holds a keyring, if another process is
/// initializing the same store (its claim), or if the token already holds a key under one
/// of the labels (another installation's, or one whose store was lost).
pub async fn initialize(store: &dyn Store, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Result<Keyring> {
    if load(store).await?.is_some() {
        return Err(Error::Conflict("KeyVault is already initialized".into()));
    }
    let Some(claim) = LabelClaim::take(store, INIT_CLAIM_KEY.to_owned()).await? else {
        return Err(Error::Conflict("another process is initializing KeyVault; retry".into()));
    };
    let made = initialize_claimed(store, keys, names, claim.ends).await;
    claim.release(store, made.as_ref().err()).await;
    made
}

async fn initialize_claimed(
    store: &dyn Store,
    keys: &Arc<dyn KeyStore>,
    names: &KeyNames,
    ends: std::time::Instant,
) -> Result<Keyring> {
    if load(store).await?.is_some() {
        return Err(Error::Conflict("KeyVault is already initialized".into()));
    }
    let v1 = KeyVersion::FIRST;
    let mut wanted = vec![
        (names.master(v1), KeyKind::Aes256),
        (names.token_signing(v1), KeyKind::Ed25519),
        (names.approle_hmac(v1), KeyKind::HmacSha256),
    ];
    wanted.extend(unversioned_keys(names));
    // Under the claim nobody else makes these labels: anything already under one is not
    // this initialization's to take or to destroy.
    for (label, _) in &wanted {
        let l = label.clone();
        if hsm_call(keys, move |k| k.exists(&l)).await? {
            return Err(Error::Conflict(format!(
                "the token already holds a key labelled {label} but the store has no keyring: \
                 this token belongs to another installation (choose another hsm.key_prefix), \
                 an initialization was interrupted (remove its keys from the token), \
                 or the store was lost (restore it from backup)"
            )));
        }
    }
    for (label, kind) in wanted {
        match hsm_call(keys, move |k| k.generate_claimed(&label, kind, ends)).await {
            // Only this claim made it (a second look after SoftHSM showed it twice).
            Ok(()) | Err(Error::Hsm(HsmError::KeyExists(_))) => {}
            Err(e) => return Err(e),
        }
    }
    for (label, _) in unversioned_keys(names) {
        store.put(&made_key(&label), b"{}").await?;
    }
    let ring =
        Keyring { master: KeyFamily::first(), token_signing: KeyFamily::first(), approle_hmac: KeyFamily::first() };
    let raw = encode_json(&ring);
    if !store.insert_if_absent(KEYRING_KEY, &raw, None).await? {
        return Err(Error::Conflict("another process initialized KeyVault at the same time".into()));
    }
    tracing::info!(
        "initialized the key hierarchy: master v1, token-signing v1, approle-hmac v1, audit and wrapping keys"
    );
    Ok(ring)
}

/// The rotating key families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// AES-256 master keys (KEKs) that wrap data keys.
    Master,
    /// Ed25519 keys that sign access tokens.
    TokenSigning,
}

impl Family {
    fn of(self, ring: &mut Keyring) -> &mut KeyFamily {
        match self {
            Family::Master => &mut ring.master,
            Family::TokenSigning => &mut ring.token_signing,
        }
    }

    fn label(self, names: &KeyNames, v: KeyVersion) -> KeyLabel {
        match self {
            Family::Master => names.master(v),
            Family::TokenSigning => names.token_signing(v),
        }
    }

    fn kind(self) -> KeyKind {
        match self {
            Family::Master => KeyKind::Aes256,
            Family::TokenSigning => KeyKind::Ed25519,
        }
    }
}

/// Generate version N+1 of a family inside the token and make it active (the first step
/// of a rotation). The version is claimed in the keyring first (compare-and-swap), so of
/// concurrent callers, on any replica, exactly one generates it and the others get 409;
/// then the new version is recorded by a second compare-and-swap. A whole key left under
/// the label by a claimer that crashed is adopted by whoever finishes its claim; anything
/// else there is replaced by the token (see [`KeyStore::generate_claimed`]): no committed state
/// ever referenced it.
pub async fn add_version(
    store: &dyn Store,
    keys: &Arc<dyn KeyStore>,
    names: &KeyNames,
    family: Family,
) -> Result<Keyring> {
    let conflict = || Error::Conflict("a new key version is being made by another request; retry".into());
    let raw = store.get(KEYRING_KEY).await?.ok_or_else(|| Error::Conflict("KeyVault is not initialized".into()))?;
    let mut ring: Keyring = decode_json(KEYRING_KEY, &raw)?;
    let now = crate::unix_now();
    let fam = family.of(&mut ring);
    let next = match &fam.pending {
        Some(p) if p.until > now => return Err(conflict()),
        Some(p) => p.version,
        None => fam.versions.iter().copied().max().unwrap_or(fam.active).next(),
    };
    let ours = PendingVersion { version: next, until: now.saturating_add(PENDING_LEASE) };
    fam.pending = Some(ours.clone());
    let claimed = encode_json(&ring);
    let ends = claim_ends(std::time::Duration::from_secs(PENDING_LEASE));
    if !store.compare_and_swap(KEYRING_KEY, Some(&raw), Some(&claimed)).await? {
        return Err(conflict());
    }
    let label = family.label(names, next);
    let l = label.clone();
    match hsm_call(keys, move |k| k.generate_claimed(&l, family.kind(), ends)).await {
        Ok(()) => {}
        Err(Error::Hsm(keyvault_hsm::HsmError::KeyExists(_))) => {
            tracing::warn!(?family, version = %next, "adopting the whole key under the label (left by an interrupted rotation, or shown twice by the token and looked at again)");
        }
        Err(e) => {
            // The token failed the generation (it cleans up after itself, or leaves what
            // the next claimer replaces): give the claim back now rather than make every
            // rotation wait out its lease with a 409. Not after a call that timed out: the
            // token may still be making the key, and no one else may make the label until
            // it is done. Given back as no claim at all, never as the claim this one took
            // over: that would hand a version back to a slow claimer whose key this one
            // may have destroyed. (The next rotation makes the same version number.)
            if token_call_may_still_run(&e) {
                tracing::warn!(?family, version = %next, "the token did not answer a key generation; its claim expires with its lease");
            } else if !matches!(while_ours(store, family, &ours, claimed, |f| f.pending = None).await, Ok(Some(_))) {
                tracing::warn!(?family, version = %next, "could not give back the claim of a failed rotation; it expires with its lease");
            }
            return Err(e);
        }
    }
    let record = |f: &mut KeyFamily| {
        f.pending = None;
        f.versions.push(next);
        f.active = next;
        f.activated_at = crate::unix_now();
    };
    let ring = while_ours(store, family, &ours, claimed, record).await?.ok_or_else(conflict)?;
    tracing::info!(?family, version = %next, "new key version is active");
    Ok(ring)
}

/// Change `family` in the stored keyring (`current`: its last bytes seen) while its
/// pending version is still `ours`, by compare-and-swap, again after any other change (the
/// other family rotated meanwhile: no reason to fail). `None` once the claim is not ours.
async fn while_ours(
    store: &dyn Store,
    family: Family,
    ours: &PendingVersion,
    mut current: Vec<u8>,
    change: impl Fn(&mut KeyFamily),
) -> Result<Option<Keyring>> {
    loop {
        let mut ring: Keyring = decode_json(KEYRING_KEY, &current)?;
        let fam = family.of(&mut ring);
        if fam.pending.as_ref() != Some(ours) {
            return Ok(None);
        }
        change(fam);
        if store.compare_and_swap(KEYRING_KEY, Some(&current), Some(&encode_json(&ring))).await? {
            return Ok(Some(ring));
        }
        match store.get(KEYRING_KEY).await? {
            Some(c) => current = c,
            None => return Ok(None),
        }
    }
}

/// Retire a version: remove it from the keyring (never the active one), then destroy its
/// token object. The caller has checked that nothing needs it any more. The keyring
/// after, and whether this call retired the version: a version no longer in the keyring
/// (retired by another call meanwhile) is left alone, never marked again.
pub async fn retire_version(
    store: &dyn Store,
    keys: &Arc<dyn KeyStore>,
    names: &KeyNames,
    family: Family,
    v: KeyVersion,
) -> Result<(Keyring, bool)> {
    let mut retired = false;
    loop {
        let raw = store.get(KEYRING_KEY).await?.ok_or_else(|| Error::Conflict("KeyVault is not initialized".into()))?;
        let mut ring: Keyring = decode_json(KEYRING_KEY, &raw)?;
        let fam = family.of(&mut ring);
        if fam.active == v {
            return Err(Error::Conflict(format!("version {v} is active and cannot be retired")));
        }
        if !fam.versions.contains(&v) {
            break;
        }
        fam.versions.retain(|x| *x != v);
        if !fam.retiring.contains(&v) {
            fam.retiring.push(v);
        }
        if store.compare_and_swap(KEYRING_KEY, Some(&raw), Some(&encode_json(&ring))).await? {
            retired = true;
            break;
        }
    }
    let (ring, _) = finish_retiring(store, keys, names, family).await?;
    Ok((ring.ok_or_else(|| Error::Conflict("KeyVault is not initialized".into()))?, retired))
}

/// How long a retire's claim holds when its holder stops without releasing it.
const RETIRE_CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Run `retire` holding the retire claim of `family` (`sys/rotate/retire-claim/<family>`,
/// [`crate::store::while_claimed`]): of concurrent retires on any replica one runs, and
/// the others get 409.
pub async fn retiring_alone<T>(
    store: &Arc<dyn Store>,
    family: Family,
    retire: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let name = match family {
        Family::Master => "master",
        Family::TokenSigning => "token-signing",
    };
    let key = format!("sys/rotate/retire-claim/{name}");
    match crate::store::while_claimed(store, &key, RETIRE_CLAIM_TTL, retire).await? {
        Some(r) => r,
        None => Err(Error::Conflict(format!("a retire of the {name} keys is already running; retry when it is done"))),
    }
}

/// Destroy the token object of every version of `family` marked as retiring, and unmark
/// each once it is gone (a destroy finds nothing to destroy the second time). The keyring
/// as it is at the end (`None` if there is none), and the versions this call unmarked.
pub async fn finish_retiring(
    store: &dyn Store,
    keys: &Arc<dyn KeyStore>,
    names: &KeyNames,
    family: Family,
) -> Result<(Option<Keyring>, Vec<KeyVersion>)> {
    let mut finished = Vec::new();
    loop {
        let Some(raw) = store.get(KEYRING_KEY).await? else { return Ok((None, finished)) };
        let mut ring: Keyring = decode_json(KEYRING_KEY, &raw)?;
        let fam = family.of(&mut ring);
        let Some(&v) = fam.retiring.first() else { return Ok((Some(ring), finished)) };
        let label = family.label(names, v);
        hsm_call(keys, move |k| k.destroy(&label)).await?;
        fam.retiring.retain(|x| *x != v);
        if store.compare_and_swap(KEYRING_KEY, Some(&raw), Some(&encode_json(&ring))).await? {
            tracing::info!(?family, version = %v, "key version retired and destroyed in the token");
            finished.push(v);
        }
    }
}

/// HMAC-SHA256 computed inside the token under the active HMAC key, for secrets that are
/// stored only as keyed hashes (AppRole secret ids, bootstrap tokens). `domain` separates
/// the uses; each part is length-prefixed, so part boundaries cannot be shifted.
pub async fn keyed_hash(
    keys: &Arc<dyn KeyStore>,
    names: &KeyNames,
    keyring: &SharedKeyring,
    domain: &str,
    parts: &[&[u8]],
) -> Result<[u8; 32]> {
    let mut msg = zeroize::Zeroizing::new(Vec::with_capacity(64 + parts.iter().map(|p| p.len() + 4).sum::<usize>()));
    msg.extend_from_slice(domain.as_bytes());
    msg.push(0);
    for p in parts {
        msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
        msg.extend_from_slice(p);
    }
    let label = names.approle_hmac(keyring.load().approle_hmac.active);
    hsm_call(keys, move |k| k.hmac_sha256(&label, &msg)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let n = KeyNames::new("keyvault").unwrap();
        assert_eq!(n.master(KeyVersion::FIRST).as_str(), "keyvault/master/v1");
        assert_eq!(n.token_signing(KeyVersion::FIRST.next()).as_str(), "keyvault/token-signing/v2");
        assert!(KeyNames::new("bad prefix").is_err());
        assert!(KeyNames::new(&"p".repeat(40)).is_err());
        assert!(KeyVersion::new(0).is_none());
    }

    /// A caller that read the stored keyring before another caller's change, and takes
    /// what it read after that change was taken, does not put the older keyring back:
    /// neither a follow nor a finished retire (before, this process ran on the older
    /// keyring, here token-signing version 1 as active, until the next sync).
    #[tokio::test]
    async fn a_slower_reader_does_not_put_back_an_older_keyring() {
        use crate::test_support::{Keyed, PauseAt, TestStore};
        let k = Keyed::new().await;
        for slow_follow in [true, false] {
            let store = Arc::new(TestStore::holding(k.store.clone(), PauseAt::Get, KEYRING_KEY));
            let ring = SharedKeyring::new(load(store.as_ref()).await.unwrap().unwrap(), store.clone());
            let before = ring.load().token_signing.active;
            store.arm();
            let slow = tokio::spawn({
                let (ring, keys, names) = (ring.clone(), k.keys.clone(), k.names.clone());
                async move {
                    if slow_follow {
                        ring.follow().await.map(|_| ())
                    } else {
                        ring.finish_retiring(&keys, &names, Family::Master).await.map(|_| ())
                    }
                }
            });
            store.reached.notified().await;
            let change = tokio::spawn({
                let (ring, keys, names) = (ring.clone(), k.keys.clone(), k.names.clone());
                async move { ring.add_version(&keys, &names, Family::TokenSigning).await }
            });
            // The change commits while the slow caller holds its older read (the change
            // may wait for the slow caller's turn to take it).
            let committed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                loop {
                    let stored = load(k.store.as_ref()).await.unwrap().unwrap();
                    if stored.token_signing.active != before {
                        break stored.token_signing.active;
                    }
                    assert!(!change.is_finished(), "the change ended without committing");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the change commits");
            store.go.notify_one();
            slow.await.unwrap().unwrap();
            change.await.unwrap().unwrap();
            assert_eq!(ring.load().token_signing.active, committed, "slow follow: {slow_follow}");
        }
    }
}
