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
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::Statement;

use super::{
    Counter, GetAndLast, Store, StoreError, StoreResult, TxOp, TxOutcome, check_key, check_tx_keys, prefix_end,
};

/// The schema version this build expects. 2: the `keyvault_counters` table.
const SCHEMA_VERSION: i32 = 2;
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

// Every statement is one fixed string, prepared once per pooled connection ([`prepared`]):
// PostgreSQL parses and plans it once, and each call is then one round trip.

/// A live row is one without expiry or whose expiry is still ahead (the database's clock).
macro_rules! live {
    () => {
        "(expires_at IS NULL OR expires_at > now())"
    };
}
const GET: &str = concat!("SELECT value FROM keyvault_kv WHERE key = $1 AND ", live!());
/// A key's value (part 0) and the last live entry of the range [$2, $3) (part 1), in one
/// statement, so both come from one snapshot.
const GET_AND_LAST: &str = concat!(
    "(SELECT 0 AS part, key, value FROM keyvault_kv WHERE key = $1 AND ",
    live!(),
    ") UNION ALL (SELECT 1, key, value FROM keyvault_kv WHERE key >= $2 AND key < $3 AND ",
    live!(),
    " ORDER BY key DESC LIMIT 1)"
);
const IS_LIVE: &str = concat!("SELECT 1 FROM keyvault_kv WHERE key = $1 AND ", live!());
const PUT: &str = "INSERT INTO keyvault_kv (key, value, expires_at) VALUES ($1, $2, NULL) \
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL";
/// Inserts unless a live row holds the key (an expired one is replaced).
const INSERT_IF_ABSENT: &str = "INSERT INTO keyvault_kv (key, value, expires_at) VALUES ($1, $2, NULL) \
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = NULL \
    WHERE keyvault_kv.expires_at IS NOT NULL AND keyvault_kv.expires_at <= now()";
/// [`INSERT_IF_ABSENT`] with an optional time to live in milliseconds (`$3`).
const INSERT_IF_ABSENT_TTL: &str = "INSERT INTO keyvault_kv (key, value, expires_at) \
    VALUES ($1, $2, CASE WHEN $3::BIGINT IS NULL THEN NULL ELSE now() + $3::BIGINT * INTERVAL '1 millisecond' END) \
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at \
    WHERE keyvault_kv.expires_at IS NOT NULL AND keyvault_kv.expires_at <= now()";
/// Only a live row is swapped, and it keeps its expiry (see [`Store::compare_and_swap`]).
const SWAP: &str = concat!("UPDATE keyvault_kv SET value = $3 WHERE key = $1 AND value = $2 AND ", live!());
/// Many swaps in one statement: the keys, expected and new values as three arrays.
const SWAP_MANY: &str = concat!(
    "UPDATE keyvault_kv AS t SET value = u.new \
     FROM unnest($1::TEXT[], $2::BYTEA[], $3::BYTEA[]) AS u(key, old, new) \
     WHERE t.key = u.key AND t.value = u.old AND ",
    live!(),
    " RETURNING t.key"
);
/// Renews a live row holding `$2`: it expires `$3` milliseconds from now.
const RENEW: &str = concat!(
    "UPDATE keyvault_kv SET expires_at = now() + $3::BIGINT * INTERVAL '1 millisecond' \
     WHERE key = $1 AND value = $2 AND ",
    live!()
);
const DELETE_IF: &str = concat!("DELETE FROM keyvault_kv WHERE key = $1 AND value = $2 AND ", live!());
/// Deletes the key; returns whether the row was live.
const DELETE: &str = concat!("DELETE FROM keyvault_kv WHERE key = $1 RETURNING ", live!());
/// A page of the keys in [$1, $4) after $2. The range's end, not `starts_with` alone,
/// bounds the index scan: a prepared statement's generic plan cannot turn
/// `starts_with($1)` into a range, so a prefix with fewer than `$3` keys read the rest
/// of the table.
const SCAN: &str = concat!(
    "SELECT key, value FROM keyvault_kv WHERE key >= $1 AND key > $2 AND key < $4 AND starts_with(key, $1) AND ",
    live!(),
    " ORDER BY key LIMIT $3"
);
/// [`SCAN`] for a prefix with no range end (empty, or ending in a non-ASCII character).
const SCAN_TO_END: &str = concat!(
    "SELECT key, value FROM keyvault_kv WHERE key >= $1 AND key > $2 AND starts_with(key, $1) AND ",
    live!(),
    " ORDER BY key LIMIT $3"
);
/// The scan statement, for a test of its plan (`tests/tests/postgres.rs`).
#[doc(hidden)]
pub const SCAN_STATEMENT: &str = SCAN;
/// One batch of the purge of expired entries: small enough to finish well within the
/// statement timeout whatever the backlog, and skipping rows another replica's purge holds
/// (no lock waits between replicas purging at once).
const PURGE: &str = "DELETE FROM keyvault_kv WHERE key IN (SELECT key FROM keyvault_kv \
    WHERE expires_at IS NOT NULL AND expires_at <= now() LIMIT 5000 FOR UPDATE SKIP LOCKED)";
const PURGE_BATCH: u64 = 5000;
/// Adds `$2` to a counter unless it is closed and `$2` positive; returns a row if it did.
const COUNT: &str = "INSERT INTO keyvault_counters (key, value) VALUES ($1, $2) \
    ON CONFLICT (key) DO UPDATE SET value = keyvault_counters.value + EXCLUDED.value \
    WHERE EXCLUDED.value <= 0 OR NOT keyvault_counters.closed RETURNING value";
const CLOSE_COUNTER: &str = "INSERT INTO keyvault_counters (key, value, closed) VALUES ($1, 0, true) \
    ON CONFLICT (key) DO UPDATE SET closed = true";
const COUNTERS: &str = "SELECT key, value, closed FROM keyvault_counters WHERE starts_with(key, $1) ORDER BY key";
const PING: &str = "SELECT 1";
const CLOCK: &str = "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8";

/// Bound a PostgreSQL connection in time on both sides: server-side limits for each
/// statement, each lock wait and each idle transaction (`-c` settings sent at connect,
/// after any the URL gives), and TCP keepalives plus a user timeout so that a peer that
/// went silent (a dropped route, a blackholed packet) fails the connection within about
/// a minute instead of holding a request and a pool slot for good.
pub fn bound_in_time(pg: &mut tokio_postgres::Config, settings: &str) {
    let options = match pg.get_options() {
        Some(o) if !o.trim().is_empty() => format!("{o} -c {settings}"),
        _ => format!("-c {settings}"),
    };
    pg.options(options);
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.keepalives_interval(Duration::from_secs(10));
    pg.keepalives_retries(3);
    pg.tcp_user_timeout(Duration::from_secs(60));
}

/// `sql` as a statement prepared on this connection (cached by the pool with it).
async fn prepared(c: &impl GenericClient, sql: &str) -> StoreResult<Statement> {
    c.prepare_cached(sql).await.map_err(unavailable)
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
        bound_in_time(&mut pg, "statement_timeout=30s -c lock_timeout=10s -c idle_in_transaction_session_timeout=60s");
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &options.tls_ca_file {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                    .map_err(|e| StoreError::Unavailable(format!("storage.tls_ca_file {}: {e}", ca.display())))?;
                for c in certs {
                    roots.add(c).map_err(unavailable)?;
                }
                let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
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
             CREATE INDEX IF NOT EXISTS keyvault_kv_expires ON keyvault_kv (expires_at) WHERE expires_at IS NOT NULL;
             CREATE TABLE IF NOT EXISTS keyvault_counters (
                 key TEXT COLLATE \"C\" PRIMARY KEY,
                 value BIGINT NOT NULL,
                 closed BOOLEAN NOT NULL DEFAULT false
             );",
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
            Some(1) => {
                tx.execute("UPDATE keyvault_schema SET version = $1", &[&SCHEMA_VERSION]).await.map_err(unavailable)?;
            }
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

    /// A batch of re-wraps in one statement: every row still holding its expected value is
    /// swapped (row locks make each swap atomic against concurrent writers), then the
    /// counts of the swapped ones are applied, summed per counter. All in the caller's
    /// transaction: one commit for the batch.
    async fn swaps_with_counts(
        tx: &deadpool_postgres::Transaction<'_>,
        txs: &[Vec<TxOp>],
    ) -> StoreResult<Vec<TxOutcome>> {
        let mut keys: Vec<&str> = Vec::with_capacity(txs.len());
        let mut olds: Vec<&[u8]> = Vec::with_capacity(txs.len());
        let mut news: Vec<&[u8]> = Vec::with_capacity(txs.len());
        for t in txs {
            if let Some(TxOp::Swap { key, expected, new: Some(new) }) = t.first() {
                keys.push(key);
                olds.push(expected);
                news.push(new);
            }
        }
        let rows = tx.query(&prepared(tx, SWAP_MANY).await?, &[&keys, &olds, &news]).await.map_err(unavailable)?;
        let swapped: std::collections::HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let mut deltas: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        let mut out = Vec::with_capacity(txs.len());
        for (t, key) in txs.iter().zip(&keys) {
            if swapped.contains(*key) {
                for op in &t[1..] {
                    if let TxOp::Count { key, delta } = op {
                        *deltas.entry(key.as_str()).or_default() += *delta;
                    }
                }
                out.push(TxOutcome::Committed);
            } else {
                out.push(TxOutcome::Conflict);
            }
        }
        for (key, delta) in deltas {
            if !count(tx, key, delta).await? {
                // Re-wraps only ever add to the active version, which is never closed.
                return Err(StoreError::Unavailable(format!("counter {key} is closed")));
            }
        }
        Ok(out)
    }

    async fn insert_if_absent_in(
        c: &impl GenericClient,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> StoreResult<bool> {
        check_key(key)?;
        let ms: Option<i64> = ttl.map(|t| t.as_millis().min(i64::MAX as u128) as i64);
        let n =
            c.execute(&prepared(c, INSERT_IF_ABSENT_TTL).await?, &[&key, &value, &ms]).await.map_err(unavailable)?;
        Ok(n == 1)
    }
}

/// Run one transaction's steps in `c` (inside a transaction or savepoint); the first step
/// that fails decides the outcome (the caller rolls back).
async fn apply_ops(c: &impl GenericClient, ops: &[TxOp]) -> StoreResult<TxOutcome> {
    for op in ops {
        let ok = match op {
            TxOp::Insert { key, value } => {
                c.execute(&prepared(c, INSERT_IF_ABSENT).await?, &[key, value]).await.map_err(unavailable)? == 1
            }
            TxOp::Swap { key, expected, new: Some(new) } => {
                c.execute(&prepared(c, SWAP).await?, &[key, expected, new]).await.map_err(unavailable)? == 1
            }
            TxOp::Swap { key, expected, new: None } => {
                c.execute(&prepared(c, DELETE_IF).await?, &[key, expected]).await.map_err(unavailable)? == 1
            }
            TxOp::Count { key, delta } => {
                if !count(c, key, *delta).await? {
                    return Ok(TxOutcome::Closed);
                }
                true
            }
        };
        if !ok {
            return Ok(TxOutcome::Conflict);
        }
    }
    Ok(TxOutcome::Committed)
}

/// Add `delta` to a counter; false if it is closed and `delta` positive. The row lock
/// taken here is held until the transaction ends, so `close_counter` waits for it.
async fn count(c: &impl GenericClient, key: &str, delta: i64) -> StoreResult<bool> {
    let row = c.query_opt(&prepared(c, COUNT).await?, &[&key, &delta]).await.map_err(unavailable)?;
    Ok(row.is_some())
}

/// The shape of one re-wrap: one swap of an existing value, then counts.
fn is_swap_and_counts(ops: &[TxOp]) -> bool {
    matches!(ops.first(), Some(TxOp::Swap { new: Some(_), .. }))
        && ops[1..].iter().all(|o| matches!(o, TxOp::Count { .. }))
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgresql"
    }

    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        check_key(key)?;
        let c = self.client().await?;
        let row = c.query_opt(&prepared(&c, GET).await?, &[&key]).await.map_err(unavailable)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn get_and_last_under(&self, key: &str, prefix: &str) -> StoreResult<GetAndLast> {
        check_key(key)?;
        check_key(prefix)?;
        let end = prefix_end(prefix)?;
        let c = self.client().await?;
        let rows = c.query(&prepared(&c, GET_AND_LAST).await?, &[&key, &prefix, &end]).await.map_err(unavailable)?;
        let mut out = (None, None);
        for r in rows {
            match r.get::<_, i32>(0) {
                0 => out.0 = Some(r.get(2)),
                _ => out.1 = Some((r.get(1), r.get(2))),
            }
        }
        Ok(out)
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        check_key(key)?;
        let c = self.client().await?;
        c.execute(&prepared(&c, PUT).await?, &[&key, &value]).await.map_err(unavailable)?;
        Ok(())
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        check_key(key)?;
        let c = self.client().await?;
        let n = match (expected, new) {
            (None, Some(n)) => {
                c.execute(&prepared(&c, INSERT_IF_ABSENT).await?, &[&key, &n]).await.map_err(unavailable)?
            }
            (None, None) => {
                let live = c.query_opt(&prepared(&c, IS_LIVE).await?, &[&key]).await.map_err(unavailable)?;
                u64::from(live.is_none())
            }
            (Some(e), Some(n)) => c.execute(&prepared(&c, SWAP).await?, &[&key, &e, &n]).await.map_err(unavailable)?,
            (Some(e), None) => c.execute(&prepared(&c, DELETE_IF).await?, &[&key, &e]).await.map_err(unavailable)?,
        };
        Ok(n == 1)
    }

    async fn renew(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        check_key(key)?;
        let c = self.client().await?;
        let ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        let n = c.execute(&prepared(&c, RENEW).await?, &[&key, &value, &ms]).await.map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        check_key(key)?;
        let c = self.client().await?;
        let row = c.query_opt(&prepared(&c, DELETE).await?, &[&key]).await.map_err(unavailable)?;
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
        let rows = match prefix_end(prefix) {
            Ok(end) => c.query(&prepared(&c, SCAN).await?, &[&prefix, &start, &limit, &end]).await,
            Err(_) => c.query(&prepared(&c, SCAN_TO_END).await?, &[&prefix, &start, &limit]).await,
        }
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
        // In key order: two batches that share keys in different orders would otherwise
        // wait on each other's rows (a deadlock PostgreSQL resolves by failing one whole
        // batch). A stable sort keeps the first of two equal keys first.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| items[a].0.cmp(&items[b].0));
        let mut out = vec![false; items.len()];
        for i in order {
            let (k, v, ttl) = &items[i];
            out[i] = Self::insert_if_absent_in(&tx, k, v, *ttl).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(out)
    }

    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        check_tx_keys(&txs)?;
        if txs.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.client().await?;
        let mut tx = c.transaction().await.map_err(unavailable)?;
        let outcomes = if txs.len() == 1 {
            let outcome = apply_ops(&tx, &txs[0]).await?;
            if outcome != TxOutcome::Committed {
                tx.rollback().await.map_err(unavailable)?;
                return Ok(vec![outcome]);
            }
            vec![outcome]
        } else if txs.iter().all(|t| is_swap_and_counts(t)) {
            Self::swaps_with_counts(&tx, &txs).await?
        } else {
            let mut out = Vec::with_capacity(txs.len());
            for ops in &txs {
                let sp = tx.savepoint("keyvault_tx").await.map_err(unavailable)?;
                let outcome = apply_ops(&sp, ops).await?;
                if outcome == TxOutcome::Committed {
                    sp.commit().await.map_err(unavailable)?;
                } else {
                    sp.rollback().await.map_err(unavailable)?;
                }
                out.push(outcome);
            }
            out
        };
        tx.commit().await.map_err(unavailable)?;
        Ok(outcomes)
    }

    async fn close_counter(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        let c = self.client().await?;
        c.execute(&prepared(&c, CLOSE_COUNTER).await?, &[&key]).await.map_err(unavailable)?;
        Ok(())
    }

    async fn counters(&self, prefix: &str) -> StoreResult<Vec<Counter>> {
        let c = self.client().await?;
        let rows = c.query(&prepared(&c, COUNTERS).await?, &[&prefix]).await.map_err(unavailable)?;
        Ok(rows.into_iter().map(|r| Counter { key: r.get(0), value: r.get(1), closed: r.get(2) }).collect())
    }

    async fn purge_expired(&self) -> StoreResult<u64> {
        let c = self.client().await?;
        let purge = prepared(&c, PURGE).await?;
        let mut total = 0;
        // At most 200 batches (a million entries) per call; the next call goes on.
        for _ in 0..200 {
            let n = c.execute(&purge, &[]).await.map_err(unavailable)?;
            total += n;
            if n < PURGE_BATCH {
                break;
            }
        }
        Ok(total)
    }

    async fn ping(&self) -> StoreResult<()> {
        let c = self.client().await?;
        c.execute(&prepared(&c, PING).await?, &[]).await.map_err(unavailable)?;
        Ok(())
    }

    async fn clock_offset_ms(&self) -> StoreResult<Option<i64>> {
        // The connection and the statement first: waiting for them is not the reading.
        let c = self.client().await?;
        let statement = prepared(&c, CLOCK).await?;
        let local_ms =
            || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let before = local_ms();
        let row = c.query_one(&statement, &[]).await.map_err(unavailable)?;
        let after = local_ms();
        let micros: i64 = row.get(0);
        if micros < 0 {
            return Err(unavailable("the database clock is before 1970"));
        }
        Ok(Some(micros / 1000 - (before + after) / 2))
    }
}
