//! Stores for unit tests that put a process's interleavings and interruptions where a
//! test wants them: [`Paused`] holds one read until told to go on, [`StopsAfter`] fails
//! every write after a number of them (a process stopped there).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use async_trait::async_trait;

use super::{Counter, Store, StoreError, StoreResult, TxOp, TxOutcome};

/// Which read [`Paused`] holds: the first `get` of the key, or the first `scan_prefix`
/// of the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseAt {
    Get,
    Scan,
}

/// A store that holds its first read of one kind of one key until `go` is notified
/// (`reached` is notified when it is held). A `get` is made, then held: it returns what
/// it read, a read that lost the race with what the test does meanwhile. A scan is held,
/// then made: it sees what the test did meanwhile. Not armed until [`Paused::arm`].
#[derive(Debug)]
pub struct Paused {
    pub inner: Arc<dyn Store>,
    at: PauseAt,
    key: String,
    done: AtomicBool,
    pub reached: tokio::sync::Notify,
    pub go: tokio::sync::Notify,
}

impl Paused {
    /// Not armed: every call passes until [`Paused::arm`].
    pub fn new(inner: Arc<dyn Store>, at: PauseAt, key: &str) -> Self {
        Paused {
            inner,
            at,
            key: key.to_owned(),
            done: AtomicBool::new(true),
            reached: tokio::sync::Notify::new(),
            go: tokio::sync::Notify::new(),
        }
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
}

#[async_trait]
impl Store for Paused {
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let v = self.inner.get(key).await?;
        self.hold(PauseAt::Get, key).await;
        Ok(v)
    }
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.inner.put(key, value).await
    }
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        self.inner.compare_and_swap(key, expected, new).await
    }
    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.inner.delete(key).await
    }
    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.hold(PauseAt::Scan, prefix).await;
        self.inner.scan_prefix(prefix, after, limit).await
    }
    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<std::time::Duration>) -> StoreResult<bool> {
        self.inner.insert_if_absent(key, value, ttl).await
    }
    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        self.inner.transact_many(txs).await
    }
    async fn close_counter(&self, key: &str) -> StoreResult<()> {
        self.inner.close_counter(key).await
    }
    async fn counters(&self, prefix: &str) -> StoreResult<Vec<Counter>> {
        self.inner.counters(prefix).await
    }
    async fn purge_expired(&self) -> StoreResult<u64> {
        self.inner.purge_expired().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    fn kind(&self) -> &'static str {
        "paused"
    }
}

/// A store that takes `left` more writes, then fails every write as a store that went
/// away would (reads go on): a process stopped at that point.
#[derive(Debug)]
pub struct StopsAfter {
    pub inner: Arc<dyn Store>,
    left: AtomicI64,
}

impl StopsAfter {
    pub fn new(inner: Arc<dyn Store>, writes: i64) -> Self {
        StopsAfter { inner, left: AtomicI64::new(writes) }
    }

    fn write(&self) -> StoreResult<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) > 0 {
            Ok(())
        } else {
            Err(StoreError::Unavailable("stopped".into()))
        }
    }
}

#[async_trait]
impl Store for StopsAfter {
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.write()?;
        self.inner.put(key, value).await
    }
    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        self.write()?;
        self.inner.compare_and_swap(key, expected, new).await
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
        self.inner.scan_prefix(prefix, after, limit).await
    }
    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<std::time::Duration>) -> StoreResult<bool> {
        self.write()?;
        self.inner.insert_if_absent(key, value, ttl).await
    }
    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        self.write()?;
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
        "stops-after"
    }
}
