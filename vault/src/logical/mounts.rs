//! The mount table: which engine serves which path, and how a request path finds its
//! engine, route and policy path.

use std::sync::Arc;

use sha2::Digest;

use super::{Access, Engine, OpSpec, Operation, Params, Route};
use crate::error::{Error, Result};

/// One mounted engine.
#[derive(Debug, Clone)]
pub struct Mount {
    /// With its trailing `/` (`secret/`, `auth/approle/`).
    pub path: String,
    pub engine: Arc<dyn Engine>,
    /// Internal mounts (`sys/`, `auth/token/`, the short login) cannot be moved and are
    /// not configured; the hidden one is not listed.
    pub hidden: bool,
}

impl Mount {
    /// Under `auth/`: an auth method.
    pub fn is_auth(&self) -> bool {
        self.path.starts_with("auth/")
    }

    /// A stable identifier of the mount, Vault's style (`kv_1a2b3c4d`).
    pub fn accessor(&self) -> String {
        let digest = sha2::Sha256::digest(format!("{}\x1f{}", self.engine.kind(), self.path).as_bytes());
        format!("{}_{}", self.engine.kind(), hex::encode(&digest[..4]))
    }

    fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.trim_end_matches('/').split('/').filter(|s| !s.is_empty())
    }
}

/// A request path resolved to its engine and route.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub mount: Mount,
    pub route: &'static Route,
    pub spec: OpSpec,
    pub params: Params,
    /// The path the request is authorized on.
    pub policy_path: String,
    /// The request's path (decoded, without `/v1/`).
    pub path: String,
}

impl Resolved {
    /// What the audit log calls this operation: `POST /v1/transit/encrypt/{name}`.
    pub fn describe(&self, method: &str) -> String {
        format!("{method} /v1/{}{}", self.mount.path, self.route.pattern).trim_end_matches('/').to_owned()
    }
}

/// Every route of a mount table, for the docs and the authorization tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// The full path pattern (`transit/encrypt/{name}`).
    pub path: String,
    pub operation: Operation,
    pub access: Access,
    /// The policy path pattern (`transit/keys/{name}`).
    pub policy: String,
    pub changes_state: bool,
    pub summary: &'static str,
}

/// Mounted engines, matched longest path first.
#[derive(Debug, Clone)]
pub struct MountTable {
    mounts: Vec<Mount>,
}

/// Split a request path (after `/v1/`, still percent-encoded) into decoded segments. For a
/// listing, a trailing `/` is dropped (`LIST transit/keys/`); on anything else it is an
/// empty last segment, which no `{name}` matches and a secret path refuses. No segment may be `.` or `..`, hold a
/// control character or an encoded `/`: one rule for every route. Empty segments reach
/// only a route's last `{*rest}` (a SPIFFE ID has `//`), whose engine decides; a
/// `{name}` segment is never empty.
pub fn segments(raw: &str, operation: Operation) -> Result<Vec<String>> {
    let trimmed = if operation == Operation::List { raw.strip_suffix('/').unwrap_or(raw) } else { raw };
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let segs = keyvault_api::secret::decode_segments(trimmed).map_err(|e| Error::invalid(e.to_string()))?;
    for s in &segs {
        let bad = if s == "." || s == ".." {
            Some("'.' and '..' segments are not allowed")
        } else if s.chars().any(char::is_control) {
            Some("control characters are not allowed")
        } else if s.contains('/') {
            Some("encoded '/' inside a segment")
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(Error::invalid(format!("invalid path: {why}")));
        }
    }
    Ok(segs)
}

impl MountTable {
    /// Check the mounts: each path once, none inside another (but under the hidden `auth/`
    /// mount of the short login), auth methods under `auth/`, nothing else there.
    pub fn new(mut mounts: Vec<Mount>) -> Result<Self> {
        for m in &mounts {
            let ok = m.path.ends_with('/')
                && m.path.len() > 1
                && segments(&m.path, Operation::List).map(|s| s.len() == m.segments().count()).unwrap_or(false);
            if !ok {
                return Err(Error::Config(format!("mount path {:?} is not a valid path", m.path)));
            }
        }
        for (i, a) in mounts.iter().enumerate() {
            for b in &mounts[i + 1..] {
                let (short, long) = if a.path.len() <= b.path.len() { (a, b) } else { (b, a) };
                if long.path.starts_with(&short.path) && !short.hidden {
                    return Err(Error::Config(format!(
                        "mount {:?} ({}) overlaps mount {:?} ({})",
                        long.path,
                        long.engine.kind(),
                        short.path,
                        short.engine.kind()
                    )));
                }
            }
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.segments().count()));
        Ok(MountTable { mounts })
    }

    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }

    /// The mount of an engine kind (the first, if several).
    pub fn by_kind(&self, kind: &str) -> Option<&Mount> {
        self.mounts.iter().find(|m| m.engine.kind() == kind)
    }

    /// Find the engine, route and policy path of `operation` on `raw_path` (after `/v1/`,
    /// still percent-encoded): 404 if no engine serves the path, 405 if its route does not
    /// support the operation, 400 for a malformed path or parameter.
    pub fn resolve(&self, operation: Operation, raw_path: &str) -> Result<Resolved> {
        let (mount, route, params, segs) = self.route(operation, raw_path)?;
        let spec = *route.op(operation).ok_or(Error::UnsupportedOperation)?;
        let mut params = params;
        if let Some(normalize) = route.normalize {
            normalize(operation, &mut params)?;
        }
        let mut policy_path = format!("{}{}", mount.path, route.render(&params));
        if operation == Operation::List && !policy_path.ends_with('/') {
            policy_path.push('/');
        }
        Ok(Resolved { mount: mount.clone(), route, spec, params, policy_path, path: segs.join("/") })
    }

    /// The methods `raw_path` answers (the `Allow` header of a 405), in Vault's mapping:
    /// a read is `GET`, a listing `LIST` (or `GET` with `?list=true`), a write `POST` and
    /// `PUT`. `None` when no route serves the path.
    pub fn allowed_methods(&self, raw_path: &str) -> Option<String> {
        let mut methods: Vec<&str> = Vec::new();
        for operation in [Operation::Read, Operation::List, Operation::Write, Operation::Delete, Operation::Patch] {
            let Ok((_, route, _, _)) = self.route(operation, raw_path) else { continue };
            if route.op(operation).is_none() {
                continue;
            }
            methods.extend_from_slice(match operation {
                Operation::Read => &["GET"][..],
                Operation::List => &["LIST", "GET"],
                Operation::Write => &["POST", "PUT"],
                Operation::Delete => &["DELETE"],
                Operation::Patch => &["PATCH"],
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        methods.retain(|m| seen.insert(*m));
        (!methods.is_empty()).then(|| methods.join(", "))
    }

    /// The mount and route that serve `raw_path` for `operation` (a listing drops a
    /// trailing `/`), whatever operations the route supports.
    fn route(&self, operation: Operation, raw_path: &str) -> Result<(&Mount, &'static Route, Params, Vec<String>)> {
        let segs = segments(raw_path, operation)?;
        // The first mount whose every segment starts the path (the table is sorted longest
        // first), and how many segments it has.
        let (mount, depth) = self
            .mounts
            .iter()
            .find_map(|m| {
                let mut depth = 0;
                for ms in m.segments() {
                    if segs.get(depth).is_none_or(|s| s != ms) {
                        return None;
                    }
                    depth += 1;
                }
                Some((m, depth))
            })
            .ok_or_else(|| Error::NotFound("no handler for this path".into()))?;
        let rest = &segs[depth..];
        let (route, params) = mount
            .engine
            .routes()
            .iter()
            .find_map(|r| r.matches(rest).map(|p| (r, p)))
            .ok_or_else(|| Error::NotFound("no handler for this path".into()))?;
        Ok((mount, route, params, segs))
    }

    /// Every route of every mount (hidden ones too), with the mount's path.
    pub fn each_route(&self) -> Vec<(String, &'static super::Route)> {
        self.mounts.iter().flat_map(|m| m.engine.routes().iter().map(|r| (m.path.clone(), r))).collect()
    }

    /// Every (route, operation) of every mount.
    pub fn route_info(&self) -> Vec<RouteInfo> {
        let mut out = Vec::new();
        for m in &self.mounts {
            for r in m.engine.routes() {
                let join = |p: &str| format!("{}{p}", m.path).trim_end_matches('/').to_owned();
                for op in r.ops {
                    out.push(RouteInfo {
                        path: join(r.pattern),
                        operation: op.operation,
                        access: op.access,
                        policy: join(r.policy.unwrap_or(r.pattern)),
                        changes_state: op.changes_state,
                        summary: r.summary,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.path, a.operation).cmp(&(&b.path, b.operation)));
        out
    }

    /// `GET /v1/sys/mounts` (`auth == false`) or `GET /v1/sys/auth` (`auth == true`), in
    /// Vault's shape; auth methods are keyed without their `auth/` prefix.
    pub fn listing(&self, auth: bool) -> keyvault_api::sys::Mounts {
        self.mounts
            .iter()
            .filter(|m| !m.hidden && m.is_auth() == auth)
            .map(|m| {
                let key = if auth { m.path.trim_start_matches("auth/").to_owned() } else { m.path.clone() };
                // Vault's tools tell the key/value versions apart by `options.version`.
                let (kind, version) = match m.engine.kind() {
                    // A proxied mount answers as KV version 1 (versions by `?version=N`).
                    "kv" | "hashicorp" | "aws" | "azure" => ("kv", Some("1")),
                    "kv-v2" => ("kv", Some("2")),
                    other => (other, None),
                };
                let info = keyvault_api::sys::MountInfo {
                    kind: kind.to_owned(),
                    description: m.engine.description().to_owned(),
                    accessor: m.accessor(),
                    local: false,
                    seal_wrap: false,
                    external_entropy_access: false,
                    config: Default::default(),
                    options: version.map(|v| {
                        let mut o: std::collections::BTreeMap<String, String> =
                            [("version".to_owned(), v.to_owned())].into();
                        o.extend(m.engine.mount_options().into_iter().map(|(k, v)| (k.to_owned(), v)));
                        o
                    }),
                };
                (key, info)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_checked_segments() {
        let read = Operation::Read;
        assert_eq!(segments("secret/a/b", read).unwrap(), vec!["secret", "a", "b"]);
        assert_eq!(segments("transit/keys/", Operation::List).unwrap(), vec!["transit", "keys"]);
        assert_eq!(segments("secret/a/", read).unwrap(), vec!["secret", "a", ""]);
        assert_eq!(segments("", read).unwrap(), Vec::<String>::new());
        assert_eq!(segments("gateway/producers/spiffe://x/y", read).unwrap()[3], "");
        for bad in ["secret/../sys", "secret/%2e%2e/x", "secret/a%2Fb", "secret/%00", "a/./b"] {
            assert!(segments(bad, read).is_err(), "{bad}");
        }
    }
}
