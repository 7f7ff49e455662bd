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
            PinSource::File(path) => {
                if let Some(mode) = loose_mode(path) {
                    tracing::warn!(
                        file = %path.display(),
                        mode = format!("{mode:o}"),
                        "the PIN file can be read by other users than its owner: make it mode 0600"
                    );
                }
                Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| HsmError::PinSource(format!("cannot read PIN file {}: {e}", path.display())))?,
                )
            }
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

/// The file's permission bits if its group or other users may read or write it.
fn loose_mode(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o066 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// A PIN file others may read is reported (the PIN is still read: refusing would stop
    /// installations that share it with a group on purpose).
    #[test]
    fn a_pin_file_others_may_read_is_reported() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pin");
        std::fs::write(&path, "pin\n").unwrap();
        for (mode, loose) in [(0o600, false), (0o400, false), (0o640, true), (0o644, true), (0o602, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(loose_mode(&path).is_some(), loose, "{mode:o}");
        }
    }

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
