//! The `database` engine: static roles whose PostgreSQL passwords KeyVault rotates (Vault's
//! `database` secrets engine, static roles). KeyVault holds a pool of admin connections per
//! configured database; a static role names a connection and a database role; KeyVault
//! sets a new random password with `ALTER ROLE` on a schedule (`rotation_period`) and on
//! demand (`rotate-role/<name>`), and serves it at `static-creds/<name>`.
//!
//! Passwords are kept like secrets (sealed, one data key per version, re-wrapped by master
//! key rotation) in a namespace of their own. A rotation is crash-safe: the new password
//! is stored as *pending* before `ALTER ROLE`, and made current after; a pending password
//! found later (after a crash, on any replica) is applied again (`ALTER ROLE` is
//! idempotent) and made current. So there is never a moment when neither KeyVault nor the
//! database knows the password. One replica rotates a role at a time (a claim in the
//! store that expires by itself if its holder dies).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::EngineKind;
use crate::config::MountConfig;
use crate::error::{Error, Result};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::Capability;
use crate::secrets::{SecretPath, Secrets};
use crate::shared::Core;
use crate::store::{Store, TxOp, TxOutcome, decode_json, encode_json};
use crate::unix_now;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "database",
        description: "PostgreSQL role passwords rotated by KeyVault (static roles)",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: true,
    build: Database::build,
};

fn role_name(_: Operation, p: &mut Params) -> Result<()> {
    let name = p.get("name").unwrap_or_default().to_owned();
    if !keyvault_api::valid_name(&name) {
        return Err(Error::invalid("a role name is 1-128 letters, digits, `.`, `_` or `-`"));
    }
    Ok(())
}

const ROUTES: &[Route] = &[
    Route::new("static-roles", "list static roles", &[OpSpec::list(Access::Needs(Capability::List))]),
    Route::new(
        "static-roles/{name}",
        "a static role: `db_name`, `username`, `rotation_period`",
        &[
            OpSpec::read(Access::Needs(Capability::Read)).data::<StaticRole>(),
            OpSpec::write(Access::CreateOrUpdate).body::<RoleWrite>().answers(Answer::Empty),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
        ],
    )
    .normalize(role_name)
    .names(crate::NAME_PATTERN),
    Route::new(
        "static-creds/{name}",
        "the role's current password (Vault's shape)",
        &[OpSpec::read(Access::Needs(Capability::Read)).data::<StaticCreds<'static>>()],
    )
    .normalize(role_name)
    .names(crate::NAME_PATTERN),
    Route::new(
        "rotate-role/{name}",
        "rotate the role's password now",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<keyvault_api::Empty>().answers(Answer::Empty)],
    )
    .normalize(role_name)
    .names(crate::NAME_PATTERN),
];

/// `[mounts.options.connections.<name>]`: how KeyVault reaches one database as its admin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionConfig {
    /// A libpq connection string or URL (`host=/var/run/postgresql user=keyvault_admin dbname=postgres`).
    connection: String,
    /// The admin's password (read at start), if the database asks for one.
    #[serde(default)]
    password_file: Option<PathBuf>,
    /// CA certificates (PEM): connect with TLS, verifying the server with them.
    #[serde(default)]
    tls_ca_file: Option<PathBuf>,
    /// The database roles that static roles on this connection may manage: names, or
    /// prefixes ending in `*` (`["app_*", "reporting"]`). Empty: any ordinary role.
    #[serde(default)]
    allowed_usernames: Vec<String>,
    /// At most this many admin connections to the database at once (Vault's
    /// `max_open_connections`; default 4). Requests beyond it wait for one to come free,
    /// up to [`POOL_WAIT`], then answer 503.
    #[serde(default = "default_max_open_connections")]
    max_open_connections: usize,
    /// An admin connection is closed once it is this old (Vault's
    /// `max_connection_lifetime`; default: no limit). One unused for [`POOL_IDLE`] is closed.
    #[serde(default, with = "keyvault_api::vault_duration")]
    max_connection_lifetime: Option<Duration>,
}

impl ConnectionConfig {
    fn check(&self) -> std::result::Result<(), &'static str> {
        if !(1..=64).contains(&self.max_open_connections) {
            return Err("max_open_connections: 1 to 64");
        }
        Ok(())
    }
}

fn default_max_open_connections() -> usize {
    4
}

/// How long a request waits for a free admin connection before it answers 503.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// An admin connection unused this long is closed (by the scheduler's next check).
const POOL_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    connections: BTreeMap<String, ConnectionConfig>,
    /// How often the scheduler looks for roles due for rotation (default 10 s).
    #[serde(default, with = "keyvault_api::vault_duration")]
    check_interval: Option<Duration>,
}

/// One configured database: its admin connections (a bounded pool: a burst of reads must
/// not use up the database's `max_connections`, nor open one connection per request).
struct Connection {
    pool: deadpool_postgres::Pool,
    max_open: usize,
    allowed_usernames: Vec<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("max_open", &self.max_open).finish_non_exhaustive()
    }
}

/// A static role as stored.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct StaticRole {
    db_name: String,
    username: String,
    rotation_period: u64,
}

/// The body of a static role write.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct RoleWrite {
    db_name: Option<String>,
    username: Option<String>,
    #[serde(default, with = "keyvault_api::vault_duration")]
    #[schema(value_type = Option<keyvault_api::schema::Duration>)]
    rotation_period: Option<Duration>,
}

/// The role's passwords, sealed: the current one, and one being applied; and the
/// database role they are for.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Creds {
    password: Option<String>,
    pending: Option<String>,
    rotated_at: u64,
    /// The database and role the passwords are for (absent in credentials stored before
    /// this field: taken to be the static role's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    db_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
}

impl Creds {
    /// When the password in force is due to be rotated (unix seconds).
    fn next_rotation(&self, role: &StaticRole) -> u64 {
        self.rotated_at.saturating_add(role.rotation_period)
    }

    /// None yet, for `role`.
    fn none(role: &StaticRole) -> Self {
        Creds {
            password: None,
            pending: None,
            rotated_at: 0,
            db_name: Some(role.db_name.clone()),
            username: Some(role.username.clone()),
        }
    }

    /// Whether these are `role`'s passwords: credentials stored for another database role
    /// (by a static role of the same name deleted while a rotation of it ran, and made
    /// again for another user) must never be served as this one's.
    fn is_for(&self, role: &StaticRole) -> bool {
        self.db_name.as_ref().is_none_or(|d| *d == role.db_name)
            && self.username.as_ref().is_none_or(|u| *u == role.username)
    }
}

impl Drop for Creds {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.password.zeroize();
        self.pending.zeroize();
    }
}

/// Vault's `static-creds` reply.
#[derive(Serialize, utoipa::ToSchema)]
struct StaticCreds<'a> {
    username: &'a str,
    password: &'a str,
    last_vault_rotation: String,
    rotation_period: u64,
    ttl: u64,
}

#[derive(Debug)]
pub struct Database {
    store: Arc<dyn Store>,
    creds: Secrets,
    connections: BTreeMap<String, Connection>,
}

const ROLE_PREFIX: &str = "database/static-roles/";
/// `database/managed/<db_name>/<username>`: the static role that manages a database role.
const MANAGED_PREFIX: &str = "database/managed/";

/// A static role whose database role is no longer manageable is warned about on every
/// read and scheduled check: at most one line a second.
static NOT_MANAGEABLE: crate::ratelog::RateLimitedLog = crate::ratelog::RateLimitedLog::new();

fn managed_key(db_name: &str, username: &str) -> String {
    format!("{MANAGED_PREFIX}{db_name}/{username}")
}
const CLAIM_PREFIX: &str = "database/rotating/";
/// How long a rotation's (or a delete's) claim lasts if its replica dies holding it (a
/// rotation, with its admin connection already taken, runs a lookup and one statement:
/// well under this). Until it lapses, that role's credentials are 503 on every replica: a
/// pending password is applied only under the claim (applied by two writers, an older
/// pending could overwrite a newer password).
const CLAIM_TTL: Duration = Duration::from_secs(15);

/// When a rotation runs, decided once the role's rotation claim is held (a pending
/// password is applied in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotate {
    /// Only a pending password.
    Pending,
    /// If the role has no password yet (its first, for a new role or a first read).
    NoPassword,
    /// If its rotation period has passed (the scheduler).
    Due,
    /// Whatever was done last (`rotate-role`).
    Now,
}

/// PostgreSQL role names KeyVault manages: letters, digits, `_`, at most 63 bytes (they
/// are quoted in `ALTER ROLE`, and nothing else is accepted).
fn valid_username(u: &str) -> bool {
    !u.is_empty() && u.len() <= 63 && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// 32 random letters and digits (about 190 bits): safe inside an SQL string literal.
fn new_password() -> Result<Zeroizing<String>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = Zeroizing::new(String::with_capacity(32));
    while out.len() < 32 {
        let bytes: [u8; 64] = crate::barrier::random()?;
        for b in bytes {
            // 248 = 4 * 62: unbiased.
            if b < 248 && out.len() < 32 {
                out.push(ALPHABET[usize::from(b % 62)] as char);
            }
        }
    }
    Ok(out)
}

impl Database {
    fn build(core: &Arc<Core>, mount: &MountConfig) -> Result<Arc<dyn Engine>> {
        let bad = |e: String| Error::Config(format!("mount {:?}: {e}", mount.path));
        let options: Options = toml::Value::Table(mount.options.clone())
            .try_into()
            .map_err(|e: toml::de::Error| bad(crate::config::value_error(&e)))?;
        let mut connections = BTreeMap::new();
        for (name, c) in &options.connections {
            let mut config: tokio_postgres::Config = c
                .connection
                .parse()
                .map_err(|_| bad(format!("connection {name}: not a PostgreSQL connection string")))?;
            if let Some(f) = &c.password_file {
                let text = Zeroizing::new(
                    std::fs::read_to_string(f).map_err(|e| bad(format!("connection {name}: {}: {e}", f.display())))?,
                );
                config.password(text.trim());
            }
            config.connect_timeout(Duration::from_secs(5));
            // A rotation's ALTER ROLE must not wait for good on a lock that the role
            // itself (or anyone) holds in an open transaction: it fails and is retried.
            crate::store::bound_in_time(&mut config, "statement_timeout=15s -c lock_timeout=5s");
            c.check().map_err(|e| bad(format!("connection {name}: {e}")))?;
            let recycling =
                deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast };
            let manager = match &c.tls_ca_file {
                Some(ca) => {
                    use rustls_pki_types::pem::PemObject;
                    let mut roots = rustls::RootCertStore::empty();
                    let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                        .map_err(|e| bad(format!("connection {name}: tls_ca_file {}: {e}", ca.display())))?;
                    for cert in certs {
                        roots.add(cert).map_err(|e| bad(format!("connection {name}: {e}")))?;
                    }
                    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| bad(e.to_string()))?
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                    config.ssl_mode(tokio_postgres::config::SslMode::Require);
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
                    deadpool_postgres::Manager::from_config(config, tls, recycling)
                }
                None => deadpool_postgres::Manager::from_config(config, tokio_postgres::NoTls, recycling),
            };
            let mut pool = deadpool_postgres::Pool::builder(manager)
                .max_size(c.max_open_connections)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(Duration::from_secs(10)))
                .runtime(deadpool_postgres::Runtime::Tokio1);
            if let Some(lifetime) = c.max_connection_lifetime.filter(|d| !d.is_zero()) {
                pool = pool.pre_recycle(deadpool_postgres::Hook::sync_fn(move |_, metrics| {
                    if metrics.age() < lifetime {
                        Ok(())
                    } else {
                        Err(deadpool_postgres::HookError::message("max_connection_lifetime reached"))
                    }
                }));
            }
            let pool = pool.build().map_err(|e| bad(format!("connection {name}: {e}")))?;
            connections.insert(
                name.clone(),
                Connection { pool, max_open: c.max_open_connections, allowed_usernames: c.allowed_usernames.clone() },
            );
        }
        let max_versions = core.settings.secrets.max_versions;
        let db = Arc::new(Database {
            store: core.store.clone(),
            creds: Secrets::database(core.store.clone(), core.barrier.clone(), max_versions),
            connections,
        });
        // The scheduler: roles due for rotation, every `check_interval` (a sealed replica
        // takes no step; the claim keeps two replicas from rotating one role at once).
        let weak = Arc::downgrade(&db);
        let keys = core.keys.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(options.check_interval.unwrap_or(Duration::from_secs(10)));
            loop {
                tick.tick().await;
                let Some(db) = weak.upgrade() else { return };
                for c in db.connections.values() {
                    c.pool.retain(|_, m| m.last_used() < POOL_IDLE);
                }
                if keys.is_sealed() {
                    continue;
                }
                if let Err(e) = db.rotate_due().await {
                    tracing::warn!(error = %e, "database: scheduled rotation check failed");
                }
            }
        });
        Ok(db)
    }

    async fn role(&self, name: &str) -> Result<Option<StaticRole>> {
        let key = format!("{ROLE_PREFIX}{name}");
        match self.store.get(&key).await? {
            Some(raw) => Ok(Some(decode_json(&key, &raw)?)),
            None => Ok(None),
        }
    }

    fn creds_path(name: &str) -> Result<SecretPath> {
        Ok(SecretPath::parse(name)?)
    }

    /// The stored credentials of static role `name` and their version. Credentials of
    /// another database role ([`Creds::is_for`]) read as none yet, at their version (a
    /// rotation replaces them).
    async fn load_creds(&self, name: &str, role: &StaticRole) -> Result<Option<(u64, Creds)>> {
        let path = Self::creds_path(name)?;
        if !self.creds.exists(&path).await? {
            return Ok(None);
        }
        match self.creds.read(&path, None).await {
            Ok(v) => {
                let c: Creds = serde_json::from_slice(&v.data)
                    .map_err(|_| Error::Internal(format!("the credentials of role {name} are not readable")))?;
                if c.is_for(role) {
                    Ok(Some((v.version, c)))
                } else {
                    tracing::warn!(role = name, "database: stored credentials of another database role are ignored");
                    Ok(Some((v.version, Creds::none(role))))
                }
            }
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn store_creds(&self, name: &str, creds: &Creds, expected: u64) -> Result<()> {
        let body = Zeroizing::new(serde_json::to_vec(creds).map_err(|e| Error::Internal(e.to_string()))?);
        let opts = crate::secrets::WriteOptions { cas: Some(expected), ..Default::default() };
        self.creds.write_with(&Self::creds_path(name)?, &body, opts).await?;
        Ok(())
    }

    /// A connection as the admin of `db_name`, from its pool: 503 if the database cannot
    /// be reached, or if all its `max_open_connections` stay busy for [`POOL_WAIT`].
    async fn admin_client(&self, db_name: &str) -> Result<deadpool_postgres::Object> {
        let conn = self
            .connections
            .get(db_name)
            .ok_or_else(|| Error::invalid(format!("no database connection named {db_name:?}")))?;
        conn.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => Error::Unavailable(format!(
                "database {db_name}: all {} admin connections (max_open_connections) stayed busy; retry",
                conn.max_open
            )),
            e => {
                tracing::warn!(db = %db_name, error = %e, "database: the admin connection failed");
                Error::Unavailable(format!("database {db_name}: cannot connect as its admin (see the server log)"))
            }
        })
    }

    /// Whether a static role may manage `username` on `db_name`: it must be one of the
    /// connection's `allowed_usernames` (when the connection names any), a role that
    /// exists, and one that cannot administer the database: not the admin connection's
    /// own user, no superuser, no `CREATEROLE`, replication or `BYPASSRLS` (a caller who
    /// may write static roles would otherwise read the password of the database's admin).
    async fn check_manageable(&self, db_name: &str, username: &str) -> Result<()> {
        if !self.allowed(db_name, username) {
            let allowed = self.connections.get(db_name).map(|c| c.allowed_usernames.join(", ")).unwrap_or_default();
            return Err(Error::invalid(format!(
                "username: connection {db_name} allows only {allowed} (allowed_usernames)"
            )));
        }
        let client = self.admin_client(db_name).await?;
        match self.administers(&client, db_name, username).await? {
            None => Err(Error::invalid(format!("username: database {db_name} has no role {username}"))),
            Some(true) => Err(Error::invalid(format!(
                "username: {username} can administer database {db_name} (it is, or is a member of, the admin \
                 connection's own user, a superuser, a role with CREATEROLE, REPLICATION or BYPASSRLS, or a \
                 predefined role that reaches the server's files or all data); static roles manage ordinary roles only"
            ))),
            Some(false) => Ok(()),
        }
    }

    /// Whether `username` is one of the connection's `allowed_usernames` (any, when it
    /// names none).
    fn allowed(&self, db_name: &str, username: &str) -> bool {
        let allowed = self.connections.get(db_name).map(|c| c.allowed_usernames.as_slice()).unwrap_or_default();
        allowed.is_empty() || allowed.iter().any(|p| crate::prefix_glob_matches(p, username))
    }

    /// The check of [`Self::check_manageable`] again, before a password is served or set:
    /// a role may have been made a superuser (or a member of one, ...) since its static
    /// role was made, or the connection's `allowed_usernames` changed. Such a static role
    /// serves and rotates no password until that is undone (409), so that whoever may read
    /// it does not get the password of a role that administers the database.
    async fn check_still_manageable(&self, client: &tokio_postgres::Client, role: &StaticRole) -> Result<()> {
        let (db, user) = (&role.db_name, &role.username);
        let why = if !self.allowed(db, user) {
            "is no longer one of its connection's allowed_usernames"
        } else {
            match self.administers(client, db, user).await? {
                Some(false) => return Ok(()),
                Some(true) => "can now administer the database",
                None => "no longer exists",
            }
        };
        NOT_MANAGEABLE.warn(
            "database: a static role's database role is no longer manageable",
            &format_args!("database {db}, role {user} {why}"),
        );
        Err(Error::Conflict(format!(
            "database {db}: role {user} {why}; its static role serves and rotates no password until that is \
             undone (or the static role is deleted)"
        )))
    }

    /// Whether `username` (or a role it is a member of) may administer the database;
    /// `None` if there is no such role.
    async fn administers(
        &self,
        client: &tokio_postgres::Client,
        db_name: &str,
        username: &str,
    ) -> Result<Option<bool>> {
        let failed = |e: tokio_postgres::Error| {
            tracing::warn!(db = %db_name, error = %e, "database: looking up a role failed");
            Error::Unavailable(format!("database {db_name}: cannot look up role {username} (see the server log)"))
        };
        // No row: no such role. Else whether the role itself, or any role it is a member
        // of, directly or not (whose privileges it can take with SET ROLE), may
        // administer the database.
        Ok(client
            .query_opt(
                "SELECT EXISTS (SELECT 1 FROM pg_roles r WHERE pg_has_role(u.oid, r.oid, 'MEMBER') AND \
                 (r.rolsuper OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls OR r.rolname = current_user \
                 OR r.rolname IN ('pg_execute_server_program', 'pg_read_server_files', 'pg_write_server_files', \
                 'pg_read_all_data', 'pg_write_all_data', 'pg_signal_backend'))) FROM pg_roles u WHERE u.rolname = $1",
                &[&username],
            )
            .await
            .map_err(failed)?
            .map(|row| row.get(0)))
    }

    /// The static role other than `name` that manages `role`'s database role, if any
    /// (roles made before the `database/managed/` records are found by this scan).
    async fn managed_by(&self, role: &StaticRole, name: &str) -> Result<Option<String>> {
        for (key, raw) in crate::store::scan_all(self.store.as_ref(), ROLE_PREFIX).await? {
            let other = key.trim_start_matches(ROLE_PREFIX);
            let r: StaticRole = decode_json(&key, &raw)?;
            if other != name && r.db_name == role.db_name && r.username == role.username {
                return Ok(Some(other.to_owned()));
            }
        }
        Ok(None)
    }

    /// `ALTER ROLE "<username>" WITH PASSWORD '<SCRAM-SHA-256 verifier>'` on the role's
    /// database. The password itself is never sent: PostgreSQL writes a failed statement
    /// to its log (and `log_statement = ddl` every one), shows the last statement of a
    /// session in `pg_stat_activity`, and a connection without TLS carries it in clear.
    /// The verifier, made here (PBKDF2 with a random salt, as `psql`'s `\password`
    /// does), is stored as it is and checks the password at login.
    async fn alter_role(&self, client: &tokio_postgres::Client, role: &StaticRole, password: &str) -> Result<()> {
        // Neither part can carry a quote: the name is [A-Za-z0-9_], the verifier
        // `SCRAM-SHA-256$<iterations>:<base64>$<base64>:<base64>` (ALTER ROLE takes no
        // bind parameters).
        debug_assert!(valid_username(&role.username));
        let secret = Zeroizing::new(password.as_bytes().to_vec());
        let verifier = tokio::task::spawn_blocking(move || postgres_protocol::password::scram_sha_256(&secret))
            .await
            .map_err(|e| Error::Internal(format!("password verifier: {e}")))?;
        debug_assert!(verifier.chars().all(|c| c.is_ascii_alphanumeric() || "$:+/=-".contains(c)));
        let sql = Zeroizing::new(format!("ALTER ROLE \"{}\" WITH PASSWORD '{verifier}'", role.username));
        client.batch_execute(&sql).await.map_err(|e| {
            tracing::warn!(db = %role.db_name, role = %role.username, code = ?e.code(), "database: ALTER ROLE failed");
            Error::Unavailable(format!(
                "database {}: ALTER ROLE {} failed (see the server log)",
                role.db_name, role.username
            ))
        })
    }

    /// Delete static role `name`, its claim on its database role and its passwords, in one
    /// transaction: stopped anywhere, all of it is there or none.
    async fn delete_role(&self, name: &str) -> Result<()> {
        let key = format!("{ROLE_PREFIX}{name}");
        let path = Self::creds_path(name)?;
        for _ in 0..100 {
            let mut ops = Vec::with_capacity(2);
            if let Some(raw) = self.store.get(&key).await? {
                let role: StaticRole = decode_json(&key, &raw)?;
                // The role and its claim go together (a claim whose role is gone would
                // refuse every later static role for that user).
                let managed = managed_key(&role.db_name, &role.username);
                if self.store.get(&managed).await?.as_deref() == Some(name.as_bytes()) {
                    ops.push(TxOp::Swap { key: managed, expected: name.as_bytes().to_vec(), new: None });
                }
                ops.push(TxOp::Swap { key: key.clone(), expected: raw, new: None });
            }
            if self.creds.delete_all_with(&path, ops).await? {
                return Ok(());
            }
        }
        Err(Error::Conflict(format!("static role {name} was changed concurrently; retry")))
    }

    /// Rotate if `when` still holds once the role's rotation claim is taken
    /// ([`crate::store::while_claimed`]; 409 while another holds it): a pending password
    /// is always applied first.
    ///
    /// The admin connection is taken before the claim: waiting for a free one (up to
    /// [`POOL_WAIT`]) must not eat into the claim's [`CLAIM_TTL`].
    async fn rotate(&self, name: &str, when: Rotate) -> Result<()> {
        let role = self.role(name).await?.ok_or_else(|| Error::NotFound(format!("no static role {name}")))?;
        let client = self.admin_client(&role.db_name).await?;
        let key = format!("{CLAIM_PREFIX}{name}");
        let work = self.rotate_claimed(name, &role.db_name, &client, when);
        match crate::store::while_claimed(&self.store, &key, CLAIM_TTL, work).await? {
            Some(r) => r,
            None => Err(Error::Conflict(format!("a rotation of role {name} is running"))),
        }
    }

    async fn rotate_claimed(
        &self,
        name: &str,
        db_name: &str,
        client: &tokio_postgres::Client,
        when: Rotate,
    ) -> Result<()> {
        let role = self.role(name).await?.ok_or_else(|| Error::NotFound(format!("no static role {name}")))?;
        if role.db_name != db_name {
            return Err(Error::Conflict(format!("static role {name} was made again meanwhile; retry")));
        }
        let (version, creds) = match self.load_creds(name, &role).await? {
            Some((v, c)) => (v, c),
            None => (0, Creds::none(&role)),
        };
        // Decided again under the claim: a rotation another request or replica made
        // since the caller looked is not followed by a second one at once (which would
        // replace a password just served).
        let has_password = creds.password.is_some();
        let wanted = match when {
            Rotate::Pending => false,
            Rotate::NoPassword => !has_password,
            Rotate::Due => !has_password || creds.next_rotation(&role) <= unix_now(),
            Rotate::Now => true,
        };
        if creds.pending.is_none() && !wanted {
            return Ok(());
        }
        // Checked before a new password is staged: a role that may no longer be managed
        // keeps the password it has, and none is left pending for later.
        self.check_still_manageable(client, &role).await?;
        // A pending password from a rotation that stopped half way is applied again:
        // the database may have it already.
        let (pending, version) = match &creds.pending {
            Some(p) => (Zeroizing::new(p.clone()), version),
            None => {
                let p = new_password()?;
                let mut staged = Creds::none(&role);
                staged.password = creds.password.clone();
                staged.pending = Some(p.to_string());
                staged.rotated_at = creds.rotated_at;
                self.store_creds(name, &staged, version).await?;
                // Test hook: die after the pending password is stored, before ALTER ROLE.
                #[cfg(debug_assertions)]
                crate::faults::crash_point("KEYVAULT_TEST_CRASH_DB_ROTATION");
                (p, version + 1)
            }
        };
        self.alter_role(client, &role, &pending).await?;
        let mut done = Creds::none(&role);
        done.password = Some(pending.to_string());
        done.rotated_at = unix_now();
        self.store_creds(name, &done, version).await?;
        tracing::info!(role = name, username = %role.username, "database: password rotated");
        Ok(())
    }

    async fn rotate_due(&self) -> Result<()> {
        for name in self.due_roles().await? {
            match self.rotate(&name, Rotate::Due).await {
                Ok(()) | Err(Error::Conflict(_)) => {}
                Err(e) => tracing::warn!(role = %name, error = %e, "database: scheduled rotation failed"),
            }
        }
        Ok(())
    }

    /// The static roles due for rotation. A role whose record or credentials cannot be
    /// read is warned about and skipped: the roles after it are still rotated. (Before,
    /// the first such role ended the pass, and every role after it in name order kept a
    /// password past its rotation period for as long as that one stayed unreadable.)
    async fn due_roles(&self) -> Result<Vec<String>> {
        let now = unix_now();
        let mut due = Vec::new();
        for (key, raw) in crate::store::scan_all(self.store.as_ref(), ROLE_PREFIX).await? {
            let name = key.trim_start_matches(ROLE_PREFIX).to_owned();
            let check = async {
                let role: StaticRole = decode_json(&key, &raw)?;
                Ok::<_, Error>(match self.load_creds(&name, &role).await? {
                    Some((_, c)) => c.pending.is_some() || c.next_rotation(&role) <= now,
                    None => true,
                })
            };
            match check.await {
                Ok(true) => due.push(name),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    role = %name,
                    error = %e,
                    "database: the static role or its credentials cannot be read; its scheduled rotation is skipped"
                ),
            }
        }
        Ok(due)
    }

    async fn static_creds(&self, name: &str) -> Result<Reply> {
        let role = self.role(name).await?.ok_or_else(|| Error::NotFound(format!("no static role {name}")))?;
        // Checked once, before anything is served (a rotation below checks again).
        let client = self.admin_client(&role.db_name).await?;
        self.check_still_manageable(&client, &role).await?;
        drop(client);
        // A pending password is applied first (here, or by whoever holds the claim).
        for _ in 0..20 {
            match self.load_creds(name, &role).await? {
                Some((_, c)) if c.pending.is_none() && c.password.is_some() => {
                    let password = c.password.as_deref().unwrap_or_default();
                    let ttl = c.next_rotation(&role).saturating_sub(unix_now());
                    let last =
                        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(c.rotated_at));
                    return Reply::data(&StaticCreds {
                        username: &role.username,
                        password,
                        last_vault_rotation: last.to_string(),
                        rotation_period: role.rotation_period,
                        ttl,
                    });
                }
                Some((_, c)) if c.pending.is_some() => match self.rotate(name, Rotate::Pending).await {
                    Ok(()) => continue,
                    Err(Error::Conflict(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Err(e),
                },
                // None yet (or only another database role's).
                _ => match self.rotate(name, Rotate::NoPassword).await {
                    Ok(()) => continue,
                    Err(Error::Conflict(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Err(e),
                },
            }
        }
        Err(Error::Unavailable(format!("a rotation of role {name} is still running; retry")))
    }
}

#[async_trait]
impl Engine for Database {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        Ok(self.store.get(&format!("{ROLE_PREFIX}{}", req.param("name"))).await?)
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let name = req.param("name").to_owned();
        match (req.route.pattern, req.operation) {
            ("static-roles", _) => Reply::keys(crate::store::list_names(self.store.as_ref(), ROLE_PREFIX).await?),
            ("static-roles/{name}", Operation::Read) => {
                let role = self.role(&name).await?.ok_or_else(|| Error::NotFound(format!("no static role {name}")))?;
                Reply::data(&role)
            }
            ("static-roles/{name}", Operation::Write) => {
                let b: RoleWrite = req.data()?;
                let old = self.role(&name).await?;
                let role = StaticRole {
                    db_name: b.db_name.or(old.as_ref().map(|r| r.db_name.clone())).unwrap_or_default(),
                    username: b.username.or(old.as_ref().map(|r| r.username.clone())).unwrap_or_default(),
                    rotation_period: b
                        .rotation_period
                        .map(|d| d.as_secs())
                        .or(old.as_ref().map(|r| r.rotation_period))
                        .unwrap_or(24 * 3600),
                };
                if !self.connections.contains_key(&role.db_name) {
                    let known: Vec<&str> = self.connections.keys().map(String::as_str).collect();
                    return Err(Error::invalid(format!(
                        "db_name: one of the configured connections ({})",
                        known.join(", ")
                    )));
                }
                if !valid_username(&role.username) {
                    return Err(Error::invalid("username: a PostgreSQL role of letters, digits and _ (at most 63)"));
                }
                if role.rotation_period < 5 {
                    return Err(Error::invalid("rotation_period: at least 5 seconds"));
                }
                if old.as_ref().is_some_and(|o| o.username != role.username || o.db_name != role.db_name) {
                    return Err(Error::invalid(
                        "a static role's db_name and username cannot change; delete it and create another",
                    ));
                }
                let key = format!("{ROLE_PREFIX}{name}");
                let expected = req.existing.clone();
                // A database role is managed by one static role: two would each set a
                // password the other serves, and the second would read the first's.
                // A new role and its claim on the database role are written in one
                // transaction: of two static roles naming one user, one wins.
                let write = match (old.is_none(), expected) {
                    // The existence check found the role (so `update` sufficed), and it
                    // has been deleted since: making it now would be a create by a caller
                    // who may lack `create`.
                    (true, Some(_)) => {
                        return Err(Error::Conflict(format!("static role {name} was deleted concurrently")));
                    }
                    (true, None) => {
                        self.check_manageable(&role.db_name, &role.username).await?;
                        if let Some(other) = self.managed_by(&role, &name).await? {
                            return Err(Error::invalid(format!(
                                "username: {} on {} is managed by static role {other}",
                                role.username, role.db_name
                            )));
                        }
                        vec![
                            TxOp::Insert {
                                key: managed_key(&role.db_name, &role.username),
                                value: name.as_bytes().to_vec(),
                            },
                            TxOp::Insert { key: key.clone(), value: encode_json(&role) },
                        ]
                    }
                    (false, Some(raw)) => {
                        vec![TxOp::Swap { key: key.clone(), expected: raw, new: Some(encode_json(&role)) }]
                    }
                    (false, None) => {
                        return Err(Error::Conflict(format!("static role {name} was changed concurrently")));
                    }
                };
                // A new role: passwords stored at its name (left by an older version, which
                // deleted the role before its passwords) are not its own, and go in the
                // same transaction.
                let committed = if old.is_none() {
                    self.creds.delete_all_with(&Self::creds_path(&name)?, write).await?
                } else {
                    self.store.transact(write).await? == TxOutcome::Committed
                };
                if !committed {
                    return Err(Error::Conflict(format!(
                        "static role {name}, or another static role for {} on {}, was written concurrently",
                        role.username, role.db_name
                    )));
                }
                // A new role's password is set at once (as Vault does).
                if old.is_none() {
                    self.rotate(&name, Rotate::NoPassword).await?;
                }
                Ok(Reply::empty())
            }
            ("static-roles/{name}", Operation::Delete) => {
                // Under the role's rotation claim: no rotation runs meanwhile (one that
                // ran after the passwords were gone would set and store a new one for a
                // role being deleted).
                let claim = format!("{CLAIM_PREFIX}{name}");
                match crate::store::while_claimed(&self.store, &claim, CLAIM_TTL, self.delete_role(&name)).await? {
                    Some(r) => r?,
                    None => return Err(Error::Conflict(format!("a rotation of role {name} is running; retry"))),
                }
                Ok(Reply::empty())
            }
            ("static-creds/{name}", _) => self.static_creds(&name).await,
            ("rotate-role/{name}", _) => {
                req.data::<keyvault_api::Empty>()?;
                self.rotate(&name, Rotate::Now).await?;
                req.audit_detail(format!("password of static role {name} rotated"));
                Ok(Reply::empty())
            }
            _ => Err(Error::UnsupportedOperation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored passwords are served only for the database role they were set for;
    /// those stored before the binding are taken to be the static role's.
    #[test]
    fn credentials_are_bound_to_their_database_role() {
        let role = |db: &str, user: &str| StaticRole { db_name: db.into(), username: user.into(), rotation_period: 60 };
        let app = role("main", "app");
        let mut c = Creds::none(&app);
        c.password = Some("p".into());
        assert!(c.is_for(&app));
        assert!(!c.is_for(&role("main", "other")));
        assert!(!c.is_for(&role("other", "app")));
        let legacy: Creds = serde_json::from_str(r#"{"password":"p","pending":null,"rotated_at":1}"#).unwrap();
        assert!(legacy.is_for(&role("any", "one")));
        let stored = serde_json::to_string(&c).unwrap();
        assert!(stored.contains(r#""db_name":"main""#) && stored.contains(r#""username":"app""#), "{stored}");
    }

    /// A role whose record or credentials cannot be read does not stop the scheduled
    /// pass: the roles after it are still found due.
    #[tokio::test]
    async fn an_unreadable_role_does_not_hide_the_roles_after_it() {
        let k = crate::test_support::Keyed::new().await;
        let db = Database {
            store: k.store.clone(),
            creds: Secrets::database(k.store.clone(), k.barrier(), 10),
            connections: BTreeMap::new(),
        };
        let role = StaticRole { db_name: "main".into(), username: "app".into(), rotation_period: 60 };
        k.store.put(&format!("{ROLE_PREFIX}a"), b"not a role").await.unwrap();
        for name in ["b", "c"] {
            k.store.put(&format!("{ROLE_PREFIX}{name}"), &encode_json(&role)).await.unwrap();
        }
        // `c`'s credentials are there but not credentials.
        db.creds.write(&Database::creds_path("c").unwrap(), br#"{"password": 5}"#).await.unwrap();
        assert_eq!(db.due_roles().await.unwrap(), ["b"]);
    }

    #[test]
    fn connection_options_are_bounded() {
        let parse = |extra: &str| -> ConnectionConfig {
            toml::from_str(&format!("connection = \"host=/tmp user=admin\"\n{extra}")).unwrap()
        };
        let c = parse("");
        assert_eq!((c.max_open_connections, c.max_connection_lifetime), (4, None));
        assert!(c.check().is_ok());
        assert_eq!(parse("max_connection_lifetime = \"10m\"").max_connection_lifetime, Some(Duration::from_secs(600)));
        for n in [1, 64] {
            assert!(parse(&format!("max_open_connections = {n}")).check().is_ok());
        }
        for n in [0, 65, 100_000] {
            assert!(parse(&format!("max_open_connections = {n}")).check().is_err(), "{n}");
        }
        assert!(toml::from_str::<ConnectionConfig>("connection = \"x\"\nmax_open = 3").is_err());
    }

    #[test]
    fn passwords_and_names_cannot_break_out_of_the_statement() {
        for _ in 0..100 {
            let p = new_password().unwrap();
            assert_eq!(p.len(), 32);
            assert!(p.chars().all(|c| c.is_ascii_alphanumeric()));
        }
        assert!(valid_username("app_user1"));
        for bad in ["", "a\"b", "a'b", "a b", "a;b", &"x".repeat(64)] {
            assert!(!valid_username(bad), "{bad}");
        }
    }
}
