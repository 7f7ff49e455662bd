//! Where the user PIN comes from. The PIN is a secret: read once, held in a
//! `SecretString`, never logged, never echoed in an error.

use std::path::PathBuf;

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::{HsmError, Result};

/// The configured source of the token's user PIN.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose content (without the trailing newline) is the PIN. It should be
    /// readable by the service user only.
    File(PathBuf),
    /// An environment variable set by the operator's supervisor (systemd credential,
    /// Kubernetes secret). KeyVault never sets one itself.
    Env(String),
}

impl std::fmt::Debug for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "PinSource::File({})", p.display()),
            PinSource::Env(name) => write!(f, "PinSource::Env({name})"),
        }
    }
}

impl PinSource {
    /// Read the PIN. Errors name the source, never the content.
    pub fn read(&self) -> Result<SecretString> {
        let raw: Zeroizing<String> = match self {
            PinSource::File(path) => Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| HsmError::PinSource(format!("cannot read PIN file {}: {e}", path.display())))?,
            ),
            PinSource::Env(name) => Zeroizing::new(
                std::env::var(name)
                    .map_err(|_| HsmError::PinSource(format!("environment variable {name} is not set or not UTF-8")))?,
            ),
        };
        let pin = raw.trim_end_matches(['\r', '\n']);
        if pin.is_empty() {
            return Err(HsmError::PinSource(format!("{self:?} holds an empty PIN")));
        }
        Ok(SecretString::from(pin.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn file_pin_strips_newline_and_errors_do_not_leak() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join("pin");
        std::fs::write(&path, "s3cr3t-pin\n").unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.expose_secret(), "s3cr3t-pin");
        assert!(!format!("{:?}", PinSource::File(path.clone())).contains("s3cr3t"));
        std::fs::write(&path, "\n").unwrap();
        let err = PinSource::File(path).read().unwrap_err().to_string();
        assert!(err.contains("empty PIN"), "{err}");
        let err = PinSource::File(dir.join("missing")).read().unwrap_err().to_string();
        assert!(err.contains("cannot read PIN file"), "{err}");
    }
}
