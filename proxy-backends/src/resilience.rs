//! Bounded retries with exponential backoff and full jitter, a timeout per attempt, and a
//! circuit breaker, around any [`SecretBackend`]. A dead upstream costs a request at most
//! `attempts` timeouts, and once the breaker opens, nothing: calls fail at once (503, or a
//! stale value from the cache above) until a single probe finds the upstream back.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use crate::{BackendError, Capabilities, SecretBackend, SecretData, SecretValue, Version};

/// `[mounts.options.resilience]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Each attempt's limit.
    #[serde(default = "default_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Attempts per read, list or delete (writes are tried once: a write that timed out
    /// may have landed, and a second one would make another version).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// First backoff; doubles per attempt, up to `max_backoff`, each drawn uniformly
    /// below that (full jitter).
    #[serde(default = "default_base", with = "humantime_serde_compat")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde_compat")]
    pub max_backoff: Duration,
    /// Consecutive failed calls (after their retries) that open the breaker.
    #[serde(default = "default_threshold")]
    pub breaker_failures: u32,
    /// How long it stays open before one probe is let through.
    #[serde(default = "default_cooldown", with = "humantime_serde_compat")]
    pub breaker_cooldown: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_attempts() -> u32 {
    3
}
fn default_base() -> Duration {
    Duration::from_millis(50)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_threshold() -> u32 {
    5
}
fn default_cooldown() -> Duration {
    Duration::from_secs(5)
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            timeout: default_timeout(),
            attempts: default_attempts(),
            backoff: default_base(),
            max_backoff: default_max_backoff(),
            breaker_failures: default_threshold(),
            breaker_cooldown: default_cooldown(),
        }
    }
}

/// Durations as `"5s"`, `"250ms"` (humantime) or seconds.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => keyvault_api::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    /// Numbers the probes, so that an abandoned one clears only its own.
    probes: u64,
}

/// [`SecretBackend`] with retries, timeouts and a circuit breaker.
#[derive(Debug)]
pub struct Resilient<B> {
    inner: B,
    policy: Policy,
    breaker: Mutex<Breaker>,
}

impl<B: SecretBackend> Resilient<B> {
    pub fn new(inner: B, policy: Policy) -> Self {
        Resilient { inner, policy, breaker: Mutex::new(Breaker::default()) }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Let a call through, or refuse it at once while the breaker is open: the number of
    /// the probe, when the call let through is the one probe of an open breaker.
    fn admit(&self, counted: bool) -> Result<Option<u64>, BackendError> {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            // A call whose outcome does not count is never the probe: a listing that
            // takes long would hold every other call off for its whole walk.
            Some(until) if !counted => Err(open_error(&b, until)),
            Some(until) if Instant::now() < until => Err(open_error(&b, until)),
            Some(until) if b.probing => Err(open_error(&b, until)),
            Some(_) => {
                b.probing = true;
                b.probes = b.probes.wrapping_add(1);
                Ok(Some(b.probes))
            }
            None => Ok(None),
        }
    }

    /// Probe `n` ended with no outcome (its caller hung up, or it panicked): the next call
    /// may probe, unless another probe is under way by now.
    fn probe_abandoned(&self, n: u64) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if b.probing && b.probes == n {
            b.probing = false;
        }
    }

    fn record(&self, failed: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if !failed {
            if b.open_until.is_some() {
                tracing::info!(upstream = self.inner.kind(), "upstream back: circuit closed");
            }
            *b = Breaker::default();
            return;
        }
        b.failures = b.failures.saturating_add(1);
        if b.probing || b.failures >= self.policy.breaker_failures {
            if b.open_until.is_none() || b.probing {
                tracing::warn!(upstream = self.inner.kind(), failures = b.failures, "upstream failing: circuit open");
            }
            b.open_until = Some(Instant::now() + self.policy.breaker_cooldown);
            b.probing = false;
        }
    }

    /// Call with retries. `counted`: the outcome counts towards the breaker. A listing's
    /// does not: how long a walk over the upstream's pages takes depends on what the
    /// caller asks to list (the root of a large account can take longer than the
    /// per-attempt timeout every time), and a caller who may only list must not be able
    /// to open the circuit for every other caller. A listing that probes an open breaker
    /// leaves the probe to the next call.
    async fn call<T, F, Fut>(&self, attempts: u32, counted: bool, f: F) -> Result<T, BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let probe = self.admit(counted)?;
        // A probe dropped before its outcome is recorded would leave the breaker open for
        // good (every later call refused as "a probe is under way").
        let mut probe = ProbeGuard(probe.map(|n| (self, n)));
        let attempts = attempts.max(1);
        let mut attempt = 0;
        let result = loop {
            let r = match tokio::time::timeout(self.policy.timeout, f()).await {
                Ok(r) => r,
                Err(_) => Err(BackendError::Unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.policy.timeout)
                ))),
            };
            attempt += 1;
            match r {
                Err(e) if e.is_transient() && attempt < attempts => {
                    let cap =
                        self.policy.backoff.saturating_mul(1 << (attempt - 1).min(16)).min(self.policy.max_backoff);
                    tokio::time::sleep(crate::jitter(cap)).await;
                }
                other => break other,
            }
        };
        if counted {
            probe.0 = None;
            self.record(matches!(&result, Err(e) if e.is_transient()));
        }
        result
    }
}

/// Held by the probe of an open breaker until it records its outcome; dropped before
/// that (the call was dropped half way), it lets the next call probe.
struct ProbeGuard<'a, B: SecretBackend>(Option<(&'a Resilient<B>, u64)>);

impl<B: SecretBackend> Drop for ProbeGuard<'_, B> {
    fn drop(&mut self) {
        if let Some((r, n)) = self.0 {
            r.probe_abandoned(n);
        }
    }
}

fn open_error(b: &Breaker, until: Instant) -> BackendError {
    BackendError::Unavailable(format!(
        "circuit open after {} failed calls (next probe in {} ms)",
        b.failures,
        until.saturating_duration_since(Instant::now()).as_millis()
    ))
}

#[async_trait]
impl<B: SecretBackend> SecretBackend for Resilient<B> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        self.call(self.policy.attempts, true, || self.inner.read(path, version)).await
    }

    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        self.call(1, true, || self.inner.write(path, data, expected)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.call(self.policy.attempts, false, || self.inner.list(prefix)).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.call(self.policy.attempts, true, || self.inner.delete(path)).await
    }

    async fn current_version(&self, path: &str) -> Result<Option<u64>, BackendError> {
        self.call(self.policy.attempts, true, || self.inner.current_version(path)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;

    const UP: u8 = 0;
    const DOWN: u8 = 1;
    const HANGS: u8 = 2;

    /// A backend whose reads succeed, fail or never answer, as the test sets (the
    /// breaker's own logic under test; the adapters are tested against real upstreams).
    #[derive(Debug, Default)]
    struct Switch(AtomicU8, AtomicU8);

    #[async_trait]
    impl SecretBackend for Switch {
        fn kind(&self) -> &'static str {
            "switch"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                versions: false,
                version_ids: false,
                version_stages: false,
                writes: false,
                deletes: false,
                list: false,
            }
        }
        async fn read(&self, _: &str, _: &Version) -> Result<SecretValue, BackendError> {
            match self.0.load(Ordering::Relaxed) {
                UP => Ok(SecretValue {
                    data: SecretData::from_fields([("v", "1")]),
                    version: None,
                    version_id: None,
                    created_time: None,
                }),
                DOWN => Err(BackendError::Unavailable("down".into())),
                _ => std::future::pending().await,
            }
        }
        async fn write(&self, _: &str, _: &SecretData, _: Option<u64>) -> Result<Option<u64>, BackendError> {
            Err(BackendError::Unsupported("write"))
        }
        /// The second switch: lists succeed, or time out (as a walk over a large
        /// account's pages can, every time).
        async fn list(&self, _: &str) -> Result<Vec<String>, BackendError> {
            match self.1.load(Ordering::Relaxed) {
                UP => Ok(Vec::new()),
                _ => Err(BackendError::Unavailable("no answer within 5s".into())),
            }
        }
        async fn delete(&self, _: &str) -> Result<(), BackendError> {
            Err(BackendError::Unsupported("delete"))
        }
    }

    /// The probe of an open breaker whose caller hangs up (the call is dropped before it
    /// has an outcome) must not leave the breaker refusing every call for good: the next
    /// call probes, and finds the upstream back.
    #[tokio::test]
    async fn a_probe_dropped_half_way_lets_the_next_call_probe() {
        let policy = Policy {
            timeout: Duration::from_secs(60),
            attempts: 1,
            breaker_failures: 1,
            breaker_cooldown: Duration::from_millis(20),
            ..Policy::default()
        };
        let r = Resilient::new(Switch::default(), policy);
        r.inner().0.store(DOWN, Ordering::Relaxed);
        assert!(r.read("a", &Version::Latest).await.is_err());
        let refused = r.read("a", &Version::Latest).await;
        assert!(matches!(&refused, Err(BackendError::Unavailable(m)) if m.contains("circuit open")), "{refused:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
        // The probe: the upstream does not answer, and its caller gives up.
        r.inner().0.store(HANGS, Ordering::Relaxed);
        let gave_up = tokio::time::timeout(Duration::from_millis(50), r.read("a", &Version::Latest)).await;
        assert!(gave_up.is_err(), "the probe was still waiting");
        r.inner().0.store(UP, Ordering::Relaxed);
        let back = r.read("a", &Version::Latest).await;
        assert_eq!(back.unwrap().data.field("v").unwrap().as_str(), "1");
        // Closed again: calls go through.
        assert!(r.read("a", &Version::Latest).await.is_ok());
    }

    /// A caller who may only list cannot open the circuit for everyone: listings that
    /// fail (a walk over a large account that takes longer than the timeout, every time)
    /// do not count towards the breaker, and reads go on.
    #[tokio::test]
    async fn failing_listings_do_not_open_the_circuit() {
        let policy = Policy {
            attempts: 1,
            breaker_failures: 2,
            breaker_cooldown: Duration::from_millis(50),
            ..Policy::default()
        };
        let r = Resilient::new(Switch::default(), policy);
        r.inner().1.store(DOWN, Ordering::Relaxed);
        for _ in 0..10 {
            assert!(matches!(r.list("").await, Err(BackendError::Unavailable(_))));
        }
        assert!(r.read("a", &Version::Latest).await.is_ok(), "the circuit opened");
        // Reads that fail still open it, and a listing cannot close it either.
        r.inner().0.store(DOWN, Ordering::Relaxed);
        assert!(r.read("a", &Version::Latest).await.is_err());
        assert!(r.read("a", &Version::Latest).await.is_err());
        r.inner().0.store(UP, Ordering::Relaxed);
        let refused = r.read("a", &Version::Latest).await;
        assert!(matches!(&refused, Err(BackendError::Unavailable(m)) if m.contains("circuit open")), "{refused:?}");
        r.inner().1.store(UP, Ordering::Relaxed);
        let listed = r.list("").await;
        assert!(matches!(&listed, Err(BackendError::Unavailable(m)) if m.contains("circuit open")), "{listed:?}");
        // Past the cooldown a listing is still not the probe (a long walk would hold
        // every other call off): refused, and the next read probes and closes it.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let listed = r.list("").await;
        assert!(matches!(&listed, Err(BackendError::Unavailable(m)) if m.contains("circuit open")), "{listed:?}");
        assert!(r.read("a", &Version::Latest).await.is_ok());
        assert!(r.list("").await.is_ok());
    }
}
