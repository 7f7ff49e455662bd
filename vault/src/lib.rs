//! KeyVault: an embedded secret vault and HSM-backed key service.
//!
//! The crate is organised in layers (docs/architecture.md): the domain — [`store`]
//! (storage engines), [`keys`] (the key hierarchy), [`barrier`] (envelope encryption),
//! [`secrets`], [`transit`], [`gateway`], [`policy`], [`token`], [`auth`] (identity),
//! [`audit`], [`rotation`]; the logical layer — [`logical`] (requests, routes, the
//! [`Engine`](logical::Engine) trait, the mount table) and [`engines`]; the [`service`],
//! built from a configuration by one builder, whose pipeline every request goes through;
//! and [`http`], the adapter that serves it over TLS. Only `keyvault-hsm` touches
//! PKCS#11; the wire types are in `keyvault-api`.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod barrier;
pub mod config;
pub mod engines;
pub mod error;
pub mod gateway;
pub mod http;
pub mod json;
pub mod keys;
pub mod logical;
pub mod policy;
pub mod ratelog;
pub mod rotation;
pub mod secrets;
pub mod service;
pub mod shared;
pub mod store;
pub mod tls;
pub mod token;
pub mod transit;
pub mod usage;
pub mod wrapping;

use std::sync::Arc;

use keyvault_hsm::KeyStore;

pub use error::{Error, Result};

/// Run a blocking key store call on tokio's blocking pool (a PKCS#11 call can take from
/// microseconds on SoftHSM to milliseconds on a network HSM; it must not stall a worker).
pub async fn hsm_call<T, F>(keys: &Arc<dyn KeyStore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn KeyStore) -> keyvault_hsm::Result<T> + Send + 'static,
{
    let keys = keys.clone();
    tokio::task::spawn_blocking(move || f(keys.as_ref()))
        .await
        .map_err(|e| Error::Internal(format!("key store task failed: {e}")))?
        .map_err(Error::Hsm)
}

/// How much lower background work runs than requests (`nice` units).
const BACKGROUND_NICE: i32 = 10;

/// [`hsm_call`] for background work (re-wrapping during a rotation): on a thread of its
/// own with a lower scheduling priority, so that on a busy machine requests are served
/// first and the background work takes the idle time (at full speed when there is any).
pub async fn hsm_call_background<T, F>(keys: &Arc<dyn KeyStore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn KeyStore) -> keyvault_hsm::Result<T> + Send + 'static,
{
    let keys = keys.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keyvault-background".into())
        .spawn(move || {
            // Best effort: where it is refused, the thread keeps the normal priority.
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE);
            let _ = tx.send(f(keys.as_ref()));
        })
        .map_err(|e| Error::Internal(format!("starting a background thread: {e}")))?;
    rx.await.map_err(|_| Error::Internal("background key store thread failed".into()))?.map_err(Error::Hsm)
}

/// A duration in a configuration file: `"30s"`, `"10m"`, `"1h 30m"`.
pub(crate) fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    use serde::Deserialize;
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Names of roles, users and policies: 1-128 characters of `[A-Za-z0-9._-]`, so they are
/// safe in storage keys, policy paths and log lines.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("invalid {kind} name: use 1-128 characters of [A-Za-z0-9._-]")))
    }
}
