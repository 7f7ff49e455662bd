//! KeyVault's key store: the only crate that talks PKCS#11.
//!
//! Every master key, signing key and named key lives in a PKCS#11 token and is generated
//! there as sensitive and non-extractable. This crate exposes operations with those keys
//! ([`KeyStore`]) and never their values.
#![deny(unsafe_code)]

mod error;
mod keystore;
mod pin;
mod pkcs11;
pub mod softhsm;

pub use error::{HsmError, Result};
pub use keystore::{KeyKind, KeyLabel, KeyStore, WrapMechanism};
pub use pin::PinSource;
pub use pkcs11::{
    COPY_RECHECK, DEFAULT_SESSION_COPIES, KeyProtection, Pkcs11Config, Pkcs11KeyStore, WrapPreference, context,
    find_token,
};

#[cfg(test)]
mod tests;
