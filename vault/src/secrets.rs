//! The versioned secret store behind the key/value engines: `secret/` (KV version 1) and
//! the KV version 2 engine. Both keep their records under `kv/`, the version 2 engine's
//! behind a namespace that no version 1 path can name (a control character), so that one
//! rotation re-wraps both and neither mount can reach the other's secrets.
//!
//! Storage layout (see docs/architecture.md):
//! - `kv/meta/<path>`: JSON metadata (versions, creation times, deletions), updated by
//!   compare-and-swap so that concurrent writers never lose a version;
//! - `kv/data/<path>\x1f<version, 20 digits>`: one sealed record per version (the barrier's
//!   record format). A version's slot is claimed with insert-if-absent, so two writers
//!   racing for the same number end up with two distinct versions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::barrier::{Barrier, BarrierError, Record, RecordContext};
use crate::error::{Error, Result};
use crate::keys::KeyVersion;
use crate::store::{Store, TxOp, TxOutcome, decode_json, encode_json};
use crate::usage;

/// Tries of one write before it gives up with 409 (slots taken by concurrent writers of
/// the same secret, or versions closed under it by a rotation).
const MAX_WRITE_ATTEMPTS: usize = 64;

const META_PREFIX: &str = "kv/meta/";
const DATA_PREFIX: &str = "kv/data/";
/// Separates the path from the version in data keys; paths cannot contain control characters.
const VERSION_SEP: char = '\x1f';

pub use keyvault_api::secret::{MAX_PATH_LEN, MAX_SEGMENTS, SecretPath, SecretPrefix};

/// A path refused by the rules of [`SecretPath`] (400).
impl From<keyvault_api::PathError> for Error {
    fn from(e: keyvault_api::PathError) -> Self {
        Error::invalid(e.to_string())
    }
}

/// The namespace of the KV version 2 engine's secrets (see the module's documentation).
pub const KV2_NAMESPACE: &str = "\u{2}v2/";

/// Where the `database` engine keeps its passwords: sealed and counted like every secret
/// (so master key rotation re-wraps them), in a namespace no KV path can name.
pub const DATABASE_NAMESPACE: &str = "\u{3}db/";

/// Metadata of one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionMeta {
    pub created_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_time: Option<String>,
    /// Its record is gone for good (KV version 2 `destroy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub destroyed: bool,
}

/// Metadata of a secret: its versions, and the settings KV version 2 keeps per secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretMeta {
    pub current_version: u64,
    pub versions: BTreeMap<u64, VersionMeta>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_versions: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cas_required: bool,
    /// Seconds after which a version counts as deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_version_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_time: Option<String>,
}

/// What a write may ask besides the value.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Check-and-set: write only if the current version is this one (0: no secret yet).
    pub cas: Option<u64>,
    /// The mount's limit of versions kept, for a secret that sets none (its own setting,
    /// read when the write is recorded, wins; else the engine's).
    pub max_versions: Option<usize>,
    /// The mount requires check-and-set (so does a secret whose metadata says so, read
    /// when the write is recorded).
    pub cas_required: bool,
    /// Write only if the secret exists (`Some(true)`) or does not (`Some(false)`) when
    /// the write is recorded (see `Request::must_exist`): 409 otherwise.
    pub must_exist: Option<bool>,
    /// `cas` is the version the engine read, not one the caller named (a KV version 2
    /// patch without `options.cas`): it guards against a lost update, but does not meet
    /// a `cas_required` setting, at the start or when the write is recorded.
    pub implicit_cas: bool,
}

/// A change of a secret's settings (KV version 2 `metadata`); `None` leaves one as is.
#[derive(Debug, Clone, Default)]
pub struct MetaUpdate {
    pub max_versions: Option<usize>,
    pub cas_required: Option<bool>,
    pub delete_version_after: Option<u64>,
    pub custom_metadata: Option<BTreeMap<String, String>>,
}

/// What [`Secrets::lookup`] found.
#[derive(Debug)]
pub enum Found {
    /// No secret at the path.
    NoSecret,
    /// The secret has no such version.
    NoVersion(SecretMeta, u64),
    /// The version is deleted, destroyed or past `delete_version_after`.
    Deleted(SecretMeta, u64),
    /// The version's value.
    Value(SecretMeta, SecretVersion),
}

/// A decrypted version.
pub struct SecretVersion {
    pub version: u64,
    pub meta: VersionMeta,
    /// The value as written: a JSON object's text. Zeroized on drop.
    pub data: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion").field("version", &self.version).field("data", &"<redacted>").finish()
    }
}

/// Split a KV version 1 data key back into path and version.
pub fn parse_data_key(key: &str) -> Option<(SecretPath, u64)> {
    let (path, version) = parse_data_key_raw(key)?;
    Some((SecretPath::parse(&path).ok()?, version))
}

/// Split any data key (either engine's) into its stored path and version: what rotation,
/// which walks every record, seals the record's context with.
pub fn parse_data_key_raw(key: &str) -> Option<(String, u64)> {
    let rest = key.strip_prefix(DATA_PREFIX)?;
    let (path, version) = rest.rsplit_once(VERSION_SEP)?;
    Some((path.to_owned(), version.parse().ok()?))
}

/// The prefix under which every sealed secret record lives.
pub fn data_prefix() -> &'static str {
    DATA_PREFIX
}

pub fn record_context(path: &SecretPath, version: u64) -> RecordContext<'_> {
    record_context_raw(path.as_str(), version)
}

/// The context of a record by its stored path (a version 2 secret's includes its namespace).
pub fn record_context_raw(path: &str, version: u64) -> RecordContext<'_> {
    RecordContext { purpose: "kv", path, version }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Check that a value is a JSON object, without copying its (secret) values: they are
/// borrowed as raw JSON and the original bytes are what gets sealed.
pub fn validate_value(body: &[u8]) -> Result<()> {
    crate::json::check_no_duplicate_keys(body).map_err(|e| {
        if crate::json::is_duplicate_key_error(&e) {
            Error::invalid("the secret must be a JSON object: duplicate key in a JSON object")
        } else {
            Error::invalid(format!("the secret must be a JSON object: {}", json_error_category(&e)))
        }
    })?;
    serde_json::from_slice::<BTreeMap<String, &RawValue>>(body)
        .map(drop)
        .map_err(|e| Error::invalid(format!("the secret must be a JSON object: {}", json_error_category(&e))))
}

pub use crate::json::json_error_category;

/// The `delete_version_after` that applies to a secret: its own and the mount's, the
/// shorter of the two when both are set (as in Vault).
pub fn delete_after(meta: &SecretMeta, mount: Option<u64>) -> Option<u64> {
    match (meta.delete_version_after, mount) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether a version counts as deleted by the `delete_version_after` that applies (see
/// [`delete_after`]).
pub fn expired(meta: &SecretMeta, v: &VersionMeta, mount: Option<u64>) -> bool {
    let Some(after) = delete_after(meta, mount) else { return false };
    let Ok(created) = humantime::parse_rfc3339_weak(&v.created_time) else { return false };
    created.checked_add(std::time::Duration::from_secs(after)).is_some_and(|t| t <= std::time::SystemTime::now())
}

/// The steps that delete one stored record ([`Secrets::record_removal`]).
struct Removal {
    swap: TxOp,
    /// The record's stored bytes (the copy set aside: as the rotation found them), when
    /// readable.
    record: Option<Vec<u8>>,
    /// The counter it is counted under (minus one when it goes).
    counter: Option<String>,
    /// It is the copy a rotation set aside, not the record itself.
    set_aside: bool,
}

/// How many times a change of a secret's versions reads and tries again when the secret
/// changed under it, before it answers 409.
const MAX_CHANGE_ATTEMPTS: usize = 100;

fn changing_concurrently(path: &SecretPath) -> Error {
    Error::Conflict(format!("{} is being changed concurrently; retry", path.as_str()))
}

/// The secret engine.
#[derive(Debug)]
pub struct Secrets {
    store: Arc<dyn Store>,
    barrier: Barrier,
    max_versions: usize,
    /// `""` for KV version 1, [`KV2_NAMESPACE`] for version 2.
    ns: &'static str,
}

impl Secrets {
    /// The KV version 1 store.
    pub fn new(store: Arc<dyn Store>, barrier: Barrier, max_versions: usize) -> Self {
        Secrets { store, barrier, max_versions: max_versions.max(1), ns: "" }
    }

    /// The `database` engine's passwords.
    pub fn database(store: Arc<dyn Store>, barrier: Barrier, max_versions: usize) -> Self {
        Secrets { ns: DATABASE_NAMESPACE, ..Self::new(store, barrier, max_versions) }
    }

    /// The KV version 2 store.
    pub fn kv2(store: Arc<dyn Store>, barrier: Barrier, max_versions: usize) -> Self {
        Secrets { ns: KV2_NAMESPACE, ..Self::new(store, barrier, max_versions) }
    }

    fn full(&self, path: &SecretPath) -> String {
        format!("{}{}", self.ns, path.as_str())
    }

    fn meta_key(&self, path: &SecretPath) -> String {
        format!("{META_PREFIX}{}", self.full(path))
    }

    pub(crate) fn data_key(&self, path: &SecretPath, version: u64) -> String {
        format!("{DATA_PREFIX}{}{VERSION_SEP}{version:020}", self.full(path))
    }

    async fn load_meta(&self, path: &SecretPath) -> Result<(Option<Vec<u8>>, SecretMeta)> {
        let key = self.meta_key(path);
        match self.store.get(&key).await? {
            Some(raw) => {
                let meta = decode_json(&key, &raw)?;
                Ok((Some(raw), meta))
            }
            None => Ok((None, SecretMeta::default())),
        }
    }

    /// Whether the secret exists, for the existence check that decides between `create`
    /// and `update` (and for `must_exist` when a write commits: one rule for both).
    pub async fn exists(&self, path: &SecretPath) -> Result<bool> {
        if !self.ns.is_empty() {
            // Metadata is existence: no need to decode it.
            return Ok(self.store.get(&self.meta_key(path)).await?.is_some());
        }
        let (raw, meta) = self.load_meta(path).await?;
        Ok(self.exists_as(raw.is_some(), &meta))
    }

    /// The existence rule: KV version 2 as in Vault (a secret with metadata exists, its
    /// latest version soft-deleted or not); KV version 1 while its latest version is
    /// there: a DELETE makes it a secret that a write must `create` again, as in Vault,
    /// whose KV version 1 delete removes the entry. (Before, its metadata kept it
    /// existing, so a caller holding only `update` could write it again.)
    fn exists_as(&self, has_meta: bool, meta: &SecretMeta) -> bool {
        has_meta
            && (!self.ns.is_empty()
                || meta.versions.get(&meta.current_version).is_some_and(|v| v.deletion_time.is_none() && !v.destroyed))
    }

    /// A secret's metadata, if it has any.
    pub async fn metadata(&self, path: &SecretPath) -> Result<Option<SecretMeta>> {
        let (raw, meta) = self.load_meta(path).await?;
        Ok(raw.map(|_| meta))
    }

    /// Write a new version; returns it. `value` must be a JSON object's text.
    ///
    /// The sealed record and its count under the master version that wraps it are one
    /// store transaction (see [`crate::usage`]). If that version was closed by a rotation
    /// in the meantime (on any replica), the value is sealed again under the new version.
    pub async fn write(&self, path: &SecretPath, value: &[u8]) -> Result<(u64, VersionMeta)> {
        self.write_with(path, value, WriteOptions::default()).await
    }

    /// [`Secrets::write`] with check-and-set and a version limit.
    pub async fn write_with(&self, path: &SecretPath, value: &[u8], opts: WriteOptions) -> Result<(u64, VersionMeta)> {
        validate_value(value)?;
        let (raw, meta) = self.load_meta(path).await?;
        let exists = self.exists_as(raw.is_some(), &meta);
        if opts.must_exist.is_some_and(|m| m != exists) {
            return Err(existence_changed(path, exists));
        }
        let cas_mismatch = || Error::Conflict("check-and-set parameter did not match the current version".into());
        let written_concurrently =
            || Error::Conflict(format!("{} is being written concurrently; retry", path.as_str()));
        let cas_required = || Error::invalid("check-and-set parameter required for this call");
        if (opts.cas.is_none() || opts.implicit_cas) && (opts.cas_required || meta.cas_required) {
            return Err(cas_required());
        }
        if opts.cas.is_some_and(|cas| cas != meta.current_version) {
            return Err(cas_mismatch());
        }
        // Claim a version slot: the next number whose record does not exist yet.
        let mut version = meta.current_version + 1;
        let mut attempts = 0;
        'claim: loop {
            attempts += 1;
            if attempts > MAX_WRITE_ATTEMPTS {
                return Err(written_concurrently());
            }
            let full = self.full(path);
            let sealed = self.barrier.seal(&record_context_raw(&full, version), value).await?;
            let kek = Record::parse(&sealed)?.kek_version;
            let key = self.data_key(path, version);
            let ops = vec![TxOp::Insert { key: key.clone(), value: sealed.clone() }, usage::count(kek, &key, 1)];
            match self.store.transact(ops).await? {
                TxOutcome::Committed => {}
                // The slot is taken: by a concurrent writer, or by the record of a writer
                // that crashed before it reached the metadata (an orphan, never
                // acknowledged). Take the next one. With check-and-set, only while the
                // metadata still says `cas`; which writer wins is decided there (below).
                TxOutcome::Conflict => {
                    if let Some(cas) = opts.cas
                        && self.load_meta(path).await?.1.current_version != cas
                    {
                        return Err(cas_mismatch());
                    }
                    version += 1;
                    continue;
                }
                TxOutcome::Closed => {
                    // A rotation closed `kek` after this replica sealed under it.
                    self.barrier.follow_keyring().await?;
                    continue;
                }
            }
            let vmeta = VersionMeta { created_time: now_rfc3339(), deletion_time: None, destroyed: false };
            // Record the version in the metadata; merge with concurrent writers.
            loop {
                let (raw, mut meta) = self.load_meta(path).await?;
                let exists = self.exists_as(raw.is_some(), &meta);
                if opts.must_exist.is_some_and(|m| m != exists) {
                    // Created or deleted since the caller's permission was checked: this
                    // version was never acknowledged, and its record goes.
                    self.destroy_own_record(&key, &sealed).await?;
                    return Err(existence_changed(path, exists));
                }
                if opts.cas.is_some_and(|cas| cas != meta.current_version) {
                    // Another check-and-set writer got there first: this version was never
                    // acknowledged, and its record goes.
                    self.destroy_own_record(&key, &sealed).await?;
                    return Err(cas_mismatch());
                }
                // The settings as they are now, not as they were when the write began: a
                // secret made to require check-and-set meanwhile refuses this write.
                if (opts.cas.is_none() || opts.implicit_cas) && meta.cas_required {
                    self.destroy_own_record(&key, &sealed).await?;
                    return Err(cas_required());
                }
                // One number is never recorded for two values: if the metadata lists it
                // already (a version removed earlier freed its slot, and this writer
                // claimed it on an older view), this record gives the slot up and the
                // write takes a number above the current one. And this writer's own
                // record must still be there: a removal that read metadata listing the
                // number deletes whatever record holds it, and another writer may have
                // claimed the freed slot since (its record there is its own, never this
                // one's to record or delete). Read after the metadata, the record is
                // there unless such a removal committed first; one that commits later
                // changes the metadata read here, and the compare-and-swap below fails.
                // (Nothing was acknowledged yet either way.)
                let taken = meta.versions.contains_key(&version);
                let mine = self.store.get(&key).await?.is_some_and(|r| same_value(&r, &sealed));
                if taken || !mine {
                    if taken {
                        self.destroy_own_record(&key, &sealed).await?;
                    }
                    version = meta.current_version.max(version) + 1;
                    continue 'claim;
                }
                meta.versions.insert(version, vmeta.clone());
                meta.current_version = meta.current_version.max(version);
                meta.created_time.get_or_insert_with(|| vmeta.created_time.clone());
                meta.updated_time = Some(vmeta.created_time.clone());
                // The secret's own limit as recorded now (a raise made while this write ran
                // must not prune what it keeps), else the mount's, else the engine's.
                let max = meta.max_versions.or(opts.max_versions).unwrap_or(self.max_versions).max(1);
                let mut pruned = Vec::new();
                while meta.versions.len() > max {
                    if let Some((old, _)) = meta.versions.pop_first() {
                        pruned.push(old);
                    }
                }
                if pruned.contains(&version) {
                    // Older than every version kept (later writers recorded theirs
                    // first): take a number above them rather than be pruned at once.
                    self.destroy_own_record(&key, &sealed).await?;
                    version = meta.current_version + 1;
                    continue 'claim;
                }
                let new = encode_json(&meta);
                let recorded = match raw {
                    // Versions beyond the limit go with the same metadata change.
                    Some(raw) if !pruned.is_empty() => {
                        self.commit_removal(path, raw, Some(new), pruned, Vec::new()).await?
                    }
                    raw => self.store.compare_and_swap(&self.meta_key(path), raw.as_deref(), Some(&new)).await?,
                };
                if recorded {
                    return Ok((version, vmeta));
                }
                attempts += 1;
                if attempts > MAX_WRITE_ATTEMPTS {
                    // Never acknowledged: its record goes.
                    self.destroy_own_record(&key, &sealed).await?;
                    return Err(written_concurrently());
                }
            }
        }
    }

    /// What deletes the record under `key` now: the swap that removes it (or the copy a
    /// rotation set aside of it) and the counter it is counted under; `None` if there is
    /// neither.
    async fn record_removal(&self, key: &str) -> Result<Option<Removal>> {
        if let Some(raw) = self.store.get(key).await? {
            let counter = Record::parse(&raw).ok().map(|r| usage::counter_key(r.kek_version, key));
            let swap = TxOp::Swap { key: key.to_owned(), expected: raw.clone(), new: None };
            return Ok(Some(Removal { swap, record: Some(raw), counter, set_aside: false }));
        }
        let aside_key = usage::set_aside_key(key);
        let Some(raw) = self.store.get(&aside_key).await? else { return Ok(None) };
        let aside: usage::SetAside = decode_json(&aside_key, &raw)?;
        let counter = aside.counted_under.and_then(KeyVersion::new).map(|v| usage::counter_key(v, key));
        let swap = TxOp::Swap { key: aside_key, expected: raw, new: None };
        Ok(Some(Removal { swap, record: hex::decode(&aside.record).ok(), counter, set_aside: true }))
    }

    /// Delete a writer's own record under `key` (the one it inserted: `sealed`, or that
    /// record re-wrapped by a rotation since, or set aside by one) and its count, in one
    /// transaction; read again if it was re-wrapped meanwhile. Another writer's record in
    /// the same slot is left alone.
    async fn destroy_own_record(&self, key: &str, sealed: &[u8]) -> Result<()> {
        loop {
            let Some(r) = self.record_removal(key).await? else { return Ok(()) };
            if !r.record.as_deref().is_some_and(|record| same_value(record, sealed)) {
                return Ok(());
            }
            let mut ops = vec![r.swap];
            ops.extend(r.counter.map(|key| TxOp::Count { key, delta: -1 }));
            if self.store.transact(ops).await? == TxOutcome::Committed {
                if r.set_aside {
                    tracing::warn!(record = %key, "a record set aside by a rotation was deleted with its secret version");
                }
                return Ok(());
            }
        }
    }

    /// Change the metadata of `path` from `raw` to `new` (`None`: delete it) and delete the
    /// records of `versions` with their counts, in one transaction: a destroy is done
    /// whole or not at all, wherever a crash or a store failure stops it (a record left
    /// behind by a metadata change that went through could not be told later from a live
    /// one, as version numbers are used again after a delete). False if the metadata or a
    /// record changed meanwhile (a writer, a re-wrap): read again and retry. `also` (the
    /// caller's own changes: a static role deleted with its passwords) goes in the same
    /// transaction, after the secret's.
    async fn commit_removal(
        &self,
        path: &SecretPath,
        raw: Vec<u8>,
        new: Option<Vec<u8>>,
        versions: impl IntoIterator<Item = u64>,
        also: Vec<TxOp>,
    ) -> Result<bool> {
        let mut removals = Vec::new();
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        let mut set_aside = Vec::new();
        for v in versions {
            let key = self.data_key(path, v);
            let Some(r) = self.record_removal(&key).await? else { continue };
            if let Some(counter) = r.counter {
                *counts.entry(counter).or_default() -= 1;
            }
            removals.push(r.swap);
            if r.set_aside {
                set_aside.push(key);
            }
        }
        // The metadata first (everything that changes a secret's versions takes it first),
        // then the records in key order, then the counters in key order: concurrent
        // transactions take their locks in the same order (PostgreSQL).
        removals.sort_by(|a, b| a.key().cmp(b.key()));
        let mut ops = vec![TxOp::Swap { key: self.meta_key(path), expected: raw, new }];
        ops.extend(removals);
        ops.extend(counts.into_iter().map(|(key, delta)| TxOp::Count { key, delta }));
        ops.extend(also);
        match self.store.transact(ops).await? {
            TxOutcome::Committed => {
                for key in set_aside {
                    tracing::warn!(record = %key, "a record set aside by a rotation was deleted with its secret version");
                }
                Ok(true)
            }
            TxOutcome::Conflict | TxOutcome::Closed => Ok(false),
        }
    }

    /// Read a version (default: the current one).
    pub async fn read(&self, path: &SecretPath, version: Option<u64>) -> Result<SecretVersion> {
        self.read_with(path, version, None).await
    }

    /// [`Secrets::read`] under a mount's `delete_version_after` as well as the secret's.
    pub async fn read_with(
        &self,
        path: &SecretPath,
        version: Option<u64>,
        mount_delete_after: Option<u64>,
    ) -> Result<SecretVersion> {
        match self.lookup(path, version, mount_delete_after).await? {
            Found::Value(_, v) => Ok(v),
            Found::Deleted(_, version) => {
                Err(Error::NotFound(format!("version {version} of {} is deleted", path.as_str())))
            }
            Found::NoSecret | Found::NoVersion(..) => Err(Error::NotFound(format!("no secret at {}", path.as_str()))),
        }
    }

    /// A secret's metadata and a version's value (default: the current version), in one
    /// store query where the store can (PostgreSQL: the metadata and the newest record
    /// together; an older version's record is a second query).
    /// A version past the `delete_version_after` that applies (the secret's, or
    /// `mount_delete_after`, the shorter) is deleted.
    ///
    /// A record read after its metadata (not in the same query) is taken only if the
    /// metadata still says the same of that version afterwards: between the two reads, a
    /// delete could free the record's slot and a writer with an older view fill it with
    /// a value not (or not yet) acknowledged as that version. Read again then.
    pub async fn lookup(
        &self,
        path: &SecretPath,
        version: Option<u64>,
        mount_delete_after: Option<u64>,
    ) -> Result<Found> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            if let Some(found) = self.lookup_once(path, version, mount_delete_after).await? {
                return Ok(found);
            }
        }
        Err(Error::Conflict(format!("{} kept changing while it was read; read it again", path.as_str())))
    }

    /// [`Secrets::lookup`], once: `None` if the version's metadata changed under the read.
    async fn lookup_once(
        &self,
        path: &SecretPath,
        version: Option<u64>,
        mount_delete_after: Option<u64>,
    ) -> Result<Option<Found>> {
        let meta_key = self.meta_key(path);
        let records = format!("{DATA_PREFIX}{}{VERSION_SEP}", self.full(path));
        let (raw, newest) = self.store.get_and_last_under(&meta_key, &records).await?;
        let Some(raw) = raw else {
            return Ok(Some(Found::NoSecret));
        };
        let meta: SecretMeta = decode_json(&meta_key, &raw)?;
        let version = version.unwrap_or(meta.current_version);
        let Some(vmeta) = meta.versions.get(&version) else {
            return Ok(Some(Found::NoVersion(meta, version)));
        };
        if vmeta.deletion_time.is_some() || vmeta.destroyed || expired(&meta, vmeta, mount_delete_after) {
            return Ok(Some(Found::Deleted(meta, version)));
        }
        let key = self.data_key(path, version);
        let prefetched = newest.filter(|(k, _)| *k == key).map(|(_, v)| v);
        let sealed = match prefetched {
            Some(v) => Some(v),
            None => {
                let sealed = self.store.get(&key).await?;
                let again = self.store.get(&meta_key).await?;
                if again.as_deref() != Some(raw.as_slice()) {
                    let same = match &again {
                        Some(a) => decode_json::<SecretMeta>(&meta_key, a)?.versions.get(&version) == Some(vmeta),
                        None => false,
                    };
                    if !same {
                        return Ok(None);
                    }
                }
                sealed
            }
        };
        let Some(sealed) = sealed else {
            if self.store.get(&usage::set_aside_key(&key)).await?.is_some() {
                tracing::error!(path = %path.as_str(), version, "this version's record was set aside as damaged by a rotation");
                return Err(Error::Barrier(BarrierError::Integrity));
            }
            tracing::error!(path = %path.as_str(), version, "metadata names a version whose record is missing");
            return Err(Error::NotFound(format!("no secret at {}", path.as_str())));
        };
        let full = self.full(path);
        let context = record_context_raw(&full, version);
        let data = match self.barrier.open(&context, &sealed).await {
            Ok(data) => data,
            // A record fetched under a master version that a rotation and a retire ended
            // before it was opened (its epoch key or token key gone meanwhile) has been
            // re-wrapped since: the record as it is now opens. Tried once, and only for
            // a record that changed; anything else is the error it was.
            Err(e) => match self.store.get(&key).await? {
                Some(now) if now != sealed && same_value(&now, &sealed) => self.barrier.open(&context, &now).await?,
                _ => return Err(e),
            },
        };
        let v = SecretVersion { version, meta: vmeta.clone(), data };
        Ok(Some(Found::Value(meta, v)))
    }

    /// Delete the current version: its record is destroyed, its metadata marked deleted.
    pub async fn delete_latest(&self, path: &SecretPath) -> Result<()> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let (raw, mut meta) = self.load_meta(path).await?;
            let Some(raw) = raw else {
                return Err(Error::NotFound(format!("no secret at {}", path.as_str())));
            };
            let current = meta.current_version;
            match meta.versions.get_mut(&current) {
                Some(v) if v.deletion_time.is_none() => v.deletion_time = Some(now_rfc3339()),
                _ => {
                    return Err(Error::NotFound(format!("the latest version of {} is already deleted", path.as_str())));
                }
            }
            if self.commit_removal(path, raw, Some(encode_json(&meta)), [current], Vec::new()).await? {
                return Ok(());
            }
        }
        Err(changing_concurrently(path))
    }

    /// Change the metadata of the versions given (KV version 2 `delete`, `undelete`,
    /// `destroy`; `None`: the current version): `change` returns whether it changed one.
    /// Records of versions destroyed go.
    async fn change_versions(
        &self,
        path: &SecretPath,
        versions: Option<&[u64]>,
        change: impl Fn(&mut VersionMeta) -> bool,
    ) -> Result<()> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            let (raw, mut meta) = self.load_meta(path).await?;
            let Some(raw) = raw else {
                return Err(Error::NotFound(format!("no secret at {}", path.as_str())));
            };
            let wanted: Vec<u64> = match versions {
                Some(v) => v.to_vec(),
                None => vec![meta.current_version],
            };
            let mut destroy = Vec::new();
            let mut changed = false;
            for v in &wanted {
                if let Some(m) = meta.versions.get_mut(v) {
                    let was_destroyed = m.destroyed;
                    changed |= change(m);
                    if m.destroyed && !was_destroyed {
                        destroy.push(*v);
                    }
                }
            }
            if !changed {
                return Ok(());
            }
            meta.updated_time = Some(now_rfc3339());
            if self.commit_removal(path, raw, Some(encode_json(&meta)), destroy, Vec::new()).await? {
                return Ok(());
            }
        }
        Err(changing_concurrently(path))
    }

    /// Mark versions deleted, keeping their records (undelete brings them back).
    pub async fn soft_delete(&self, path: &SecretPath, versions: Option<&[u64]>) -> Result<()> {
        let now = now_rfc3339();
        self.change_versions(path, versions, |m| {
            let fresh = m.deletion_time.is_none() && !m.destroyed;
            if fresh {
                m.deletion_time = Some(now.clone());
            }
            fresh
        })
        .await
    }

    /// Bring back versions deleted but not destroyed.
    pub async fn undelete(&self, path: &SecretPath, versions: &[u64]) -> Result<()> {
        self.change_versions(path, Some(versions), |m| !m.destroyed && m.deletion_time.take().is_some()).await
    }

    /// Destroy versions: their records go for good.
    pub async fn destroy(&self, path: &SecretPath, versions: &[u64]) -> Result<()> {
        self.change_versions(path, Some(versions), |m| !std::mem::replace(&mut m.destroyed, true)).await
    }

    /// Delete a secret entirely: every version's record and its metadata.
    pub async fn delete_all(&self, path: &SecretPath) -> Result<()> {
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            if self.delete_all_with(path, Vec::new()).await? {
                return Ok(());
            }
        }
        Err(changing_concurrently(path))
    }

    /// [`Self::delete_all`] and `also` in one transaction: both or neither (false if the
    /// secret or anything `also` expects changed meanwhile: read again and retry). With no
    /// secret at `path`, `also` alone.
    pub async fn delete_all_with(&self, path: &SecretPath, also: Vec<TxOp>) -> Result<bool> {
        let (raw, meta) = self.load_meta(path).await?;
        match raw {
            None if also.is_empty() => Ok(true),
            None => Ok(self.store.transact(also).await? == TxOutcome::Committed),
            Some(raw) => self.commit_removal(path, raw, None, meta.versions.keys().copied(), also).await,
        }
    }

    /// Change a secret's settings, creating its metadata if it has none.
    pub async fn update_metadata(&self, path: &SecretPath, update: MetaUpdate) -> Result<()> {
        self.update_metadata_if(path, update, None).await
    }

    /// [`Secrets::update_metadata`], only if the secret exists (`Some(true)`) or does not
    /// (`Some(false)`) when the change commits (see `WriteOptions::must_exist`): 409
    /// otherwise.
    pub async fn update_metadata_if(
        &self,
        path: &SecretPath,
        update: MetaUpdate,
        must_exist: Option<bool>,
    ) -> Result<()> {
        loop {
            let (raw, mut meta) = self.load_meta(path).await?;
            if must_exist.is_some_and(|m| m != raw.is_some()) {
                return Err(existence_changed(path, raw.is_some()));
            }
            if let Some(m) = update.max_versions {
                meta.max_versions = (m > 0).then_some(m);
            }
            if let Some(c) = update.cas_required {
                meta.cas_required = c;
            }
            if let Some(d) = update.delete_version_after {
                meta.delete_version_after = (d > 0).then_some(d);
            }
            if let Some(c) = &update.custom_metadata {
                meta.custom_metadata = c.clone();
            }
            let now = now_rfc3339();
            meta.created_time.get_or_insert_with(|| now.clone());
            meta.updated_time = Some(now);
            if self.store.compare_and_swap(&self.meta_key(path), raw.as_deref(), Some(&encode_json(&meta))).await? {
                return Ok(());
            }
        }
    }

    /// The names directly under `prefix`; sub-folders end with `/`.
    pub async fn list(&self, prefix: &SecretPrefix) -> Result<Vec<String>> {
        let full = format!("{META_PREFIX}{}{}", self.ns, prefix.as_str());
        let mut keys: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        // KV version 1 folders already looked into, and whether they hold a secret.
        let mut folders: HashMap<String, bool> = HashMap::new();
        loop {
            let page = self.store.scan_prefix(&full, after.as_deref(), 1000).await?;
            let done = page.len() < 1000;
            // Where the next page starts: after this one's last key, or, when that key is
            // inside a folder, after everything in that folder (a folder is one name in
            // the listing, however many secrets it holds; and version 1's listing skips
            // other engines' namespaces whole).
            let next = page.last().map(|(k, _)| {
                let rest = &k[full.len()..];
                match rest.find('/') {
                    Some(i) => format!("{full}{}{}", &rest[..=i], char::MAX),
                    None => k.clone(),
                }
            });
            for (k, raw) in &page {
                let rest = &k[full.len()..];
                let child = match rest.find('/') {
                    Some(i) => &rest[..=i],
                    None => rest,
                };
                // Other engines' namespaces (KV version 2's, the database engine's: each
                // starts with a control character no path can have) are not folders of
                // version 1.
                let other_namespace = self.ns.is_empty() && child.starts_with(|c: char| c.is_ascii_control());
                // A secret that does not exist by the engine's rule (KV version 1: its
                // latest version deleted) is not listed, as Vault's KV version 1 lists no
                // deleted entry; nor is a folder that holds no secret that exists (its
                // own listing would be 404).
                if self.ns.is_empty() && !other_namespace {
                    let listed = if child == rest {
                        self.stored_exists(k, raw)
                    } else if let Some(known) = folders.get(child) {
                        *known
                    } else {
                        let holds = self.holds_a_secret(&format!("{full}{child}")).await?;
                        folders.insert(child.to_owned(), holds);
                        holds
                    };
                    if !listed {
                        continue;
                    }
                }
                if !other_namespace && keys.last().map(String::as_str) != Some(child) {
                    keys.push(child.to_owned());
                }
            }
            after = next;
            if done {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Err(Error::NotFound(format!("nothing under {:?}", prefix.as_str())));
        }
        Ok(keys)
    }

    /// Whether the secret whose stored metadata is `raw` (under key `k`) exists by this
    /// engine's rule; metadata that cannot be read counts as a secret (it is there).
    fn stored_exists(&self, k: &str, raw: &[u8]) -> bool {
        decode_json::<SecretMeta>(k, raw).map_or(true, |m| self.exists_as(true, &m))
    }

    /// Whether any secret under the metadata prefix `full` exists by this engine's rule
    /// ([`Secrets::stored_exists`]).
    async fn holds_a_secret(&self, full: &str) -> Result<bool> {
        let mut after: Option<String> = None;
        // Small pages first: the first secret usually exists, and a folder may hold many.
        let mut limit = 16;
        loop {
            let page = self.store.scan_prefix(full, after.as_deref(), limit).await?;
            if page.iter().any(|(k, raw)| self.stored_exists(k, raw)) {
                return Ok(true);
            }
            if page.len() < limit {
                return Ok(false);
            }
            after = page.last().map(|(k, _)| k.clone());
            limit = (limit * 4).min(1000);
        }
    }
}

/// A write kept to the existence its caller's permission was checked on (see
/// `WriteOptions::must_exist`) found the secret created or deleted since.
fn existence_changed(path: &SecretPath, exists: bool) -> Error {
    let what = if exists { "created" } else { "deleted" };
    Error::Conflict(format!("{} was {what} meanwhile; retry", path.as_str()))
}

/// Whether two sealed records hold the same sealing of a value: the same nonce and
/// ciphertext (a re-wrap by a rotation changes only the wrapped data key; every write
/// seals with a fresh random nonce, so no two writes share them).
fn same_value(a: &[u8], b: &[u8]) -> bool {
    match (Record::parse(a), Record::parse(b)) {
        (Ok(a), Ok(b)) => a.nonce == b.nonce && a.ciphertext == b.ciphertext,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Keyed;

    /// A listing reads a folder's first entries, not everything in it: three folders of
    /// 3,000 secrets each, KV version 2's secrets beside them, and the root listing
    /// reads a few pages (before: every key under the prefix, all 12,000, values
    /// included).
    #[tokio::test]
    async fn a_listing_skips_over_folders() {
        use crate::test_support::{PauseAt, TestStore};
        let k = Keyed::new().await;
        let mut ops = Vec::new();
        for folder in ["a", "b", "c"] {
            for i in 0..3000 {
                ops.push(format!("{META_PREFIX}{folder}/s{i:05}"));
            }
        }
        for i in 0..3000 {
            ops.push(format!("{META_PREFIX}{KV2_NAMESPACE}x/s{i:05}"));
        }
        for key in ["top", "b/direct"] {
            ops.push(format!("{META_PREFIX}{key}"));
        }
        for chunk in ops.chunks(1000) {
            let tx = chunk.iter().map(|key| TxOp::Insert { key: key.clone(), value: b"{}".to_vec() }).collect();
            k.store.transact(tx).await.unwrap();
        }
        let store = Arc::new(TestStore::holding(k.store.clone(), PauseAt::Get, ""));
        let v1 = Secrets::new(store.clone(), k.barrier(), 10);
        assert_eq!(v1.list(&SecretPrefix::parse("").unwrap()).await.unwrap(), ["a/", "b/", "c/", "top"]);
        let read = store.scanned.swap(0, std::sync::atomic::Ordering::Relaxed);
        assert!(read <= 5 * 1000, "the root listing read {read} entries");
        let v2 = Secrets::kv2(store.clone(), k.barrier(), 10);
        assert_eq!(v2.list(&SecretPrefix::parse("").unwrap()).await.unwrap(), ["x/"]);
        assert_eq!(v1.list(&SecretPrefix::parse("b/").unwrap()).await.unwrap().len(), 3001);
    }

    #[test]
    fn paths_are_validated() {
        assert_eq!(SecretPath::from_url("db/password").unwrap().as_str(), "db/password");
        assert_eq!(SecretPath::from_url("caf%C3%A9/x").unwrap().as_str(), "café/x");
        for bad in ["", "a//b", "a/", "/a", "a/../b", "..", "a/./b", "a%00b", "a%2Fb", "a%FFb", "a%0Ab"] {
            assert!(SecretPath::from_url(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(SecretPath::from_url(&"a".repeat(513)).is_err());
        assert!(SecretPath::from_url(&vec!["a"; 33].join("/")).is_err());
        assert_eq!(SecretPrefix::from_url("").unwrap().as_str(), "");
        assert_eq!(SecretPrefix::from_url("a/b/").unwrap().as_str(), "a/b/");
        assert_eq!(SecretPrefix::from_url("a/b").unwrap().as_str(), "a/b/");
        assert!(SecretPrefix::from_url("a/../").is_err());
    }

    #[test]
    fn data_keys_round_trip() {
        let p = SecretPath::parse("a/b").unwrap();
        let key = format!("kv/data/{}\x1f{:020}", p.as_str(), 42);
        assert_eq!(parse_data_key(&key), Some((p, 42)));
        let v2 = format!("kv/data/{KV2_NAMESPACE}a/b\x1f{:020}", 3);
        assert_eq!(parse_data_key(&v2), None, "a version 2 record is no version 1 path");
        assert_eq!(parse_data_key_raw(&v2), Some((format!("{KV2_NAMESPACE}a/b"), 3)));
        assert_eq!(parse_data_key("kv/meta/x"), None);
    }

    /// Every way of removing versions, stopped after each of its store writes in turn
    /// (as `kill -9` or a store outage would stop it): afterwards the secret is as before
    /// or as after, never in between. A version the metadata no longer serves has no
    /// record left, and a version it serves has its record; the record counts match.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removal_stopped_at_any_write_is_done_whole_or_not_at_all() {
        let keyed = Keyed::new().await;
        let (store, barrier) = (keyed.store.clone(), keyed.barrier());
        for op in ["delete_latest", "destroy", "delete_all", "write_past_max", "kv2_destroy"] {
            for stop_after in 0..4i64 {
                let barrier = barrier.clone();
                let whole = if op == "kv2_destroy" {
                    Secrets::kv2(store.clone(), barrier.clone(), 3)
                } else {
                    Secrets::new(store.clone(), barrier.clone(), 3)
                };
                let path = SecretPath::parse(&format!("app/{op}-{stop_after}")).unwrap();
                for i in 1..=3 {
                    whole.write(&path, format!(r#"{{"v":"{i}"}}"#).as_bytes()).await.unwrap();
                }
                let stops = crate::test_support::TestStore::stopping_after(store.clone(), stop_after);
                let cut = Secrets { store: Arc::new(stops), barrier, max_versions: 3, ns: whole.ns };
                let result = match op {
                    "delete_latest" => cut.delete_latest(&path).await,
                    "destroy" | "kv2_destroy" => cut.destroy(&path, &[1, 3]).await,
                    "delete_all" => cut.delete_all(&path).await,
                    _ => cut.write(&path, br#"{"v":"4"}"#).await.map(|_| ()),
                };
                // What the metadata serves, against what records there are.
                let meta = whole.metadata(&path).await.unwrap();
                for v in 1..=4u64 {
                    let live = meta.as_ref().and_then(|m| m.versions.get(&v)).is_some_and(|m| !m.destroyed);
                    let gone_by_delete_latest = op == "delete_latest"
                        && meta.as_ref().and_then(|m| m.versions.get(&v)).is_some_and(|m| m.deletion_time.is_some());
                    let record = store.get(&whole.data_key(&path, v)).await.unwrap().is_some();
                    let should = live && !gone_by_delete_latest;
                    // A write stopped before its metadata leaves an orphan record of a
                    // version never acknowledged (its slot is skipped later): allowed.
                    let orphan = op == "write_past_max" && v == 4 && result.is_err();
                    assert!(
                        record == should || (orphan && record && !live),
                        "{op} stopped after {stop_after} writes ({result:?}): version {v} served {should}, record {record}"
                    );
                }
                let records = store.scan_prefix(DATA_PREFIX, None, 100_000).await.unwrap().len() as i64;
                let counted: i64 = store.counters("").await.unwrap().iter().map(|c| c.value).sum();
                assert_eq!(counted, records, "{op} stopped after {stop_after}: every record counted once");
                if stop_after >= 3 {
                    assert!(result.is_ok(), "{op} with room for every write: {result:?}");
                }
            }
        }
    }

    /// Secret paths of the longest length (512 bytes) can be written, read, destroyed,
    /// pruned and deleted in both engines: the set-aside name a removal looks up fits a
    /// store key. Before, it was the record key in hex, over 1,024 bytes for paths over
    /// about 472 bytes, and every removal that looked for it failed (a destroyed
    /// version's secret could never be deleted, nor written past `max_versions`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_longest_paths_can_be_destroyed_pruned_and_deleted() {
        let keyed = Keyed::new().await;
        let (store, barrier) = (keyed.store.clone(), keyed.barrier());
        for (kv2, name) in [(false, "v1"), (true, "v2")] {
            let secrets = if kv2 {
                Secrets::kv2(store.clone(), barrier.clone(), 2)
            } else {
                Secrets::new(store.clone(), barrier.clone(), 2)
            };
            let long = format!("{name}/{}", "p".repeat(keyvault_api::secret::MAX_PATH_LEN - name.len() - 1));
            let path = SecretPath::parse(&long).unwrap();
            assert_eq!(path.as_str().len(), keyvault_api::secret::MAX_PATH_LEN);
            assert!(usage::set_aside_key(&secrets.data_key(&path, u64::MAX)).len() <= crate::store::MAX_KEY_LEN);
            secrets.write(&path, br#"{"v":"1"}"#).await.unwrap();
            secrets.write(&path, br#"{"v":"2"}"#).await.unwrap();
            secrets.destroy(&path, &[1]).await.unwrap();
            // Pruning past max_versions (2) removes the destroyed version 1.
            secrets.write(&path, br#"{"v":"3"}"#).await.unwrap();
            secrets.delete_latest(&path).await.unwrap();
            for i in 4..=6 {
                secrets.write(&path, format!(r#"{{"v":"{i}"}}"#).as_bytes()).await.unwrap();
            }
            assert_eq!(&secrets.read(&path, None).await.unwrap().data[..], br#"{"v":"6"}"#);
            secrets.delete_all(&path).await.unwrap();
            assert!(secrets.metadata(&path).await.unwrap().is_none(), "{name}: deleted");
        }
        let left = store.scan_prefix(DATA_PREFIX, None, 100).await.unwrap();
        assert!(left.is_empty(), "no record left: {}", left.len());
    }

    /// A write applies the secret's settings as recorded when it commits, not as its
    /// caller saw them: with `max_versions` raised from 2 to 50 while it ran (its caller
    /// passing the mount's 2), it keeps all 13 versions; before, the limit the engine had
    /// read first pruned them to 2, destroying versions others wrote after the raise. A
    /// secret made to require check-and-set refuses a write without one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_applies_the_settings_recorded_when_it_commits() {
        let keyed = Keyed::new().await;
        let secrets = Secrets::kv2(keyed.store.clone(), keyed.barrier(), 10);
        let path = SecretPath::parse("app/settings").unwrap();
        secrets.update_metadata(&path, MetaUpdate { max_versions: Some(2), ..Default::default() }).await.unwrap();
        for i in 0..2 {
            secrets.write(&path, format!(r#"{{"v":{i}}}"#).as_bytes()).await.unwrap();
        }
        secrets.update_metadata(&path, MetaUpdate { max_versions: Some(50), ..Default::default() }).await.unwrap();
        for i in 2..12 {
            secrets.write(&path, format!(r#"{{"v":{i}}}"#).as_bytes()).await.unwrap();
        }
        let opts = WriteOptions { max_versions: Some(2), ..Default::default() };
        secrets.write_with(&path, br#"{"v":12}"#, opts).await.unwrap();
        assert_eq!(secrets.metadata(&path).await.unwrap().unwrap().versions.len(), 13);

        secrets.update_metadata(&path, MetaUpdate { cas_required: Some(true), ..Default::default() }).await.unwrap();
        match secrets.write_with(&path, br#"{"v":13}"#, WriteOptions::default()).await {
            Err(Error::InvalidRequest(m)) => assert!(m.contains("check-and-set"), "{m}"),
            other => panic!("a write without check-and-set is refused: {other:?}"),
        }
        let cas = WriteOptions { cas: Some(13), ..Default::default() };
        assert_eq!(secrets.write_with(&path, br#"{"v":13}"#, cas).await.unwrap().0, 14);
        // The version an engine read (a patch's) is not the caller's check-and-set.
        let implicit = WriteOptions { cas: Some(14), implicit_cas: true, ..Default::default() };
        assert!(matches!(secrets.write_with(&path, br#"{"v":14}"#, implicit).await, Err(Error::InvalidRequest(_))));
    }

    /// A patch (check-and-set on the version it read, not the caller's) held while the
    /// secret is made to require check-and-set is refused when it commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_patch_meets_a_check_and_set_requirement_made_while_it_ran() {
        let (_keyed, _sled, plain, path, paused, stale) = held_writer(Secrets::kv2, "app/patched").await;
        plain.write(&path, br#"{"v":"1"}"#).await.unwrap();
        paused.arm();
        let w = tokio::spawn({
            let (stale, path) = (stale.clone(), path.clone());
            let opts = WriteOptions { cas: Some(1), implicit_cas: true, ..Default::default() };
            async move { stale.write_with(&path, br#"{"v":"p"}"#, opts).await }
        });
        paused.reached.notified().await;
        plain.update_metadata(&path, MetaUpdate { cas_required: Some(true), ..Default::default() }).await.unwrap();
        paused.go.notify_one();
        assert!(matches!(w.await.unwrap(), Err(Error::InvalidRequest(_))));
        assert_eq!(plain.metadata(&path).await.unwrap().unwrap().current_version, 1);
    }

    /// A write whose caller may only create (or only update) is recorded only if the
    /// secret still does not exist (or still does) when it commits: a create-only writer
    /// that saw no secret does not overwrite one made meanwhile, an update-only writer
    /// does not bring back one deleted meanwhile (409; its record is removed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_keeps_to_the_existence_its_permission_was_checked_on() {
        use crate::test_support::{PauseAt, TestStore};
        let keyed = Keyed::new().await;
        let (sled, barrier) = (keyed.store.clone(), keyed.barrier());
        let plain = Secrets::new(sled.clone(), barrier.clone(), 10);
        let path = SecretPath::parse("app/owned").unwrap();
        let only = |must_exist| WriteOptions { must_exist: Some(must_exist), ..Default::default() };
        // Checked at once, too.
        assert!(matches!(plain.write_with(&path, br#"{"v":"u"}"#, only(true)).await, Err(Error::Conflict(_))));
        for (must_exist, before, meanwhile) in
            [(false, None, "made"), (true, Some("first"), "deleted"), (true, Some("first"), "latest deleted")]
        {
            let paused = Arc::new(TestStore::holding(sled.clone(), PauseAt::Get, &plain.meta_key(&path)));
            let held = Arc::new(Secrets { store: paused.clone(), barrier: barrier.clone(), max_versions: 10, ns: "" });
            if let Some(v) = before {
                plain.write(&path, format!(r#"{{"v":"{v}"}}"#).as_bytes()).await.unwrap();
            }
            // The writer reads the metadata (as its permission was checked on) and is held
            // while another request makes (or deletes) the secret.
            paused.arm();
            let w = tokio::spawn({
                let (held, path) = (held.clone(), path.clone());
                async move { held.write_with(&path, br#"{"v":"w"}"#, only(must_exist)).await }
            });
            paused.reached.notified().await;
            match meanwhile {
                "made" => drop(plain.write(&path, br#"{"v":"other"}"#).await.unwrap()),
                "deleted" => plain.delete_all(&path).await.unwrap(),
                // KV version 1's DELETE: the latest version goes, and with it the secret,
                // for a writer's existence (its earlier versions are kept).
                _ => plain.delete_latest(&path).await.unwrap(),
            }
            paused.go.notify_one();
            let r = w.await.unwrap();
            assert!(matches!(r, Err(Error::Conflict(_))), "{meanwhile} meanwhile: {r:?}");
            match meanwhile {
                "made" => assert_eq!(&*plain.read(&path, None).await.unwrap().data, br#"{"v":"other"}"#.as_slice()),
                _ => assert!(!plain.exists(&path).await.unwrap(), "brought back by an update-only write"),
            }
            plain.delete_all(&path).await.ok();
        }
        // KV version 2's metadata writes keep to it too.
        let meta_only = SecretPath::parse("app/meta").unwrap();
        let change = || MetaUpdate { max_versions: Some(3), ..Default::default() };
        let refused = plain.update_metadata_if(&meta_only, change(), Some(true)).await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
        assert!(!plain.exists(&meta_only).await.unwrap());
        plain.update_metadata_if(&meta_only, change(), Some(false)).await.unwrap();
        let refused = plain.update_metadata_if(&meta_only, change(), Some(false)).await;
        assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    }

    /// KV version 1 lists no secret whose latest version was deleted (it no longer exists
    /// for it, as in Vault), nor a folder holding only such secrets (its own listing would
    /// be 404); KV version 2 lists a soft-deleted one (it has metadata).
    #[tokio::test]
    async fn listings_keep_to_each_engines_existence_rule() {
        let keyed = Keyed::new().await;
        let prefix = SecretPrefix::parse("app/").unwrap();
        for (secrets, listed) in [
            (Secrets::new(keyed.store.clone(), keyed.barrier(), 10), vec!["kept", "sub/"]),
            (Secrets::kv2(keyed.store.clone(), keyed.barrier(), 10), vec!["empty/", "gone", "kept", "sub/"]),
        ] {
            for p in ["app/kept", "app/gone", "app/sub/x", "app/empty/y"] {
                secrets.write(&SecretPath::parse(p).unwrap(), br#"{"v":"1"}"#).await.unwrap();
            }
            for p in ["app/gone", "app/empty/y"] {
                secrets.delete_latest(&SecretPath::parse(p).unwrap()).await.unwrap();
            }
            assert_eq!(secrets.list(&prefix).await.unwrap(), listed);
        }
    }

    /// What the held-writer tests share: a store (`plain`, over sled) and the same store
    /// seen through a [`crate::test_support::TestStore`] that holds the first read of
    /// `path`'s metadata once armed (`stale`, `paused`).
    #[allow(clippy::type_complexity)]
    async fn held_writer(
        make: fn(Arc<dyn Store>, Barrier, usize) -> Secrets,
        path: &str,
    ) -> (Keyed, Arc<dyn Store>, Secrets, SecretPath, Arc<crate::test_support::TestStore>, Arc<Secrets>) {
        use crate::test_support::{PauseAt, TestStore};
        let keyed = Keyed::new().await;
        let (sled, barrier) = (keyed.store.clone(), keyed.barrier());
        let plain = make(sled.clone(), barrier.clone(), 10);
        let path = SecretPath::parse(path).unwrap();
        let paused = Arc::new(TestStore::holding(sled.clone(), PauseAt::Get, &plain.meta_key(&path)));
        let stale = Arc::new(Secrets { store: paused.clone(), barrier, max_versions: 10, ns: plain.ns });
        (keyed, sled, plain, path, paused, stale)
    }

    /// A read that has the metadata (version 2 live), then finds version 2's slot
    /// refilled by a writer with an older view after a delete freed it, does not serve
    /// that writer's value as version 2: it reads again and answers what the metadata
    /// says now (deleted). (Before, the unacknowledged value was served.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_never_serves_a_record_that_refilled_its_versions_slot() {
        let (_keyed, sled, plain, path, paused, stale) = held_writer(Secrets::kv2, "app/refill").await;
        plain.write(&path, br#"{"v":"1"}"#).await.unwrap();
        plain.write(&path, br#"{"v":"2"}"#).await.unwrap();
        // R reads the metadata and is held before it reads version 2's record.
        paused.arm();
        let r = tokio::spawn({
            let (stale, path) = (stale.clone(), path.clone());
            async move { stale.read(&path, None).await }
        });
        paused.reached.notified().await;
        // Version 2 is deleted (its record goes), and a writer with an older view puts
        // its record in the free slot (it would then find number 2 listed, and delete it).
        plain.delete_latest(&path).await.unwrap();
        let full = plain.full(&path);
        let sealed = plain.barrier.seal(&record_context_raw(&full, 2), br#"{"v":"unacknowledged"}"#).await.unwrap();
        assert!(sled.insert_if_absent(&plain.data_key(&path, 2), &sealed, None).await.unwrap());
        paused.go.notify_one();
        match r.await.unwrap() {
            Err(Error::NotFound(m)) => assert!(m.contains("deleted"), "{m}"),
            other => panic!("the read served {:?}", other.map(|v| String::from_utf8_lossy(&v.data).into_owned())),
        }
    }

    /// A writer whose record was taken out of its slot, and the slot claimed and recorded
    /// by another writer meanwhile, neither records nor deletes that writer's record: the
    /// other's acknowledged version keeps its value. (Before, the first writer's
    /// metadata retry saw the slot listed and deleted whatever record held it: the
    /// other's.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_never_deletes_another_writers_record_in_its_slot() {
        let (_keyed, sled, plain, path, paused, stale) = held_writer(Secrets::new, "app/slot").await;
        plain.write(&path, br#"{"v":"1"}"#).await.unwrap();
        // W reads the metadata (version 1), claims slot 2, and is held as it reads the
        // metadata again to record it.
        paused.arm();
        let w = tokio::spawn({
            let (stale, path) = (stale.clone(), path.clone());
            async move { stale.write(&path, br#"{"v":"w"}"#).await }
        });
        paused.reached.notified().await;
        paused.arm();
        paused.go.notify_one();
        paused.reached.notified().await;
        // W's record leaves the slot (as a removal that read a listing of number 2 would
        // take it), and X claims and records number 2.
        assert!(sled.delete(&plain.data_key(&path, 2)).await.unwrap());
        assert_eq!(plain.write(&path, br#"{"v":"x"}"#).await.unwrap().0, 2);
        paused.go.notify_one();
        let (version, _) = w.await.unwrap().unwrap();
        assert_eq!(version, 3);
        assert_eq!(&*plain.read(&path, Some(2)).await.unwrap().data, br#"{"v":"x"}"#.as_slice(), "X's version");
        assert_eq!(&*plain.read(&path, Some(3)).await.unwrap().data, br#"{"v":"w"}"#.as_slice());
    }

    /// A writer that read the metadata before a version was written and deleted (which
    /// frees that version's slot) claims the freed slot, and a delete of the whole secret
    /// runs between its claim and its recording. The write answers with a version that
    /// serves its value, never with the number the deleted version had.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_on_a_stale_view_never_records_a_removed_version_or_a_lost_record() {
        let (_keyed, _sled, plain, path, paused, stale) = held_writer(Secrets::kv2, "app/stale").await;
        for i in 1..=5 {
            plain.write(&path, format!(r#"{{"v":"{i}"}}"#).as_bytes()).await.unwrap();
        }
        // W reads the metadata (version 5 is the latest) and is held.
        paused.arm();
        let w = tokio::spawn({
            let (stale, path) = (stale.clone(), path.clone());
            async move { stale.write(&path, br#"{"v":"w"}"#).await }
        });
        paused.reached.notified().await;
        // Version 6 is written and deleted: its slot is free again.
        assert_eq!(plain.write(&path, br#"{"v":"x"}"#).await.unwrap().0, 6);
        plain.delete_latest(&path).await.unwrap();
        // W claims a slot, then reads the metadata to record it, and is held there while
        // the whole secret is deleted.
        paused.arm();
        paused.go.notify_one();
        paused.reached.notified().await;
        plain.delete_all(&path).await.unwrap();
        paused.go.notify_one();
        let (version, _) = w.await.unwrap().unwrap();
        assert_ne!(version, 6, "the number of the version written and deleted is not used again");
        let read = plain.read(&path, Some(version)).await.unwrap();
        assert_eq!(&*read.data, br#"{"v":"w"}"#.as_slice(), "the acknowledged version serves its value");
    }

    /// A writer that claimed its number and is overtaken by `max_versions` others before it
    /// records it would be pruned by its own write. It takes a number above theirs instead:
    /// the value it acknowledges is kept, the number it gave up is skipped and its record
    /// is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_overtaken_by_max_versions_others_takes_a_higher_number() {
        use crate::test_support::{PauseAt, TestStore};
        let keyed = Keyed::new().await;
        let (sled, barrier) = (keyed.store.clone(), keyed.barrier());
        let plain = Secrets::kv2(sled.clone(), barrier.clone(), 3);
        let path = SecretPath::parse("app/overtaken").unwrap();
        let paused = Arc::new(TestStore::holding(sled.clone(), PauseAt::Get, &plain.meta_key(&path)));
        let slow = Arc::new(Secrets { store: paused.clone(), barrier, max_versions: 3, ns: plain.ns });
        // W reads the (absent) metadata, claims version 1, and is held before recording it.
        paused.arm();
        let w = tokio::spawn({
            let (slow, path) = (slow.clone(), path.clone());
            async move { slow.write(&path, br#"{"v":"w"}"#).await }
        });
        paused.reached.notified().await;
        paused.arm();
        paused.go.notify_one();
        paused.reached.notified().await;
        assert!(sled.get(&plain.data_key(&path, 1)).await.unwrap().is_some(), "W holds slot 1");
        // Three others write meanwhile: 2, 3 and 4 fill the three versions kept.
        for (i, expected) in (2..=4).enumerate() {
            assert_eq!(plain.write(&path, format!(r#"{{"v":"{i}"}}"#).as_bytes()).await.unwrap().0, expected);
        }
        paused.go.notify_one();
        let (version, _) = w.await.unwrap().unwrap();
        assert_eq!(version, 5, "W takes the number above the others");
        assert_eq!(&*plain.read(&path, Some(5)).await.unwrap().data, br#"{"v":"w"}"#.as_slice());
        let meta = plain.metadata(&path).await.unwrap().unwrap();
        assert_eq!(meta.versions.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(sled.get(&plain.data_key(&path, 1)).await.unwrap().is_none(), "the slot given up leaves no record");
        assert!(sled.get(&plain.data_key(&path, 2)).await.unwrap().is_none(), "version 2 was pruned with its record");
    }

    /// 16 clients at once write, destroy, delete the latest version of and delete one
    /// secret, ten times each: whatever wins, the metadata and the records agree at the
    /// end (a served version has its record, no record outlives its version), and every
    /// record is counted once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixteen_removals_and_writes_at_once_keep_metadata_and_records_in_step() {
        let keyed = Keyed::new().await;
        let (store, barrier) = (keyed.store.clone(), keyed.barrier());
        let secrets = Arc::new(Secrets::kv2(store.clone(), barrier, 5));
        let path = SecretPath::parse("app/shared").unwrap();
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let (secrets, path) = (secrets.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..10u64 {
                    let r = match (t + i) % 4 {
                        0 | 1 => secrets.write(&path, format!(r#"{{"v":"{t}-{i}"}}"#).as_bytes()).await.map(|_| ()),
                        2 => secrets.destroy(&path, &[i + 1, i + 2]).await,
                        _ if i % 3 == 0 => secrets.delete_all(&path).await,
                        _ => secrets.delete_latest(&path).await,
                    };
                    match r {
                        Ok(()) | Err(Error::NotFound(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let meta = secrets.metadata(&path).await.unwrap().unwrap_or_default();
        let served = |v: u64| meta.versions.get(&v).is_some_and(|m| !m.destroyed && m.deletion_time.is_none());
        let prefix = format!("{DATA_PREFIX}{}{VERSION_SEP}", secrets.full(&path));
        let records: Vec<u64> = store
            .scan_prefix(&prefix, None, 100_000)
            .await
            .unwrap()
            .iter()
            .map(|(k, _)| k[prefix.len()..].parse().unwrap())
            .collect();
        for v in &records {
            assert!(served(*v), "the record of version {v} outlived it: {meta:?}");
        }
        for v in meta.versions.keys().filter(|v| served(**v)) {
            assert!(records.contains(v), "version {v} is served without its record");
        }
        let counted: i64 = store.counters("").await.unwrap().iter().map(|c| c.value).sum();
        assert_eq!(counted, records.len() as i64, "every record counted once");
    }

    #[test]
    fn values_must_be_objects_and_errors_do_not_quote_them() {
        assert!(validate_value(br#"{"value":"s3cret","n":1}"#).is_ok());
        for bad in [&br#"["s3cret"]"#[..], br#""s3cret""#, br#"{"value":"s3cret""#, b"s3cret"] {
            let err = validate_value(bad).unwrap_err().to_string();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
