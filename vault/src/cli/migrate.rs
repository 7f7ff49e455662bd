//! `keyvault operator migrate`: copy every secret under a prefix from one mount to another
//! on a running server (embedded `secret/` or `kv/`, or a proxied mount), through the
//! API, so that moving units between the embedded store and an external vault is a
//! change of configuration. Each copy is read back and compared; a secret already equal
//! at the destination is skipped, so a run that stopped half way resumes by running it
//! again. The latest version of each secret is copied.

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
    Ok(Mount { v2: v["data"]["options"]["version"] == "2", path })
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
    Copied,
    Equal,
}

async fn copy_one(conn: &mut Conn, from: &Mount, to: &Mount, name: &str, dry_run: bool) -> Result<Outcome> {
    let (status, body) = conn.send("GET", &from.data_path(name), None).await?;
    if status != 200 {
        return Err(Error::Internal(format!("read {}/{name}: {status} {}", from.path, errors(&body))));
    }
    let fields = from.fields(&body)?;
    let (status, body) = conn.send("GET", &to.data_path(name), None).await?;
    if status == 200 && to.fields(&body).is_ok_and(|f| f == fields) {
        return Ok(Outcome::Equal);
    }
    if dry_run {
        return Ok(Outcome::Copied);
    }
    let (status, body) = conn.send("PUT", &to.data_path(name), Some(&to.write_body(&fields))).await?;
    if !(200..300).contains(&status) {
        return Err(Error::Internal(format!("write {}/{name}: {status} {}", to.path, errors(&body))));
    }
    let (status, body) = conn.send("GET", &to.data_path(name), None).await?;
    if status != 200 || to.fields(&body)? != fields {
        return Err(Error::Internal(format!("{}/{name}: the copy read back differs", to.path)));
    }
    Ok(Outcome::Copied)
}

/// Copy every secret under `prefix` of `from` into `to` with `workers` connections.
pub async fn run(
    e: &Endpoint,
    from: &str,
    to: &str,
    prefix: &str,
    dry_run: bool,
    workers: usize,
) -> Result<(u64, u64)> {
    let target = Arc::new(e.target()?);
    let mut conn = Conn::new(target.clone(), e);
    let (from, to) = (mount(&mut conn, from).await?, mount(&mut conn, to).await?);
    if from.path == to.path {
        return Err(Error::invalid("--from and --to are the same mount"));
    }
    let names = walk(&mut conn, &from, prefix).await?;
    let total = names.len() as u64;
    eprintln!(
        "{} {total} secrets from {}/ (KV v{}) to {}/ (KV v{})",
        if dry_run { "would copy" } else { "copying" },
        from.path,
        if from.v2 { 2 } else { 1 },
        to.path,
        if to.v2 { 2 } else { 1 }
    );
    let queue = Arc::new(std::sync::Mutex::new(names));
    let (copied, equal, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, copied, equal, done) = (queue.clone(), copied.clone(), equal.clone(), done.clone());
        let (from, to, mut conn) = (from.clone(), to.clone(), Conn::new(target.clone(), e));
        tasks.spawn(async move {
            loop {
                let Some(name) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return Ok(()) };
                match copy_one(&mut conn, &from, &to, &name, dry_run).await? {
                    Outcome::Copied => copied.fetch_add(1, Ordering::Relaxed),
                    Outcome::Equal => equal.fetch_add(1, Ordering::Relaxed),
                };
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 100 == 0 || n == total {
                    eprint!(
                        "\r  {n}/{total} done ({} copied, {} already equal)",
                        copied.load(Ordering::Relaxed),
                        equal.load(Ordering::Relaxed)
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
    Ok((copied.load(Ordering::Relaxed), equal.load(Ordering::Relaxed)))
}
