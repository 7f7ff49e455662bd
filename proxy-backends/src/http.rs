//! What the HTTP adapters share: one way to build their client, one way to summarize a
//! transport failure.

use std::path::Path;
use std::time::Duration;

use crate::BackendError;

/// A client with bounded connect and request times, no redirects (a redirect could carry
/// a credential elsewhere), and, with `ca_file`, only those CA certificates trusted.
pub(crate) fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, BackendError> {
    let invalid = BackendError::Invalid;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| invalid(format!("ca_file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(invalid(format!("ca_file {}: no certificate", ca.display())));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| invalid(format!("HTTP client: {e}")))
}

/// A transport failure, summarized (never with headers or bodies).
pub(crate) fn transport_error(e: &reqwest::Error, what: &str) -> BackendError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    BackendError::Unavailable(format!("{what}: {kind}"))
}
