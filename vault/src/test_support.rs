//! What unit tests put under the code they test: [`Keyed`], a SoftHSM token with a
//! keyring made in it, on sled; and [`TestStore`], a store that puts a process's
//! interleavings and interruptions where a test wants them (one read held until told to
//! go on, or every write failed after a number of them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use async_trait::async_trait;

use crate::store::{Counter, Store, StoreError, StoreResult, TxOp, TxOutcome};

/// A fresh SoftHSM token with a keyring made in it, over a sled store in a temporary
/// directory (both removed when this is dropped).
pub struct Keyed {
    pub store: Arc<dyn Store>,
    pub keys: Arc<dyn keyvault_hsm::KeyStore>,
    pub names: crate::keys::KeyNames,
    pub keyring: crate::keys::SharedKeyring,
    _dir: tempfile::TempDir,
    _token: keyvault_hsm::softhsm::testing::TestToken,
}

impl Keyed {
    pub async fn new() -> Keyed {
        let token = keyvault_hsm::softhsm::testing::token();
        let keys: Arc<dyn keyvault_hsm::KeyStore> = token.store.clone();
        let names = crate::keys::KeyNames::new("keyvault").expect("names");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir.path()).expect("sled"));
        let ring = crate::keys::initialize(store.as_ref(), &keys, &names).await.expect("a keyring");
        let keyring = crate::keys::SharedKeyring::new(ring, store.clone());
        Keyed { store, keys, names, keyring, _dir: dir, _token: token }
    }

    /// A barrier over the token and keyring.
    pub fn barrier(&self) -> crate::barrier::Barrier {
        crate::barrier::Barrier::new(self.keys.clone(), self.names.clone(), self.keyring.clone())
    }
}

/// What a [`TestStore`] holds: the first `get` of the key, the first `scan_prefix` of
/// the prefix, or the first compare-and-swap of the key (once made, or before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseAt {
    Get,
    Scan,
    /// A compare-and-swap, held after it is made (its caller has not seen the outcome).
    Swap,
    /// A compare-and-swap (or a transaction that writes the key), held before it is made
    /// (what its caller read may change meanwhile).
    BeforeSwap,
}

/// A store over another that can hold one read, fail writes, or both.
///
/// Held read ([`TestStore::holding`], armed by [`TestStore::arm`]): the first read of one kind of
/// one key is held until `go` is notified (`reached` is notified when it is held). A
/// `get` is made, then held: it returns what it read, a read that lost the race with
/// what the test does meanwhile. A scan is held, then made: it sees what the test did
/// meanwhile.
///
/// Failing writes ([`TestStore::stopping_after`]): after a number of writes every write fails as
/// a store that went away would (reads go on): a process stopped at that point.
#[derive(Debug)]
pub struct TestStore {
    pub inner: Arc<dyn Store>,
    at: PauseAt,
    key: String,
    done: AtomicBool,
    pub reached: tokio::sync::Notify,
    pub go: tokio::sync::Notify,
    /// Writes left before every write fails; `None`: no limit.
    writes_left: Option<AtomicI64>,
    /// Entries the scans returned so far.
    pub scanned: std::sync::atomic::AtomicU64,
}

impl TestStore {
    /// Holds the first read of `key` of kind `at` once armed ([`TestStore::arm`]).
    pub fn holding(inner: Arc<dyn Store>, at: PauseAt, key: &str) -> Self {
        TestStore {
            inner,
            at,
            key: key.to_owned(),
            done: AtomicBool::new(true),
            reached: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
            writes_left: None,
            scanned: Default::default(),
        }
    }

    /// Takes `writes` more writes, then fails every write; holds nothing.
    pub fn stopping_after(inner: Arc<dyn Store>, writes: i64) -> Self {
        TestStore { writes_left: Some(AtomicI64::new(writes)), ..TestStore::holding(inner, PauseAt::Get, "") }
    }

    pub fn arm(&self) {
        self.done.store(false, Ordering::Release);
    }

    async fn hold(&self, at: PauseAt, key: &str) {
        if at == self.at && key == self.key && !self.done.swap(true, Ordering::AcqRel) {
            let go = self.go.notified();
            self.reached.notify_one();
            go.await;
        }
    }

    fn write(&self) -> StoreResult<()> {
        match &self.writes_left {
            Some(left) if left.fetch_sub(1, Ordering::SeqCst) <= 0 => Err(StoreError::Unavailable("stopped".into())),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Store for TestStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let v = self.inner.get(key).await?;
        self.hold(PauseAt::Get, key).await;
        Ok(v)
    }
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.write()?;
        self.inner.put(key, value).await
    }
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        self.write()?;
        self.hold(PauseAt::BeforeSwap, key).await;
        let swapped = self.inner.compare_and_swap(key, expected, new).await?;
        self.hold(PauseAt::Swap, key).await;
        Ok(swapped)
    }
    async fn renew(&self, key: &str, value: &[u8], ttl: std::time::Duration) -> StoreResult<bool> {
        self.write()?;
        self.inner.renew(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.write()?;
        self.inner.delete(key).await
    }
    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.hold(PauseAt::Scan, prefix).await;
        let page = self.inner.scan_prefix(prefix, after, limit).await?;
        self.scanned.fetch_add(page.len() as u64, Ordering::Relaxed);
        Ok(page)
    }
    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<std::time::Duration>) -> StoreResult<bool> {
        self.write()?;
        self.inner.insert_if_absent(key, value, ttl).await
    }
    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        self.write()?;
        // A transaction that writes the key is held as a compare-and-swap of it would be.
        if txs.iter().flatten().any(|op| op.key() == self.key) {
            self.hold(PauseAt::BeforeSwap, &self.key).await;
        }
        self.inner.transact_many(txs).await
    }
    async fn close_counter(&self, key: &str) -> StoreResult<()> {
        self.write()?;
        self.inner.close_counter(key).await
    }
    async fn counters(&self, prefix: &str) -> StoreResult<Vec<Counter>> {
        self.inner.counters(prefix).await
    }
    async fn purge_expired(&self) -> StoreResult<u64> {
        self.write()?;
        self.inner.purge_expired().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        "test"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work whose claim cannot be renewed (the store refuses every write after the claim's
    /// insert, and never says the claim is gone) is stopped once the claim may have run
    /// out, never polled after that, and answers 503 (`ClaimLost`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_claim_cannot_be_renewed_is_stopped_when_it_may_have_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let sled: std::sync::Arc<dyn crate::store::Store> =
            std::sync::Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let store: std::sync::Arc<dyn crate::store::Store> = std::sync::Arc::new(TestStore::stopping_after(sled, 1));
        let ttl = std::time::Duration::from_millis(1500);
        let polls_after = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (counter, started) = (polls_after.clone(), std::time::Instant::now());
        let work = async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                if started.elapsed() >= ttl {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        };
        let stopped = tokio::time::timeout(ttl * 4, crate::store::while_claimed(&store, "claims/z", ttl, work)).await;
        assert!(matches!(
            stopped.expect("the work went on without its claim"),
            Err(crate::store::StoreError::ClaimLost(_))
        ));
        assert_eq!(polls_after.load(std::sync::atomic::Ordering::SeqCst), 0, "the work went on past the claim's TTL");
        assert!(started.elapsed() >= ttl.mul_f64(0.85), "stopped at nine tenths of the TTL: {:?}", started.elapsed());
    }
}
