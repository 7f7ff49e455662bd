//! SoftHSM2 set-up: the development and test token.
//!
//! `keyvault dev` and the test suites create a token directory of their own, write a
//! `softhsm2.conf` pointing at it, and initialize a token by label through PKCS#11
//! (`C_InitToken`, `C_InitPIN`): no `softhsm2-util` needed, no slot numbers.

use std::path::{Path, PathBuf};

use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::error::{HsmError, Result};
use crate::pkcs11::{context, find_token};

/// Where Debian (and most distributions) install the SoftHSM2 module.
pub const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// The environment variable SoftHSM2 reads its configuration file from.
pub const CONF_ENV: &str = "SOFTHSM2_CONF";

/// The installed SoftHSM2 module, if any.
pub fn find_module() -> Option<PathBuf> {
    MODULE_CANDIDATES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Write `<dir>/softhsm2.conf` with a token directory `<dir>/tokens` (file backend: the
/// `db` backend is not compiled into Debian's build). Returns the configuration path.
pub fn write_config(dir: &Path) -> std::io::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    restrict_permissions(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "# Written by KeyVault for a development or test token.\n\
         directories.tokendir = {}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text)?;
    Ok(conf)
}

fn restrict_permissions(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Initialize a new token labelled `label` in the first free slot of `module` and set its
/// user PIN. SoftHSM offers one free slot at a time; after `C_InitToken` the token moves
/// to a new slot, so everything afterwards finds it by label.
pub fn init_token(module: &Path, label: &str, so_pin: &SecretString, user_pin: &SecretString) -> Result<()> {
    // Two threads initializing at once would both pick the one free slot.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let ctx = context(module)?;
    if find_token(&ctx, label)?.is_some() {
        return Err(HsmError::KeyExists(format!("token {label}")));
    }
    let mut free = None;
    for slot in ctx.get_slots_with_token()? {
        // Skip slots whose token does not answer (a removed token directory).
        if ctx.get_token_info(slot).is_ok_and(|info| !info.token_initialized()) {
            free = Some(slot);
            break;
        }
    }
    let free = free.ok_or(HsmError::TokenNotFound { label: "<a free slot>".into() })?;
    ctx.init_token(free, so_pin, label)?;
    let slot = find_token(&ctx, label)?.ok_or(HsmError::TokenNotFound { label: label.into() })?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin))?;
    session.init_pin(user_pin)?;
    session.logout()?;
    tracing::info!(token = label, "initialized SoftHSM token");
    Ok(())
}

/// A random PIN: 32 hex characters (128 bits).
pub fn random_pin() -> Result<SecretString> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 16]);
    getrandom::fill(bytes.as_mut()).map_err(|e| HsmError::Wrapper(format!("OS RNG: {e}")))?;
    let mut s = String::with_capacity(32);
    for b in bytes.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(SecretString::from(s))
}

/// Test support: one SoftHSM token directory per test process, one fresh token per call.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use secrecy::SecretString;

    use crate::pkcs11::{Pkcs11Config, Pkcs11KeyStore};

    struct ProcessTokens {
        dir: PathBuf,
        module: PathBuf,
    }

    /// Where the token directories of test processes live: one per process, named
    /// `<pid>-<random>`. A static is never dropped, so a process cannot remove its own
    /// directory when it ends; instead each new test process removes the directories of
    /// processes that are gone.
    fn tests_root() -> PathBuf {
        std::env::temp_dir().join("keyvault-softhsm-tests")
    }

    fn sweep_stale(root: &std::path::Path) {
        let Ok(entries) = std::fs::read_dir(root) else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let pid = name.to_string_lossy().split('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    static PROCESS: OnceLock<ProcessTokens> = OnceLock::new();
    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A freshly initialized token for one test.
    pub struct TestToken {
        pub config: Pkcs11Config,
        pub store: Arc<Pkcs11KeyStore>,
    }

    impl std::fmt::Debug for TestToken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TestToken").field("config", &self.config).finish()
        }
    }

    fn process() -> &'static ProcessTokens {
        PROCESS.get_or_init(|| {
            let module = super::find_module()
                .expect("SoftHSM2 is not installed: run the README's test command, which installs it");
            let root = tests_root();
            std::fs::create_dir_all(&root).expect("temp dir");
            sweep_stale(&root);
            let dir = tempfile::Builder::new()
                .prefix(&format!("{}-", std::process::id()))
                .tempdir_in(&root)
                .expect("temp dir")
                .keep();
            let conf = super::write_config(&dir).expect("write softhsm2.conf");
            // SAFETY: runs once per process inside OnceLock::get_or_init, before this
            // process loads the SoftHSM module (which is the only reader of the variable);
            // the test harness threads that race here all wait on the same OnceLock.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(super::CONF_ENV, &conf);
            }
            ProcessTokens { dir, module }
        })
    }

    /// The token directory of this test process (to grep it for plaintexts).
    pub fn token_dir() -> PathBuf {
        process().dir.join("tokens")
    }

    /// Initialize a new token with a unique label, without opening it.
    pub fn token_config() -> Pkcs11Config {
        let p = process();
        let label = format!("test-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let so_pin = super::random_pin().expect("rng");
        let pin = super::random_pin().expect("rng");
        super::init_token(&p.module, &label, &so_pin, &pin).expect("init SoftHSM token");
        Pkcs11Config::new(p.module.clone(), label, pin)
    }

    /// Initialize a new token with a unique label and open it.
    pub fn token() -> TestToken {
        let config = token_config();
        let store = Pkcs11KeyStore::open(&config).expect("open SoftHSM token");
        TestToken { config, store }
    }

    /// Like [`token`] with a specific configuration tweak (e.g. the wrap mechanism).
    pub fn token_with(tweak: impl FnOnce(&mut Pkcs11Config)) -> TestToken {
        let mut config = token_config();
        tweak(&mut config);
        let store = Pkcs11KeyStore::open(&config).expect("open SoftHSM token");
        TestToken { config, store }
    }

    /// A PIN that is certainly wrong for [`token`]'s tokens.
    pub fn wrong_pin() -> SecretString {
        SecretString::from("0".repeat(32))
    }
}
