//! The tamper-evident audit log (DESIGN §8).
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

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
    #[serde(default = "default_interval", deserialize_with = "crate::config::duration")]
    pub checkpoint_interval: Duration,
    /// Rotate when the file grows past this size.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Queue bound in `buffered` mode.
    #[serde(default = "default_buffer")]
    pub buffer_entries: usize,
    /// In `buffered` mode, how long the writer gathers entries before one write and one
    /// fsync: the most an acknowledged request's entry waits for the disk.
    #[serde(default = "default_linger", deserialize_with = "crate::config::duration")]
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
}

/// A shared slot for [`AuditContext`], put in every request's extensions.
pub type AuditSlot = Arc<Mutex<AuditContext>>;

enum Job {
    Append(Map<String, Value>, Option<oneshot::Sender<std::result::Result<(), String>>>),
    Shutdown(oneshot::Sender<()>),
}

/// The audit log of this process.
pub struct AuditLog {
    mode: AuditMode,
    tx: Option<SyncSender<Job>>,
    hmac_key: SecretBox<[u8; 32]>,
    public_key: [u8; 32],
    path: PathBuf,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("mode", &self.mode).field("path", &self.path).finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl AuditLog {
    /// Open (or create) the log and start its writer thread.
    pub async fn open(config: &AuditConfig, keys: &Arc<dyn KeyStore>, names: &KeyNames) -> Result<Arc<AuditLog>> {
        crate::keys::ensure_audit_keys(keys, names).await?;
        let sign_label = names.audit_signing();
        let public_key = hsm_call(keys, move |k| k.ed25519_public_key(&sign_label)).await?;
        // The per-log HMAC key is derived in the HSM from the audit HMAC key and the
        // log's path, so that it is stable across restarts of the same log.
        let hmac_label = names.audit_hmac();
        let context = format!("keyvault.audit.hmac.v1\0{}", config.path.display()).into_bytes();
        let derived = hsm_call(keys, move |k| k.hmac_sha256(&hmac_label, &context)).await?;
        let hmac_key = SecretBox::new(Box::new(derived));
        if config.mode == AuditMode::DangerousOff {
            tracing::warn!("the audit log is OFF (audit.mode = \"dangerous_off\")");
            return Ok(Arc::new(AuditLog {
                mode: config.mode,
                tx: None,
                hmac_key,
                public_key,
                path: config.path.clone(),
            }));
        }
        if let Some(dir) = config.path.parent() {
            // Only its owner may read the audit log: it names identities, paths and
            // outcomes (created 0700 here; an existing directory is left as the operator
            // set it, e.g. group-readable for a log shipper).
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::Config(format!("cannot create audit directory {}: {e}", dir.display())))?;
        }
        let writer = Writer::open(config.clone(), keys.clone(), names.clone(), public_key)?;
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
        Ok(Arc::new(AuditLog { mode: config.mode, tx: Some(tx), hmac_key, public_key, path: config.path.clone() }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> AuditMode {
        self.mode
    }

    /// The audit public key, base64 (what `audit verify` needs).
    pub fn public_key_b64(&self) -> String {
        STANDARD.encode(self.public_key)
    }

    /// HMAC-SHA256 of a sensitive value under this log's key, as it appears in the log.
    pub fn hmac(&self, value: &[u8]) -> String {
        // Invariant: HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(self.hmac_key.expose_secret()).expect("HMAC takes any key length");
        mac.update(value);
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Append an entry. In `fail_closed` mode this returns once the entry is on disk;
    /// any failure is an error (the caller answers 503).
    pub async fn append(&self, entry: Map<String, Value>) -> Result<()> {
        let Some(tx) = &self.tx else { return Ok(()) };
        let unavailable = |why: &str| Error::Store(crate::store::StoreError::Unavailable(format!("audit log: {why}")));
        match self.mode {
            AuditMode::FailClosed => {
                let (ack, done) = oneshot::channel();
                match tx.try_send(Job::Append(entry, Some(ack))) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => return Err(unavailable("the writer queue is full")),
                    Err(TrySendError::Disconnected(_)) => return Err(unavailable("the writer stopped")),
                }
                match done.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(unavailable(&e)),
                    Err(_) => Err(unavailable("the writer stopped")),
                }
            }
            AuditMode::Buffered => match tx.try_send(Job::Append(entry, None)) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => Err(unavailable("the buffer is full")),
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
        let unavailable = |why: &str| Error::Store(crate::store::StoreError::Unavailable(format!("audit log: {why}")));
        let mut waits = Vec::with_capacity(entries.len());
        for e in entries {
            let (ack, done) = oneshot::channel();
            tx.try_send(Job::Append(e, Some(ack))).map_err(|_| unavailable("the writer queue is full or stopped"))?;
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
    let mut m = Map::new();
    m.insert("type".into(), kind.into());
    m.insert("time".into(), now_rfc3339().into());
    if let Value::Object(f) = fields {
        m.extend(f);
    }
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

/// The state of the active file, owned by the writer thread.
struct Writer {
    config: AuditConfig,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    public_key: [u8; 32],
    replica: String,
    file: Option<std::fs::File>,
    /// (device, inode) and size of the file as we left it.
    identity: (u64, u64),
    size: u64,
    seq: u64,
    head: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Lines produced but not yet written.
    pending: Vec<u8>,
    /// A write failed: the file no longer matches the chain head.
    broken: bool,
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
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    // The last complete line ends at the last newline; anything after it is a torn write.
    let Some(end) = buf.iter().rposition(|b| *b == b'\n') else { return Ok(None) };
    let begin = buf[..end].iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
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

impl Writer {
    fn open(config: AuditConfig, keys: Arc<dyn KeyStore>, names: KeyNames, public_key: [u8; 32]) -> Result<Self> {
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
            file: None,
            identity: (0, 0),
            size: 0,
            seq: 0,
            head: [0u8; 32],
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            pending: Vec::new(),
            broken: false,
        };
        match tail {
            None => w.start_file(None, None).map_err(io)?,
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
                    w.push(header(&w.replica, &w.public_key, None, Some(t.head)));
                }
                if torn > 0 {
                    w.push(event("gap", json!({"reason": "torn_write_recovered", "dropped_bytes": torn})));
                }
                w.push(event("event", json!({"event": "audit_log_reopened", "replica": w.replica})));
                w.flush().map_err(io)?;
            }
        }
        Ok(w)
    }

    /// Create a fresh file at the path: a genesis header, or a header that continues.
    fn start_file(&mut self, continues: Option<[u8; 32]>, gap: Option<Value>) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(&self.config.path)?;
        let meta = f.metadata()?;
        self.identity = (meta.dev(), meta.ino());
        self.size = 0;
        self.file = Some(f);
        let genesis = match continues {
            Some(_) => None,
            None => Some(crate::barrier::random::<32>().map_err(|e| std::io::Error::other(e.to_string()))?),
        };
        if let Some(g) = genesis {
            self.head = g;
        }
        self.push(header(&self.replica, &self.public_key, genesis, continues));
        if let Some(gap) = gap {
            self.push(event("gap", gap));
        }
        self.flush()
    }

    /// Chain an entry into the pending buffer.
    fn push(&mut self, mut entry: Map<String, Value>) {
        self.seq += 1;
        entry.insert("seq".into(), self.seq.into());
        let is_checkpoint = entry.get("type").and_then(Value::as_str) == Some("checkpoint");
        let (line, hash) = chain::seal(entry, &self.head);
        self.pending.extend_from_slice(&line);
        self.head = hash;
        if !is_checkpoint {
            self.since_checkpoint += 1;
        }
    }

    /// Sign the current head in the HSM and chain the checkpoint.
    fn checkpoint(&mut self, is_final: bool) -> std::io::Result<()> {
        let seq = self.seq + 1;
        let message = chain::checkpoint_message(&self.head, seq, is_final);
        let label = self.names.audit_signing();
        let sig = self.keys.sign_ed25519(&label, &message).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut cp = event(
            "checkpoint",
            json!({"head": hex::encode(self.head), "final": is_final, "key": label.as_str(), "signature": STANDARD.encode(sig)}),
        );
        // `push` assigns this same seq.
        cp.remove("seq");
        self.push(cp);
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Write the pending lines and make them durable.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let f = self.file.as_mut().ok_or_else(|| std::io::Error::other("no open audit file"))?;
        f.write_all(&self.pending)?;
        f.sync_data()?;
        self.size += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Is the file at the path still ours, as we left it? A deleted, replaced or truncated
    /// file is set aside and a new one continues the chain with a gap entry.
    fn check_file(&mut self) -> std::io::Result<()> {
        let reason = match std::fs::metadata(&self.config.path) {
            _ if self.broken => Some("write_failed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("deleted"),
            Err(e) => return Err(e),
            Ok(m) if (m.dev(), m.ino()) != self.identity => Some("replaced"),
            Ok(m) if m.len() < self.size => Some("truncated"),
            Ok(m) if m.len() > self.size => Some("appended_by_another_writer"),
            Ok(_) => None,
        };
        let Some(reason) = reason else { return Ok(()) };
        tracing::error!(path = %self.config.path.display(), reason, "the audit log file changed under the writer; starting a new file with a gap entry");
        let found = std::fs::metadata(&self.config.path).map(|m| m.len()).ok();
        if found.is_some() {
            let aside =
                PathBuf::from(format!("{}.anomaly-{}-{}", self.config.path.display(), crate::unix_now(), self.seq));
            std::fs::rename(&self.config.path, &aside)?;
        }
        self.pending.clear();
        let gap = json!({"reason": reason, "expected_size": self.size, "found_size": found});
        self.start_file(Some(self.head), Some(gap))?;
        self.broken = false;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.checkpoint(true)?;
        self.flush()?;
        let mut n = 1;
        let rotated = loop {
            let candidate = PathBuf::from(format!("{}.{n}", self.config.path.display()));
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        std::fs::rename(&self.config.path, &rotated)?;
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        self.start_file(Some(self.head), None)
    }

    fn write_batch(&mut self, batch: Vec<Map<String, Value>>) -> std::io::Result<()> {
        self.check_file()?;
        for entry in batch {
            self.push(entry);
            if self.since_checkpoint >= self.config.checkpoint_every {
                self.checkpoint(false)?;
            }
        }
        self.flush()?;
        if self.size > self.config.max_file_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            let wait = self.config.checkpoint_interval.saturating_sub(self.last_checkpoint.elapsed());
            let first = match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if self.since_checkpoint > 0 {
                        let r = self.check_file().and_then(|()| self.checkpoint(false)).and_then(|()| self.flush());
                        if let Err(e) = r {
                            tracing::error!(error = %e, "audit checkpoint failed");
                            self.pending.clear();
                        }
                    } else {
                        self.last_checkpoint = Instant::now();
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut entries = Vec::new();
            let mut acks = Vec::new();
            let mut shutdown = None;
            // In buffered mode nobody waits for the disk: let entries gather for
            // `buffered_linger` (sleeping, so that senders do not wake this thread for
            // each entry), then one write and one fsync cover them all.
            if self.config.mode == AuditMode::Buffered && !matches!(first, Job::Shutdown(_)) {
                std::thread::sleep(self.config.buffered_linger);
            }
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(e, ack) => {
                        entries.push(e);
                        acks.extend(ack);
                    }
                    Job::Shutdown(ack) => shutdown = Some(ack),
                }
                if entries.len() < 8192 && shutdown.is_none() {
                    next = rx.try_recv().ok();
                }
            }
            let result = self.write_batch(entries).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, "writing the audit log failed");
                self.pending.clear();
                // The chain head moved past entries that were not written: the next
                // successful write starts a new file that records the gap.
                self.broken = true;
            }
            for ack in acks {
                let _ = ack.send(result.clone());
            }
            if let Some(ack) = shutdown {
                let r = self.check_file().and_then(|()| self.checkpoint(true)).and_then(|()| self.flush());
                if let Err(e) = r {
                    tracing::error!(error = %e, "final audit checkpoint failed");
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
