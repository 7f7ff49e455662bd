//! Retiring a master key version never loses an acknowledged write, and a rotation never
//! wedges: two replicas on PostgreSQL, a write held in flight while the other replica
//! rotates and retires, a hundred rotate-and-retire rounds under concurrent writes with
//! commit delays injected in the database, and damaged records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keyvault_tests::postgres::TestPostgres;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Reply, json};
use tokio::sync::Mutex;

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

struct Cluster {
    pg: TestPostgres,
    url: String,
    a: TestServer,
    b: TestServer,
}

fn cluster(name: &str, extra: &str) -> Cluster {
    let pg = TestPostgres::start();
    let url = pg.database(name);
    let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 8");
    let a = TestServer::start(ServerOptions {
        storage: Some(storage.clone()),
        extra: extra.to_owned(),
        ..Default::default()
    });
    let b = TestServer::start(ServerOptions {
        storage: Some(storage),
        token: Some(a.token.clone()),
        skip_init: true,
        extra: extra.to_owned(),
        ..Default::default()
    });
    Cluster { pg, url, a, b }
}

async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// The master key versions whose objects are in the token.
fn master_objects(s: &TestServer) -> Vec<u32> {
    s.token_keys("keyvault/master/").iter().map(|l| l.rsplit('v').next().unwrap().parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_across_rotate_and_retire_is_never_lost() {
    let cl = cluster("inflight", "");
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    ok(ca.put("secret/other", &root, json!({"value": "o"})).await, 200);
    // The finding: psql holds an insert of the row B's write will need.
    let psql = sql(&cl.url).await;
    psql.batch_execute(
        "BEGIN; INSERT INTO keyvault_kv(key, value) VALUES (E'kv/data/race/x\\x1f00000000000000000001', 'x');",
    )
    .await
    .unwrap();
    // B writes (sealed under v1; its insert waits for the held row).
    let write = {
        let (cb, root) = (cb.clone(), root.clone());
        tokio::spawn(async move { cb.put("secret/race/x", &root, json!({"value": "acknowledged"})).await })
    };
    // Wait until the database shows B's insert waiting for the held row's lock.
    keyvault_tests::postgres::wait_for_a_lock_wait(&psql, "B's write").await;
    assert!(!write.is_finished(), "B's write waits for the held row");
    // A rotates and retires meanwhile.
    ok(ca.post("sys/rotate", Some(&root), json!({})).await, 200);
    keyvault_tests::wait_rotation_idle(&ca, &root).await;
    let r = ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1]));
    assert_eq!(master_objects(&cl.a), vec![2]);
    // The held insert goes away; B's write completes, under v2.
    psql.batch_execute("ROLLBACK").await.unwrap();
    let r = write.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    for c in [&ca, &cb] {
        assert_eq!(ok(c.get("secret/race/x", &root).await, 200).body["data"]["value"], "acknowledged");
    }
    // Nothing is stuck: status is exact and idle, another rotation and retire work.
    let s = keyvault_tests::wait_rotation_idle(&ca, &root).await;
    assert_eq!(s["records_by_version"], json!({"2": 2}));
    assert_eq!(s["records_remaining"], 0);
    ok(cb.post("sys/rotate", Some(&root), json!({})).await, 200);
    keyvault_tests::wait_rotation_idle(&cb, &root).await;
    assert_eq!(ok(cb.post("sys/rotate/retire", Some(&root), json!({})).await, 200).body["data"]["retired"], json!([2]));
    // Right after a retire on one replica, writes on the other work at once (no 503).
    for i in 0..5 {
        ok(ca.put(&format!("secret/after/{i}"), &root, json!({"value": "v"})).await, 200);
    }
    ok(ca.post("sys/rotate", Some(&root), json!({})).await, 200);
    keyvault_tests::wait_rotation_idle(&ca, &root).await;
    ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    for i in 0..5 {
        ok(cb.put(&format!("secret/after/{i}"), &root, json!({"value": "w"})).await, 200);
    }
    assert_eq!(master_objects(&cl.a), vec![4]);
    drop(cl.pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_rotate_and_retire_rounds_under_writes_lose_nothing() {
    // One version per secret: every round re-wraps a few dozen records.
    let cl = cluster("rounds", "[secrets]\nmax_versions = 1\n");
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    // Commit delays: every statement that inserts or updates records (a write, a re-wrap
    // batch) waits up to 5 ms in the database, inside its transaction.
    let psql = sql(&cl.url).await;
    psql.batch_execute(
        "CREATE FUNCTION keyvault_test_delay() RETURNS trigger AS $$
         BEGIN PERFORM pg_sleep(random() * 0.005); RETURN NULL; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER keyvault_test_delay BEFORE INSERT OR UPDATE ON keyvault_kv
         FOR EACH STATEMENT EXECUTE FUNCTION keyvault_test_delay();",
    )
    .await
    .unwrap();
    // Writers on both replicas; every acknowledged value is remembered.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let c = if w % 2 == 0 { ca.clone() } else { cb.clone() };
            let (root, stop, acked, failures) = (root.clone(), stop.clone(), acked.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let path = format!("secret/w{w}/{}", n % 20);
                    let value = format!("w{w}-{n}");
                    match c
                        .try_send("PUT", &path, Some(&root), Some(json!({ "value": value }).to_string().into_bytes()))
                        .await
                    {
                        Ok(r) if r.status == 200 => {
                            acked.lock().await.insert(path, value);
                        }
                        other => failures.lock().await.push(format!("{path}: {other:?}")),
                    }
                }
            })
        })
        .collect();
    for round in 0..100 {
        let (rot, other) = if round % 2 == 0 { (&ca, &cb) } else { (&cb, &ca) };
        ok(rot.post("sys/rotate", Some(&root), json!({})).await, 200);
        keyvault_tests::wait_rotation_idle(rot, &root).await;
        // Retire on either replica; a version still in use (a write that committed just
        // before the rotation closed it, not yet re-wrapped) makes it wait, never lose.
        let mut retired = false;
        for _ in 0..100 {
            let r = other.post("sys/rotate/retire", Some(&root), json!({})).await;
            if r.status == 200 {
                retired = true;
                break;
            }
            assert_eq!(r.status, 409, "round {round}: {r:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(retired, "round {round}: retire never succeeded");
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let failures = failures.lock().await;
    assert!(failures.is_empty(), "{} failed writes, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    let acked = acked.lock().await;
    assert_eq!(acked.len(), 80, "every secret was written");
    for (path, value) in acked.iter() {
        for c in [&ca, &cb] {
            let r = ok(c.get(path, &root).await, 200);
            assert_eq!(r.body["data"]["value"], value.as_str(), "{path}");
        }
    }
    // The counts are exact (a scan of the records agrees) and only the active version is
    // left, in the keyring and in the token.
    let s = keyvault_tests::wait_rotation_idle(&ca, &root).await;
    let active = s["active_version"].as_u64().unwrap();
    assert_eq!(active, 101);
    let rows = psql
        .query("SELECT get_byte(value, 4) * 16777216 + get_byte(value, 5) * 65536 + get_byte(value, 6) * 256 + get_byte(value, 7), count(*) FROM keyvault_kv WHERE key LIKE 'kv/data/%' GROUP BY 1", &[])
        .await
        .unwrap();
    let scanned: BTreeMap<String, i64> =
        rows.iter().map(|r| (r.get::<_, i32>(0).to_string(), r.get::<_, i64>(1))).collect();
    assert_eq!(s["records_by_version"], serde_json::to_value(&scanned).unwrap());
    assert_eq!(scanned.keys().collect::<Vec<_>>(), vec![&active.to_string()]);
    assert_eq!(master_objects(&cl.a), vec![active as u32]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_records_never_wedge_a_rotation() {
    let cl = cluster("damaged", "");
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    for i in 0..20 {
        ok(ca.put(&format!("secret/d/{i}"), &root, json!({"value": format!("v{i}")})).await, 200);
    }
    let psql = sql(&cl.url).await;
    // The finding: one record's version bytes set to 99. Another's ciphertext damaged.
    psql.execute(
        "UPDATE keyvault_kv SET value = overlay(value placing '\\x00000063'::bytea from 5 for 4)
         WHERE key = E'kv/data/d/3\\x1f00000000000000000001'",
        &[],
    )
    .await
    .unwrap();
    psql.execute(
        "UPDATE keyvault_kv SET value = overlay(value placing '\\x00'::bytea from length(value) for 1)
         WHERE key = E'kv/data/d/7\\x1f00000000000000000001'",
        &[],
    )
    .await
    .unwrap();
    ok(ca.post("sys/rotate", Some(&root), json!({})).await, 200);
    let s = keyvault_tests::wait_rotation_idle(&ca, &root).await;
    assert_eq!(s["records_remaining"], 0, "{s}");
    assert_eq!(s["set_aside"], 1, "{s}");
    assert_eq!(s["records_by_version"], json!({"1": 1, "2": 19}), "{s}");
    // The record with the damaged version was repaired; the other is reported.
    assert_eq!(ok(cb.get("secret/d/3", &root).await, 200).body["data"]["value"], "v3");
    ok(cb.get("secret/d/7", &root).await, 500);
    let out = std::process::Command::new(keyvault_tests::keyvault_bin())
        .args(["operator", "rotate", "--report", "--address", &cl.a.addr, "--ca-file"])
        .arg(&cl.a.server_ca_file)
        .env("KEYVAULT_TOKEN", &root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("1 set aside") && report.contains("kv/data/d/7 version 00000000000000000001"), "{report}");
    // v1 is kept for the record set aside; everything else goes on: another rotation.
    let r = ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 409);
    assert!(r.body["errors"][0].as_str().unwrap().contains("set aside"), "{r:?}");
    ok(cb.post("sys/rotate", Some(&root), json!({})).await, 200);
    let s = keyvault_tests::wait_rotation_idle(&cb, &root).await;
    assert_eq!(s["records_by_version"], json!({"1": 1, "3": 19}), "{s}");
    assert_eq!(ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 200).body["data"]["retired"], json!([2]));
    // Deleting the damaged secret version releases v1.
    ok(ca.send("DELETE", "secret/d/7", Some(&root), None).await, 204);
    assert_eq!(ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 200).body["data"]["retired"], json!([1]));
    assert_eq!(master_objects(&cl.a), vec![3]);
}
