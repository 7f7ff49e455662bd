//! Fault injection into the key store and the audit log's disk, for tests of what the
//! server does when its PKCS#11 module fails, hangs or slows down (tests/tests/faults.rs)
//! and when the audit log's syncs fail (tests/tests/audit_disk.rs). Debug builds only: a
//! release build never reads the variables; [`before`] and [`audit_fsync`] are compiled
//! out of it.
//!
//! `KEYVAULT_TEST_TOKEN_FAULT=<file>`: before every key store call, the file is read (a
//! missing file is no fault). Its content:
//! - empty: no fault;
//! - `error`: the call fails as a device error would (`CKR_DEVICE_ERROR`);
//! - `error <op>`: only calls of that kind fail so (`unwrap_key`, `sign_ed25519`, ...: the
//!   names of the `keyvault_token_operations_total` metric);
//! - `hang`: the call blocks until the file says something else, then runs;
//! - `slow <ms>`: the call waits that long, then runs (`slow <ms> <op>`: only calls of
//!   that kind);
//! - `flaky <percent>`: that share of calls fails as with `error`;
//! - `bad_tag_once <op>`: the first call of that kind fails as a failed integrity check
//!   would (`InvalidCiphertext`: SoftHSM's `CKR_GENERAL_ERROR` is read so), once per
//!   process; every call after it runs;
//! - `bad_tag <op>`: every call of that kind fails so.
//!
//! `KEYVAULT_TEST_AUDIT_FSYNC_FAULT=<file>`: read before every `fdatasync` of the audit
//! log ([`audit_fsync`]): `error` fails the sync as a disk error would (`EIO`), `slow <ms>`
//! delays it; `error then <mode>` fails one sync: the file says `<mode>` from then on, and
//! the failing sync takes as long as `<mode>` says.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

fn file() -> Option<&'static PathBuf> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    FILE.get_or_init(|| std::env::var_os("KEYVAULT_TEST_TOKEN_FAULT").map(PathBuf::from)).as_ref()
}

fn mode() -> String {
    file().and_then(|f| std::fs::read_to_string(f).ok()).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Called by the metered key store before each call (`op` names it).
pub fn before(op: &'static str) -> keyvault_hsm::Result<()> {
    if file().is_none() {
        return Ok(());
    }
    loop {
        let m = mode();
        let mut words = m.split_whitespace();
        let (first, second, third) = (words.next(), words.next(), words.next());
        match (first, second.and_then(|n| n.parse::<u64>().ok())) {
            (Some("error"), _) if second.is_none_or(|o| o == op) => {
                return Err(keyvault_hsm::HsmError::simulated_device_error());
            }
            (Some("error"), _) => return Ok(()),
            (Some("bad_tag"), _) if second == Some(op) => return Err(keyvault_hsm::HsmError::InvalidCiphertext),
            (Some("bad_tag_once"), _) => {
                static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                return if second == Some(op) && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    Err(keyvault_hsm::HsmError::InvalidCiphertext)
                } else {
                    Ok(())
                };
            }
            (Some("hang"), _) => std::thread::sleep(Duration::from_millis(20)),
            (Some("slow"), Some(ms)) => {
                if third.is_none_or(|o| o == op) {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                return Ok(());
            }
            (Some("flaky"), Some(pct)) => {
                let mut b = [0u8; 1];
                let _ = getrandom::fill(&mut b);
                return if u64::from(b[0]) * 100 < pct * 256 {
                    Err(keyvault_hsm::HsmError::simulated_device_error())
                } else {
                    Ok(())
                };
            }
            _ => return Ok(()),
        }
    }
}

/// Called by the audit writer before each `fdatasync` of the log.
pub fn audit_fsync() -> std::io::Result<()> {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(f) = FILE.get_or_init(|| std::env::var_os("KEYVAULT_TEST_AUDIT_FSYNC_FAULT").map(PathBuf::from)) else {
        return Ok(());
    };
    let m = std::fs::read_to_string(f).unwrap_or_default();
    if let Some(then) = m.trim().strip_prefix("error then ") {
        // Written aside and renamed: a reader never sees half of it.
        let aside = f.with_extension("then");
        if std::fs::write(&aside, then).is_ok() {
            let _ = std::fs::rename(&aside, f);
        }
        let mut words = then.split_whitespace();
        if let (Some("slow"), Some(ms)) = (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        return Err(std::io::Error::from_raw_os_error(5));
    }
    let mut words = m.split_whitespace();
    match (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
        (Some("error"), _) => Err(std::io::Error::from_raw_os_error(5)),
        (Some("slow"), Some(ms)) => {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A crash point: the process aborts here (as `kill -9` would) while the file named by
/// the variable `var` exists. Tests use it to stop a long operation at its worst point
/// (`KEYVAULT_TEST_CRASH_DB_ROTATION`, `KEYVAULT_TEST_CRASH_ROTATION_START`,
/// `KEYVAULT_TEST_CRASH_APPROLE_WRITE`). Debug builds
/// only, as the rest of this module.
pub fn crash_point(var: &str) {
    if let Some(f) = std::env::var_os(var)
        && std::path::Path::new(&f).exists()
    {
        std::process::abort();
    }
}
