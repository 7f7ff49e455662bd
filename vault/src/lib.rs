//! KeyVault: an embedded secret vault and HSM-backed key service.
//!
//! The crate is organised by domain (DESIGN §3): [`store`] (storage engines), [`keys`]
//! (the key hierarchy), [`barrier`] (envelope encryption), [`secrets`] (the versioned
//! secret store), [`policy`], [`token`] and [`auth`] (identity), [`http`] (the API over
//! TLS), and [`vault`], which ties them together and is what handlers, tests and
//! benchmarks call. Only `keyvault-hsm` touches PKCS#11.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod barrier;
pub mod bench;
pub mod client;
pub mod config;
pub mod dev;
pub mod error;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod policy;
pub mod rotation;
pub mod secrets;
pub mod store;
pub mod tls;
pub mod token;
pub mod transit;
pub mod vault;

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
