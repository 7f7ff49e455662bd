//! Log lines that an outage would repeat many times a second (accept errors, a failing
//! disk) are written at most once a second, with how many were suppressed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One kind of repeated warning.
#[derive(Debug)]
pub struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    pub const fn new() -> Self {
        RateLimitedLog { last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(suppressed since the last line)` if a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    pub fn warn(&self, what: &str, detail: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.allow() {
            tracing::warn!(detail = %detail, suppressed, "{what}");
        }
    }

    pub fn error(&self, what: &str, detail: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.allow() {
            tracing::error!(detail = %detail, suppressed, "{what}");
        }
    }
}
