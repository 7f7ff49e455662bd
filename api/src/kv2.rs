//! The KV version 2 engine (Vault's shapes): `data/`, `metadata/`, `delete/`,
//! `undelete/`, `destroy/`, `subkeys/`, `config`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `options` of a write: check-and-set (`0`: only if the secret does not exist).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WriteOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cas: Option<u64>,
}

/// One version's metadata (also the reply to a write).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionMetadata {
    pub created_time: String,
    pub custom_metadata: Option<BTreeMap<String, String>>,
    /// `""` when not deleted.
    pub deletion_time: String,
    pub destroyed: bool,
    pub version: u64,
}

/// `GET <mount>/metadata/<path>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = kv2::Metadata))]
pub struct Metadata {
    pub cas_required: bool,
    pub created_time: String,
    pub current_version: u64,
    pub custom_metadata: Option<BTreeMap<String, String>>,
    /// A duration (`"0s"`: never).
    pub delete_version_after: String,
    pub max_versions: usize,
    pub oldest_version: u64,
    pub updated_time: String,
    pub versions: BTreeMap<String, VersionState>,
}

/// A version in [`Metadata`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionState {
    pub created_time: String,
    pub deletion_time: String,
    pub destroyed: bool,
}

/// `POST <mount>/metadata/<path>`: a secret's settings; absent ones unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_versions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cas_required: Option<bool>,
    /// A duration: `"30d"`, `"1h"`, seconds; `"0s"`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_version_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_metadata: Option<BTreeMap<String, String>>,
}

/// `POST <mount>/config`: the engine's settings; absent ones unchanged. Custom metadata
/// belongs to a secret (`metadata/<path>`), not to the engine: sent here, it is an
/// unknown field and comes back as a warning, as Vault does.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_versions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cas_required: Option<bool>,
    /// A duration: `"30d"`, `"1h"`, seconds; `"0s"`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_version_after: Option<String>,
}

/// `GET <mount>/config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Config {
    pub cas_required: bool,
    pub delete_version_after: String,
    pub max_versions: usize,
}

/// `POST <mount>/delete/<path>`, `undelete/`, `destroy/`: which versions (numbers, or
/// numbers as strings, as Vault's CLI sends them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Versions {
    #[serde(default, deserialize_with = "numbers")]
    pub versions: Vec<u64>,
}

fn numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Number(u64),
        Text(String),
    }
    Vec::<N>::deserialize(d)?
        .into_iter()
        .map(|n| match n {
            N::Number(v) => Ok(v),
            N::Text(t) => t.trim().parse().map_err(|_| serde::de::Error::custom("a version is a number")),
        })
        .collect()
}

/// `GET <mount>/subkeys/<path>`: the value's keys, every leaf `null`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Subkeys {
    pub subkeys: serde_json::Value,
    pub metadata: VersionMetadata,
}

/// The query of `GET <mount>/data/<path>` and `subkeys/`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = kv2::ReadQuery))]
pub struct ReadQuery {
    #[serde(default)]
    pub version: Option<u64>,
    /// `subkeys/` only: how deep (0: all).
    #[serde(default)]
    pub depth: Option<u32>,
}

/// The body of a write or merge patch of `<mount>/data/<path>` (the server reads the value
/// as raw text, so that it is stored exactly as sent; this type gives its shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DataWrite {
    /// The secret's fields (a merge patch for `PATCH`).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<WriteOptions>,
}

/// The `data` of a read of `<mount>/data/<path>`: the value as written, and its version's
/// metadata. A deleted or destroyed version answers 404 with `data` null and the metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DataRead {
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>, required = true))]
    pub data: serde_json::Value,
    pub metadata: VersionMetadata,
}
