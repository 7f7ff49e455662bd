//! The `Store` conformance suite: every engine runs exactly these checks.
//!
//! Each check uses its own key prefix, so the suite can run on a shared database.

// Test-support code: every call must succeed, and a panic is the failed check.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use super::{Store, TxOp, TxOutcome, scan_all};

/// Run every check against `store`.
pub async fn run_all(store: &dyn Store) {
    get_put_delete(store).await;
    compare_and_swap(store).await;
    scan_prefix_pages_and_bounds(store).await;
    insert_if_absent_with_expiry(store).await;
    renew(store).await;
    purge_expired(store).await;
    invalid_keys(store).await;
    insert_if_absent_many(store).await;
    transactions(store).await;
    get_and_last_under(store).await;
    store.ping().await.expect("ping");
}

/// A key and the last live entry under a prefix. The second part is a prefetch that an
/// engine may leave out (`None`); when it gives it, it must be exactly right.
pub async fn get_and_last_under(s: &dyn Store) {
    let check = |got: super::GetAndLast, value: Option<&[u8]>, last: Option<(&str, &[u8])>| {
        assert_eq!(got.0.as_deref(), value);
        if let Some((k, v)) = &got.1 {
            assert_eq!(Some((k.as_str(), v.as_slice())), last, "a prefetched entry is the last live one of the range");
        }
    };
    let prefix = "c11/d/x\x1f";
    check(s.get_and_last_under("c11/meta", prefix).await.unwrap(), None, None);
    s.put("c11/meta", b"m").await.unwrap();
    check(s.get_and_last_under("c11/meta", prefix).await.unwrap(), Some(b"m"), None);
    s.put("c11/d/x\x1f001", b"a").await.unwrap();
    s.put("c11/d/x\x1f002", b"b").await.unwrap();
    // Around the range: a longer path, the key right after the range, and the prefix
    // of another path that shares the first characters.
    s.put("c11/d/x/y\x1f009", b"other path").await.unwrap();
    s.put("c11/d/x ", b"after the range").await.unwrap();
    s.put("c11/d/xy\x1f009", b"another path").await.unwrap();
    check(s.get_and_last_under("c11/meta", prefix).await.unwrap(), Some(b"m"), Some(("c11/d/x\x1f002", b"b")));
    // An expired entry is not the last one.
    assert!(s.insert_if_absent("c11/d/x\x1f003", b"c", Some(Duration::from_millis(30))).await.unwrap());
    wait_expired(s, "c11/d/x\x1f003").await;
    check(s.get_and_last_under("c11/missing", prefix).await.unwrap(), None, Some(("c11/d/x\x1f002", b"b")));
    // A prefix the range cannot be bounded by is refused.
    assert!(s.get_and_last_under("c11/meta", "c11/d/\u{e9}").await.is_err());
    assert!(s.get_and_last_under("c11/meta", "c11/d/\x7f").await.is_err());
    assert!(s.get_and_last_under("c11/meta", "").await.is_err());
}

/// Concurrency checks need an owned handle to share between tasks.
pub async fn run_concurrent(store: Arc<dyn Store>) {
    concurrent_cas_loses_no_update(store.clone()).await;
    concurrent_insert_if_absent_has_one_winner(store.clone()).await;
    concurrent_delete_has_one_winner(store.clone()).await;
    concurrent_batches_in_opposite_orders_both_finish(store.clone()).await;
    concurrent_counts_meet_a_close(store).await;
}

/// Two batches of insert-if-absent that share keys in opposite orders (two gateway
/// batches carrying the same nonces) both finish, with one winner per key: neither
/// waits on the other's rows for good, nor fails whole.
pub async fn concurrent_batches_in_opposite_orders_both_finish(s: Arc<dyn Store>) {
    for round in 0..20 {
        let keys: Vec<String> = (0..16).map(|i| format!("c12/{round}/{i:02}")).collect();
        let batch = |rev: bool| -> Vec<(String, Vec<u8>, Option<Duration>)> {
            let mut k = keys.clone();
            if rev {
                k.reverse();
            }
            k.into_iter().map(|k| (k, b"n".to_vec(), Some(Duration::from_secs(60)))).collect()
        };
        let (a, b) = (batch(false), batch(true));
        let (sa, sb) = (s.clone(), s.clone());
        let ta = tokio::spawn(async move { sa.insert_if_absent_many(&a).await });
        let tb = tokio::spawn(async move { sb.insert_if_absent_many(&b).await });
        let a = ta.await.unwrap().expect("the first batch finishes");
        let mut b = tb.await.unwrap().expect("the second batch finishes");
        b.reverse();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(x ^ y, "round {round}, key {i}: exactly one batch inserts it ({x}, {y})");
        }
    }
}

pub async fn get_put_delete(s: &dyn Store) {
    assert_eq!(s.get("c1/a").await.unwrap(), None);
    s.put("c1/a", b"one").await.unwrap();
    assert_eq!(s.get("c1/a").await.unwrap().as_deref(), Some(&b"one"[..]));
    s.put("c1/a", b"two").await.unwrap();
    assert_eq!(s.get("c1/a").await.unwrap().as_deref(), Some(&b"two"[..]));
    // Empty and binary values round-trip exactly.
    s.put("c1/empty", b"").await.unwrap();
    assert_eq!(s.get("c1/empty").await.unwrap().as_deref(), Some(&b""[..]));
    let binary: Vec<u8> = (0..=255u8).collect();
    s.put("c1/bin", &binary).await.unwrap();
    assert_eq!(s.get("c1/bin").await.unwrap(), Some(binary));
    assert!(s.delete("c1/a").await.unwrap());
    assert!(!s.delete("c1/a").await.unwrap());
    assert_eq!(s.get("c1/a").await.unwrap(), None);
    // Unicode keys.
    s.put("c1/ключ/密钥", b"u").await.unwrap();
    assert_eq!(s.get("c1/ключ/密钥").await.unwrap().as_deref(), Some(&b"u"[..]));
}

pub async fn compare_and_swap(s: &dyn Store) {
    // Absent -> value.
    assert!(s.compare_and_swap("c2/k", None, Some(b"v1")).await.unwrap());
    // Absent expected but present: refused, value unchanged.
    assert!(!s.compare_and_swap("c2/k", None, Some(b"x")).await.unwrap());
    assert_eq!(s.get("c2/k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    // Wrong expected value: refused.
    assert!(!s.compare_and_swap("c2/k", Some(b"v0"), Some(b"x")).await.unwrap());
    // Right expected value: swapped.
    assert!(s.compare_and_swap("c2/k", Some(b"v1"), Some(b"v2")).await.unwrap());
    assert_eq!(s.get("c2/k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    // Swap to None deletes.
    assert!(s.compare_and_swap("c2/k", Some(b"v2"), None).await.unwrap());
    assert_eq!(s.get("c2/k").await.unwrap(), None);
    // Expecting a value on an absent key: refused.
    assert!(!s.compare_and_swap("c2/k", Some(b"v2"), Some(b"v3")).await.unwrap());
    // An expired entry counts as absent.
    assert!(s.insert_if_absent("c2/exp", b"e", Some(Duration::from_millis(30))).await.unwrap());
    wait_expired(s, "c2/exp").await;
    assert!(s.compare_and_swap("c2/exp", None, Some(b"fresh")).await.unwrap());
    assert_eq!(s.get("c2/exp").await.unwrap().as_deref(), Some(&b"fresh"[..]));
    // A swapped entry keeps its expiry, by compare-and-swap and in a transaction (a
    // limited-use credential whose count went down still lapses, and a purge removes it);
    // one made in place of an expired entry has none.
    for k in ["c2/ttl-cas", "c2/ttl-tx", "c2/ttl-remade"] {
        assert!(s.insert_if_absent(k, b"3", Some(Duration::from_secs(2))).await.unwrap());
    }
    assert!(s.compare_and_swap("c2/ttl-cas", Some(b"3"), Some(b"2")).await.unwrap());
    assert_eq!(s.transact(vec![swap("c2/ttl-tx", "3", Some("2"))]).await.unwrap(), TxOutcome::Committed);
    assert_eq!(s.get("c2/ttl-cas").await.unwrap().as_deref(), Some(&b"2"[..]));
    assert_eq!(s.get("c2/ttl-tx").await.unwrap().as_deref(), Some(&b"2"[..]));
    wait_expired(s, "c2/ttl-remade").await;
    assert!(s.compare_and_swap("c2/ttl-remade", None, Some(b"new")).await.unwrap());
    wait_expired(s, "c2/ttl-cas").await;
    wait_expired(s, "c2/ttl-tx").await;
    assert!(s.purge_expired().await.unwrap() >= 2);
    assert_eq!(s.get("c2/ttl-remade").await.unwrap().as_deref(), Some(&b"new"[..]));
}

fn ins(key: &str, value: &str) -> TxOp {
    TxOp::Insert { key: key.into(), value: value.as_bytes().to_vec() }
}

fn swap(key: &str, expected: &str, new: Option<&str>) -> TxOp {
    TxOp::Swap { key: key.into(), expected: expected.as_bytes().to_vec(), new: new.map(|n| n.as_bytes().to_vec()) }
}

fn count(key: &str, delta: i64) -> TxOp {
    TxOp::Count { key: key.into(), delta }
}

async fn counter(s: &dyn Store, key: &str) -> Option<(i64, bool)> {
    s.counters(key).await.unwrap().into_iter().find(|c| c.key == key).map(|c| (c.value, c.closed))
}

pub async fn transactions(s: &dyn Store) {
    use TxOutcome::*;
    assert_eq!(s.transact_many(Vec::new()).await.unwrap(), Vec::<TxOutcome>::new());
    // A record and its count commit together...
    assert_eq!(s.transact(vec![ins("c10/a", "a1"), count("c10/n/1", 1)]).await.unwrap(), Committed);
    assert_eq!(s.get("c10/a").await.unwrap().as_deref(), Some(&b"a1"[..]));
    assert_eq!(counter(s, "c10/n/1").await, Some((1, false)));
    // ...or neither: a taken key fails the transaction, and its count does not apply.
    assert_eq!(s.transact(vec![count("c10/n/1", 1), ins("c10/a", "x")]).await.unwrap(), Conflict);
    assert_eq!(counter(s, "c10/n/1").await, Some((1, false)));
    assert_eq!(s.get("c10/a").await.unwrap().as_deref(), Some(&b"a1"[..]));
    // Swaps: the expected value, a stale one, a missing key.
    assert_eq!(s.transact(vec![swap("c10/a", "stale", Some("x")), count("c10/n/1", 5)]).await.unwrap(), Conflict);
    assert_eq!(s.transact(vec![swap("c10/none", "x", Some("y"))]).await.unwrap(), Conflict);
    assert_eq!(s.transact(vec![swap("c10/a", "a1", Some("a2")), count("c10/n/2", 1)]).await.unwrap(), Committed);
    assert_eq!(s.get("c10/a").await.unwrap().as_deref(), Some(&b"a2"[..]));
    assert_eq!(s.get("c10/none").await.unwrap(), None);
    // Expired entries are absent: an insert takes their place, a swap does not find them.
    assert!(s.insert_if_absent("c10/exp", b"e1", Some(Duration::from_millis(30))).await.unwrap());
    assert!(s.insert_if_absent("c10/exp2", b"e1", Some(Duration::from_millis(30))).await.unwrap());
    wait_expired(s, "c10/exp").await;
    wait_expired(s, "c10/exp2").await;
    assert_eq!(s.transact(vec![swap("c10/exp2", "e1", Some("e2"))]).await.unwrap(), Conflict);
    assert_eq!(s.transact(vec![ins("c10/exp", "fresh")]).await.unwrap(), Committed);
    assert_eq!(s.get("c10/exp").await.unwrap().as_deref(), Some(&b"fresh"[..]));
    // A closed counter refuses increments (and their transaction), takes decrements.
    s.close_counter("c10/n/1").await.unwrap();
    assert_eq!(s.transact(vec![ins("c10/b", "b1"), count("c10/n/1", 1)]).await.unwrap(), Closed);
    assert_eq!(s.get("c10/b").await.unwrap(), None);
    assert_eq!(s.transact(vec![swap("c10/a", "a2", None), count("c10/n/1", -1)]).await.unwrap(), Committed);
    assert_eq!(s.get("c10/a").await.unwrap(), None);
    assert_eq!(counter(s, "c10/n/1").await, Some((0, true)));
    // Closing a counter that does not exist yet: closed at 0.
    s.close_counter("c10/n/3").await.unwrap();
    assert_eq!(s.transact(vec![count("c10/n/3", 1)]).await.unwrap(), Closed);
    assert_eq!(counter(s, "c10/n/3").await, Some((0, true)));
    let all: Vec<String> = s.counters("c10/n/").await.unwrap().into_iter().map(|c| c.key).collect();
    assert_eq!(all, vec!["c10/n/1", "c10/n/2", "c10/n/3"]);
    // Many at once: each stands on its own.
    s.put("c10/r1", b"old1").await.unwrap();
    s.put("c10/r2", b"old2").await.unwrap();
    s.put("c10/r3", b"old3").await.unwrap();
    // The re-wrap shape: swap, then move a count.
    let rewrap = |k: &str, old: &str| vec![swap(k, old, Some("new")), count("c10/v/1", -1), count("c10/v/2", 1)];
    let out =
        s.transact_many(vec![rewrap("c10/r1", "old1"), rewrap("c10/r2", "stale"), rewrap("c10/r3", "old3")]).await;
    assert_eq!(out.unwrap(), vec![Committed, Conflict, Committed]);
    assert_eq!(counter(s, "c10/v/1").await, Some((-2, false)));
    assert_eq!(counter(s, "c10/v/2").await, Some((2, false)));
    assert_eq!(s.get("c10/r2").await.unwrap().as_deref(), Some(&b"old2"[..]));
    // Mixed shapes.
    let out = s
        .transact_many(vec![
            vec![ins("c10/m1", "x"), count("c10/v/2", 1)],
            vec![ins("c10/m1", "y")],
            vec![ins("c10/m2", "x"), count("c10/n/3", 1)],
            vec![swap("c10/r2", "old2", None)],
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![Committed, Conflict, Closed, Committed]);
    assert_eq!(s.get("c10/m1").await.unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(s.get("c10/m2").await.unwrap(), None);
    assert_eq!(counter(s, "c10/v/2").await, Some((3, false)));
    // An invalid key fails the call.
    assert!(s.transact(vec![ins("", "x")]).await.is_err());
}

/// Writers counting their records race a closer: afterwards the counter equals the
/// records that committed, and no record committed after the counter was closed.
pub async fn concurrent_counts_meet_a_close(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut committed = 0i64;
                for i in 0..25 {
                    let key = format!("c11/rec/{w}/{i}");
                    match s.transact(vec![ins(&key, "v"), count("c11/n", 1)]).await.unwrap() {
                        TxOutcome::Committed => committed += 1,
                        TxOutcome::Closed => assert_eq!(s.get(&key).await.unwrap(), None),
                        TxOutcome::Conflict => panic!("unique keys"),
                    }
                }
                committed
            })
        })
        .collect();
    // Close while the writers are at it: once some have committed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counter(s.as_ref(), "c11/n").await.is_none_or(|(n, _)| n == 0) {
        assert!(std::time::Instant::now() < deadline, "no writer committed");
        tokio::task::yield_now().await;
    }
    s.close_counter("c11/n").await.unwrap();
    let at_close = counter(s.as_ref(), "c11/n").await.unwrap().0;
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let stored = scan_all(s.as_ref(), "c11/rec/").await.unwrap().len() as i64;
    assert_eq!(counter(s.as_ref(), "c11/n").await, Some((total, true)));
    assert_eq!(stored, total);
    assert_eq!(at_close, total, "nothing committed under the counter after it was closed");
}

pub async fn scan_prefix_pages_and_bounds(s: &dyn Store) {
    for i in 0..25u32 {
        s.put(&format!("c3/items/{i:03}"), &i.to_be_bytes()).await.unwrap();
    }
    // Neighbours that must not show up.
    s.put("c3/item", b"no").await.unwrap();
    s.put("c3/items0", b"no").await.unwrap();
    s.put("c3/itemt", b"no").await.unwrap();

    let first = s.scan_prefix("c3/items/", None, 10).await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(first[0].0, "c3/items/000");
    assert_eq!(first[9].0, "c3/items/009");
    assert_eq!(first[3].1, 3u32.to_be_bytes().to_vec());
    let second = s.scan_prefix("c3/items/", Some(&first[9].0), 10).await.unwrap();
    assert_eq!(second[0].0, "c3/items/010");
    let all = scan_all(s, "c3/items/").await.unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "scan is in key order");
    assert!(s.scan_prefix("c3/nothing/", None, 10).await.unwrap().is_empty());
    // `after` before the prefix starts at the prefix.
    assert_eq!(s.scan_prefix("c3/items/", Some("c3/a"), 1).await.unwrap()[0].0, "c3/items/000");
    // Expired entries are skipped.
    assert!(s.insert_if_absent("c3/items/999", b"", Some(Duration::from_millis(20))).await.unwrap());
    wait_expired(s, "c3/items/999").await;
    assert_eq!(scan_all(s, "c3/items/").await.unwrap().len(), 25);
    // Keys compare byte by byte: `after` ending in the largest character skips a whole
    // folder (a listing steps over folders so), and lands before the next name.
    s.put("c3/itemz", b"next").await.unwrap();
    let past = s.scan_prefix("c3/item", Some(&format!("c3/items/{}", char::MAX)), 10).await.unwrap();
    assert_eq!(past.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["c3/items0", "c3/itemt", "c3/itemz"]);
}

/// Wait (up to a few seconds) until the entry under `key` has expired.
async fn wait_expired(s: &dyn Store, key: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.get(key).await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "{key} never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn insert_if_absent_with_expiry(s: &dyn Store) {
    // A live entry (a TTL far longer than anything the check does) blocks the key.
    assert!(s.insert_if_absent("c4/nonce", b"1", Some(Duration::from_secs(60))).await.unwrap());
    assert!(!s.insert_if_absent("c4/nonce", b"2", Some(Duration::from_secs(60))).await.unwrap());
    assert_eq!(s.get("c4/nonce").await.unwrap().as_deref(), Some(&b"1"[..]));
    // An expired one is gone, and frees the key.
    assert!(s.insert_if_absent("c4/short", b"1", Some(Duration::from_millis(50))).await.unwrap());
    wait_expired(s, "c4/short").await;
    assert!(!s.delete("c4/short").await.unwrap(), "deleting an expired entry reports absent");
    assert!(s.insert_if_absent("c4/short", b"3", Some(Duration::from_secs(60))).await.unwrap());
    // Without a TTL the entry is permanent.
    assert!(s.insert_if_absent("c4/perm", b"p", None).await.unwrap());
    assert!(!s.insert_if_absent("c4/perm", b"q", None).await.unwrap());
    // put clears an expiry.
    assert!(s.insert_if_absent("c4/put", b"a", Some(Duration::from_millis(20))).await.unwrap());
    s.put("c4/put", b"b").await.unwrap();
    // (A twin with the same expiry and no put shows when the expiry has passed.)
    assert!(s.insert_if_absent("c4/put-twin", b"a", Some(Duration::from_millis(20))).await.unwrap());
    wait_expired(s, "c4/put-twin").await;
    assert_eq!(s.get("c4/put").await.unwrap().as_deref(), Some(&b"b"[..]));
}

/// A claim renewed by its holder lives on past its first expiry; anyone else's renewal, of
/// an absent or an expired entry, does nothing.
pub async fn renew(s: &dyn Store) {
    assert!(s.insert_if_absent("c11/claim", b"holder", Some(Duration::from_millis(1500))).await.unwrap());
    assert!(!s.renew("c11/claim", b"someone else", Duration::from_secs(60)).await.unwrap());
    assert!(s.renew("c11/claim", b"holder", Duration::from_secs(60)).await.unwrap());
    assert!(s.insert_if_absent("c11/twin", b"holder", Some(Duration::from_millis(1500))).await.unwrap());
    wait_expired(s, "c11/twin").await;
    assert_eq!(s.get("c11/claim").await.unwrap().as_deref(), Some(&b"holder"[..]), "renewed");
    assert!(!s.renew("c11/twin", b"holder", Duration::from_secs(60)).await.unwrap(), "an expired entry");
    assert_eq!(s.get("c11/twin").await.unwrap(), None);
    assert!(!s.renew("c11/absent", b"holder", Duration::from_secs(60)).await.unwrap());
    assert_eq!(s.get("c11/absent").await.unwrap(), None);
    // Renewed to a short time, it runs out then, and frees the key.
    assert!(s.renew("c11/claim", b"holder", Duration::from_millis(50)).await.unwrap());
    wait_expired(s, "c11/claim").await;
    assert!(s.insert_if_absent("c11/claim", b"next", None).await.unwrap());
}

pub async fn purge_expired(s: &dyn Store) {
    for i in 0..5 {
        assert!(s.insert_if_absent(&format!("c5/short/{i}"), b"", Some(Duration::from_millis(10))).await.unwrap());
    }
    assert!(s.insert_if_absent("c5/long", b"", Some(Duration::from_secs(60))).await.unwrap());
    for i in 0..5 {
        wait_expired(s, &format!("c5/short/{i}")).await;
    }
    assert!(s.purge_expired().await.unwrap() >= 5);
    assert!(s.get("c5/long").await.unwrap().is_some());
    assert!(s.scan_prefix("c5/short/", None, 10).await.unwrap().is_empty());
    // A re-inserted key survives the purge of its earlier expiry.
    assert!(s.insert_if_absent("c5/again", b"", Some(Duration::from_millis(10))).await.unwrap());
    wait_expired(s, "c5/again").await;
    assert!(s.insert_if_absent("c5/again", b"2", Some(Duration::from_secs(60))).await.unwrap());
    s.purge_expired().await.unwrap();
    assert_eq!(s.get("c5/again").await.unwrap().as_deref(), Some(&b"2"[..]));
}

pub async fn invalid_keys(s: &dyn Store) {
    assert!(s.put("", b"x").await.is_err());
    assert!(s.put("a\0b", b"x").await.is_err());
    assert!(s.put(&"k".repeat(2000), b"x").await.is_err());
}

pub async fn concurrent_cas_loses_no_update(s: Arc<dyn Store>) {
    s.put("c6/counter", &0u64.to_be_bytes()).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    let cur = s.get("c6/counter").await.unwrap().unwrap();
                    let n = u64::from_be_bytes(cur.as_slice().try_into().unwrap());
                    if s.compare_and_swap("c6/counter", Some(&cur), Some(&(n + 1).to_be_bytes())).await.unwrap() {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get("c6/counter").await.unwrap().unwrap();
    assert_eq!(u64::from_be_bytes(v.as_slice().try_into().unwrap()), 16);
}

pub async fn concurrent_insert_if_absent_has_one_winner(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..50)
        .map(|i: u32| {
            let s = s.clone();
            tokio::spawn(async move {
                s.insert_if_absent("c7/nonce", &i.to_be_bytes(), Some(Duration::from_secs(60))).await.unwrap()
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

pub async fn concurrent_delete_has_one_winner(s: Arc<dyn Store>) {
    s.put("c8/once", b"token").await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.delete("c8/once").await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

pub async fn insert_if_absent_many(s: &dyn Store) {
    assert!(s.insert_if_absent("c9/b", b"taken", None).await.unwrap());
    let items: Vec<(String, Vec<u8>, Option<Duration>)> = ["c9/a", "c9/b", "c9/c", "c9/a"]
        .iter()
        .map(|k| (k.to_string(), b"v".to_vec(), Some(Duration::from_secs(60))))
        .collect();
    assert_eq!(s.insert_if_absent_many(&items).await.unwrap(), vec![true, false, true, false]);
    assert_eq!(s.get("c9/b").await.unwrap().as_deref(), Some(&b"taken"[..]));
    assert!(s.get("c9/c").await.unwrap().is_some());
}
