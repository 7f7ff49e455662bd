//! Brute-force protection of logins.
//!
//! Failed logins are counted per (identity, source) and per source in a fixed window;
//! past a threshold, logins from there answer 429 with `Retry-After` without looking at
//! the credentials. The identity is the normalized role, user, role id or a digest of
//! the bootstrap token presented; the source is the client's address (an IPv6 address by
//! its /64, which one host usually owns whole). Counting per (identity, source) rather than
//! per identity means an attacker cannot lock a legitimate unit out of its role from
//! another address, nor lock out any other role.
//!
//! The check and the count are one step: an attempt *reserves* its place before any
//! credential is looked at (failures plus attempts in flight never exceed the limit), and
//! gives it back only if it succeeds. So 300 wrong passwords sent at once get 5 answers
//! of 401 and 295 of 429, not 300 guesses. An attempt that would exceed the limit only
//! because others are still in flight waits for them (briefly) instead of failing, so a
//! fleet logging in at once from behind one NAT address is slowed, not refused.
//!
//! Bounds (docs/threat-model.md): keys are SHA-256 digests truncated to 16 bytes,
//! whatever the client sent; at most [`MAX_ENTRIES`] counters, expired ones removed by
//! a timer; when the table is full, attempts that need a new counter are refused (429)
//! rather than evicting someone's count. Counters live in this process's memory (each
//! replica counts on its own).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Thresholds (`[auth.rate_limit]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Failed logins allowed per identity and source address in one window.
    #[serde(default = "default_per_role")]
    pub failures_per_role_and_address: u32,
    /// Failed logins allowed per source address (all identities) in one window.
    #[serde(default = "default_per_address")]
    pub failures_per_address: u32,
    /// The window.
    #[serde(default = "default_window", deserialize_with = "crate::deserialize_duration")]
    pub window: Duration,
}

fn default_per_role() -> u32 {
    5
}
fn default_per_address() -> u32 {
    20
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            failures_per_role_and_address: default_per_role(),
            failures_per_address: default_per_address(),
            window: default_window(),
        }
    }
}

/// The most counters held at once (about 64 bytes each).
pub const MAX_ENTRIES: usize = 100_000;
/// How long an attempt waits for attempts in flight before it is refused.
const MAX_WAIT: Duration = Duration::from_secs(5);

type Key = [u8; 16];

#[derive(Debug)]
struct Counter {
    start: Instant,
    failures: u32,
    in_flight: u32,
}

#[derive(Debug)]
struct Inner {
    config: LimitConfig,
    counters: Mutex<HashMap<Key, Counter>>,
    /// Woken whenever an attempt finishes.
    finished: tokio::sync::Notify,
}

#[derive(Debug, Clone)]
pub struct FailureLimiter {
    inner: Arc<Inner>,
}

/// The identity part of a limiter key, normalized: surrounding white space removed and
/// ASCII letters in lower case (names are ASCII by the common name rule; anything else
/// is refused before it could log in, and still counted under its digest).
pub fn normalize(identity: &str) -> String {
    identity.trim().to_ascii_lowercase()
}

/// Where a request comes from, for limits per source: an IPv4 address, or the /64 of an
/// IPv6 address (one host usually owns a whole /64).
pub fn source(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_ipv6_mapped().octets(),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                o
            }
        },
    }
}

fn digest(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&full[..16]);
    k
}

/// One attempt's place in its counters. Dropped without [`Reservation::succeeded`] or
/// [`Reservation::not_counted`], it counts as a failure (a cancelled or crashed attempt
/// is not a free one).
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    keys: Vec<Key>,
    counted: bool,
}

impl Reservation {
    /// The credentials were right: the attempt does not count.
    pub fn succeeded(mut self) {
        self.counted = false;
    }

    /// The attempt never got to the credentials (malformed request, storage down):
    /// it does not count either.
    pub fn not_counted(mut self) {
        self.counted = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut map = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            if let Some(c) = map.get_mut(k) {
                c.in_flight = c.in_flight.saturating_sub(1);
                if self.counted {
                    c.failures = c.failures.saturating_add(1);
                }
                // A counter that holds nothing is not kept: attempts that do not count
                // (a malformed body, a success) leave no entry behind, so the table is
                // filled only by failures, which the per-source limit bounds.
                if c.failures == 0 && c.in_flight == 0 {
                    map.remove(k);
                }
            }
        }
        drop(map);
        self.inner.finished.notify_waiters();
    }
}

enum Decision {
    Go,
    Wait,
    Refuse(u64),
}

impl FailureLimiter {
    pub fn new(config: LimitConfig) -> Self {
        FailureLimiter {
            inner: Arc::new(Inner {
                config,
                counters: Mutex::new(HashMap::new()),
                finished: tokio::sync::Notify::new(),
            }),
        }
    }

    fn keys(method: &str, identity: Option<&str>, addr: IpAddr) -> Vec<(Key, bool)> {
        let src = source(addr);
        let mut keys = vec![(digest(&[b"a", &src]), false)];
        if let Some(id) = identity {
            let id = normalize(id);
            keys.push((digest(&[b"r", method.as_bytes(), id.as_bytes(), &src]), true));
        }
        keys
    }

    fn decide(&self, keys: &[(Key, bool)], now: Instant) -> Decision {
        let c = &self.inner.config;
        let mut map = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        let new_keys = keys.iter().filter(|(k, _)| !map.contains_key(k)).count();
        if map.len() + new_keys > MAX_ENTRIES {
            let window = c.window;
            map.retain(|_, v| v.in_flight > 0 || (v.failures > 0 && now.duration_since(v.start) < window));
            if map.len() + new_keys > MAX_ENTRIES {
                tracing::warn!(entries = map.len(), "login rate limiter table full; refusing new sources");
                return Decision::Refuse(c.window.as_secs().max(1));
            }
        }
        // Counters are only read here: an attempt that waits or is refused leaves no
        // entry behind (a source could otherwise fill the table with empty counters, one
        // per identity it names, while a few of its attempts are held in flight).
        let mut wait = false;
        for (key, per_identity) in keys {
            let limit = if *per_identity { c.failures_per_role_and_address } else { c.failures_per_address };
            let Some(counter) = map.get(key) else { continue };
            let in_window = now.duration_since(counter.start) < c.window;
            let failures = if in_window { counter.failures } else { 0 };
            if failures >= limit {
                let retry = c.window.saturating_sub(now.duration_since(counter.start));
                return Decision::Refuse(retry.as_secs().max(1));
            }
            if failures + counter.in_flight >= limit {
                wait = true;
            }
        }
        if wait {
            return Decision::Wait;
        }
        for (key, _) in keys {
            let counter = map.entry(*key).or_insert(Counter { start: now, failures: 0, in_flight: 0 });
            if now.duration_since(counter.start) >= c.window {
                counter.start = now;
                counter.failures = 0;
            }
            counter.in_flight += 1;
        }
        Decision::Go
    }

    /// Take a place for one login attempt by `identity` (none known yet: the source
    /// only) of `method` from `addr`: 429 if failures already reached a limit, a short
    /// wait if attempts in flight might still reach it.
    pub async fn reserve(&self, method: &str, identity: Option<&str>, addr: IpAddr) -> Result<Reservation> {
        let keys = Self::keys(method, identity, addr);
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        loop {
            let finished = self.inner.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            match self.decide(&keys, Instant::now()) {
                Decision::Go => {
                    return Ok(Reservation {
                        inner: self.inner.clone(),
                        keys: keys.into_iter().map(|(k, _)| k).collect(),
                        counted: true,
                    });
                }
                Decision::Refuse(retry_after_secs) => return Err(Error::RateLimited { retry_after_secs }),
                Decision::Wait => {
                    if tokio::time::timeout_at(deadline, finished).await.is_err() {
                        return Err(Error::RateLimited { retry_after_secs: 1 });
                    }
                }
            }
        }
    }

    /// Refuse at once if the source alone is at its limit (before a body is read).
    pub fn check_source(&self, addr: IpAddr) -> Result<()> {
        let key = digest(&[b"a", &source(addr)]);
        let c = &self.inner.config;
        let now = Instant::now();
        let map = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = map.get(&key)
            && now.duration_since(counter.start) < c.window
            && counter.failures >= c.failures_per_address
        {
            let retry = c.window.saturating_sub(now.duration_since(counter.start));
            return Err(Error::RateLimited { retry_after_secs: retry.as_secs().max(1) });
        }
        Ok(())
    }

    /// Remove counters whose window has passed (called by a timer).
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let window = self.inner.config.window;
        let mut map = self.inner.counters.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, v| v.in_flight > 0 || (v.failures > 0 && now.duration_since(v.start) < window));
        before - map.len()
    }

    /// Counters held now.
    pub fn len(&self) -> usize {
        self.inner.counters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn window(&self) -> Duration {
        self.inner.config.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_role: u32, per_addr: u32) -> FailureLimiter {
        FailureLimiter::new(LimitConfig {
            failures_per_role_and_address: per_role,
            failures_per_address: per_addr,
            window: Duration::from_secs(60),
        })
    }

    #[tokio::test]
    async fn limits_per_role_and_address_do_not_spill_over() {
        let l = limiter(3, 5);
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let unit: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..3 {
            drop(l.reserve("approle", Some("web"), attacker).await.unwrap());
        }
        assert!(matches!(l.reserve("approle", Some("web"), attacker).await, Err(Error::RateLimited { .. })));
        // The legitimate unit of the same role, from its own address, is not locked out.
        l.reserve("approle", Some("web"), unit).await.unwrap().succeeded();
        // Nor is another role from the attacker's address, until the per-address limit.
        drop(l.reserve("approle", Some("batch"), attacker).await.unwrap());
        drop(l.reserve("approle", Some("batch"), attacker).await.unwrap());
        assert!(matches!(l.reserve("approle", Some("other"), attacker).await, Err(Error::RateLimited { .. })));
        assert!(l.check_source(attacker).is_err());
        l.reserve("approle", Some("other"), unit).await.unwrap().succeeded();
    }

    #[tokio::test]
    async fn successes_do_not_count_and_variants_of_a_name_share_a_counter() {
        let l = limiter(2, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10 {
            l.reserve("userpass", Some("alice"), a).await.unwrap().succeeded();
        }
        drop(l.reserve("userpass", Some("Alice"), a).await.unwrap());
        drop(l.reserve("userpass", Some(" alice "), a).await.unwrap());
        assert!(l.reserve("userpass", Some("ALICE"), a).await.is_err());
        assert!(l.reserve("userpass", Some("alice"), a).await.is_err());
    }

    #[tokio::test]
    async fn ipv6_addresses_of_one_64_share_a_counter() {
        let l = limiter(1, 100);
        drop(l.reserve("approle", Some("r"), "2001:db8::1".parse().unwrap()).await.unwrap());
        assert!(l.reserve("approle", Some("r"), "2001:db8::ffff:2".parse().unwrap()).await.is_err());
        l.reserve("approle", Some("r"), "2001:db8:0:1::1".parse().unwrap()).await.unwrap().succeeded();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_attempts_never_exceed_the_limit() {
        let l = limiter(5, 20);
        let a: IpAddr = "10.0.0.9".parse().unwrap();
        let mut tasks = Vec::new();
        for _ in 0..300 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                match l.reserve("userpass", Some("alice"), a).await {
                    Ok(r) => {
                        // The credential check takes a while; then it fails.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        drop(r);
                        true
                    }
                    Err(_) => false,
                }
            }));
        }
        let mut tried = 0;
        for t in tasks {
            tried += u32::from(t.await.unwrap());
        }
        assert_eq!(tried, 5, "exactly the limit got to try");
    }

    /// Attempts that do not count (a malformed login body, a success) leave no counter:
    /// one address cannot fill the table with identities it never failed as.
    #[tokio::test]
    async fn attempts_that_do_not_count_leave_no_counter() {
        let l = limiter(5, 10);
        let a: IpAddr = "10.0.0.3".parse().unwrap();
        for i in 0..(MAX_ENTRIES + 10) {
            let r = l.reserve("approle", Some(&format!("role-{i}")), a).await.unwrap();
            if i.is_multiple_of(2) { r.not_counted() } else { r.succeeded() }
        }
        assert!(l.is_empty(), "{} counters left", l.len());
        // Failures still count, and only they stay.
        drop(l.reserve("approle", Some("x"), a).await.unwrap());
        assert_eq!(l.len(), 2);
        l.reserve("approle", Some("y"), a).await.unwrap().not_counted();
        assert_eq!(l.len(), 2);
    }

    /// Attempts that wait (the source's limit is taken by attempts in flight) leave no
    /// counter either: one source naming a new identity on each attempt while holding a
    /// few in flight could otherwise fill the table with empty counters, and every new
    /// source's login would then be refused.
    #[tokio::test]
    async fn waiting_attempts_leave_no_counter() {
        let l = limiter(5, 2);
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let held =
            [l.reserve("userpass", Some("u"), a).await.unwrap(), l.reserve("userpass", Some("v"), a).await.unwrap()];
        assert_eq!(l.len(), 3);
        for i in 0..1000 {
            let role = format!("r{i}");
            let wait = tokio::time::timeout(Duration::from_millis(1), l.reserve("approle", Some(&role), a));
            assert!(wait.await.is_err(), "attempt {i} went ahead of the two in flight");
        }
        assert_eq!(l.len(), 3, "the waiting attempts left counters");
        for r in held {
            r.succeeded();
        }
        assert!(l.is_empty(), "{} counters left", l.len());
        // A purge keeps failures and drops nothing else it should keep.
        drop(l.reserve("approle", Some("x"), a).await.unwrap());
        assert_eq!((l.purge(), l.len()), (0, 2));
    }

    #[tokio::test]
    async fn long_keys_are_digests_and_the_table_is_bounded_and_purged() {
        let l = FailureLimiter::new(LimitConfig {
            failures_per_role_and_address: 5,
            failures_per_address: 1_000_000,
            window: Duration::from_millis(1),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let big = "x".repeat(1 << 20);
        drop(l.reserve("approle", Some(&big), a).await.unwrap());
        assert_eq!(l.len(), 2);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.purge(), 2);
        assert!(l.is_empty());
    }
}
