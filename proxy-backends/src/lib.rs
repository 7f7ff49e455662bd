//! Secret backends that KeyVault serves through its own API: a mount of type `hashicorp`
//! (and, to come, `aws` and `azure`) is an engine over a [`SecretBackend`]. Units keep
//! their KeyVault tokens, mutual TLS, policies and API; KeyVault holds the upstream
//! credentials and never passes them on.
//!
//! - [`SecretBackend`]: read a path (optionally a version), write, list, delete, and what
//!   the backend can do ([`Capabilities`]).
//! - One adapter per upstream, behind a cargo feature: [`hashicorp`] (Vault and OpenBao,
//!   KV version 1 and 2).
//! - Behaviour common to every adapter, as wrappers that are themselves backends:
//!   [`resilience::Resilient`] (bounded retries with backoff and jitter, a timeout per
//!   call, a circuit breaker) and [`cache::Cached`] (a bounded read cache, zeroized on
//!   eviction, negative entries, `stale_if_error`).
//! - [`conformance`] (feature `conformance`): the suite every adapter passes.

use std::fmt;

use async_trait::async_trait;
use zeroize::Zeroizing;

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod cache;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "hashicorp")]
pub mod hashicorp;
#[cfg(any(feature = "hashicorp", feature = "aws", feature = "azure"))]
mod http;
pub mod resilience;

/// A secret's fields: the text of one JSON object, zeroized on drop, never shown by
/// `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretData(Zeroizing<Vec<u8>>);

impl SecretData {
    /// The JSON text of an object (anything else is [`BackendError::Invalid`]).
    pub fn from_json(text: Zeroizing<Vec<u8>>) -> Result<Self, BackendError> {
        let ok = serde_json::from_slice::<&serde_json::value::RawValue>(&text)
            .is_ok_and(|raw| raw.get().trim_start().starts_with('{'));
        if !ok {
            return Err(BackendError::Invalid("a secret is a JSON object of fields".into()));
        }
        Ok(SecretData(text))
    }

    /// A secret of string fields.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let map: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned()))).collect();
        // Invariant: a map of strings always serializes.
        SecretData(Zeroizing::new(serde_json::to_vec(&map).expect("a JSON map serializes")))
    }

    /// A value kept as one string upstream (AWS `SecretString`, an Azure secret): a JSON
    /// object's fields, else `{"value": <string>}`.
    pub fn from_text(text: &str) -> Self {
        if text.trim_start().starts_with('{')
            && let Ok(d) = SecretData::from_json(Zeroizing::new(text.as_bytes().to_vec()))
        {
            return d;
        }
        SecretData::from_fields([("value", text)])
    }

    /// The inverse of [`SecretData::from_text`]: a lone `value` string as itself, any
    /// other object as its JSON text.
    pub fn to_text(&self) -> Result<Zeroizing<String>, BackendError> {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&self.0).map_err(|_| BackendError::Invalid("a secret is a JSON object".into()))?;
        if map.len() == 1
            && let Some(serde_json::Value::String(v)) = map.get("value")
        {
            return Ok(Zeroizing::new(v.clone()));
        }
        String::from_utf8(self.0.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| BackendError::Invalid("a secret is UTF-8 JSON".into()))
    }

    /// The JSON text, handed over (still zeroized on drop).
    pub fn into_json(self) -> Zeroizing<Vec<u8>> {
        self.0
    }

    /// The JSON text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// One string field, if present and a string.
    pub fn field(&self, name: &str) -> Option<Zeroizing<String>> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&self.0).ok()?;
        map.get(name).and_then(|v| v.as_str()).map(|s| Zeroizing::new(s.to_owned()))
    }

    /// Bytes held (for cache bounds).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretData([redacted, {} bytes])", self.0.len())
    }
}

/// A secret as read: its fields and, where the backend keeps versions, which one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretValue {
    pub data: SecretData,
    pub version: Option<u64>,
    /// The upstream's own id of the version read, where it has one.
    pub version_id: Option<String>,
    /// RFC 3339, when the backend says.
    pub created_time: Option<String>,
}

/// Which version of a secret to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Version {
    #[default]
    Latest,
    /// KV version 2's numbered versions (`?version=N`).
    Number(u64),
    /// An upstream's own version id (AWS `VersionId`, Azure's version).
    Id(String),
    /// A staging label (AWS `VersionStage`, e.g. `AWSPREVIOUS`).
    Stage(String),
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Reads of older versions by number (`?version=N`).
    pub versions: bool,
    /// Reads by the upstream's version id (`?version_id=`) or stage (`?version_stage=`).
    pub version_ids: bool,
    pub version_stages: bool,
    pub writes: bool,
    pub deletes: bool,
    pub list: bool,
}

/// Why a backend call failed. Messages summarize the upstream's answer and never carry
/// its credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("not found")]
    NotFound,
    /// The upstream refused KeyVault's credentials or policy for this path.
    #[error("the upstream refused: {0}")]
    Denied(String),
    #[error("{0}")]
    Invalid(String),
    /// A concurrent change won (a check-and-set upstream).
    #[error("{0}")]
    Conflict(String),
    /// Down, timed out, overloaded, or its circuit is open: retry later.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    #[error("this backend does not support {0}")]
    Unsupported(&'static str),
}

impl BackendError {
    /// Worth retrying (the upstream may answer later).
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unavailable(_))
    }
}

/// A store of secrets behind KeyVault's API. Paths are relative to the mount, validated
/// by KeyVault (no empty, `.` or `..` segment) before they get here.
#[async_trait]
pub trait SecretBackend: Send + Sync + fmt::Debug {
    /// `hashicorp`, `aws`, `azure`, ...
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// The latest version, or another one.
    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError>;

    /// Store a new value (a new version where the backend keeps versions). `expected`:
    /// the version the caller read (a check-and-set where the backend can; `Some(0)`:
    /// only if there is none).
    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError>;

    /// Names under `prefix` (`""` for the top): `name` for a secret, `name/` for a folder.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;

    /// Delete the secret (its latest version where versions are kept, as `secret/` does).
    async fn delete(&self, path: &str) -> Result<(), BackendError>;

    /// Whether the secret exists for a write, and at which version (`0` where the
    /// backend keeps none): what the create-or-update check and the check-and-set of an
    /// update need. By default: its latest version can be read. A backend whose deleted
    /// latest version still has a version number (Vault's KV version 2) says so.
    async fn current_version(&self, path: &str) -> Result<Option<u64>, BackendError> {
        current_version_by_read(self, path).await
    }
}

/// [`SecretBackend::current_version`] as most backends answer it: the version of the
/// latest value, if it can be read (`0` where the backend keeps none).
pub(crate) async fn current_version_by_read<B: SecretBackend + ?Sized>(
    backend: &B,
    path: &str,
) -> Result<Option<u64>, BackendError> {
    match backend.read(path, &Version::Latest).await {
        Ok(v) => Ok(Some(v.version.unwrap_or(0))),
        Err(BackendError::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An adapter chosen at run time (from a mount's `type`) is a backend too, so that one
/// stack of layers serves every kind.
#[async_trait]
impl SecretBackend for std::sync::Arc<dyn SecretBackend> {
    fn kind(&self) -> &'static str {
        self.as_ref().kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.as_ref().capabilities()
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        self.as_ref().read(path, version).await
    }

    async fn write(&self, path: &str, data: &SecretData, expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        self.as_ref().write(path, data, expected).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.as_ref().list(prefix).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.as_ref().delete(path).await
    }

    async fn current_version(&self, path: &str) -> Result<Option<u64>, BackendError> {
        self.as_ref().current_version(path).await
    }
}

/// Uniform random in `0..=max` from the OS's generator (jitter).
pub(crate) fn jitter(max: std::time::Duration) -> std::time::Duration {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return max / 2;
    }
    let r = u64::from_le_bytes(b);
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    std::time::Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
}

/// The longest lease or token lifetime taken from an upstream: a longer one (a number
/// near `u64::MAX` in a reply) is taken as this, so the timing made from it never
/// overflows.
pub(crate) const MAX_UPSTREAM_LIFE: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);

/// A lifetime in seconds as an upstream gave it, at most [`MAX_UPSTREAM_LIFE`].
pub(crate) fn upstream_life(secs: u64) -> std::time::Duration {
    std::time::Duration::from_secs(secs).min(MAX_UPSTREAM_LIFE)
}

/// RFC 3339 of a Unix time an upstream gave (seconds), or `None` for one that is no such
/// time this can write: negative, not a number, or past the year 9999.
pub(crate) fn rfc3339_of_unix(secs: f64) -> Option<String> {
    if !(0.0..=253_402_300_799.0).contains(&secs) {
        return None;
    }
    let t = std::time::UNIX_EPOCH.checked_add(std::time::Duration::try_from_secs_f64(secs).ok()?)?;
    Some(humantime::format_rfc3339_seconds(t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers an upstream may send that are no time or no lifetime: no panic, no time made up.
    #[test]
    fn odd_upstream_times_and_lifetimes_are_bounded() {
        assert_eq!(rfc3339_of_unix(0.0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339_of_unix(1_700_000_000.5).as_deref(), Some("2023-11-14T22:13:20Z"));
        for odd in [-1.0, f64::NAN, f64::INFINITY, 1e300, 253_402_300_800.0, u64::MAX as f64] {
            assert_eq!(rfc3339_of_unix(odd), None, "{odd}");
        }
        assert_eq!(upstream_life(u64::MAX), MAX_UPSTREAM_LIFE);
        assert_eq!(upstream_life(60), std::time::Duration::from_secs(60));
        // What the adapters compute from a lifetime.
        let _ = std::time::Instant::now() + upstream_life(u64::MAX) * 2 / 3;
    }

    #[test]
    fn secret_data_is_an_object_and_never_shown() {
        assert!(SecretData::from_json(Zeroizing::new(b"[1]".to_vec())).is_err());
        assert!(SecretData::from_json(Zeroizing::new(b"\"x\"".to_vec())).is_err());
        let d = SecretData::from_json(Zeroizing::new(br#"{"password":"hunter2"}"#.to_vec())).unwrap();
        assert_eq!(d.field("password").unwrap().as_str(), "hunter2");
        assert!(!format!("{d:?}").contains("hunter2"));
        let v = SecretValue { data: d, version: Some(1), version_id: None, created_time: None };
        assert!(!format!("{v:?}").contains("hunter2"));
    }

    #[test]
    fn jitter_stays_in_range() {
        let max = std::time::Duration::from_millis(10);
        for _ in 0..100 {
            assert!(jitter(max) <= max);
        }
    }
}
