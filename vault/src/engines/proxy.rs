//! Mounts served by another secret store (`type = "hashicorp"`, `"aws"` or `"azure"`): the same routes, reply
//! shapes, authorization and audit as `secret/` (KV version 1 to Vault's tools), with the
//! values read from and written through to the upstream by a
//! [`keyvault_proxy_backends::SecretBackend`], behind a bounded cache and a circuit
//! breaker. KeyVault holds the upstream credentials; callers never see them.

use std::sync::Arc;

use async_trait::async_trait;
use keyvault_api::secret::{Metadata, ProxyReadQuery, Written};
use keyvault_proxy_backends::cache::{CacheConfig, Cached};
use keyvault_proxy_backends::resilience::{Policy, Resilient};
use keyvault_proxy_backends::{BackendError, SecretBackend, SecretData, Version};

use super::EngineKind;
use crate::config::MountConfig;
use crate::error::{Error, Result};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Reply, Request, Route};
use crate::policy::Capability;
use crate::secrets::{SecretPath, SecretPrefix};

pub const HASHICORP: EngineKind = EngineKind {
    info: EngineInfo {
        name: "hashicorp",
        description: "secrets kept in a HashiCorp Vault or OpenBao KV mount, served through KeyVault",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: false,
    takes_options: true,
    build: |_, mount| Ok(Arc::new(Proxy::new(&HASHICORP.info, mount)?)),
};

pub const AZURE: EngineKind = EngineKind {
    info: EngineInfo {
        name: "azure",
        description: "secrets kept in Azure Key Vault, served through KeyVault",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: false,
    takes_options: true,
    build: |_, mount| Ok(Arc::new(Proxy::new(&AZURE.info, mount)?)),
};

pub const AWS: EngineKind = EngineKind {
    info: EngineInfo {
        name: "aws",
        description: "secrets kept in AWS Secrets Manager, served through KeyVault",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: false,
    takes_options: true,
    build: |_, mount| Ok(Arc::new(Proxy::new(&AWS.info, mount)?)),
};

const ROUTES: &[Route] = &[
    Route::new("", "list the top level", &[OpSpec::list(Access::Needs(Capability::List))]),
    Route::new(
        "{*path}",
        "read (`?version=N` where the upstream keeps versions), write through, delete, list under",
        &[
            OpSpec::read(Access::Needs(Capability::Read))
                .query::<keyvault_api::secret::ProxyReadQuery>()
                .answers(crate::logical::openapi::Answer::AnyData),
            OpSpec::list(Access::Needs(Capability::List)),
            OpSpec::write(Access::CreateOrUpdate).any_body().data::<keyvault_api::secret::Written>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(crate::logical::openapi::Answer::Empty),
        ],
    )
    .normalize(super::kv::normalize),
];

/// One proxied mount: its adapter behind the resilience and cache layers.
#[derive(Debug)]
pub struct Proxy {
    info: &'static EngineInfo,
    backend: Cached<Resilient<Arc<dyn SecretBackend>>>,
}

/// Split a mount's options into the adapter's table, `cache` and `resilience`.
fn options(mount: &MountConfig) -> Result<(toml::Value, CacheConfig, Policy)> {
    let mut table = mount.options.clone();
    let bad = |what: &str, e: String| Error::Config(format!("mount {:?}: {what}: {e}", mount.path));
    let cache = match table.remove("cache") {
        Some(v) => v.try_into().map_err(|e: toml::de::Error| bad("cache", crate::config::value_error(&e)))?,
        None => CacheConfig::default(),
    };
    let policy = match table.remove("resilience") {
        Some(v) => v.try_into().map_err(|e: toml::de::Error| bad("resilience", crate::config::value_error(&e)))?,
        None => Policy::default(),
    };
    Ok((toml::Value::Table(table), cache, policy))
}

/// The bare adapter of a proxied mount's configuration, without cache or resilience
/// layers (those are `Proxy`'s; `keyvault bench --upstream` measures the upstream through
/// the bare adapter).
pub fn adapter(mount: &MountConfig) -> Result<Arc<dyn SecretBackend>> {
    use keyvault_proxy_backends::{aws, azure, hashicorp};
    let (table, _, _) = options(mount)?;
    let bad = |e: String| Error::Config(format!("mount {:?}: {e}", mount.path));
    let parse = |e: toml::de::Error| bad(format!("options: {}", crate::config::value_error(&e)));
    Ok(match mount.kind.as_str() {
        "hashicorp" => Arc::new(
            hashicorp::HashicorpBackend::new(table.try_into().map_err(parse)?).map_err(|e| bad(e.to_string()))?,
        ),
        "aws" => Arc::new(aws::Aws::new(table.try_into().map_err(parse)?).map_err(|e| bad(e.to_string()))?),
        "azure" => Arc::new(azure::Azure::new(table.try_into().map_err(parse)?).map_err(|e| bad(e.to_string()))?),
        other => return Err(bad(format!("{other:?} is not a proxied mount"))),
    })
}

impl Proxy {
    fn new(info: &'static EngineInfo, mount: &MountConfig) -> Result<Self> {
        let (_, cache, policy) = options(mount)?;
        Ok(Proxy { info, backend: Cached::new(Resilient::new(adapter(mount)?, policy), cache) })
    }
}

/// An upstream's refusal or failure as ours: 404, 403, 400, 409, or 503 with a summary
/// (never its credentials).
fn map_error(e: BackendError, path: &str) -> Error {
    match e {
        BackendError::NotFound => Error::NotFound(format!("no secret at {path}")),
        BackendError::Denied(m) => {
            tracing::warn!(error = %m, "the upstream refused KeyVault's credentials or policy");
            Error::Unavailable("the upstream refused KeyVault's request (see the server log)".into())
        }
        BackendError::Invalid(m) => Error::invalid(m),
        BackendError::Conflict(m) => Error::Conflict(m),
        BackendError::Unavailable(m) => Error::Unavailable(format!("upstream unavailable: {m}")),
        BackendError::Unsupported(what) => Error::invalid(format!("this mount's upstream does not support {what}")),
    }
}

#[async_trait]
impl Engine for Proxy {
    fn info(&self) -> &'static EngineInfo {
        self.info
    }

    fn mount_options(&self) -> Vec<(&'static str, String)> {
        let mut o = vec![("upstream", self.backend.kind().to_owned())];
        if self.backend.capabilities().versions {
            o.push(("versions", "numbered".to_owned()));
        }
        o
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        let path = SecretPath::parse(req.param("path"))?;
        match self.backend.inner().current_version(path.as_str()).await {
            Ok(v) => Ok(v.map(|v| v.to_string().into_bytes())),
            Err(e) => Err(map_error(e, path.as_str())),
        }
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        if req.operation == Operation::List {
            let prefix = SecretPrefix::parse(req.param("path"))?;
            let mut keys = self.backend.list(prefix.as_str()).await.map_err(|e| map_error(e, prefix.as_str()))?;
            // An upstream's names are not all names here (see `check_listing_entry`):
            // such entries are left out, as names this API cannot address.
            let before = keys.len();
            keys.retain(|k| keyvault_api::secret::check_listing_entry(k).is_ok());
            if keys.len() < before {
                tracing::warn!(
                    mount = %req.mount,
                    left_out = before - keys.len(),
                    "an upstream listing named entries that are not names (., .., empty, control characters); left out"
                );
            }
            return Reply::keys(keys);
        }
        let path = SecretPath::parse(req.param("path"))?;
        let p = path.as_str();
        match req.operation {
            Operation::Read => {
                let q: ProxyReadQuery = req.query()?;
                let version = match (q.version, q.version_id, q.version_stage) {
                    (None, None, None) => Version::Latest,
                    (Some(0), None, None) => return Err(Error::invalid("versions start at 1")),
                    (Some(n), None, None) => Version::Number(n),
                    (None, Some(id), None) if !id.is_empty() => Version::Id(id),
                    (None, None, Some(stage)) if !stage.is_empty() => Version::Stage(stage),
                    _ => return Err(Error::invalid("give at most one of version, version_id, version_stage")),
                };
                let backend: &dyn SecretBackend = if req.no_cache { self.backend.inner() } else { &self.backend };
                let v = backend.read(p, &version).await.map_err(|e| map_error(e, p))?;
                let metadata = Metadata {
                    version: v.version.unwrap_or(0),
                    created_time: v.created_time.clone().unwrap_or_default(),
                    deletion_time: String::new(),
                    destroyed: false,
                    version_id: v.version_id.clone(),
                };
                Reply::raw_data(v.data.into_json()).extra("metadata", &metadata)
            }
            Operation::Write => {
                let data =
                    SecretData::from_json(zeroize::Zeroizing::new(req.body.to_vec())).map_err(|e| map_error(e, p))?;
                // An update is a check-and-set against the version the existence check saw,
                // where the upstream keeps versions, so a concurrent writer makes a 409. (A
                // create is not "only if absent": a KV version 2 secret deleted upstream
                // still has versions, and no live value to compare with.)
                let expected = req
                    .existing
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|v| *v > 0);
                // A caller that holds only `create` or only `update` (`must_exist`): the write
                // must keep to the existence its permission was checked on when it lands
                // upstream. An update can, as a check-and-set against the version seen, where
                // the upstream keeps versions; an upstream offers no "create only if absent"
                // this mount could use. Anything else is refused, before it is sent: a
                // create-only caller must not overwrite a secret made meanwhile, nor an
                // update-only one make one whose metadata was deleted meanwhile. (A KV
                // version 2 secret whose latest version was only soft-deleted keeps its
                // version number and exists for the check-and-set, as it does for Vault's
                // own existence check: writing it is an update.)
                match (req.must_exist, expected) {
                    (None, _) | (Some(true), Some(_)) => {}
                    (Some(exists), _) => {
                        tracing::info!(
                            path = p,
                            holds = if exists { "update" } else { "create" },
                            "proxied write refused: the caller holds only one of create and update, \
                             and the upstream cannot keep the write to it"
                        );
                        return Err(Error::PermissionDenied);
                    }
                }
                let version = self.backend.write(p, &data, expected).await.map_err(|e| map_error(e, p))?;
                Reply::data(&Written {
                    version: version.unwrap_or(0),
                    created_time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                })
            }
            Operation::Delete => {
                self.backend.delete(p).await.map_err(|e| map_error(e, p))?;
                Ok(Reply::empty())
            }
            Operation::List | Operation::Patch => Err(Error::UnsupportedOperation),
        }
    }
}
