//! `/v1/sys/...`: health, policies, the kill switch, master and token-signing key
//! rotation, mounts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Sensitive;

/// `GET /v1/sys/health` (no token): 200 when storage and the HSM answer, the clock agrees
/// with the storage's and the audit log is not failed; 503 otherwise. Status words only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub initialized: bool,
    pub sealed: bool,
    pub standby: bool,
    pub version: String,
    /// `ok` or `unavailable`.
    pub storage: String,
    /// `ok`, `unavailable` or `key_missing`.
    pub hsm: String,
    /// `ok` or `offset_too_large`.
    pub clock: String,
    /// Storage clock minus this replica's clock (shared storage only).
    pub clock_offset_ms: Option<i64>,
    pub missing_key_errors: u64,
    /// `ok`, `degraded` or `failed`.
    pub audit: String,
    pub audit_failed_writes: u64,
    pub audit_refused_entries: u64,
    pub audit_waiting_entries: u64,
    pub master_key_version: u32,
    pub server_time_utc: u64,
    pub replication_performance_mode: String,
    pub replication_dr_mode: String,
    pub cluster_name: String,
    pub cluster_id: String,
}

/// `PUT /v1/sys/policies/acl/<name>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyWrite {
    /// HCL or JSON policy text.
    #[serde(default)]
    pub policy: Option<String>,
}

/// `GET /v1/sys/policies/acl/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyRead {
    pub name: String,
    pub policy: String,
}

/// `LIST /v1/sys/policies/acl` (Vault gives both names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyList {
    pub keys: Vec<String>,
    pub policies: Vec<String>,
}

/// `POST /v1/sys/revoke-identity` and `/restore-identity`: exactly one of `role`, `user`,
/// `certificate_sha256`, `spiffe_id` (and, for revoke only, `accessor`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accessor: Option<String>,
}

/// The reply of the kill switch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Revoked {
    pub identity: String,
    /// The identity's new generation (none for an accessor).
    pub generation: Option<u64>,
    pub revoked_at: u64,
}

/// `POST /v1/sys/audit-hash`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditHashRequest {
    #[serde(default)]
    pub input: Option<Sensitive>,
}

/// The HMAC a value has in this installation's audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditHash {
    pub hash: String,
}

/// A new key version is active (`sys/rotate`, `sys/rotate/token-signing`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rotated {
    pub version: u32,
}

/// Versions destroyed (`sys/rotate/retire`, `sys/rotate/token-signing/retire`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Retired {
    pub retired: Vec<u32>,
}

/// `GET /v1/sys/rotate/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotationStatus {
    pub active_version: u32,
    /// `idle`, `starting` or `rewrapping`.
    pub state: String,
    pub records_done: u64,
    /// Records still wrapped by an older version, not counting those set aside.
    pub records_remaining: u64,
    pub rate_per_second: f64,
    /// Versions that wrap at least one record, and the active one.
    pub versions_in_use: Vec<u32>,
    /// Records per version (exact: counted with every write, re-wrap and deletion). In
    /// JSON the versions are object keys, so strings of digits.
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, i64>))]
    pub records_by_version: BTreeMap<u32, i64>,
    /// Records set aside as damaged.
    pub set_aside: u64,
    pub driven_by: Option<String>,
}

/// One record a rotation set aside as damaged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SetAsideRecord {
    pub key: String,
    pub reason: String,
    pub counted_under: Option<u32>,
    pub set_aside_at: u64,
}

/// `GET /v1/sys/rotate/set-aside`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SetAside {
    pub records: Vec<SetAsideRecord>,
}

/// One mount as `GET /v1/sys/mounts` and `GET /v1/sys/auth` list it (Vault's shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MountInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub description: String,
    pub accessor: String,
    pub local: bool,
    pub seal_wrap: bool,
    pub external_entropy_access: bool,
    pub config: MountConfig,
    pub options: Option<BTreeMap<String, String>>,
}

/// A mount's tuning (Vault's fields; KeyVault has no leases, so they are zero).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MountConfig {
    pub default_lease_ttl: u64,
    pub max_lease_ttl: u64,
    pub force_no_cache: bool,
}

/// Mount path (with its trailing `/`) to mount.
pub type Mounts = BTreeMap<String, MountInfo>;

/// `GET /v1/sys/seal-status` (no token), Vault's shape. KeyVault has no unseal keys: it is
/// sealed only by `sys/seal` and opened again with the token's PIN.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SealStatus {
    #[serde(rename = "type")]
    pub seal_type: String,
    pub initialized: bool,
    pub sealed: bool,
    pub t: u32,
    pub n: u32,
    pub progress: u32,
    pub nonce: String,
    pub version: String,
    pub build_date: String,
    pub migration: bool,
    pub cluster_name: String,
    pub cluster_id: String,
    pub recovery_seal: bool,
    pub storage_type: String,
}

/// `POST /v1/sys/capabilities-self`: one `path` or several `paths`; `sys/capabilities`
/// also takes the `token` to look at.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CapabilitiesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<crate::Sensitive>,
}

/// The reply of the capabilities endpoints: the capabilities by path, and for a single
/// path also as `capabilities` (Vault's shape). `root` for a root token, `deny` for none.
pub type Capabilities = BTreeMap<String, Vec<String>>;

/// `GET /v1/sys/internal/ui/mounts`: the mounts a token may see.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UiMounts {
    pub secret: Mounts,
    pub auth: Mounts,
}

/// `GET /v1/sys/internal/ui/mounts/<path>`: the mount that serves `<path>` (how the CLI
/// learns a KV mount's version).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UiMount {
    pub path: String,
    #[serde(flatten)]
    pub info: MountInfo,
}

/// `GET /v1/sys/leader` (no token), Vault's shape. KeyVault's replicas are all active (no
/// leader election: they share PostgreSQL), so `ha_enabled` is false.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Leader {
    pub ha_enabled: bool,
    pub is_self: bool,
    pub active_time: String,
    pub leader_address: String,
    pub leader_cluster_address: String,
    pub performance_standby: bool,
    pub performance_standby_last_remote_wal: u64,
}

/// A wrapped reply's `wrap_info` (Vault's shape): the single-use wrapping token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WrapInfo {
    pub token: crate::Sensitive,
    pub accessor: String,
    pub ttl: u64,
    pub creation_time: String,
    pub creation_path: String,
    #[serde(default)]
    pub wrapped_accessor: String,
}

/// `POST /v1/sys/wrapping/lookup`, `unwrap`, `rewrap`: the wrapping token (or in
/// `X-Vault-Token`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WrappingToken {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<crate::Sensitive>,
}

/// `PUT /v1/sys/unseal` (no token), Vault's body. `key` is the PKCS#11 token's user PIN
/// (KeyVault has no unseal key shares); `reset` and `migrate` are accepted and mean
/// nothing here. The reply is [`SealStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnsealRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::Sensitive>,
    #[serde(default)]
    pub reset: bool,
    #[serde(default)]
    pub migrate: bool,
}

/// `POST /v1/sys/wrapping/lookup`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WrappingLookup {
    pub creation_path: String,
    pub creation_time: String,
    pub creation_ttl: u64,
}
