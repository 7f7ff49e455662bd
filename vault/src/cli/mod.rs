//! What the `keyvault` command does besides serving: the development set-up, the load
//! generator, and the small HTTP client the operator commands use. Not part of the server
//! library.

pub mod bench;
pub mod client;
pub mod dev;
pub mod dev_pki;
pub mod migrate;
