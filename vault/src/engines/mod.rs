//! The engines, and the registry of every kind of engine and auth method. Adding one is
//! its own file (an [`Engine`](crate::logical::Engine) and an [`EngineKind`]) plus one
//! line in [`KINDS`].

use std::sync::Arc;

use crate::config::MountConfig;
use crate::error::Result;
use crate::logical::{Engine, EngineInfo};
use crate::shared::Core;

pub mod auth;
pub mod database;
pub mod gateway;
pub mod kv;
pub mod kv2;
pub mod login;
pub mod proxy;
pub mod sys;
pub mod token;
pub mod transit;

/// A kind of engine or auth method: what `[[mounts]]` names in `type`.
#[derive(Debug)]
pub struct EngineKind {
    /// Its name, description and routes.
    pub info: EngineInfo,
    /// Mounted by KeyVault itself at this path (not configurable).
    pub fixed_at: Option<&'static str>,
    /// Mounted at most once: the kind keeps its data under fixed storage keys. (A kind
    /// that keeps none, such as a proxy to another vault, may be mounted many times.)
    pub once: bool,
    /// Takes `[mounts.options]` (a proxy's address and credentials); the others refuse any.
    pub takes_options: bool,
    /// Build the engine of one mount (its `[mounts.options]` included).
    pub build: Build,
}

/// How a kind builds the engine of one mount from the shared core and its `[[mounts]]`
/// entry.
pub type Build = fn(&Arc<Core>, &MountConfig) -> Result<Arc<dyn Engine>>;

/// For the kinds that take no options: refuse any, naming them.
pub fn check_options(kind: &EngineKind, mount: &MountConfig) -> Result<()> {
    if !kind.takes_options && !mount.options.is_empty() {
        let names: Vec<&str> = mount.options.keys().map(String::as_str).collect();
        return Err(crate::error::Error::Config(format!(
            "mount {:?}: {} takes no options (got {})",
            mount.path,
            kind.info.name,
            names.join(", ")
        )));
    }
    Ok(())
}

/// Every kind of engine and auth method.
pub const KINDS: &[EngineKind] = &[
    kv::KIND,
    kv2::KIND,
    proxy::HASHICORP,
    proxy::AWS,
    proxy::AZURE,
    database::KIND,
    transit::KIND,
    gateway::KIND,
    auth::approle::KIND,
    auth::userpass::KIND,
    auth::cert::KIND,
    auth::kubernetes::KIND,
    auth::bootstrap::KIND,
    sys::KIND,
    token::KIND,
    login::KIND,
];

/// The kind named `name`.
pub fn kind(name: &str) -> Option<&'static EngineKind> {
    KINDS.iter().find(|k| k.info.name == name)
}

/// The kinds a configuration may mount.
pub fn configurable() -> Vec<&'static str> {
    KINDS.iter().filter(|k| k.fixed_at.is_none()).map(|k| k.info.name).collect()
}

/// An engine kind that only describes its routes (see
/// [`describe_mounts`](crate::service::describe_mounts)); it serves nothing.
#[derive(Debug)]
pub struct Described(pub &'static EngineKind);

#[async_trait::async_trait]
impl Engine for Described {
    fn info(&self) -> &'static EngineInfo {
        &self.0.info
    }
    async fn handle(&self, _: &mut crate::logical::Request) -> Result<crate::logical::Reply> {
        Err(crate::error::Error::Internal("a described engine serves nothing".into()))
    }
}
