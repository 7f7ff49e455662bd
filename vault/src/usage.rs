//! How many sealed records each master key version wraps, kept exactly and incrementally:
//! every write, re-wrap and deletion of a record updates a counter in the same store
//! transaction as the record itself. The counters make two things cheap and exact:
//!
//! - `GET /v1/sys/rotate/status` reads a few counters per version, not the records;
//! - the retire/write interlock (docs/architecture.md). When a rotation starts, every
//!   older version's counters are *closed*: from then on a transaction that would add a
//!   record under an older version fails (`TxOutcome::Closed`), and the writer re-reads
//!   the keyring and seals again under the new version. Closing waits for transactions
//!   that hold the counter (PostgreSQL row locks; sled transactions are serializable), so
//!   every record that may still commit under an old version either has committed, and is
//!   counted (the rotation re-wraps it), or never will. Retiring a version needs its
//!   counters closed and at zero: no write in flight on any replica can ever need it.
//!
//! Each version's count is spread over [`SHARDS`] counters (by a digest of the record's
//! key), so that concurrent writers rarely wait for one another's counter.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::keys::KeyVersion;
use crate::store::{Store, TxOp, decode_json, scan_all};

/// Counters per version.
pub const SHARDS: u32 = 16;

/// Where records set aside by a rotation are kept (under their original key).
pub const SET_ASIDE_PREFIX: &str = "sys/set-aside/";

/// Written once the counters of an installation count every record.
pub const COUNTED_MARKER: &str = "sys/usage/counted";

fn version_prefix(v: KeyVersion) -> String {
    format!("master/v{}/", v.get())
}

/// The counter of version `v` that a record stored under `record_key` belongs to.
pub fn counter_key(v: KeyVersion, record_key: &str) -> String {
    let shard = u32::from(Sha256::digest(record_key.as_bytes())[0]) % SHARDS;
    format!("{}{shard:02}", version_prefix(v))
}

/// The step that counts a record under `v` (`delta` +1 when it is written, -1 when it
/// goes).
pub fn count(v: KeyVersion, record_key: &str, delta: i64) -> TxOp {
    TxOp::Count { key: counter_key(v, record_key), delta }
}

/// Records per master version (versions with no counter are absent), and whether each
/// version is closed to new records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub records: BTreeMap<u32, i64>,
    pub closed: BTreeMap<u32, bool>,
}

impl Usage {
    /// Records under versions other than `active`.
    pub fn outside(&self, active: KeyVersion) -> i64 {
        self.records.iter().filter(|(v, _)| **v != active.get()).map(|(_, n)| *n).sum()
    }

    pub fn of(&self, v: KeyVersion) -> i64 {
        self.records.get(&v.get()).copied().unwrap_or(0)
    }
}

/// Read every version's counters.
pub async fn read(store: &dyn Store) -> Result<Usage> {
    let mut u = Usage::default();
    for c in store.counters("master/v").await? {
        let Some(v) = c.key.strip_prefix("master/v").and_then(|r| r.split('/').next()).and_then(|v| v.parse().ok())
        else {
            continue;
        };
        *u.records.entry(v).or_insert(0) += c.value;
        let closed = u.closed.entry(v).or_insert(true);
        *closed &= c.closed;
    }
    Ok(u)
}

/// Close every counter of version `v` (waiting for transactions that hold them).
pub async fn close(store: &dyn Store, v: KeyVersion) -> Result<()> {
    for shard in 0..SHARDS {
        store.close_counter(&format!("{}{shard:02}", version_prefix(v))).await?;
    }
    Ok(())
}

/// A record the rotation could not re-wrap, kept aside (see `rotation`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAside {
    /// The record's key in the store (`kv/data/<path>\x1f<version>`).
    pub key: String,
    /// The stored bytes, as found (sealed: nothing readable).
    pub record: String,
    pub reason: String,
    /// The version it is counted under, when known (its count keeps that version from
    /// being retired: a repaired record could still need it).
    pub counted_under: Option<u32>,
    pub set_aside_at: u64,
}

/// Where the copy of the record under `record_key` is kept: the key in hex, or, when that
/// would be longer than a store key may be (a secret path near its 512 bytes), the
/// SHA-256 of the key (`sha256-<hex>`, which no hex name can be). The record's key is
/// inside the entry either way.
pub fn set_aside_key(record_key: &str) -> String {
    let plain = format!("{SET_ASIDE_PREFIX}{}", hex::encode(record_key.as_bytes()));
    if plain.len() <= crate::store::MAX_KEY_LEN {
        return plain;
    }
    use sha2::Digest;
    format!("{SET_ASIDE_PREFIX}sha256-{}", hex::encode(sha2::Sha256::digest(record_key.as_bytes())))
}

/// Every record set aside.
pub async fn set_aside(store: &dyn Store) -> Result<Vec<SetAside>> {
    let mut out = Vec::new();
    for (k, raw) in scan_all(store, SET_ASIDE_PREFIX).await? {
        out.push(decode_json(&k, &raw)?);
    }
    Ok(out)
}

/// Make sure the counters count every record: on an installation made before they
/// existed, count the records once (one replica does it; the others wait for it). Run at
/// start, before serving.
pub async fn ensure_counted(store: &dyn Store, data_prefix: &str) -> Result<()> {
    const CLAIM: &str = "sys/usage/recounting";
    if store.get(COUNTED_MARKER).await?.is_some() {
        return Ok(());
    }
    if !store.insert_if_absent(CLAIM, b"", Some(std::time::Duration::from_secs(600))).await? {
        tracing::info!("another replica is counting the stored records; waiting for it");
        for _ in 0..6000 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if store.get(COUNTED_MARKER).await?.is_some() {
                return Ok(());
            }
        }
        return Err(crate::error::Error::Unavailable("counting stored records did not finish".into()));
    }
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    let mut n = 0u64;
    for (key, raw) in scan_all(store, data_prefix).await? {
        if let Ok(r) = crate::barrier::Record::parse(&raw) {
            *counts.entry(counter_key(r.kek_version, &key)).or_default() += 1;
            n += 1;
        }
    }
    let ops: Vec<TxOp> = counts.into_iter().map(|(key, delta)| TxOp::Count { key, delta }).collect();
    if !ops.is_empty() {
        store.transact(ops).await?;
    }
    store.put(COUNTED_MARKER, b"").await?;
    store.delete(CLAIM).await?;
    tracing::info!(records = n, "counted the stored records per master key version");
    Ok(())
}
