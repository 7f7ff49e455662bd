//! Master key rotation without downtime (docs/architecture.md, "Master key rotation").
//!
//! `start`: master key version N+1 is generated in the token and becomes active for new
//! records at once. Then every stored record still wrapped by an older version has its data
//! key re-wrapped to N+1 in the background (the value's ciphertext is untouched), in
//! batches, by exactly one replica at a time: the one holding the lease in the rotation
//! record. The record also holds the checkpoint (the last key done), so a crash or restart
//! resumes where it stopped, on this replica or another once the lease expires. When a full
//! pass finds nothing left to re-wrap, the rotation is done; `retire` then destroys the old
//! versions nothing uses.
//!
//! The moment the new version is recorded, the older versions are closed to new records
//! (see [`crate::usage`]): a write on any replica that still seals under an old version
//! fails its transaction and seals again under the new one. So the re-wrap chases only
//! records committed before the rotation started, and retiring a version never races a
//! write in flight. A record that cannot be re-wrapped (damaged) is set aside under
//! `sys/set-aside/`, reported by status and `keyvault operator rotate --report`, and never
//! stops the rotation of the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyvault_hsm::KeyStore;
use serde::{Deserialize, Serialize};

use crate::barrier::{Barrier, Record, RewrapItem, Rewrapped};
use crate::error::{Error, Result};
use crate::keys::{Family, KeyNames, KeyVersion, Keyring, SharedKeyring};
use crate::secrets::{data_prefix, parse_data_key_raw, record_context_raw};
use crate::store::{Store, TxOp, TxOutcome, decode_json, encode_json};
use crate::unix_now;
use crate::usage;

const KEY: &str = "sys/rotation";
const LEASE: Duration = Duration::from_secs(10);
const BATCH: usize = 256;
/// Token batches per page, run side by side (one blocking thread each).
const CHUNKS: usize = 2;
/// Passes over the store before giving up on records that keep coming back.
const MAX_PASSES: u32 = 100;

/// The rotation record: state, checkpoint and lease.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationRecord {
    /// `idle`, `starting` or `rewrapping`.
    pub state: String,
    /// The version the last recorded re-wrap was to (`rewrapping`: the one under way).
    /// A start leaves it as it was until it records its own re-wrap, so an active
    /// version newer than it means one that no re-wrap was recorded to.
    pub target: u32,
    /// While `starting`: the version active when the claim was taken (a newer active
    /// version means the start made it). `None` otherwise; a claim of an earlier release
    /// named it in `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<u32>,
    /// The last data key re-wrapped (the scan resumes after it); `None`: from the start.
    pub cursor: Option<String>,
    pub done: u64,
    /// Records found wrapped by an older version when the pass began.
    pub total: u64,
    /// Passes over the whole store (a second one catches records written by replicas that
    /// had not seen the new version yet).
    pub pass: u32,
    /// Re-wrapped during the current pass.
    #[serde(default)]
    pub pass_done: u64,
    /// Records set aside by this rotation (they could not be re-wrapped).
    #[serde(default)]
    pub failed: u64,
    /// Not used any more (status reads the version counters); kept so that records
    /// written by earlier versions still parse.
    #[serde(default, skip_serializing)]
    pub versions_at_start: Vec<u32>,
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub lease_owner: Option<String>,
    pub lease_until: u64,
}

/// What `GET /v1/sys/rotate/status` reports, and one record a rotation set aside.
pub use keyvault_api::sys::{RotationStatus as Status, SetAsideRecord as SetAsideView};

#[derive(Debug)]
pub struct Rotation {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
    barrier: Barrier,
    /// This process, in leases.
    replica: String,
    /// Wakes this process's driver when a rotation starts here.
    wake: tokio::sync::Notify,
}

fn lease_expired(r: &RotationRecord, now: u64) -> bool {
    r.lease_until <= now
}

impl Rotation {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        keyring: SharedKeyring,
        barrier: Barrier,
    ) -> Self {
        Rotation {
            store,
            keys,
            names,
            keyring,
            barrier,
            replica: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    async fn load(&self) -> Result<(Option<Vec<u8>>, RotationRecord)> {
        match self.store.get(KEY).await? {
            Some(raw) => {
                let r = decode_json(KEY, &raw)?;
                Ok((Some(raw), r))
            }
            None => Ok((None, RotationRecord { state: "idle".into(), ..Default::default() })),
        }
    }

    async fn save(&self, old: Option<&[u8]>, new: &RotationRecord) -> Result<bool> {
        Ok(self.store.compare_and_swap(KEY, old, Some(&encode_json(new))).await?)
    }

    /// Records per version, exactly, from the counters.
    pub async fn usage(&self) -> Result<usage::Usage> {
        usage::read(self.store.as_ref()).await
    }

    /// Records set aside that are counted under a version other than `target`: the part
    /// of the old versions' counts that no re-wrap will ever bring down.
    async fn set_aside_outside(&self, target: u32) -> Result<(u64, i64)> {
        let all = usage::set_aside(self.store.as_ref()).await?;
        let outside = all.iter().filter(|a| a.counted_under.is_some_and(|v| v != target)).count() as i64;
        Ok((all.len() as u64, outside))
    }

    /// Start a rotation: new master version, active at once, re-wrap in the background.
    /// Refused (409) while one is running.
    pub async fn start(&self) -> Result<KeyVersion> {
        let (raw, current) = self.load().await?;
        if current.state == "rewrapping" {
            return Err(Error::Conflict(format!("a rotation to v{} is already running", current.target)));
        }
        // Claim the rotation record first, so that two concurrent starts cannot both add
        // a version.
        // The claim names the version active when it was taken: a start cut short (a
        // crash, a dropped request, a failed step) is finished by the driver if a newer
        // version was made meanwhile ([`Rotation::resume_start`]). Its `target` stays
        // the last re-wrap's, so that a claim put back to `idle` never names a version
        // no re-wrap was recorded to ([`Rotation::record_unrecorded_rewrap`]).
        self.keyring.follow().await?;
        let mut claim = current.clone();
        claim.state = "starting".into();
        claim.claimed_at = Some(self.keyring.load().master.active.get());
        claim.lease_owner = Some(self.replica.clone());
        claim.lease_until = unix_now() + LEASE.as_secs();
        if current.state == "starting" && !lease_expired(&current, unix_now()) {
            return Err(Error::Conflict("a rotation is being started".into()));
        }
        if !self.save(raw.as_deref(), &claim).await? {
            return Err(Error::Conflict("a rotation is being started".into()));
        }
        let claimed = encode_json(&claim);
        let ring = match self.keyring.add_version(&self.keys, &self.names, Family::Master).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.save(Some(&claimed), &current).await;
                return Err(e);
            }
        };
        let target = ring.master.active;
        // Test hook: die with the new version made and active, before the re-wrap is recorded.
        #[cfg(debug_assertions)]
        crate::faults::crash_point("KEYVAULT_TEST_CRASH_ROTATION_START");
        if !self.begin_rewrap(&claimed, target, &ring.master.versions).await? {
            self.record_rewrap_after_lost_claim(target).await?;
        }
        tracing::info!(version = %target, "master key rotation started");
        self.wake.notify_one();
        Ok(target)
    }

    /// The new version `target` is made and active, but the `starting` claim changed
    /// meanwhile: the start took longer than its lease (a slow token), and the driver
    /// took it for one cut short and put the record back to `idle` before `target` was
    /// made. The re-wrap is recorded now, from the record as it is, unless it names a
    /// newer version or records a re-wrap already. Whatever this leaves (another start
    /// under way that then fails, a store error here) the driver repairs
    /// ([`Rotation::record_unrecorded_rewrap`]).
    async fn record_rewrap_after_lost_claim(&self, target: KeyVersion) -> Result<()> {
        for _ in 0..10 {
            let (raw, r) = self.load().await?;
            self.keyring.follow().await?;
            let ring = self.keyring.load_full();
            if ring.master.active != target {
                tracing::warn!(version = %target, newer = %ring.master.active, "a master key rotation start outlived its lease; a newer version was made meanwhile");
                return Ok(());
            }
            let Some(raw) = raw else { return Err(Error::Internal("no rotation record while starting".into())) };
            let recorded = match r.state.as_str() {
                "idle" => self.begin_rewrap(&raw, target, &ring.master.versions).await?,
                "rewrapping" if r.target >= target.get() => true,
                "rewrapping" => self.record_unrecorded_rewrap(&raw, &r).await?,
                // Another start under way: its re-wrap covers `target`, or the driver
                // repairs what it leaves.
                _ => true,
            };
            if recorded {
                tracing::warn!(version = %target, "a master key rotation start outlived its lease; its re-wrap is recorded");
                return Ok(());
            }
        }
        Err(Error::Conflict("the rotation record keeps changing; retry".into()))
    }

    /// Repair: the active master version is newer than the one the record `raw` (`r`)
    /// names, and no start is under way: `idle` (its target is the last re-wrap's; a
    /// start put back to `idle` keeps it) or `rewrapping` to an older target. That is what a start
    /// leaves when it outlived its lease and then died, or left the record to another
    /// start that failed. The re-wrap to the active version is recorded (closing the
    /// older ones); whether it was. Looks at this replica's keyring first (followed every
    /// second), so that a replica with nothing to repair reads nothing more.
    async fn record_unrecorded_rewrap(&self, raw: &[u8], r: &RotationRecord) -> Result<bool> {
        let newer = |ring: &Keyring| {
            ring.master.versions.len() > 1
                && ring.master.active.get() > r.target
                && (r.state == "idle" || r.state == "rewrapping")
        };
        if !newer(&self.keyring.load_full()) {
            return Ok(false);
        }
        self.keyring.follow().await?;
        let ring = self.keyring.load_full();
        // Still so once the keyring is followed: a start that made its version since the
        // record was read has changed the record (it is `starting`), and is left alone.
        if !newer(&ring) || self.load().await?.0.as_deref() != Some(raw) {
            return Ok(false);
        }
        let active = ring.master.active;
        tracing::warn!(version = %active, state = %r.state, target = r.target, "recording the re-wrap to the active master key version, which no rotation had recorded");
        self.begin_rewrap(raw, active, &ring.master.versions).await
    }

    /// The second half of a start, once the new version `target` is active: close the
    /// older versions, count what is to re-wrap, and record the re-wrap (replacing the
    /// record `claimed`, the `starting` claim); false if that record changed meanwhile.
    async fn begin_rewrap(&self, claimed: &[u8], target: KeyVersion, versions: &[KeyVersion]) -> Result<bool> {
        // From here on no record can commit under an older version, on any replica.
        for v in versions.iter().copied().filter(|v| *v != target) {
            usage::close(self.store.as_ref(), v).await?;
        }
        // Test hook: die with the older versions closed, before the re-wrap is recorded.
        #[cfg(debug_assertions)]
        crate::faults::crash_point("KEYVAULT_TEST_CRASH_ROTATION_CLOSED");
        let total = self.usage().await?.outside(target).max(0) as u64;
        let record = RotationRecord {
            state: "rewrapping".into(),
            target: target.get(),
            cursor: None,
            done: 0,
            total,
            pass: 1,
            started_at: unix_now(),
            finished_at: None,
            lease_owner: None,
            lease_until: 0,
            pass_done: 0,
            failed: 0,
            versions_at_start: Vec::new(),
            claimed_at: None,
        };
        if !self.save(Some(claimed), &record).await? {
            return Ok(false);
        }
        tracing::info!(version = %target, records = total, "master key rotation: re-wrapping");
        Ok(true)
    }

    /// A start whose claim expired without its re-wrap being recorded was cut short. If a
    /// version newer than the one its claim names is active, the start made it: take the
    /// claim over and finish the start (close the older versions, record the re-wrap),
    /// which the driver then runs. Otherwise nothing was made: back to idle.
    async fn resume_start(&self, raw: Option<Vec<u8>>, r: RotationRecord) -> Result<bool> {
        self.keyring.follow().await?;
        let ring = self.keyring.load_full();
        let active = ring.master.active;
        let mut next = r.clone();
        next.lease_owner = Some(self.replica.clone());
        next.lease_until = unix_now() + LEASE.as_secs();
        if active.get() <= r.claimed_at.unwrap_or(r.target) {
            // Back to `idle` with the last re-wrap's target: if an earlier start (whose
            // own claim had been put back to `idle`) made a version before this claim was
            // taken, that version is newer than the target and the driver's repair
            // records its re-wrap ([`Rotation::record_unrecorded_rewrap`]).
            next.state = "idle".into();
            next.claimed_at = None;
            next.lease_owner = None;
            next.lease_until = 0;
            if self.save(raw.as_deref(), &next).await? {
                tracing::warn!(
                    "a master key rotation was cut short before its new version was made; nothing to finish"
                );
            }
            return Ok(false);
        }
        if !self.save(raw.as_deref(), &next).await? {
            return Ok(false);
        }
        tracing::warn!(version = %active, "finishing a master key rotation that was cut short after its new version was made");
        self.begin_rewrap(&encode_json(&next), active, &ring.master.versions).await
    }

    /// Progress from the rotation record, counts from the version counters: a few
    /// reads, however many records there are.
    pub async fn status(&self) -> Result<Status> {
        // Another replica may have rotated less than a sync ago.
        self.keyring.follow().await?;
        let (_, r) = self.load().await?;
        let active = self.keyring.load().master.active;
        let usage = self.usage().await?;
        let (set_aside, aside_outside) = self.set_aside_outside(active.get()).await?;
        let remaining = (usage.outside(active) - aside_outside).max(0) as u64;
        let mut versions_in_use: Vec<u32> =
            usage.records.iter().filter(|(_, n)| **n > 0).map(|(v, _)| *v).chain([active.get()]).collect();
        versions_in_use.sort_unstable();
        versions_in_use.dedup();
        let rewrapping = r.state == "rewrapping";
        let elapsed = unix_now().saturating_sub(r.started_at).max(1) as f64;
        // `starting`: a new version is being made and the older ones closed; a moment later
        // it is `rewrapping`. Either way, not idle.
        let state = match r.state.as_str() {
            "rewrapping" => "rewrapping",
            "starting" if !lease_expired_now(r.lease_until) => "starting",
            _ => "idle",
        };
        Ok(Status {
            active_version: active.get(),
            state: state.into(),
            records_done: r.done,
            records_remaining: remaining,
            rate_per_second: if rewrapping { r.done as f64 / elapsed } else { 0.0 },
            versions_in_use,
            records_by_version: usage.records.into_iter().filter(|(_, n)| *n != 0).collect(),
            set_aside,
            driven_by: r.lease_owner.filter(|_| rewrapping && !lease_expired_now(r.lease_until)),
        })
    }

    /// The records set aside, for `keyvault operator rotate --report`.
    pub async fn set_aside_report(&self) -> Result<Vec<SetAsideView>> {
        Ok(usage::set_aside(self.store.as_ref())
            .await?
            .into_iter()
            .map(|a| SetAsideView {
                key: a.key,
                reason: a.reason,
                counted_under: a.counted_under,
                set_aside_at: a.set_aside_at,
            })
            .collect())
    }

    /// Destroy every master version that is neither active nor wrapping any record.
    /// Refused while a rotation runs. Each candidate is closed to new records first
    /// (which waits for writes that hold its counters), then its count is read: zero
    /// means no record, committed or in flight on any replica, needs it.
    pub async fn retire(&self) -> Result<Vec<u32>> {
        crate::keys::retiring_alone(&self.store, Family::Master, self.retire_claimed()).await
    }

    async fn retire_claimed(&self) -> Result<Vec<u32>> {
        let (_, r) = self.load().await?;
        if r.state == "rewrapping" || r.state == "starting" {
            return Err(Error::Conflict("a rotation is still re-wrapping; retire when it is idle".into()));
        }
        // Decide on the keyring as stored (another replica may have rotated less than a
        // sync ago), never on this replica's copy. First, finish any retire cut short.
        // The stored epoch keys of the versions it finishes could be unwrapped by nothing.
        for gone in self.keyring.finish_retiring(&self.keys, &self.names, Family::Master).await? {
            self.store.delete(&crate::epoch::storage_key(gone)).await?;
        }
        self.keyring.follow().await?;
        let ring = self.keyring.load_full();
        let active = ring.master.active;
        // Stored epoch keys of versions that are gone (left by a retire of an earlier
        // release, stopped after its version was gone and before its epoch key was):
        // nothing can unwrap them. Gone is below the highest version the keyring lists
        // and neither listed nor retiring; a version being made is always above it.
        if let Some(highest) = ring.master.versions.iter().max() {
            let known = |v: u32| ring.master.versions.iter().chain(&ring.master.retiring).any(|k| k.get() == v);
            for (key, _) in crate::store::scan_all(self.store.as_ref(), crate::epoch::STORAGE_PREFIX).await? {
                let v = key[crate::epoch::STORAGE_PREFIX.len()..].parse::<u32>().ok();
                if v.is_some_and(|v| v < highest.get() && !known(v)) {
                    self.store.delete(&key).await?;
                    tracing::info!(key, "dropped the stored epoch key of a retired master key version");
                }
            }
        }
        let old: Vec<KeyVersion> = ring.master.versions.iter().copied().filter(|v| *v != active).collect();
        for v in &old {
            usage::close(self.store.as_ref(), *v).await?;
        }
        let usage = self.usage().await?;
        let retire: Vec<KeyVersion> = old.iter().copied().filter(|v| usage.of(*v) == 0).collect();
        let still: Vec<u32> = old.iter().filter(|v| usage.of(**v) != 0).map(|v| v.get()).collect();
        if retire.is_empty() && !still.is_empty() {
            let (aside, _) = self.set_aside_outside(active.get()).await?;
            let why = if aside > 0 {
                format!(
                    "versions {still:?} still wrap records, {aside} of them set aside as damaged \
                     (`keyvault operator rotate --report`; deleting those secret versions releases them)"
                )
            } else {
                format!("versions {still:?} still wrap records; rotate first")
            };
            return Err(Error::Conflict(why));
        }
        let mut retired = Vec::new();
        for v in retire {
            // Its stored epoch key goes first (no record needs it: the version is closed
            // and wraps none), so that a retire stopped anywhere leaves none behind for a
            // version that is gone; this replica's copy goes below, the others' when they
            // follow the keyring.
            self.store.delete(&crate::epoch::storage_key(v)).await?;
            if self.keyring.retire_version(&self.keys, &self.names, Family::Master, v).await? {
                retired.push(v.get());
            }
        }
        self.barrier.forget_retired_epochs();
        Ok(retired)
    }

    /// One step of the driver: take or renew the lease, re-wrap one batch, checkpoint.
    /// Returns whether there is more to do right away.
    pub async fn step(&self) -> Result<bool> {
        let (raw, mut r) = self.load().await?;
        if r.state == "starting" && lease_expired(&r, unix_now()) {
            return self.resume_start(raw, r).await;
        }
        if let Some(raw) = &raw
            && self.record_unrecorded_rewrap(raw, &r).await?
        {
            return Ok(true);
        }
        if r.state != "rewrapping" {
            return Ok(false);
        }
        if held_for_tests(r.done) {
            return Ok(false);
        }
        let now = unix_now();
        let mine = r.lease_owner.as_deref() == Some(&self.replica);
        if !mine && !lease_expired(&r, now) {
            return Ok(false);
        }
        if !mine {
            tracing::info!(replica = %self.replica, cursor = ?r.cursor, "taking over the master key rotation");
        }
        r.lease_owner = Some(self.replica.clone());
        r.lease_until = now + LEASE.as_secs();
        if !self.save(raw.as_deref(), &r).await? {
            return Ok(false);
        }
        let leased = encode_json(&r);
        let target = KeyVersion::new(r.target).ok_or_else(|| Error::Internal("rotation target 0".into()))?;
        // A replica that has not seen the target version yet learns it in
        // `Barrier::rewrap_batch` (it re-reads the keyring for unknown versions).
        let page = self.store.scan_prefix(data_prefix(), r.cursor.as_deref(), BATCH).await?;
        let last = page.last().map(|(k, _)| k.clone());
        let (done, failed) = self.rewrap_page(page, target, &r).await?;
        let mut next = r.clone();
        next.done += done;
        next.pass_done += done;
        next.failed += failed;
        match last {
            Some(k) => next.cursor = Some(k),
            None => {
                // A pass ended. Older versions were closed when the rotation started, so
                // a pass normally leaves nothing behind but records set aside; pass again
                // if something is left that a re-wrap can reach, unless this pass got
                // nowhere.
                let (_, aside_outside) = self.set_aside_outside(r.target).await?;
                let stragglers = (self.usage().await?.outside(target) - aside_outside).max(0) as u64;
                if stragglers > 0 && next.pass_done > 0 && next.pass < MAX_PASSES {
                    next.cursor = None;
                    next.pass += 1;
                    next.pass_done = 0;
                    next.total = next.done + stragglers;
                } else {
                    next.state = "idle".into();
                    next.finished_at = Some(unix_now());
                    next.lease_owner = None;
                    next.lease_until = 0;
                    if stragglers > 0 {
                        tracing::warn!(
                            version = r.target,
                            records = next.done,
                            left = stragglers,
                            "master key rotation finished, but some records could not be re-wrapped: \
                             their master key versions stay in use and cannot be retired"
                        );
                    } else {
                        tracing::info!(version = r.target, records = next.done, "master key rotation finished");
                    }
                }
            }
        }
        if !self.save(Some(&leased), &next).await? {
            // Lost the lease meanwhile (paused too long): whoever holds it redoes this batch,
            // which is harmless (records already at the target are skipped).
            return Ok(false);
        }
        let m = crate::metrics::get();
        m.rotation_active.set(i64::from(next.state == "rewrapping"));
        m.rotation_records_done.set(next.done as i64);
        m.rotation_records_total.set(next.total as i64);
        Ok(next.state == "rewrapping")
    }

    /// Drive rotations in the background: whenever one is running and no live replica holds
    /// its lease, take it and work until done.
    pub fn spawn_driver(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let started = Instant::now();
                // A sealed replica takes no step (and so renews no lease): another replica
                // takes the rotation over when the lease runs out.
                let step = if me.keys.is_sealed() { Ok(false) } else { me.step().await };
                match step {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "rotation step failed; retrying"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500).saturating_sub(started.elapsed())) => {}
                    _ = me.wake.notified() => {}
                }
            }
        })
    }
}

/// Test hook, in debug builds only (release builds compile it away): while the file
/// named by `KEYVAULT_TEST_HOLD_ROTATION` exists and holds a number, the driver takes no
/// step once that many records are re-wrapped. Tests use it to catch a rotation at a
/// checkpoint, for certain, instead of racing it.
#[cfg(debug_assertions)]
fn held_for_tests(done: u64) -> bool {
    let Some(path) = std::env::var_os("KEYVAULT_TEST_HOLD_ROTATION") else { return false };
    std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok()).is_some_and(|after| done >= after)
}

#[cfg(not(debug_assertions))]
fn held_for_tests(_: u64) -> bool {
    false
}

fn lease_expired_now(until: u64) -> bool {
    until <= unix_now()
}

/// The outcome of one record's re-wrap (see [`Barrier::rewrap_batch`]).
type RewrapOutcome = Result<Option<Rewrapped>>;

impl Rotation {
    /// Re-wrap one page of records to `target`: the token work in `CHUNKS` batches (one
    /// blocking trip each), then one store call in which each record still as it was
    /// read is swapped and moved from its version's count to the target's (a record
    /// written or deleted meanwhile is left alone: it is either at the target already or
    /// gone). A record that cannot be re-wrapped is set aside. Returns (re-wrapped, set
    /// aside).
    async fn rewrap_page(
        &self,
        page: Vec<(String, Vec<u8>)>,
        target: KeyVersion,
        rotation: &RotationRecord,
    ) -> Result<(u64, u64)> {
        let mut work: Vec<(String, RewrapItem)> = Vec::with_capacity(page.len());
        for (key, stored) in page {
            let Some((path, version)) = parse_data_key_raw(&key) else { continue };
            let ctx = record_context_raw(&path, version);
            let item = RewrapItem { dek_aad: ctx.dek_aad(), value_aad: ctx.value_aad(), stored };
            work.push((key, item));
        }
        let per_chunk = work.len().div_ceil(CHUNKS).max(1);
        // The chunks run side by side; their results are taken in order.
        let tasks: Vec<_> = work
            .chunks(per_chunk)
            .map(|chunk| {
                let items: Vec<RewrapItem> = chunk.iter().map(|(_, i)| i.clone()).collect();
                let barrier = self.barrier.clone();
                tokio::spawn(async move { barrier.rewrap_batch(items, target).await })
            })
            .collect();
        let mut results: Vec<RewrapOutcome> = Vec::with_capacity(work.len());
        for task in tasks {
            results.extend(task.await.map_err(|e| Error::Internal(format!("rewrap task: {e}")))??);
        }
        // A record that could not be opened gets a second try before it is set aside: a
        // token can fail one call in a way that reads as a failed integrity check (SoftHSM
        // answers both with CKR_GENERAL_ERROR), and setting aside takes an acknowledged
        // secret out of service. Damage fails both tries.
        let failed: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
        if !failed.is_empty() {
            let items: Vec<RewrapItem> = failed.iter().map(|i| work[*i].1.clone()).collect();
            let again = self.barrier.rewrap_batch(items, target).await?;
            // Failed twice: damage, if the token does right by keys of its own now, under
            // the target version and under each known version those records name; if it
            // does not, the token is at fault (or that version's key in it is), and the
            // step is tried again later.
            let known = self.keyring.load().master.versions.clone();
            let mut probe: Vec<KeyVersion> = vec![target];
            for (i, outcome) in failed.iter().zip(&again) {
                if outcome.is_err()
                    && let Ok(r) = Record::parse(&work[*i].1.stored)
                    && known.contains(&r.kek_version)
                    && !probe.contains(&r.kek_version)
                {
                    probe.push(r.kek_version);
                }
            }
            let still = again.iter().any(|r| r.is_err());
            for (i, outcome) in failed.into_iter().zip(again) {
                results[i] = outcome;
            }
            if still {
                for v in probe {
                    self.barrier.token_answers(v).await?;
                }
            }
        }
        let known_max = self.keyring.load().master.versions.iter().copied().max().unwrap_or(target);
        let mut swaps = Vec::new();
        let mut aside = Vec::new();
        for (outcome, (key, item)) in results.into_iter().zip(work) {
            match outcome {
                Ok(Some(rw)) => {
                    // The counters in key order, as every transaction takes them
                    // (PostgreSQL row locks: "v10" sorts before "v9").
                    let mut counts = [usage::count(rw.from, &key, -1), usage::count(target, &key, 1)];
                    counts.sort_by(|a, b| a.key().cmp(b.key()));
                    let mut ops = vec![TxOp::Swap { key: key.clone(), expected: item.stored, new: Some(rw.record) }];
                    ops.extend(counts);
                    swaps.push(ops);
                }
                Ok(None) => {}
                Err(e) => {
                    // The key names the record, never its value.
                    tracing::warn!(record = %key, error = %e, "record cannot be re-wrapped; setting it aside");
                    let counted_under =
                        Record::parse(&item.stored).ok().map(|r| r.kek_version).filter(|v| *v <= known_max);
                    let entry = usage::SetAside {
                        key: key.clone(),
                        record: hex::encode(&item.stored),
                        reason: e.to_string(),
                        counted_under: counted_under.map(|v| v.get()),
                        set_aside_at: unix_now(),
                    };
                    aside.push(vec![
                        TxOp::Swap { key: key.clone(), expected: item.stored, new: None },
                        TxOp::Insert { key: usage::set_aside_key(&key), value: encode_json(&entry) },
                    ]);
                }
            }
        }
        let swapped = self.store.transact_many(swaps).await?;
        let set_aside = self.store.transact_many(aside).await?;
        let committed = |v: &[TxOutcome]| v.iter().filter(|o| **o == TxOutcome::Committed).count() as u64;
        let n_aside = committed(&set_aside);
        if n_aside > 0 {
            tracing::warn!(
                target = rotation.target,
                records = n_aside,
                "records set aside: see `keyvault operator rotate --report`"
            );
        }
        Ok((committed(&swapped), n_aside))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Secrets;

    /// A read that fetched a record before a rotation re-wrapped it and a retire ended
    /// its master version (the epoch key gone) opens the record as it is now, not 500.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_overtaken_by_a_rotation_and_a_retire_opens_the_record_as_it_is_now() {
        use crate::test_support::{PauseAt, TestStore};
        let keyed = crate::test_support::Keyed::new().await;
        let (sled, barrier) = (keyed.store.clone(), keyed.barrier());
        let plain = Secrets::new(sled.clone(), barrier.clone(), 10);
        let path = keyvault_api::secret::SecretPath::parse("app/overtaken").unwrap();
        plain.write(&path, br#"{"v":"1"}"#).await.unwrap();
        let paused = Arc::new(TestStore::holding(sled.clone(), PauseAt::Get, &plain.data_key(&path, 1)));
        let held = Arc::new(Secrets::new(paused.clone(), barrier.clone(), 10));
        paused.arm();
        let read = tokio::spawn({
            let (held, path) = (held.clone(), path.clone());
            async move { held.read(&path, None).await }
        });
        paused.reached.notified().await;
        let rotation = Rotation::new(
            sled.clone(),
            keyed.keys.clone(),
            keyed.names.clone(),
            keyed.keyring.clone(),
            barrier.clone(),
        );
        rotation.start().await.unwrap();
        while rotation.step().await.unwrap() {}
        while rotation.status().await.unwrap().state != "idle" {
            rotation.step().await.unwrap();
        }
        assert_eq!(rotation.retire().await.unwrap(), [1]);
        paused.go.notify_one();
        let v = read.await.unwrap().unwrap();
        assert_eq!(&*v.data, br#"{"v":"1"}"#.as_slice());
    }
}
