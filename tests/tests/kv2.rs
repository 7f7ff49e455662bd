//! The KV version 2 engine at `kv/`: versions, check-and-set, soft delete, undelete,
//! destroy, settings and custom metadata, merge-patch, subkeys; kept apart from the
//! version 1 store at `secret/` (which refuses version-2-shaped writes), and re-wrapped by
//! a master key rotation like every other record.

use std::time::Duration;

use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

#[tokio::test]
async fn versions_check_and_set_and_deletion_follow_vaults_kv_version_2() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let w = ok(
        c.put("kv/data/db", &root, json!({"data": {"password": "p1", "user": "u"}, "options": {"cas": 0}})).await,
        200,
    );
    assert_eq!(w.body["data"]["version"], 1);
    // cas 0 on an existing secret, or a stale version: 409, nothing written.
    ok(c.put("kv/data/db", &root, json!({"data": {"password": "x"}, "options": {"cas": 0}})).await, 409);
    ok(c.put("kv/data/db", &root, json!({"data": {"password": "p2"}, "options": {"cas": 1}})).await, 200);
    ok(c.put("kv/data/db", &root, json!({"data": {"password": "x"}, "options": {"cas": 1}})).await, 409);
    let r = ok(c.get("kv/data/db", &root).await, 200);
    assert_eq!(r.body["data"]["data"], json!({"password": "p2"}));
    assert_eq!(r.body["data"]["metadata"]["version"], 2);
    assert_eq!(ok(c.get("kv/data/db?version=1", &root).await, 200).body["data"]["data"]["password"], "p1");

    // Merge patch: a new version from the current one.
    let p = c
        .send(
            "PATCH",
            "kv/data/db",
            Some(&root),
            Some(json!({"data": {"user": "u2", "password": null}}).to_string().into_bytes()),
        )
        .await;
    assert_eq!(ok(p, 200).body["data"]["version"], 3);
    assert_eq!(ok(c.get("kv/data/db", &root).await, 200).body["data"]["data"], json!({"user": "u2"}));
    let sk = ok(c.get("kv/subkeys/db?version=1", &root).await, 200);
    assert_eq!(sk.body["data"]["subkeys"], json!({"password": null, "user": null}));

    // Soft delete keeps the version for undelete; destroy does not.
    ok(c.send("DELETE", "kv/data/db", Some(&root), None).await, 204);
    let r = ok(c.get("kv/data/db", &root).await, 404);
    assert!(r.body["data"]["metadata"]["deletion_time"].as_str().is_some_and(|t| !t.is_empty()), "{r:?}");
    ok(c.post("kv/undelete/db", Some(&root), json!({"versions": ["3"]})).await, 204);
    ok(c.get("kv/data/db", &root).await, 200);
    ok(c.post("kv/destroy/db", Some(&root), json!({"versions": [1]})).await, 204);
    ok(c.get("kv/data/db?version=1", &root).await, 404);
    ok(c.post("kv/undelete/db", Some(&root), json!({"versions": [1]})).await, 204);
    ok(c.get("kv/data/db?version=1", &root).await, 404);
    let m = ok(c.get("kv/metadata/db", &root).await, 200);
    assert_eq!(m.body["data"]["versions"]["1"]["destroyed"], true);
    assert_eq!(m.body["data"]["current_version"], 3);

    // Settings: max_versions prunes, cas_required requires cas, custom metadata shows.
    ok(
        c.post(
            "kv/metadata/db",
            Some(&root),
            json!({"max_versions": 2, "cas_required": true, "custom_metadata": {"owner": "payments"}}),
        )
        .await,
        204,
    );
    ok(c.put("kv/data/db", &root, json!({"data": {"a": "1"}})).await, 400);
    ok(c.put("kv/data/db", &root, json!({"data": {"a": "1"}, "options": {"cas": 3}})).await, 200);
    // A patch too (before, it took the version it read as its check-and-set, and so
    // never needed one): without `cas` 400, with another version's 409, with this one's 200.
    let patch =
        |body: serde_json::Value| c.send("PATCH", "kv/data/db", Some(&root), Some(body.to_string().into_bytes()));
    ok(patch(json!({"data": {"b": "2"}})).await, 400);
    ok(patch(json!({"data": {"b": "2"}, "options": {"cas": 3}})).await, 409);
    ok(patch(json!({"data": {"b": "2"}, "options": {"cas": 4}})).await, 200);
    let r = ok(c.get("kv/data/db", &root).await, 200);
    assert_eq!(r.body["data"]["data"], json!({"a": "1", "b": "2"}));
    ok(c.put("kv/data/db", &root, json!({"data": {"a": "1"}, "options": {"cas": 5}})).await, 200);
    let m = ok(c.get("kv/metadata/db", &root).await, 200);
    let versions: Vec<&String> = m.body["data"]["versions"].as_object().unwrap().keys().collect();
    assert_eq!(versions, vec!["5", "6"], "pruned to two");
    assert_eq!(m.body["data"]["custom_metadata"], json!({"owner": "payments"}));
    // Listing and deleting everything.
    ok(c.put("kv/data/dir/a", &root, json!({"data": {"x": "1"}})).await, 200);
    let l = ok(c.send("LIST", "kv/metadata", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["db", "dir/"]));
    ok(c.send("DELETE", "kv/metadata/db", Some(&root), None).await, 204);
    ok(c.get("kv/metadata/db", &root).await, 404);
}

#[tokio::test]
async fn engine_settings_round_trip_and_custom_metadata_there_is_a_warning() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("kv/config", Some(&root), json!({"max_versions": 3, "delete_version_after": "1h"})).await, 204);
    let r = ok(c.get("kv/config", &root).await, 200);
    assert_eq!(r.body["data"], json!({"cas_required": false, "delete_version_after": "1h0m0s", "max_versions": 3}));
    // Custom metadata is a secret's, not the engine's: the rest of the write applies and
    // the field comes back as ignored, as Vault answers.
    let r = ok(
        c.post("kv/config", Some(&root), json!({"cas_required": true, "custom_metadata": {"owner": "payments"}})).await,
        200,
    );
    assert_eq!(r.body["warnings"], json!(["Endpoint ignored these unrecognized parameters: [custom_metadata]"]));
    let r = ok(c.get("kv/config", &root).await, 200);
    assert_eq!(r.body["data"], json!({"cas_required": true, "delete_version_after": "1h0m0s", "max_versions": 3}));
    // Wrong types and unreadable durations are 400 and change nothing.
    ok(c.post("kv/config", Some(&root), json!({"max_versions": "many"})).await, 400);
    // At most 1,000 versions kept, for the engine and for a secret (every write rewrites
    // the list of them all).
    ok(c.post("kv/config", Some(&root), json!({"max_versions": 1001})).await, 400);
    ok(c.post("kv/config", Some(&root), json!({"max_versions": u64::MAX})).await, 400);
    ok(c.post("kv/metadata/capped", Some(&root), json!({"max_versions": 1001})).await, 400);
    ok(c.get("kv/metadata/capped", &root).await, 404);
    ok(c.post("kv/metadata/capped", Some(&root), json!({"max_versions": 1000})).await, 204);
    ok(c.post("kv/config", Some(&root), json!({"delete_version_after": "soon"})).await, 400);
    ok(c.send("POST", "kv/config", Some(&root), Some(b"{\"max_versions\": 5".to_vec())).await, 400);
    let r = ok(c.get("kv/config", &root).await, 200);
    assert_eq!(r.body["data"], json!({"cas_required": true, "delete_version_after": "1h0m0s", "max_versions": 3}));
    // 16 writes at once, each of one setting: every one of them holds (none is lost to
    // a write of another setting that read the settings before it).
    let writes = (0..16).map(|i| {
        let c = s.client();
        let root = root.clone();
        async move {
            let body = match i % 2 {
                0 => json!({"max_versions": 7}),
                _ => json!({"cas_required": false, "delete_version_after": "2h"}),
            };
            c.post("kv/config", Some(&root), body).await.status
        }
    });
    assert!(futures_util::future::join_all(writes).await.iter().all(|st| *st == 204));
    let r = ok(c.get("kv/config", &root).await, 200);
    assert_eq!(r.body["data"], json!({"cas_required": false, "delete_version_after": "2h0m0s", "max_versions": 7}));
    // A secret's own settings still take custom metadata.
    ok(c.put("kv/data/app", &root, json!({"data": {"a": "1"}, "options": {"cas": 0}})).await, 200);
    ok(c.post("kv/metadata/app", Some(&root), json!({"custom_metadata": {"owner": "payments"}})).await, 204);
    let m = ok(c.get("kv/metadata/app", &root).await, 200);
    assert_eq!(m.body["data"]["custom_metadata"], json!({"owner": "payments"}));
    assert_eq!(m.body["data"]["max_versions"], 0, "the secret's own setting; the engine's applies");
}

#[tokio::test]
async fn version_1_and_version_2_never_meet() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("kv/data/shared", &root, json!({"data": {"v": "two"}})).await, 200);
    ok(c.put("secret/shared", &root, json!({"v": "one"})).await, 200);
    assert_eq!(ok(c.get("secret/shared", &root).await, 200).body["data"]["v"], "one");
    assert_eq!(ok(c.get("kv/data/shared", &root).await, 200).body["data"]["data"]["v"], "two");
    // The version 2 store's namespace is no folder of version 1.
    let l = ok(c.send("LIST", "secret", Some(&root), None).await, 200);
    assert_eq!(l.body["data"]["keys"], json!(["shared"]));
    // A version-2-shaped write on the version 1 mount: a clear 400, nothing stored.
    let r = ok(c.put("secret/data/x", &root, json!({"data": {"password": "p"}})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("KV version 2 mounts: kv/"), "{r:?}");
    ok(c.get("secret/data/x", &root).await, 404);
    // The CLI learns each mount's version from sys/internal/ui/mounts.
    let m = ok(c.get("sys/internal/ui/mounts/kv/x", &root).await, 200);
    assert_eq!(
        (m.body["data"]["path"].as_str(), m.body["data"]["options"]["version"].as_str()),
        (Some("kv/"), Some("2"))
    );
    let m = ok(c.get("sys/internal/ui/mounts/secret/x", &root).await, 200);
    assert_eq!(m.body["data"]["options"]["version"], "1");
}

#[tokio::test]
async fn a_rotation_rewraps_version_2_records_and_retires_the_old_key() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    for i in 0..20 {
        ok(c.put(&format!("kv/data/r{i}"), &root, json!({"data": {"n": i.to_string()}})).await, 200);
    }
    ok(c.put("secret/r", &root, json!({"n": "v1"})).await, 200);
    ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
    // Wait for the background re-wrap to finish (polled, under a deadline).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = ok(c.get("sys/rotate/status", &root).await, 200);
        if st.body["data"]["state"] == "idle" && st.body["data"]["versions_in_use"] == json!([2]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the rotation re-wraps every record: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1]));
    for i in 0..20 {
        let r = ok(c.get(&format!("kv/data/r{i}"), &root).await, 200);
        assert_eq!(r.body["data"]["data"]["n"], i.to_string());
    }
}

/// The mount's `delete_version_after` applies to every secret, the shorter of it and the
/// secret's own when both are set (as in Vault): past it a version reads as deleted (404
/// with its metadata), and patch and subkeys find nothing. Before, only the secret's own
/// setting was applied, while the metadata showed the mount's.
#[tokio::test]
async fn the_mounts_delete_version_after_deletes_versions() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.put("kv/data/plain", &root, json!({"data": {"a": "1"}})).await, 200);
    ok(c.put("kv/data/own", &root, json!({"data": {"a": "1"}})).await, 200);
    ok(c.post("kv/metadata/own", Some(&root), json!({"delete_version_after": "1h"})).await, 204);
    ok(c.put("kv/data/kept", &root, json!({"data": {"a": "1"}})).await, 200);
    ok(c.post("kv/config", Some(&root), json!({"delete_version_after": "1s"})).await, 204);
    let m = ok(c.get("kv/metadata/own", &root).await, 200);
    assert_eq!(m.body["data"]["delete_version_after"], "1s", "the shorter applies");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for path in ["plain", "own"] {
        let r = ok(c.get(&format!("kv/data/{path}"), &root).await, 404);
        assert_eq!(r.body["data"]["metadata"]["version"], 1, "{path}: {r:?}");
        assert!(r.body["data"]["data"].is_null(), "{path}");
        ok(c.get(&format!("kv/subkeys/{path}"), &root).await, 404);
        let patch =
            c.send("PATCH", &format!("kv/data/{path}"), Some(&root), Some(br#"{"data": {"b": "2"}}"#.to_vec())).await;
        assert_eq!(patch.status, 404, "{path}: {patch:?}");
    }
    // Off again (0): versions are served.
    ok(c.post("kv/config", Some(&root), json!({"delete_version_after": "0s"})).await, 204);
    let r = ok(c.get("kv/data/kept", &root).await, 200);
    assert_eq!(r.body["data"]["data"]["a"], "1");
}
