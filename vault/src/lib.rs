//! KeyVault: an embedded secret vault and HSM-backed key service.
//!
//! The crate is organised in layers (docs/architecture.md): the domain — [`store`]
//! (storage engines), [`keys`] (the key hierarchy), [`barrier`] (envelope encryption),
//! [`secrets`], [`transit`], [`gateway`], [`policy`], [`token`], [`auth`] (identity),
//! [`audit`], [`rotation`]; the logical layer — [`logical`] (requests, routes, the
//! [`Engine`](logical::Engine) trait, the mount table) and [`engines`]; the [`service`],
//! built from a configuration by one builder, whose pipeline every request goes through;
//! and [`http`], the adapter that serves it over TLS. Only `keyvault-hsm` touches
//! PKCS#11; the wire types are in `keyvault-api`.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod barrier;
pub mod config;
pub mod engines;
pub mod epoch;
pub mod error;
#[cfg(debug_assertions)]
pub mod faults;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod hardening;
pub mod http;
pub mod json;
pub mod keys;
pub mod logical;
pub mod metrics;
pub mod policy;
pub mod ratelog;
pub mod rotation;
pub mod secrets;
pub mod service;
pub mod shared;
#[cfg(test)]
mod shared_token_tests;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tls;
pub mod token;
pub mod transit;
pub mod usage;
pub mod wrapping;

use std::sync::Arc;

use keyvault_hsm::KeyStore;

pub use error::{Error, Result};

/// Run a blocking key store call on tokio's blocking pool (a PKCS#11 call can take from
/// microseconds on SoftHSM to milliseconds on a network HSM; it must not stall a worker).
pub async fn hsm_call<T, F>(keys: &Arc<dyn KeyStore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn KeyStore) -> keyvault_hsm::Result<T> + Send + 'static,
{
    let keys = keys.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<keyvault_hsm::Result<T>>();
    token_workers::submit(Box::new(move || {
        // A caller that gave up (timed out, or its request was dropped) wants nothing:
        // its call is not made at all.
        if tx.is_closed() {
            return;
        }
        let _ = tx.send(f(keys.as_ref()));
    }))?;
    let limit = token_workers::call_timeout();
    match tokio::time::timeout(limit, rx).await {
        Ok(answer) => answer
            .map_err(|_| Error::Internal("a key store call failed (its worker caught a panic)".into()))?
            .map_err(Error::Hsm),
        Err(_) => {
            crate::metrics::get().token_op("timeout", false, limit);
            Err(Error::Hsm(keyvault_hsm::HsmError::CallTimeout { secs: limit.as_secs().max(1) }))
        }
    }
}

/// The token workers (docs/architecture.md, "Token workers"): a few dedicated threads that
/// make every request's calls into the key store, fed by one queue. A request task hands
/// its call over and awaits the answer; a worker that finds calls waiting runs them one
/// after another without going to sleep, so under load a wake-up serves many calls (with
/// `spawn_blocking`, each call was a hand-off to a pool thread and back). SoftHSM
/// serialises on a global lock: two workers suffice; a network HSM wants more
/// (`[hsm] workers`). The queue holds what requests in flight asked for: it is bounded by
/// the connection limits.
pub mod token_workers {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{Receiver, Sender};
    use std::sync::{Arc, Mutex, OnceLock};

    use crate::error::{Error, Result};

    /// One call, with its answer channel inside.
    pub type Job = Box<dyn FnOnce() + Send>;

    static WANTED: AtomicUsize = AtomicUsize::new(2);
    static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10_000);
    static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

    /// How many workers to start (before the first call; later calls change nothing), and
    /// how long a caller waits for its answer (`[hsm] call_timeout`).
    pub fn configure(workers: usize, call_timeout: std::time::Duration) {
        WANTED.store(workers.clamp(1, 64), Ordering::Relaxed);
        TIMEOUT_MS.store(call_timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// How long [`crate::hsm_call`] waits for an answer.
    pub fn call_timeout() -> std::time::Duration {
        std::time::Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
    }

    fn queue() -> Result<&'static Mutex<Sender<Job>>> {
        if let Some(q) = QUEUE.get() {
            return Ok(q);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..WANTED.load(Ordering::Relaxed) {
            let rx = rx.clone();
            if std::thread::Builder::new().name(format!("keyvault-token-{i}")).spawn(move || work(&rx)).is_ok() {
                started += 1;
            }
        }
        if started == 0 {
            return Err(Error::Internal("cannot start a token worker thread".into()));
        }
        // Another caller may have won the race: its queue is the one (this one's workers
        // end when their receiver's sender is dropped here).
        Ok(QUEUE.get_or_init(|| Mutex::new(tx)))
    }

    fn work(rx: &Mutex<Receiver<Job>>) {
        loop {
            // One worker waits on the queue at a time; the others wait for the lock.
            let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                Ok(job) => job,
                Err(_) => return,
            };
            crate::metrics::get().token_queue_depth.dec();
            // A panicking call drops its answer channel (its caller gets an error); the
            // worker lives on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }

    /// Queue a call for the workers.
    pub fn submit(job: Job) -> Result<()> {
        crate::metrics::get().token_queue_depth.inc();
        queue()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| Error::Internal("the token workers stopped".into()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_panicking_call_fails_alone_and_the_workers_serve_on() {
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            submit(Box::new(move || {
                let _answer = tx;
                panic!("a call that panics");
            }))
            .unwrap();
            assert!(rx.await.is_err(), "its caller learns it failed");
            let calls: Vec<_> = (0..1000u32)
                .map(|i| {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    submit(Box::new(move || {
                        let _ = tx.send(i * 2);
                    }))
                    .unwrap();
                    rx
                })
                .collect();
            let mut answers = Vec::new();
            for rx in calls {
                answers.push(rx.await.unwrap());
            }
            assert_eq!(answers, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
        }
    }
}

/// The way out of the PKCS#11 library at process exit. Every call into the key store
/// holds this gate shared ([`crate::metrics::MeteredKeyStore`] wraps the one every process
/// opens); [`token_gate::close`] takes it exclusively, waiting for the calls in flight, and
/// never gives it back. `main` closes it last, so that no thread (a token worker, the
/// audit writer) is inside the library while its static destructors run at exit: SoftHSM
/// crashes then (seen as a segfault in `libsofthsm2.so` and a command that exits with
/// signal 11 after doing its work).
pub mod token_gate {
    use std::time::Duration;

    use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    /// parking_lot's lock is fair: once a thread waits to take it alone, calls that come
    /// after wait behind it. (With the standard library's lock and `try_write`, calls one
    /// after another on two threads kept it shared for good, and a re-initialisation
    /// never got its turn: tested in `shared_token_tests`.)
    static GATE: RwLock<()> = parking_lot::const_rwlock(());

    /// Held while one call runs.
    pub fn enter() -> RwLockReadGuard<'static, ()> {
        GATE.read()
    }

    /// Hold the gate alone, waiting at most `within` for the calls in flight (new calls
    /// wait meanwhile): for re-initialising the module ([`crate::token_recovery`]). None if
    /// a call does not return in time (a hung module cannot be re-initialised under a
    /// caller); the calls that waited then go on.
    pub fn exclusive(within: Duration) -> Option<RwLockWriteGuard<'static, ()>> {
        GATE.try_write_for(within)
    }

    /// Wait for the calls in flight and let no other one in, ever. A call that does not
    /// return within `within` (a hung module) is given up on: false, and the process
    /// exits anyway (it cannot wait for a module that never answers).
    pub fn close(within: Duration) -> bool {
        match GATE.try_write_for(within) {
            Some(g) => {
                std::mem::forget(g);
                true
            }
            None => false,
        }
    }
}

/// Finding a token that went away and came back. PKCS#11 libraries such as SoftHSM look
/// for tokens only when initialised, so reconnecting sessions is not enough: after a call
/// fails because the token is unavailable or a key is missing, a thread re-initialises the
/// module (`KeyStore::reinitialize`) while holding the token gate alone, so that no call
/// is inside the library meanwhile. At most one attempt every [`token_recovery::EVERY`];
/// requests meanwhile get their 503 as before.
pub mod token_recovery {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use keyvault_hsm::{HsmError, KeyStore};

    /// The least time between two attempts.
    pub const EVERY: Duration = Duration::from_secs(2);

    static RUNNING: AtomicBool = AtomicBool::new(false);
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);

    /// Whether a failed call's error calls for an attempt.
    pub fn wants(e: &HsmError) -> bool {
        matches!(e, HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. }) || e.may_be_stale_view()
    }

    /// The least time between two [`refresh_now`] re-initialisations.
    pub const REFRESH_GAP: Duration = Duration::from_millis(200);

    /// When the last [`refresh_now`] started re-initialising.
    static REFRESHED: Mutex<Option<Instant>> = Mutex::new(None);

    /// Re-initialise the module now, on this thread, for a key found missing at `missed`
    /// (a key another process sharing the token just made: SoftHSM reads the token's
    /// objects afresh when initialised). Callers that missed a key at the same time share
    /// one re-initialisation: one that started after `missed` serves. At most one every
    /// [`REFRESH_GAP`] (a key truly missing must not keep the token gate shut), waiting
    /// for the calls in flight at most 2 s. True when the token is there afterwards (look
    /// again).
    pub fn refresh_now(keys: &Arc<dyn KeyStore>, missed: Instant) -> bool {
        let mut last = REFRESHED.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t > missed) {
            return true;
        }
        if let Some(wait) = last.and_then(|t| REFRESH_GAP.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        let Some(_alone) = crate::token_gate::exclusive(Duration::from_secs(2)) else { return false };
        *last = Some(Instant::now());
        match keys.reinitialize() {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "re-initialising the PKCS#11 module failed");
                false
            }
        }
    }

    /// Start an attempt in the background, unless one runs or ran less than [`EVERY`] ago.
    pub fn kick(keys: Arc<dyn KeyStore>) {
        {
            let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < EVERY) || RUNNING.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let spawned = std::thread::Builder::new().name("keyvault-token-recovery".into()).spawn(move || {
            if let Some(_alone) = crate::token_gate::exclusive(Duration::from_secs(2)) {
                match keys.reinitialize() {
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "re-initialising the PKCS#11 module failed"),
                }
            }
            RUNNING.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            RUNNING.store(false, Ordering::Release);
        }
    }
}

/// How much lower background work runs than requests (`nice` units).
const BACKGROUND_NICE: i32 = 10;

/// [`hsm_call`] for background work (re-wrapping during a rotation): on a thread of its
/// own with a lower scheduling priority, so that on a busy machine requests are served
/// first and the background work takes the idle time (at full speed when there is any).
pub async fn hsm_call_background<T, F>(keys: &Arc<dyn KeyStore>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn KeyStore) -> keyvault_hsm::Result<T> + Send + 'static,
{
    let keys = keys.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keyvault-background".into())
        .spawn(move || {
            // Best effort: where it is refused, the thread keeps the normal priority.
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE);
            let _ = tx.send(f(keys.as_ref()));
        })
        .map_err(|e| Error::Internal(format!("starting a background thread: {e}")))?;
    rx.await.map_err(|_| Error::Internal("background key store thread failed".into()))?.map_err(Error::Hsm)
}

/// A duration in a configuration file: `"30s"`, `"10m"`, `"1h 30m"`.
pub(crate) fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    use serde::Deserialize;
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

/// `value` is `pattern`, or starts with what precedes a trailing `*` of it (cert roles'
/// `allowed_uri_sans`, database connections' `allowed_usernames`).
pub fn prefix_glob_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// [`validate_name`] as a regular expression (for the OpenAPI document).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,128}$";

/// Names of roles, users and policies: 1-128 characters of `[A-Za-z0-9._-]`, so they are
/// safe in storage keys, policy paths and log lines.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("invalid {kind} name: use 1-128 characters of [A-Za-z0-9._-]")))
    }
}
