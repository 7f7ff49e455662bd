//! The PostgreSQL engine against a real PostgreSQL server started by the test, and two
//! KeyVault replicas sharing it and one SoftHSM token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyvault::store::{PostgresOptions, PostgresStore, Store};
use keyvault_tests::postgres::TestPostgres;
use keyvault_tests::server::{Cluster, ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json, metric_sum};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn options(url: String) -> PostgresOptions {
    PostgresOptions { url, password: None, tls_ca_file: None, pool_size: 8 }
}

/// A scan of a prefix with few keys reads only those, under the generic plan a prepared
/// statement ends up with: 5,000 keys after the prefix are not read (before, the index
/// scan had no end and read every key after the prefix, values included).
async fn scans_read_only_their_prefix(pg: &TestPostgres) {
    let url = pg.database("scans");
    let store = PostgresStore::open(&options(url)).await.unwrap();
    store.put("aa/x", b"x").await.unwrap();
    for i in 0..5000 {
        store.put(&format!("zz/{i:05}"), b"after the prefix").await.unwrap();
    }
    assert_eq!(store.scan_prefix("aa/", None, 1000).await.unwrap().len(), 1);
    let (db, conn) =
        tokio_postgres::connect(&pg.connection_string("keyvault", "scans"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let prepare = format!("PREPARE scan (text, text, bigint, text) AS {}", keyvault::store::SCAN_STATEMENT);
    db.batch_execute(&format!("ANALYZE keyvault_kv; SET plan_cache_mode = force_generic_plan; {prepare}"))
        .await
        .unwrap();
    let explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE scan ('aa/', '', 1000, 'aa0')";
    let rows = db.query(explain, &[]).await.unwrap();
    let plan: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan") && plan.contains("$4"), "an index range with an end:\n{plan}");
    assert!(!plan.contains("Rows Removed by Filter"), "no key outside the prefix read:\n{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_conformance_suite_passes_on_postgres() {
    let pg = TestPostgres::start();
    let store = PostgresStore::open(&options(pg.database("conformance"))).await.unwrap();
    keyvault::store::conformance::run_all(&store).await;
    // PostgreSQL fetches the last entry of the range with the key, in one statement.
    store.put("pf/meta", b"m").await.unwrap();
    store.put("pf/d\x1f1", b"v1").await.unwrap();
    store.put("pf/d\x1f2", b"v2").await.unwrap();
    assert_eq!(
        store.get_and_last_under("pf/meta", "pf/d\x1f").await.unwrap(),
        (Some(b"m".to_vec()), Some(("pf/d\x1f2".to_owned(), b"v2".to_vec())))
    );
    keyvault::store::conformance::run_concurrent(Arc::new(store)).await;
    scans_read_only_their_prefix(&pg).await;
    // Two stores on one database (two replicas) see each other's writes, and migrating an
    // already migrated schema is a no-op.
    let url = pg.database("shared");
    let (a, b) =
        (PostgresStore::open(&options(url.clone())).await.unwrap(), PostgresStore::open(&options(url)).await.unwrap());
    a.put("k", b"from a").await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some(&b"from a"[..]));
    assert!(a.insert_if_absent("n", b"", Some(Duration::from_secs(60))).await.unwrap());
    assert!(!b.insert_if_absent("n", b"", Some(Duration::from_secs(60))).await.unwrap());
}

/// 16 tidies of AppRole's secret ids at once: while another replica's tidy holds the
/// claim, every one answers "already in progress" and starts nothing; once it is free,
/// every one answers 200 with one of Vault's two warnings, at least one starts, and when
/// the tidies are done the ids that cannot log in are gone and the others log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_tidies_at_once_run_one_at_a_time() {
    const STARTED: &str =
        "Tidy operation successfully started. Any information from the operation will be printed to the server log.";
    const RUNNING: &str = "Tidy operation already in progress.";
    let pg = TestPostgres::start();
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{}\"", pg.database("tidy"))),
        ..Default::default()
    });
    let (c, root) = (s.client(), s.root.clone());
    let (db, conn) =
        tokio_postgres::connect(&pg.connection_string("keyvault", "tidy"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    ok(c.post("auth/approle/role/t", Some(&root), json!({})).await, 204);
    let role_id = ok(c.get("auth/approle/role/t/role-id", &root).await, 200).body["data"]["role_id"].clone();
    let mut live = Vec::new();
    for _ in 0..3 {
        let r = ok(c.post("auth/approle/role/t/secret-id", Some(&root), json!({})).await, 200);
        live.push(r.body["data"]["secret_id"].clone());
    }
    // Ids that cannot log in: stored without a role id (as older releases did).
    for i in 0..20 {
        db.execute(
            "INSERT INTO keyvault_kv (key, value) VALUES ($1, $2)",
            &[
                &format!("auth/approle/secret-id/t/dead{i:04}"),
                &br#"{"hmac":"00","accessor":"a","created":1,"expires":null}"#.to_vec(),
            ],
        )
        .await
        .unwrap();
    }
    let dead = || async {
        let n: i64 = db
            .query_one("SELECT count(*) FROM keyvault_kv WHERE key LIKE 'auth/approle/secret-id/t/dead%'", &[])
            .await
            .unwrap()
            .get(0);
        n
    };
    let tidies = || {
        futures_util::future::join_all((0..16).map(|_| {
            let (c, root) = (c.clone(), root.clone());
            async move {
                let r = ok(c.post("auth/approle/tidy/secret-id", Some(&root), json!({})).await, 200);
                r.body["warnings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            }
        }))
    };
    db.execute(
        "INSERT INTO keyvault_kv (key, value, expires_at) VALUES ('auth/approle/tidy-claim', 'elsewhere', now() + interval '10 minutes')",
        &[],
    )
    .await
    .unwrap();
    for warnings in tidies().await {
        assert_eq!(warnings, [RUNNING]);
    }
    assert_eq!(dead().await, 20, "no tidy ran while the claim was held elsewhere");
    db.execute("DELETE FROM keyvault_kv WHERE key = 'auth/approle/tidy-claim'", &[]).await.unwrap();
    let all = tidies().await;
    for warnings in &all {
        assert!(warnings == &[STARTED] || warnings == &[RUNNING], "{warnings:?}");
    }
    assert!(all.iter().any(|w| w == &[STARTED]), "{all:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let claimed: i64 = db
            .query_one("SELECT count(*) FROM keyvault_kv WHERE key = 'auth/approle/tidy-claim'", &[])
            .await
            .unwrap()
            .get(0);
        if claimed == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the tidies never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead().await, 0);
    for sid in live {
        ok(c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": sid})).await, 200);
    }
}

/// A retire leaves no stored epoch key of a version that is gone: each goes before its
/// version does, and one left by a retire stopped in between (an earlier release deleted
/// it last) is dropped by the next retire. The active version's stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retires_leave_no_epoch_key_of_a_version_that_is_gone() {
    let pg = TestPostgres::start();
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{}\"", pg.database("epochs"))),
        ..Default::default()
    });
    let (c, root) = (s.client(), s.root.clone());
    let (db, conn) =
        tokio_postgres::connect(&pg.connection_string("keyvault", "epochs"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let epoch_keys = || async {
        let rows =
            db.query("SELECT key FROM keyvault_kv WHERE key LIKE 'sys/epoch/%' ORDER BY key", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    for round in 0..2 {
        ok(c.put("secret/e", &root, json!({"value": format!("v{round}")})).await, 200);
        ok(c.post("sys/rotate", Some(&root), json!({})).await, 200);
        keyvault_tests::wait_rotation_idle(&c, &root).await;
    }
    ok(c.put("secret/e", &root, json!({"value": "v3"})).await, 200);
    assert_eq!(epoch_keys().await, ["sys/epoch/1", "sys/epoch/2", "sys/epoch/3"]);
    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([1, 2]));
    assert_eq!(epoch_keys().await, ["sys/epoch/3"]);
    // What a retire stopped after its version was gone leaves: the next retire drops it.
    db.execute("INSERT INTO keyvault_kv (key, value) VALUES ('sys/epoch/2', 'left behind')", &[]).await.unwrap();
    let r = ok(c.post("sys/rotate/retire", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["retired"], json!([]));
    assert_eq!(epoch_keys().await, ["sys/epoch/3"]);
    assert_eq!(ok(c.get("secret/e", &root).await, 200).body["data"]["value"], "v3");
}

/// The clock offset a replica measures against the database is the reading's alone: a
/// wait for a pooled connection (here 2 s, the only one held by a write waiting for a row
/// lock) does not skew it (it used to by half the wait, enough to refuse every request
/// past the default 2 s limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_connection_does_not_skew_the_clock_offset() {
    let pg = TestPostgres::start();
    let url = pg.database("clock");
    let store = Arc::new(PostgresStore::open(&PostgresOptions { pool_size: 1, ..options(url) }).await.unwrap());
    store.put("held", b"v").await.unwrap();
    assert!(store.clock_offset_ms().await.unwrap().unwrap().abs() < 500, "one machine, one clock");
    let (locker, conn) =
        tokio_postgres::connect(&pg.connection_string("keyvault", "clock"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    locker.batch_execute("BEGIN; SELECT * FROM keyvault_kv WHERE key = 'held' FOR UPDATE").await.unwrap();
    let write = tokio::spawn({
        let store = store.clone();
        async move { store.put("held", b"w").await }
    });
    keyvault_tests::postgres::wait_for_a_lock_wait(&locker, "the write").await;
    let reading = tokio::spawn({
        let store = store.clone();
        async move { store.clock_offset_ms().await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!reading.is_finished(), "the reading waits for the pool's only connection");
    locker.batch_execute("COMMIT").await.unwrap();
    write.await.unwrap().unwrap();
    let offset = reading.await.unwrap().unwrap().unwrap();
    assert!(offset.abs() < 500, "offset {offset} ms after a 2 s wait for a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_one_query() {
    let pg = TestPostgres::start();
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{}\"", pg.database("reads"))),
        ..Default::default()
    });
    let c = s.client();
    ok(c.put("secret/a", &s.root, json!({"value": "v1"})).await, 200);
    ok(c.put("secret/a", &s.root, json!({"value": "v2"})).await, 200);
    ok(c.put("kv/data/b", &s.root, json!({"data": {"value": "w1"}})).await, 200);
    ok(c.get("secret/a", &s.root).await, 200);
    let scrape = || async {
        let r = c.http.get(format!("{}/metrics", c.base)).header("X-Vault-Token", &s.root).send().await.unwrap();
        r.text().await.unwrap()
    };
    let ops = |t: &str, op: &str| metric_sum(t, "keyvault_store_operations_total", &[&format!("op=\"{op}\"")]);
    // Each request's other query is the token's revocation check (a `get`), and each
    // scrape makes one too: 20 reads and one scrape. Background work (the rotation
    // driver's and the keyring follower's ticks) reads too, now and then: of up to five
    // windows, the quietest counts (a second query per read would add 20 to every one).
    let mut gets = Vec::new();
    let mut after = String::new();
    for _ in 0..5 {
        let before = scrape().await;
        for _ in 0..10 {
            assert_eq!(ok(c.get("secret/a", &s.root).await, 200).body["data"]["value"], "v2");
            assert_eq!(ok(c.get("kv/data/b", &s.root).await, 200).body["data"]["data"]["value"], "w1");
        }
        after = scrape().await;
        assert_eq!(ops(&after, "get_and_last_under") - ops(&before, "get_and_last_under"), 20.0, "one per read");
        gets.push(ops(&after, "get") - ops(&before, "get"));
        if gets.last() == Some(&21.0) {
            break;
        }
    }
    assert_eq!(
        gets.iter().copied().fold(f64::MAX, f64::min),
        21.0,
        "no second query for the current version: {gets:?}"
    );
    // An older version is the one case that needs its record by its key, and then its
    // metadata again (a delete could have refilled the record's slot meanwhile).
    // (Its record, the metadata, the revocation check and the scrape; the quietest of up
    // to five.)
    let mut gets = Vec::new();
    for _ in 0..5 {
        assert_eq!(ok(c.get("secret/a?version=1", &s.root).await, 200).body["data"]["value"], "v1");
        let older = scrape().await;
        gets.push(ops(&older, "get") - ops(&after, "get"));
        after = older;
        if gets.last() == Some(&4.0) {
            break;
        }
    }
    assert_eq!(gets.iter().copied().fold(f64::MAX, f64::min), 4.0, "{gets:?}");
}

/// A writer that crashes between claiming a version's slot and recording it in the
/// metadata leaves an orphan record. Check-and-set writes go past it (they used to answer
/// 409 for ever, which with `cas_required` left the secret unwritable), and of 16
/// concurrent check-and-set writes exactly one wins and the others leave no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_and_set_writes_go_past_an_orphan_record_and_have_one_winner() {
    let pg = TestPostgres::start();
    let url = pg.database("orphans");
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"")),
        ..Default::default()
    });
    let c = s.client();
    let store = PostgresStore::open(&options(url)).await.unwrap();
    let record = |v: u64| format!("kv/data/\u{2}v2/app\u{1f}{v:020}");
    // Settings writes of different settings at once all hold (each is a compare-and-swap
    // on the stored settings).
    let writes = (0..16).map(|i| {
        let c = s.client();
        let root = s.root.clone();
        async move {
            let body = match i % 2 {
                0 => json!({"max_versions": 7}),
                _ => json!({"cas_required": true}),
            };
            c.post("kv/config", Some(&root), body).await.status
        }
    });
    assert!(futures_util::future::join_all(writes).await.iter().all(|st| *st == 204));
    let r = ok(c.get("kv/config", &s.root).await, 200);
    assert_eq!(
        (r.body["data"]["max_versions"].as_u64(), r.body["data"]["cas_required"].as_bool()),
        (Some(7), Some(true))
    );
    ok(c.put("kv/data/app", &s.root, json!({"data": {"v": "1"}, "options": {"cas": 0}})).await, 200);
    // What a crash after the slot's insert leaves: a record the metadata never names.
    store.put(&record(2), b"an orphan").await.unwrap();
    ok(c.put("kv/data/app", &s.root, json!({"data": {"v": "x"}, "options": {"cas": 0}})).await, 409);
    let w = ok(c.put("kv/data/app", &s.root, json!({"data": {"v": "3"}, "options": {"cas": 1}})).await, 200);
    assert_eq!(w.body["data"]["version"], 3);
    let r = ok(c.get("kv/data/app", &s.root).await, 200);
    assert_eq!(
        (r.body["data"]["data"]["v"].as_str(), r.body["data"]["metadata"]["version"].as_u64()),
        (Some("3"), Some(3))
    );

    // 16 at once with the same check-and-set: one winner, 409 for the rest.
    let writes = (0..16).map(|i| {
        let c = s.client();
        let root = s.root.clone();
        async move { c.put("kv/data/app", &root, json!({"data": {"v": format!("w{i}")}, "options": {"cas": 3}})).await }
    });
    let replies = futures_util::future::join_all(writes).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses.iter().filter(|st| **st == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|st| **st == 409).count(), 15, "{statuses:?}");
    let winner = replies.iter().find(|r| r.status == 200).unwrap();
    let version = winner.body["data"]["version"].as_u64().unwrap();
    let r = ok(c.get("kv/data/app", &s.root).await, 200);
    assert_eq!(r.body["data"]["metadata"]["version"].as_u64(), Some(version));
    let m = ok(c.get("kv/metadata/app", &s.root).await, 200);
    // (The winner's number is any of 4..=19: compared as numbers.)
    let mut versions: Vec<u64> =
        m.body["data"]["versions"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
    versions.sort();
    assert_eq!(versions, vec![1, 3, version]);
    // The losers' slots were given back: only the orphan and the three versions remain.
    let stored: Vec<String> =
        store.scan_prefix("kv/data/\u{2}v2/app\u{1f}", None, 100).await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(stored, vec![record(1), record(2), record(3), record(version)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_gives_503_and_recovers() {
    let mut pg = TestPostgres::start();
    let url = pg.database("outage");
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4")),
        ..Default::default()
    });
    let c = s.client();
    ok(c.put("secret/a", &s.root, json!({"value": "before"})).await, 200);
    pg.halt();
    let r = c.get("secret/a", &s.root).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(c.put("secret/a", &s.root, json!({"value": "during"})).await.status, 503);
    // Health (no token needed) says what is wrong in a word; the detail is in the log.
    let h = c.send("GET", "sys/health", None, None).await;
    assert_eq!(h.status, 503, "{h:?}");
    assert_eq!(h.body["storage"], "unavailable", "{h:?}");
    // Every string it shows is a status word (or the version), or the installation's id.
    for (k, v) in h.body.as_object().unwrap() {
        if k == "cluster_id" {
            assert!(
                v.as_str().is_some_and(|id| id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
            );
            continue;
        }
        if let Some(word) = v.as_str() {
            assert!(
                word.len() <= 20 && word.chars().all(|c| c.is_ascii_alphanumeric() || "._".contains(c)),
                "{k}: {word}"
            );
        }
    }
    assert!(s.log_text().contains("health: storage check failed"));
    pg.run();
    let mut back = false;
    for _ in 0..100 {
        if c.get("secret/a", &s.root).await.status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the server recovers by itself when the database returns");
    assert_eq!(ok(c.get("secret/a", &s.root).await, 200).body["data"]["value"], "before", "no acknowledged write lost");
}

fn cluster(name: &str) -> Cluster {
    Cluster::start(name, Vec::new())
}

fn cluster_with(name: &str, env: Vec<(String, String)>) -> Cluster {
    Cluster::start(name, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_rotate_twice_under_load_with_no_failed_request() {
    let cl = cluster("rotation");
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    for i in 0..300 {
        let c = if i % 2 == 0 { &ca } else { &cb };
        ok(c.put(&format!("secret/seed/{i}"), &root, json!({"value": format!("seed-{i}")})).await, 200);
    }
    // Units write on one replica and read on the other.
    let stop = Arc::new(AtomicBool::new(false));
    let (count, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let handles: Vec<_> = (0..6)
        .map(|u| {
            let (w, r) = if u % 2 == 0 { (ca.clone(), cb.clone()) } else { (cb.clone(), ca.clone()) };
            let (root, stop, count, failures) = (root.clone(), stop.clone(), count.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let path = format!("secret/unit-{u}");
                    let value = format!("u{u}-{n}");
                    let wrote = w
                        .try_send("PUT", &path, Some(&root), Some(json!({"value": value}).to_string().into_bytes()))
                        .await;
                    let read = r.try_send("GET", &path, Some(&root), None).await;
                    let seed =
                        r.try_send("GET", &format!("secret/seed/{}", (n * 13 + u) % 300), Some(&root), None).await;
                    let good = matches!(&wrote, Ok(x) if x.status == 200)
                        && matches!(&read, Ok(x) if x.status == 200 && x.body["data"]["value"] == value.as_str())
                        && matches!(&seed, Ok(x) if x.status == 200);
                    if !good {
                        eprintln!(
                            "unit {u}: {:?} {:?} {:?}",
                            wrote.map(|x| x.status),
                            read.map(|x| (x.status, x.body)),
                            seed.map(|x| x.status)
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    count.fetch_add(3, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let ran = |n: u64| {
        let count = count.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let start = count.load(Ordering::Relaxed);
            while count.load(Ordering::Relaxed) < start + n {
                assert!(std::time::Instant::now() < deadline, "the load does not run");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    ran(30).await;
    let (psql, conn) = tokio_postgres::connect(&cl.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for expected in [2, 3] {
        let via = if expected == 2 { &ca } else { &cb };
        // Hold one record the re-wrap needs (a row lock on the first record of its first
        // page): the rotation stays `rewrapping` for sure while a second start is tried
        // on either replica.
        psql.batch_execute(
            "BEGIN; SELECT 1 FROM keyvault_kv WHERE key = E'kv/data/seed/0\\x1f00000000000000000001' FOR UPDATE",
        )
        .await
        .unwrap();
        let started = via.post("sys/rotate", Some(&root), json!({})).await;
        assert_eq!(ok(started, 200).body["data"]["version"], expected);
        for c in [&ca, &cb] {
            let r = ok(c.post("sys/rotate", Some(&root), json!({})).await, 409);
            assert!(r.body["errors"][0].as_str().unwrap().contains("already running"), "{r:?}");
        }
        psql.batch_execute("COMMIT").await.unwrap();
        let st = keyvault_tests::wait_rotation_idle(&cb, &root).await;
        assert_eq!(st["versions_in_use"], json!([expected]), "{st}");
        ran(30).await;
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "no failed request");
    assert!(count.load(Ordering::Relaxed) > 100);
    assert_eq!(
        ok(ca.post("sys/rotate/retire", Some(&root), json!({})).await, 200).body["data"]["retired"],
        json!([1, 2])
    );
    assert_eq!(
        cl.a.token_keys("keyvault/master/"),
        vec!["keyvault/master/v3"],
        "old key objects are gone from the token"
    );
    // Replica B reads everything at once (it learns key versions when it meets them).
    for i in (0..300).step_by(29) {
        assert_eq!(
            ok(cb.get(&format!("secret/seed/{i}"), &root).await, 200).body["data"]["value"],
            format!("seed-{i}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_driving_replica_is_killed_the_other_finishes() {
    // The rotation test hook of debug builds: hold the re-wrap at a checkpoint.
    let hold_dir = tempfile::tempdir().unwrap();
    let hold = hold_dir.path().join("hold");
    let mut cl = cluster_with("takeover", vec![("KEYVAULT_TEST_HOLD_ROTATION".into(), hold.display().to_string())]);
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let (c, root) = (if t % 2 == 0 { ca.clone() } else { cb.clone() }, root.clone());
            tokio::spawn(async move {
                for i in (t..2500).step_by(16) {
                    ok(c.put(&format!("secret/s/{i}"), &root, json!({"value": format!("v{i}")})).await, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    std::fs::write(&hold, "1000").unwrap();
    ok(ca.post("sys/rotate", Some(&root), json!({})).await, 200);
    // Held after 1000 records: find who drives (the lease owner id starts with its
    // process id) and kill it there, in the middle of the re-wrap for certain.
    let (pid_a, pid_b) = (cl.a.child.id().to_string(), cl.b.child.id().to_string());
    let mut victim = None;
    for _ in 0..1000 {
        let st = ok(cb.get("sys/rotate/status", &root).await, 200).body["data"].clone();
        if let Some(driver) = st["driven_by"].as_str()
            && st["records_done"].as_u64().unwrap() >= 1000
        {
            assert_eq!(st["state"], "rewrapping");
            assert!(driver.starts_with(&format!("{pid_a}-")) || driver.starts_with(&format!("{pid_b}-")), "{driver}");
            victim = Some(driver.starts_with(&format!("{pid_a}-")));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kill_a = victim.expect("caught the rotation at its checkpoint");
    let (dead, alive, alive_client) = if kill_a { (&mut cl.a, &cl.b, &cb) } else { (&mut cl.b, &cl.a, &ca) };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    std::fs::remove_file(&hold).unwrap();
    let st = keyvault_tests::wait_rotation_idle(alive_client, &root).await;
    assert_eq!(st["versions_in_use"], json!([2]), "{st}");
    assert!(alive.log_text().contains("taking over the master key rotation"));
    for i in (0..2500).step_by(97) {
        assert_eq!(
            ok(alive_client.get(&format!("secret/s/{i}"), &root).await, 200).body["data"]["value"],
            format!("v{i}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_replay_protection_versions_and_policy_changes() {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let cl = cluster("shared");
    let (ca, cb) = (cl.a.client(), cl.b.client());
    let root = cl.a.root.clone();
    // A replay sent to both replicas concurrently 50 times: exactly one acceptance.
    let key = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let cert = "ab".repeat(32);
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    ok(
        ca.post("gateway/producers/p1", Some(&root), json!({"cert_sha256": [cert], "keys": [{"key_id": "k", "public_key": b64(key.verifying_key().as_bytes())}]}))
            .await,
        204,
    );
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let nonce = "replica-nonce-000000001";
    let body = br#"{"x":1}"#;
    let msg = keyvault_api::gateway::signing_input(&ts.to_string(), nonce, body);
    let item = json!({"identity": "p1", "cert_sha256": cert, "timestamp": ts, "nonce": nonce, "signature": b64(&key.sign(&msg).to_bytes()), "body": b64(body)});
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (c, root, item) = (if i % 2 == 0 { ca.clone() } else { cb.clone() }, root.clone(), item.clone());
            tokio::spawn(async move { c.post("gateway/verify", Some(&root), item).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 49, "{statuses:?}");

    // Concurrent writes of one secret on both replicas: distinct versions, none lost.
    // Where every version is kept (max_versions 100), the numbers are exactly 1..=20 and
    // each reads back what its writer wrote.
    ok(ca.post("kv/metadata/contended", Some(&root), json!({"max_versions": 100})).await, 204);
    let acked = concurrent_writes(&ca, &cb, &root, |i| {
        ("kv/data/contended".to_owned(), json!({"data": {"value": format!("w{i}")}}))
    })
    .await;
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    for (version, value) in &acked {
        let r = ok(cb.get(&format!("kv/data/contended?version={version}"), &root).await, 200);
        assert_eq!(r.body["data"]["data"]["value"], value.as_str(), "version {version}");
    }
    // `secret/` keeps 10 versions. A writer overtaken by 10 others while it recorded its
    // number takes a higher one rather than be pruned at once (docs/api.md), so numbers
    // may be skipped; none is given twice, and the 10 newest acknowledged versions are
    // exactly the ones kept, each with its writer's value.
    let acked =
        concurrent_writes(&ca, &cb, &root, |i| ("secret/contended".to_owned(), json!({"value": format!("w{i}")})))
            .await;
    let newest = *acked.keys().last().unwrap();
    assert_eq!(ok(ca.get("secret/contended", &root).await, 200).body["metadata"]["version"], newest);
    for (n, (version, value)) in acked.iter().rev().enumerate() {
        let r = cb.get(&format!("secret/contended?version={version}"), &root).await;
        if n < 10 {
            assert_eq!(ok(r, 200).body["data"]["value"], value.as_str(), "version {version}");
        } else {
            ok(r, 404);
        }
    }

    // A policy change on A takes effect on B within a second.
    ok(
        ca.put("sys/policies/acl/p", &root, json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"})).await,
        204,
    );
    ok(ca.post("auth/approle/role/r", Some(&root), json!({"token_policies": ["p"]})).await, 204);
    let sid = ca.post("auth/approle/role/r/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let t = ok(cb.post("auth", None, json!({"role": "r", "secret_id": sid})).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(cb.get("secret/contended", &t).await, 200);
    ok(
        ca.put("sys/policies/acl/p", &root, json!({"policy": "path \"other/*\" { capabilities = [\"read\"] }"})).await,
        204,
    );
    // B follows within a second (it drops its policy cache every second; 30 s allowed
    // for a loaded machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cb.get("secret/contended", &t).await.status != 403 {
        assert!(std::time::Instant::now() < deadline, "B never saw the policy change");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A revocation on B applies on A at once (it is in the database).
    ok(cb.post("auth/token/revoke-self", Some(&t), json!({})).await, 204);
    ok(ca.get("auth/token/lookup-self", &t).await, 401);

    // A token signed by a token-signing version that A added a moment ago is accepted by
    // B at once (B re-reads the keyring instead of refusing an unknown key id), and
    // tokens of the old version stay valid on both.
    let old_token = root.clone();
    ok(ca.post("sys/rotate/token-signing", Some(&root), json!({})).await, 200);
    let sid = ca.post("auth/approle/role/r/secret-id", Some(&root), json!({})).await.body["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fresh =
        ok(ca.post("auth", None, json!({"role": "r", "secret_id": sid})).await, 200).body["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_owned();
    ok(cb.get("auth/token/lookup-self", &fresh).await, 200);
    ok(cb.get("auth/token/lookup-self", &old_token).await, 200);
    // A token claiming a key id nobody has is refused.
    let mut parts: Vec<String> = fresh.split('.').map(str::to_owned).collect();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&parts[0]).unwrap();
    let mut header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    header["kid"] = json!("v99");
    parts[0] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string());
    ok(cb.get("auth/token/lookup-self", &parts.join(".")).await, 401);
}

/// 20 writes at once, alternating between the two replicas, each of which must be
/// acknowledged: the version each was given, and the value it wrote.
async fn concurrent_writes(
    ca: &Client,
    cb: &Client,
    root: &str,
    request: impl Fn(usize) -> (String, serde_json::Value),
) -> std::collections::BTreeMap<u64, String> {
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (c, root, (path, body)) =
                (if i % 2 == 0 { ca.clone() } else { cb.clone() }, root.to_owned(), request(i));
            tokio::spawn(async move {
                let version = ok(c.put(&path, &root, body).await, 200).body["data"]["version"].as_u64().unwrap();
                (version, format!("w{i}"))
            })
        })
        .collect();
    let mut acked = std::collections::BTreeMap::new();
    for t in tasks {
        let (version, value) = t.await.unwrap();
        assert!(acked.insert(version, value).is_none(), "version {version} was given twice");
    }
    acked
}

/// A role delete cut short once the role itself is gone (a crash, a dropped request)
/// leaves the role's secret ids behind. They must log in to nothing, also after a role of
/// the same name is made again: a secret id belongs to the role it was made for (its role
/// id), not to the name. The delete's first steps are made here directly in the shared
/// store, as `RoleStore::delete` makes them.
#[tokio::test]
async fn secret_ids_left_by_an_interrupted_role_delete_log_in_to_nothing() {
    let pg = TestPostgres::start();
    let url = pg.database("leftovers");
    let s = TestServer::start(ServerOptions {
        storage: Some(format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"")),
        ..Default::default()
    });
    let c = s.client();
    ok(c.post("auth/approle/role/again", Some(&s.root), json!({})).await, 204);
    let sid =
        ok(c.post("auth/approle/role/again/secret-id", Some(&s.root), json!({})).await, 200).body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let login = json!({"role": "again", "secret_id": sid});
    ok(c.post("auth", None, login.clone()).await, 200);
    let store = PostgresStore::open(&options(url)).await.unwrap();
    assert!(store.delete("auth/approle/role/again").await.unwrap());
    assert!(store.delete("auth/roles/again").await.unwrap());
    assert_eq!(c.post("auth", None, login.clone()).await.status, 401, "no role");
    ok(c.post("auth/approle/role/again", Some(&s.root), json!({})).await, 204);
    assert_eq!(c.post("auth", None, login).await.status, 401, "the old role's secret id, for the new role");
}
