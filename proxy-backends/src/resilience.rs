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

    /// Let a call through, or refuse it at once while the breaker is open.
    fn admit(&self) -> Result<(), BackendError> {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            Some(until) if Instant::now() < until => Err(open_error(&b, until)),
            Some(until) if b.probing => Err(open_error(&b, until)),
            Some(_) => {
                b.probing = true;
                Ok(())
            }
            None => Ok(()),
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

    async fn call<T, F, Fut>(&self, attempts: u32, f: F) -> Result<T, BackendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        self.admit()?;
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
        self.record(matches!(&result, Err(e) if e.is_transient()));
        result
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
        self.call(self.policy.attempts, || self.inner.read(path, version)).await
    }

    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        self.call(1, || self.inner.write(path, data, expected)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.call(self.policy.attempts, || self.inner.list(prefix)).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.call(self.policy.attempts, || self.inner.delete(path)).await
    }
}
