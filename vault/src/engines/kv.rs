//! The key/value secret store, mounted at `secret/` by default: versioned values, each
//! sealed under its own data key (see [`crate::secrets`]).

use std::sync::Arc;

use async_trait::async_trait;
use keyvault_api::secret::{Metadata, ReadQuery, Written};

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::Capability;
use crate::secrets::{SecretPath, SecretPrefix, Secrets};
use crate::shared::Core;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "kv",
        description: "versioned key/value secrets, each value sealed under its own data key",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(Kv::new(core))),
};

/// A path for reads, writes and deletes; a prefix (`a/b/`) for listings. (The proxied
/// mounts, which have these routes too, use it as well.)
pub(crate) fn normalize(op: Operation, p: &mut Params) -> Result<()> {
    let raw = p.get("path").unwrap_or_default().to_owned();
    let canonical = if op == Operation::List {
        SecretPrefix::parse(&raw)?.as_str().to_owned()
    } else {
        SecretPath::parse(&raw)?.as_str().to_owned()
    };
    p.set("path", canonical);
    Ok(())
}

const ROUTES: &[Route] = &[
    Route::new("", "list the top level", &[OpSpec::list(Access::Needs(Capability::List))]),
    Route::new(
        "{*path}",
        "read (`?version=N`), write a new version, delete the latest version, list under",
        &[
            OpSpec::read(Access::Needs(Capability::Read)).query::<ReadQuery>().answers(Answer::AnyData),
            OpSpec::list(Access::Needs(Capability::List)),
            OpSpec::write(Access::CreateOrUpdate).any_body().data::<Written>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
        ],
    )
    .normalize(normalize),
];

#[derive(Debug)]
pub struct Kv {
    secrets: Secrets,
    core: Arc<Core>,
}

/// The first path segments of KV version 2 requests.
const V2_ROUTES: [&str; 6] = ["data", "metadata", "delete", "undelete", "destroy", "subkeys"];

impl Kv {
    fn new(core: &Arc<Core>) -> Self {
        let max_versions = core.settings.secrets.max_versions;
        Kv { secrets: Secrets::new(core.store.clone(), core.barrier.clone(), max_versions), core: core.clone() }
    }

    /// A KV version 2 write sent to this version 1 mount (`secret/data/x` with
    /// `{"data": {...}}`) is refused, naming the version 2 mounts, rather than stored as a
    /// secret at a path nobody meant.
    fn refuse_version_2(&self, path: &SecretPath, body: &[u8]) -> Result<()> {
        let first = path.as_str().split('/').next().unwrap_or_default();
        if !V2_ROUTES.contains(&first) {
            return Ok(());
        }
        let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            serde_json::from_slice(body).unwrap_or_default();
        if !keys.contains_key("data") || keys.keys().any(|k| k != "data" && k != "options") {
            return Ok(());
        }
        let v2: Vec<String> = self
            .core
            .mount_listing(false)
            .into_iter()
            .filter(|(_, m)| m.options.as_ref().and_then(|o| o.get("version")).is_some_and(|v| v == "2"))
            .map(|(path, _)| path)
            .collect();
        let where_ = if v2.is_empty() { "none is mounted".to_owned() } else { v2.join(", ") };
        Err(Error::invalid(format!(
            "this is a KV version 1 mount and the request is shaped for KV version 2 (a value under \"data\"); \
             KV version 2 mounts: {where_}"
        )))
    }
}

#[async_trait]
impl Engine for Kv {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        let path = SecretPath::parse(req.param("path"))?;
        Ok(self.secrets.exists(&path).await?.then(Vec::new))
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        if req.operation == Operation::List {
            let prefix = SecretPrefix::parse(req.param("path"))?;
            return Reply::keys(self.secrets.list(&prefix).await?);
        }
        let path = SecretPath::parse(req.param("path"))?;
        match req.operation {
            Operation::Read => {
                let q: ReadQuery = req.query()?;
                if q.version == Some(0) {
                    return Err(Error::invalid("versions start at 1"));
                }
                let v = self.secrets.read(&path, q.version).await?;
                let metadata = Metadata {
                    version: v.version,
                    created_time: v.meta.created_time.clone(),
                    deletion_time: String::new(),
                    destroyed: false,
                    version_id: None,
                };
                // `data` is the value exactly as written, never parsed or copied.
                Reply::raw_data(v.data).extra("metadata", &metadata)
            }
            Operation::Write => {
                self.refuse_version_2(&path, &req.body)?;
                let opts = crate::secrets::WriteOptions { must_exist: req.must_exist, ..Default::default() };
                let (version, meta) = self.secrets.write_with(&path, &req.body, opts).await?;
                Reply::data(&Written { version, created_time: meta.created_time })
            }
            Operation::Delete => match self.secrets.delete_latest(&path).await {
                // Vault's KV version 1 delete is idempotent: nothing there (or its latest
                // version deleted already) is a 204 too, and `vault kv delete` says "if it
                // existed".
                Ok(()) | Err(Error::NotFound(_)) => Ok(Reply::empty()),
                Err(e) => Err(e),
            },
            Operation::List | Operation::Patch => Err(Error::UnsupportedOperation),
        }
    }
}
