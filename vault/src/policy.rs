//! Policies (docs/architecture.md, "Policies"): path globs with capabilities, deny by default, in HashiCorp
//! Vault's syntax (HCL or its JSON form) so that existing policies carry over.
//!
//! ```hcl
//! path "secret/db/*" { capabilities = ["read", "list"] }
//! path "secret/+/config" { capabilities = ["read"] }
//! ```
//!
//! Matching follows Vault: `*` at the end is a prefix glob, `+` stands for exactly one
//! path segment. The policies of a token are merged into one ACL; for a request path the
//! single most specific matching pattern decides (Vault's priority rules), and `deny`
//! there overrides everything.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json};

/// One capability. Bit positions of [`Caps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Capability {
    Read = 1 << 0,
    Create = 1 << 1,
    Update = 1 << 2,
    Delete = 1 << 3,
    List = 1 << 4,
    Sudo = 1 << 5,
    Deny = 1 << 6,
    Sign = 1 << 7,
    Verify = 1 << 8,
    Encrypt = 1 << 9,
    Decrypt = 1 << 10,
    Rotate = 1 << 11,
}

impl Capability {
    pub const ALL: [Capability; 12] = [
        Capability::Read,
        Capability::Create,
        Capability::Update,
        Capability::Delete,
        Capability::List,
        Capability::Sudo,
        Capability::Deny,
        Capability::Sign,
        Capability::Verify,
        Capability::Encrypt,
        Capability::Decrypt,
        Capability::Rotate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Create => "create",
            Capability::Update => "update",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Deny => "deny",
            Capability::Sign => "sign",
            Capability::Verify => "verify",
            Capability::Encrypt => "encrypt",
            Capability::Decrypt => "decrypt",
            Capability::Rotate => "rotate",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Capability::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::invalid(format!("unsupported capability {s:?}")))
    }
}

/// A set of capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps(u16);

impl Caps {
    pub fn contains(self, c: Capability) -> bool {
        self.0 & c as u16 != 0
    }
    fn insert(&mut self, c: Capability) {
        self.0 |= c as u16;
    }
    fn union(self, other: Caps) -> Caps {
        Caps(self.0 | other.0)
    }
    pub fn names(self) -> Vec<&'static str> {
        Capability::ALL.into_iter().filter(|c| self.contains(*c)).map(Capability::name).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `+`: exactly one non-empty path segment.
    Segment,
}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    raw: String,
    parts: Vec<Part>,
    glob: bool,
}

impl Pattern {
    pub fn parse(raw: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("policy path {raw:?}: {why}"));
        if raw.is_empty() || raw.len() > 512 {
            return Err(bad("must be 1 to 512 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(bad("contains a control character"));
        }
        // One leading `/` is dropped, as Vault does (its paths start after the `/` of the
        // API path): `/secret/admin/*` is `secret/admin/*`. Kept, it would name a path no
        // request has, and a deny written that way would deny nothing.
        let path = raw.strip_prefix('/').unwrap_or(raw);
        let (body, glob) = match path.strip_suffix('*') {
            Some(b) => (b, true),
            None => (path, false),
        };
        if body.contains('*') {
            return Err(bad("'*' is only allowed at the end"));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        for (i, seg) in body.split('/').enumerate() {
            if i > 0 {
                literal.push('/');
            }
            if seg == "+" {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Segment);
            } else if seg.contains('+') {
                return Err(bad("'+' must be a whole path segment"));
            } else {
                literal.push_str(seg);
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        // `raw` is the path as matched (the leading `/` dropped): rules are merged and ranked
        // by it, so `/secret/*` and `secret/*` are one rule, as in Vault.
        Ok(Pattern { raw: path.to_owned(), parts, glob })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, true).is_some_and(|rest| self.glob || rest.is_empty())
    }

    /// Whether this pattern matches every path that starts with `prefix`: its parts match
    /// the start of `prefix` (a `+` only a whole segment of it) and a trailing `*` the rest.
    fn covers_all_under(&self, prefix: &str) -> bool {
        // The trailing `*` takes whatever of `prefix` is left, and all that follows it.
        self.glob && self.walk(prefix, false).is_some()
    }

    /// `text` after this pattern's parts (before any trailing `*`), or `None` if they do
    /// not match its start. A `+` takes one non-empty segment; with `to_end`, the last
    /// segment of `text` may be it (a whole path), else it must end at a `/` of `text`
    /// (a prefix, whose last segment goes on after it).
    fn walk<'a>(&self, text: &'a str, to_end: bool) -> Option<&'a str> {
        let mut rest = text;
        for part in &self.parts {
            match part {
                Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
                Part::Segment => {
                    let end = match rest.find('/') {
                        Some(end) => end,
                        None if to_end => rest.len(),
                        None => return None,
                    };
                    if end == 0 {
                        return None;
                    }
                    rest = &rest[end..];
                }
            }
        }
        Some(rest)
    }

    /// Whether this pattern might match some path that starts with `prefix`: the text
    /// before its first wildcard and `prefix` agree as far as both go (conservative: a
    /// `+` or `*` later on is taken to match).
    fn may_match_under(&self, prefix: &str) -> bool {
        let head = match &self.parts.first() {
            Some(Part::Literal(l)) => l.as_str(),
            _ => "",
        };
        head.starts_with(prefix) || prefix.starts_with(head)
    }

    /// Vault's priority: a later first wildcard, no trailing glob, fewer `+`, longer, then
    /// lexicographically larger wins.
    fn priority(&self) -> (usize, bool, std::cmp::Reverse<usize>, usize, &str) {
        let first_wild = match (self.raw.find('+'), self.glob) {
            (Some(p), _) => p,
            (None, true) => self.raw.len() - 1,
            (None, false) => usize::MAX,
        };
        let plus = self.parts.iter().filter(|p| matches!(p, Part::Segment)).count();
        (first_wild, !self.glob, std::cmp::Reverse(plus), self.raw.len(), &self.raw)
    }
}

/// A named policy as parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub text: String,
    rules: Vec<(Pattern, Caps)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    #[serde(default)]
    path: MergedPaths,
}

/// The `path` rules, a path named twice merged as Vault merges it: the capabilities of
/// both (so a deny in either wins). A map that kept one of them would grant what a
/// reader sees denied.
#[derive(Default)]
struct MergedPaths(BTreeMap<String, PathBlock>);

impl MergedPaths {
    fn add(&mut self, path: String, block: PathBlock) {
        self.0.entry(path).or_default().capabilities.extend(block.capabilities);
    }
}

impl<'de> Deserialize<'de> for MergedPaths {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MergedPaths;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of paths to rules")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<MergedPaths, A::Error> {
                let mut paths = MergedPaths::default();
                while let Some((path, block)) = map.next_entry::<String, PathBlock>()? {
                    paths.add(path, block);
                }
                Ok(paths)
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathBlock {
    capabilities: Vec<String>,
}

pub const ROOT_POLICY: &str = "root";

/// Policy names follow the common rule for names.
pub fn validate_name(name: &str) -> Result<()> {
    crate::validate_name("policy", name)
}

impl Policy {
    /// Parse Vault policy syntax: HCL, or the JSON form when the text starts with `{`.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        validate_name(name)?;
        if text.len() > 64 * 1024 {
            return Err(Error::invalid("policy text is longer than 64 KiB"));
        }
        // A path named twice is merged as Vault merges it ([`MergedPaths`]), in both forms.
        let doc: PolicyDoc = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| Error::invalid(format!("policy JSON: {e}")))?
        } else {
            check_policy_hcl(text)?;
            let body = hcl::parse(text).map_err(|e| Error::invalid(format!("policy HCL: {e}")))?;
            hcl_paths(body)?
        };
        let mut rules = Vec::with_capacity(doc.path.0.len());
        for (raw, block) in doc.path.0 {
            let pattern = Pattern::parse(&raw)?;
            let mut caps = Caps::default();
            for c in &block.capabilities {
                caps.insert(Capability::parse(c)?);
            }
            rules.push((pattern, caps));
        }
        Ok(Policy { name: name.to_owned(), text: text.to_owned(), rules })
    }
}

/// The rules of a policy in HCL: `path "<pattern>" { ... }` blocks and nothing else, each
/// read on its own (the HCL deserializer would let a later block, or a `path = {...}`
/// attribute, replace an earlier one of the same path), a path named twice merged.
fn hcl_paths(body: hcl::Body) -> Result<PolicyDoc> {
    if let Some(a) = body.attributes().next() {
        return Err(Error::invalid(format!(
            "policy HCL: {:?} = ...: a policy is `path \"...\" {{ }}` blocks",
            a.key()
        )));
    }
    let mut paths = MergedPaths::default();
    for block in body.into_blocks() {
        let [label] = block.labels.as_slice() else {
            return Err(Error::invalid("policy HCL: a block other than `path \"<pattern>\" { ... }`"));
        };
        if block.identifier.as_str() != "path" {
            return Err(Error::invalid(format!("policy HCL: unknown block {:?}", block.identifier.as_str())));
        }
        let path = label.as_str().to_owned();
        let rule: PathBlock = hcl::from_body(block.body).map_err(|e| Error::invalid(format!("policy HCL: {e}")))?;
        paths.add(path, rule);
    }
    Ok(PolicyDoc { path: paths })
}

/// Policy HCL is blocks, attributes, strings, lists and numbers: nothing of what HCL's
/// expression language adds (operators, function calls, conditionals, templates,
/// heredocs), and at most 32 levels of nesting. The HCL parser backtracks badly on long
/// operator chains (an 893-byte document took more than 10 s; found by the `policy` fuzz
/// target, fuzz/regressions/policy/), so the text is scanned first and anything else is
/// refused before it is parsed. Linear in the length of the text.
fn check_policy_hcl(text: &str) -> Result<()> {
    const MAX_DEPTH: usize = 32;
    let refuse = |what: &str| {
        Err(Error::invalid(format!(
            "policy HCL: {what} is not part of policy syntax (blocks, attributes, strings, lists, numbers)"
        )))
    };
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None | Some(b'\n') => return Err(Error::invalid("policy HCL: unterminated string")),
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(b'$' | b'%') if b.get(i + 1) == Some(&b'{') => {
                            return refuse("a template (`${...}`, `%{...}`)");
                        }
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            b'#' => i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p),
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match text[i + 2..].find("*/") {
                Some(p) => i += p + 4,
                None => return Err(Error::invalid("policy HCL: unterminated comment")),
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Error::invalid(format!("policy HCL: nested deeper than {MAX_DEPTH} levels")));
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            // The one binary operator the characters below could spell.
            b'=' if b.get(i + 1) == Some(&b'=') => return refuse("the operator `==`"),
            c if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'=' | b',' | b' ' | b'\t' | b'\r' | b'\n') => {
                i += 1;
            }
            c if c.is_ascii_graphic() => return refuse(&format!("{:?} outside a string", c as char)),
            _ => return refuse("a character outside a string that is not ASCII"),
        }
    }
    Ok(())
}

/// The merged rules of a token's policies.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    root: bool,
    rules: Vec<(Pattern, Caps)>,
}

impl Acl {
    pub fn root() -> Self {
        Acl { root: true, rules: Vec::new() }
    }

    pub fn from_policies<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut merged: BTreeMap<String, (Pattern, Caps)> = BTreeMap::new();
        for p in policies {
            for (pattern, caps) in &p.rules {
                merged
                    .entry(pattern.raw.clone())
                    .and_modify(|(_, c)| *c = c.union(*caps))
                    .or_insert_with(|| (pattern.clone(), *caps));
            }
        }
        Acl { root: false, rules: merged.into_values().collect() }
    }

    /// The capabilities this ACL grants on `path`.
    pub fn capabilities(&self, path: &str) -> Caps {
        if self.root {
            return Caps(!(Capability::Deny as u16));
        }
        let best =
            self.rules.iter().filter(|(p, _)| p.matches(path)).max_by(|a, b| a.0.priority().cmp(&b.0.priority()));
        match best {
            Some((_, caps)) if caps.contains(Capability::Deny) => Caps::default(),
            Some((_, caps)) => *caps,
            None => Caps::default(),
        }
    }

    pub fn allows(&self, path: &str, cap: Capability) -> bool {
        self.capabilities(path).contains(cap)
    }

    /// A root token's ACL.
    pub fn is_root(&self) -> bool {
        self.root
    }

    /// Whether `cap` is granted on every path under `prefix` (which ends in `/`), whatever
    /// follows it: a rule whose pattern takes in all of them (the prefix, or a part of it,
    /// then a trailing `*`) grants `cap`, and every rule that outranks it and could match
    /// some path under `prefix` grants `cap` too (no narrower deny, no narrower rule
    /// without it). Conservative: a rule that might overlap counts as overlapping.
    pub fn grants_all_under(&self, prefix: &str, cap: Capability) -> bool {
        if self.root {
            return true;
        }
        let grants = |caps: &Caps| caps.contains(cap) && !caps.contains(Capability::Deny);
        let Some((cover, caps)) = self
            .rules
            .iter()
            .filter(|(p, _)| p.covers_all_under(prefix))
            .max_by(|a, b| a.0.priority().cmp(&b.0.priority()))
        else {
            return false;
        };
        grants(caps)
            && self
                .rules
                .iter()
                .all(|(p, caps)| p.priority() <= cover.priority() || !p.may_match_under(prefix) || grants(caps))
    }

    /// Whether any rule grants something on a path under `prefix` (a mount path ending in
    /// `/`): Vault's preflight check before it describes a mount to a token.
    pub fn grants_under(&self, prefix: &str) -> bool {
        self.root
            || self.rules.iter().any(|(p, caps)| {
                !caps.contains(Capability::Deny)
                    && *caps != Caps::default()
                    && (p.raw.starts_with(prefix) || prefix.starts_with(p.raw.trim_end_matches('*')))
            })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredPolicy {
    name: String,
    text: String,
}

fn key(name: &str) -> String {
    format!("sys/policy/{name}")
}

/// Policies in the store, with a parsed cache (invalidated on every change made here).
#[derive(Debug)]
pub struct PolicyStore {
    store: Arc<dyn Store>,
    cache: RwLock<HashMap<String, Arc<Policy>>>,
    /// Counts the changes made to the cache by writes, deletes and invalidations (under
    /// its write lock). A read that missed the cache fills it only if no change came
    /// since it started: otherwise it could put back what a change just replaced.
    changes: std::sync::atomic::AtomicU64,
}

impl PolicyStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        PolicyStore { store, cache: RwLock::new(HashMap::new()), changes: Default::default() }
    }

    pub async fn put(&self, name: &str, text: &str) -> Result<()> {
        let expected = self.raw(name).await?;
        self.put_if(name, text, expected.as_deref()).await
    }

    /// The stored bytes of policy `name`, if any (the existence check of a write).
    pub async fn raw(&self, name: &str) -> Result<Option<Vec<u8>>> {
        validate_name(name)?;
        Ok(self.store.get(&key(name)).await?)
    }

    /// Create or replace policy `name` if its stored bytes are still `expected` (`None`:
    /// it must not exist); 409 otherwise.
    pub async fn put_if(&self, name: &str, text: &str, expected: Option<&[u8]>) -> Result<()> {
        if name == ROOT_POLICY {
            return Err(Error::invalid("the root policy cannot be changed"));
        }
        Policy::parse(name, text)?;
        let raw = encode_json(&StoredPolicy { name: name.to_owned(), text: text.to_owned() });
        if !self.store.compare_and_swap(&key(name), expected, Some(&raw)).await? {
            return Err(Error::Conflict(format!("policy {name} changed concurrently; retry")));
        }
        // Forgotten, not filled with this write's policy: a later write may already have
        // replaced it in the store (and in the cache) while this one was on its way here.
        // The next use reads whatever the store holds.
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        cache.remove(name);
        Ok(())
    }

    pub async fn get(&self, name: &str) -> Result<Option<Arc<Policy>>> {
        validate_name(name)?;
        if let Some(p) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(Some(p.clone()));
        }
        let seen = self.changes.load(std::sync::atomic::Ordering::Acquire);
        let Some(raw) = self.store.get(&key(name)).await? else {
            return Ok(None);
        };
        let stored: StoredPolicy = decode_json(&key(name), &raw)?;
        let policy = Arc::new(Policy::parse(name, &stored.text)?);
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if self.changes.load(std::sync::atomic::Ordering::Acquire) == seen {
            cache.insert(name.to_owned(), policy.clone());
        }
        Ok(Some(policy))
    }

    /// Forget the parsed policies: the next use reads them from the store again (another
    /// replica may have changed them).
    pub fn invalidate(&self) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        cache.clear();
    }

    pub async fn delete(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        if name == ROOT_POLICY {
            return Err(Error::invalid("the root policy cannot be deleted"));
        }
        let existed = self.store.delete(&key(name)).await?;
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        self.changes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        cache.remove(name);
        Ok(existed)
    }

    pub async fn list(&self) -> Result<Vec<String>> {
        let mut names = crate::store::list_names(self.store.as_ref(), "sys/policy/").await?;
        names.push(ROOT_POLICY.to_owned());
        names.sort();
        Ok(names)
    }

    /// The ACL of a set of policy names, re-read on every call so that a policy change
    /// takes effect on the next request. Unknown names contribute nothing.
    pub async fn acl(&self, names: &[String]) -> Result<Acl> {
        if names.iter().any(|n| n == ROOT_POLICY) {
            return Ok(Acl::root());
        }
        let mut policies = Vec::with_capacity(names.len());
        for n in names {
            if let Some(p) = self.get(n).await? {
                policies.push(p);
            }
        }
        Ok(Acl::from_policies(policies.iter().map(|p| p.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path named twice in one policy is merged as Vault merges it: the capabilities of
    /// both, a deny in either winning (the parsers kept the last one, so a reader saw a deny
    /// that was not there). A `path = {...}` attribute beside the blocks is refused (the
    /// HCL deserializer let it replace a block).
    #[test]
    fn a_path_named_twice_is_merged_with_deny_winning() {
        let acl = |text: &str| Acl::from_policies([&Policy::parse("p", text).unwrap()]);
        for text in [
            "path \"secret/admin/*\" { capabilities = [\"deny\"] }\npath \"secret/admin/*\" { capabilities = [\"read\"] }",
            "path \"secret/admin/*\" { capabilities = [\"read\"] }\npath \"secret/admin/*\" { capabilities = [\"deny\"] }",
            r#"{"path": {"secret/admin/*": {"capabilities": ["deny"]}, "secret/admin/*": {"capabilities": ["read"]}}}"#,
        ] {
            assert!(!acl(text).allows("secret/admin/x", Capability::Read), "{text}");
        }
        let both = acl("path \"a/*\" { capabilities = [\"read\"] }\npath \"a/*\" { capabilities = [\"list\"] }\n\
             path \"b/*\" { capabilities = [\"read\"] }");
        assert!(both.allows("a/x", Capability::Read) && both.allows("a/x", Capability::List));
        assert!(both.allows("b/x", Capability::Read));
        for bad in [
            "path \"secret/admin/*\" { capabilities = [\"deny\"] }\npath = { \"secret/*\" = { capabilities = [\"read\"] } }",
            "path \"x\" {\n  capabilities = [\"deny\"]\n  capabilities = [\"read\"]\n}",
            r#"{"path": {"secret/admin/*": {"capabilities": ["deny"], "capabilities": ["read"]}}}"#,
            "other \"x\" { capabilities = [\"read\"] }",
            "path \"x\" \"y\" { capabilities = [\"read\"] }",
        ] {
            assert!(Policy::parse("p", bad).is_err(), "{bad}");
        }
    }
    use crate::test_support::{PauseAt, TestStore};

    /// A read that missed the cache and then lost the race with a change (a write or a
    /// delete) does not put the old policy back into the cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_read_does_not_put_back_a_changed_or_deleted_policy() {
        let old = "path \"secret/a\" { capabilities = [\"read\"] }";
        let new = "path \"secret/b\" { capabilities = [\"read\"] }";
        for delete in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let sled = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
            let store = Arc::new(TestStore::holding(sled, PauseAt::Get, &key("p")));
            let policies = Arc::new(PolicyStore::new(store.clone()));
            policies.put("p", old).await.unwrap();
            policies.invalidate();
            store.arm();
            let slow = tokio::spawn({
                let policies = policies.clone();
                async move { policies.get("p").await.unwrap() }
            });
            store.reached.notified().await;
            if delete {
                assert!(policies.delete("p").await.unwrap());
            } else {
                policies.put("p", new).await.unwrap();
            }
            store.go.notify_one();
            let seen = slow.await.unwrap().expect("it existed when read");
            assert!(seen.text.contains("secret/a"), "the slow read saw the old policy");
            let now = policies.get("p").await.unwrap();
            if delete {
                assert!(now.is_none(), "a deleted policy came back");
            } else {
                assert!(now.unwrap().text.contains("secret/b"), "the old policy came back");
            }
        }
    }

    fn acl(text: &str) -> Acl {
        Acl::from_policies([&Policy::parse("p", text).unwrap()])
    }

    /// Two writes of one policy: the first is held after its swap is made, the second
    /// (checked against the first's bytes) finishes meanwhile. The first does not put its
    /// policy into the cache when it resumes: the store's (the second) is what is used.
    /// Before, the first filled the cache after its swap, and the replica enforced the
    /// replaced policy until its next cache sync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_write_does_not_put_back_the_policy_a_later_write_replaced() {
        let broad = "path \"secret/*\" { capabilities = [\"read\"] }";
        let narrow = "path \"secret/app/*\" { capabilities = [\"read\"] }";
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let store = Arc::new(TestStore::holding(sled, PauseAt::Swap, &key("p")));
        let policies = Arc::new(PolicyStore::new(store.clone()));
        store.arm();
        let slow = tokio::spawn({
            let policies = policies.clone();
            async move { policies.put_if("p", broad, None).await }
        });
        store.reached.notified().await;
        let first = policies.raw("p").await.unwrap().expect("the first write's swap is made");
        policies.put_if("p", narrow, Some(&first)).await.unwrap();
        store.go.notify_one();
        slow.await.unwrap().unwrap();
        let now = policies.get("p").await.unwrap().unwrap();
        assert!(now.text.contains("secret/app/"), "the replaced policy is enforced: {}", now.text);
        let acl = policies.acl(&["p".to_owned()]).await.unwrap();
        assert!(!acl.allows("secret/other", Capability::Read));
    }

    /// A path with a leading `/` is the path without it, as in Vault: a deny written so
    /// denies (before, it named a path no request has, and denied nothing), a grant grants.
    #[test]
    fn a_leading_slash_is_dropped_as_vault_does() {
        let acl = acl("path \"secret/*\" { capabilities = [\"read\"] }\n\
             path \"/secret/admin/*\" { capabilities = [\"deny\"] }\n\
             path \"/kv/+/app\" { capabilities = [\"read\"] }");
        assert!(!acl.allows("secret/admin/db", Capability::Read), "the deny applies");
        assert!(acl.allows("secret/app/db", Capability::Read));
        assert!(acl.allows("kv/data/app", Capability::Read), "the grant applies");
        let json = Acl::from_policies([&Policy::parse(
            "p",
            r#"{"path": {"secret/*": {"capabilities": ["read"]}, "/secret/admin/*": {"capabilities": ["deny"]}}}"#,
        )
        .unwrap()]);
        assert!(!json.allows("secret/admin/db", Capability::Read), "the JSON form too");
        assert_eq!(Pattern::parse("/a/b").unwrap(), Pattern::parse("a/b").unwrap());
        // One rule with the other spelling: merged, not ranked apart. A grant written with the
        // `/` does not outrank a deny written without it (nor the other way), in one policy
        // or across two.
        let deny = "path \"secret/admin/*\" { capabilities = [\"deny\"] }";
        let read = "path \"/secret/admin/*\" { capabilities = [\"read\"] }";
        let one = Acl::from_policies([&Policy::parse("p", &format!("{deny}\n{read}")).unwrap()]);
        assert!(!one.allows("secret/admin/db", Capability::Read));
        let (a, b) = (Policy::parse("a", deny).unwrap(), Policy::parse("b", read).unwrap());
        assert!(!Acl::from_policies([&a, &b]).allows("secret/admin/db", Capability::Read));
        let slash_deny = "path \"/secret/admin/*\" { capabilities = [\"deny\"] }";
        let plain_read = "path \"secret/admin/*\" { capabilities = [\"read\"] }";
        let (a, b) = (Policy::parse("a", slash_deny).unwrap(), Policy::parse("b", plain_read).unwrap());
        assert!(!Acl::from_policies([&a, &b]).allows("secret/admin/db", Capability::Read));
        assert!(acl.grants_under("kv/"), "a grant written with the slash counts for the mount listing");
    }

    /// A grant of everything under a prefix: a covering `*` rule, and nothing narrower
    /// that outranks it without the capability.
    #[test]
    fn all_under_a_prefix_needs_a_covering_rule_and_no_narrower_refusal() {
        let p = "sys/policies/grant/";
        let rule = |path: &str, caps: &str| format!("path \"{path}\" {{ capabilities = [{caps}] }}\n");
        let sudo = "\"sudo\"";
        for yes in [
            rule("sys/policies/grant/*", sudo),
            rule("sys/*", sudo),
            rule("*", sudo),
            rule("sys/+/grant/*", sudo),
            rule("sys/policies/grant/*", sudo) + &rule("sys/policies/grant/admin", "\"sudo\", \"read\""),
            rule("sys/policies/grant/*", sudo) + &rule("secret/*", "\"deny\""),
        ] {
            assert!(acl(&yes).grants_all_under(p, Capability::Sudo), "{yes}");
        }
        for no in [
            rule("sys/policies/grant/+", sudo),
            rule("sys/policies/grant/a*", sudo),
            rule("sys/policies/grant/*", "\"read\""),
            rule("sys/policies/grant/*", sudo) + &rule("sys/policies/grant/admin", "\"deny\""),
            rule("sys/policies/grant/*", sudo) + &rule("sys/policies/grant/admin", "\"read\""),
            rule("sys/policies/grant/*", sudo) + &rule("sys/policies/grant/+", "\"read\""),
            rule("sys/policies/grant/*", sudo) + &rule("sys/policies/grant/adm*", "\"read\""),
            rule("sys/*", sudo) + &rule("sys/policies/*", "\"read\""),
            String::new() + &rule("sys/policies/grant/x", sudo),
        ] {
            assert!(!acl(&no).grants_all_under(p, Capability::Sudo), "{no}");
        }
        assert!(Acl::root().grants_all_under(p, Capability::Sudo));
        // Paths of two segments under the prefix: `+` covers none of them.
        let two = "sys/token-attributes/grant/";
        assert!(!acl(&rule("sys/token-attributes/grant/+", sudo)).grants_all_under(two, Capability::Sudo));
        assert!(!acl(&rule("sys/token-attributes/grant/+/*", sudo)).grants_all_under(two, Capability::Sudo));
        assert!(acl(&rule("sys/token-attributes/grant/*", sudo)).grants_all_under(two, Capability::Sudo));
    }

    #[test]
    fn policy_hcl_is_blocks_attributes_strings_and_lists_only() {
        let ok = "# comment\n// another\n/* and a\nblock */\npath \"secret/data/*\" {\n  capabilities = [\"read\", \"list\"]\n}\npath \"a/\\\"q\\\"\" { capabilities = [\"deny\"] }\n";
        Policy::parse("p", ok).unwrap();
        for (bad, says) in [
            ("path \"a\" { capabilities = [\"read\"] }\nx = a/b/(c)", "'/' outside a string"),
            ("x = 1 + 2", "'+' outside a string"),
            ("x = f(1)", "'(' outside a string"),
            ("x = a ? b : c", "'?' outside a string"),
            ("x = <<EOF\nhi\nEOF\n", "'<' outside a string"),
            ("x = \"${a/b}\"", "a template"),
            ("x = \"%{ if a }\"", "a template"),
            ("x = \"open", "unterminated string"),
            ("/* open", "unterminated comment"),
            (&format!("x = {}", "[".repeat(40)), "nested deeper"),
            ("x = [1==1]", "the operator `==`"),
        ] {
            let e = Policy::parse("p", bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        // The documents the fuzz target found (more than 10 s in the HCL parser: chains of
        // `/` and parentheses, then of `==` in a list): refused by the scan, before the
        // parser.
        for (file, says) in [
            ("timeout-efb7fadf4f5bc07ccf3bc394c6af9df3cb8c7892", "outside a string"),
            ("timeout-77e012b142f518a51364c2342e70d2e9ffac7630", "the operator `==`"),
        ] {
            let path = format!("{}/../fuzz/regressions/policy/{file}", env!("CARGO_MANIFEST_DIR"));
            let found = std::fs::read(path).unwrap();
            let e = Policy::parse("p", &String::from_utf8_lossy(&found)).unwrap_err().to_string();
            assert!(e.contains(says), "{file}: {e}");
        }
    }

    #[test]
    fn hcl_with_several_blocks() {
        let a = acl(r#"
            # a comment
            path "secret/db/*" { capabilities = ["read", "list"] }
            path "secret/db/admin" { capabilities = ["deny"] }
            path "secret/+/config" {
              capabilities = ["read", "update"]
            }
            "#);
        assert!(a.allows("secret/db/password", Capability::Read));
        assert!(a.allows("secret/db/nested/deep", Capability::Read));
        assert!(!a.allows("secret/db/password", Capability::Update));
        assert!(!a.allows("secret/db/admin", Capability::Read), "deny on the exact path wins");
        assert!(a.allows("secret/web/config", Capability::Update));
        assert!(!a.allows("secret/web/x/config", Capability::Read), "+ is exactly one segment");
        assert!(!a.allows("secret/other", Capability::Read), "deny by default");
        assert!(!a.allows("secret/db", Capability::Read), "glob needs the slash");
    }

    #[test]
    fn json_form() {
        let a = acl(r#"{"path": {"secret/app": {"capabilities": ["read"]}}}"#);
        assert!(a.allows("secret/app", Capability::Read));
        assert!(!a.allows("secret/app2", Capability::Read));
    }

    #[test]
    fn most_specific_pattern_decides() {
        let a = acl(r#"
            path "secret/*" { capabilities = ["read", "create", "update"] }
            path "secret/ro/*" { capabilities = ["read"] }
            "#);
        assert!(a.allows("secret/x", Capability::Update));
        assert!(!a.allows("secret/ro/x", Capability::Update));
        assert!(a.allows("secret/ro/x", Capability::Read));
    }

    #[test]
    fn policies_merge_and_deny_overrides() {
        let p1 = Policy::parse("a", r#"path "secret/x" { capabilities = ["read"] }"#).unwrap();
        let p2 = Policy::parse("b", r#"path "secret/x" { capabilities = ["update"] }"#).unwrap();
        let p3 = Policy::parse("c", r#"path "secret/x" { capabilities = ["deny"] }"#).unwrap();
        let a = Acl::from_policies([&p1, &p2]);
        assert!(a.allows("secret/x", Capability::Read) && a.allows("secret/x", Capability::Update));
        let a = Acl::from_policies([&p1, &p2, &p3]);
        assert!(!a.allows("secret/x", Capability::Read));
    }

    #[test]
    fn bad_policies_are_refused_with_reasons() {
        for (text, needle) in [
            (r#"path "a/*/b" { capabilities = ["read"] }"#, "only allowed at the end"),
            (r#"path "a" { capabilities = ["fly"] }"#, "unsupported capability"),
            ("path \"a\" {\n  capabilities = [\"read\"]\n  policy = \"x\"\n}", "unknown field"),
            (r#"path "a" { "#, "HCL"),
            (r#"{"path": 3}"#, "JSON"),
            (r#"path "a+b" { capabilities = ["read"] }"#, "whole path segment"),
        ] {
            let err = Policy::parse("p", text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(Policy::parse("bad name", "").is_err());
    }

    #[test]
    fn root_has_everything_but_deny() {
        let a = Acl::root();
        assert!(a.allows("anything/at/all", Capability::Sudo));
        assert!(!a.capabilities("x").contains(Capability::Deny));
    }
}
