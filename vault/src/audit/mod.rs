//! The tamper-evident audit log (docs/architecture.md, "Audit log").
//!
//! Every request that reaches the router is appended as one JSON line before its reply is
//! sent: time, request id, identity, remote address, operation, path, outcome, status and
//! reason. Secret values and plaintexts never appear; tokens only as HMAC-SHA256 under a
//! per-log key derived from an HMAC key in the HSM. Lines are hash-chained and the chain
//! head is signed by the audit key in the HSM every `checkpoint_every` entries or
//! `checkpoint_interval`, at rotation and at shutdown (format: [`chain`]). A writer thread
//! batches appends: one write and one `fdatasync` per batch, then every request of the
//! batch proceeds.

pub mod chain;
pub mod verify;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use keyvault_hsm::KeyStore;
use secrecy::{ExposeSecret, SecretBox};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::hsm_call;
use crate::keys::KeyNames;

/// What happens when an entry cannot be written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// Every request waits for its entry to be on disk; if it cannot be written, the
    /// request fails with 503 (as Vault does).
    #[default]
    FailClosed,
    /// Requests do not wait for the disk; entries go through a bounded in-memory queue,
    /// and when it is full requests fail with 503. Never drops silently.
    Buffered,
    /// No audit log at all. For benchmarks only.
    DangerousOff,
}

/// `[audit]` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The active log file; rotated files get `.1`, `.2`, ... appended.
    pub path: PathBuf,
    #[serde(default)]
    pub mode: AuditMode,
    /// Sign the chain head after this many entries...
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    /// ...or after this long, whichever comes first.
    #[serde(default = "default_interval", deserialize_with = "crate::deserialize_duration")]
    pub checkpoint_interval: Duration,
    /// Rotate when the file grows past this size.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Queue bound in `buffered` mode.
    #[serde(default = "default_buffer")]
    pub buffer_entries: usize,
    /// In `buffered` mode, how long the writer gathers entries before one write and one
    /// fsync: the most an acknowledged request's entry waits for the disk.
    #[serde(default = "default_linger", deserialize_with = "crate::deserialize_duration")]
    pub buffered_linger: Duration,
    /// This replica's name in the log header (default: the host name).
    #[serde(default)]
    pub replica_id: Option<String>,
}

fn default_every() -> u64 {
    1000
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_max_file_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_buffer() -> usize {
    10_000
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}

impl AuditConfig {
    pub fn at(path: PathBuf) -> Self {
        AuditConfig {
            path,
            mode: AuditMode::default(),
            checkpoint_every: default_every(),
            checkpoint_interval: default_interval(),
            max_file_bytes: default_max_file_bytes(),
            buffer_entries: default_buffer(),
            buffered_linger: default_linger(),
            replica_id: None,
        }
    }
}

/// Who made a request, as far as the request path found out.
#[derive(Debug, Clone, Default)]
pub struct AuditIdentity {
    pub sub: Option<String>,
    pub role: Option<String>,
    pub accessor: Option<String>,
    pub method: Option<String>,
    pub cert_sha256: Option<String>,
}

/// Filled in while a request is handled, read when its entry is written.
#[derive(Debug, Default)]
pub struct AuditContext {
    pub identity: AuditIdentity,
    /// HMAC of the client token presented, if any.
    pub token_hmac: Option<String>,
    /// Why the request was refused or failed (a stable code).
    pub reason: Option<String>,
    /// What a privileged operation did (e.g. which identity the kill switch revoked).
    pub detail: Option<String>,
    /// Event entries the handler wants written just before the request's own entry, and
    /// made durable with it (the gateway's verdicts): one fsync for both.
    pub events: Vec<Map<String, Value>>,
    /// For a route whose handler records its own intent (`OpSpec::intent_by_handler`):
    /// the intent entry, written by [`record_intent`] just before the state change, and
    /// not at all by a request that turns out to change nothing.
    pub pending_intent: Option<PendingIntent>,
    /// The request's intent entry is on disk: its own entry is its outcome.
    pub had_intent: bool,
    /// The intent entry was handed to the writer (it may be on disk even if the request
    /// is dropped before it hears so): a request dropped before its outcome was queued
    /// owes one, written for it as `cancelled`.
    pub intent_queued: bool,
    /// The intent entry could not be written: the request was refused before it changed
    /// anything, and there is nothing more to write.
    pub intent_refused: bool,
}

/// An intent entry not written yet (see [`AuditContext::pending_intent`]).
#[derive(Debug)]
pub struct PendingIntent {
    pub log: Arc<AuditLog>,
    pub request_id: String,
    pub entry: Map<String, Value>,
}

/// Write the request's pending intent entry, if it has one (a route with
/// `OpSpec::intent_by_handler`), before the state change its handler is about to make.
/// Once per request; a no-op for a request without one (an in-process request, a route
/// whose pipeline wrote the intent already). An error means nothing may change: the
/// handler returns it (503).
pub async fn record_intent(slot: &AuditSlot) -> Result<()> {
    let pending = slot.lock().unwrap_or_else(|p| p.into_inner()).pending_intent.take();
    let Some(p) = pending else { return Ok(()) };
    // From here the intent may reach the disk even if this request is dropped: its
    // outcome is owed (see `AuditContext::intent_queued`).
    slot.lock().unwrap_or_else(|p| p.into_inner()).intent_queued = true;
    let written = p.log.append_kind(p.entry, EntryKind::Intent(p.request_id)).await;
    let mut ctx = slot.lock().unwrap_or_else(|p| p.into_inner());
    match written {
        Ok(()) => ctx.had_intent = true,
        Err(ref e) => {
            tracing::error!(error = %e, "audit entry not written: refusing the request");
            ctx.intent_refused = true;
        }
    }
    written
}

/// A shared slot for [`AuditContext`], put in every request's extensions.
pub type AuditSlot = Arc<Mutex<AuditContext>>;

/// What an entry is to the request that writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Written before a request that may change state runs (its request id): the change
    /// happens only if this is durable.
    Intent(String),
    /// The entry of a request whose intent was written (its request id): room for it
    /// on disk was reserved with the intent, and it is retried until it is written.
    Outcome(String),
    /// Any other entry (reads, logins, events).
    Plain,
}

/// The state of the audit log (`GET /v1/sys/health`, the `X-KeyVault-Audit` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuditState {
    /// Entries reach the disk.
    Writing = 0,
    /// Writes fail and are retried with backoff. `buffered`: requests are still answered
    /// and their entries kept in memory to be written on recovery; every reply says so
    /// in `X-KeyVault-Audit: degraded`.
    Degraded = 1,
    /// Entries cannot be accepted: `fail_closed` while writes fail (requests get 503,
    /// nothing they would change is changed), or `buffered` with its queue full.
    Failed = 2,
}

impl AuditState {
    pub fn name(self) -> &'static str {
        match self {
            AuditState::Writing => "ok",
            AuditState::Degraded => "degraded",
            AuditState::Failed => "failed",
        }
    }
}

/// Counters shared by the log handle and its writer thread.
#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    failed_writes: AtomicU64,
    /// Entries refused while writes failed (their requests got 503).
    refused: AtomicU64,
    /// Entries waiting in memory for the disk.
    waiting: AtomicU64,
    /// Outcome entries that found the writer's channel full. An outcome is not refused
    /// for want of room (its request's change was made, and every intent gets an
    /// outcome): it waits here, beside the channel, until the writer takes it (at most
    /// [`OVERFLOW_MAX`]).
    overflow: Overflow,
}

/// The most outcome entries that may wait beside a full queue. Past it an outcome is
/// lost, loudly (its request answers that it was carried out but not recorded): a bound
/// for buffered mode, where requests do not wait for their entries and so nothing else
/// bounds the intents outstanding.
const OVERFLOW_MAX: usize = 65_536;
/// How long an outcome waits beside the queue for its intent to come through the queue
/// first; after that it is written anyway (after its intent is better, but written is
/// what matters: an intent refused after it was queued never comes).
const OVERFLOW_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Overflow {
    jobs: std::sync::Mutex<Vec<(Instant, Job)>>,
    /// How many jobs wait (read without the lock, to shorten the writer's waits).
    len: std::sync::atomic::AtomicUsize,
    /// Set once the writer has stopped: nothing put here after it is taken.
    closed: AtomicBool,
}

impl std::fmt::Debug for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overflow({})", self.len.load(Ordering::Relaxed))
    }
}

impl Overflow {
    /// Put an outcome beside the full queue; `false` if it cannot wait (too many wait,
    /// or the writer stopped): the job is dropped, and with it any waiter's ack.
    fn push(&self, job: Job) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.len() >= OVERFLOW_MAX || self.closed.load(Ordering::SeqCst) {
            return false;
        }
        jobs.push((Instant::now(), job));
        self.len.store(jobs.len(), Ordering::Relaxed);
        true
    }

    /// Take the jobs `ready` accepts, and those that waited longer than
    /// [`OVERFLOW_PATIENCE`], in the order they came; the others stay.
    fn take(&self, mut ready: impl FnMut(&Job) -> bool) -> Vec<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *jobs)
            .into_iter()
            .partition(|(since, j)| since.elapsed() >= OVERFLOW_PATIENCE || ready(j));
        *jobs = kept;
        self.len.store(jobs.len(), Ordering::Relaxed);
        taken.into_iter().map(|(_, j)| j).collect()
    }

    /// The writer stopped: whatever waits is dropped (its waiters learn that it was not
    /// written), and nothing more is taken.
    fn close(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        let lost = jobs.len();
        jobs.clear();
        self.len.store(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::error!(entries = lost, "outcome entries waiting for the stopped audit writer are lost");
        }
    }
}

impl Shared {
    fn set_state(&self, s: AuditState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    fn state(&self) -> AuditState {
        match self.state.load(Ordering::Relaxed) {
            0 => AuditState::Writing,
            1 => AuditState::Degraded,
            _ => AuditState::Failed,
        }
    }
}

/// What `/v1/sys/health` shows of the audit log.
#[derive(Debug, Clone, Copy)]
pub struct AuditHealth {
    pub state: AuditState,
    pub failed_writes: u64,
    pub refused_entries: u64,
    pub waiting_entries: u64,
}

type Ack = oneshot::Sender<std::result::Result<(), String>>;

enum Job {
    Append(Map<String, Value>, Option<Ack>, EntryKind),
    Shutdown(oneshot::Sender<()>),
}

/// How long a request whose change was made waits for its outcome entry when the disk
/// fails, before it is answered 503 (the entry is still written when the disk recovers).
const OUTCOME_WAIT: Duration = Duration::from_secs(30);
/// After a checkpoint signature failed or timed out, the next is not tried for this long.
const SIGN_RETRY: Duration = Duration::from_secs(10);
/// Room kept on disk for the outcome entry of every request whose intent was written.
const OUTCOME_RESERVE: u64 = 8 * 1024;
/// An intent whose outcome has not come in this long no longer has room kept for it (its
/// request was lost without one: a full queue when it was dropped). No request runs
/// this long; an outcome queued behind a failing disk is still written when it recovers.
const AWAITING_LIMIT: Duration = Duration::from_secs(3600);
/// Extra room reserved at a time, so that reserving is rare.
const RESERVE_CHUNK: u64 = 64 * 1024;
/// The longest pause between two tries of a failing disk.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// While a disk fails, new entries may make the writer try again this often (a request
/// should not wait out a long backoff if the disk is back).
const RETRY_ON_DEMAND: Duration = Duration::from_millis(100);

/// The audit log of this process.
pub struct AuditLog {
    mode: AuditMode,
    tx: Option<SyncSender<Job>>,
    hmac_key: SecretBox<[u8; 32]>,
    public_key: [u8; 32],
    path: PathBuf,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("mode", &self.mode).field("path", &self.path).finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

fn unavailable(why: &str) -> Error {
    Error::Unavailable(format!("the audit log is unavailable ({why}); nothing was changed, retry later"))
}

impl Job {
    fn is_outcome(&self) -> bool {
        matches!(self, Job::Append(_, _, EntryKind::Outcome(_)))
    }

    /// An entry to append, as the writer queues it from now on.
    fn queued(self) -> Option<Queued> {
        match self {
            Job::Append(entry, ack, kind) => Some(Queued { entry, ack, kind, since: Instant::now() }),
            Job::Shutdown(_) => None,
        }
    }
}

/// The error of a request whose change was made but whose outcome entry cannot be
/// written at all (the writer stopped): it must not say "nothing was changed".
fn not_recorded(why: &str) -> Error {
    tracing::error!(why, "the outcome entry of a request that was carried out is lost");
    Error::Unavailable(format!("the request was carried out, but the audit log cannot record it ({why})"))
}

impl AuditLog {
    /// An outcome that found the writer's channel full waits beside it (see
    /// `Shared::overflow`); an error if it cannot (it is lost, and logged).
    fn wait_beside(&self, job: Job) -> Result<()> {
        if self.shared.overflow.push(job) {
            Ok(())
        } else {
            Err(not_recorded("too many entries wait for the writer, or it stopped"))
        }
    }

    /// A log that writes nothing, for administrative commands that serve no request
    /// (`operator init`, `operator root-token`): they must not write to the file a running
    /// server writes.
    pub async fn detached(config: &AuditConfig, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Result<Arc<AuditLog>> {
        let config = AuditConfig { mode: AuditMode::DangerousOff, ..config.clone() };
        Self::open_quietly(&config, keys, names, false).await
    }

    /// Open (or create) the log and start its writer thread.
    pub async fn open(config: &AuditConfig, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Result<Arc<AuditLog>> {
        Self::open_quietly(config, keys, names, true).await
    }

    async fn open_quietly(
        config: &AuditConfig,
        keys: &Arc<dyn KeyStore>,
        names: &KeyNames,
        say_off: bool,
    ) -> Result<Arc<AuditLog>> {
        let sign_label = names.audit_signing();
        let public_key = hsm_call(keys, move |k| k.ed25519_public_key(&sign_label)).await?;
        // The HMAC key of audit entries is derived in the HSM from the audit HMAC key,
        // which every replica of an installation shares: the same input hashes the same
        // on every replica and in every log file, wherever the files are.
        let hmac_label = names.audit_hmac();
        let context = b"keyvault.audit.hmac.v2".to_vec();
        let mut derived = hsm_call(keys, move |k| k.hmac_sha256(&hmac_label, &context)).await?;
        let hmac_key = SecretBox::new(Box::new(derived));
        zeroize::Zeroize::zeroize(&mut derived);
        let shared = Arc::new(Shared::default());
        if config.mode == AuditMode::DangerousOff {
            if say_off {
                tracing::warn!("the audit log is OFF (audit.mode = \"dangerous_off\")");
            }
            return Ok(Arc::new(AuditLog {
                mode: config.mode,
                tx: None,
                hmac_key,
                public_key,
                path: config.path.clone(),
                shared,
            }));
        }
        if let Some(dir) = config.path.parent() {
            // Only its owner may read the audit log: it names identities, paths and
            // outcomes (created 0700 here; an existing directory is left as the operator
            // set it, e.g. group-readable for a log shipper).
            crate::tls::create_private_dir(dir, "audit")?;
        }
        let writer = Writer::open(config.clone(), keys.clone(), names.clone(), public_key, shared.clone())?;
        let bound = match config.mode {
            AuditMode::Buffered => config.buffer_entries.max(1),
            // Requests wait for their entry, so the queue holds at most one per request
            // in flight; the bound only guards against a stuck disk.
            _ => 65_536,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(bound);
        std::thread::Builder::new()
            .name("keyvault-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::Internal(format!("cannot start the audit writer: {e}")))?;
        tracing::info!(path = %config.path.display(), mode = ?config.mode, "audit log open");
        Ok(Arc::new(AuditLog {
            mode: config.mode,
            tx: Some(tx),
            hmac_key,
            public_key,
            path: config.path.clone(),
            shared,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
    }

    /// The state of the log and its counters.
    pub fn health(&self) -> AuditHealth {
        // The count first: a state read after it is the failure's state or a later one.
        let failed_writes = self.shared.failed_writes.load(Ordering::Acquire);
        AuditHealth {
            state: if self.tx.is_none() { AuditState::Writing } else { self.shared.state() },
            failed_writes,
            refused_entries: self.shared.refused.load(Ordering::Relaxed),
            waiting_entries: self.shared.waiting.load(Ordering::Relaxed),
        }
    }

    /// The audit public key, base64 (what `audit verify` needs).
    pub fn public_key_b64(&self) -> String {
        STANDARD.encode(self.public_key)
    }

    /// HMAC-SHA256 of a sensitive value under this installation's audit key, as it
    /// appears in the log.
    pub fn hmac(&self, value: &[u8]) -> String {
        // Invariant: HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(self.hmac_key.expose_secret()).expect("HMAC takes any key length");
        mac.update(value);
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Append an entry (see [`AuditLog::append_kind`]).
    pub async fn append(&self, entry: Map<String, Value>) -> Result<()> {
        self.append_kind(entry, EntryKind::Plain).await
    }

    /// Append an entry. In `fail_closed` mode this returns once the entry is on disk;
    /// any failure is an error (the caller answers 503). An outcome entry whose disk
    /// fails waits for it up to [`OUTCOME_WAIT`], and is written when it recovers even if
    /// the wait ends first. In `buffered` mode it returns at once (503 if the queue is
    /// full).
    pub async fn append_kind(&self, entry: Map<String, Value>, kind: EntryKind) -> Result<()> {
        let Some(tx) = &self.tx else { return Ok(()) };
        match self.mode {
            AuditMode::FailClosed => {
                let outcome = matches!(kind, EntryKind::Outcome(_));
                let (ack, done) = oneshot::channel();
                match tx.try_send(Job::Append(entry, Some(ack), kind)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(job)) if outcome => self.wait_beside(job)?,
                    Err(TrySendError::Full(_)) => return Err(unavailable("the writer queue is full")),
                    Err(TrySendError::Disconnected(_)) if outcome => return Err(not_recorded("the writer stopped")),
                    Err(TrySendError::Disconnected(_)) => return Err(unavailable("the writer stopped")),
                }
                match done.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) if outcome => Err(Error::Unavailable(format!(
                        "the request was carried out, but the audit log cannot record it yet ({e}); \
                         its entry is written when the log recovers"
                    ))),
                    Ok(Err(e)) => Err(unavailable(&e)),
                    Err(_) if outcome => Err(not_recorded("the writer stopped")),
                    Err(_) => Err(unavailable("the writer stopped")),
                }
            }
            AuditMode::Buffered => match tx.try_send(Job::Append(entry, None, kind)) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(job)) if job.is_outcome() => self.wait_beside(job),
                Err(TrySendError::Full(_)) => {
                    self.shared.set_state(AuditState::Failed);
                    Err(unavailable("the buffer is full"))
                }
                Err(TrySendError::Disconnected(Job::Append(_, _, EntryKind::Outcome(_)))) => {
                    Err(not_recorded("the writer stopped"))
                }
                Err(TrySendError::Disconnected(_)) => Err(unavailable("the writer stopped")),
            },
            AuditMode::DangerousOff => Ok(()),
        }
    }

    /// Append several entries; in `fail_closed` mode returns once all are on disk (they
    /// usually share one batch).
    pub async fn append_many(&self, entries: Vec<Map<String, Value>>) -> Result<()> {
        if self.mode != AuditMode::FailClosed {
            for e in entries {
                self.append(e).await?;
            }
            return Ok(());
        }
        let Some(tx) = &self.tx else { return Ok(()) };
        let mut waits = Vec::with_capacity(entries.len());
        for e in entries {
            let (ack, done) = oneshot::channel();
            tx.try_send(Job::Append(e, Some(ack), EntryKind::Plain))
                .map_err(|_| unavailable("the writer queue is full or stopped"))?;
            waits.push(done);
        }
        for done in waits {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(unavailable(&e)),
                Err(_) => return Err(unavailable("the writer stopped")),
            }
        }
        Ok(())
    }

    /// Write `events`, then `entry` (of `kind`), and return once all are durable. With
    /// `fail_closed` they are queued together, so one fsync usually covers them all (a
    /// request waits once, not once for its events and again for its entry); any of them
    /// failing fails the call.
    pub async fn append_with_events(
        &self,
        events: Vec<Map<String, Value>>,
        entry: Map<String, Value>,
        kind: EntryKind,
    ) -> Result<()> {
        let tx = match &self.tx {
            Some(tx) if self.mode == AuditMode::FailClosed && !events.is_empty() => tx,
            _ => {
                self.append_many(events).await?;
                return self.append_kind(entry, kind).await;
            }
        };
        let mut waits = Vec::with_capacity(events.len());
        for e in events {
            let (ack, done) = oneshot::channel();
            tx.try_send(Job::Append(e, Some(ack), EntryKind::Plain))
                .map_err(|_| unavailable("the writer queue is full or stopped"))?;
            waits.push(done);
        }
        // Queued after the events: the writer takes entries in order, so by the time
        // this one is durable the events were written in the same batch or before it.
        let own = self.append_kind(entry, kind).await;
        for done in waits {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(unavailable(&e)),
                Err(_) => return Err(unavailable("the writer stopped")),
            }
        }
        own
    }

    /// Queue an entry without waiting for it (for a request being dropped: its outcome).
    /// A full queue or a stopped writer loses it, logged; the writer's record of the
    /// intent then ages out (see `AWAITING_LIMIT`).
    pub fn append_detached(&self, entry: Map<String, Value>, kind: EntryKind) {
        let Some(tx) = &self.tx else { return };
        if self.mode == AuditMode::DangerousOff {
            return;
        }
        match tx.try_send(Job::Append(entry, None, kind)) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) if job.is_outcome() => {
                // (`wait_beside` logs a loss.)
                let _ = self.wait_beside(job);
            }
            Err(_) => {
                tracing::error!("audit entry of a cancelled request not queued: the writer queue is full or stopped")
            }
        }
    }

    /// Write a final checkpoint and stop the writer (clean shutdown).
    pub async fn shutdown(&self) {
        if let Some(tx) = &self.tx {
            let (ack, done) = oneshot::channel();
            if tx.send(Job::Shutdown(ack)).is_ok() {
                let _ = done.await;
            }
        }
    }
}

/// A new event entry (not a request): rotation steps, gaps, kill-switch details.
pub fn event(kind: &str, fields: Value) -> Map<String, Value> {
    // The fields' own `type` or `time`, if any, win (as they always did).
    let mut m = match fields {
        Value::Object(f) => f,
        _ => Map::new(),
    };
    m.entry("type").or_insert_with(|| kind.into());
    m.entry("time").or_insert_with(|| now_rfc3339().into());
    m
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "keyvault".into())
}

/// An entry waiting for the disk.
struct Queued {
    entry: Map<String, Value>,
    ack: Option<Ack>,
    kind: EntryKind,
    since: Instant,
}

/// How the active file begins, when its first line is still to be written.
#[derive(Clone, Copy)]
enum FileStart {
    /// A new log: a header with this random genesis.
    Genesis([u8; 32]),
    /// A later file: a header that continues the durable head.
    Continues,
}

/// A write failure being ridden out (one per incident: one gap entry, one anomaly file
/// at most, log lines at most once a second).
struct Incident {
    since: Instant,
    first_error: String,
    failed_writes: u64,
    refused: u64,
}

static WRITE_FAILED: crate::ratelog::RateLimitedLog = crate::ratelog::RateLimitedLog::new();

/// The state of the active file, owned by the writer thread. Entries are chained from
/// the *durable* head: a batch is chained, written and fsynced as one, and only then do
/// the head, the sequence number and the size move. A failed write is cut off the file
/// (truncated back), so the chain on disk never names an entry that is not there.
struct Writer {
    config: AuditConfig,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    public_key: [u8; 32],
    replica: String,
    shared: Arc<Shared>,
    file: Option<std::fs::File>,
    /// (device, inode) of the file as we left it.
    identity: (u64, u64),
    /// Durable size of the file.
    size: u64,
    seq: u64,
    head: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The first lines of a file not written yet (set when a file is created).
    start: Option<FileStart>,
    /// An entry to write before the next ones (a gap or an event about the file).
    preamble: Vec<Map<String, Value>>,
    /// Room reserved on disk beyond `size` (fallocate, file size unchanged).
    reserved_end: u64,
    /// The file system supports reserving room.
    can_reserve: bool,
    /// Requests whose intent is on disk and whose outcome is not yet, with when the
    /// intent was written.
    awaiting: HashMap<String, Instant>,
    /// A checkpoint signature failed or timed out: none is tried again before then.
    sign_retry_at: std::cell::Cell<Option<Instant>>,
    incident: Option<Incident>,
    next_try: Instant,
    last_try: Instant,
    backoff: Duration,
}

/// `fdatasync` (behind the test fault layer in debug builds).
fn sync(f: &std::fs::File) -> std::io::Result<()> {
    #[cfg(debug_assertions)]
    crate::faults::audit_fsync()?;
    f.sync_data()
}

/// The head, sequence number and state of an existing file's last complete line.
struct Tail {
    head: [u8; 32],
    seq: u64,
    is_final_checkpoint: bool,
    valid_len: u64,
}

fn read_tail(path: &Path) -> std::io::Result<Option<Tail>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // The last 256 KiB, or more until the last complete line is whole in what was read
    // (a line longer than that: an older version wrote a request's method or path whole).
    let mut window = 256 * 1024u64;
    let (start, buf, end, begin) = loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        // The last complete line ends at the last newline; anything after it is a torn
        // write. It begins after the newline before, or at the start of the file.
        let end = buf.iter().rposition(|b| *b == b'\n');
        let begin = end.and_then(|e| buf[..e].iter().rposition(|b| *b == b'\n')).map(|i| i + 1);
        match (end, begin) {
            (Some(end), Some(begin)) => break (start, buf, end, begin),
            (Some(end), None) if start == 0 => break (start, buf, end, 0),
            (None, _) if start == 0 => return Ok(None),
            _ => window = window.saturating_mul(4),
        }
    };
    let line: Value = serde_json::from_slice(&buf[begin..end]).map_err(std::io::Error::other)?;
    let head = line.get("hash").and_then(Value::as_str).and_then(chain::decode_hash);
    let seq = line.get("seq").and_then(Value::as_u64);
    match (head, seq) {
        (Some(head), Some(seq)) => Ok(Some(Tail {
            head,
            seq,
            is_final_checkpoint: line.get("type").and_then(Value::as_str) == Some("checkpoint")
                && line.get("final").and_then(Value::as_bool) == Some(true),
            valid_len: start + end as u64 + 1,
        })),
        _ => Err(std::io::Error::other("the last line of the audit log is not an audit entry")),
    }
}

/// A chained batch, not yet written: its bytes and where the chain stands after it.
struct Chained {
    bytes: Vec<u8>,
    head: [u8; 32],
    seq: u64,
    since_checkpoint: u64,
    checkpointed: bool,
}

impl Writer {
    fn open(
        config: AuditConfig,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        public_key: [u8; 32],
        shared: Arc<Shared>,
    ) -> Result<Self> {
        let replica = config.replica_id.clone().unwrap_or_else(hostname);
        let shown = config.path.display().to_string();
        let io = |e: std::io::Error| Error::Config(format!("audit log {shown}: {e}"));
        let tail = read_tail(&config.path).map_err(io)?;
        let mut w = Writer {
            config,
            keys,
            names,
            public_key,
            replica,
            shared,
            file: None,
            identity: (0, 0),
            size: 0,
            seq: 0,
            head: [0u8; 32],
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            start: None,
            preamble: Vec::new(),
            reserved_end: 0,
            can_reserve: true,
            awaiting: HashMap::new(),
            sign_retry_at: std::cell::Cell::new(None),
            incident: None,
            next_try: Instant::now(),
            last_try: Instant::now(),
            backoff: Duration::from_millis(50),
        };
        match tail {
            None => {
                let genesis = crate::barrier::random::<32>().map_err(|e| Error::Config(e.to_string()))?;
                w.head = genesis;
                w.create_file(FileStart::Genesis(genesis)).map_err(io)?;
            }
            Some(t) => {
                let f = std::fs::OpenOptions::new().append(true).open(&w.config.path).map_err(io)?;
                let meta = f.metadata().map_err(io)?;
                let torn = meta.len() - t.valid_len;
                if torn > 0 {
                    // A write cut by a crash: drop the partial line, and say so in the log.
                    f.set_len(t.valid_len).map_err(io)?;
                }
                w.identity = (meta.dev(), meta.ino());
                w.size = t.valid_len;
                w.file = Some(f);
                w.seq = t.seq;
                w.head = t.head;
                if t.is_final_checkpoint {
                    w.preamble.push(header(&w.replica, &w.public_key, None, Some(t.head)));
                }
                if torn > 0 {
                    w.preamble.push(event("gap", json!({"reason": "torn_write_recovered", "dropped_bytes": torn})));
                }
                w.preamble.push(event("event", json!({"event": "audit_log_reopened", "replica": w.replica})));
            }
        }
        w.write(&[]).map_err(io)?;
        Ok(w)
    }

    /// Create a fresh file at the path (its first lines are written with the next batch);
    /// an empty file already there is taken as it is.
    fn create_file(&mut self, start: FileStart) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&self.config.path)?;
        let meta = f.metadata()?;
        if meta.len() != 0 {
            return Err(std::io::Error::other("a new audit file is not empty"));
        }
        self.identity = (meta.dev(), meta.ino());
        self.size = 0;
        self.reserved_end = 0;
        self.file = Some(f);
        self.start = Some(start);
        Ok(())
    }

    /// Chain `entries` (after whatever must come first) from the durable head.
    fn chain(&self, entries: &[&Map<String, Value>]) -> std::io::Result<Chained> {
        let mut c = Chained {
            bytes: Vec::new(),
            head: self.head,
            seq: self.seq,
            since_checkpoint: self.since_checkpoint,
            checkpointed: false,
        };
        let mut first: Vec<Map<String, Value>> = Vec::new();
        match self.start {
            Some(FileStart::Genesis(g)) => first.push(header(&self.replica, &self.public_key, Some(g), None)),
            Some(FileStart::Continues) => first.push(header(&self.replica, &self.public_key, None, Some(self.head))),
            None => {}
        }
        first.extend(self.preamble.iter().cloned());
        if let Some(i) = &self.incident {
            first.push(event(
                "gap",
                json!({
                    "reason": "write_failed",
                    "error": i.first_error,
                    "failed_writes": i.failed_writes,
                    "refused_entries": i.refused,
                    "lasted_ms": i.since.elapsed().as_millis() as u64,
                }),
            ));
        }
        for e in first.iter().chain(entries.iter().copied()) {
            self.push(&mut c, e);
            if c.since_checkpoint >= self.config.checkpoint_every {
                self.push_checkpoint(&mut c, false)?;
            }
        }
        Ok(c)
    }

    fn push(&self, c: &mut Chained, entry: &Map<String, Value>) {
        c.seq += 1;
        let is_checkpoint = entry.get("type").and_then(Value::as_str) == Some("checkpoint");
        let (line, hash) = chain::seal(entry, c.seq, &c.head);
        c.bytes.extend_from_slice(&line);
        c.head = hash;
        if !is_checkpoint {
            c.since_checkpoint += 1;
        }
    }

    /// Sign the head in the HSM and chain the checkpoint. While the key store is sealed
    /// nothing can be signed: the checkpoint waits for the unseal (the entries are
    /// written and chained meanwhile; a stop while sealed ends the log without its final
    /// checkpoint, and `audit verify` says so). Failing the write instead would refuse
    /// every request, the unseal among them.
    fn push_checkpoint(&self, c: &mut Chained, is_final: bool) -> std::io::Result<()> {
        if self.keys.is_sealed() {
            if is_final {
                tracing::warn!("stopping while sealed: the audit log ends without a final checkpoint");
            }
            return Ok(());
        }
        let message = chain::checkpoint_message(&c.head, c.seq + 1, is_final);
        let label = self.names.audit_signing();
        let Some(sig) = self.sign_checkpoint(&label, message) else {
            // The entries are written and chained without it; the next checkpoint signs
            // them all.
            if is_final {
                tracing::warn!("stopping without a final audit checkpoint: the key store did not sign it");
            }
            return Ok(());
        };
        let cp = event(
            "checkpoint",
            json!({"head": hex::encode(c.head), "final": is_final, "key": label.as_str(), "signature": STANDARD.encode(sig)}),
        );
        self.push(c, &cp);
        c.since_checkpoint = 0;
        c.checkpointed = true;
        Ok(())
    }

    /// Sign a checkpoint in the key store, through the token workers and within
    /// `[hsm] call_timeout`: a failing or hung token must not stop the writer (every
    /// request waits on it, those that need no token call too). A failure or a timeout is
    /// logged, and no checkpoint is tried for [`SIGN_RETRY`]: entries are written meanwhile,
    /// and the next checkpoint covers them.
    fn sign_checkpoint(&self, label: &keyvault_hsm::KeyLabel, message: Vec<u8>) -> Option<[u8; 64]> {
        if self.sign_retry_at.get().is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (keys, job_label) = (self.keys.clone(), label.clone());
        let submitted = crate::token_workers::submit(Box::new(move || {
            let _ = tx.send(keys.sign_ed25519(&job_label, &message));
        }));
        let limit = crate::token_workers::call_timeout();
        let failure = match submitted.map(|()| rx.recv_timeout(limit)) {
            Ok(Ok(Ok(sig))) => {
                self.sign_retry_at.set(None);
                return Some(sig);
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => format!("no answer within {} ms", limit.as_millis()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %failure, "audit checkpoint not signed; entries are written without one until it can be");
        self.sign_retry_at.set(Some(Instant::now() + SIGN_RETRY));
        None
    }

    /// Write a chained batch and make it durable, or leave the file as it was.
    fn commit(&mut self, c: Chained) -> std::io::Result<()> {
        let f = self.file.as_mut().ok_or_else(|| std::io::Error::other("no open audit file"))?;
        let started = Instant::now();
        let result = f.write_all(&c.bytes).and_then(|()| sync(f));
        crate::metrics::get().audit_fsync_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            // Cut off whatever part of the batch reached the file: the chain on disk
            // must end with an entry that is there.
            if let Err(t) = f.set_len(self.size).and_then(|()| sync(f)) {
                tracing::error!(error = %t, "cannot cut a failed audit write off the file");
                // Once per incident: a disk that keeps failing fails every cut-back.
                if !self.preamble.iter().any(|e| e.get("event").is_some_and(|v| v == "audit_file_unrepairable")) {
                    self.preamble.push(event("event", json!({"event": "audit_file_unrepairable"})));
                }
                self.file = None;
            }
            return Err(e);
        }
        self.size += c.bytes.len() as u64;
        self.head = c.head;
        self.seq = c.seq;
        self.since_checkpoint = c.since_checkpoint;
        if c.checkpointed {
            self.last_checkpoint = Instant::now();
        }
        self.start = None;
        self.preamble.clear();
        Ok(())
    }

    /// Write `entries` (and anything that must come first), chained, in one write.
    fn write(&mut self, entries: &[&Map<String, Value>]) -> std::io::Result<()> {
        self.check_file()?;
        let c = self.chain(entries)?;
        self.commit(c)?;
        if self.incident.take().is_some() {
            tracing::warn!("the audit log writes again; the failure is recorded in it as a gap");
        }
        Ok(())
    }

    /// Reserve room on disk (without changing the file's size) for `bytes` beyond its
    /// end. Space that is reserved cannot run out under a later write.
    fn reserve(&mut self, bytes: u64) -> std::io::Result<()> {
        let want = self.size + bytes;
        if want <= self.reserved_end {
            return Ok(());
        }
        if !self.can_reserve {
            return Ok(());
        }
        let f = self.file.as_ref().ok_or_else(|| std::io::Error::other("no open audit file"))?;
        let end = want + RESERVE_CHUNK;
        match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, self.size, end - self.size) {
            Ok(()) => {
                self.reserved_end = end;
                Ok(())
            }
            Err(rustix::io::Errno::OPNOTSUPP) => {
                tracing::warn!(
                    path = %self.config.path.display(),
                    "this file system cannot reserve room for audit entries (fallocate): a full disk can \
                     then stop the outcome entry of a change that was made (docs/operations.md)"
                );
                self.can_reserve = false;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Is the file at the path still ours, as we left it? A deleted, replaced or changed
    /// file is set aside (once) and a new one continues the chain with a gap entry.
    fn check_file(&mut self) -> std::io::Result<()> {
        let reason = match std::fs::metadata(&self.config.path) {
            _ if self.file.is_none() => Some("write_failed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("deleted"),
            Err(e) => return Err(e),
            Ok(m) if (m.dev(), m.ino()) != self.identity => Some("replaced"),
            Ok(m) if m.len() < self.size => Some("truncated"),
            Ok(m) if m.len() > self.size => Some("appended_by_another_writer"),
            Ok(_) => None,
        };
        let Some(reason) = reason else { return Ok(()) };
        let found = std::fs::metadata(&self.config.path).ok();
        // A file of ours that no write ever reached durably (made after an earlier failure,
        // or the first file of a new log, and every write to it failed): nothing in it was
        // acknowledged, so it is removed rather than set aside, and the file made in its
        // place begins as it would have, its gap (if any) still waiting in the preamble.
        // So a disk whose syncs fail for a long time leaves one anomaly file, not one per
        // retry (empty ones among them, which no verifier reads as a log).
        let ours = found.as_ref().is_some_and(|m| (m.dev(), m.ino()) == self.identity);
        if reason == "write_failed" && ours && self.size == 0 && self.start.is_some() {
            let start = self.start.take().unwrap_or(FileStart::Continues);
            std::fs::remove_file(&self.config.path)?;
            self.file = None;
            return self.create_file(start);
        }
        tracing::error!(path = %self.config.path.display(), reason, "the audit log file changed under the writer; starting a new file with a gap entry");
        let expected_size = self.size;
        if found.is_some() {
            let aside =
                PathBuf::from(format!("{}.anomaly-{}-{}", self.config.path.display(), crate::unix_now(), self.seq));
            std::fs::rename(&self.config.path, &aside)?;
        }
        self.file = None;
        self.create_file(FileStart::Continues)?;
        self.preamble.push(event(
            "gap",
            json!({"reason": reason, "expected_size": expected_size, "found_size": found.map(|m| m.len())}),
        ));
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut c = self.chain(&[])?;
        self.push_checkpoint(&mut c, true)?;
        self.commit(c)?;
        let mut n = 1;
        let rotated = loop {
            let candidate = PathBuf::from(format!("{}.{n}", self.config.path.display()));
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        if let Some(f) = &self.file {
            // Give back the room reserved beyond the end.
            let _ = f.set_len(self.size);
        }
        std::fs::rename(&self.config.path, &rotated)?;
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        self.file = None;
        self.create_file(FileStart::Continues)?;
        self.write(&[])
    }

    fn degraded(&self) -> bool {
        self.incident.is_some()
    }

    /// A write failed: keep what must be kept, refuse the rest, back off.
    fn failed(&mut self, e: &std::io::Error, queue: &mut Vec<Queued>) {
        let fail_closed = self.config.mode == AuditMode::FailClosed;
        let incident = self.incident.get_or_insert_with(|| Incident {
            since: Instant::now(),
            first_error: e.to_string(),
            failed_writes: 0,
            refused: 0,
        });
        incident.failed_writes += 1;
        // The state before the count (see `AuditLog::health`).
        self.shared.set_state(if fail_closed { AuditState::Failed } else { AuditState::Degraded });
        self.shared.failed_writes.fetch_add(1, Ordering::Release);
        WRITE_FAILED.error("writing the audit log failed; retrying with backoff", e);
        self.last_try = Instant::now();
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        let msg = e.to_string();
        let mut refused = 0u64;
        queue.retain_mut(|q| {
            let keep = !fail_closed || matches!(q.kind, EntryKind::Outcome(_));
            if keep {
                // An outcome whose request waited long enough is answered, and still
                // written when the disk recovers.
                if q.since.elapsed() >= OUTCOME_WAIT
                    && let Some(ack) = q.ack.take()
                {
                    let _ = ack.send(Err(msg.clone()));
                }
            } else {
                refused += 1;
                if let Some(ack) = q.ack.take() {
                    let _ = ack.send(Err(msg.clone()));
                }
            }
            keep
        });
        incident.refused += refused;
        self.shared.refused.fetch_add(refused, Ordering::Relaxed);
        self.shared.set_state(if fail_closed { AuditState::Failed } else { AuditState::Degraded });
    }

    /// Refuse (503) the queued entries that are not outcomes: nothing of their requests
    /// was changed. Returns how many.
    fn refuse_non_outcomes(&mut self, queue: &mut Vec<Queued>, why: &str) -> u64 {
        let mut refused = 0;
        queue.retain_mut(|q| {
            let keep = matches!(q.kind, EntryKind::Outcome(_));
            if !keep {
                refused += 1;
                if let Some(ack) = q.ack.take() {
                    let _ = ack.send(Err(why.to_owned()));
                }
            }
            keep
        });
        self.shared.refused.fetch_add(refused, Ordering::Relaxed);
        if let Some(i) = &mut self.incident {
            i.refused += refused;
        }
        refused
    }

    /// Try to write the queue. Before entries are written, room is reserved on disk for
    /// them and for the outcome of every request whose intent is written: so an outcome
    /// never meets a full disk. In `fail_closed` mode, when that room cannot be had,
    /// everything but outcomes is refused (503: nothing of theirs was changed) and the
    /// outcomes are written into the room reserved for them.
    fn flush_queue(&mut self, queue: &mut Vec<Queued>) {
        if queue.is_empty() && !self.degraded() {
            return;
        }
        let fail_closed = self.config.mode == AuditMode::FailClosed;
        let prepared = self.check_file().and_then(|()| {
            let entries: Vec<&Map<String, Value>> = queue.iter().map(|q| &q.entry).collect();
            let c = self.chain(&entries)?;
            let intents = queue.iter().filter(|q| matches!(q.kind, EntryKind::Intent(_))).count() as u64;
            self.awaiting.retain(|_, at| at.elapsed() < AWAITING_LIMIT);
            let outcomes = (self.awaiting.len() as u64 + intents + 1) * OUTCOME_RESERVE;
            self.reserve(c.bytes.len() as u64 + outcomes)?;
            Ok(c)
        });
        let chained = match prepared {
            Ok(c) => c,
            Err(e) if fail_closed && self.file.is_some() => {
                // No room: what may be refused is refused; the outcomes go into the room
                // their intents reserved.
                self.refuse_non_outcomes(queue, &format!("no room for audit entries: {e}"));
                if queue.is_empty() {
                    self.failed(&e, queue);
                    self.shared.waiting.store(0, Ordering::Relaxed);
                    return;
                }
                let entries: Vec<&Map<String, Value>> = queue.iter().map(|q| &q.entry).collect();
                match self.chain(&entries) {
                    Ok(c) => c,
                    Err(e) => {
                        self.failed(&e, queue);
                        return;
                    }
                }
            }
            Err(e) => {
                self.failed(&e, queue);
                self.shared.waiting.store(queue.len() as u64, Ordering::Relaxed);
                return;
            }
        };
        match self.commit(chained) {
            Ok(()) => {
                if self.incident.take().is_some() {
                    tracing::warn!("the audit log writes again; the failure is recorded in it as a gap");
                }
                for q in queue.drain(..) {
                    match &q.kind {
                        EntryKind::Intent(id) => {
                            self.awaiting.insert(id.clone(), Instant::now());
                        }
                        EntryKind::Outcome(id) => {
                            self.awaiting.remove(id);
                        }
                        EntryKind::Plain => {}
                    }
                    if let Some(ack) = q.ack {
                        let _ = ack.send(Ok(()));
                    }
                }
                self.backoff = Duration::from_millis(50);
                self.shared.set_state(AuditState::Writing);
                if self.size > self.config.max_file_bytes
                    && let Err(e) = self.rotate()
                {
                    WRITE_FAILED.error("rotating the audit log failed", &e);
                }
            }
            Err(e) => self.failed(&e, queue),
        }
        self.shared.waiting.store(queue.len() as u64, Ordering::Relaxed);
    }

    fn run(mut self, rx: Receiver<Job>) {
        // However the writer ends, outcomes put beside the queue after its last look are
        // dropped (their waiters answered), and no more are put there.
        struct CloseOnExit(Arc<Shared>);
        impl Drop for CloseOnExit {
            fn drop(&mut self) {
                self.0.overflow.close();
            }
        }
        let _closing = CloseOnExit(self.shared.clone());
        let mut queue: Vec<Queued> = Vec::new();
        // In buffered mode the queue holds what the channel held: when the disk fails,
        // entries wait here (and then in the channel, which fills and makes requests
        // 503) rather than being dropped.
        let capacity = self.config.buffer_entries.max(1);
        loop {
            let now = Instant::now();
            let wait = if self.degraded() {
                self.next_try.saturating_duration_since(now)
            } else {
                self.config.checkpoint_interval.saturating_sub(self.last_checkpoint.elapsed())
            };
            let mut shutdown = None;
            let room = self.config.mode != AuditMode::Buffered || queue.len() < capacity;
            // Outcomes waiting beside the queue are looked at again soon; and the writer
            // never sleeps long, so that an outcome put there just after it looked waits
            // at most that long.
            let nap = if self.shared.overflow.len.load(Ordering::Relaxed) > 0 {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(100)
            };
            let first = if room {
                match rx.recv_timeout(wait.min(nap).max(Duration::from_millis(1))) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                std::thread::sleep(wait.min(nap).max(Duration::from_millis(1)));
                None
            };
            if first.is_some()
                && self.config.mode == AuditMode::Buffered
                && !matches!(first, Some(Job::Shutdown(_)))
                && !self.degraded()
            {
                // Nobody waits for the disk: let entries gather for `buffered_linger`, then
                // one write and one fsync cover them all.
                std::thread::sleep(self.config.buffered_linger);
            }
            // An entry came in this pass (a nap that ended with nothing is no reason to try
            // a failing disk before its backoff is out).
            let arrived = first.is_some();
            let mut next = first;
            while let Some(job) = next.take() {
                match job {
                    Job::Append(entry, ack, kind) => {
                        queue.push(Queued { entry, ack, kind, since: Instant::now() });
                    }
                    Job::Shutdown(ack) => shutdown = Some(ack),
                }
                let room = self.config.mode != AuditMode::Buffered || queue.len() < capacity;
                if queue.len() < 8192 && shutdown.is_none() && room {
                    next = rx.try_recv().ok();
                }
            }
            // Outcomes that found the channel full, each once its intent has come through
            // it (queued, or written and awaiting its outcome), so that it follows its
            // intent in the log; one whose intent is still in the channel waits for the
            // next pass. (In `fail_closed` mode an intent is on disk before its request
            // runs: its outcome is always ready.)
            if self.shared.overflow.len.load(Ordering::Relaxed) > 0 {
                let awaiting = &self.awaiting;
                let intents: std::collections::HashSet<&str> = queue
                    .iter()
                    .filter_map(|q| match &q.kind {
                        EntryKind::Intent(id) => Some(id.as_str()),
                        _ => None,
                    })
                    .collect();
                let ready = |job: &Job| match job {
                    Job::Append(_, _, EntryKind::Outcome(id)) => {
                        awaiting.contains_key(id) || intents.contains(id.as_str())
                    }
                    _ => true,
                };
                let taken = self.shared.overflow.take(ready);
                queue.extend(taken.into_iter().filter_map(Job::queued));
            }
            let overflowing = self.shared.overflow.len.load(Ordering::Relaxed);
            crate::metrics::get().audit_queue_depth.set((queue.len() + overflowing) as i64);
            let due = self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval;
            let on_demand = arrived && !queue.is_empty() && self.last_try.elapsed() >= RETRY_ON_DEMAND;
            if self.degraded() && Instant::now() < self.next_try && shutdown.is_none() && !on_demand {
                if self.config.mode == AuditMode::FailClosed {
                    // Do not make requests wait out the backoff: refuse what may be
                    // refused now (nothing of theirs was changed).
                    self.refuse_non_outcomes(&mut queue, "the audit log cannot be written (backing off)");
                }
                self.shared.waiting.store((queue.len() + overflowing) as u64, Ordering::Relaxed);
                continue;
            }
            if !queue.is_empty() || self.degraded() {
                self.flush_queue(&mut queue);
            } else if due && self.keys.is_sealed() {
                // Nothing can be signed while sealed: try again one interval later.
                self.last_checkpoint = Instant::now();
            } else if due {
                let r = self.check_file().and_then(|()| {
                    let mut c = self.chain(&[])?;
                    self.push_checkpoint(&mut c, false)?;
                    self.commit(c)
                });
                if let Err(e) = r {
                    self.failed(&e, &mut queue);
                }
            } else if wait.is_zero() {
                self.last_checkpoint = Instant::now();
            }
            if let Some(ack) = shutdown {
                queue.extend(self.shared.overflow.take(|_| true).into_iter().filter_map(Job::queued));
                let r = self.check_file().and_then(|()| {
                    let mut c = self.chain(&queue.iter().map(|q| &q.entry).collect::<Vec<_>>())?;
                    self.push_checkpoint(&mut c, true)?;
                    self.commit(c)
                });
                match r {
                    Ok(()) => {
                        for q in queue.drain(..) {
                            if let Some(ack) = q.ack {
                                let _ = ack.send(Ok(()));
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, entries = queue.len(), "final audit checkpoint failed"),
                }
                if let Some(f) = &self.file {
                    let _ = f.set_len(self.size);
                }
                let _ = ack.send(());
                return;
            }
        }
    }
}

fn header(
    replica: &str,
    public_key: &[u8; 32],
    genesis: Option<[u8; 32]>,
    continues: Option<[u8; 32]>,
) -> Map<String, Value> {
    let mut h = event(
        "header",
        json!({
            "version": chain::FORMAT_VERSION,
            "replica": replica,
            "audit_public_key": STANDARD.encode(public_key),
        }),
    );
    if let Some(g) = genesis {
        h.insert("genesis".into(), hex::encode(g).into());
    }
    if let Some(c) = continues {
        h.insert("continues".into(), hex::encode(c).into());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail of a log whose last line is longer than the first window read (an older
    /// version wrote a request's method or path whole): found whole, not refused as a
    /// torn line, and the torn write after it is cut.
    #[test]
    fn the_tail_is_found_behind_a_line_longer_than_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut entry = Map::new();
        entry.insert("type".into(), "request".into());
        let (first, head) = chain::seal(&entry, 1, &[0; 32]);
        entry.insert("path".into(), "x".repeat(1024 * 1024).into());
        let (long, head) = chain::seal(&entry, 2, &head);
        let mut bytes = [first, long].concat();
        let valid_len = bytes.len() as u64;
        bytes.extend_from_slice(b"{\"torn");
        std::fs::write(&path, &bytes).unwrap();

        let tail = read_tail(&path).unwrap().expect("a tail");
        assert_eq!(tail.seq, 2);
        assert_eq!(tail.head, head);
        assert_eq!(tail.valid_len, valid_len);
        assert!(!tail.is_final_checkpoint);
    }
}
