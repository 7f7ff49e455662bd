//! The storage (sled) on a disk that fills up: a 16 MiB tmpfs made by the test holds the
//! data directory. While it is full, writes fail with 503 and change nothing, reads keep
//! working, the audit log (on another disk) records every refusal; once space returns,
//! writes work again without a restart; after `kill -9` every acknowledged write reads
//! back with its value.

use std::time::Duration;

use keyvault_tests::json;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::tmpfs::Tmpfs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_disk_refuses_writes_keeps_reads_and_loses_nothing() {
    let fs = Tmpfs::new("16m");
    let storage = format!("[storage]\ntype = \"sled\"\npath = \"{}\"", fs.path().join("storage").display());
    let mut s = TestServer::start(ServerOptions { storage: Some(storage), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let (path, value) = (format!("secret/before/{i}"), format!("value-{i}"));
        assert_eq!(c.put(&path, &root, json!({"value": value})).await.status, 200);
        acknowledged.push((path, value));
    }

    let filler = fs.fill();
    let mut statuses = std::collections::BTreeMap::new();
    let mut refused = Vec::new();
    for i in 0..200 {
        let (path, value) = (format!("secret/full/{i}"), format!("full-{i}-{}", "x".repeat(4096)));
        let r = c.put(&path, &root, json!({"value": value})).await;
        *statuses.entry(r.status).or_insert(0) += 1;
        match r.status {
            200 => acknowledged.push((path, value)),
            503 => refused.push(path),
            other => panic!("a write on a full disk answered {other}: {r:?}"),
        }
        if statuses.get(&503).copied().unwrap_or(0) >= 10 {
            break;
        }
    }
    assert!(statuses.get(&503).copied().unwrap_or(0) >= 10, "the disk never filled: {statuses:?}");
    // Reads go on (what was acknowledged is served).
    for (path, value) in acknowledged.iter().take(20) {
        let r = c.get(path, &root).await;
        assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some(value.as_str())), "{path}");
    }
    let h = c.send("GET", "sys/health", None, None).await;
    assert_eq!(h.status / 100, 2, "health while the storage disk is full: {h:?}");
    // A refused write is not visible either.
    for path in &refused {
        assert_eq!(c.get(path, &root).await.status, 404, "{path} was refused but is readable");
    }

    // Space returns: writes work again, no restart.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for i in 0..100 {
        let (path, value) = (format!("secret/after/{i}"), format!("after-{i}"));
        let r = c.put(&path, &root, json!({"value": value})).await;
        if r.status == 200 {
            acknowledged.push((path, value));
            recovered = true;
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "writes did not recover once space returned; log:\n{}", {
        let log = s.log_text();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    });

    // Nothing acknowledged was lost, even without a clean shutdown.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s.restart();
    let c = s.client();
    for (path, value) in &acknowledged {
        let r = c.get(path, &root).await;
        assert_eq!((r.status, r.body["data"]["value"].as_str()), (200, Some(value.as_str())), "{path}");
    }
    for path in &refused {
        assert_eq!(c.get(path, &root).await.status, 404, "{path} was refused but is there after the restart");
    }
}

/// Read-and-swap writes (KV version 2's metadata and settings) on a disk that fills up:
/// the secret whose write was refused stays unreadable, the swaps answer 503 promptly,
/// and once space returns the same writes succeed. (The unit test
/// `sled_engine::tests::a_read_and_swap_loop_ends_after_a_failed_flush` covers the case
/// of a key whose failed flush left it shadowed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_on_a_full_disk_is_refused_not_retried_for_good() {
    let fs = Tmpfs::new("16m");
    let storage = format!("[storage]\ntype = \"sled\"\npath = \"{}\"", fs.path().join("storage").display());
    let s = TestServer::start(ServerOptions { storage: Some(storage), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    let filler = fs.fill();
    let mut refused = None;
    for i in 0..200 {
        let path = format!("kv/data/full/{i}");
        let r = c.put(&path, &root, json!({"data": {"value": format!("{i}-{}", "x".repeat(4096))}})).await;
        match r.status {
            200 => {}
            503 => {
                refused = Some(i);
                break;
            }
            other => panic!("a write on a full disk answered {other}: {r:?}"),
        }
    }
    let i = refused.expect("the disk never filled");
    assert_eq!(c.get(&format!("kv/data/full/{i}"), &root).await.status, 404, "refused, yet readable");
    let settings = [
        (format!("kv/metadata/full/{i}"), json!({"max_versions": 3})),
        ("kv/config".to_owned(), json!({"max_versions": 7})),
    ];
    for (path, body) in &settings {
        let r = tokio::time::timeout(Duration::from_secs(20), c.post(path, Some(&root), body.clone()))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer in 20 s"));
        assert_eq!(r.status, 503, "{path}: {r:?}");
    }

    std::fs::remove_file(&filler).unwrap();
    for (path, body) in &settings {
        let mut status = 0;
        for _ in 0..100 {
            status = c.post(path, Some(&root), body.clone()).await.status;
            if status != 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 204, "{path} once space returned");
    }
    assert_eq!(c.get("kv/config", &root).await.body["data"]["max_versions"], 7);
}
