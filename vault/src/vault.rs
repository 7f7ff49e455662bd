//! The vault: every domain operation, with its authorization. HTTP handlers, the CLI,
//! tests and benchmarks all call these functions; none of them knows about HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyvault_hsm::{KeyStore, Pkcs11Config, Pkcs11KeyStore};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::auth::approle::{AppRole, NewSecretId, RoleConfig, RoleView};
use crate::auth::userpass::{UserPass, UserView, UserWrite};
use crate::auth::{self, Authenticator, LoginOutcome, LoginRequest};
use crate::barrier::Barrier;
use crate::config::{Config, SecretsConfig, StorageConfig, TokenConfig};
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{self, KeyNames, SharedKeyring};
use crate::policy::{Acl, Capability, PolicyStore, ROOT_POLICY};
use crate::secrets::{SecretPath, SecretPrefix, SecretVersion, Secrets, VersionMeta};
use crate::store::{SledStore, Store};
use crate::token::{Claims, IssuedToken, TokenIssuer, TokenSpec};

/// An authenticated caller: verified claims and the ACL of their policies.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Arc<Claims>,
    pub acl: Acl,
}

impl Caller {
    /// Fail with 403 unless the caller's policies grant `cap` on `path`.
    pub fn require(&self, path: &str, cap: Capability) -> Result<()> {
        if self.acl.allows(path, cap) {
            Ok(())
        } else {
            tracing::debug!(accessor = %self.claims.acc, path, capability = cap.name(), "permission denied");
            Err(Error::PermissionDenied)
        }
    }
}

/// Open the configured key store (PKCS#11 token).
pub fn open_keystore(config: &Config) -> Result<Arc<dyn KeyStore>> {
    let pin = config.hsm.pin_source()?.read()?;
    let mut p = Pkcs11Config::new(
        config.hsm.module.clone(),
        config.hsm.token_label.clone(),
        pin,
    );
    p.max_sessions = config.hsm.max_sessions;
    p.wrap = config.hsm.wrap_preference();
    Ok(Pkcs11KeyStore::open(&p)?)
}

/// Open the configured storage engine.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    match &config.storage {
        StorageConfig::Sled { path } => {
            std::fs::create_dir_all(path).map_err(|e| {
                Error::Config(format!(
                    "cannot create storage directory {}: {e}",
                    path.display()
                ))
            })?;
            Ok(Arc::new(SledStore::open(path)?))
        }
    }
}

pub struct Vault {
    pub store: Arc<dyn Store>,
    pub keys: Arc<dyn KeyStore>,
    pub names: KeyNames,
    pub keyring: SharedKeyring,
    pub barrier: Barrier,
    pub tokens: TokenIssuer,
    pub policies: PolicyStore,
    pub secrets: Secrets,
    pub approle: Arc<AppRole>,
    pub userpass: Arc<UserPass>,
    authenticators: HashMap<&'static str, Arc<dyn Authenticator>>,
    token_config: TokenConfig,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RoleOnly {
    role: String,
}

impl Vault {
    /// Open an initialized installation from its configuration.
    pub async fn open(config: &Config) -> Result<Arc<Vault>> {
        let keys = open_keystore(config)?;
        let store = open_store(config).await?;
        let names = KeyNames::new(&config.hsm.key_prefix)?;
        Self::from_parts(
            store,
            keys,
            names,
            config.tokens.clone(),
            config.secrets.clone(),
        )
        .await
    }

    /// Assemble a vault from an opened store and key store. Fails if not initialized.
    pub async fn from_parts(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        token_config: TokenConfig,
        secrets_config: SecretsConfig,
    ) -> Result<Arc<Vault>> {
        let ring = keys::load(store.as_ref()).await?.ok_or_else(|| {
            Error::Config(
                "KeyVault is not initialized: run `keyvault operator init --config <file>` first"
                    .into(),
            )
        })?;
        let keyring: SharedKeyring = Arc::new(ArcSwap::from_pointee(ring));
        let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone()).with_dek_cache(
            secrets_config.dek_cache_ttl,
            secrets_config.dek_cache_capacity,
        );
        let tokens = TokenIssuer::new(
            keys.clone(),
            names.clone(),
            keyring.clone(),
            token_config.issuer.clone(),
        )
        .await?;
        let approle = Arc::new(AppRole::new(
            store.clone(),
            keys.clone(),
            names.clone(),
            keyring.clone(),
        ));
        let userpass = Arc::new(UserPass::new(store.clone()));
        let mut authenticators: HashMap<&'static str, Arc<dyn Authenticator>> = HashMap::new();
        authenticators.insert(approle.method(), approle.clone());
        authenticators.insert(userpass.method(), userpass.clone());
        Ok(Arc::new(Vault {
            policies: PolicyStore::new(store.clone()),
            secrets: Secrets::new(store.clone(), barrier.clone(), secrets_config.max_versions),
            store,
            keys,
            names,
            keyring,
            barrier,
            tokens,
            approle,
            userpass,
            authenticators,
            token_config,
        }))
    }

    /// Start background housekeeping (expired entry purge). Returns the task handle.
    pub fn spawn_housekeeping(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                match store.purge_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "purged expired entries"),
                    Err(e) => tracing::warn!(error = %e, "purging expired entries failed"),
                }
            }
        })
    }

    // ---- identity ----

    /// Verify a token and resolve its policies (re-read, so changes apply at once).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller> {
        let token = token.ok_or(Error::Unauthenticated(AuthFailure::MissingToken))?;
        let claims = self.tokens.verify(token).map_err(Error::Unauthenticated)?;
        let acl = self.policies.acl(&claims.pol).await?;
        Ok(Caller { claims, acl })
    }

    fn ttls(&self, outcome: &LoginOutcome) -> (u64, u64) {
        let max = outcome
            .max_ttl
            .unwrap_or(self.token_config.max_ttl)
            .min(self.token_config.max_ttl);
        let ttl = outcome
            .ttl
            .unwrap_or(self.token_config.default_ttl)
            .min(max);
        (ttl.as_secs(), max.as_secs())
    }

    async fn issue_for(&self, outcome: LoginOutcome) -> Result<IssuedToken> {
        let (ttl_secs, max_ttl_secs) = self.ttls(&outcome);
        self.tokens
            .issue(TokenSpec {
                sub: outcome.sub,
                method: outcome.method.to_owned(),
                role: outcome.role,
                policies: outcome.policies,
                ttl_secs,
                max_ttl_secs,
                cnf: None,
            })
            .await
    }

    /// Log in with method `method` (`/v1/auth/<method>/login[/<name>]`).
    pub async fn login(&self, method: &str, req: LoginRequest<'_>) -> Result<IssuedToken> {
        let authn = self
            .authenticators
            .get(method)
            .ok_or_else(|| Error::NotFound(format!("no auth method {method:?}")))?;
        let outcome = authn.login(req).await?;
        let token = self.issue_for(outcome).await?;
        tracing::info!(method, accessor = %token.claims.acc, sub = %token.claims.sub, "login");
        Ok(token)
    }

    /// The short form `POST /v1/auth` with `{"role": ..., credentials}`: the role's method.
    pub async fn login_short(&self, body: &[u8]) -> Result<IssuedToken> {
        let RoleOnly { role } = serde_json::from_slice(body).map_err(|e| auth::json_error(&e))?;
        auth::validate_name("role", &role)?;
        let method = auth::role_method(self.store.as_ref(), &role)
            .await?
            .ok_or(Error::Unauthenticated(AuthFailure::InvalidCredentials))?;
        self.login(&method, LoginRequest { name: None, body }).await
    }

    /// A root token (dev mode, `operator init`, `operator root-token`).
    pub async fn issue_root_token(&self, ttl: Duration) -> Result<IssuedToken> {
        self.tokens
            .issue(TokenSpec {
                sub: "root".into(),
                method: "root".into(),
                role: None,
                policies: vec![ROOT_POLICY.into()],
                ttl_secs: ttl.as_secs(),
                max_ttl_secs: ttl.as_secs(),
                cnf: None,
            })
            .await
    }

    // ---- secrets ----

    pub async fn read_secret(
        &self,
        caller: &Caller,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<SecretVersion> {
        caller.require(&format!("secret/{}", path.as_str()), Capability::Read)?;
        self.secrets.read(path, version).await
    }

    /// Write a new version. Needs `create` for a new secret, `update` for an existing one.
    pub async fn write_secret(
        &self,
        caller: &Caller,
        path: &SecretPath,
        value: &[u8],
    ) -> Result<(u64, VersionMeta)> {
        let policy_path = format!("secret/{}", path.as_str());
        let cap = if self.secrets.exists(path).await? {
            Capability::Update
        } else {
            Capability::Create
        };
        caller.require(&policy_path, cap)?;
        self.secrets.write(path, value).await
    }

    pub async fn delete_secret(&self, caller: &Caller, path: &SecretPath) -> Result<()> {
        caller.require(&format!("secret/{}", path.as_str()), Capability::Delete)?;
        self.secrets.delete_latest(path).await
    }

    pub async fn list_secrets(
        &self,
        caller: &Caller,
        prefix: &SecretPrefix,
    ) -> Result<Vec<String>> {
        caller.require(&format!("secret/{}", prefix.as_str()), Capability::List)?;
        self.secrets.list(prefix).await
    }

    // ---- policies ----

    pub async fn put_policy(&self, caller: &Caller, name: &str, text: &str) -> Result<()> {
        let path = format!("sys/policies/acl/{name}");
        let cap = if self.policies.get(name).await?.is_some() {
            Capability::Update
        } else {
            Capability::Create
        };
        caller.require(&path, cap)?;
        self.policies.put(name, text).await
    }

    pub async fn read_policy(&self, caller: &Caller, name: &str) -> Result<String> {
        caller.require(&format!("sys/policies/acl/{name}"), Capability::Read)?;
        if name == ROOT_POLICY {
            return Ok(String::new());
        }
        Ok(self
            .policies
            .get(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no policy {name}")))?
            .text
            .clone())
    }

    pub async fn delete_policy(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(&format!("sys/policies/acl/{name}"), Capability::Delete)?;
        if !self.policies.delete(name).await? {
            return Err(Error::NotFound(format!("no policy {name}")));
        }
        Ok(())
    }

    pub async fn list_policies(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("sys/policies/acl/", Capability::List)?;
        self.policies.list().await
    }

    // ---- AppRole administration ----

    pub async fn write_approle(
        &self,
        caller: &Caller,
        name: &str,
        config: RoleConfig,
    ) -> Result<()> {
        caller.require(&format!("auth/approle/role/{name}"), Capability::Update)?;
        self.approle.write_role(name, config).await
    }

    pub async fn read_approle(&self, caller: &Caller, name: &str) -> Result<RoleView> {
        caller.require(&format!("auth/approle/role/{name}"), Capability::Read)?;
        self.approle.read_role(name).await
    }

    pub async fn delete_approle(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(&format!("auth/approle/role/{name}"), Capability::Delete)?;
        self.approle.delete_role(name).await
    }

    pub async fn list_approles(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("auth/approle/role/", Capability::List)?;
        self.approle.list_roles().await
    }

    pub async fn approle_role_id(&self, caller: &Caller, name: &str) -> Result<String> {
        caller.require(
            &format!("auth/approle/role/{name}/role-id"),
            Capability::Read,
        )?;
        self.approle.role_id(name).await
    }

    pub async fn approle_secret_id(&self, caller: &Caller, name: &str) -> Result<NewSecretId> {
        caller.require(
            &format!("auth/approle/role/{name}/secret-id"),
            Capability::Update,
        )?;
        self.approle.new_secret_id(name).await
    }

    // ---- userpass administration ----

    pub async fn write_user(&self, caller: &Caller, name: &str, w: UserWrite) -> Result<()> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Update)?;
        self.userpass.write_user(name, w).await
    }

    pub async fn read_user(&self, caller: &Caller, name: &str) -> Result<UserView> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Read)?;
        self.userpass.read_user(name).await
    }

    pub async fn delete_user(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(&format!("auth/userpass/users/{name}"), Capability::Delete)?;
        self.userpass.delete_user(name).await
    }

    pub async fn list_users(&self, caller: &Caller) -> Result<Vec<String>> {
        caller.require("auth/userpass/users/", Capability::List)?;
        self.userpass.list_users().await
    }

    // ---- health ----

    /// Storage and token reachability, for `/v1/sys/health`.
    pub async fn health(&self) -> HealthReport {
        let storage = self.store.ping().await.map_err(|e| e.to_string());
        let label = self.names.master(self.barrier.active_version());
        let hsm = crate::hsm_call(&self.keys, move |k| k.exists(&label))
            .await
            .and_then(|found| {
                if found {
                    Ok(())
                } else {
                    Err(Error::Internal("active master key missing".into()))
                }
            })
            .map_err(|e| e.to_string());
        HealthReport {
            storage,
            hsm,
            master_version: self.barrier.active_version().get(),
        }
    }
}

/// What `/v1/sys/health` reports.
#[derive(Debug)]
pub struct HealthReport {
    pub storage: std::result::Result<(), String>,
    pub hsm: std::result::Result<(), String>,
    pub master_version: u32,
}

/// Reveal a token string for the one place that must: the login reply.
pub fn token_string(t: &IssuedToken) -> &str {
    t.token.expose_secret()
}
