//! Process hardening at start-up: no core dumps and no ptrace attach by other processes
//! of the same user (`PR_SET_DUMPABLE` = 0), and memory locked so that nothing the process
//! holds (data keys, epoch keys, secret values in flight) is written to swap
//! (`mlockall`). docs/threat-model.md ("Memory") lists what this covers and what not.
//!
//! Freed heap memory is zeroed by the server's allocator (`zalloc` around mimalloc, in
//! `main.rs`): a buffer that held a secret value or a request body is wiped when it is
//! released, whichever library allocated it (hyper, rustls, serde_json).

use serde::Deserialize;

/// `[memory] lock`: whether the server locks its memory (`mlockall`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryLock {
    /// Lock; when the system refuses (no `CAP_IPC_LOCK`, `RLIMIT_MEMLOCK` too small),
    /// start anyway with a warning that says how to allow it.
    #[default]
    Try,
    /// Lock, and refuse to start when the system does not allow it.
    Required,
    /// Do not lock (Vault's `disable_mlock`): for systems with encrypted swap or none.
    Off,
}

/// `[memory]`: how the process protects what it holds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    #[serde(default)]
    pub lock: MemoryLock,
}

/// What [`apply`] achieved, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Core dumps and ptrace attach are off (`PR_SET_DUMPABLE` = 0).
    pub not_dumpable: bool,
    /// Memory is locked (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`).
    pub locked: bool,
    /// Why memory is not locked, when it was asked for and refused.
    pub lock_refused: Option<String>,
}

/// Errors of [`apply`]: only with `lock = "required"`, or when the process cannot be made
/// non-dumpable (which Linux always allows; an error would be a broken kernel interface).
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error("cannot disable core dumps (PR_SET_DUMPABLE): {0}")]
    Dumpable(std::io::Error),
    #[error(
        "cannot lock memory (mlockall: {0}); give the process CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK (LimitMEMLOCK=infinity under systemd), or set [memory] lock = \"try\" or \"off\""
    )]
    Lock(std::io::Error),
}

/// Make the process non-dumpable. Called first thing by every `keyvault` command: the CLI
/// holds tokens and secret values too. An `execve` resets it, so a re-executed process
/// calls it again.
pub fn disable_dumps() -> Result<(), HardeningError> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError::Dumpable(e.into()))
}

/// Apply the server's hardening: non-dumpable, then memory locked as configured. Pages are
/// locked as they are touched (`MCL_ONFAULT`): reserved but unused address space (thread
/// stacks, allocator arenas) costs nothing. Memory is locked only where no limit can make
/// a later allocation fail: `RLIMIT_MEMLOCK` unlimited (`LimitMEMLOCK=infinity`) or
/// `CAP_IPC_LOCK`.
pub fn apply(memory: &MemoryConfig) -> Result<Applied, HardeningError> {
    disable_dumps()?;
    let mut applied = Applied { not_dumpable: true, locked: false, lock_refused: None };
    if memory.lock == MemoryLock::Off {
        return Ok(applied);
    }
    // With a finite RLIMIT_MEMLOCK and no CAP_IPC_LOCK, `mlockall(MCL_FUTURE)` may
    // succeed while the process is small and make a later allocation fail once it grows
    // past the limit (an abort under load). Lock only when growth cannot hit a limit.
    if let Some(why) = lock_unsafe() {
        if memory.lock == MemoryLock::Required {
            return Err(HardeningError::Lock(std::io::Error::other(why)));
        }
        applied.lock_refused = Some(why);
        return Ok(applied);
    }
    use rustix::mm::MlockAllFlags;
    match rustix::mm::mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT) {
        Ok(()) => {
            applied.locked = true;
            ALL_LOCKED.store(true, std::sync::atomic::Ordering::Release);
        }
        Err(e) if memory.lock == MemoryLock::Required => return Err(HardeningError::Lock(e.into())),
        Err(e) => applied.lock_refused = Some(e.to_string()),
    }
    Ok(applied)
}

/// Set once `mlockall` succeeded (see [`all_memory_locked`]).
static ALL_LOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether every page of the process is locked (`mlockall` succeeded): code that would
/// lock a region of its own must not, since unlocking it later would unlock those pages
/// for good (`munlock` does not count locks).
pub fn all_memory_locked() -> bool {
    ALL_LOCKED.load(std::sync::atomic::Ordering::Acquire)
}

#[cfg(test)]
pub(crate) fn set_all_memory_locked_for_test(locked: bool) {
    ALL_LOCKED.store(locked, std::sync::atomic::Ordering::Release);
}

/// Why locking all memory is not safe here, if it is not: `RLIMIT_MEMLOCK` is finite and
/// the process lacks `CAP_IPC_LOCK` (which lifts the limit).
fn lock_unsafe() -> Option<String> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    let capable =
        rustix::thread::capabilities(None).is_ok_and(|c| c.effective.contains(rustix::thread::CapabilitySet::IPC_LOCK));
    match limit {
        Some(bytes) if !capable => Some(format!(
            "RLIMIT_MEMLOCK is {} KiB and the process lacks CAP_IPC_LOCK: locking every page would make allocations fail once the server outgrows it",
            bytes / 1024
        )),
        _ => None,
    }
}

/// Log what [`apply`] did: one line, and a warning when memory could not be locked.
pub fn log(applied: &Applied) {
    if let Some(why) = &applied.lock_refused {
        tracing::warn!(
            error = %why,
            "memory is NOT locked: secrets and keys in memory may be written to swap; give the process CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK (LimitMEMLOCK=infinity under systemd), or set [memory] lock = \"off\" to silence this where swap is encrypted or absent"
        );
    }
    tracing::info!(
        core_dumps = !applied.not_dumpable,
        memory_locked = applied.locked,
        "process hardening: core dumps and ptrace attach disabled, freed memory zeroed"
    );
}

/// Whether the calling process is dumpable (for tests).
pub fn is_dumpable() -> bool {
    !matches!(rustix::process::dumpable_behavior(), Ok(rustix::process::DumpableBehavior::NotDumpable))
}
