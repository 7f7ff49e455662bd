//! Storage: one trait, several engines (DESIGN §5).
//!
//! The trait's operations are everything a replica needs: get, put, compare-and-swap,
//! delete, prefix scan, and insert-if-absent with expiry. Values are opaque bytes (the
//! barrier has already sealed anything secret); keys are UTF-8 strings whose `/`-separated
//! prefixes name the subsystem (`kv/`, `auth/`, `sys/`). Every write is durable when the
//! call returns: an acknowledged write survives `kill -9`.

use std::time::Duration;

use async_trait::async_trait;

mod postgres;
mod sled_engine;

#[cfg(any(test, feature = "testing"))]
pub mod conformance;

pub use postgres::{PostgresOptions, PostgresStore};
pub use sled_engine::SledStore;

/// Why a storage call failed. Messages never include values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage engine is unreachable or failing; the request may succeed later (503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored bytes that this version of KeyVault cannot interpret.
    #[error("corrupt storage entry under {key:?}: {reason}")]
    Corrupt { key: String, reason: &'static str },
    /// A key that the engine cannot store (too long, NUL byte).
    #[error("invalid storage key: {0}")]
    InvalidKey(&'static str),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The longest key the engines accept.
pub const MAX_KEY_LEN: usize = 1024;

pub(crate) fn check_key(key: &str) -> StoreResult<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey("empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StoreError::InvalidKey("key longer than 1024 bytes"));
    }
    if key.contains('\0') {
        return Err(StoreError::InvalidKey("key contains a NUL byte"));
    }
    Ok(())
}

/// The storage engine trait. Implementations: [`SledStore`]; PostgreSQL in `store::postgres`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The value under `key`, or `None` (also for an entry whose expiry has passed).
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Store `value` under `key`, replacing any previous value (and its expiry).
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()>;

    /// Atomically replace the value under `key` if the current value equals `expected`
    /// (`None`: the key is absent). `new == None` deletes. Returns whether it swapped.
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool>;

    /// Remove `key`. Returns whether it was present (and not expired): a consuming read
    /// for one-time values, since exactly one of two concurrent deletes sees `true`.
    async fn delete(&self, key: &str) -> StoreResult<bool>;

    /// Up to `limit` entries whose key starts with `prefix`, in key order, starting after
    /// `after` (exclusive) when given: a page of a scan. Expired entries are skipped.
    async fn scan_prefix(&self, prefix: &str, after: Option<&str>, limit: usize)
    -> StoreResult<Vec<(String, Vec<u8>)>>;

    /// Store `value` under `key` only if no live entry is there; the entry disappears
    /// after `ttl` if one is given. Returns whether it inserted. Atomic across every
    /// process sharing the store: nonces, revoked token ids, one-time tokens.
    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool>;

    /// Several insert-if-absent at once (gateway nonces of a batch): each is atomic on
    /// its own; an engine may make them durable together. Returns one result per item.
    async fn insert_if_absent_many(&self, items: &[(String, Vec<u8>, Option<Duration>)]) -> StoreResult<Vec<bool>> {
        let mut out = Vec::with_capacity(items.len());
        for (k, v, ttl) in items {
            out.push(self.insert_if_absent(k, v, *ttl).await?);
        }
        Ok(out)
    }

    /// Several compare-and-swaps of existing values at once (a re-wrap batch): each
    /// `(key, expected, new)` replaces the value under `key` only if it still equals
    /// `expected`; each is atomic on its own, and an engine may make them durable
    /// together. Returns one result per item.
    async fn compare_and_swap_many(&self, items: &[(String, Vec<u8>, Vec<u8>)]) -> StoreResult<Vec<bool>> {
        let mut out = Vec::with_capacity(items.len());
        for (k, old, new) in items {
            out.push(self.compare_and_swap(k, Some(old), Some(new)).await?);
        }
        Ok(out)
    }

    /// Delete expired entries; returns how many. Called periodically.
    async fn purge_expired(&self) -> StoreResult<u64>;

    /// A cheap liveness check for `/v1/sys/health`.
    async fn ping(&self) -> StoreResult<()>;

    /// The storage's own clock, for engines shared by several replicas (whose clocks are
    /// compared with it); `None` for an engine inside this process.
    async fn clock(&self) -> StoreResult<Option<std::time::SystemTime>> {
        Ok(None)
    }
}

/// Decode a stored JSON record. Failing to decode is corruption, named by its key.
pub fn decode_json<T: serde::de::DeserializeOwned>(key: &str, raw: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(raw)
        .map_err(|_| StoreError::Corrupt { key: key.to_owned(), reason: "not the expected JSON record" })
}

/// Read and decode a JSON record.
pub async fn get_json<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str) -> StoreResult<Option<T>> {
    match store.get(key).await? {
        Some(raw) => decode_json(key, &raw).map(Some),
        None => Ok(None),
    }
}

/// Encode a record as JSON (our record types always serialize).
pub fn encode_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Invariant: plain structs of strings, numbers, maps and lists with string keys.
    serde_json::to_vec(value).expect("records serialize to JSON")
}

/// Every key under `prefix`, page by page (for callers that need them all).
/// The keys under `prefix`, with the prefix cut off, in key order (names for LIST).
pub async fn list_names(store: &dyn Store, prefix: &str) -> StoreResult<Vec<String>> {
    Ok(scan_all(store, prefix).await?.into_iter().map(|(k, _)| k[prefix.len()..].to_owned()).collect())
}

pub async fn scan_all(store: &dyn Store, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
    const PAGE: usize = 1000;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let after = out.last().map(|(k, _)| k.clone());
        let page = store.scan_prefix(prefix, after.as_deref(), PAGE).await?;
        let done = page.len() < PAGE;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}
