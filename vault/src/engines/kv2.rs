//! The KV version 2 engine (Vault's `kv-v2`), mounted at `kv/` by `keyvault dev` and
//! wherever `[[mounts]]` puts it: versions with soft delete, undelete and destroy,
//! check-and-set, per-secret settings and custom metadata, merge-patch, subkeys. Its
//! secrets are sealed like the version 1 store's (one data key per version), in a
//! namespace of their own (see [`crate::secrets`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use keyvault_api::kv2::{
    Config, ConfigSettings, DataRead, DataWrite, Metadata, ReadQuery, Settings, Subkeys, VersionMetadata, VersionState,
    Versions,
};
use keyvault_api::scrub_json as scrub;
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::Capability;
use crate::secrets::{Found, MetaUpdate, SecretMeta, SecretPath, SecretPrefix, Secrets, VersionMeta, WriteOptions};
use crate::shared::Core;
use crate::store::{Store, decode_json, encode_json};

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "kv-v2",
        description: "versioned key/value secrets, Vault's KV version 2 (soft delete, check-and-set, metadata)",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(Kv2::new(core))),
};

/// The engine's settings, stored once.
const CONFIG_KEY: &str = "kv2/config";
/// Limits of custom metadata (Vault's).
const MAX_CUSTOM_KEYS: usize = 64;

fn secret_path(op: Operation, p: &mut Params) -> Result<()> {
    let raw = p.get("path").unwrap_or_default().to_owned();
    let canonical = if op == Operation::List {
        SecretPrefix::parse(&raw)?.as_str().to_owned()
    } else {
        SecretPath::parse(&raw)?.as_str().to_owned()
    };
    p.set("path", canonical);
    Ok(())
}

const fn on_path(pattern: &'static str, summary: &'static str, ops: &'static [OpSpec]) -> Route {
    Route::new(pattern, summary, ops).normalize(secret_path)
}

const ROUTES: &[Route] = &[
    Route::new(
        "config",
        "the engine's settings: max_versions, cas_required, delete_version_after",
        &[
            OpSpec::read(Access::Needs(Capability::Read)).data::<Config>(),
            OpSpec::write(Access::Needs(Capability::Update)).body::<ConfigSettings>().answers(Answer::Empty),
        ],
    ),
    on_path(
        "data/{*path}",
        "read (`?version=N`), write a version (`options.cas`), delete the latest (soft), merge-patch",
        &[
            OpSpec::read(Access::Needs(Capability::Read))
                .query::<ReadQuery>()
                .data::<DataRead>()
                .data_also_on(&["404"]),
            OpSpec::write(Access::CreateOrUpdate).body::<DataWrite>().data::<VersionMetadata>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
            OpSpec::patch(Access::Needs(Capability::Update)).body::<DataWrite>().data::<VersionMetadata>(),
        ],
    ),
    Route::new("metadata", "list the top level", &[OpSpec::list(Access::Needs(Capability::List))]),
    on_path(
        "metadata/{*path}",
        "read the versions and settings, change the settings, list under, delete every version",
        &[
            OpSpec::read(Access::Needs(Capability::Read)).data::<Metadata>(),
            OpSpec::list(Access::Needs(Capability::List)),
            OpSpec::write(Access::CreateOrUpdate).body::<Settings>().answers(Answer::Empty),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
        ],
    ),
    on_path("delete/{*path}", "soft-delete versions", &[versions_op()]),
    on_path("undelete/{*path}", "bring back versions", &[versions_op()]),
    on_path("destroy/{*path}", "destroy versions for good", &[versions_op()]),
    on_path(
        "subkeys/{*path}",
        "the value's keys, leaves null",
        &[OpSpec::read(Access::Needs(Capability::Read)).query::<ReadQuery>().data::<Subkeys>()],
    ),
];

/// `delete/`, `undelete/`, `destroy/`: `{"versions": [...]}`.
const fn versions_op() -> OpSpec {
    OpSpec::write(Access::Needs(Capability::Update)).body::<Versions>().answers(Answer::Empty)
}

/// The engine's settings as stored.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredConfig {
    #[serde(default)]
    max_versions: Option<usize>,
    #[serde(default)]
    cas_required: bool,
    #[serde(default)]
    delete_version_after: Option<u64>,
}

#[derive(Debug)]
pub struct Kv2 {
    secrets: Secrets,
    store: Arc<dyn Store>,
    /// The mount's `delete_version_after` as reads apply it (see [`Kv2::read_settings`]).
    read_settings: std::sync::Mutex<ReadSettings>,
}

/// How long a read applies the mount's `delete_version_after` as last fetched before it
/// fetches it again: a change made on this replica applies at once, one made on another
/// replica within this long (docs/api.md). A read is one storage query.
const READ_SETTINGS_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The mount's setting reads apply, when it was fetched, and the generation of the
/// settings (bumped by each settings write here: a fetch that began before it does not
/// replace what it wrote).
#[derive(Debug, Default)]
struct ReadSettings {
    delete_version_after: Option<(std::time::Instant, Option<u64>)>,
    generation: u64,
}

/// The body of a write: the value (kept as the raw text it came as) and its options.
#[derive(Deserialize)]
struct WriteBody<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    options: Option<keyvault_api::kv2::WriteOptions>,
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    if let serde_json::Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                if let Some(mut old) = t.remove(k) {
                    scrub(&mut old);
                }
            } else {
                merge_patch(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }
}

/// The keys of a value with every leaf `null`, down to `depth` (0: all the way).
fn subkeys(v: &serde_json::Value, depth: u32, level: u32) -> serde_json::Value {
    match v {
        serde_json::Value::Object(o) if depth == 0 || level < depth => {
            serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), subkeys(v, depth, level + 1))).collect())
        }
        _ => serde_json::Value::Null,
    }
}

/// A duration as Vault shows one (Go's `time.Duration` text: `0s`, `45s`, `30m0s`,
/// `1h0m0s`, `720h0m0s`), which `parse_duration` reads back.
fn duration_text(secs: Option<u64>) -> String {
    let s = secs.unwrap_or(0);
    let (h, m, s) = (s / 3600, s % 3600 / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn parse_duration(text: &str) -> Result<u64> {
    Ok(crate::auth::parse_duration(text)?.as_secs())
}

fn check_custom(m: &BTreeMap<String, String>) -> Result<()> {
    if m.len() > MAX_CUSTOM_KEYS || m.iter().any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 512) {
        return Err(Error::invalid("custom_metadata: at most 64 keys of 1-128 bytes, values of at most 512 bytes"));
    }
    Ok(())
}

/// The most versions a secret may keep: every write rewrites its metadata, which lists
/// them all, and `GET kv/metadata` answers them all.
pub const MAX_VERSIONS_LIMIT: usize = 1000;

fn check_max_versions(m: Option<usize>) -> Result<()> {
    match m {
        Some(m) if m > MAX_VERSIONS_LIMIT => {
            Err(Error::invalid(format!("max_versions must be at most {MAX_VERSIONS_LIMIT}")))
        }
        _ => Ok(()),
    }
}

fn version_metadata(meta: &SecretMeta, version: u64, v: &VersionMeta) -> VersionMetadata {
    VersionMetadata {
        created_time: v.created_time.clone(),
        custom_metadata: (!meta.custom_metadata.is_empty()).then(|| meta.custom_metadata.clone()),
        deletion_time: v.deletion_time.clone().unwrap_or_default(),
        destroyed: v.destroyed,
        version,
    }
}

impl Kv2 {
    fn new(core: &Arc<Core>) -> Self {
        let max = core.settings.secrets.max_versions;
        Kv2 {
            secrets: Secrets::kv2(core.store.clone(), core.barrier.clone(), max),
            store: core.store.clone(),
            read_settings: Default::default(),
        }
    }

    /// The mount's `delete_version_after` for a read: as fetched within the last
    /// [`READ_SETTINGS_RECHECK`], else fetched now.
    async fn read_delete_after(&self) -> Result<Option<u64>> {
        let generation = {
            let r = self.read_settings.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, d)) = r.delete_version_after
                && at.elapsed() < READ_SETTINGS_RECHECK
            {
                return Ok(d);
            }
            r.generation
        };
        let fetched_at = std::time::Instant::now();
        let d = self.config().await?.delete_version_after;
        let mut r = self.read_settings.lock().unwrap_or_else(|p| p.into_inner());
        if r.generation == generation {
            r.delete_version_after = Some((fetched_at, d));
        }
        Ok(d)
    }

    /// After a settings write: reads fetch the settings again.
    fn settings_changed(&self) {
        let mut r = self.read_settings.lock().unwrap_or_else(|p| p.into_inner());
        r.generation += 1;
        r.delete_version_after = None;
    }

    async fn config(&self) -> Result<StoredConfig> {
        Ok(self.config_raw().await?.1)
    }

    /// The stored settings and their bytes (the compare-and-swap of a settings write).
    async fn config_raw(&self) -> Result<(Option<Vec<u8>>, StoredConfig)> {
        let raw = self.store.get(CONFIG_KEY).await?;
        let c = match &raw {
            Some(r) => decode_json(CONFIG_KEY, r)?,
            None => StoredConfig::default(),
        };
        Ok((raw, c))
    }

    fn path(req: &Request) -> Result<SecretPath> {
        Ok(SecretPath::parse(req.param("path"))?)
    }

    async fn write(&self, req: &mut Request) -> Result<Reply> {
        let path = Self::path(req)?;
        crate::json::check_no_duplicate_keys(&req.body).map_err(|e| crate::json::json_error(&e))?;
        let mut unknown = Vec::new();
        let body = req.body.clone();
        let mut de = serde_json::Deserializer::from_slice(&body);
        let parsed: WriteBody<'_> = serde_ignored::deserialize(&mut de, |p| unknown.push(p.to_string()))
            .map_err(|e| crate::json::json_error(&e))?;
        if !unknown.is_empty() {
            req.warnings.push(format!("Endpoint ignored these unrecognized parameters: [{}]", unknown.join(" ")));
        }
        let data = parsed.data.ok_or_else(|| Error::invalid("no data provided"))?;
        let cas = parsed.options.and_then(|o| o.cas);
        self.write_value(&path, data.get().as_bytes(), cas, req.must_exist, false).await
    }

    async fn write_value(
        &self,
        path: &SecretPath,
        value: &[u8],
        cas: Option<u64>,
        must_exist: Option<bool>,
        implicit_cas: bool,
    ) -> Result<Reply> {
        let config = self.config().await?;
        let meta = self.secrets.metadata(path).await?.unwrap_or_default();
        // The secret's own settings are read again when the write is recorded.
        let opts = WriteOptions {
            cas,
            max_versions: config.max_versions,
            cas_required: config.cas_required,
            must_exist,
            implicit_cas,
        };
        let (version, vmeta) = self.secrets.write_with(path, value, opts).await?;
        Reply::data(&version_metadata(&meta, version, &vmeta))
    }

    /// The version asked for (default: the current one), with its metadata; 404 with the
    /// metadata for a deleted or destroyed version (Vault's reply).
    async fn read(&self, req: &mut Request) -> Result<Reply> {
        let path = Self::path(req)?;
        let q: ReadQuery = req.query()?;
        if q.version == Some(0) {
            return Err(Error::invalid("versions start at 1"));
        }
        // One store query for the metadata and the current version's record (PostgreSQL).
        let mount_delete_after = self.read_delete_after().await?;
        let (meta, version, secret) = match self.secrets.lookup(&path, q.version, mount_delete_after).await? {
            Found::NoSecret => return Err(Error::NotFound(format!("no secret at {}", path.as_str()))),
            Found::NoVersion(_, version) => {
                return Err(Error::NotFound(format!("no version {version} of {}", path.as_str())));
            }
            Found::Deleted(meta, version) => (meta, version, None),
            Found::Value(meta, v) => (meta, v.version, Some(v)),
        };
        let Some(v) = meta.versions.get(&version) else {
            return Err(Error::Internal("a version found is not in its metadata".into()));
        };
        let vm = version_metadata(&meta, version, v);
        let Some(secret) = secret else {
            #[derive(serde::Serialize)]
            struct Deleted {
                data: Option<()>,
                metadata: VersionMetadata,
            }
            return Ok(Reply::data(&Deleted { data: None, metadata: vm })?.status(404));
        };
        let vm = serde_json::to_vec(&vm).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
        let mut buf = Zeroizing::new(Vec::with_capacity(secret.data.len() + vm.len() + 24));
        buf.extend_from_slice(b"{\"data\":");
        buf.extend_from_slice(&secret.data);
        buf.extend_from_slice(b",\"metadata\":");
        buf.extend_from_slice(&vm);
        buf.push(b'}');
        Ok(Reply::raw_data(buf))
    }

    /// RFC 7396 merge patch of the current version into a new version (check-and-set
    /// on the version patched: a concurrent write makes it 409).
    async fn patch(&self, req: &mut Request) -> Result<Reply> {
        let path = Self::path(req)?;
        #[derive(Deserialize)]
        struct PatchBody {
            data: serde_json::Value,
            #[serde(default)]
            options: Option<keyvault_api::kv2::WriteOptions>,
        }
        let mut body: PatchBody = req.data()?;
        let mount_delete_after = self.read_delete_after().await?;
        let current = self.secrets.read_with(&path, None, mount_delete_after).await?;
        let mut value: serde_json::Value =
            serde_json::from_slice(&current.data).map_err(|e| Error::Internal(format!("stored value: {e}")))?;
        merge_patch(&mut value, &body.data);
        scrub(&mut body.data);
        let text =
            Zeroizing::new(serde_json::to_vec(&value).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?);
        scrub(&mut value);
        // Check-and-set as for a write (Vault's `validateCheckAndSetOption`): required by
        // the mount or the secret, the caller must name the version it patches, and a
        // version named must be the one patched. Without a requirement, the version read
        // is the check-and-set (a concurrent write makes the patch 409).
        // (The requirement is checked by the write, at its start and when it is recorded,
        // with the version read marked as not the caller's.)
        let given = body.options.and_then(|o| o.cas);
        if given.is_some_and(|cas| cas != current.version) {
            return Err(Error::Conflict("check-and-set parameter did not match the current version".into()));
        }
        self.write_value(&path, &text, Some(given.unwrap_or(current.version)), None, given.is_none()).await
    }

    async fn metadata(&self, req: &Request) -> Result<Reply> {
        let path = Self::path(req)?;
        let config = self.config().await?;
        let meta = self
            .secrets
            .metadata(&path)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no secret at {}", path.as_str())))?;
        let versions = meta
            .versions
            .iter()
            .map(|(n, v)| {
                let state = VersionState {
                    created_time: v.created_time.clone(),
                    deletion_time: v.deletion_time.clone().unwrap_or_default(),
                    destroyed: v.destroyed,
                };
                (n.to_string(), state)
            })
            .collect();
        Reply::data(&Metadata {
            cas_required: meta.cas_required,
            created_time: meta.created_time.clone().unwrap_or_default(),
            current_version: meta.current_version,
            custom_metadata: (!meta.custom_metadata.is_empty()).then(|| meta.custom_metadata.clone()),
            delete_version_after: duration_text(crate::secrets::delete_after(&meta, config.delete_version_after)),
            max_versions: meta.max_versions.unwrap_or(0),
            oldest_version: meta.versions.keys().next().copied().unwrap_or(0),
            updated_time: meta.updated_time.clone().unwrap_or_default(),
            versions,
        })
    }

    fn settings_update(s: Settings) -> Result<MetaUpdate> {
        if let Some(c) = &s.custom_metadata {
            check_custom(c)?;
        }
        check_max_versions(s.max_versions)?;
        Ok(MetaUpdate {
            max_versions: s.max_versions,
            cas_required: s.cas_required,
            delete_version_after: s.delete_version_after.as_deref().map(parse_duration).transpose()?,
            custom_metadata: s.custom_metadata,
        })
    }
}

#[async_trait]
impl Engine for Kv2 {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        Ok(self.secrets.exists(&Self::path(req)?).await?.then(Vec::new))
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        match (req.route.pattern, req.operation) {
            ("config", Operation::Read) => {
                let c = self.config().await?;
                Reply::data(&Config {
                    cas_required: c.cas_required,
                    delete_version_after: duration_text(c.delete_version_after),
                    max_versions: c.max_versions.unwrap_or(0),
                })
            }
            ("config", _) => {
                let s: ConfigSettings = req.data()?;
                check_max_versions(s.max_versions)?;
                let delete_after = s.delete_version_after.as_deref().map(parse_duration).transpose()?;
                // Each write changes only the settings it names, on the latest stored
                // ones: concurrent writes of different settings all hold.
                loop {
                    let (raw, mut c) = self.config_raw().await?;
                    if let Some(m) = s.max_versions {
                        c.max_versions = (m > 0).then_some(m);
                    }
                    if let Some(r) = s.cas_required {
                        c.cas_required = r;
                    }
                    if let Some(d) = delete_after {
                        c.delete_version_after = (d > 0).then_some(d);
                    }
                    let swapped = self.store.compare_and_swap(CONFIG_KEY, raw.as_deref(), Some(&encode_json(&c))).await;
                    // Whatever the outcome (a write whose reply was lost may have
                    // committed), reads fetch the settings again.
                    self.settings_changed();
                    if swapped? {
                        return Ok(Reply::empty());
                    }
                }
            }
            ("data/{*path}", Operation::Read) => self.read(req).await,
            ("data/{*path}", Operation::Write) => self.write(req).await,
            ("data/{*path}", Operation::Patch) => self.patch(req).await,
            ("data/{*path}", Operation::Delete) => {
                self.secrets.soft_delete(&Self::path(req)?, None).await?;
                Ok(Reply::empty())
            }
            ("metadata", _) => Reply::keys(self.secrets.list(&SecretPrefix::parse("")?).await?),
            ("metadata/{*path}", Operation::List) => {
                Reply::keys(self.secrets.list(&SecretPrefix::parse(req.param("path"))?).await?)
            }
            ("metadata/{*path}", Operation::Read) => self.metadata(req).await,
            ("metadata/{*path}", Operation::Write) => {
                let s: Settings = req.data()?;
                let update = Self::settings_update(s)?;
                self.secrets.update_metadata_if(&Self::path(req)?, update, req.must_exist).await?;
                Ok(Reply::empty())
            }
            ("metadata/{*path}", Operation::Delete) => {
                self.secrets.delete_all(&Self::path(req)?).await?;
                Ok(Reply::empty())
            }
            ("delete/{*path}", _) => {
                let v: Versions = req.data()?;
                if v.versions.is_empty() {
                    return Err(Error::invalid("no versions provided"));
                }
                self.secrets.soft_delete(&Self::path(req)?, Some(&v.versions)).await?;
                Ok(Reply::empty())
            }
            ("undelete/{*path}", _) => {
                let v: Versions = req.data()?;
                if v.versions.is_empty() {
                    return Err(Error::invalid("no versions provided"));
                }
                self.secrets.undelete(&Self::path(req)?, &v.versions).await?;
                Ok(Reply::empty())
            }
            ("destroy/{*path}", _) => {
                let v: Versions = req.data()?;
                if v.versions.is_empty() {
                    return Err(Error::invalid("no versions provided"));
                }
                self.secrets.destroy(&Self::path(req)?, &v.versions).await?;
                Ok(Reply::empty())
            }
            ("subkeys/{*path}", _) => {
                let path = Self::path(req)?;
                let q: ReadQuery = req.query()?;
                let mount_delete_after = self.read_delete_after().await?;
                let secret = self.secrets.read_with(&path, q.version, mount_delete_after).await?;
                let meta = self.secrets.metadata(&path).await?.unwrap_or_default();
                let mut value: serde_json::Value =
                    serde_json::from_slice(&secret.data).map_err(|e| Error::Internal(format!("stored value: {e}")))?;
                let keys = subkeys(&value, q.depth.unwrap_or(0), 0);
                scrub(&mut value);
                Reply::data(&Subkeys { subkeys: keys, metadata: version_metadata(&meta, secret.version, &secret.meta) })
            }
            _ => Err(Error::UnsupportedOperation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_vault_shows_them_and_parse_back() {
        for (secs, text) in
            [(0, "0s"), (45, "45s"), (1800, "30m0s"), (3600, "1h0m0s"), (5430, "1h30m30s"), (2_592_000, "720h0m0s")]
        {
            assert_eq!(duration_text(Some(secs)), text);
            assert_eq!(parse_duration(text).unwrap(), secs, "{text}");
        }
        assert_eq!(duration_text(None), "0s");
    }
}
