//! `keyvault operator migrate`: copy every secret under a prefix from one mount to another
//! on a running server (embedded `secret/` or `kv/`, or a proxied mount), through the
//! API, so that moving units between the embedded store and an external vault is a
//! change of configuration. Each copy is read back and compared; a secret already equal
//! at the destination is skipped, so a run that stopped half way resumes by running it
//! again. The latest version of each secret is copied, or with `--all-versions` (both
//! mounts keeping numbered versions: KV version 2, or a proxied mount whose upstream
//! does) every live version, oldest first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use keyvault::error::{Error, Result};
use serde_json::Value;
use zeroize::Zeroizing;

use super::client::{Endpoint, Sender, Target, connect};

/// One keep-alive connection (reconnected when it breaks).
struct Conn {
    target: Arc<Target>,
    token: Option<String>,
    header: String,
    sender: Option<Sender>,
}

impl Conn {
    fn new(target: Arc<Target>, e: &Endpoint) -> Self {
        Conn { target, token: e.token.clone(), header: e.token_header.clone(), sender: None }
    }

    /// Status and body (as zeroizing bytes: bodies carry secret values).
    async fn send(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Zeroizing<Vec<u8>>)> {
        for attempt in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                self.sender = Some(connect(&self.target).await?);
            }
            let Some(sender) = self.sender.as_mut() else { continue };
            let mut b = Request::builder()
                .method(method)
                .uri(format!("/v1/{path}"))
                .header(hyper::header::HOST, self.target.host.as_str());
            // A proxied mount's cache may hold a value older than the upstream's.
            b = b.header(hyper::header::CACHE_CONTROL, "no-cache");
            if let Some(t) = &self.token {
                b = b.header(self.header.as_str(), t.as_str());
            }
            let payload = body.map(Bytes::copy_from_slice).unwrap_or_default();
            let req = b.body(Full::new(payload)).map_err(|e| Error::Internal(e.to_string()))?;
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let bytes =
                        resp.into_body().collect().await.map_err(|e| Error::Internal(e.to_string()))?.to_bytes();
                    return Ok((status, Zeroizing::new(bytes.to_vec())));
                }
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "connection lost; reconnecting");
                    self.sender = None;
                }
                Err(e) => return Err(Error::Internal(format!("{method} /v1/{path}: {e}"))),
            }
        }
        Err(Error::Internal(format!("{method} /v1/{path}: no connection")))
    }
}

/// How one mount is addressed: KV version 1 paths, or version 2's `data/` and `metadata/`.
#[derive(Debug, Clone)]
struct Mount {
    path: String,
    v2: bool,
    /// Keeps numbered versions: KV version 2, or a proxied mount that says
    /// `versions = "numbered"` (reads take `?version=N`, each write makes a version).
    numbered: bool,
}

impl Mount {
    fn list_path(&self, prefix: &str) -> String {
        let p = if prefix.is_empty() { String::new() } else { format!("{}/", prefix.trim_end_matches('/')) };
        if self.v2 { format!("{}/metadata/{p}", self.path) } else { format!("{}/{p}", self.path) }
    }

    fn data_path(&self, name: &str) -> String {
        if self.v2 { format!("{}/data/{name}", self.path) } else { format!("{}/{name}", self.path) }
    }

    /// The secret's fields from a read's reply.
    fn fields(&self, reply: &[u8]) -> Result<Value> {
        let v: Value = serde_json::from_slice(reply).map_err(|_| Error::Internal("a reply that is not JSON".into()))?;
        let data = if self.v2 { &v["data"]["data"] } else { &v["data"] };
        match data {
            Value::Object(_) => Ok(data.clone()),
            _ => Err(Error::Internal("a read reply without data".into())),
        }
    }

    fn write_body(&self, fields: &Value) -> Zeroizing<Vec<u8>> {
        let body = if self.v2 { serde_json::json!({ "data": fields }) } else { fields.clone() };
        Zeroizing::new(body.to_string().into_bytes())
    }
}

fn errors(body: &[u8]) -> String {
    serde_json::from_slice::<keyvault_api::ErrorBody>(body).map(|b| b.errors.join("; ")).unwrap_or_default()
}

/// Learn a mount's KV version the way Vault's tools do.
async fn mount(conn: &mut Conn, path: &str) -> Result<Mount> {
    let path = path.trim_matches('/').to_owned();
    let (status, body) = conn.send("GET", &format!("sys/internal/ui/mounts/{path}"), None).await?;
    if status != 200 {
        return Err(Error::invalid(format!("mount {path}: {status} {}", errors(&body))));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|_| Error::Internal("mount reply".into()))?;
    if v["data"]["type"] != "kv" {
        return Err(Error::invalid(format!("mount {path} is not a key/value store")));
    }
    let options = &v["data"]["options"];
    let v2 = options["version"] == "2";
    Ok(Mount { v2, numbered: v2 || options["versions"] == "numbered", path })
}

/// Every secret name under `prefix` (depth first).
async fn walk(conn: &mut Conn, m: &Mount, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut folders = vec![prefix.trim_matches('/').to_owned()];
    while let Some(folder) = folders.pop() {
        let (status, body) = conn.send("LIST", &m.list_path(&folder), None).await?;
        match status {
            404 => continue,
            200 => {}
            s => return Err(Error::Internal(format!("LIST {}: {s} {}", m.list_path(&folder), errors(&body)))),
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| Error::Internal("list reply".into()))?;
        for k in v["data"]["keys"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let full = if folder.is_empty() { k.to_owned() } else { format!("{folder}/{k}") };
            match full.strip_suffix('/') {
                Some(f) => folders.push(f.to_owned()),
                None => out.push(full),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What happened to one secret.
enum Outcome {
    /// This many versions written.
    Copied(u64),
    Equal,
}

/// The fields of the latest version, or `None` when there is none.
async fn latest(conn: &mut Conn, m: &Mount, name: &str) -> Result<Option<Value>> {
    let (status, body) = conn.send("GET", &m.data_path(name), None).await?;
    match status {
        200 => m.fields(&body).map(Some),
        404 => Ok(None),
        s => Err(Error::Internal(format!("read {}/{name}: {s} {}", m.path, errors(&body)))),
    }
}

/// The live versions of a secret, oldest first (deleted and destroyed ones skipped): from
/// KV version 2's metadata, or 1 to the latest by `?version=N` on a proxied mount.
async fn history(conn: &mut Conn, m: &Mount, name: &str) -> Result<Vec<Value>> {
    let numbers: Vec<u64> = if m.v2 {
        let (status, body) = conn.send("GET", &format!("{}/metadata/{name}", m.path), None).await?;
        match status {
            404 => return Ok(Vec::new()),
            200 => {}
            s => return Err(Error::Internal(format!("metadata {}/{name}: {s} {}", m.path, errors(&body)))),
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| Error::Internal("metadata reply".into()))?;
        let mut n: Vec<u64> = v["data"]["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, meta)| meta["deletion_time"].as_str().is_none_or(str::is_empty) && meta["destroyed"] != true)
            .filter_map(|(k, _)| k.parse().ok())
            .collect();
        n.sort_unstable();
        n
    } else {
        let (status, body) = conn.send("GET", &m.data_path(name), None).await?;
        match status {
            404 => return Ok(Vec::new()),
            200 => {}
            s => return Err(Error::Internal(format!("read {}/{name}: {s} {}", m.path, errors(&body)))),
        }
        let v: Value = serde_json::from_slice(&body).map_err(|_| Error::Internal("read reply".into()))?;
        match v["metadata"]["version"].as_u64() {
            Some(n) if n > 0 => (1..=n).collect(),
            _ => return Ok(vec![m.fields(&body)?]),
        }
    };
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        let (status, body) = conn.send("GET", &format!("{}?version={n}", m.data_path(name)), None).await?;
        match status {
            200 => out.push(m.fields(&body)?),
            404 => {} // deleted since it was listed, or deleted upstream
            s => return Err(Error::Internal(format!("read {}/{name} version {n}: {s} {}", m.path, errors(&body)))),
        }
    }
    Ok(out)
}

async fn write(conn: &mut Conn, to: &Mount, name: &str, fields: &Value) -> Result<()> {
    let (status, body) = conn.send("PUT", &to.data_path(name), Some(&to.write_body(fields))).await?;
    if !(200..300).contains(&status) {
        return Err(Error::Internal(format!("write {}/{name}: {status} {}", to.path, errors(&body))));
    }
    Ok(())
}

/// Copy the latest version, unless the destination's latest is equal.
async fn copy_latest(conn: &mut Conn, from: &Mount, to: &Mount, name: &str, dry_run: bool) -> Result<Outcome> {
    let Some(fields) = latest(conn, from, name).await? else {
        return Err(Error::Internal(format!("read {}/{name}: gone since it was listed", from.path)));
    };
    if latest(conn, to, name).await?.as_ref() == Some(&fields) {
        return Ok(Outcome::Equal);
    }
    if dry_run {
        return Ok(Outcome::Copied(1));
    }
    write(conn, to, name, &fields).await?;
    if latest(conn, to, name).await?.as_ref() != Some(&fields) {
        return Err(Error::Internal(format!("{}/{name}: the copy read back differs", to.path)));
    }
    Ok(Outcome::Copied(1))
}

/// Copy every live version the destination lacks. The destination's live versions must
/// be the first of the source's (none, or a run that stopped half way): any other
/// history there is left alone and reported.
async fn copy_history(conn: &mut Conn, from: &Mount, to: &Mount, name: &str, dry_run: bool) -> Result<Outcome> {
    let source = history(conn, from, name).await?;
    if source.is_empty() {
        return Err(Error::Internal(format!("read {}/{name}: gone since it was listed", from.path)));
    }
    let have = history(conn, to, name).await?;
    if have.len() > source.len() || source[..have.len()] != have[..] {
        return Err(Error::Conflict(format!(
            "{}/{name} has versions that are not the first of {}/{name}'s: left alone (copy the latest version only, or \
             delete it there first)",
            to.path, from.path
        )));
    }
    let missing = &source[have.len()..];
    if missing.is_empty() {
        return Ok(Outcome::Equal);
    }
    if !dry_run {
        for fields in missing {
            write(conn, to, name, fields).await?;
        }
        if history(conn, to, name).await? != source {
            return Err(Error::Internal(format!("{}/{name}: the versions read back differ", to.path)));
        }
    }
    Ok(Outcome::Copied(missing.len() as u64))
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// Secrets written to (or, in a dry run, that would be).
    pub copied: u64,
    /// Versions written (equal to `copied` unless `--all-versions`).
    pub versions: u64,
    /// Secrets already equal at the destination.
    pub equal: u64,
}

/// Copy every secret under `prefix` of `from` into `to` with `workers` connections.
pub async fn run(
    e: &Endpoint,
    from: &str,
    to: &str,
    prefix: &str,
    all_versions: bool,
    dry_run: bool,
    workers: usize,
) -> Result<Summary> {
    let target = Arc::new(e.target()?);
    let mut conn = Conn::new(target.clone(), e);
    let (from, to) = (mount(&mut conn, from).await?, mount(&mut conn, to).await?);
    if from.path == to.path {
        return Err(Error::invalid("--from and --to are the same mount"));
    }
    if all_versions && !(from.numbered && to.numbered) {
        let which = if from.numbered { &to.path } else { &from.path };
        return Err(Error::invalid(format!(
            "--all-versions needs both mounts to keep numbered versions; {which}/ does not (copy the latest version only)"
        )));
    }
    let names = walk(&mut conn, &from, prefix).await?;
    let total = names.len() as u64;
    eprintln!(
        "{} {total} secrets ({}) from {}/ (KV v{}) to {}/ (KV v{})",
        if dry_run { "would copy" } else { "copying" },
        if all_versions { "every live version" } else { "latest versions" },
        from.path,
        if from.v2 { 2 } else { 1 },
        to.path,
        if to.v2 { 2 } else { 1 }
    );
    let queue = Arc::new(std::sync::Mutex::new(names));
    let counters = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let [copied, versions, equal, done] = [0, 1, 2, 3];
    let mut tasks: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, c) = (queue.clone(), counters.clone());
        let (from, to, mut conn) = (from.clone(), to.clone(), Conn::new(target.clone(), e));
        tasks.spawn(async move {
            loop {
                let Some(name) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return Ok(()) };
                let outcome = if all_versions {
                    copy_history(&mut conn, &from, &to, &name, dry_run).await?
                } else {
                    copy_latest(&mut conn, &from, &to, &name, dry_run).await?
                };
                match outcome {
                    Outcome::Copied(n) => {
                        c[copied].fetch_add(1, Ordering::Relaxed);
                        c[versions].fetch_add(n, Ordering::Relaxed);
                    }
                    Outcome::Equal => {
                        c[equal].fetch_add(1, Ordering::Relaxed);
                    }
                }
                let n = c[done].fetch_add(1, Ordering::Relaxed) + 1;
                if n % 100 == 0 || n == total {
                    eprint!(
                        "\r  {n}/{total} done ({} copied, {} already equal)",
                        c[copied].load(Ordering::Relaxed),
                        c[equal].load(Ordering::Relaxed)
                    );
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| Error::Internal(format!("migration worker: {e}")))??;
    }
    if total > 0 {
        eprintln!();
    }
    let get = |i: usize| counters[i].load(Ordering::Relaxed);
    Ok(Summary { copied: get(copied), versions: get(versions), equal: get(equal) })
}
