//! The one place that turns a [`Config`] into a running [`Service`]: key store, storage,
//! keyring, audit log, engines at their mounts, TLS. `keyvault server`, `keyvault dev`
//! and `keyvault operator init` all build through here.

use std::sync::Arc;

use keyvault_hsm::{KeyStore, Pkcs11Config, Pkcs11KeyStore};

use super::{Core, Service, Settings};
use crate::audit::AuditLog;
use crate::config::{Config, StorageConfig};
use crate::error::{Error, Result};
use crate::keys::{self, KeyNames, SharedKeyring};
use crate::logical::mounts::{Mount, MountTable};
use crate::store::{SledStore, Store};
use crate::tls::TlsReloader;

/// What to do about an installation that has no keys yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// It must be initialized already (`keyvault server`).
    Require,
    /// Initialize it if it is new (`keyvault dev`).
    IfNew,
    /// Initialize it; refuse if it already is (`keyvault operator init`).
    Always,
}

/// What the builder is making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A server: the audit log, TLS and the listener's settings.
    Serve,
    /// An administrative command that serves no request: no audit file is touched (a
    /// running server may be writing it) and no listener is prepared.
    Admin,
}

/// The listener's side of a served service.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) tls: Arc<TlsReloader>,
    pub(crate) config: crate::config::ListenerConfig,
}

/// Builds a [`Service`] from a configuration.
#[derive(Debug)]
pub struct Builder<'a> {
    config: &'a Config,
    init: Init,
    purpose: Purpose,
}

/// Open the configured key store (PKCS#11 token).
pub fn open_keystore(config: &Config) -> Result<Arc<dyn KeyStore>> {
    let pin = config.hsm.pin_source()?.read()?;
    let mut p = Pkcs11Config::new(config.hsm.module.clone(), config.hsm.token_label.clone(), pin);
    p.max_sessions = config.hsm.max_sessions;
    crate::token_workers::configure(config.hsm.workers, config.hsm.call_timeout);
    p.wrap = config.hsm.wrap_preference();
    p.session_copies = config.hsm.session_copies;
    // The server opens one token, before anything else uses the module.
    p.alone_in_process = true;
    Ok(Arc::new(crate::metrics::MeteredKeyStore::new(Pkcs11KeyStore::open(&p)?)))
}

/// Open the configured storage engine.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    match &config.storage {
        StorageConfig::Sled { path } => {
            // Owner only, as the audit directory: record keys are secret paths in clear.
            crate::tls::create_private_dir(path, "storage")?;
            // One that was there already keeps its mode: said, not changed.
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    dir = %path.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the storage directory is open to other users (secret paths are stored in clear); chmod 700 it"
                );
            }
            Ok(Arc::new(crate::metrics::MeteredStore::new(Arc::new(SledStore::open(path)?))))
        }
        StorageConfig::Postgres { url, password_file, tls_ca_file, pool_size } => {
            let password = match password_file {
                Some(f) => Some(
                    keyvault_hsm::PinSource::File(f.clone())
                        .read()
                        .map_err(|e| Error::Config(format!("storage.password_file: {e}")))?,
                ),
                None => None,
            };
            let options = crate::store::PostgresOptions {
                url: url.clone(),
                password,
                tls_ca_file: tls_ca_file.clone(),
                pool_size: *pool_size,
            };
            Ok(Arc::new(crate::metrics::MeteredStore::new(Arc::new(
                crate::store::PostgresStore::open(&options).await?,
            ))))
        }
    }
}

/// The mounts of a configuration, built: the configured ones and the fixed ones (`sys/`,
/// `auth/token/`, and the short login and token-verification keys under `auth/`).
pub(crate) fn build_mounts(config: &[crate::config::MountConfig], core: &Arc<Core>) -> Result<MountTable> {
    mount_table(config, |kind, mount| (kind.build)(core, mount))
}

/// The mount table of a configuration, with engines that only describe their routes:
/// for the docs and the authorization tests, without opening anything.
pub fn describe_mounts(config: &[crate::config::MountConfig]) -> Result<MountTable> {
    mount_table(config, |kind, _| Ok(Arc::new(crate::engines::Described(kind))))
}

fn mount_table(
    config: &[crate::config::MountConfig],
    make: impl Fn(
        &'static crate::engines::EngineKind,
        &crate::config::MountConfig,
    ) -> Result<Arc<dyn crate::logical::Engine>>,
) -> Result<MountTable> {
    let mut mounts = Vec::new();
    for m in config {
        let kind = crate::engines::kind(&m.kind).ok_or_else(|| {
            Error::Config(format!(
                "mount {:?}: unknown type {:?} (known: {})",
                m.path,
                m.kind,
                crate::engines::configurable().join(", ")
            ))
        })?;
        if kind.fixed_at.is_some() {
            return Err(Error::Config(format!("mount {:?}: {} is mounted by KeyVault itself", m.path, m.kind)));
        }
        let path = format!("{}/", m.path.trim_matches('/'));
        if kind.info.auth != path.starts_with("auth/") {
            return Err(Error::Config(format!(
                "mount {:?}: auth methods are mounted under auth/, and nothing else is",
                m.path
            )));
        }
        if path == "sys/" || path.starts_with("sys/") || path == "auth/token/" {
            return Err(Error::Config(format!("mount {:?}: {path} is reserved", m.path)));
        }
        crate::engines::check_options(kind, m)?;
        if kind.once && mounts.iter().any(|x: &Mount| x.engine.kind() == kind.info.name) {
            return Err(Error::Config(format!(
                "mount {:?}: {} is mounted twice (each kind keeps its data in one place; mount it once)",
                m.path, m.kind
            )));
        }
        mounts.push(Mount { path, engine: make(kind, m)?, hidden: false });
    }
    for kind in crate::engines::KINDS {
        if let Some(path) = kind.fixed_at {
            let fixed = crate::config::MountConfig {
                path: path.to_owned(),
                kind: kind.info.name.to_owned(),
                options: Default::default(),
            };
            mounts.push(Mount { path: path.to_owned(), engine: make(kind, &fixed)?, hidden: path == "auth/" });
        }
    }
    MountTable::new(mounts)
}

impl<'a> Builder<'a> {
    /// A server (audit log, TLS, listener) from `config`.
    pub fn new(config: &'a Config) -> Self {
        Builder { config, init: Init::Require, purpose: Purpose::Serve }
    }

    /// For a command that serves no request (`operator init`, `operator root-token`).
    pub fn admin(config: &'a Config) -> Self {
        Builder { config, init: Init::Require, purpose: Purpose::Admin }
    }

    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Open everything and assemble the service. Start-up order: key store, storage,
    /// keyring (initialized here if asked), record counters, audit log, core, mounts, TLS.
    pub async fn build(self) -> Result<Service> {
        let config = self.config;
        let keys = open_keystore(config)?;
        let store = open_store(config).await?;
        let names = KeyNames::new(&config.hsm.key_prefix)?;
        match self.init {
            Init::Always => {
                keys::initialize(store.as_ref(), &keys, &names).await?;
            }
            Init::IfNew if keys::load(store.as_ref()).await?.is_none() => {
                keys::initialize(store.as_ref(), &keys, &names).await?;
            }
            _ => {}
        }
        let keyring = SharedKeyring::open(store.clone()).await?.ok_or_else(|| {
            Error::Config("KeyVault is not initialized: run `keyvault operator init --config <file>` first".into())
        })?;
        keys::ensure_keys(store.as_ref(), &keys, &names).await?;
        crate::usage::ensure_counted(store.as_ref(), crate::secrets::data_prefix()).await?;
        let audit = match self.purpose {
            Purpose::Serve => AuditLog::open(&config.audit, &keys, &names).await?,
            Purpose::Admin => AuditLog::detached(&config.audit, &keys, &names).await?,
        };
        let core = Arc::new(Core::new(store, keys, names, keyring, audit, Settings::from_config(config)).await?);
        let mounts = Arc::new(build_mounts(&config.mounts, &core)?);
        let _ = core.mounts.set((mounts.listing(false), mounts.listing(true)));
        let listener = match self.purpose {
            Purpose::Serve => {
                Some(Listening { tls: TlsReloader::new(config.listener.tls_files())?, config: config.listener.clone() })
            }
            Purpose::Admin => None,
        };
        Ok(Service { core, mounts, listener })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sled directory is the owner's only, whatever the umask: record keys (secret
    /// paths) are stored in clear.
    #[tokio::test]
    async fn the_storage_directory_is_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/store");
        let example = include_str!("../../../deploy/keyvault.example.toml");
        let mut config = Config::parse(example).unwrap();
        config.storage = StorageConfig::Sled { path: path.clone() };
        drop(open_store(&config).await.unwrap());
        for p in [&path, &dir.path().join("data")] {
            let mode = std::fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        }
    }
}
