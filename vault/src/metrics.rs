//! Metrics in Prometheus' text format (`GET /v1/sys/metrics`, `/metrics`; docs/api.md),
//! through `prometheus-client`. One registry per process: the metrics are counters and
//! gauges bumped where the work happens, and histograms of latencies. Every label has a
//! bounded set of values (route templates, operation names, verdict reasons, status
//! codes): nothing a client sends becomes a label.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::{Counter as StoreCounter, Store, StoreResult, TxOp, TxOutcome};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// The route template (`GET /v1/secret/{*path}`), never the path requested.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 50 µs to about 1.6 s (doubling).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub request_seconds: Histograms<Route>,
    pub token_ops: Family<OpResult, Counter>,
    pub token_op_seconds: Histograms<Op>,
    pub token_queue_depth: Gauge,
    pub store_ops: Family<OpResult, Counter>,
    pub store_op_seconds: Histograms<Op>,
    pub store_writes: Counter,
    pub gateway_verdicts: Family<Reason, Counter>,
    pub audit_queue_depth: Gauge,
    pub audit_fsync_seconds: Histogram,
    pub rotation_active: Gauge,
    pub rotation_records_done: Gauge,
    pub rotation_records_total: Gauge,
    pub open_connections: Gauge,
    pub epoch_keys_loaded: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("keyvault");
        let m = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            token_ops: Family::default(),
            token_op_seconds: Family::new_with_constructor(latency),
            token_queue_depth: Gauge::default(),
            store_ops: Family::default(),
            store_op_seconds: Family::new_with_constructor(latency),
            store_writes: Counter::default(),
            gateway_verdicts: Family::default(),
            audit_queue_depth: Gauge::default(),
            audit_fsync_seconds: latency(),
            rotation_active: Gauge::default(),
            rotation_records_done: Gauge::default(),
            rotation_records_total: Gauge::default(),
            open_connections: Gauge::default(),
            epoch_keys_loaded: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests answered, by route template and status", m.requests.clone());
        registry.register("request_duration_seconds", "Request latency by route template", m.request_seconds.clone());
        registry.register(
            "token_operations",
            "Calls into the PKCS#11 token, by operation and result",
            m.token_ops.clone(),
        );
        registry.register(
            "token_operation_duration_seconds",
            "Latency of calls into the token, queueing for a token worker included",
            m.token_op_seconds.clone(),
        );
        registry.register("token_queue_depth", "Token calls waiting for a token worker", m.token_queue_depth.clone());
        registry.register("store_operations", "Storage operations, by operation and result", m.store_ops.clone());
        registry.register(
            "store_operation_duration_seconds",
            "Storage latency by operation",
            m.store_op_seconds.clone(),
        );
        registry.register(
            "store_writes",
            "Storage writes (a batch counts each item; the periodic purge of expired entries is not counted)",
            m.store_writes.clone(),
        );
        registry.register("gateway_verdicts", "Gateway signature checks, by verdict", m.gateway_verdicts.clone());
        registry.register("audit_queue_depth", "Audit entries waiting for the writer", m.audit_queue_depth.clone());
        registry.register(
            "audit_fsync_duration_seconds",
            "Audit log write and fsync latency",
            m.audit_fsync_seconds.clone(),
        );
        registry.register(
            "rotation_active",
            "1 while a master key rotation re-wraps records",
            m.rotation_active.clone(),
        );
        registry.register(
            "rotation_records_done",
            "Records re-wrapped by the current rotation pass",
            m.rotation_records_done.clone(),
        );
        registry.register(
            "rotation_records_total",
            "Records the current rotation pass found to re-wrap",
            m.rotation_records_total.clone(),
        );
        registry.register("open_connections", "Client connections open", m.open_connections.clone());
        registry.register("epoch_keys_loaded", "Epoch keys held in memory", m.epoch_keys_loaded.clone());
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// One answered request.
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        self.requests.get_or_create(&RouteStatus { route: route.to_owned(), status }).inc();
        self.request_seconds.get_or_create(&Route { route: route.to_owned() }).observe(took.as_secs_f64());
    }

    /// One call into the token.
    pub fn token_op(&self, op: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.token_ops.get_or_create(&OpResult { op, result }).inc();
        self.token_op_seconds.get_or_create(&Op { op }).observe(took.as_secs_f64());
    }

    /// One gateway verdict (`valid`, or the reason it was refused).
    pub fn gateway_verdict(&self, reason: &'static str) {
        self.gateway_verdicts.get_or_create(&Reason { reason }).inc();
    }
}

/// A store that counts and times every operation of the store it wraps.
#[derive(Debug)]
pub struct MeteredStore<S: ?Sized> {
    inner: std::sync::Arc<S>,
}

impl<S: Store + ?Sized> MeteredStore<S> {
    pub fn new(inner: std::sync::Arc<S>) -> Self {
        MeteredStore { inner }
    }
}

fn observe<T>(op: &'static str, writes: u64, started: Instant, r: &StoreResult<T>) {
    let m = get();
    let result = if r.is_ok() { "ok" } else { "error" };
    m.store_ops.get_or_create(&OpResult { op, result }).inc();
    m.store_op_seconds.get_or_create(&Op { op }).observe(started.elapsed().as_secs_f64());
    if writes > 0 {
        m.store_writes.inc_by(writes);
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for MeteredStore<S> {
    async fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let t = Instant::now();
        let r = self.inner.get(key).await;
        observe("get", 0, t, &r);
        r
    }

    async fn get_and_last_under(&self, key: &str, prefix: &str) -> StoreResult<crate::store::GetAndLast> {
        let t = Instant::now();
        let r = self.inner.get_and_last_under(key, prefix).await;
        observe("get_and_last_under", 0, t, &r);
        r
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<()> {
        let t = Instant::now();
        let r = self.inner.put(key, value).await;
        observe("put", 1, t, &r);
        r
    }

    async fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> StoreResult<bool> {
        let t = Instant::now();
        let r = self.inner.compare_and_swap(key, expected, new).await;
        observe("compare_and_swap", 1, t, &r);
        r
    }

    async fn renew(&self, key: &str, value: &[u8], ttl: Duration) -> StoreResult<bool> {
        let t = Instant::now();
        let r = self.inner.renew(key, value, ttl).await;
        observe("renew", 1, t, &r);
        r
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let t = Instant::now();
        let r = self.inner.delete(key).await;
        observe("delete", 1, t, &r);
        r
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<(String, Vec<u8>)>> {
        let t = Instant::now();
        let r = self.inner.scan_prefix(prefix, after, limit).await;
        observe("scan_prefix", 0, t, &r);
        r
    }

    async fn insert_if_absent(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        let t = Instant::now();
        let r = self.inner.insert_if_absent(key, value, ttl).await;
        observe("insert_if_absent", 1, t, &r);
        r
    }

    async fn insert_if_absent_many(&self, items: &[(String, Vec<u8>, Option<Duration>)]) -> StoreResult<Vec<bool>> {
        let t = Instant::now();
        let r = self.inner.insert_if_absent_many(items).await;
        observe("insert_if_absent_many", items.len() as u64, t, &r);
        r
    }

    async fn transact(&self, ops: Vec<TxOp>) -> StoreResult<TxOutcome> {
        let t = Instant::now();
        let r = self.inner.transact(ops).await;
        observe("transact", 1, t, &r);
        r
    }

    async fn transact_many(&self, txs: Vec<Vec<TxOp>>) -> StoreResult<Vec<TxOutcome>> {
        let t = Instant::now();
        let n = txs.len() as u64;
        let r = self.inner.transact_many(txs).await;
        observe("transact_many", n, t, &r);
        r
    }

    async fn close_counter(&self, key: &str) -> StoreResult<()> {
        let t = Instant::now();
        let r = self.inner.close_counter(key).await;
        observe("close_counter", 1, t, &r);
        r
    }

    async fn counters(&self, prefix: &str) -> StoreResult<Vec<StoreCounter>> {
        let t = Instant::now();
        let r = self.inner.counters(prefix).await;
        observe("counters", 0, t, &r);
        r
    }

    async fn purge_expired(&self) -> StoreResult<u64> {
        let t = Instant::now();
        let r = self.inner.purge_expired().await;
        observe("purge_expired", 0, t, &r);
        r
    }

    async fn ping(&self) -> StoreResult<()> {
        let t = Instant::now();
        let r = self.inner.ping().await;
        observe("ping", 0, t, &r);
        r
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn clock_offset_ms(&self) -> StoreResult<Option<i64>> {
        let t = Instant::now();
        let r = self.inner.clock_offset_ms().await;
        observe("clock", 0, t, &r);
        r
    }
}

/// A key store that counts and times every call of the one it wraps, each inside the
/// token gate ([`crate::token_gate`]), and its release too: dropping the last reference
/// closes the PKCS#11 library, which must not race the process's exit.
#[derive(Debug)]
pub struct MeteredKeyStore {
    /// `Some` until dropped.
    inner: Option<std::sync::Arc<dyn keyvault_hsm::KeyStore>>,
    /// Labels this process destroyed in the last [`DESTROYED_FOR`] (at most
    /// [`DESTROYED_MAX`]): a call that then finds such a key missing is told so at once,
    /// without re-initialising the module (a transit key deleted while requests that
    /// loaded it were in flight is gone, not a stale view; a re-initialisation would make
    /// every token call of the process wait for it).
    destroyed: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

/// Long enough for requests that loaded a key before its delete to reach the token (a call
/// times out after `[hsm] call_timeout`, 10 s by default); short, because another replica
/// sharing the token may make a key under the same label again (a transit key deleted and
/// created anew), which this process then sees only after a re-initialisation.
const DESTROYED_FOR: std::time::Duration = std::time::Duration::from_secs(10);
const DESTROYED_MAX: usize = 4096;

impl MeteredKeyStore {
    pub fn new(inner: std::sync::Arc<dyn keyvault_hsm::KeyStore>) -> Self {
        MeteredKeyStore { inner: Some(inner), destroyed: Default::default() }
    }

    /// The store to re-initialise when `label` looks missing: none for a key this process
    /// has just destroyed.
    fn recover(&self, label: &keyvault_hsm::KeyLabel) -> Option<&std::sync::Arc<dyn keyvault_hsm::KeyStore>> {
        let destroyed = self.destroyed.lock().unwrap_or_else(|p| p.into_inner());
        match destroyed.get(label.as_str()) {
            Some(t) if t.elapsed() < DESTROYED_FOR => None,
            _ => self.inner.as_ref(),
        }
    }

    fn destroyed_now(&self, label: &keyvault_hsm::KeyLabel) {
        let mut destroyed = self.destroyed.lock().unwrap_or_else(|p| p.into_inner());
        if destroyed.len() >= DESTROYED_MAX {
            destroyed.retain(|_, t| t.elapsed() < DESTROYED_FOR);
            if destroyed.len() >= DESTROYED_MAX {
                destroyed.clear();
            }
        }
        destroyed.insert(label.as_str().to_owned(), Instant::now());
    }

    fn k(&self) -> &dyn keyvault_hsm::KeyStore {
        // Invariant: `inner` is taken only in `drop`.
        self.inner.as_deref().expect("the key store is in use")
    }
}

impl Drop for MeteredKeyStore {
    fn drop(&mut self) {
        // After `token_gate::close` (the process is exiting) this waits for good: the
        // library is left to the exit.
        let _inside = crate::token_gate::enter();
        self.inner.take();
    }
}

fn timed<T>(
    op: &'static str,
    recover: Option<&std::sync::Arc<dyn keyvault_hsm::KeyStore>>,
    f: impl Fn() -> keyvault_hsm::Result<T>,
) -> keyvault_hsm::Result<T> {
    let t = Instant::now();
    let mut r = call(op, &f);
    // A key KeyVault's state names but the token does not show may have just been made by
    // another replica sharing the token: SoftHSM does not always see another process's
    // new object until it is initialised again. And SoftHSM can show a key twice to a
    // process that indexed the token while making it (docs/architecture.md). Either way,
    // re-initialise now, alone under the token gate, and look once more; a key still
    // missing or still shown twice is an error.
    let mut refreshed = false;
    if let (Err(e), Some(inner)) = (&r, recover)
        && e.may_be_stale_view()
        && crate::token_recovery::refresh_now(inner, t)
    {
        refreshed = true;
        r = call(op, &f);
    }
    // A view still wrong after a fresh re-initialisation needs no second one in the
    // background.
    let recover = recover.filter(|_| !(refreshed && r.as_ref().is_err_and(|e| e.may_be_stale_view())));
    finish(op, recover, r, t)
}

/// One call inside the token gate (and the test fault layer in debug builds).
fn call<T>(op: &'static str, f: impl FnOnce() -> keyvault_hsm::Result<T>) -> keyvault_hsm::Result<T> {
    let _inside = crate::token_gate::enter();
    #[cfg(debug_assertions)]
    crate::faults::before(op)?;
    #[cfg(not(debug_assertions))]
    let _ = op;
    f()
}

/// After a call: start recovering the token if the error calls for it, count the call.
fn finish<T>(
    op: &'static str,
    recover: Option<&std::sync::Arc<dyn keyvault_hsm::KeyStore>>,
    r: keyvault_hsm::Result<T>,
    started: Instant,
) -> keyvault_hsm::Result<T> {
    if let (Err(e), Some(inner)) = (&r, recover)
        && crate::token_recovery::wants(e)
    {
        crate::token_recovery::kick(inner.clone());
    }
    get().token_op(op, r.is_ok(), started.elapsed());
    r
}

impl keyvault_hsm::KeyStore for MeteredKeyStore {
    fn generate_claimed(
        &self,
        label: &keyvault_hsm::KeyLabel,
        kind: keyvault_hsm::KeyKind,
        claim_ends: std::time::Instant,
    ) -> keyvault_hsm::Result<()> {
        // A label made again (a transit key deleted and created anew) is a live key.
        self.destroyed.lock().unwrap_or_else(|p| p.into_inner()).remove(label.as_str());
        timed("generate", self.inner.as_ref(), || self.k().generate_claimed(label, kind, claim_ends))
    }
    fn exists(&self, label: &keyvault_hsm::KeyLabel) -> keyvault_hsm::Result<bool> {
        timed("exists", self.recover(label), || self.k().exists(label))
    }
    fn list(&self, prefix: &str) -> keyvault_hsm::Result<Vec<keyvault_hsm::KeyLabel>> {
        timed("list", self.inner.as_ref(), || self.k().list(prefix))
    }
    fn destroy(&self, label: &keyvault_hsm::KeyLabel) -> keyvault_hsm::Result<bool> {
        let r = timed("destroy", self.inner.as_ref(), || self.k().destroy(label));
        if r.is_ok() {
            self.destroyed_now(label);
        }
        r
    }
    fn wrap_key(&self, kek: &keyvault_hsm::KeyLabel, key: &[u8], aad: &[u8]) -> keyvault_hsm::Result<Vec<u8>> {
        timed("wrap_key", self.recover(kek), || self.k().wrap_key(kek, key, aad))
    }
    fn unwrap_key(
        &self,
        kek: &keyvault_hsm::KeyLabel,
        wrapped: &[u8],
        aad: &[u8],
    ) -> keyvault_hsm::Result<zeroize::Zeroizing<Vec<u8>>> {
        timed("unwrap_key", self.recover(kek), || self.k().unwrap_key(kek, wrapped, aad))
    }
    fn encrypt_aes_gcm(
        &self,
        label: &keyvault_hsm::KeyLabel,
        plaintext: &[u8],
        aad: &[u8],
    ) -> keyvault_hsm::Result<Vec<u8>> {
        timed("encrypt_aes_gcm", self.recover(label), || self.k().encrypt_aes_gcm(label, plaintext, aad))
    }
    fn decrypt_aes_gcm(
        &self,
        label: &keyvault_hsm::KeyLabel,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> keyvault_hsm::Result<zeroize::Zeroizing<Vec<u8>>> {
        timed("decrypt_aes_gcm", self.recover(label), || self.k().decrypt_aes_gcm(label, ciphertext, aad))
    }
    fn sign_ed25519(&self, label: &keyvault_hsm::KeyLabel, message: &[u8]) -> keyvault_hsm::Result<[u8; 64]> {
        timed("sign_ed25519", self.recover(label), || self.k().sign_ed25519(label, message))
    }
    fn ed25519_public_key(&self, label: &keyvault_hsm::KeyLabel) -> keyvault_hsm::Result<[u8; 32]> {
        timed("ed25519_public_key", self.recover(label), || self.k().ed25519_public_key(label))
    }
    fn hmac_sha256(&self, label: &keyvault_hsm::KeyLabel, message: &[u8]) -> keyvault_hsm::Result<[u8; 32]> {
        timed("hmac_sha256", self.recover(label), || self.k().hmac_sha256(label, message))
    }
    fn random_bytes(&self, len: usize) -> keyvault_hsm::Result<zeroize::Zeroizing<Vec<u8>>> {
        timed("random_bytes", self.inner.as_ref(), || self.k().random_bytes(len))
    }
    fn wrap_mechanism(&self) -> keyvault_hsm::WrapMechanism {
        self.k().wrap_mechanism()
    }
    fn seal(&self) {
        let _inside = crate::token_gate::enter();
        self.k().seal()
    }
    fn unseal(&self, pin: secrecy::SecretString) -> keyvault_hsm::Result<()> {
        // A missing key is not an unseal's error: no second look, so the PIN is moved in
        // once (no copy of it).
        let t = Instant::now();
        let r = call("unseal", || self.k().unseal(pin));
        finish("unseal", self.inner.as_ref(), r, t)
    }
    fn is_sealed(&self) -> bool {
        self.k().is_sealed()
    }
    fn reinitialize(&self) -> keyvault_hsm::Result<bool> {
        // Called with the token gate held alone (token_recovery): no entry here.
        self.k().reinitialize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many keys a process destroys, the labels it remembers as just destroyed
    /// are at most `DESTROYED_MAX`, and the last one is among them.
    #[test]
    fn the_labels_just_destroyed_stay_bounded() {
        let m = MeteredKeyStore { inner: None, destroyed: Default::default() };
        let label = |i: usize| keyvault_hsm::KeyLabel::new(format!("keyvault/transit/k{i}")).unwrap();
        let n = DESTROYED_MAX * 3 + 7;
        for i in 0..n {
            m.destroyed_now(&label(i));
            assert!(m.destroyed.lock().unwrap().len() <= DESTROYED_MAX, "after {i}");
        }
        assert!(m.destroyed.lock().unwrap().contains_key(label(n - 1).as_str()));
    }
}
