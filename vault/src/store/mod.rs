//! Storage: one trait, several engines (docs/architecture.md, "Storage").
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

pub use postgres::{PostgresOptions, PostgresStore, SCAN_STATEMENT, bound_in_time};
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
    /// Work under a claim ([`while_claimed`]) was stopped: its claim could not be kept (a
    /// stall of the process, a storage that did not answer). It may be retried (503).
    #[error("the claim {0} could not be kept while its work went on")]
    ClaimLost(String),
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

/// What [`Store::get_and_last_under`] returns: the value under the key, and the last
/// entry under the prefix with its key, if the engine fetched it.
pub type GetAndLast = (Option<Vec<u8>>, Option<(String, Vec<u8>)>);

/// The end of the key range of `prefix` (exclusive): its last character, which must be
/// ASCII other than DEL, made the next one.
pub fn prefix_end(prefix: &str) -> StoreResult<String> {
    match prefix.as_bytes().last() {
        Some(&b) if b < 0x7f => {
            let mut end = prefix[..prefix.len() - 1].to_owned();
            end.push(char::from(b + 1));
            Ok(end)
        }
        _ => Err(StoreError::InvalidKey("a prefix for a range must end in an ASCII character other than DEL")),
    }
}

/// The storage engine trait. Implementations: [`SledStore`]; PostgreSQL in `store::postgres`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The value under `key`, or `None` (also for an entry whose expiry has passed).
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// The value under `key` and, where the engine can fetch it in the same round trip,
    /// the last live entry (in key order) whose key starts with `prefix`: a secret's
    /// metadata and its newest version's record in one query. The second is only a
    /// prefetch: an engine without a cheaper way returns `None`, and the caller reads
    /// what it needs with [`Store::get`]. `prefix` must end in an ASCII character other
    /// than DEL (the engine bounds the range by the next one).
    async fn get_and_last_under(&self, key: &str, prefix: &str) -> StoreResult<GetAndLast> {
        prefix_end(prefix)?;
        Ok((self.get(key).await?, None))
    }

    /// Store `value` under `key`, replacing any previous value (and its expiry).
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()>;

    /// Atomically replace the value under `key` if the current value equals `expected`
    /// (`None`: the key is absent). `new == None` deletes. Returns whether it swapped.
    /// A swapped entry keeps its expiry (a limited-use credential stored with a TTL still
    /// leaves storage when it lapses); one made where the key was absent has none.
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool>;

    /// If the live value under `key` is `value`, make it expire `ttl` from now (a claim
    /// renewed by its holder). Returns whether it did.
    async fn renew(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool>;

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

    /// Apply `ops` as one atomic transaction: all of them or none, on every engine and
    /// across every process sharing the store. Durable when it returns `Committed`.
    async fn transact(&self, ops: Vec<TxOp>) -> StoreResult<TxOutcome> {
        Ok(self.transact_many(vec![ops]).await?.pop().unwrap_or(TxOutcome::Conflict))
    }

    /// Several independent transactions (a re-wrap batch): each is atomic on its own
    /// and fails on its own; an engine may make them durable together. One outcome each.
    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>>;

    /// Close the counter `key`: from now on a positive [`TxOp::Count`] on it fails its
    /// transaction with [`TxOutcome::Closed`] (negative ones still apply). A counter that
    /// does not exist yet is created closed at 0. Waits for transactions holding the
    /// counter to finish, so that every increment that may still commit has.
    async fn close_counter(&self, key: &str) -> StoreResult<()>;

    /// The counters whose key starts with `prefix`, in key order.
    async fn counters(&self, prefix: &str) -> StoreResult<Vec<Counter>>;

    /// Delete expired entries; returns how many. Called periodically.
    async fn purge_expired(&self) -> StoreResult<u64>;

    /// A cheap liveness check for `/v1/sys/health`.
    async fn ping(&self) -> StoreResult<()>;

    /// The engine's name (`sled`, `postgresql`), as `sys/seal-status` reports it.
    fn kind(&self) -> &'static str;

    /// The storage's own clock minus this process's, in milliseconds, for engines shared
    /// by several replicas (whose clocks are compared with it); `None` for an engine
    /// inside this process. Measured around the storage's reading alone (the midpoint of
    /// the local times just before and after it), never around a wait for a connection.
    async fn clock_offset_ms(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }
}

/// One step of a transaction ([`Store::transact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxOp {
    /// Store `value` under `key`, which must hold no live entry (else `Conflict`).
    Insert { key: String, value: Vec<u8> },
    /// Replace the live value `expected` under `key` by `new` (`None`: delete it); any
    /// other value, or none, is a `Conflict`.
    Swap { key: String, expected: Vec<u8>, new: Option<Vec<u8>> },
    /// Add `delta` to the counter `key` (a missing counter is 0). A positive delta on a
    /// closed counter fails the transaction with `Closed`. Counters live apart from the
    /// key-value entries (their keys never collide with entry keys).
    Count { key: String, delta: i64 },
}

impl TxOp {
    /// The key the step names.
    pub fn key(&self) -> &str {
        match self {
            TxOp::Insert { key, .. } | TxOp::Swap { key, .. } | TxOp::Count { key, .. } => key,
        }
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    Committed,
    /// An `Insert` found its key taken, or a `Swap` did not find its expected value.
    Conflict,
    /// A positive `Count` met a closed counter.
    Closed,
}

/// A counter as [`Store::counters`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub key: String,
    pub value: i64,
    pub closed: bool,
}

/// Run `work` holding the claim `key`: a random holder inserted if absent, with `ttl`.
/// `None`, and `work` is not run, if another holder has the claim, in any process sharing
/// the store: of concurrent callers one runs. The claim is released (compare-and-delete
/// of this holder's value, so a claim taken over after its TTL is never released by the
/// old holder) when `work` ends, or by a task of its own when `work` is dropped half way
/// (a client that hung up); a process that stops holds it for at most `ttl`.
///
/// While `work` runs the claim is renewed every third of `ttl` ([`Store::renew`]; soon
/// again after a failed renewal), so work that takes longer than `ttl` keeps it. The work
/// is polled only while the claim is known to hold: until nine tenths of `ttl` after the
/// last renewal that succeeded was sent (the insert, at first). Once that moment passes
/// without a renewal (a stall of the process, a store that does not answer), or a
/// renewal finds the claim gone, `work` is stopped where it is, as a client hanging up
/// would, never polled again, and the answer is [`StoreError::ClaimLost`] (503: retry);
/// the claim is then left to run out rather than released. `work` must therefore be
/// safe to stop at any await point, which every claimed task is (its client may hang
/// up): what it handed to the store or the token before it was stopped may still
/// complete.
pub async fn while_claimed<T>(
    store: &std::sync::Arc<dyn Store>,
    key: &str,
    ttl: Duration,
    work: impl std::future::Future<Output = T>,
) -> StoreResult<Option<T>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::time::Instant;
    let holder = uuid::Uuid::new_v4().to_string();
    let base = Instant::now();
    if !store.insert_if_absent(key, holder.as_bytes(), Some(ttl)).await? {
        return Ok(None);
    }
    let mut claim = Claim { store: store.clone(), key: key.to_owned(), holder, held: true };
    // A moment `d` after `now`, or far off (no overflow for an absurd TTL).
    let after = |now: Instant, d: Duration| now.checked_add(d).unwrap_or(now + Duration::from_secs(86_400 * 365));
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    // Until when the claim is known to hold, in nanoseconds after `base`.
    let held_for = ttl.mul_f64(0.9);
    let holds_until = AtomicU64::new(nanos(held_for));
    let deadline = || after(base, Duration::from_nanos(holds_until.load(Ordering::Acquire)));
    let outcome = {
        let mine = claim.holder.clone();
        let renewing = async {
            let mut next = after(base, ttl / 3);
            loop {
                tokio::time::sleep_until(next).await;
                let sent = Instant::now();
                match store.renew(key, mine.as_bytes(), ttl).await {
                    Ok(true) => {
                        holds_until.store(nanos((sent - base).saturating_add(held_for)), Ordering::Release);
                        next = after(sent, ttl / 3);
                    }
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(key, error = %e, "renewing a claim failed (it is tried again)");
                        next = after(Instant::now(), (ttl / 10).max(Duration::from_millis(10)));
                    }
                }
            }
        };
        let lapse = async {
            loop {
                let at = deadline();
                tokio::time::sleep_until(at).await;
                if deadline() <= Instant::now() {
                    return;
                }
            }
        };
        let (mut work, mut renewing, mut lapse) =
            (std::pin::pin!(work), std::pin::pin!(renewing), std::pin::pin!(lapse));
        std::future::poll_fn(|cx| {
            // Checked before the work is polled, also when a timer has not fired yet.
            if deadline() <= Instant::now()
                || lapse.as_mut().poll(cx).is_ready()
                || renewing.as_mut().poll(cx).is_ready()
            {
                return std::task::Poll::Ready(None);
            }
            work.as_mut().poll(cx).map(Some)
        })
        .await
        // The work (and what it holds: connections, a transaction) is dropped here.
    };
    match outcome {
        Some(r) => {
            claim.release().await;
            Ok(Some(r))
        }
        None => {
            // Not released: whatever the stopped work had handed on may still complete
            // meanwhile, so the claim is left to run out (or is another's already).
            claim.held = false;
            tracing::warn!(key, "a claim could not be kept while its work went on: the work is stopped");
            Err(StoreError::ClaimLost(key.to_owned()))
        }
    }
}

/// A held claim ([`while_claimed`]). Released by [`Claim::release`], or, when it is
/// dropped still held, by a task of its own.
struct Claim {
    store: std::sync::Arc<dyn Store>,
    key: String,
    holder: String,
    held: bool,
}

impl Claim {
    async fn release(&mut self) {
        self.held = false;
        if let Err(e) = self.store.compare_and_swap(&self.key, Some(self.holder.as_bytes()), None).await {
            tracing::warn!(error = %e, key = %self.key, "releasing a claim failed (it expires by itself)");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut claim = Claim {
            store: self.store.clone(),
            key: std::mem::take(&mut self.key),
            holder: std::mem::take(&mut self.holder),
            held: false,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { claim.release().await });
            }
            Err(_) => tracing::warn!(key = %claim.key, "no runtime to release a claim on (it expires by itself)"),
        }
    }
}

/// Check every key a transaction names.
pub(crate) fn check_tx_keys(txs: &[Vec<TxOp>]) -> StoreResult<()> {
    for op in txs.iter().flatten() {
        check_key(op.key())?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that runs 2.5 times its claim's TTL keeps the claim throughout (it is
    /// renewed): every other claimant meanwhile is refused; released at the end. (A TTL
    /// of seconds: a stall longer than two thirds of it, on a loaded machine, would lose
    /// the claim, and the work with it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_is_kept_while_its_work_runs_past_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        let ttl = Duration::from_millis(2400);
        let other = store.clone();
        let work = async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                assert_eq!(while_claimed(&other, "claims/x", ttl, async {}).await.unwrap(), None, "taken over");
            }
            7
        };
        assert_eq!(while_claimed(&store, "claims/x", ttl, work).await.unwrap(), Some(7));
        assert_eq!(while_claimed(&store, "claims/x", ttl, async { 1 }).await.unwrap(), Some(1), "released");
    }

    /// Work whose claim is taken over (here: the claim is removed and another holder
    /// inserts its own, as after a stall longer than the TTL) is stopped at the next
    /// renewal, before it goes on to its next step, and the other holder's claim stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_claim_is_taken_over_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        let ttl = Duration::from_millis(900);
        let went_on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (other, flag) = (store.clone(), went_on.clone());
        let work = async move {
            other.delete("claims/y").await.unwrap();
            assert!(other.insert_if_absent("claims/y", b"someone", Some(Duration::from_secs(60))).await.unwrap());
            // Well past the first renewal, which finds the claim taken meanwhile.
            tokio::time::sleep(ttl * 5).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        };
        assert!(matches!(while_claimed(&store, "claims/y", ttl, work).await, Err(StoreError::ClaimLost(_))));
        assert!(!went_on.load(std::sync::atomic::Ordering::SeqCst), "the work went on without its claim");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.get("claims/y").await.unwrap().as_deref(), Some(b"someone".as_slice()), "not released");
    }
}
