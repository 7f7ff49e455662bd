//! The `database` engine against a real PostgreSQL cluster: a static role's password set
//! at creation, rotated on demand and on schedule (the new one logs in, the old one does
//! not), sixteen rotations at once, and a crash between storing the new password and
//! `ALTER ROLE`: after the restart the served password works.

use std::time::Duration;

use keyvault_tests::postgres::TestPostgres;
use keyvault_tests::server::{ServerOptions, TestServer, default_mounts_toml};
use keyvault_tests::{Client, Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

async fn password(c: &Client, root: &str, role: &str) -> String {
    let r = ok(c.get(&format!("database/static-creds/{role}"), root).await, 200);
    assert_eq!(r.body["data"]["username"], role);
    r.body["data"]["password"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_role_passwords_rotate_and_survive_a_crash_mid_rotation() {
    let pg = TestPostgres::start();
    pg.psql("CREATE ROLE app LOGIN PASSWORD 'initial-password'");
    pg.psql("CREATE ROLE batch LOGIN PASSWORD 'initial-password'");
    assert!(pg.can_log_in("app", "initial-password").await);
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash-now");
    let mounts = format!(
        "[[mounts]]\npath = \"database\"\ntype = \"database\"\n[mounts.options]\ncheck_interval = \"1s\"\n\
         [mounts.options.connections.main]\nconnection = \"{}\"\n",
        pg.connection_string("keyvault", "postgres")
    );
    let mut s = TestServer::start(ServerOptions {
        extra: format!("{}{mounts}", default_mounts_toml()),
        env: vec![("KEYVAULT_TEST_CRASH_DB_ROTATION".into(), crash.display().to_string())],
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();

    // Creating the role sets its password at once.
    let role = json!({"db_name": "main", "username": "app", "rotation_period": "1h"});
    ok(c.post("database/static-roles/app", Some(&root), role).await, 204);
    let p1 = password(&c, &root, "app").await;
    assert!(pg.can_log_in("app", &p1).await);
    // The passwords are kept in a namespace of the store that no KV listing shows.
    let l = c.send("LIST", "secret", Some(&root), None).await;
    assert_eq!(l.status, 404, "{l:?}");
    assert!(!pg.can_log_in("app", "initial-password").await);
    let r = ok(c.get("database/static-roles/app", &root).await, 200);
    assert_eq!(r.body["data"]["rotation_period"], 3600);
    // Bad input: an unknown connection, a username that could break the statement.
    for bad in
        [json!({"db_name": "other", "username": "x"}), json!({"db_name": "main", "username": "x\"; DROP ROLE app; --"})]
    {
        ok(c.post("database/static-roles/bad", Some(&root), bad).await, 400);
    }
    // Whoever may write static roles must not get the password of a role that can
    // administer the database (its admin connection's own user, a superuser, CREATEROLE),
    // of a role that does not exist, or of one another static role manages.
    pg.psql("CREATE ROLE other_admin LOGIN SUPERUSER PASSWORD 'x'");
    pg.psql("CREATE ROLE role_maker LOGIN CREATEROLE PASSWORD 'x'");
    // Members of such roles can take their privileges with SET ROLE.
    pg.psql("CREATE ROLE admin_member LOGIN PASSWORD 'x'");
    pg.psql("GRANT other_admin TO admin_member");
    pg.psql("CREATE ROLE file_writer LOGIN PASSWORD 'x'");
    pg.psql("GRANT pg_write_server_files TO file_writer");
    for (username, says) in [
        ("keyvault", "can administer"),
        ("other_admin", "can administer"),
        ("role_maker", "can administer"),
        ("admin_member", "can administer"),
        ("file_writer", "can administer"),
        ("nobody_here", "has no role"),
        ("app", "managed by static role app"),
    ] {
        let r = ok(
            c.post("database/static-roles/taker", Some(&root), json!({"db_name": "main", "username": username})).await,
            400,
        );
        assert!(r.body["errors"][0].as_str().unwrap().contains(says), "{username}: {r:?}");
    }
    assert!(pg.can_log_in("other_admin", "x").await, "its password was not changed");
    assert_eq!(c.get("database/static-roles/taker", &root).await.status, 404);
    // Sixteen static roles naming one database role at once: one is made, the rest 400 or
    // 409, and the one made serves the password the database has.
    pg.psql("CREATE ROLE contested LOGIN PASSWORD 'x'");
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(async move {
                let body = json!({"db_name": "main", "username": "contested", "rotation_period": "1h"});
                (i, c.post(&format!("database/static-roles/contest-{i}"), Some(&root), body).await.status)
            })
        })
        .collect();
    let mut made = Vec::new();
    for t in tasks {
        let (i, status) = t.await.unwrap();
        assert!([204, 400, 409].contains(&status), "{status}");
        if status == 204 {
            made.push(i);
        }
    }
    assert_eq!(made.len(), 1, "{made:?}");
    let winner = format!("contest-{}", made[0]);
    let r = ok(c.get(&format!("database/static-creds/{winner}"), &root).await, 200);
    assert_eq!(r.body["data"]["username"], "contested");
    assert!(pg.can_log_in("contested", r.body["data"]["password"].as_str().unwrap()).await);
    ok(c.send("DELETE", &format!("database/static-roles/{winner}"), Some(&root), None).await, 204);

    // A caller with read on static-creds only: reads the password, changes nothing.
    let policy = "path \"database/static-creds/app\" { capabilities = [\"read\"] }";
    ok(c.put("sys/policies/acl/app-reader", &root, json!({ "policy": policy })).await, 204);
    let b = ok(c.post("auth/bootstrap/token", Some(&root), json!({"policies": ["app-reader"]})).await, 200);
    let bt = b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned();
    let reader =
        ok(c.post("auth/bootstrap/login", None, json!({ "token": bt })).await, 200).body["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_owned();
    assert_eq!(password(&c, &reader, "app").await, p1);
    ok(c.post("database/rotate-role/app", Some(&reader), json!({})).await, 403);
    ok(c.post("database/static-roles/app", Some(&reader), json!({"rotation_period": "5s"})).await, 403);
    ok(c.post("database/static-roles/mine", Some(&reader), json!({"db_name": "main", "username": "app"})).await, 403);
    ok(c.get("database/static-roles/app", &reader).await, 403);
    ok(c.send("DELETE", "database/static-roles/app", Some(&reader), None).await, 403);
    ok(c.get("database/static-creds/other", &reader).await, 403);
    assert_eq!(password(&c, &root, "app").await, p1, "nothing changed");

    // On demand: the new password logs in, the old one no longer does.
    ok(c.post("database/rotate-role/app", Some(&root), json!({})).await, 204);
    let p2 = password(&c, &root, "app").await;
    assert_ne!(p1, p2);
    assert!(pg.can_log_in("app", &p2).await && !pg.can_log_in("app", &p1).await);

    // Sixteen rotations at once: each is one whole rotation or a 409, and the password
    // served at the end is the one the database has.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(async move { c.post("database/rotate-role/app", Some(&root), json!({})).await.status })
        })
        .collect();
    for t in tasks {
        assert!([204, 409].contains(&t.await.unwrap()));
    }
    let p3 = password(&c, &root, "app").await;
    assert!(pg.can_log_in("app", &p3).await);

    // A rotation that meets a lock on the role, held by a transaction left open (by the
    // role's own user, say), fails after the admin connection's lock timeout instead of
    // waiting for good; once the lock is gone, the rotation goes through.
    let holder_config: tokio_postgres::Config = pg.connection_string("keyvault", "postgres").parse().unwrap();
    let (holder, connection) = holder_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    holder.batch_execute("BEGIN; ALTER ROLE app WITH PASSWORD 'held-by-another'").await.unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        c.post("database/rotate-role/app", Some(&root), json!({})),
    )
    .await
    .expect("a rotation behind a held lock is answered");
    assert_eq!(r.status, 503, "{r:?}");
    holder.batch_execute("ROLLBACK").await.unwrap();
    let mut status = 0;
    for _ in 0..40 {
        status = c.post("database/rotate-role/app", Some(&root), json!({})).await.status;
        if status == 204 {
            break;
        }
        assert_eq!(status, 409, "another rotation (the scheduler's, of the pending password) runs");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(status, 204);
    let p3 = password(&c, &root, "app").await;
    assert!(pg.can_log_in("app", &p3).await);

    // A role that can administer the database since its static role was made (made a
    // superuser, made a member of a predefined role that reads all data): its static role
    // serves and rotates no password until that is undone, and the database keeps the
    // password it has.
    for (grant, revoke) in [
        ("ALTER ROLE app SUPERUSER", "ALTER ROLE app NOSUPERUSER"),
        ("GRANT pg_read_all_data TO app", "REVOKE pg_read_all_data FROM app"),
        ("GRANT role_maker TO app", "REVOKE role_maker FROM app"),
    ] {
        pg.psql(grant);
        let r = ok(c.get("database/static-creds/app", &root).await, 409);
        let says = r.body["errors"][0].as_str().unwrap();
        assert!(says.contains("can now administer") && !says.contains(&p3), "{grant}: {says}");
        ok(c.post("database/rotate-role/app", Some(&root), json!({})).await, 409);
        assert!(pg.can_log_in("app", &p3).await, "{grant}: the password was not changed");
        pg.psql(revoke);
        assert_eq!(password(&c, &root, "app").await, p3, "{revoke}: served again");
    }

    // On schedule: a 5-second period is rotated by the scheduler.
    let role = json!({"db_name": "main", "username": "batch", "rotation_period": "5s"});
    ok(c.post("database/static-roles/batch", Some(&root), role).await, 204);
    let b1 = password(&c, &root, "batch").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let b2 = loop {
        let b = password(&c, &root, "batch").await;
        if b != b1 {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "the scheduler did not rotate batch");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(pg.can_log_in("batch", &b2).await);
    ok(c.send("DELETE", "database/static-roles/batch", Some(&root), None).await, 204);

    // A crash after the new password is stored and before ALTER ROLE (the test hook
    // aborts the process there, as kill -9 would).
    std::fs::write(&crash, "").unwrap();
    let r = c.try_send("POST", "database/rotate-role/app", Some(&root), Some(b"{}".to_vec())).await;
    assert!(r.is_err() || r.as_ref().is_ok_and(|r| r.status >= 500), "{r:?}");
    assert!(s.child.wait().unwrap().code().is_none(), "the server died of a signal");
    std::fs::remove_file(&crash).unwrap();
    s.restart();
    let c = s.client();
    // The database still has p3; KeyVault applies its pending password and serves it
    // (503 until the dead process's rotation claim lapses, at most 15 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let p4 = loop {
        let r = c.get("database/static-creds/app", &root).await;
        if r.status == 200 {
            break r.body["data"]["password"].as_str().unwrap().to_owned();
        }
        assert_eq!(r.status, 503, "{r:?}");
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(pg.can_log_in("app", &p4).await, "the served password works after the crash");
    assert_ne!(p4, p3);
    assert!(!pg.can_log_in("app", &p3).await);

    // A delete while a rotation of the role is under way (its ALTER ROLE waits for a lock
    // an open transaction holds on the role): 409, and the role stays. Before, the delete
    // went through and the rotation then changed the password of the deleted role's user.
    let (held, conn) =
        tokio_postgres::connect(&pg.connection_string("keyvault", "postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    held.batch_execute("BEGIN; ALTER ROLE app WITH PASSWORD 'held-by-a-transaction'").await.unwrap();
    let rotating = {
        let (c, root) = (c.clone(), root.clone());
        tokio::spawn(async move { c.post("database/rotate-role/app", Some(&root), json!({})).await.status })
    };
    // Wait until the database shows the rotation's ALTER ROLE waiting for that lock (its
    // claim is taken by then), and delete at once (the admin connection's lock_timeout
    // is 5 s).
    keyvault_tests::postgres::wait_for_a_lock_wait(&held, "the rotation").await;
    let r = c.send("DELETE", "database/static-roles/app", Some(&root), None).await;
    assert_eq!(r.status, 409, "{r:?}");
    held.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rotating.await.unwrap(), 204);
    ok(c.get("database/static-roles/app", &root).await, 200);
    let p_now = password(&c, &root, "app").await;
    assert!(pg.can_log_in("app", &p_now).await);

    // A delete while rotations and reads of the role run: it is whole (204) or waits
    // for none of them (409 while a rotation holds the role's claim); once done, the
    // role and its passwords are gone, and none is set after it.
    let mut deleted = false;
    for _ in 0..20 {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (c, root) = (c.clone(), root.clone());
                tokio::spawn(async move {
                    match i {
                        0 => c.send("DELETE", "database/static-roles/app", Some(&root), None).await.status,
                        1..=7 => c.post("database/rotate-role/app", Some(&root), json!({})).await.status,
                        _ => c.get("database/static-creds/app", &root).await.status,
                    }
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        assert!(statuses.iter().all(|s| [200, 204, 404, 409].contains(s)), "{statuses:?}");
        if statuses[0] == 204 {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "the delete never ran");
    ok(c.get("database/static-roles/app", &root).await, 404);
    ok(c.get("database/static-creds/app", &root).await, 404);
    let db_now = pg.query_value("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pg.query_value("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'"),
        db_now,
        "set after the delete"
    );
    // Made again under its name for another database role: serves that role's password.
    let again = json!({"db_name": "main", "username": "batch", "rotation_period": "1h"});
    ok(c.post("database/static-roles/app", Some(&root), again).await, 204);
    let r = ok(c.get("database/static-creds/app", &root).await, 200);
    assert_eq!(r.body["data"]["username"], "batch");
    let p5 = r.body["data"]["password"].as_str().unwrap().to_owned();
    assert!(pg.can_log_in("batch", &p5).await);
    assert!(!pg.can_log_in("app", &p5).await);
    ok(c.send("DELETE", "database/static-roles/app", Some(&root), None).await, 204);

    // No password is in a log or, unsealed, in any file of the install; nor in
    // PostgreSQL's log, which has every ALTER ROLE (`log_statement = ddl`) and the ones
    // that failed behind the held locks above: the statement carries a SCRAM verifier,
    // never the password.
    let log = s.log_text();
    let pg_log = pg.server_log();
    for p in [&p1, &p2, &p3, &p4, &p5, &b1, &b2] {
        assert!(!log.contains(p.as_str()), "a password is in the server log");
        assert!(!pg_log.contains(p.as_str()), "a password is in PostgreSQL's log");
        assert!(keyvault_tests::files_containing(s.dir.path(), p.as_bytes()).is_empty());
    }
    assert!(pg_log.contains("ALTER ROLE \"app\" WITH PASSWORD 'SCRAM-SHA-256$"), "the statements are logged");
}

/// The admin connections are a bounded pool, reused: a burst of 32 concurrent
/// `static-creds` reads and rotations, against an admin whose database allows it only 2
/// connections (`CONNECTION LIMIT 2`) and `max_open_connections = 2`, is served whole. With
/// one connection per request, the database refused the third ("too many connections for
/// role") and the reads answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_a_bounded_pool() {
    let pg = TestPostgres::start();
    pg.psql("CREATE ROLE kv_admin LOGIN CREATEROLE CONNECTION LIMIT 2 PASSWORD 'admin-password'");
    pg.psql("CREATE ROLE pooled LOGIN PASSWORD 'initial-password'");
    // PostgreSQL 16 lets a CREATEROLE role alter only the roles it administers.
    pg.psql("GRANT pooled TO kv_admin WITH ADMIN OPTION");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("admin-password");
    std::fs::write(&password_file, "admin-password\n").unwrap();
    let mounts = format!(
        "[[mounts]]\npath = \"database\"\ntype = \"database\"\n[mounts.options]\ncheck_interval = \"1s\"\n\
         [mounts.options.connections.main]\nconnection = \"{}\"\npassword_file = \"{}\"\n\
         max_open_connections = 2\nmax_connection_lifetime = \"1h\"\n\
         [mounts.options.connections.short]\nconnection = \"{}\"\nmax_connection_lifetime = \"1s\"\n",
        pg.connection_string("kv_admin", "postgres"),
        password_file.display(),
        pg.connection_string("keyvault", "postgres"),
    );
    let s =
        TestServer::start(ServerOptions { extra: format!("{}{mounts}", default_mounts_toml()), ..Default::default() });
    let c = s.client();
    let root = s.root.clone();
    let role = json!({"db_name": "main", "username": "pooled", "rotation_period": "1h"});
    ok(c.post("database/static-roles/pooled", Some(&root), role).await, 204);
    // The backends of a user's connections, other than this query's own.
    let backends = |user: &str| {
        let pids = pg.query_value(&format!(
            "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity \
             WHERE usename = '{user}' AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ));
        pids.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect::<Vec<_>>()
    };
    let mut seen = Vec::new();
    for round in 0..3 {
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (c, root) = (c.clone(), root.clone());
                tokio::spawn(async move {
                    if i % 8 == 7 {
                        let r = c.post("database/rotate-role/pooled", Some(&root), json!({})).await;
                        (r.status, r.body)
                    } else {
                        let r = c.get("database/static-creds/pooled", &root).await;
                        (r.status, r.body)
                    }
                })
            })
            .collect();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            // A rotation may find another running (409); nothing is refused for want of
            // a connection.
            assert!(status == 200 || status == 204 || status == 409, "round {round}: {status} {body}");
        }
        let open = backends("kv_admin");
        assert!((1..=2).contains(&open.len()), "round {round}: admin connections {open:?}");
        seen.push(open);
    }
    // The same connections served every round (reused, not opened per request).
    assert_eq!(seen[1], seen[2]);
    // A connection older than `max_connection_lifetime` is not used again: another replaces it.
    pg.psql("CREATE ROLE lifer LOGIN PASSWORD 'x'");
    let role = json!({"db_name": "short", "username": "lifer", "rotation_period": "1h"});
    ok(c.post("database/static-roles/lifer", Some(&root), role).await, 204);
    let first = backends("keyvault");
    assert!(!first.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pg.can_log_in("lifer", &password(&c, &root, "lifer").await).await);
    // (A backend whose connection was closed leaves pg_stat_activity shortly after.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = backends("keyvault");
        if !now.is_empty() && now.iter().all(|p| !first.contains(p)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "connections past their lifetime still open: {first:?} {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The password served is the database's.
    let p = password(&c, &root, "pooled").await;
    assert!(pg.can_log_in("pooled", &p).await);
}

/// Two replicas on one PostgreSQL store, both with the scheduler running, rotating on
/// demand at once: each rotation is whole or a 409, and both replicas serve the password
/// the database has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_rotate_one_role_at_a_time() {
    let pg = TestPostgres::start();
    pg.psql("CREATE ROLE shared LOGIN PASSWORD 'initial-password'");
    let url = pg.database("replicas");
    let storage = format!("[storage]\ntype = \"postgres\"\nurl = \"{url}\"\npool_size = 4");
    let mounts = format!(
        "{}[[mounts]]\npath = \"database\"\ntype = \"database\"\n[mounts.options]\ncheck_interval = \"1s\"\n\
         [mounts.options.connections.main]\nconnection = \"{}\"\n",
        default_mounts_toml(),
        pg.connection_string("keyvault", "postgres")
    );
    let a = TestServer::start(ServerOptions {
        storage: Some(storage.clone()),
        extra: mounts.clone(),
        ..Default::default()
    });
    let b = TestServer::start(ServerOptions {
        storage: Some(storage),
        token: Some(a.token.clone()),
        skip_init: true,
        extra: mounts,
        ..Default::default()
    });
    let (ca, cb) = (a.client(), b.client());
    let root = a.root.clone();
    let role = json!({"db_name": "main", "username": "shared", "rotation_period": "5s"});
    ok(ca.post("database/static-roles/shared", Some(&root), role).await, 204);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (c, root) = (if i % 2 == 0 { ca.clone() } else { cb.clone() }, root.clone());
            tokio::spawn(async move { c.post("database/rotate-role/shared", Some(&root), json!({})).await.status })
        })
        .collect();
    for t in tasks {
        assert!([204, 409].contains(&t.await.unwrap()));
    }
    // Past a scheduled rotation or two (either replica's scheduler), both agree with the
    // database.
    let first = password(&ca, &root, "shared").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = password(&ca, &root, "shared").await;
        if now != first {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no scheduled rotation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Read both replicas and the database in a window with no rotation between them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (pa, pb) = (password(&ca, &root, "shared").await, password(&cb, &root, "shared").await);
        if pa == pb && pg.can_log_in("shared", &pa).await && password(&ca, &root, "shared").await == pa {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the replicas never agreed with the database");
    }
}
