//! A read cache in front of any [`SecretBackend`]: entries live `ttl`, bounded in number
//! and in bytes (the oldest go first), zeroized when evicted or replaced (their
//! [`SecretData`] is); "not found" is kept `negative_ttl`; with `stale_if_error`, a value
//! past its `ttl` is served for that much longer while the upstream is unavailable. Writes
//! and deletes go through to the upstream and drop the path's entries.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use crate::resilience::humantime_serde_compat;
use crate::{BackendError, Capabilities, SecretBackend, SecretData, SecretValue, Version};

/// `[mounts.options.cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a value read is served without asking the upstream (`0`: no cache).
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// Bytes of secret values held, at most.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// How long "not found" is remembered.
    #[serde(default = "default_negative_ttl", with = "humantime_serde_compat")]
    pub negative_ttl: Duration,
    /// Off (`0`, the default): an unavailable upstream is a 503. Else, a value at most
    /// `ttl + stale_if_error` old is served while the upstream is unavailable.
    #[serde(default, with = "humantime_serde_compat")]
    pub stale_if_error: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_max_entries() -> usize {
    10_000
}
fn default_max_bytes() -> usize {
    16 << 20
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: default_ttl(),
            max_entries: default_max_entries(),
            max_bytes: default_max_bytes(),
            negative_ttl: default_negative_ttl(),
            stale_if_error: Duration::ZERO,
        }
    }
}

type Key = (String, Version);

#[derive(Debug)]
struct Entry {
    /// `None`: the upstream said "not found".
    value: Option<SecretValue>,
    fetched: Instant,
    seq: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.value.as_ref().map_or(0, |v| v.data.len())
    }
}

#[derive(Debug, Default)]
struct State {
    map: HashMap<Key, Entry>,
    /// Insertion order for eviction (entries replaced since are skipped by `seq`).
    order: VecDeque<(Key, u64)>,
    bytes: usize,
    next_seq: u64,
    /// Bumped by every write and delete ([`Cached::invalidate`]): a read that began before
    /// one of its path may carry what that write replaced, so its answer is not kept.
    invalidations: u64,
    /// The latest invalidations (number, path), at most [`RECENT_INVALIDATIONS`]: which
    /// paths they were for. A read older than all of them keeps nothing.
    recent: VecDeque<(u64, String)>,
}

/// How many invalidations are remembered by path.
const RECENT_INVALIDATIONS: usize = 1024;

/// Counters of a cache (for tests and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_served: u64,
    pub entries: usize,
    pub bytes: usize,
}

/// [`SecretBackend`] with a bounded read cache.
#[derive(Debug)]
pub struct Cached<B> {
    inner: B,
    config: CacheConfig,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl<B: SecretBackend> Cached<B> {
    pub fn new(inner: B, config: CacheConfig) -> Self {
        Cached {
            inner,
            config,
            state: Mutex::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale_served: self.stale.load(Ordering::Relaxed),
            entries: st.map.len(),
            bytes: st.bytes,
        }
    }

    fn enabled(&self) -> bool {
        !self.config.ttl.is_zero() && self.config.max_entries > 0
    }

    /// The entry if still fresh: `Some(Ok)` a value, `Some(Err(NotFound))` a negative.
    fn fresh(&self, key: &Key) -> Option<Result<SecretValue, BackendError>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let e = st.map.get(key)?;
        let age = e.fetched.elapsed();
        match &e.value {
            Some(v) if age < self.config.ttl => Some(Ok(v.clone())),
            None if age < self.config.negative_ttl => Some(Err(BackendError::NotFound)),
            _ => None,
        }
    }

    /// A value past its `ttl` but within `stale_if_error`.
    fn stale(&self, key: &Key) -> Option<SecretValue> {
        if self.config.stale_if_error.is_zero() {
            return None;
        }
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let e = st.map.get(key)?;
        let limit = self.config.ttl.saturating_add(self.config.stale_if_error);
        e.value.as_ref().filter(|_| e.fetched.elapsed() < limit).cloned()
    }

    /// The invalidation count now: what a read notes before it asks the upstream.
    fn invalidations(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).invalidations
    }

    /// Keep what a read found, unless a write or delete of its path came since the read
    /// began (`invalidations` then): the upstream may have answered from before it.
    /// Writes of other paths do not matter, unless so many came that the ones since the
    /// read are no longer all remembered.
    fn insert(&self, key: Key, value: Option<SecretValue>, invalidations: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.invalidations != invalidations {
            let all_remembered = st.recent.front().is_some_and(|(n, _)| *n <= invalidations.wrapping_add(1));
            if !all_remembered || st.recent.iter().any(|(n, p)| *n > invalidations && *p == key.0) {
                return;
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let entry = Entry { value, fetched: Instant::now(), seq };
        if entry.bytes() > self.config.max_bytes {
            return;
        }
        st.bytes += entry.bytes();
        if let Some(old) = st.map.insert(key.clone(), entry) {
            st.bytes -= old.bytes();
        }
        st.order.push_back((key, seq));
        // The oldest go first, until both bounds hold. (Dropping an entry zeroizes it.)
        while st.map.len() > self.config.max_entries || st.bytes > self.config.max_bytes {
            let Some((k, s)) = st.order.pop_front() else { break };
            if st.map.get(&k).is_some_and(|e| e.seq == s)
                && let Some(old) = st.map.remove(&k)
            {
                st.bytes -= old.bytes();
            }
        }
        // Keep the order queue from growing without bound under replacements.
        if st.order.len() > 4 * self.config.max_entries.max(16) {
            let State { map, order, .. } = &mut *st;
            order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    fn invalidate(&self, path: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.invalidations = st.invalidations.wrapping_add(1);
        let n = st.invalidations;
        if st.recent.len() >= RECENT_INVALIDATIONS {
            st.recent.pop_front();
        }
        st.recent.push_back((n, path.to_owned()));
        let before = st.bytes;
        let mut freed = 0;
        st.map.retain(|(p, _), e| {
            let keep = p != path;
            if !keep {
                freed += e.bytes();
            }
            keep
        });
        st.bytes = before - freed;
    }
}

#[async_trait]
impl<B: SecretBackend> SecretBackend for Cached<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        if !self.enabled() {
            return self.inner.read(path, version).await;
        }
        let key = (path.to_owned(), version.clone());
        if let Some(hit) = self.fresh(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let invalidations = self.invalidations();
        match self.inner.read(path, version).await {
            Ok(v) => {
                self.insert(key, Some(v.clone()), invalidations);
                Ok(v)
            }
            Err(BackendError::NotFound) => {
                self.insert(key, None, invalidations);
                Err(BackendError::NotFound)
            }
            Err(e) if e.is_transient() => match self.stale(&key) {
                Some(v) => {
                    self.stale.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(upstream = self.inner.kind(), error = %e, "upstream unavailable: serving a stale value");
                    Ok(v)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        // Whatever the outcome (a timed-out write may have landed, and so may one whose
        // caller hung up half way), the cached value may be wrong once it ends.
        let _invalidate = InvalidateWhenDone(self, path);
        self.inner.write(path, data, expected).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let _invalidate = InvalidateWhenDone(self, path);
        self.inner.delete(path).await
    }
}

/// Drops a path's cached entries when the write or delete holding it ends, returned or
/// dropped half way (its request may have reached the upstream all the same).
struct InvalidateWhenDone<'a, B: SecretBackend>(&'a Cached<B>, &'a str);

impl<B: SecretBackend> Drop for InvalidateWhenDone<'_, B> {
    fn drop(&mut self) {
        self.0.invalidate(self.1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An in-memory backend whose availability the test switches (the cache's own logic
    /// under test; the adapters are tested against real upstreams).
    #[derive(Debug, Default)]
    struct Memory {
        down: AtomicBool,
        reads: AtomicU64,
        map: Mutex<HashMap<String, SecretValue>>,
        /// When set, a read takes its answer and then waits for a permit before giving it.
        hold: Mutex<Option<std::sync::Arc<tokio::sync::Semaphore>>>,
        /// A write lands and then never answers.
        writes_hang: AtomicBool,
    }

    #[async_trait]
    impl SecretBackend for Memory {
        fn kind(&self) -> &'static str {
            "memory"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                versions: false,
                version_ids: false,
                version_stages: false,
                writes: true,
                deletes: true,
                list: false,
            }
        }
        async fn read(&self, path: &str, _: &Version) -> Result<SecretValue, BackendError> {
            if self.down.load(Ordering::Relaxed) {
                self.reads.fetch_add(1, Ordering::Relaxed);
                return Err(BackendError::Unavailable("down".into()));
            }
            let answer = self.map.lock().unwrap().get(path).cloned().ok_or(BackendError::NotFound);
            // Counted once the answer is taken (a test waits for this to write after it).
            self.reads.fetch_add(1, Ordering::Relaxed);
            let hold = self.hold.lock().unwrap().clone();
            if let Some(hold) = hold {
                hold.acquire().await.unwrap().forget();
            }
            answer
        }
        async fn write(&self, path: &str, data: &SecretData, _: Option<u64>) -> Result<Option<u64>, BackendError> {
            let v = SecretValue { data: data.clone(), version: None, version_id: None, created_time: None };
            self.map.lock().unwrap().insert(path.into(), v);
            // Landed upstream; the answer may never come back.
            if self.writes_hang.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            Ok(None)
        }
        async fn list(&self, _: &str) -> Result<Vec<String>, BackendError> {
            Err(BackendError::Unsupported("list"))
        }
        async fn delete(&self, path: &str) -> Result<(), BackendError> {
            self.map.lock().unwrap().remove(path);
            Ok(())
        }
    }

    fn cfg(ttl: Duration, stale_ms: u64) -> CacheConfig {
        CacheConfig {
            ttl,
            negative_ttl: ttl,
            stale_if_error: Duration::from_millis(stale_ms),
            ..CacheConfig::default()
        }
    }

    #[tokio::test]
    async fn hits_negatives_write_through_and_bounds() {
        let c = Cached::new(Memory::default(), cfg(Duration::from_secs(60), 0));
        assert_eq!(c.read("a", &Version::Latest).await, Err(BackendError::NotFound));
        assert_eq!(c.read("a", &Version::Latest).await, Err(BackendError::NotFound));
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 1, "the negative answer was cached");
        c.write("a", &SecretData::from_fields([("v", "1")]), None).await.unwrap();
        assert_eq!(c.read("a", &Version::Latest).await.unwrap().data.field("v").unwrap().as_str(), "1");
        assert_eq!(c.read("a", &Version::Latest).await.unwrap().data.field("v").unwrap().as_str(), "1");
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 2, "the write dropped the negative entry, one miss");
        c.delete("a").await.unwrap();
        assert_eq!(c.read("a", &Version::Latest).await, Err(BackendError::NotFound));

        // Entry and byte bounds: the oldest go first.
        let small =
            Cached::new(Memory::default(), CacheConfig { max_entries: 3, max_bytes: 40, ..CacheConfig::default() });
        for i in 0..10 {
            let p = format!("p{i}");
            small.write(&p, &SecretData::from_fields([("v", "0123456789")]), None).await.unwrap();
            small.read(&p, &Version::Latest).await.unwrap();
            let s = small.stats();
            assert!(s.entries <= 3 && s.bytes <= 40, "{s:?}");
        }
    }

    type Shared = std::sync::Arc<Cached<Memory>>;

    /// A cache over a backend holding `a` = `v`, and a read of `a` that has taken its
    /// answer from the backend and waits; `then` runs, and the read returns.
    async fn read_overtaken_by<F: std::future::Future<Output = ()>>(v: &str, then: impl FnOnce(Shared) -> F) -> Shared {
        let c = std::sync::Arc::new(Cached::new(Memory::default(), cfg(Duration::from_secs(60), 0)));
        c.write("a", &SecretData::from_fields([("v", v)]), None).await.unwrap();
        let hold = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        *c.inner().hold.lock().unwrap() = Some(hold.clone());
        let reader = {
            let c = c.clone();
            tokio::spawn(async move { c.read("a", &Version::Latest).await })
        };
        while c.inner().reads.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        then(c.clone()).await;
        hold.add_permits(1);
        assert_eq!(reader.await.unwrap().unwrap().data.field("v").unwrap().as_str(), v);
        *c.inner().hold.lock().unwrap() = None;
        c
    }

    /// A read that took its answer before a write (or a delete) and returns after it does
    /// not keep that answer: the next read asks the upstream and gets the new value. A
    /// write of another path meanwhile does not keep the answer out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_overtaken_by_a_write_or_delete_keeps_nothing() {
        let new = SecretData::from_fields([("v", "new")]);
        let c = read_overtaken_by("old", |c| async move {
            c.write("a", &new, None).await.unwrap();
        })
        .await;
        assert_eq!(c.read("a", &Version::Latest).await.unwrap().data.field("v").unwrap().as_str(), "new");
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 2, "the second read asked the upstream");

        let c = read_overtaken_by("old", |c| async move { c.delete("a").await.unwrap() }).await;
        assert_eq!(c.read("a", &Version::Latest).await, Err(BackendError::NotFound));
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 2, "the second read asked the upstream");

        let other = SecretData::from_fields([("v", "x")]);
        let c = read_overtaken_by("1", |c| async move {
            c.write("other", &other, None).await.unwrap();
        })
        .await;
        c.read("a", &Version::Latest).await.unwrap();
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 1, "the answer was kept");
    }

    /// Writes of many distinct paths during one read: the paths remembered stay bounded
    /// (1024), and once the ones since the read are no longer all remembered, the read's
    /// answer is not kept (it cannot be told apart from one overtaken by its own path).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalidations_of_many_paths_stay_bounded_and_fail_safe() {
        let c = read_overtaken_by("1", |c| async move {
            for i in 0..3 * RECENT_INVALIDATIONS {
                c.write(&format!("other-{i}"), &SecretData::from_fields([("v", "x")]), None).await.unwrap();
            }
        })
        .await;
        assert_eq!(c.state.lock().unwrap().recent.len(), RECENT_INVALIDATIONS);
        c.read("a", &Version::Latest).await.unwrap();
        assert_eq!(c.inner().reads.load(Ordering::Relaxed), 2, "not kept: the read asked again");
    }

    /// A write whose caller gives up after it reached the upstream (it landed, no answer
    /// came) still drops the cached value: the next read asks the upstream.
    #[tokio::test]
    async fn a_write_dropped_half_way_drops_the_cached_value() {
        let c = Cached::new(Memory::default(), cfg(Duration::from_secs(60), 0));
        c.write("a", &SecretData::from_fields([("v", "old")]), None).await.unwrap();
        assert_eq!(c.read("a", &Version::Latest).await.unwrap().data.field("v").unwrap().as_str(), "old");
        c.inner().writes_hang.store(true, Ordering::Relaxed);
        let new = SecretData::from_fields([("v", "new")]);
        assert!(tokio::time::timeout(Duration::from_millis(50), c.write("a", &new, None)).await.is_err());
        assert_eq!(c.read("a", &Version::Latest).await.unwrap().data.field("v").unwrap().as_str(), "new");
    }

    #[tokio::test]
    async fn stale_if_error_serves_a_bounded_stale_value_only_when_the_upstream_is_down() {
        for stale_ms in [0, 60_000] {
            // A ttl of 1 ns: every entry is past it by the next read.
            let c = Cached::new(Memory::default(), cfg(Duration::from_nanos(1), stale_ms));
            c.write("a", &SecretData::from_fields([("v", "old")]), None).await.unwrap();
            c.read("a", &Version::Latest).await.unwrap();
            c.inner().down.store(true, Ordering::Relaxed);
            let r = c.read("a", &Version::Latest).await;
            if stale_ms == 0 {
                assert!(matches!(r, Err(BackendError::Unavailable(_))), "{r:?}");
            } else {
                assert_eq!(r.unwrap().data.field("v").unwrap().as_str(), "old");
                assert_eq!(c.stats().stale_served, 1);
                // A missing path is not made up.
                assert!(matches!(c.read("b", &Version::Latest).await, Err(BackendError::Unavailable(_))));
            }
        }
    }
}
