//! Username and password, its domain part: the one form of a user name. The method
//! itself (Argon2id hashes, users, logins) is `engines/auth/userpass.rs`.

use crate::error::Result;

pub const METHOD: &str = "userpass";

/// A user name as stored and looked up: surrounding white space removed, lower case (as
/// Vault's userpass does), then the common name rule. Logins, the rate limiter and
/// administration all use this form, so `Alice` and ` alice` are `alice`.
pub fn normalize_user(name: &str) -> Result<String> {
    let n = name.trim().to_ascii_lowercase();
    super::validate_name("user", &n)?;
    Ok(n)
}
