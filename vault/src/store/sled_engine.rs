//! The embedded engine: sled, one process, one data directory.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{Counter, Store, StoreError, StoreResult, TxOp, TxOutcome, check_key, check_tx_keys};

/// First byte of every stored value: whether an expiry follows.
const PERMANENT: u8 = 0;
const EXPIRING: u8 = 1;

/// sled in one data directory. Each write is followed by a flush (an fsync of the log),
/// so an acknowledged write survives `kill -9`.
pub struct SledStore {
    dir: PathBuf,
    /// The open database; `None` only while a reopen failed (every call is then 503).
    handles: RwLock<Option<Arc<Handles>>>,
    /// An I/O error happened (sled keeps failing every write after one, e.g. after the
    /// disk was full, even once space returns): writes try to reopen the database.
    broken: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
    /// Group commit: writes are numbered; a flush covers every write numbered before it
    /// started, so a writer whose write a finished flush already covers does not flush.
    written: AtomicU64,
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// The generation of the open [`Handles`] (one more at every reopen).
    generation: AtomicU64,
    /// Tests: the next flush fails as one on a full disk would.
    #[cfg(test)]
    fail_next_flush: AtomicBool,
    /// Keys whose last write reached sled's memory but not the disk (its flush failed),
    /// with the value each had before (`None`: absent). Reads serve that value until the
    /// database is reopened from what is on disk: without it, a write answered 503 (its
    /// flush failed: the disk is full) would read back until then.
    unflushed: Mutex<std::collections::HashMap<String, Option<Vec<u8>>>>,
    any_unflushed: AtomicBool,
}

/// One open sled database and its trees.
struct Handles {
    db: sled::Db,
    data: sled::Tree,
    /// `expiry_ms (8 bytes BE) || key` for every expiring entry, so a purge reads only
    /// what is due instead of the whole store.
    expiry: sled::Tree,
    /// Counters (`TxOp::Count`): `value (i64 BE) || closed (1 byte)`.
    counters: sled::Tree,
    /// Which opening of the database this is. A write is acknowledged only by a flush of
    /// the database it went into: one reopened meanwhile (after an I/O error) was read
    /// from the disk, without it.
    generation: u64,
}

impl Handles {
    fn open(dir: &Path, generation: u64) -> StoreResult<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError::Unavailable(format!("cannot open sled store in {}: {e}", dir.display())))?;
        let data = db.open_tree("data").map_err(unavailable)?;
        let expiry = db.open_tree("expiry").map_err(unavailable)?;
        let counters = db.open_tree("counters").map_err(unavailable)?;
        Ok(Handles { db, data, expiry, counters, generation })
    }
}

/// Why a flush did not acknowledge a write.
enum Flush {
    /// The database was reopened since the write: the write is not in it.
    Reopened,
    Failed(StoreError),
}

/// Free space a reopen wants on the data directory's file system (a few sled segments).
const REOPEN_MIN_FREE: u64 = 8 << 20;
/// The least time between two reopen attempts.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn unavailable(e: sled::Error) -> StoreError {
    StoreError::Unavailable(format!("sled: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The live value inside a stored entry, or `None` if it has expired.
fn live<'a>(key: &str, raw: &'a [u8], now: u64) -> StoreResult<Option<&'a [u8]>> {
    match raw.split_first() {
        Some((&PERMANENT, v)) => Ok(Some(v)),
        Some((&EXPIRING, rest)) if rest.len() >= 8 => {
            let (exp, v) = rest.split_at(8);
            let mut b = [0u8; 8];
            b.copy_from_slice(exp);
            Ok((u64::from_be_bytes(b) > now).then_some(v))
        }
        _ => Err(StoreError::Corrupt { key: key.to_owned(), reason: "unknown entry header" }),
    }
}

/// The expiry (unix ms) a stored entry carries, if any.
fn expiry_of(raw: &[u8]) -> Option<u64> {
    match raw.split_first() {
        Some((&EXPIRING, rest)) => rest.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes),
        _ => None,
    }
}

fn encode(value: &[u8], expires_ms: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 9);
    match expires_ms {
        None => out.push(PERMANENT),
        Some(ms) => {
            out.push(EXPIRING);
            out.extend_from_slice(&ms.to_be_bytes());
        }
    }
    out.extend_from_slice(value);
    out
}

/// A counter's stored form.
fn encode_counter(value: i64, closed: bool) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[..8].copy_from_slice(&value.to_be_bytes());
    b[8] = u8::from(closed);
    b
}

fn decode_counter(key: &[u8], raw: &[u8]) -> StoreResult<(i64, bool)> {
    let corrupt = || StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: "bad counter" };
    let b: [u8; 9] = raw.try_into().map_err(|_| corrupt())?;
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    Ok((i64::from_be_bytes(v), b[8] != 0))
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

/// Decide one transaction against the state seen in `data`/`counters` (which includes
/// the writes of transactions applied before it in the same batch), and apply it if it
/// passes.
fn apply_tx(data: &TransactionalTree, counters: &TransactionalTree, ops: &[TxOp], now: u64) -> TxResult<TxOutcome> {
    for op in ops {
        match op {
            TxOp::Insert { key, .. } => {
                if let Some(raw) = data.get(key)?
                    && live(key, &raw, now).map_err(abort)?.is_some()
                {
                    return Ok(TxOutcome::Conflict);
                }
            }
            TxOp::Swap { key, expected, .. } => {
                let current = data.get(key)?;
                let value = match &current {
                    Some(raw) => live(key, raw, now).map_err(abort)?,
                    None => None,
                };
                if value != Some(expected.as_slice()) {
                    return Ok(TxOutcome::Conflict);
                }
            }
            TxOp::Count { key, delta } => {
                if *delta > 0
                    && let Some(raw) = counters.get(key)?
                    && decode_counter(key.as_bytes(), &raw).map_err(abort)?.1
                {
                    return Ok(TxOutcome::Closed);
                }
            }
        }
    }
    for op in ops {
        match op {
            TxOp::Insert { key, value } => {
                data.insert(key.as_bytes(), encode(value, None))?;
            }
            TxOp::Swap { key, new: Some(v), .. } => {
                // Checked live above: it keeps its expiry.
                let keeps = data.get(key)?.as_deref().and_then(expiry_of);
                data.insert(key.as_bytes(), encode(v, keeps))?;
            }
            TxOp::Swap { key, new: None, .. } => {
                data.remove(key.as_bytes())?;
            }
            TxOp::Count { key, delta } => {
                let (value, closed) = match counters.get(key)? {
                    Some(raw) => decode_counter(key.as_bytes(), &raw).map_err(abort)?,
                    None => (0, false),
                };
                counters.insert(key.as_bytes(), &encode_counter(value.saturating_add(*delta), closed))?;
            }
        }
    }
    Ok(TxOutcome::Committed)
}

impl SledStore {
    /// The open database (cheap: an `Arc` clone).
    fn h(&self) -> StoreResult<Arc<Handles>> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Unavailable("sled: the store is being reopened after an I/O error".into()))
    }

    /// A sled error; an I/O error marks the database for a reopen.
    fn failed(&self, e: sled::Error) -> StoreError {
        if matches!(e, sled::Error::Io(_)) && !self.broken.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, dir = %self.dir.display(), "sled: I/O error; writes are refused until the database is reopened (tried once there is free space)");
        }
        unavailable(e)
    }

    fn tx_failed(&self, e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => self.failed(e),
        }
    }

    /// Before a write: after an I/O error, reopen the database once there is room again
    /// (sled fails every write after its first I/O error, for as long as it is open). At
    /// most one attempt per [`REOPEN_EVERY`]; the attempt waits up to 2 s for calls in
    /// flight to let go of the old database.
    fn maybe_reopen(&self) {
        if !self.broken.load(Ordering::Acquire) {
            return;
        }
        {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let free = rustix::fs::statvfs(&self.dir).map(|v| v.f_bavail.saturating_mul(v.f_frsize)).unwrap_or(0);
        if free < REOPEN_MIN_FREE {
            return;
        }
        let mut slot = self.handles.write().unwrap_or_else(|p| p.into_inner());
        if let Some(mut old) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(h) => {
                        drop(h);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still) => {
                        *slot = Some(still);
                        return;
                    }
                }
            }
        }
        match Handles::open(&self.dir, self.generation.load(Ordering::SeqCst) + 1) {
            Ok(h) => {
                self.generation.store(h.generation, Ordering::SeqCst);
                *slot = Some(Arc::new(h));
                // What is read from now on is what is on disk.
                self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).clear();
                self.any_unflushed.store(false, Ordering::Release);
                self.broken.store(false, Ordering::Release);
                tracing::warn!(dir = %self.dir.display(), "sled: reopened after an I/O error; writes are accepted again");
            }
            Err(e) => tracing::error!(error = %e, "sled: reopening after an I/O error failed; retrying"),
        }
    }

    /// Before a write: reopen the database if it is due (see [`SledStore::maybe_reopen`]),
    /// and refuse the write while it is still marked broken. Sled fails every write after
    /// an I/O error anyway; refusing here also covers a compare-and-swap, which would
    /// otherwise compare with the value on disk while reads serve the shadowed one (see
    /// `unflushed`) and answer "changed meanwhile" for good: a caller's read-and-swap loop
    /// then spun without end.
    fn writable(&self) -> StoreResult<()> {
        self.maybe_reopen();
        if self.broken.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "sled: writes are refused until the database is reopened after an I/O error".into(),
            ));
        }
        Ok(())
    }

    /// Flush after a write of `keys` (each with its value before the write) into the
    /// database `h`: if the flush fails, reads serve those values until the database is
    /// reopened (see `unflushed`). The writer holds `h` from its write to here, so the
    /// database cannot be reopened under it (a reopen waits for every holder to let go);
    /// should it have been all the same, the caller is told the write was not stored
    /// (503): neither a flush of the new database nor one that already covered the
    /// write's number acknowledges it.
    async fn flush_or_shadow(
        &self,
        h: &Handles,
        keys: impl IntoIterator<Item = (String, Option<Vec<u8>>)>,
    ) -> StoreResult<()> {
        let r = match self.flush(h).await {
            Err(Flush::Reopened) => {
                return Err(StoreError::Unavailable(
                    "sled: the database was reopened after an I/O error before this write was flushed; it was not stored"
                        .into(),
                ));
            }
            Err(Flush::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        if r.is_err() {
            let mut shadow = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            for (key, before) in keys {
                // The oldest value is the durable one: keep it.
                shadow.entry(key).or_insert(before);
            }
            self.any_unflushed.store(!shadow.is_empty(), Ordering::Release);
            // Whatever failed, what is on disk is unknown until the database is reopened
            // (which clears the shadow): writes wait for that.
            if !self.broken.swap(true, Ordering::AcqRel) {
                tracing::error!(dir = %self.dir.display(), "sled: a flush failed; writes are refused until the database is reopened");
            }
        }
        r
    }

    /// A key's value as reads must see it, if a failed flush left it in memory only.
    fn shadowed(&self, key: &str) -> Option<Option<Vec<u8>>> {
        if !self.any_unflushed.load(Ordering::Acquire) {
            return None;
        }
        self.unflushed.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Note in the expiry index that `key` expires at `ms` (`expiry_ms || key`: the purge
    /// reads the index up to now, and checks each key before it removes it).
    fn index_expiry(&self, h: &Handles, key: &str, ms: u64) -> StoreResult<()> {
        let mut idx = ms.to_be_bytes().to_vec();
        idx.extend_from_slice(key.as_bytes());
        h.expiry.insert(idx, &[]).map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Insert-if-absent without the flush (the caller flushes).
    fn insert_if_absent_unflushed(
        &self,
        h: &Handles,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> StoreResult<bool> {
        check_key(key)?;
        let expires = ttl.map(|t| now_ms().saturating_add(t.as_millis() as u64));
        let new = sled::IVec::from(encode(value, expires));
        // Most keys are new (a nonce): swap against "absent" first, which saves a lookup;
        // a key that is there but expired is replaced by swapping against its bytes.
        let mut current: Option<sled::IVec> = None;
        loop {
            match h.data.compare_and_swap(key, current, Some(new.clone())).map_err(|e| self.failed(e))? {
                Ok(()) => {
                    if let Some(ms) = expires {
                        self.index_expiry(h, key, ms)?;
                    }
                    return Ok(true);
                }
                Err(e) => {
                    if let Some(raw) = &e.current
                        && live(key, raw, now_ms())?.is_some()
                    {
                        return Ok(false);
                    }
                    current = e.current;
                }
            }
        }
    }

    fn compare_and_swap_unflushed(
        &self,
        h: &Handles,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> StoreResult<bool> {
        check_key(key)?;
        loop {
            let current = h.data.get(key).map_err(|e| self.failed(e))?;
            let logical = match &current {
                Some(raw) => live(key, raw, now_ms())?,
                None => None,
            };
            if logical != expected {
                return Ok(false);
            }
            // A live entry keeps its expiry; one made where the key was absent has none.
            let keeps = logical.and(current.as_deref()).and_then(expiry_of);
            let replacement = new.map(|v| encode(v, keeps));
            match h.data.compare_and_swap(key, current, replacement).map_err(|e| self.failed(e))? {
                Ok(()) => return Ok(true),
                // Raced with another writer between our read and the swap: decide again.
                Err(_) => continue,
            }
        }
    }

    /// Open (or create) the store in `dir`. Fails clearly if another process holds it.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let handles = Handles::open(dir, 0)?;
        Ok(SledStore {
            dir: dir.to_path_buf(),
            handles: RwLock::new(Some(Arc::new(handles))),
            broken: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            unflushed: Mutex::new(std::collections::HashMap::new()),
            any_unflushed: AtomicBool::new(false),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_flush: AtomicBool::new(false),
        })
    }

    /// Make every write made so far by this caller durable. Concurrent callers share
    /// fsyncs: while one flush runs, the others wait, and whoever finds their write already
    /// covered returns at once; at most one more flush covers all the rest.
    ///
    /// `h`: the database the write went into, held by the caller since.
    async fn flush(&self, h: &Handles) -> Result<(), Flush> {
        let mine = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = self.flush_lock.lock().await;
        if self.generation.load(Ordering::SeqCst) != h.generation {
            return Err(Flush::Reopened);
        }
        #[cfg(test)]
        if self.fail_next_flush.swap(false, Ordering::SeqCst) {
            return Err(Flush::Failed(StoreError::Unavailable("sled: injected flush failure".into())));
        }
        if self.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let covers = self.written.load(Ordering::SeqCst);
        // Not `flush_async`: concurrent `flush_async` calls deadlock in sled 0.34
        // (sled issue 1308). A blocking flush on the blocking pool is correct.
        let db = h.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| Flush::Failed(StoreError::Unavailable(format!("flush task: {e}"))))?
            .map_err(|e| Flush::Failed(self.failed(e)))?;
        self.flushed.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl Store for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let h = self.h()?;
        check_key(key)?;
        if let Some(before) = self.shadowed(key) {
            return Ok(before);
        }
        match h.data.get(key).map_err(|e| self.failed(e))? {
            Some(raw) => Ok(live(key, &raw, now_ms())?.map(<[u8]>::to_vec)),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.writable()?;
        let h = self.h()?;
        check_key(key)?;
        let before = match h.data.insert(key, encode(value, None)).map_err(|e| self.failed(e))? {
            Some(raw) => live(key, &raw, now_ms())?.map(<[u8]>::to_vec),
            None => None,
        };
        self.flush_or_shadow(&h, [(key.to_owned(), before)]).await
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        self.writable()?;
        let h = self.h()?;
        let swapped = self.compare_and_swap_unflushed(&h, key, expected, new)?;
        if swapped {
            self.flush_or_shadow(&h, [(key.to_owned(), expected.map(<[u8]>::to_vec))]).await?;
        }
        Ok(swapped)
    }

    async fn renew(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        self.writable()?;
        let h = self.h()?;
        check_key(key)?;
        let expires = now_ms().saturating_add(ttl.as_millis() as u64);
        loop {
            let current = h.data.get(key).map_err(|e| self.failed(e))?;
            let held = match &current {
                Some(raw) => live(key, raw, now_ms())? == Some(value),
                None => false,
            };
            if !held {
                return Ok(false);
            }
            let renewed = encode(value, Some(expires));
            match h.data.compare_and_swap(key, current, Some(renewed)).map_err(|e| self.failed(e))? {
                Ok(()) => break,
                Err(_) => continue,
            }
        }
        self.index_expiry(&h, key, expires)?;
        self.flush_or_shadow(&h, [(key.to_owned(), Some(value.to_vec()))]).await?;
        Ok(true)
    }

    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        self.writable()?;
        let h = self.h()?;
        use sled::Transactional;
        check_tx_keys(&txs)?;
        let now = now_ms();
        // One sled transaction for the batch (serializable; sled retries it on conflict),
        // in which each of ours passes or fails on its own. Only transactions write
        // sealed records and counters, so none of them interleaves with a plain write.
        let outcomes = (&h.data, &h.counters)
            .transaction(|(data, counters)| {
                let mut out = Vec::with_capacity(txs.len());
                for ops in &txs {
                    out.push(apply_tx(data, counters, ops, now)?);
                }
                Ok(out)
            })
            .map_err(|e| self.tx_failed(e))?;
        // One fsync makes the whole batch durable.
        if outcomes.contains(&TxOutcome::Committed) {
            let written =
                txs.iter().zip(&outcomes).filter(|(_, o)| **o == TxOutcome::Committed).flat_map(|(ops, _)| {
                    ops.iter().filter_map(|op| match op {
                        TxOp::Insert { key, .. } => Some((key.clone(), None)),
                        TxOp::Swap { key, expected, .. } => Some((key.clone(), Some(expected.clone()))),
                        // Counters are not read back by requests.
                        TxOp::Count { .. } => None,
                    })
                });
            self.flush_or_shadow(&h, written.collect::<Vec<_>>()).await?;
        }
        Ok(outcomes)
    }

    async fn close_counter(&self, key: &str) -> StoreResult<()> {
        self.writable()?;
        let h = self.h()?;
        check_key(key)?;
        h.counters
            .transaction(|t| {
                let value = match t.get(key)? {
                    Some(raw) => decode_counter(key.as_bytes(), &raw).map_err(abort)?.0,
                    None => 0,
                };
                t.insert(key.as_bytes(), &encode_counter(value, true))?;
                Ok(())
            })
            .map_err(|e| self.tx_failed(e))?;
        // Nothing to shadow (counters are read from sled as they are), but a failed flush
        // marks the database for the reopen as any other.
        self.flush_or_shadow(&h, std::iter::empty()).await
    }

    async fn counters(&self, prefix: &str) -> StoreResult<Vec<Counter>> {
        let h = self.h()?;
        let mut out = Vec::new();
        for item in h.counters.scan_prefix(prefix.as_bytes()) {
            let (k, raw) = item.map_err(|e| self.failed(e))?;
            let (value, closed) = decode_counter(&k, &raw)?;
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "non-UTF-8 key",
            })?;
            out.push(Counter { key, value, closed });
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.writable()?;
        let h = self.h()?;
        check_key(key)?;
        loop {
            let Some(current) = h.data.get(key).map_err(|e| self.failed(e))? else {
                return Ok(false);
            };
            let before = live(key, &current, now_ms())?.map(<[u8]>::to_vec);
            let was_live = before.is_some();
            match h.data.compare_and_swap(key, Some(current), None::<&[u8]>).map_err(|e| self.failed(e))? {
                Ok(()) => {
                    self.flush_or_shadow(&h, [(key.to_owned(), before)]).await?;
                    return Ok(was_live);
                }
                Err(_) => continue,
            }
        }
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let h = self.h()?;
        let start = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => Bound::Excluded(a.as_bytes().to_vec()),
            _ => Bound::Included(prefix.as_bytes().to_vec()),
        };
        let now = now_ms();
        // Keys a failed flush left in memory only are read as they were before it.
        let shadow: Vec<(String, Option<Vec<u8>>)> = if self.any_unflushed.load(Ordering::Acquire) {
            let shadow = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            shadow
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let raw_limit = limit.saturating_add(shadow.len());
        let mut out = Vec::new();
        for item in h.data.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            if out.len() >= raw_limit {
                break;
            }
            let (k, raw) = item.map_err(|e| self.failed(e))?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "non-UTF-8 key",
            })?;
            if let Some(v) = live(&key, &raw, now)? {
                out.push((key, v.to_vec()));
            }
        }
        if !shadow.is_empty() {
            out.retain(|(k, _)| !shadow.iter().any(|(s, _)| s == k));
            out.extend(shadow.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out.truncate(limit);
        Ok(out)
    }

    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        self.writable()?;
        let h = self.h()?;
        let inserted = self.insert_if_absent_unflushed(&h, key, value, ttl)?;
        if inserted {
            self.flush_or_shadow(&h, [(key.to_owned(), None)]).await?;
        }
        Ok(inserted)
    }

    async fn insert_if_absent_many(&self, items: &[(String, Vec<u8>, Option<Duration>)]) -> StoreResult<Vec<bool>> {
        self.writable()?;
        let h = self.h()?;
        let mut out = Vec::with_capacity(items.len());
        for (k, v, ttl) in items {
            out.push(self.insert_if_absent_unflushed(&h, k, v, *ttl)?);
        }
        // One fsync makes the whole batch durable.
        if out.iter().any(|b| *b) {
            let inserted = items.iter().zip(&out).filter(|(_, new)| **new).map(|((k, _, _), _)| (k.clone(), None));
            self.flush_or_shadow(&h, inserted.collect::<Vec<_>>()).await?;
        }
        Ok(out)
    }

    async fn purge_expired(&self) -> StoreResult<u64> {
        self.writable()?;
        let h = self.h()?;
        let now = now_ms();
        let mut purged = 0;
        // Every index entry whose expiry is at or before `now` (an entry is expired at its
        // expiry: `live`), those of this very millisecond included.
        let due: Vec<sled::IVec> = h
            .expiry
            .range(..now.saturating_add(1).to_be_bytes().to_vec())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.failed(e))?;
        for idx in due {
            let key = &idx[8..];
            if let Some(raw) = h.data.get(key).map_err(|e| self.failed(e))? {
                let k = String::from_utf8_lossy(key);
                // Only remove what is still expired: the key may have been re-inserted.
                if live(&k, &raw, now)?.is_none()
                    && h.data.compare_and_swap(key, Some(raw), None::<&[u8]>).map_err(|e| self.failed(e))?.is_ok()
                {
                    purged += 1;
                }
            }
            h.expiry.remove(&idx).map_err(|e| self.failed(e))?;
        }
        if purged > 0 {
            self.flush_or_shadow(&h, std::iter::empty()).await?;
        }
        Ok(purged)
    }

    async fn ping(&self) -> StoreResult<()> {
        let h = self.h()?;
        h.data.get("sys/ping").map_err(|e| self.failed(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn conformance() {
        let (_dir, s) = store().await;
        super::super::conformance::run_all(&s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_concurrent() {
        let (_dir, s) = store().await;
        super::super::conformance::run_concurrent(std::sync::Arc::new(s)).await;
    }

    /// A flush that fails leaves a key that reads as it was before while sled's memory
    /// holds the new value. A read-and-swap loop on it (KV version 2's metadata and
    /// settings writes) must end: a swap is refused, or made against what the reopened
    /// database holds. (Before, it answered "changed meanwhile" for good.)
    #[tokio::test]
    async fn a_read_and_swap_loop_ends_after_a_failed_flush() {
        let (_dir, s) = store().await;
        s.put("k", b"v1").await.unwrap();
        // A write reaches sled's memory; its flush fails.
        let h = s.h().unwrap();
        h.data.insert("k", encode(b"v2", None)).unwrap();
        s.fail_next_flush.store(true, Ordering::SeqCst);
        assert!(s.flush_or_shadow(&h, [("k".to_owned(), Some(b"v1".to_vec()))]).await.is_err());
        drop(h);
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]), "reads serve the durable value");

        let mut tries = 0;
        let outcome = loop {
            tries += 1;
            if tries > 100 {
                break "spun";
            }
            let seen = s.get("k").await.unwrap();
            match s.compare_and_swap("k", seen.as_deref(), Some(b"v3")).await {
                Ok(true) => break "swapped",
                Ok(false) => continue,
                Err(_) => break "refused",
            }
        };
        assert_ne!(outcome, "spun");
        if outcome == "swapped" {
            assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"v3"[..]));
        }
    }

    /// A reopen (after an I/O error) cannot take the database from under a write that
    /// waits for its flush: the write is flushed into the database it went into and
    /// stays. (Before, a compare-and-swap let go of the database before its flush: the
    /// reopen went ahead, and a flush of the reopened database acknowledged a write it
    /// did not hold.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reopen_waits_for_a_write_to_be_flushed() {
        let (_dir, s) = store().await;
        let s = Arc::new(s);
        s.put("k", b"v1").await.unwrap();
        // The swap is made, and waits its turn to flush.
        let turn = s.flush_lock.lock().await;
        let before = s.written.load(Ordering::SeqCst);
        let w = tokio::spawn({
            let s = s.clone();
            async move { s.compare_and_swap("k", Some(b"v1"), Some(b"v2")).await }
        });
        while s.written.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // An I/O error elsewhere; a reopen is tried (there is room) and must give up.
        s.broken.store(true, Ordering::SeqCst);
        tokio::task::block_in_place(|| s.maybe_reopen());
        assert!(s.broken.load(Ordering::SeqCst), "the database was reopened under a write");
        drop(turn);
        assert!(w.await.unwrap().unwrap());
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    }

    /// Should the database be reopened between a write and its flush all the same, the
    /// write is not acknowledged: not by a flush of the reopened database, nor by the
    /// group commit's count of flushed writes, which goes on across a reopen.
    #[tokio::test]
    async fn a_write_is_not_acknowledged_after_its_database_was_reopened() {
        let (_dir, s) = store().await;
        s.put("k", b"v1").await.unwrap();
        let h = s.h().unwrap();
        assert!(s.compare_and_swap_unflushed(&h, "k", Some(b"v1"), Some(b"v2")).unwrap());
        s.put("other", b"x").await.unwrap();
        s.generation.fetch_add(1, Ordering::SeqCst);
        let err = s.flush_or_shadow(&h, [("k".to_owned(), Some(b"v1".to_vec()))]).await.unwrap_err();
        assert!(err.to_string().contains("it was not stored"), "{err}");
    }

    #[tokio::test]
    async fn a_second_opener_gets_a_clear_error() {
        let (dir, _s) = store().await;
        let err = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot open sled store"), "{err}");
    }

    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put("kv/a", b"1").await.unwrap();
            assert!(s.insert_if_absent("n/x", b"", Some(Duration::from_secs(60))).await.unwrap());
        }
        // sled's flusher thread lets go of the database, and of its file lock, a moment
        // after the last handle is dropped: open again until it has (in one process only;
        // a process that exits releases the lock at once).
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match SledStore::open(dir.path()) {
                Ok(s) => break s,
                Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(s.get("kv/a").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert!(!s.insert_if_absent("n/x", b"", Some(Duration::from_secs(60))).await.unwrap());
    }
}
