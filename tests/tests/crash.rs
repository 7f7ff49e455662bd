//! Durability and confidentiality at rest: acknowledged writes survive `kill -9`; no
//! plaintext reaches the data directory; keys are found again after a restart.

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{DevServer, Reply, files_containing, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_and_plaintext_never_reaches_disk() {
    let tmp = tempfile::Builder::new().prefix("keyvault-crash-").tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = DevServer::start_in(&data, 0);
    let c = s.client();
    let root = s.root_token.clone();
    let marker = |i: usize| format!("durable-plaintext-{i:03}-c41d9e");
    for i in 0..30 {
        let r = c.put(&format!("secret/crash/k{i}"), &root, json!({"value": marker(i)})).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Kill straight after the last acknowledgement: no graceful shutdown, no final flush.
    s.kill9();

    let s2 = DevServer::start_in(&data, 1);
    let c2 = s2.client();
    // The old root token still verifies: the signing key was found by label in the token.
    for i in 0..30 {
        let r = c2.get(&format!("secret/crash/k{i}"), &root).await;
        assert_eq!(r.status, 200, "k{i}: {r:?}");
        assert_eq!(r.body["data"]["value"], marker(i));
    }
    drop(s2);
    for i in 0..30 {
        assert!(files_containing(&data, marker(i).as_bytes()).is_empty(), "plaintext {i} is on disk");
    }
    // The check can see what is on disk: paths are stored in the clear.
    assert!(!files_containing(&data, b"crash/k7").is_empty());
}

/// An AppRole role whose creation is cut short by `kill -9` between its two writes (the
/// role and its role id's index; the test hook aborts the process there) is afterwards
/// either not there, or there with a role id that logs in: never a role whose role id
/// logs nobody in for good. (The role was written first before: it was there and a login
/// with its role id was refused, 401, until the role was deleted.)
#[tokio::test]
async fn a_role_cut_short_by_a_crash_is_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash-now");
    let mut s = TestServer::start(ServerOptions {
        env: vec![("KEYVAULT_TEST_CRASH_APPROLE_WRITE".into(), crash.display().to_string())],
        ..Default::default()
    });
    let root = s.root.clone();
    std::fs::write(&crash, "").unwrap();
    let r = s.client().try_send("POST", "auth/approle/role/web", Some(&root), Some(b"{}".to_vec())).await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status >= 500), "{r:?}");
    assert!(s.child.wait().unwrap().code().is_none(), "the server died of a signal");
    std::fs::remove_file(&crash).unwrap();
    s.restart();
    let c = s.client();
    if c.get("auth/approle/role/web", &root).await.status == 404 {
        ok(c.post("auth/approle/role/web", Some(&root), json!({})).await, 204);
    }
    let role_id = ok(c.get("auth/approle/role/web/role-id", &root).await, 200).body["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id = c.secret_id(&root, "web").await;
    ok(c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": secret_id})).await, 200);
}
