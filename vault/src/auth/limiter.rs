//! Brute-force protection: failed logins are counted per (role, source address) and per
//! source address in a fixed window; past a threshold, logins from there answer 429 with
//! `Retry-After` without checking the credentials. Counting per (role, address) rather than
//! per role means an attacker cannot lock a legitimate unit out of its role from another
//! address, nor lock out any other role. Counters live in this process's memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Thresholds (`[auth.rate_limit]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Failed logins allowed per role and source address in one window.
    #[serde(default = "default_per_role")]
    pub failures_per_role_and_address: u32,
    /// Failed logins allowed per source address (all roles) in one window.
    #[serde(default = "default_per_address")]
    pub failures_per_address: u32,
    /// The window.
    #[serde(default = "default_window", deserialize_with = "crate::config::duration")]
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

#[derive(Debug)]
pub struct FailureLimiter {
    config: LimitConfig,
    counters: Mutex<HashMap<String, (Instant, u32)>>,
}

const MAX_ENTRIES: usize = 100_000;

impl FailureLimiter {
    pub fn new(config: LimitConfig) -> Self {
        FailureLimiter { config, counters: Mutex::new(HashMap::new()) }
    }

    fn keys(role: &str, addr: IpAddr) -> [(String, bool); 2] {
        [(format!("r:{role}@{addr}"), true), (format!("a:{addr}"), false)]
    }

    /// Refuse with 429 if either counter is at its threshold.
    pub fn check(&self, role: &str, addr: IpAddr) -> Result<()> {
        let now = Instant::now();
        let map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for (key, per_role) in Self::keys(role, addr) {
            let limit =
                if per_role { self.config.failures_per_role_and_address } else { self.config.failures_per_address };
            if let Some((start, count)) = map.get(&key)
                && now.duration_since(*start) < self.config.window
                && *count >= limit
            {
                let retry = self.config.window.saturating_sub(now.duration_since(*start));
                return Err(Error::TooManyRequests { retry_after_secs: retry.as_secs().max(1) });
            }
        }
        Ok(())
    }

    pub fn record_failure(&self, role: &str, addr: IpAddr) {
        let now = Instant::now();
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_ENTRIES {
            let window = self.config.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        for (key, _) in Self::keys(role, addr) {
            let entry = map.entry(key).or_insert((now, 0));
            if now.duration_since(entry.0) >= self.config.window {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_role_and_address_do_not_spill_over() {
        let l = FailureLimiter::new(LimitConfig {
            failures_per_role_and_address: 3,
            failures_per_address: 5,
            window: Duration::from_secs(60),
        });
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let unit: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..3 {
            l.check("web", attacker).unwrap();
            l.record_failure("web", attacker);
        }
        assert!(matches!(l.check("web", attacker), Err(Error::TooManyRequests { .. })));
        // The legitimate unit of the same role, from its own address, is not locked out.
        l.check("web", unit).unwrap();
        // Nor is another role from the attacker's address, until the per-address limit.
        l.check("batch", attacker).unwrap();
        l.record_failure("batch", attacker);
        l.record_failure("batch", attacker);
        assert!(matches!(l.check("other", attacker), Err(Error::TooManyRequests { .. })));
        l.check("other", unit).unwrap();
    }
}
