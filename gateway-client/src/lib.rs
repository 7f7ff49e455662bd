//! `keyvault-client`: the Rust client of KeyVault for units, gateways and producers.
//!
//! - [`Client`]: a builder (address, CA, client certificate, timeouts, an [`Auth`] method;
//!   or the same environment variables as Vault's tools), lazy login, the token in memory
//!   only and renewed in the background, retries with backoff on 429, 503 and connection
//!   errors.
//! - Secrets ([`Client::secret`], [`Client::secret_json`], [`Client::fetch_all`],
//!   [`Client::put`], [`Client::list`], [`Client::delete`]) on KV version 1 and 2 mounts.
//! - Key operations: typed transit calls and batches, and envelope encryption of large
//!   payloads ([`Client::seal_envelope`], format in [`envelope`]).
//! - [`gateway::VerifyLayer`]: a `tower` layer that checks signed requests through KeyVault;
//!   [`producer::Signer`]: signs outgoing requests (local key or transit).
//! - [`offline::TokenVerifier`]: verifies KeyVault tokens without a round trip.
//!
//! A unit's start-up:
//!
//! ```no_run
//! # async fn start() -> keyvault_client::Result<()> {
//! use keyvault_client::{Auth, Client};
//! use secrecy::ExposeSecret;
//!
//! let client = Client::builder()
//!     .address("https://keyvault.internal:8200")
//!     .ca_file("/etc/keyvault/ca.pem")
//!     .client_identity_files("/etc/unit/cert.pem", "/etc/unit/key.pem")
//!     .auth(Auth::approle_file("web-role-id", "/run/secrets/secret-id"))
//!     .build()?;
//! let password = client.secret("secret/web/db").await?;
//! connect_db(password.expose_secret());
//! # Ok(()) }
//! # fn connect_db(_: &str) {}
//! ```

#![warn(missing_docs)]

pub mod auth;
mod client;
pub mod envelope;
pub mod error;
pub mod gateway;
pub mod kv;
pub mod offline;
pub mod producer;
pub mod transit;

pub use auth::{Auth, SecretIdSource};
pub use client::{Client, ClientBuilder, DEFAULT_MAX_REPLY_BYTES, RetryPolicy, env_prefix};
pub use error::{Error, Result};
pub use secrecy::{ExposeSecret, SecretString};
