//! The one error type of the key store.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// What went wrong talking to the token. Never carries key material or the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded (missing file, not a PKCS#11 library).
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad { path: String, reason: String },

    /// No slot holds an initialized token with this label.
    #[error("no initialized PKCS#11 token labelled {label:?} (is the token initialized, and is SOFTHSM2_CONF right?)")]
    TokenNotFound { label: String },

    /// The user PIN was refused by the token.
    #[error("the token refused the user PIN")]
    PinIncorrect,

    /// The token locked the user PIN after too many failures.
    #[error("the token's user PIN is locked")]
    PinLocked,

    /// The PIN could not be read from its configured source.
    #[error("cannot read the token PIN: {0}")]
    PinSource(String),

    /// The token, its slot or our session went away; the call may succeed once it returns.
    #[error("the token is unavailable: {function} returned {rv}")]
    Unavailable { function: Function, rv: RvError },

    /// The key store was sealed (`sys/seal`): no session, no key handle, no PIN in memory
    /// until it is unsealed with the PIN.
    #[error("the key store is sealed; unseal it with the token PIN")]
    Sealed,

    /// No key object carries this label.
    #[error("no key labelled {0:?} in the token")]
    KeyNotFound(String),

    /// Several objects of one class carry this label, where labels are unique names.
    /// SoftHSM can show one object twice to a process that indexed the token directory
    /// while it was creating the object (and another process had changed the token): the
    /// view is rebuilt by re-initialising the module. Still there after that, it is a
    /// real second object, a fault for an operator: which one holds the key is unknown.
    #[error("several key objects are labelled {0:?} in the token")]
    DuplicateLabel(String),

    /// A key with this label already exists; labels are unique names.
    #[error("a key labelled {0:?} already exists in the token")]
    KeyExists(String),

    /// A wrapped key or ciphertext failed authentication or has the wrong shape.
    #[error("the wrapped key or ciphertext is invalid or was tampered with")]
    InvalidCiphertext,

    /// The token supports none of the mechanisms this operation can use.
    #[error("the token supports no usable mechanism for {0}")]
    MechanismUnsupported(&'static str),

    /// A key attribute came back in a shape we do not understand.
    #[error("unexpected key attribute: {0}")]
    BadAttribute(&'static str),

    /// Every session of the pool stayed busy for the whole wait.
    #[error("timed out waiting for a free PKCS#11 session")]
    PoolTimeout,

    /// A call did not return within `[hsm] call_timeout`: the token hangs (its thread is
    /// left to finish; the caller is answered now).
    #[error("the token did not answer within {secs} s")]
    CallTimeout { secs: u64 },

    /// A claimed key generation ([`crate::KeyStore::generate_claimed`]) reached the end of
    /// its claim before the token made the key (a slow or hung token): it stops there
    /// rather than make or destroy anything another claimer may now own.
    #[error("the claim on key {0:?} ran out before the token made it")]
    ClaimExpired(String),

    /// Any other failed `C_*` call, with the function and its return value.
    #[error("{function} failed: {rv}")]
    Pkcs11 { function: Function, rv: RvError },

    /// A failure inside the cryptoki wrapper that is not a PKCS#11 return value.
    #[error("PKCS#11 wrapper error: {0}")]
    Wrapper(String),
}

impl HsmError {
    /// True when retrying later (after the token comes back) may succeed; the HTTP layer
    /// answers 503 for these.
    /// What a device failure looks like (`CKR_DEVICE_ERROR`), for fault injection in tests.
    #[doc(hidden)]
    pub fn simulated_device_error() -> Self {
        HsmError::Unavailable { function: Function::GetSessionInfo, rv: RvError::DeviceError }
    }

    /// True when the process's view of the token may be stale: a key missing (another
    /// process sharing the token made it after this one last indexed the token) or shown
    /// twice. Re-initialising the module rebuilds the view; if the error stays, it is real.
    pub fn may_be_stale_view(&self) -> bool {
        matches!(self, HsmError::KeyNotFound(_) | HsmError::DuplicateLabel(_))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. }
                | HsmError::PoolTimeout
                | HsmError::CallTimeout { .. }
                | HsmError::ClaimExpired(_)
                | HsmError::TokenNotFound { .. }
                | HsmError::Sealed
        )
        // Not `KeyNotFound`: the token answers but a key that KeyVault's state names is
        // not in it. That is a fault to fix (an error naming the key), not an outage to
        // wait out; the store retries once after reconnecting before saying so.
    }
}

/// Return values that mean "the session, token or device went away".
pub(crate) fn rv_is_gone(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
    )
}

/// Return values that mean a cached object handle is stale (the object was re-created,
/// or the token was re-inserted): look the key up by label again.
pub(crate) fn rv_is_stale_handle(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid
    )
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(RvError::PinIncorrect, _) => HsmError::PinIncorrect,
            CkError::Pkcs11(RvError::PinLocked, _) => HsmError::PinLocked,
            CkError::Pkcs11(rv, function) if rv_is_gone(rv) => HsmError::Unavailable { function, rv },
            CkError::Pkcs11(rv, function) => HsmError::Pkcs11 { function, rv },
            other => HsmError::Wrapper(other.to_string()),
        }
    }
}

pub type Result<T, E = HsmError> = std::result::Result<T, E>;
