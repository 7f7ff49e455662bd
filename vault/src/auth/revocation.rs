//! Revocation: of single tokens (by accessor) and of whole identities (the kill switch).
//!
//! Both live in the store, so every replica sees them. A revoked accessor is kept until
//! the token could no longer be valid anyway; a token whose parent accessor is revoked
//! (the token a bootstrap login issued) is refused with it.
//!
//! An identity revocation never compares clocks. Each identity (a role, a userpass user,
//! a client certificate, a SPIFFE ID) has a *generation*, 0 until it is first revoked;
//! every token carries the generations of its identities at the moment it was issued.
//! Revoking an identity increments its generation in one compare-and-swap, so from then
//! on every token issued before is refused on every replica, whatever their clocks say,
//! and logins are refused until an admin restores the identity. Restoring lifts the
//! login block but keeps the generation: old tokens stay dead. A login that read the old
//! generation just before a revocation issues a token with that old generation, which is
//! refused at its first use.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyvault_api::auth::{REVOCATION_PAGE_MAX, RevocationFeed, RevocationsQuery, RevokedAccessor, RevokedIdentity};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json};
use crate::unix_now;

/// An identity the kill switch can revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A role of any auth method (role names are one namespace).
    Role(String),
    /// A userpass user (normalized name).
    User(String),
    /// A client certificate by SHA-256 fingerprint (64 lower-case hex).
    Certificate(String),
    /// A SPIFFE ID (URI SAN of client certificates).
    Spiffe(String),
}

impl Identity {
    fn key(&self) -> String {
        match self {
            Identity::Role(r) => format!("auth/revoked-identity/role/{r}"),
            Identity::User(u) => format!("auth/revoked-identity/user/{u}"),
            Identity::Certificate(f) => format!("auth/revoked-identity/cert/{f}"),
            Identity::Spiffe(s) => {
                format!("auth/revoked-identity/spiffe/{}", hex::encode(s.as_bytes()))
            }
        }
    }

    /// The name of this kind of identity in a token's generations (`idg` claim).
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Role(_) => "role",
            Identity::User(_) => "user",
            Identity::Certificate(_) => "cert",
            Identity::Spiffe(_) => "spiffe",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Identity::Role(r) => format!("role {r}"),
            Identity::User(u) => format!("user {u}"),
            Identity::Certificate(f) => format!("certificate {f}"),
            Identity::Spiffe(s) => format!("SPIFFE ID {s}"),
        }
    }
}

fn first_generation() -> u64 {
    // Records written before generations existed meant "revoked once".
    1
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoked {
    #[serde(default = "first_generation")]
    generation: u64,
    /// When, by the revoking replica's clock: for people, never compared with anything.
    revoked_at: u64,
    by: String,
    /// Lifted by an admin: logins work again, but tokens of earlier generations stay
    /// revoked (restoring an identity never resurrects its old tokens).
    #[serde(default)]
    restored: bool,
}

/// The revocation state of one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentityState {
    /// Tokens carrying an older generation are refused.
    pub generation: u64,
    /// Logins and direct requests are refused.
    pub blocks_logins: bool,
}

/// The generations of a token's identities, by [`Identity::kind`] (absent: 0).
pub use crate::token::Generations;

#[derive(Debug)]
pub struct Revocations {
    store: Arc<dyn Store>,
}

const ACCESSOR_PREFIX: &str = "auth/token/revoked/";
const IDENTITY_PREFIX: &str = "auth/revoked-identity/";

/// The time index of revoked accessors (see [`Revocations::revoke_accessor`]).
const BY_TIME_PREFIX: &str = "auth/token/revoked-at/";

fn accessor_key(accessor: &str) -> String {
    format!("{ACCESSOR_PREFIX}{accessor}")
}

fn by_time_key(at: u64, accessor: &str) -> String {
    format!("{BY_TIME_PREFIX}{at:020}/{accessor}")
}

/// Where a page of the feed starts: the records after a stored key (without its
/// prefix), opaque to clients (base64url of `a:` or `i:` and the key).
enum Cursor {
    Start,
    Accessors(String),
    Identities(String),
}

impl Cursor {
    fn encode(&self) -> String {
        let raw = match self {
            Cursor::Start => String::new(),
            Cursor::Accessors(k) => format!("a:{k}"),
            Cursor::Identities(k) => format!("i:{k}"),
        };
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn parse(text: &str) -> Option<Cursor> {
        if text.len() > 2048 {
            return None;
        }
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
        match raw.split_once(':')? {
            ("a", k) => Some(Cursor::Accessors(k.to_owned())),
            ("i", k) => Some(Cursor::Identities(k.to_owned())),
            _ => None,
        }
    }
}

/// A page without a `limit` must be the whole feed.
fn finish(feed: RevocationFeed, unpaged: bool) -> Result<RevocationFeed> {
    if unpaged && feed.next.is_some() {
        return Err(Error::invalid(format!(
            "the revocation feed holds more than {REVOCATION_PAGE_MAX} records: read it in pages (`limit` and `after`)"
        )));
    }
    Ok(feed)
}

/// A revoked accessor's record (empty in records of before the revocation feed).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RevokedToken {
    revoked_at: u64,
    until: u64,
}

impl Revocations {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Revocations { store }
    }

    /// Revoke the token(s) with this accessor, and those issued from it, until `until`
    /// (unix seconds) has passed.
    ///
    /// The record is indexed by time (`auth/token/revoked-at/<time>/<accessor>`, the same
    /// lifetime) so that a feed poll reads only what is new. The index entry is written
    /// first: a crash between the two leaves an entry the feed skips (it lists only
    /// accessors whose record exists), never a revocation the feed misses.
    pub async fn revoke_accessor(&self, accessor: &str, until: u64) -> Result<()> {
        let now = unix_now();
        let ttl = Duration::from_secs(until.saturating_sub(now).saturating_add(60));
        let record = encode_json(&RevokedToken { revoked_at: now, until });
        self.store.insert_if_absent(&by_time_key(now, accessor), &record, Some(ttl)).await?;
        self.store.insert_if_absent(&accessor_key(accessor), &record, Some(ttl)).await?;
        Ok(())
    }

    /// One page of what was revoked at or after `since` and still matters: the feed of
    /// gateways that verify tokens offline (`GET /v1/auth/revocations`). Expired accessor
    /// records are gone from the store already; identity revocations are listed whatever
    /// their age when `since` is 0 (a token of any age carries its generations).
    ///
    /// A page reads at most `limit` stored records (accessors first, then identities) and
    /// names the next page in `next`. Without a `limit` the whole feed is one page, if it
    /// is at most [`REVOCATION_PAGE_MAX`] records: a client that does not page is refused
    /// rather than given part of the feed.
    pub async fn feed(&self, q: &RevocationsQuery) -> Result<RevocationFeed> {
        let now = unix_now();
        let since = q.since;
        let limit = q.limit.unwrap_or(REVOCATION_PAGE_MAX);
        if !(1..=REVOCATION_PAGE_MAX).contains(&limit) {
            return Err(Error::invalid(format!("limit must be between 1 and {REVOCATION_PAGE_MAX}")));
        }
        let mut budget = limit as usize;
        let cursor = match &q.after {
            None => Cursor::Start,
            Some(a) => Cursor::parse(a).ok_or_else(|| Error::invalid("after is not a cursor of this feed"))?,
        };
        let mut feed = RevocationFeed { now, ..RevocationFeed::default() };
        // A poll (`since` > 0) reads the time index from `since` on; the first read
        // (`since` 0) reads every record, which also lists records older than the index.
        let accessors_from = if since == 0 { ACCESSOR_PREFIX } else { BY_TIME_PREFIX };
        if !matches!(cursor, Cursor::Identities(_)) {
            let after = match &cursor {
                Cursor::Accessors(k) => Some(format!("{accessors_from}{k}")),
                _ if since > 0 => Some(format!("{BY_TIME_PREFIX}{since:020}")),
                _ => None,
            };
            let page = self.scan(accessors_from, after.as_deref(), budget).await?;
            let full = page.len() == budget;
            budget -= page.len();
            let last = page.last().map(|(k, _)| k[accessors_from.len()..].to_owned());
            for (key, raw) in page {
                let listed =
                    if since == 0 { self.listed_record(&key, &raw)? } else { self.listed_by_time(&key, since).await? };
                feed.accessors.extend(listed);
            }
            if let (true, Some(last)) = (full, last) {
                feed.next = Some(Cursor::Accessors(last).encode());
                return finish(feed, q.limit.is_none());
            }
        }
        let after = match &cursor {
            Cursor::Identities(k) => Some(format!("{IDENTITY_PREFIX}{k}")),
            _ => None,
        };
        let page = self.scan(IDENTITY_PREFIX, after.as_deref(), budget).await?;
        if page.len() == budget {
            feed.next = page.last().map(|(k, _)| Cursor::Identities(k[IDENTITY_PREFIX.len()..].to_owned()).encode());
        }
        for (key, raw) in page {
            let Some((kind, id)) = key.strip_prefix(IDENTITY_PREFIX).and_then(|r| r.split_once('/')) else { continue };
            let r: Revoked = decode_json(&key, &raw)?;
            if r.revoked_at < since {
                continue;
            }
            let id = match kind {
                "spiffe" => String::from_utf8(hex::decode(id).unwrap_or_default()).unwrap_or_default(),
                _ => id.to_owned(),
            };
            feed.identities.push(RevokedIdentity {
                kind: kind.to_owned(),
                id,
                generation: r.generation,
                revoked_at: r.revoked_at,
            });
        }
        finish(feed, q.limit.is_none())
    }

    async fn scan(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        if let Some(a) = after {
            crate::store::check_key(a).map_err(|_| Error::invalid("after is not a cursor of this feed"))?;
        }
        Ok(self.store.scan_prefix(prefix, after, limit).await?)
    }

    /// A record under `auth/token/revoked/` (a first read lists them all).
    fn listed_record(&self, key: &str, raw: &[u8]) -> Result<Option<RevokedAccessor>> {
        let Some(accessor) = key.strip_prefix(ACCESSOR_PREFIX) else { return Ok(None) };
        // Records of before this feed existed are empty: time unknown, always listed.
        let r: RevokedToken = if raw.is_empty() { RevokedToken::default() } else { decode_json(key, raw)? };
        Ok(Some(RevokedAccessor { accessor: accessor.to_owned(), revoked_at: r.revoked_at, until: r.until }))
    }

    /// An entry of the time index, listed if its accessor's record exists (the index entry
    /// is written first; a crash may leave one alone).
    async fn listed_by_time(&self, key: &str, since: u64) -> Result<Option<RevokedAccessor>> {
        let Some((at, accessor)) = key.strip_prefix(BY_TIME_PREFIX).and_then(|r| r.split_once('/')) else {
            return Ok(None);
        };
        if at.parse::<u64>().map_or(true, |at| at < since) {
            return Ok(None);
        }
        let main = accessor_key(accessor);
        match self.store.get(&main).await? {
            Some(raw) => self.listed_record(&main, &raw),
            None => Ok(None),
        }
    }

    pub async fn accessor_revoked(&self, accessor: &str) -> Result<bool> {
        Ok(self.store.get(&accessor_key(accessor)).await?.is_some())
    }

    /// The kill switch: one compare-and-swap, effective for every replica at once.
    /// Returns the identity's new generation.
    pub async fn revoke_identity(&self, identity: &Identity, by: &str) -> Result<u64> {
        let key = identity.key();
        loop {
            let raw = self.store.get(&key).await?;
            let generation = match &raw {
                Some(r) => decode_json::<Revoked>(&key, r)?.generation,
                None => 0,
            }
            .checked_add(1)
            .ok_or_else(|| Error::Internal("identity generation overflow".into()))?;
            let record = Revoked { generation, revoked_at: unix_now(), by: by.to_owned(), restored: false };
            if self.store.compare_and_swap(&key, raw.as_deref(), Some(&encode_json(&record))).await? {
                return Ok(generation);
            }
        }
    }

    /// Lift an identity revocation: logins work again; tokens of earlier generations stay
    /// revoked. Returns whether the identity was revoked.
    pub async fn restore_identity(&self, identity: &Identity) -> Result<bool> {
        let key = identity.key();
        loop {
            let Some(raw) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let mut record: Revoked = decode_json(&key, &raw)?;
            if record.restored {
                return Ok(false);
            }
            record.restored = true;
            if self.store.compare_and_swap(&key, Some(&raw), Some(&encode_json(&record))).await? {
                return Ok(true);
            }
        }
    }

    /// The revocation state of `identity` (generation 0 and no block if never revoked).
    pub async fn identity_state(&self, identity: &Identity) -> Result<IdentityState> {
        let key = identity.key();
        match self.store.get(&key).await? {
            Some(raw) => {
                let r: Revoked = decode_json(&key, &raw)?;
                Ok(IdentityState { generation: r.generation, blocks_logins: !r.restored })
            }
            None => Ok(IdentityState::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn sled() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        (Arc::new(crate::store::SledStore::open(dir.path()).expect("sled")), dir)
    }

    fn query(since: u64, after: Option<String>, limit: Option<u32>) -> RevocationsQuery {
        RevocationsQuery { since, after, limit }
    }

    /// Every page of the feed from `since`, with `limit` records per page; each page's
    /// size is checked against the limit.
    async fn all_pages(r: &Revocations, since: u64, limit: u32) -> (BTreeSet<String>, BTreeSet<String>, usize) {
        let (mut accessors, mut identities, mut pages) = (BTreeSet::new(), BTreeSet::new(), 0);
        let mut after = None;
        loop {
            let page = r.feed(&query(since, after.take(), Some(limit))).await.expect("a page");
            pages += 1;
            assert!(page.accessors.len() + page.identities.len() <= limit as usize, "a page holds at most its limit");
            for a in page.accessors {
                assert!(accessors.insert(a.accessor), "no accessor is listed twice");
            }
            for i in page.identities {
                assert!(identities.insert(format!("{}/{}", i.kind, i.id)), "no identity is listed twice");
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return (accessors, identities, pages),
            }
        }
    }

    /// The feed comes in pages of at most `limit` stored records, accessors then
    /// identities, each listed once; a reader that does not page is refused when the feed
    /// is longer than one page can be, never given part of it; bad cursors and limits are
    /// refused.
    #[tokio::test]
    async fn the_feed_is_read_in_bounded_pages_and_never_cut_short() {
        let (store, _dir) = sled();
        let r = Revocations::new(store.clone());
        let until = unix_now() + 3600;
        for i in 0..2500 {
            r.revoke_accessor(&format!("acc-{i:05}"), until).await.unwrap();
        }
        for name in ["alpha", "beta", "gamma"] {
            r.revoke_identity(&Identity::Role(name.into()), "test").await.unwrap();
        }
        r.revoke_identity(&Identity::Spiffe("spiffe://example.org/a b".into()), "test").await.unwrap();
        let (accessors, identities, pages) = all_pages(&r, 0, 1000).await;
        assert_eq!(accessors.len(), 2500);
        assert_eq!(
            identities.into_iter().collect::<Vec<_>>(),
            ["role/alpha", "role/beta", "role/gamma", "spiffe/spiffe://example.org/a b"]
        );
        assert_eq!(pages, 3, "2,504 records in pages of 1,000");
        // A page boundary between the accessors and the identities, and pages of one.
        let (accessors, identities, _) = all_pages(&r, 0, 2500).await;
        assert_eq!((accessors.len(), identities.len()), (2500, 4));
        let (accessors, identities, pages) = all_pages(&r, 0, 1).await;
        assert_eq!((accessors.len(), identities.len(), pages), (2500, 4, 2505));
        // Polls (`since` > 0) read the time index the same way.
        let (accessors, identities, _) = all_pages(&r, 1, 700).await;
        assert_eq!((accessors.len(), identities.len()), (2500, 4));

        // Unpaged: the whole feed while it fits one page.
        let whole = r.feed(&query(0, None, None)).await.unwrap();
        assert_eq!((whole.accessors.len(), whole.identities.len(), whole.next), (2500, 4, None));
        for i in 2500..=(REVOCATION_PAGE_MAX as usize) {
            r.revoke_accessor(&format!("acc-{i:05}"), until).await.unwrap();
        }
        for since in [0, 1] {
            match r.feed(&query(since, None, None)).await {
                Err(Error::InvalidRequest(m)) => assert!(m.contains("pages"), "{m}"),
                other => panic!("an unpaged read of a long feed is refused, not cut short: {other:?}"),
            }
        }
        let (accessors, _, _) = all_pages(&r, 0, REVOCATION_PAGE_MAX).await;
        assert_eq!(accessors.len(), REVOCATION_PAGE_MAX as usize + 1);

        let cursor = |raw: &str| Some(URL_SAFE_NO_PAD.encode(raw));
        for (after, limit) in [
            (None, Some(0)),
            (None, Some(REVOCATION_PAGE_MAX + 1)),
            (Some("not base64!".to_owned()), Some(10)),
            (cursor("x:acc-1"), Some(10)),
            (cursor("no colon"), Some(10)),
            (cursor("a:with\0nul"), Some(10)),
            (Some("A".repeat(4096)), Some(10)),
        ] {
            match r.feed(&query(0, after.clone(), limit)).await {
                Err(Error::InvalidRequest(_)) => {}
                other => panic!("{after:?} {limit:?}: {other:?}"),
            }
        }
    }

    /// A poll reads only what was revoked since: a page of 10 after 3,000 older
    /// revocations holds the new ones and ends the feed. An index entry whose record was
    /// never written (a crash between the two writes) is not listed.
    #[tokio::test]
    async fn a_poll_reads_the_time_index_from_since() {
        let (store, _dir) = sled();
        let r = Revocations::new(store.clone());
        let now = unix_now();
        let until = now + 3600;
        let old = encode_json(&RevokedToken { revoked_at: now - 1000, until });
        for i in 0..3000 {
            let accessor = format!("old-{i:05}");
            store.insert_if_absent(&by_time_key(now - 1000, &accessor), &old, None).await.unwrap();
            store.insert_if_absent(&accessor_key(&accessor), &old, None).await.unwrap();
        }
        store.insert_if_absent(&by_time_key(now, "crashed"), &old, None).await.unwrap();
        r.revoke_accessor("new-1", until).await.unwrap();
        r.revoke_accessor("new-2", until).await.unwrap();
        let page = r.feed(&query(now - 10, None, Some(10))).await.unwrap();
        let listed: Vec<&str> = page.accessors.iter().map(|a| a.accessor.as_str()).collect();
        assert_eq!(listed, ["new-1", "new-2"]);
        assert_eq!(page.next, None);
        assert!(!r.accessor_revoked("crashed").await.unwrap());
        // From the start, everything with a record (the crashed entry has none).
        let (accessors, _, _) = all_pages(&r, 0, 1000).await;
        assert_eq!(accessors.len(), 3002);
        assert!(!accessors.contains("crashed"));
    }
}
