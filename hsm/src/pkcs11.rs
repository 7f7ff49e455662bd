//! The PKCS#11 implementation of [`KeyStore`], through `cryptoki`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::error::{HsmError, Result, rv_is_stale_handle};
use crate::keystore::{KeyKind, KeyLabel, KeyStore, WrapMechanism};

/// DER encoding of the Ed25519 curve OID 1.3.101.112, the `CKA_EC_PARAMS` of PKCS#11 3.0.
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];
const GCM_IV_LEN: usize = 12;
const GCM_TAG_BITS: u64 = 128;

/// The default of [`Pkcs11Config::session_copies`].
pub const DEFAULT_SESSION_COPIES: usize = 256;

/// How long a session copy is used before the store checks again that the token object
/// it was copied from still exists (another process may have destroyed it).
pub const COPY_RECHECK: Duration = Duration::from_secs(1);

/// Which wrap mechanism to use for new wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WrapPreference {
    /// AES-GCM if the token offers it, else AES key wrap with padding.
    #[default]
    Auto,
    /// Exactly this one; opening fails if the token does not offer it.
    Only(WrapMechanism),
}

/// How to open a token.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token, never a slot number (slot numbers change).
    pub token_label: String,
    /// The user PIN.
    pub pin: SecretString,
    /// Upper bound on open sessions. SoftHSM serializes inside the module, so a small pool
    /// is enough there; a network HSM benefits from more.
    pub max_sessions: usize,
    /// How long a caller waits for a free session before [`HsmError::PoolTimeout`].
    pub session_wait: Duration,
    /// How long to keep retrying token discovery at start-up (SoftHSMv2 issue 757: processes
    /// that initialize at the same moment sometimes do not see the token).
    pub discovery_timeout: Duration,
    pub wrap: WrapPreference,
    /// Most keys the store keeps a session copy of (0: none). See [`Pkcs11KeyStore`],
    /// "Session copies".
    pub session_copies: usize,
    /// The only user of the module in this process (the server): while the token is not
    /// found at start-up, the module may be re-initialised between looks. SoftHSM reads a
    /// token's files when it first lists it; read while another process rewrites them, the
    /// token stays invisible to this process until the module is initialised again. False
    /// where other threads may be using the module (tests opening several tokens).
    pub alone_in_process: bool,
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("max_sessions", &self.max_sessions)
            .field("session_wait", &self.session_wait)
            .field("discovery_timeout", &self.discovery_timeout)
            .field("wrap", &self.wrap)
            .field("session_copies", &self.session_copies)
            .field("alone_in_process", &self.alone_in_process)
            .finish()
    }
}

impl Pkcs11Config {
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: SecretString) -> Self {
        Pkcs11Config {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            max_sessions: 4,
            session_wait: Duration::from_secs(5),
            discovery_timeout: Duration::from_secs(3),
            wrap: WrapPreference::Auto,
            session_copies: DEFAULT_SESSION_COPIES,
            alone_in_process: false,
        }
    }
}

/// One `Pkcs11` context per module per process: calling `C_Initialize` from several
/// contexts on the same module is not safe, and all sessions share one login.
static CONTEXTS: LazyLock<Mutex<HashMap<PathBuf, Pkcs11>>> = LazyLock::new(Default::default);

/// Load and initialize `module` once for this process.
pub fn context(module: &Path) -> Result<Pkcs11> {
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    if !module.exists() {
        return Err(HsmError::ModuleLoad {
            path: module.display().to_string(),
            reason: "file not found (on Debian: apt-get install softhsm2)".into(),
        });
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| HsmError::ModuleLoad { path: module.display().to_string(), reason: e.to_string() })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    contexts.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Find the slot whose initialized token carries `label`.
pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>> {
    // Not get_slots_with_initialized_token: it fails as a whole when one slot's token
    // does not answer, and a slot whose token is being removed can do that.
    for slot in ctx.get_slots_with_token()? {
        match ctx.get_token_info(slot) {
            Ok(info) if info.token_initialized() && info.label().trim_end() == label => {
                return Ok(Some(slot));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(slot = slot.id(), error = %e, "skipping a slot whose token does not answer")
            }
        }
    }
    Ok(None)
}

/// Sessions, opened lazily up to `max` and reused.
struct Pool {
    idle: Mutex<PoolState>,
    freed: Condvar,
    max: usize,
    wait: Duration,
}

struct PoolState {
    sessions: Vec<Session>,
    open: usize,
}

/// A session on loan. Returned to the pool on drop unless it was found broken.
struct Lease<'a> {
    store: &'a Pkcs11KeyStore,
    session: Option<Session>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Session;
    fn deref(&self) -> &Session {
        // Invariant: `session` is Some until drop or `discard`, which consumes the lease.
        self.session.as_ref().expect("lease holds a session until dropped")
    }
}

impl Lease<'_> {
    /// Close this session instead of returning it (it errored as gone).
    fn discard(mut self) {
        if let Some(s) = self.session.take() {
            drop(s);
            let mut st = self.store.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            st.open -= 1;
            self.store.pool.freed.notify_one();
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if self.store.is_sealed() {
                // Sealed while on loan: close it (the pool keeps no session while sealed).
                drop(s);
                let mut st = self.store.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                st.open -= 1;
                self.store.pool.freed.notify_one();
                return;
            }
            let mut st = self.store.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            st.sessions.push(s);
            self.store.pool.freed.notify_one();
        }
    }
}

/// A [`KeyStore`] on a PKCS#11 token.
///
/// # Session copies
///
/// SoftHSM's file-backed token opens, locks and reads two files for every use of a
/// token object (its generation and the object's own file), which costs more than the
/// AES-GCM operation itself. So the store makes a *session copy* of each private and
/// secret key it uses (`C_CopyObject` with `CKA_TOKEN` false, up to
/// [`Pkcs11Config::session_copies`] keys) and calls with that. The copy is made and kept
/// inside the token: PKCS#11 lets a copy only keep or tighten `CKA_SENSITIVE` and
/// `CKA_EXTRACTABLE`, so it is as sensitive and unextractable as its original; its value
/// is never read. All copies belong to one session of the
/// store's, so closing that session destroys them: the store closes it when it seals,
/// reconnects or re-initialises, and whenever a handle turns out stale. [`KeyStore::destroy`]
/// destroys a key's copies with it. A key destroyed by another process is noticed within
/// [`COPY_RECHECK`]: a copy is used that long before the store checks again that its
/// token object still exists. A token that refuses `C_CopyObject` is used directly.
pub struct Pkcs11KeyStore {
    ctx: Pkcs11,
    label: String,
    /// The user PIN; `None` while sealed.
    pin: RwLock<Option<SecretString>>,
    slot: RwLock<Slot>,
    pool: Pool,
    /// Object handles by (label, class). Handles of token objects are valid in every
    /// session of this application until the object is destroyed or the token goes away;
    /// so are those of session copies, until their session closes.
    handles: RwLock<HashMap<(String, u8), Cached>>,
    /// The session that owns the session copies, and the limit on their number. Lock
    /// order: `copies`, then `handles`.
    copies: Mutex<Copies>,
    wrap: WrapMechanism,
    mechanisms: Vec<MechanismType>,
    /// Serializes generation in this process: "is the label free" and "make the object"
    /// are two calls, and two threads must not both find it free.
    generating: std::sync::Mutex<()>,
    /// Serializes [`KeyStore::unseal`].
    unsealing: std::sync::Mutex<()>,
    /// The token was not found at the last look: `slot` is stale (after a
    /// re-initialisation its number may name another token). Calls look again first.
    missing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Pkcs11KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyStore")
            .field("token_label", &self.label)
            .field("wrap", &self.wrap)
            .finish_non_exhaustive()
    }
}

/// What the token holds under a label, against the key a caller wants there
/// ([`Pkcs11KeyStore::key_as_made`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    /// The key, whole and protected, as generation makes it.
    Whole,
    /// Two objects of the key's class (or two public halves).
    Twice,
    /// Anything else: a part of a key, an unprotected object, a key of another kind.
    NotWhole,
}

/// A cached handle.
#[derive(Debug, Clone, Copy)]
struct Cached {
    /// The handle calls use: the session copy if there is one, else the token object.
    handle: ObjectHandle,
    /// The token object.
    token: ObjectHandle,
    /// When the token object was last seen to exist (what a copy is rechecked by).
    checked: Instant,
}

impl Cached {
    fn new(handle: ObjectHandle, token: ObjectHandle) -> Self {
        Cached { handle, token, checked: Instant::now() }
    }

    /// `handle` is a session copy, not the token object itself.
    fn is_copy(&self) -> bool {
        self.handle != self.token
    }
}

/// Session copies of token keys ([`Pkcs11KeyStore`], "Session copies").
struct Copies {
    /// Owns every copy: closing it destroys them all.
    owner: Option<Session>,
    /// Most copies at once (0: none).
    max: usize,
    /// The token refused to copy a key: no more attempts.
    refused: bool,
}

/// Whether `C_CopyObject` failed because the token does not copy keys (for good), not
/// because of the moment.
fn rv_refuses_copy(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::FunctionNotSupported
            | RvError::ActionProhibited
            | RvError::AttributeReadOnly
            | RvError::AttributeTypeInvalid
            | RvError::AttributeValueInvalid
            | RvError::TemplateInconsistent
            | RvError::TemplateIncomplete
    )
}

/// Stable cache key for the three object classes KeyVault looks up
/// (`ObjectClass` is not `Hash`).
fn class_key(class: ObjectClass) -> u8 {
    if class == ObjectClass::SECRET_KEY {
        0
    } else if class == ObjectClass::PRIVATE_KEY {
        1
    } else {
        2
    }
}

/// See [`Pkcs11KeyStore::protection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyProtection {
    /// `CKO_SECRET_KEY` or `CKO_PRIVATE_KEY`.
    pub class: String,
    /// A token object (`CKA_TOKEN`), not one of the store's session copies.
    pub token_object: bool,
    pub sensitive: bool,
    pub extractable: bool,
    /// `C_WrapKey` of the object was refused by the token.
    pub wrap_refused: bool,
}

impl Pkcs11KeyStore {
    /// Load the module, find the token by label (retrying for `discovery_timeout`), log
    /// in and pick the wrap mechanism from the token's mechanism list.
    pub fn open(config: &Pkcs11Config) -> Result<Arc<Self>> {
        let ctx = context(&config.module)?;
        let deadline = Instant::now() + config.discovery_timeout;
        let mut backoff = Duration::from_millis(20);
        let slot = loop {
            match find_token(&ctx, &config.token_label) {
                Ok(Some(slot)) => break slot,
                Ok(None) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(400));
                    if config.alone_in_process {
                        tracing::debug!(token = %config.token_label, "token not found yet; re-initialising the module");
                        match ctx.clone().finalize() {
                            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
                            Err(e) => return Err(e.into()),
                        }
                        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok(None) => {
                    return Err(HsmError::TokenNotFound { label: config.token_label.clone() });
                }
                Err(e) => return Err(e),
            }
        };
        // Ask for the mechanisms KeyVault uses one by one: C_GetMechanismList would also
        // return vendor mechanisms that cryptoki cannot name (and logs each as an error).
        let mechanisms: Vec<MechanismType> = [
            MechanismType::AES_GCM,
            MechanismType::AES_KEY_WRAP_PAD,
            MechanismType::AES_KEY_GEN,
            MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
            MechanismType::EDDSA,
            MechanismType::GENERIC_SECRET_KEY_GEN,
            MechanismType::SHA256_HMAC,
        ]
        .into_iter()
        .filter(|m| ctx.get_mechanism_info(slot, *m).is_ok())
        .collect();
        let has = |m: MechanismType| mechanisms.contains(&m);
        let wrap = match config.wrap {
            WrapPreference::Auto if has(MechanismType::AES_GCM) => WrapMechanism::AesGcm,
            WrapPreference::Auto if has(MechanismType::AES_KEY_WRAP_PAD) => WrapMechanism::AesKeyWrapPad,
            WrapPreference::Auto => {
                return Err(HsmError::MechanismUnsupported("wrapping data keys"));
            }
            WrapPreference::Only(m) => {
                let needed = match m {
                    WrapMechanism::AesGcm => MechanismType::AES_GCM,
                    WrapMechanism::AesKeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
                };
                if !has(needed) {
                    return Err(HsmError::MechanismUnsupported(m.name()));
                }
                m
            }
        };
        let store = Pkcs11KeyStore {
            ctx,
            label: config.token_label.clone(),
            pin: RwLock::new(Some(config.pin.clone())),
            slot: RwLock::new(slot),
            pool: Pool {
                idle: Mutex::new(PoolState { sessions: Vec::new(), open: 0 }),
                freed: Condvar::new(),
                max: config.max_sessions.max(1),
                wait: config.session_wait,
            },
            handles: RwLock::new(HashMap::new()),
            copies: Mutex::new(Copies { owner: None, max: config.session_copies, refused: false }),
            wrap,
            mechanisms,
            generating: std::sync::Mutex::new(()),
            unsealing: std::sync::Mutex::new(()),
            missing: std::sync::atomic::AtomicBool::new(false),
        };
        // Log in now so that a wrong PIN fails start-up, not the first request.
        drop(store.lease()?);
        tracing::info!(token = %store.label, slot = slot.id(), wrap = wrap.name(), "PKCS#11 token opened");
        Ok(Arc::new(store))
    }

    /// True if the token offers this mechanism (of those KeyVault uses).
    pub fn supports(&self, m: MechanismType) -> bool {
        self.mechanisms.contains(&m)
    }

    fn open_session(&self) -> Result<Session> {
        let pin = self.pin.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(HsmError::Sealed)?;
        self.login_session(&pin, false)
    }

    /// Open a session and log in. `strict`: the login must check this PIN, so a token
    /// this application is already logged in to is an error, not a success.
    fn login_session(&self, pin: &SecretString, strict: bool) -> Result<Session> {
        let slot = *self.slot.read().unwrap_or_else(|p| p.into_inner());
        let session = self.ctx.open_rw_session(slot)?;
        match session.login(UserType::User, Some(pin)) {
            Ok(()) => Ok(session),
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, function)) if strict => {
                Err(HsmError::Pkcs11 { function, rv: RvError::UserAlreadyLoggedIn })
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e @ CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired, _)) => {
                Err(e.into())
            }
            // Any other login failure means the token is not in a usable state right now.
            Err(CkError::Pkcs11(rv, function)) => Err(HsmError::Unavailable { function, rv }),
            Err(e) => Err(e.into()),
        }
    }

    fn lease(&self) -> Result<Lease<'_>> {
        if self.is_sealed() {
            return Err(HsmError::Sealed);
        }
        if self.missing.load(std::sync::atomic::Ordering::Acquire) {
            match find_token(&self.ctx, &self.label)? {
                Some(slot) => {
                    *self.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
                    self.missing.store(false, std::sync::atomic::Ordering::Release);
                    tracing::warn!(token = %self.label, slot = slot.id(), "PKCS#11 token found again");
                }
                None => return Err(HsmError::TokenNotFound { label: self.label.clone() }),
            }
        }
        let deadline = Instant::now() + self.pool.wait;
        let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = st.sessions.pop() {
                return Ok(Lease { store: self, session: Some(s) });
            }
            if st.open < self.pool.max {
                st.open += 1;
                drop(st);
                return match self.open_session() {
                    Ok(s) => Ok(Lease { store: self, session: Some(s) }),
                    Err(e) => {
                        let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                        st.open -= 1;
                        self.pool.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(HsmError::PoolTimeout);
            }
            st = self.pool.freed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The token went away: drop idle sessions and cached handles, find the token again
    /// by label (its slot may have changed) so the next call starts afresh.
    fn reconnect(&self) -> Result<()> {
        {
            let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let n = st.sessions.len();
            st.sessions.clear();
            st.open -= n;
        }
        self.forget_handles();
        match find_token(&self.ctx, &self.label)? {
            Some(slot) => {
                *self.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
                tracing::warn!(token = %self.label, slot = slot.id(), "PKCS#11 token reconnected");
                Ok(())
            }
            None => {
                self.missing.store(true, std::sync::atomic::Ordering::Release);
                Err(HsmError::TokenNotFound { label: self.label.clone() })
            }
        }
    }

    /// Run `op` on a pooled session. A session or token that went away is replaced and
    /// the call retried once; a stale object handle is looked up again and retried once.
    fn run<T>(&self, op: impl Fn(&Self, &Session) -> Result<T>) -> Result<T> {
        let mut retried = false;
        loop {
            let lease = self.lease()?;
            match op(self, &lease) {
                Err(HsmError::Unavailable { function, rv }) => {
                    lease.discard();
                    tracing::warn!(%function, %rv, "PKCS#11 session lost");
                    if retried {
                        return Err(HsmError::Unavailable { function, rv });
                    }
                    self.reconnect()?;
                }
                Err(HsmError::Pkcs11 { function, rv }) if rv_is_stale_handle(rv) && !retried => {
                    drop(lease);
                    tracing::debug!(%function, "stale object handle, looking keys up again");
                    self.forget_handles();
                }
                // A key we expected is gone: the token may have been swapped or restored
                // under us. Start from fresh sessions and a fresh slot lookup, once.
                Err(HsmError::KeyNotFound(label)) if !retried => {
                    lease.discard();
                    tracing::warn!(key = %label, "key not found in the token; reconnecting once");
                    self.reconnect()?;
                }
                // Still missing after a fresh look. A token with no objects of ours at all
                // is not the token we keep keys in (gone, swapped, being restored: retry
                // later); one that has others is missing this key (a fault to fix).
                Err(HsmError::KeyNotFound(label)) => {
                    if self.token_is_empty(&lease)? {
                        tracing::error!(token = %self.label, "the token holds no keys at all; treating it as unavailable");
                        return Err(HsmError::TokenNotFound { label: self.label.clone() });
                    }
                    return Err(HsmError::KeyNotFound(label));
                }
                other => return other,
            }
            retried = true;
        }
    }

    /// Whether the token holds no private or secret key objects at all.
    fn token_is_empty(&self, session: &Session) -> Result<bool> {
        for class in [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY] {
            if !session.find_objects(&[Attribute::Token(true), Attribute::Class(class)])?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Forget every cached handle and destroy every session copy (by closing the session
    /// that owns them).
    fn forget_handles(&self) {
        self.forget_handles_locked(&mut self.copies.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// [`Self::forget_handles`], for a caller that holds the copies lock.
    fn forget_handles_locked(&self, copies: &mut Copies) {
        copies.owner = None;
        self.handles.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Handle of the object with `label` and `class` to call with: from the cache, else
    /// found by `C_FindObjects` (and, for a private or secret key, copied into a session
    /// object: see "Session copies" above).
    fn handle(&self, session: &Session, label: &KeyLabel, class: ObjectClass) -> Result<ObjectHandle> {
        let key = (label.as_str().to_owned(), class_key(class));
        let cached = self.handles.read().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        if let Some(c) = cached {
            if !c.is_copy() || c.checked.elapsed() < COPY_RECHECK {
                return Ok(c.handle);
            }
            // Is the token object still there? (Another process may have destroyed it.) If
            // not, the stale handle's error makes `run` forget every handle and copy.
            session.get_attributes(c.token, &[AttributeType::Class])?;
            if let Some(e) = self.handles.write().unwrap_or_else(|p| p.into_inner()).get_mut(&key)
                && e.handle == c.handle
            {
                e.checked = Instant::now();
            }
            return Ok(c.handle);
        }
        // Under the copies lock: SoftHSM builds a copy attribute by attribute, and while
        // it does, the copy still says `CKA_TOKEN` true and would be found here too.
        let mut copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        // Another call may have cached it meanwhile (one copy per key).
        if let Some(c) = self.handles.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(c.handle);
        }
        let found = session.find_objects(&[
            Attribute::Token(true),
            Attribute::Class(class),
            Attribute::Label(label.as_str().as_bytes().to_vec()),
        ])?;
        let token = match found.as_slice() {
            [] => return Err(HsmError::KeyNotFound(label.to_string())),
            [h] => *h,
            _ => return Err(HsmError::DuplicateLabel(label.to_string())),
        };
        if class == ObjectClass::PUBLIC_KEY {
            self.handles.write().unwrap_or_else(|p| p.into_inner()).insert(key, Cached::new(token, token));
            return Ok(token);
        }
        self.copy_of(&mut copies, key, token)
    }

    /// Cache `token` under `key`, with a session copy of it if the limit allows and the
    /// token agrees; the handle to call with.
    fn copy_of(&self, copies: &mut Copies, key: (String, u8), token: ObjectHandle) -> Result<ObjectHandle> {
        let made = self.handles.read().unwrap_or_else(|p| p.into_inner()).values().filter(|c| c.is_copy()).count();
        let mut cached = Cached::new(token, token);
        if !copies.refused && made < copies.max {
            if copies.owner.is_none() {
                copies.owner = Some(self.open_session()?);
            }
            let owner = copies.owner.as_ref().expect("opened above");
            match owner.copy_object(token, &[Attribute::Token(false)]) {
                Ok(copy) => cached = Cached::new(copy, token),
                Err(CkError::Pkcs11(rv, function)) if rv_is_stale_handle(rv) => {
                    return Err(HsmError::Pkcs11 { function, rv });
                }
                Err(CkError::Pkcs11(rv @ (RvError::SessionHandleInvalid | RvError::SessionClosed), function)) => {
                    // The owner session is gone, and its copies with it.
                    self.forget_handles_locked(copies);
                    return Err(HsmError::Pkcs11 { function, rv });
                }
                Err(CkError::Pkcs11(rv, function)) if rv_refuses_copy(rv) => {
                    copies.refused = true;
                    tracing::info!(token = %self.label, %function, %rv, "the token does not copy keys into sessions; using its objects directly");
                }
                Err(e) => {
                    // Not cached: the next call tries again.
                    tracing::debug!(token = %self.label, error = %e, "could not copy a key into a session; using the token object");
                    return Ok(token);
                }
            }
        }
        self.handles.write().unwrap_or_else(|p| p.into_inner()).insert(key, cached);
        Ok(cached.handle)
    }

    /// How the token protects each private or secret key object labelled `label`: what
    /// the token itself says about it (`CKA_SENSITIVE`, `CKA_EXTRACTABLE`), and whether an
    /// attempt to get it out of the token wrapped (`C_WrapKey` under a fresh session key)
    /// is refused. For audits and tests: nothing here returns key material.
    pub fn protection(&self, label: &KeyLabel) -> Result<Vec<KeyProtection>> {
        self.run(|_, session| {
            let mut out = Vec::new();
            // Token objects and this store's session copies of them alike.
            for h in session.find_objects(&[Attribute::Label(label.as_str().as_bytes().to_vec())])? {
                let attrs = session.get_attributes(
                    h,
                    &[AttributeType::Class, AttributeType::Token, AttributeType::Sensitive, AttributeType::Extractable],
                )?;
                let mut p = KeyProtection {
                    class: String::new(),
                    token_object: false,
                    sensitive: false,
                    extractable: true,
                    wrap_refused: false,
                };
                for a in attrs {
                    match a {
                        Attribute::Class(c) => p.class = c.to_string(),
                        Attribute::Token(v) => p.token_object = v,
                        Attribute::Sensitive(v) => p.sensitive = v,
                        Attribute::Extractable(v) => p.extractable = v,
                        _ => {}
                    }
                }
                if p.class == ObjectClass::PUBLIC_KEY.to_string() {
                    continue;
                }
                // A wrapping key that lives only in this session.
                let wrapper = session.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Wrap(true),
                    ],
                )?;
                let attempt = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapper, h);
                let _ = session.destroy_object(wrapper);
                p.wrap_refused = match attempt {
                    Ok(_) => false,
                    Err(CkError::Pkcs11(rv, _)) => {
                        matches!(
                            rv,
                            RvError::KeyUnextractable | RvError::KeyNotWrappable | RvError::KeyFunctionNotPermitted
                        )
                    }
                    Err(e) => return Err(e.into()),
                };
                out.push(p);
            }
            Ok(out)
        })
    }

    /// Generate `kind` under `label` in the token: sensitive, non-extractable, private.
    fn make_key(&self, session: &Session, label: &KeyLabel, kind: KeyKind) -> Result<()> {
        let name = label.as_str().as_bytes().to_vec();
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Label(name.clone()),
        ];
        match kind {
            KeyKind::Aes256 | KeyKind::Aes256Gcm => {
                // The master key is usable for exactly the mechanism this token wraps with;
                // a transit key encrypts and decrypts.
                let (a, b) = match (kind, self.wrap) {
                    (KeyKind::Aes256, WrapMechanism::AesKeyWrapPad) => (Attribute::Wrap(true), Attribute::Unwrap(true)),
                    _ => (Attribute::Encrypt(true), Attribute::Decrypt(true)),
                };
                let mut t = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    a,
                    b,
                ];
                t.extend(private);
                session.generate_key(&Mechanism::AesKeyGen, &t)?;
            }
            KeyKind::HmacSha256 => {
                let mut t = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                ];
                t.extend(private);
                session.generate_key(&Mechanism::GenericSecretKeyGen, &t)?;
            }
            KeyKind::Ed25519 => {
                let public = [
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Verify(true),
                    Attribute::EcParams(ED25519_OID.to_vec()),
                    Attribute::Label(name.clone()),
                ];
                let mut t = vec![Attribute::Sign(true)];
                t.extend(private);
                session.generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public, &t)?;
            }
        }
        Ok(())
    }

    /// What the token holds under `label`, judged against a key of `kind` as
    /// [`Self::make_key`] makes it: exactly one object of the key's class (secret, or
    /// private for Ed25519) that is a private, sensitive, unextractable token object,
    /// generated in the token (`CKA_LOCAL`) and never extractable or readable since;
    /// for Ed25519 exactly one public half; of the kind's key type; nothing else under
    /// the label.
    fn key_as_made(&self, session: &Session, label: &KeyLabel, kind: KeyKind) -> Result<Made> {
        let (secret, key_type) = match kind {
            KeyKind::Ed25519 => (ObjectClass::PRIVATE_KEY, KeyType::EC_EDWARDS),
            KeyKind::HmacSha256 => (ObjectClass::SECRET_KEY, KeyType::GENERIC_SECRET),
            KeyKind::Aes256 | KeyKind::Aes256Gcm => (ObjectClass::SECRET_KEY, KeyType::AES),
        };
        let (mut secrets, mut publics, mut others, mut protected) = (0usize, 0usize, 0usize, true);
        for h in self.objects_with_label(session, label)? {
            let attrs = session.get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Local,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )?;
            let (mut class, mut private, mut sensitive, mut extractable) = (None, false, false, true);
            // Made inside the token and never readable: not a key imported with a value
            // someone chose. (A token that does not report these attributes is taken at
            // its word on the others; one that reports any of them false is not.)
            let (mut right_type, mut local, mut always_sensitive, mut never_extractable) = (false, true, true, true);
            for a in attrs {
                match a {
                    Attribute::Class(c) => class = Some(c),
                    Attribute::KeyType(t) => right_type = t == key_type,
                    Attribute::Private(v) => private = v,
                    Attribute::Sensitive(v) => sensitive = v,
                    Attribute::Extractable(v) => extractable = v,
                    Attribute::Local(v) => local = v,
                    Attribute::AlwaysSensitive(v) => always_sensitive = v,
                    Attribute::NeverExtractable(v) => never_extractable = v,
                    _ => {}
                }
            }
            match class {
                Some(c) if c == secret => {
                    secrets += 1;
                    protected &= right_type
                        && private
                        && sensitive
                        && !extractable
                        && local
                        && always_sensitive
                        && never_extractable;
                }
                Some(c) if c == ObjectClass::PUBLIC_KEY && kind == KeyKind::Ed25519 => publics += 1,
                _ => others += 1,
            }
        }
        let publics_wanted = usize::from(kind == KeyKind::Ed25519);
        Ok(if secrets > 1 || publics > 1 {
            // One object shown twice (SoftHSM, see `DuplicateLabel`) or two keys.
            Made::Twice
        } else if secrets == 1 && protected && publics == publics_wanted && others == 0 {
            Made::Whole
        } else {
            Made::NotWhole
        })
    }

    /// Destroy every object labelled `label`, token object or not (what a failed or
    /// wrongly stored generation left; a label being made has no session copies).
    fn remove_label(&self, session: &Session, label: &KeyLabel) -> Result<()> {
        for h in session.find_objects(&[Attribute::Label(label.as_str().as_bytes().to_vec())])? {
            session.destroy_object(h)?;
        }
        // A handle cached for the label (a lookup before it was made) names nothing now.
        self.handles.write().unwrap_or_else(|p| p.into_inner()).retain(|(l, _), _| l != label.as_str());
        Ok(())
    }

    fn objects_with_label(&self, session: &Session, label: &KeyLabel) -> Result<Vec<ObjectHandle>> {
        Ok(session.find_objects(&[Attribute::Token(true), Attribute::Label(label.as_str().as_bytes().to_vec())])?)
    }

    fn gcm_encrypt(&self, session: &Session, kek: ObjectHandle, data: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut iv = [0u8; GCM_IV_LEN];
        getrandom::fill(&mut iv).map_err(|e| HsmError::Wrapper(format!("OS RNG: {e}")))?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, GCM_TAG_BITS.into())?;
        let ct = session.encrypt(&Mechanism::AesGcm(params), kek, data)?;
        let mut out = Vec::with_capacity(1 + GCM_IV_LEN + ct.len());
        out.push(WrapMechanism::AesGcm as u8);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn gcm_decrypt(&self, session: &Session, kek: ObjectHandle, body: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if body.len() < GCM_IV_LEN + 16 {
            return Err(HsmError::InvalidCiphertext);
        }
        let (iv, ct) = body.split_at(GCM_IV_LEN);
        let mut iv = <[u8; GCM_IV_LEN]>::try_from(iv).map_err(|_| HsmError::InvalidCiphertext)?;
        let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
        match session.decrypt(&Mechanism::AesGcm(params), kek, ct) {
            Ok(pt) => Ok(Zeroizing::new(pt)),
            // SoftHSM 2.6 answers a failed tag check with CKR_GENERAL_ERROR instead of
            // CKR_ENCRYPTED_DATA_INVALID (SoftHSMv2 issue 689, fixed after 2.6.1).
            Err(CkError::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid
                | RvError::GeneralError,
                _,
            )) => Err(HsmError::InvalidCiphertext),
            Err(e) => Err(e.into()),
        }
    }

    fn kwp_wrap(&self, session: &Session, kek: ObjectHandle, key: &[u8]) -> Result<Vec<u8>> {
        // C_WrapKey needs the data key as an object: a session object (never on the
        // token's storage), destroyed straight after.
        let mut template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Value(key.to_vec()),
        ];
        let obj = session.create_object(&template);
        // The template's copy of the data key is zeroized before it is freed.
        if let Attribute::Value(v) = &mut template[5] {
            zeroize::Zeroize::zeroize(v);
        }
        let obj = obj?;
        let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, kek, obj);
        let destroyed = session.destroy_object(obj);
        let wrapped = wrapped?;
        destroyed?;
        let mut out = Vec::with_capacity(1 + wrapped.len());
        out.push(WrapMechanism::AesKeyWrapPad as u8);
        out.extend_from_slice(&wrapped);
        Ok(out)
    }

    fn kwp_unwrap(&self, session: &Session, kek: ObjectHandle, body: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let obj = match session.unwrap_key(
            &Mechanism::AesKeyWrapPad,
            kek,
            body,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        ) {
            Ok(obj) => obj,
            // CKR_GENERAL_ERROR: SoftHSM's answer to a failed integrity check (issue 689).
            Err(CkError::Pkcs11(
                RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange
                | RvError::EncryptedDataInvalid
                | RvError::GeneralError,
                _,
            )) => return Err(HsmError::InvalidCiphertext),
            Err(e) => return Err(e.into()),
        };
        let value = session.get_attributes(obj, &[AttributeType::Value]);
        let destroyed = session.destroy_object(obj);
        let mut attrs = value?;
        destroyed?;
        match attrs.pop() {
            Some(Attribute::Value(mut v)) => {
                let out = Zeroizing::new(v.clone());
                zeroize::Zeroize::zeroize(&mut v);
                Ok(out)
            }
            _ => Err(HsmError::BadAttribute("unwrapped key has no readable value")),
        }
    }

    #[cfg(test)]
    pub(crate) fn value_attribute_info(
        &self,
        label: &KeyLabel,
        class: ObjectClass,
    ) -> Result<cryptoki::object::AttributeInfo> {
        self.run(|s, session| {
            let h = s.handle(session, label, class)?;
            let mut info = session.get_attribute_info(h, &[AttributeType::Value])?;
            info.pop().ok_or(HsmError::BadAttribute("no attribute info"))
        })
    }

    /// Make a second token object under a label that already has one (what no code path
    /// does: for the tests of duplicate labels).
    #[cfg(test)]
    pub(crate) fn make_second_object(&self, label: &KeyLabel, kind: KeyKind) -> Result<()> {
        self.run(|s, session| s.make_key(session, label, kind))
    }

    /// Destroy the token objects of one class under a label (for tests of leftovers).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn destroy_class(&self, label: &KeyLabel, class: ObjectClass) -> Result<()> {
        self.run(|s, session| {
            for h in session.find_objects(&[
                Attribute::Token(true),
                Attribute::Class(class),
                Attribute::Label(label.as_str().as_bytes().to_vec()),
            ])? {
                session.destroy_object(h)?;
            }
            s.forget_handles();
            Ok(())
        })
    }

    /// Destroy the private half of an Ed25519 key, leaving its public half: what a
    /// generation interrupted half way can leave. For tests of leftovers in other crates;
    /// it destroys, it reads nothing.
    #[doc(hidden)]
    #[cfg(any(test, feature = "testing"))]
    pub fn destroy_private_half(&self, label: &KeyLabel) -> Result<()> {
        self.destroy_class(label, ObjectClass::PRIVATE_KEY)
    }

    #[cfg(test)]
    pub(crate) fn value_attributes_returned(&self, label: &KeyLabel, class: ObjectClass) -> Result<usize> {
        self.run(|s, session| {
            let h = s.handle(session, label, class)?;
            Ok(session.get_attributes(h, &[AttributeType::Value])?.len())
        })
    }
}

/// Parse `CKA_EC_POINT` of an Ed25519 public key: a DER OCTET STRING (`04 20 || key`), as
/// SoftHSM returns it, or the raw 32 bytes, as some tokens do.
fn parse_ec_point(point: &[u8]) -> Result<[u8; 32]> {
    let raw = match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
        raw if raw.len() == 32 => raw,
        _ => {
            return Err(HsmError::BadAttribute("CKA_EC_POINT is not a 32-byte Ed25519 point"));
        }
    };
    let mut out = [0u8; 32];
    out.copy_from_slice(raw);
    Ok(out)
}

/// How many times [`KeyStore::generate`] tries to make a key when the token fails the
/// generation or does not store the key as made.
const GENERATE_ATTEMPTS: u32 = 4;

impl KeyStore for Pkcs11KeyStore {
    fn generate_claimed(&self, label: &KeyLabel, kind: KeyKind, claim_ends: Instant) -> Result<()> {
        let _one_at_a_time = self.generating.lock().unwrap_or_else(|p| p.into_inner());
        // Checked before each step that makes or destroys: a call held up (by a hung
        // token, or waiting for the lock above) past its claim touches nothing.
        let in_claim = || {
            if Instant::now() < claim_ends { Ok(()) } else { Err(HsmError::ClaimExpired(label.to_string())) }
        };
        self.run(|s, session| {
            in_claim()?;
            if !s.objects_with_label(session, label)?.is_empty() {
                // The caller holds a claim on the label (see the trait): what is under it
                // was made by an earlier claimer that did not finish, and nothing
                // committed names it. A whole key is the caller's to adopt; anything else
                // (half a key pair, an unprotected object, a key of another kind, two
                // objects) was never a usable key: replace it.
                if s.key_as_made(session, label, kind)? == Made::Whole {
                    return Err(HsmError::KeyExists(label.to_string()));
                }
                tracing::warn!(key = %label, "the objects under this label are not a whole key as it would be made; destroying them and making the key afresh");
                in_claim()?;
                s.remove_label(session, label)?;
            }
            let mut last = HsmError::BadAttribute("the token did not store a new key as it was made");
            for attempt in 1..=GENERATE_ATTEMPTS {
                if attempt > 1 {
                    // The other process is likely still writing: give it a moment.
                    std::thread::sleep(Duration::from_millis(10 * u64::from(attempt - 1)));
                }
                in_claim()?;
                match s.make_key(session, label, kind) {
                    // Read back what the token stored before anyone relies on the key: with
                    // several processes making keys at once, SoftHSM's file store has been
                    // seen to save a new key with CKA_TOKEN and CKA_SENSITIVE false (so it
                    // is not found as a token key, and its value would be readable).
                    Ok(()) => match s.key_as_made(session, label, kind)? {
                        Made::Whole => {
                            tracing::info!(key = %label, ?kind, "generated key in the token");
                            return Ok(());
                        }
                        // Most likely SoftHSM showing the new object twice to a process
                        // that indexed the token while making it; the caller's key store
                        // looks again after re-initialising the module, and then finds
                        // the key whole (`KeyExists`: adopt it) or replaces what is there.
                        Made::Twice => return Err(HsmError::DuplicateLabel(label.to_string())),
                        Made::NotWhole => {
                            tracing::warn!(key = %label, attempt, "the token did not store the new key as it was made (not a sensitive, unextractable token object); destroying it");
                            last = HsmError::BadAttribute("the token did not store a new key as it was made");
                        }
                    },
                    // And while another process writes the shared token directory, SoftHSM
                    // now and then answers CKR_GENERAL_ERROR (saying the call may have
                    // partly succeeded) or even calls KeyVault's constant template
                    // inconsistent. Either way: remove whatever carries the label (the
                    // caller's claim means no one else makes it), then again.
                    Err(e @ HsmError::Pkcs11 { rv: RvError::GeneralError | RvError::TemplateInconsistent, .. }) => {
                        tracing::warn!(key = %label, attempt, error = %e, "key generation failed; cleaning up");
                        last = e;
                    }
                    Err(e) => return Err(e),
                }
                in_claim()?;
                if let Err(e) = s.remove_label(session, label) {
                    tracing::warn!(key = %label, error = %e, "could not remove a failed generation's objects");
                    return Err(last);
                }
            }
            Err(last)
        })
    }

    fn exists(&self, label: &KeyLabel) -> Result<bool> {
        self.run(|s, session| Ok(!s.objects_with_label(session, label)?.is_empty()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyLabel>> {
        self.run(|_, session| {
            let mut labels = Vec::new();
            for class in [ObjectClass::SECRET_KEY, ObjectClass::PRIVATE_KEY] {
                for h in session.find_objects(&[Attribute::Token(true), Attribute::Class(class)])? {
                    for attr in session.get_attributes(h, &[AttributeType::Label])? {
                        if let Attribute::Label(l) = attr
                            && let Ok(l) = String::from_utf8(l)
                            && l.starts_with(prefix)
                            && let Ok(l) = KeyLabel::new(l)
                        {
                            labels.push(l);
                        }
                    }
                }
            }
            labels.sort();
            labels.dedup();
            Ok(labels)
        })
    }

    fn destroy(&self, label: &KeyLabel) -> Result<bool> {
        let destroyed = self.run(|s, session| {
            let objects = s.objects_with_label(session, label)?;
            // Two objects of one class under the label: either SoftHSM shows one object
            // twice (destroying the second view would fail half way) or there is a real
            // second key. Neither is for this call to settle (see `DuplicateLabel`).
            if objects.len() > 1 {
                let mut classes = Vec::with_capacity(objects.len());
                for h in &objects {
                    for attr in session.get_attributes(*h, &[AttributeType::Class])? {
                        if let Attribute::Class(c) = attr {
                            if classes.contains(&c) {
                                return Err(HsmError::DuplicateLabel(label.to_string()));
                            }
                            classes.push(c);
                        }
                    }
                }
            }
            for h in &objects {
                session.destroy_object(*h)?;
            }
            // Then its session copies (those of any store: session objects are visible to
            // every session of the process), under the copies lock: a copy made before
            // this point is found here; one attempted after it finds no original to copy.
            let _copies = s.copies.lock().unwrap_or_else(|p| p.into_inner());
            for h in session
                .find_objects(&[Attribute::Token(false), Attribute::Label(label.as_str().as_bytes().to_vec())])?
            {
                session.destroy_object(h)?;
            }
            s.handles.write().unwrap_or_else(|p| p.into_inner()).retain(|(l, _), _| l != label.as_str());
            Ok(!objects.is_empty())
        });
        let destroyed = match destroyed {
            Ok(d) => d,
            Err(e) => {
                // Closing the owner session destroys every copy of this store's.
                self.forget_handles();
                return Err(e);
            }
        };
        if destroyed {
            tracing::info!(key = %label, "destroyed key in the token");
        }
        Ok(destroyed)
    }

    fn wrap_key(&self, kek: &KeyLabel, key: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        if !(16..=64).contains(&key.len()) {
            return Err(HsmError::BadAttribute("data keys are 16 to 64 bytes"));
        }
        self.run(|s, session| {
            let h = s.handle(session, kek, ObjectClass::SECRET_KEY)?;
            match s.wrap {
                WrapMechanism::AesGcm => s.gcm_encrypt(session, h, key, aad),
                WrapMechanism::AesKeyWrapPad => s.kwp_wrap(session, h, key),
            }
        })
    }

    fn unwrap_key(&self, kek: &KeyLabel, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let (mech, body) = match wrapped.split_first() {
            Some((b, body)) => (WrapMechanism::from_byte(*b).ok_or(HsmError::InvalidCiphertext)?, body),
            None => return Err(HsmError::InvalidCiphertext),
        };
        self.run(|s, session| {
            let h = s.handle(session, kek, ObjectClass::SECRET_KEY)?;
            match mech {
                WrapMechanism::AesGcm => s.gcm_decrypt(session, h, body, aad),
                WrapMechanism::AesKeyWrapPad => s.kwp_unwrap(session, h, body),
            }
        })
    }

    fn encrypt_aes_gcm(&self, label: &KeyLabel, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        if !self.supports(MechanismType::AES_GCM) {
            return Err(HsmError::MechanismUnsupported("CKM_AES_GCM"));
        }
        self.run(|s, session| {
            let h = s.handle(session, label, ObjectClass::SECRET_KEY)?;
            // gcm_encrypt prefixes the wrap mechanism byte; transit ciphertexts have none.
            let mut out = s.gcm_encrypt(session, h, plaintext, aad)?;
            out.remove(0);
            Ok(out)
        })
    }

    fn decrypt_aes_gcm(&self, label: &KeyLabel, ciphertext: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.run(|s, session| {
            let h = s.handle(session, label, ObjectClass::SECRET_KEY)?;
            s.gcm_decrypt(session, h, ciphertext, aad)
        })
    }

    fn sign_ed25519(&self, label: &KeyLabel, message: &[u8]) -> Result<[u8; 64]> {
        self.run(|s, session| {
            let h = s.handle(session, label, ObjectClass::PRIVATE_KEY)?;
            let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
            let sig = session.sign(&mech, h, message)?;
            <[u8; 64]>::try_from(sig.as_slice())
                .map_err(|_| HsmError::BadAttribute("Ed25519 signature is not 64 bytes"))
        })
    }

    fn ed25519_public_key(&self, label: &KeyLabel) -> Result<[u8; 32]> {
        self.run(|s, session| {
            let h = s.handle(session, label, ObjectClass::PUBLIC_KEY)?;
            match session.get_attributes(h, &[AttributeType::EcPoint])?.pop() {
                Some(Attribute::EcPoint(p)) => parse_ec_point(&p),
                _ => Err(HsmError::BadAttribute("public key has no CKA_EC_POINT")),
            }
        })
    }

    fn random_bytes(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        if len > 4096 {
            return Err(HsmError::BadAttribute("at most 4096 random bytes per call"));
        }
        self.run(|_, session| {
            let mut out = Zeroizing::new(vec![0u8; len]);
            session.generate_random_slice(&mut out)?;
            Ok(out)
        })
    }

    fn hmac_sha256(&self, label: &KeyLabel, message: &[u8]) -> Result<[u8; 32]> {
        self.run(|s, session| {
            let h = s.handle(session, label, ObjectClass::SECRET_KEY)?;
            let mac = session.sign(&Mechanism::Sha256Hmac, h, message)?;
            <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| HsmError::BadAttribute("HMAC-SHA256 is not 32 bytes"))
        })
    }

    fn wrap_mechanism(&self) -> WrapMechanism {
        self.wrap
    }

    fn seal(&self) {
        // The PIN first: from here no new session can be opened.
        *self.pin.write().unwrap_or_else(|p| p.into_inner()) = None;
        {
            let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let n = st.sessions.len();
            // Closing the application's last session ends its login (PKCS#11 v2.40 §5.6).
            st.sessions.clear();
            st.open -= n;
        }
        // With the session that owns them, every session copy of a key.
        self.forget_handles();
        tracing::warn!(token = %self.label, "key store sealed: sessions closed, handles and PIN dropped");
    }

    fn reinitialize(&self) -> Result<bool> {
        {
            let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            let n = st.sessions.len();
            st.sessions.clear();
            st.open -= n;
        }
        self.forget_handles();
        match self.ctx.clone().finalize() {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        match self.ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        match find_token(&self.ctx, &self.label)? {
            Some(slot) => {
                *self.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
                self.missing.store(false, std::sync::atomic::Ordering::Release);
                tracing::warn!(token = %self.label, slot = slot.id(), "PKCS#11 module re-initialised: token found");
                Ok(true)
            }
            None => {
                self.missing.store(true, std::sync::atomic::Ordering::Release);
                tracing::warn!(token = %self.label, "PKCS#11 module re-initialised: the token is still missing");
                Ok(false)
            }
        }
    }

    fn unseal(&self, pin: SecretString) -> Result<()> {
        // One unseal at a time; and none while a session from before the seal is still
        // open (it keeps the application logged in, so a login would not check the PIN).
        let _one_at_a_time = self.unsealing.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + self.pool.wait;
        {
            let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if !self.is_sealed() {
                    return Ok(());
                }
                if st.open == 0 {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(HsmError::PoolTimeout);
                }
                st = self.pool.freed.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        // Log in with the PIN given before keeping it: a wrong PIN leaves the store sealed.
        let session = self.login_session(&pin, true)?;
        {
            let mut kept = self.pin.write().unwrap_or_else(|p| p.into_inner());
            if kept.is_none() {
                *kept = Some(pin);
                tracing::warn!(token = %self.label, "key store unsealed");
            }
        }
        // Keep the session: while one is open, the application stays logged in.
        let mut st = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        if st.open < self.pool.max {
            st.open += 1;
            st.sessions.push(session);
            self.pool.freed.notify_one();
        }
        Ok(())
    }

    fn is_sealed(&self) -> bool {
        self.pin.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_forms() {
        let key = [7u8; 32];
        let mut der = vec![0x04, 0x20];
        der.extend_from_slice(&key);
        assert_eq!(parse_ec_point(&der).unwrap(), key);
        assert_eq!(parse_ec_point(&key).unwrap(), key);
        assert!(parse_ec_point(&der[..20]).is_err());
    }

    #[test]
    fn config_debug_redacts_pin() {
        let c = Pkcs11Config::new("/x.so", "t", SecretString::from("hunter2".to_owned()));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
