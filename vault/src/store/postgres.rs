//! The high-availability engine: PostgreSQL, shared by several KeyVault replicas.
//!
//! One table, `keyvault_kv (key TEXT COLLATE "C" PRIMARY KEY, value BYTEA, expires_at
//! TIMESTAMPTZ)`, created and migrated by KeyVault under an advisory lock. Every operation
//! is one statement (a batch of insert-if-absent is one transaction), so atomicity across
//! replicas comes from PostgreSQL: compare-and-swap is a conditional UPDATE, insert-if-
//! absent an `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`. Expiry uses the
//! database's clock, the same for every replica. A commit is durable when it returns
//! (`synchronous_commit` is PostgreSQL's default). A database that goes away makes calls
//! fail as unavailable (503); the pool reconnects when it returns.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};

use super::{Store, StoreError, StoreResult, check_key};

/// The schema version this build expects.
const SCHEMA_VERSION: i32 = 1;
/// Serializes schema migrations of replicas that start at the same moment.
const MIGRATION_LOCK: i64 = 0x6b65_7976_6175_6c74; // "keyvault"

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("postgres: {e}"))
}

/// How to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// A libpq-style URL or key=value string, without the password if `password` is set.
    pub url: String,
    pub password: Option<SecretString>,
    /// Verify the server's certificate against this CA and require TLS.
    pub tls_ca_file: Option<PathBuf>,
    pub pool_size: usize,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("tls", &self.tls_ca_file.is_some())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connect, and create or migrate the schema.
    pub async fn open(options: &PostgresOptions) -> StoreResult<Self> {
        let mut pg: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|_| StoreError::Unavailable("storage.url is not a valid PostgreSQL URL".into()))?;
        if let Some(p) = &options.password {
            pg.password(p.expose_secret());
        }
        pg.connect_timeout(Duration::from_secs(5));
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &options.tls_ca_file {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in crate::tls::load_certs(ca).map_err(|e| StoreError::Unavailable(e.to_string()))? {
                    roots.add(c).map_err(unavailable)?;
                }
                let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(unavailable)?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(pg, tokio_postgres_rustls::MakeRustlsConnect::new(config), manager_config)
            }
            None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(unavailable)?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(unavailable)
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(unavailable)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(unavailable)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS keyvault_schema (version INT NOT NULL);
             CREATE TABLE IF NOT EXISTS keyvault_kv (
                 key TEXT COLLATE \"C\" PRIMARY KEY,
                 value BYTEA NOT NULL,
                 expires_at TIMESTAMPTZ
             );
             CREATE INDEX IF NOT EXISTS keyvault_kv_expires ON keyvault_kv (expires_at) WHERE expires_at IS NOT NULL;",
        )
        .await
        .map_err(unavailable)?;
        let version: Option<i32> =
            tx.query_opt("SELECT version FROM keyvault_schema", &[]).await.map_err(unavailable)?.map(|r| r.get(0));
        match version {
            None => {
                tx.execute("INSERT INTO keyvault_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                    .await
                    .map_err(unavailable)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Unavailable(format!(
                    "the database schema is version {v}, newer than this KeyVault ({SCHEMA_VERSION}): upgrade KeyVault"
                )));
            }
            // Future migrations from older versions go here, one step at a time.
            Some(v) => return Err(StoreError::Unavailable(format!("no migration from schema version {v}"))),
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn insert_if_absent_in(
        c: &impl deadpool_postgres::GenericClient,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> StoreResult<bool> {
        check_key(key)?;
        let ms: Option<i64> = ttl.map(|t| t.as_millis().min(i64::MAX as u128) as i64);
        let n = c
            .execute(
                "INSERT INTO keyvault_kv (key, value, expires_at)
                 VALUES ($1, $2, CASE WHEN $3::BIGINT IS NULL THEN NULL ELSE now() + $3::BIGINT * INTERVAL '1 millisecond' END)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at
                 WHERE keyvault_kv.expires_at IS NOT NULL AND keyvault_kv.expires_at <= now()",
                &[&key, &value, &ms],
            )
            .await
            .map_err(unavailable)?;
        Ok(n == 1)
    }
}

const LIVE: &str = "(expires_at IS NULL OR expires_at > now())";

#[async_trait]
impl Store for PostgresStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        check_key(key)?;
        let c = self.client().await?;
        let row = c
            .query_opt(&format!("SELECT value FROM keyvault_kv WHERE key = $1 AND {LIVE}"), &[&key])
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        check_key(key)?;
        let c = self.client().await?;
        c.execute(
            "INSERT INTO keyvault_kv (key, value, expires_at) VALUES ($1, $2, NULL)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL",
            &[&key, &value],
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        check_key(key)?;
        let c = self.client().await?;
        let n = match (expected, new) {
            (None, Some(n)) => c
                .execute(
                    "INSERT INTO keyvault_kv (key, value, expires_at) VALUES ($1, $2, NULL)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL
                     WHERE keyvault_kv.expires_at IS NOT NULL AND keyvault_kv.expires_at <= now()",
                    &[&key, &n],
                )
                .await
                .map_err(unavailable)?,
            (None, None) => {
                let live = c
                    .query_opt(&format!("SELECT 1 FROM keyvault_kv WHERE key = $1 AND {LIVE}"), &[&key])
                    .await
                    .map_err(unavailable)?;
                u64::from(live.is_none())
            }
            (Some(e), Some(n)) => c
                .execute(
                    &format!(
                        "UPDATE keyvault_kv SET value = $3, expires_at = NULL WHERE key = $1 AND value = $2 AND {LIVE}"
                    ),
                    &[&key, &e, &n],
                )
                .await
                .map_err(unavailable)?,
            (Some(e), None) => c
                .execute(&format!("DELETE FROM keyvault_kv WHERE key = $1 AND value = $2 AND {LIVE}"), &[&key, &e])
                .await
                .map_err(unavailable)?,
        };
        Ok(n == 1)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        check_key(key)?;
        let c = self.client().await?;
        let row = c
            .query_opt(&format!("DELETE FROM keyvault_kv WHERE key = $1 RETURNING {LIVE}"), &[&key])
            .await
            .map_err(unavailable)?;
        Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let c = self.client().await?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => "",
        };
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = c
            .query(
                &format!(
                    "SELECT key, value FROM keyvault_kv
                     WHERE key >= $1 AND key > $2 AND starts_with(key, $1) AND {LIVE}
                     ORDER BY key LIMIT $3"
                ),
                &[&prefix, &start, &limit],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        let c = self.client().await?;
        Self::insert_if_absent_in(&c, key, value, ttl).await
    }

    async fn insert_if_absent_many(&self, items: &[(String, Vec<u8>, Option<Duration>)]) -> StoreResult<Vec<bool>> {
        let mut c = self.client().await?;
        // One transaction: one commit (one WAL flush) for the whole batch.
        let tx = c.transaction().await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(items.len());
        for (k, v, ttl) in items {
            out.push(Self::insert_if_absent_in(&tx, k, v, *ttl).await?);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn compare_and_swap_many(&self, items: &[(String, Vec<u8>, Vec<u8>)]) -> StoreResult<Vec<bool>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::with_capacity(items.len());
        for (k, _, _) in items {
            check_key(k)?;
            keys.push(k.as_str());
        }
        let olds: Vec<&[u8]> = items.iter().map(|(_, o, _)| o.as_slice()).collect();
        let news: Vec<&[u8]> = items.iter().map(|(_, _, n)| n.as_slice()).collect();
        let c = self.client().await?;
        // One statement, one commit: each row is swapped only if it still holds its
        // expected value (row locks make each swap atomic against concurrent writers).
        let rows = c
            .query(
                "UPDATE keyvault_kv AS t SET value = u.new, expires_at = NULL
                 FROM unnest($1::TEXT[], $2::BYTEA[], $3::BYTEA[]) AS u(key, old, new)
                 WHERE t.key = u.key AND t.value = u.old AND (t.expires_at IS NULL OR t.expires_at > now())
                 RETURNING t.key",
                &[&keys, &olds, &news],
            )
            .await
            .map_err(unavailable)?;
        let swapped: std::collections::HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        Ok(items.iter().map(|(k, _, _)| swapped.contains(k)).collect())
    }

    async fn purge_expired(&self) -> StoreResult<u64> {
        let c = self.client().await?;
        c.execute("DELETE FROM keyvault_kv WHERE expires_at IS NOT NULL AND expires_at <= now()", &[])
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute("SELECT 1", &[]).await.map_err(unavailable)?;
        Ok(())
    }

    async fn clock(&self) -> StoreResult<Option<std::time::SystemTime>> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8", &[])
            .await
            .map_err(unavailable)?;
        let micros: i64 = row.get(0);
        let micros = u64::try_from(micros).map_err(|_| unavailable("the database clock is before 1970"))?;
        Ok(Some(std::time::UNIX_EPOCH + Duration::from_micros(micros)))
    }
}
