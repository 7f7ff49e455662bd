//! The classes of an attacker's review, each tested as a class: logins get no more guesses
//! than the limit however they are sent and however a name is spelled, and the limiter's
//! memory is bounded; the transport bounds every connection in time and number; the
//! gateway's signing input splits one way only and bodies never repeat a key; every state
//! change on a named object is safe when 16 copies arrive at once; and the smaller
//! findings (renewal arithmetic, media types, HTTP/2 413, secret id uses, file modes,
//! health detail).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, Value, json, read_until_closed, rss_bytes, tls_connect};
use tokio::io::AsyncWriteExt;

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

async fn bootstrap_token(c: &Client, root: &str, policies: &[&str]) -> String {
    let b = ok(c.post("auth/bootstrap/token", Some(root), json!({ "policies": policies })).await, 200);
    b.body["data"]["bootstrap_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logins_get_no_more_guesses_than_the_limit() {
    let s = TestServer::start(ServerOptions {
        // Room for 300 connections from one address (the limit under test is the login one).
        listener_extra: "max_connections_per_address = 1024".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("auth/userpass/users/alice", Some(&root), json!({"password": "the right passphrase"})).await, 204);

    // 300 wrong passwords at once from one address: exactly the limit (5) get to try.
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                c.post("auth/userpass/login/alice", None, json!({"password": "a wrong passphrase"})).await.status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 5, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 295, "{statuses:?}");

    // Spellings of one name share its counter (and log in as it).
    let other = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.2".parse().unwrap());
    ok(other.post("auth/userpass/login/ALICE", None, json!({"password": "the right passphrase"})).await, 200);
    for name in ["Alice", "%20alice", "aLiCe", "alice%20", "ALICE"] {
        ok(
            other.post(&format!("auth/userpass/login/{name}"), None, json!({"password": "wrong passphrase"})).await,
            401,
        );
    }
    ok(other.post("auth/userpass/login/alice", None, json!({"password": "the right passphrase"})).await, 429);

    // Bootstrap logins are limited per token presented: a unit failing with a bad token
    // does not lock out the others behind the same address.
    let nat = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.3".parse().unwrap());
    for _ in 0..5 {
        ok(nat.post("auth/bootstrap/login", None, json!({"token": "kvb.not-a-real-token"})).await, 401);
    }
    ok(nat.post("auth/bootstrap/login", None, json!({"token": "kvb.not-a-real-token"})).await, 429);
    let good = bootstrap_token(&c, &root, &[]).await;
    ok(nat.post("auth/bootstrap/login", None, json!({"token": good})).await, 200);

    // Revoked credentials answer exactly like wrong ones.
    ok(c.post("auth/approle/role/app", Some(&root), json!({})).await, 204);
    let sid = c.secret_id(&root, "app").await;
    ok(c.post("sys/revoke-identity", Some(&root), json!({"role": "app"})).await, 200);
    let four = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.4".parse().unwrap());
    let right = ok(four.post("auth", None, json!({"role": "app", "secret_id": sid})).await, 401);
    let wrong = ok(four.post("auth", None, json!({"role": "app", "secret_id": "0".repeat(64)})).await, 401);
    assert_eq!(right.body, wrong.body);
    assert_eq!(right.body["errors"][0], "invalid credentials");

    // A field the login does not read does not give the same guesses a fresh counter.
    ok(c.post("auth/approle/role/web", Some(&root), json!({})).await, 204);
    let role_id = ok(c.get("auth/approle/role/web/role-id", &root).await, 200).body["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let five = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.5".parse().unwrap());
    for i in 0..5 {
        let body = json!({"role_id": role_id, "secret_id": "0".repeat(64), "name": format!("n{i}")});
        ok(five.post("auth/approle/login", None, body).await, 401);
    }
    let body = json!({"role_id": role_id, "secret_id": "0".repeat(64), "name": "n5"});
    ok(five.post("auth/approle/login", None, body).await, 429);
    // Nor does a field of another type, which the login ignores as well.
    let body = json!({"role_id": role_id, "secret_id": "0".repeat(64), "name": 0});
    ok(five.post("auth/approle/login", None, body).await, 429);
    // A role named by its name or by its role id is one identity: guesses by one count
    // against the other (before, each had its own 5).
    let six = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.6".parse().unwrap());
    for i in 0..5 {
        let body = if i % 2 == 0 {
            json!({"role_id": role_id, "secret_id": "0".repeat(64)})
        } else {
            json!({"role": "web", "secret_id": "0".repeat(64)})
        };
        ok(six.post("auth/approle/login", None, body).await, 401);
    }
    ok(six.post("auth/approle/login", None, json!({"role": "web", "secret_id": "0".repeat(64)})).await, 429);
    ok(six.post("auth", None, json!({"role": "web", "secret_id": "0".repeat(64)})).await, 429);
    ok(six.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": "0".repeat(64)})).await, 429);
    // An unknown role id counts as itself (another identity).
    ok(six.post("auth/approle/login", None, json!({"role_id": "no-such-role-id", "secret_id": "x"})).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_bodies_and_limiter_keys_cannot_exhaust_memory() {
    let s = TestServer::start(ServerOptions {
        extra: "[auth.rate_limit]\nfailures_per_role_and_address = 1000\nfailures_per_address = 100000\n".into(),
        ..Default::default()
    });
    let before = rss_bytes(s.child.id());
    // The finding: 210 logins with a unique 1 MB role_id from 10 addresses. Login bodies
    // are capped (64 KiB) before they are parsed: 413, nothing kept.
    let tasks: Vec<_> = (0..10u8)
        .map(|a| {
            let c = Client::from_address(&s.addr, &s.server_ca_file, std::net::IpAddr::from([127, 0, 1, a + 1]));
            tokio::spawn(async move {
                for i in 0..21 {
                    let role_id = format!("{a}-{i}-{}", "x".repeat(1 << 20));
                    let r = c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": "s"})).await;
                    assert_eq!(r.status, 413, "{r:?}");
                }
                // Just under the cap: refused as wrong credentials, remembered as a digest.
                for i in 0..50 {
                    let role_id = format!("{a}-{i}-{}", "y".repeat(60 * 1024));
                    let r = c.post("auth/approle/login", None, json!({"role_id": role_id, "secret_id": "s"})).await;
                    assert_eq!(r.status, 401, "{r:?}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let grown = rss_bytes(s.child.id()).saturating_sub(before);
    assert!(grown < 64 << 20, "the server grew by {} MiB", grown >> 20);
    assert_eq!(s.client().send("GET", "sys/health", None, None).await.status, 200);
}

/// A client with no credential cannot make the server hold a large body for it: a route
/// that needs a caller authenticates it (and checks what its policies allow without the
/// body) before the body is read, so a token-less request
/// sending most of a 1 MB body is answered 401 at once (it used to be read, up to the
/// body timeout, into the budget that every other client's body shares). The bodies of
/// requests that need no token (logins, unseal, wrapping tokens) are small and take
/// room of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_without_a_credential_is_not_read() {
    use tokio::io::AsyncReadExt;
    let s = TestServer::start(ServerOptions {
        listener_extra: "body_timeout = \"3s\"\nmax_body_bytes_in_flight = 2097152".into(),
        ..Default::default()
    });
    // A token whose policies do not allow the write is refused before its body as well.
    let reader = json!({"policy": "path \"secret/*\" { capabilities = [\"read\"] }"});
    ok(s.client().put("sys/policies/acl/reader", &s.root, reader).await, 204);
    let made = ok(s.client().post("auth/token/create", Some(&s.root), json!({"policies": ["reader"]})).await, 200);
    let reader = format!("X-Vault-Token: {}\r\n", made.body["auth"]["client_token"].as_str().unwrap());
    for token in ["", "X-Vault-Token: kv.forged\r\n", reader.as_str()] {
        let mut conn = tls_connect(&s.addr, &s.server_ca_file, None).await;
        let head = format!("PUT /v1/secret/held HTTP/1.1\r\nHost: localhost\r\n{token}Content-Length: 1000000\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&vec![b' '; 600_000]).await.unwrap();
        let mut reply = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut reply)).await.expect("an answer").unwrap();
        let reply = String::from_utf8_lossy(&reply[..n]);
        assert!(reply.starts_with("HTTP/1.1 401") || reply.starts_with("HTTP/1.1 403"), "{token:?}: {reply}");
    }
    ok(s.client().get("secret/held", &s.root).await, 404);
}

/// A caller is authenticated before its body is read, and again after it if the body
/// took over a second: a token revoked while its request's body was still arriving is
/// refused, as it would be on a request that came a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_revoked_while_its_body_arrives_is_refused() {
    use tokio::io::AsyncReadExt;
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let writer = json!({"policy": "path \"secret/*\" { capabilities = [\"create\", \"update\"] }"});
    ok(c.put("sys/policies/acl/writer", &s.root, writer).await, 204);
    let made = ok(c.post("auth/token/create", Some(&s.root), json!({"policies": ["writer"]})).await, 200);
    let t = made.body["auth"]["client_token"].as_str().unwrap().to_owned();
    let body = br#"{"value":"written-after-revocation"}"#;
    let mut conn = tls_connect(&s.addr, &s.server_ca_file, None).await;
    let head = format!(
        "PUT /v1/secret/slow HTTP/1.1\r\nHost: localhost\r\nX-Vault-Token: {t}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body[..10]).await.unwrap();
    ok(c.post("auth/token/revoke", Some(&s.root), json!({ "token": t })).await, 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    conn.write_all(&body[10..]).await.unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut reply)).await.expect("an answer").unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 401") || reply.starts_with("HTTP/1.1 403"), "{reply}");
    ok(c.get("secret/slow", &s.root).await, 404);
}

/// The budget of body bytes being received counts what clients send, not what they
/// announce: bodies declared large (or of unknown length, as every HTTP/2 request and every
/// GET is) and then not sent hold no room, so a few such connections cannot make every
/// other request wait out the body timeout and get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_announced_but_not_sent_do_not_take_the_body_budget() {
    let s = TestServer::start(ServerOptions {
        listener_extra: "body_timeout = \"30s\"\nmax_body_bytes_in_flight = 2097152".into(),
        ..Default::default()
    });
    let mut held = Vec::new();
    for i in 0..8 {
        let mut conn = tls_connect(&s.addr, &s.server_ca_file, None).await;
        let head = if i % 2 == 0 {
            format!("PUT /v1/secret/held{i} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n{{")
        } else {
            format!(
                "PUT /v1/secret/held{i} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n"
            )
        };
        conn.write_all(head.as_bytes()).await.unwrap();
        held.push(conn);
    }
    // Let the server take them in before the requests that must not wait behind them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = s.client();
    // Well within the 30 s body timeout that the held bodies would keep their room for.
    let within = Duration::from_secs(10);
    let r = tokio::time::timeout(within, c.put("secret/after", &s.root, json!({"value": "v"})))
        .await
        .expect("a small write is answered while bodies are held open");
    assert_eq!(r.status, 200, "{r:?}");
    let r = tokio::time::timeout(within, c.get("secret/after", &s.root)).await.expect("a read is answered");
    assert_eq!(r.status, 200, "{r:?}");
    // A large body still fits: 600 KB of the 2 MiB budget (its buffer grows to 1 MiB).
    let big = "x".repeat(600_000);
    let r = tokio::time::timeout(within, c.put("secret/big", &s.root, json!({"value": big.clone()})))
        .await
        .expect("a large write is answered");
    assert_eq!(r.status, 200, "{r:?}");
    let r = c.get("secret/big", &s.root).await;
    assert_eq!(r.body["data"]["value"].as_str().map(str::len), Some(big.len()));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_connection_is_bounded_in_time_and_number() {
    let s = TestServer::start(ServerOptions {
        listener_extra: "handshake_timeout = \"2s\"\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\n\
                         idle_timeout = \"1s\"\nmax_connections_per_address = 20"
            .into(),
        ..Default::default()
    });
    let within = Duration::from_secs(6);

    // Slowloris: headers that never end. The connection is closed.
    let mut slow = tls_connect(&s.addr, &s.server_ca_file, None).await;
    slow.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    let (_, closed) = read_until_closed(&mut slow, within).await;
    assert!(closed, "half-sent headers are cut off");

    // A body that stops coming: 408, then closed.
    let mut stalled = tls_connect(&s.addr, &s.server_ca_file, None).await;
    stalled
        .write_all(
            format!(
                "PUT /v1/secret/slow HTTP/1.1\r\nHost: localhost\r\nX-Vault-Token: {}\r\nContent-Length: 1000\r\n\r\n{{\"v\":",
                s.root
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (reply, closed) = read_until_closed(&mut stalled, within).await;
    assert!(closed, "a stalled body is cut off");
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&reply));

    // An idle keep-alive connection is closed.
    let mut idle = tls_connect(&s.addr, &s.server_ca_file, None).await;
    idle.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let (reply, closed) = read_until_closed(&mut idle, within).await;
    assert!(closed, "an idle connection is closed");
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));

    // A flood from one address (connections that never handshake) takes its 20 and no
    // more; another client keeps getting answers; the flood's connections are closed
    // when their handshake time is up.
    let mut flood = Vec::new();
    for _ in 0..200 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 9], 0).into()).unwrap();
        let port: u16 = s.addr.rsplit(':').next().unwrap().parse().unwrap();
        flood.push(socket.connect(([127, 0, 0, 1], port).into()).await.unwrap());
    }
    let other = Client::from_address(&s.addr, &s.server_ca_file, "127.0.0.10".parse().unwrap());
    for _ in 0..20 {
        assert_eq!(other.send("GET", "sys/health", None, None).await.status, 200);
    }
    let mut closed_at_once = 0;
    for conn in &mut flood[20..] {
        if read_until_closed(conn, Duration::from_secs(2)).await.1 {
            closed_at_once += 1;
        }
    }
    assert_eq!(closed_at_once, 180, "connections over the per-address limit are closed at once");
    for conn in &mut flood[..20] {
        assert!(read_until_closed(conn, within).await.1, "a handshake that never comes is cut off");
    }
    let log = s.log_text();
    let refusals = log.matches("connection refused: too many connections").count();
    assert!((1..=10).contains(&refusals), "refusals are logged at most once a second: {refusals}");
}

/// Write `next(i)` for i = 0, 1, ... every `every`, reading whatever the server sends,
/// until the server closes the connection (true) or `within` passes (false).
async fn kept_open_by(
    conn: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    mut next: impl FnMut(usize) -> Option<Vec<u8>>,
    every: Duration,
    within: Duration,
) -> bool {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    let mut i = 0;
    while started.elapsed() < within {
        if let Some(chunk) = next(i)
            && (conn.write_all(&chunk).await.is_err() || conn.flush().await.is_err())
        {
            return true;
        }
        i += 1;
        let until = tokio::time::Instant::now() + every;
        loop {
            match tokio::time::timeout_at(until, conn.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
    false
}

/// The protocol served is the one ALPN chose, and on HTTP/2 only requests keep a
/// connection open, not bytes: an HTTP/1.1 head trickled on a connection that
/// negotiated h2, a client that only sends PINGs (which the server answers), and a
/// HEADERS frame that never ends are all closed (header and idle timeouts of 1 s; each
/// client keeps sending for up to 8 s). Before, each held its connection for as long as
/// it kept sending a byte now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_kept_open_by_requests_not_by_bytes() {
    let s = TestServer::start(ServerOptions {
        listener_extra: "header_timeout = \"1s\"\nidle_timeout = \"1s\"".into(),
        ..Default::default()
    });
    let (every, within) = (Duration::from_millis(300), Duration::from_secs(8));
    let head = b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut h1 = keyvault_tests::tls_connect_h2(&s.addr, &s.server_ca_file).await;
    assert!(
        kept_open_by(&mut h1, |i| head.get(i).map(|b| vec![*b]), every, within).await,
        "HTTP/1.1 trickled over h2 is cut off"
    );

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let start = [PREFACE.to_vec(), frame(4, 0, 0, &[])].concat();
    let mut pings = keyvault_tests::tls_connect_h2(&s.addr, &s.server_ca_file).await;
    let ping = frame(6, 0, 0, &[7; 8]);
    assert!(
        kept_open_by(&mut pings, |i| Some(if i == 0 { start.clone() } else { ping.clone() }), every, within).await,
        "a client that only PINGs is closed"
    );

    // HEADERS without END_HEADERS, then CONTINUATION frames of one byte each (a literal
    // header field, never finished).
    let mut trickled = keyvault_tests::tls_connect_h2(&s.addr, &s.server_ca_file).await;
    let headers = frame(1, 0x1, 1, &[0x00, 0x7f]);
    assert!(
        kept_open_by(
            &mut trickled,
            |i| Some(match i {
                0 => [start.clone(), headers.clone()].concat(),
                _ => frame(9, 0, 1, b"a"),
            }),
            every,
            within
        )
        .await,
        "a HEADERS frame trickled in is cut off"
    );
    // A real HTTP/2 client is served.
    let r = s.client().send("GET", "sys/health", None, None).await;
    assert_eq!(r.status, 200);
}

/// An HTTP/2 connection that sends no request is closed after the header timeout, not
/// the idle timeout: completing handshakes and then staying silent cannot hold the
/// connection cap's slots for a minute each (header timeout 1 s, idle timeout 60 s here;
/// before, such a connection lasted the full idle timeout). (Connections that were served
/// keep the idle timeout: `http2_connections_are_kept_open_by_requests_not_by_bytes`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_sends_no_request_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(ServerOptions {
        listener_extra: "header_timeout = \"1s\"\nidle_timeout = \"60s\"".into(),
        ..Default::default()
    });
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let mut silent = keyvault_tests::tls_connect_h2(&s.addr, &s.server_ca_file).await;
    silent.write_all(&[PREFACE, &settings].concat()).await.unwrap();
    let opened = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("a silent HTTP/2 connection is still open after 20 s"),
        }
    }
    assert!(opened.elapsed() >= Duration::from_millis(900), "closed before the header timeout");
}

/// One HTTP/1.1 reply read off a raw connection (its head and `Content-Length` bytes).
async fn read_reply(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.expect("a reply").unwrap();
        assert!(n > 0, "the connection closed before its reply: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
}

/// The header timeout bounds a request's head, not the wait between requests: a
/// keep-alive connection quiet for longer than the header timeout (but not the idle
/// timeout) serves its next request; a head that trickles in byte by byte (so the
/// connection is never idle) and a first request that never starts are cut off after the
/// header timeout. (hyper's own timer closed keep-alive connections after the header
/// timeout, without a reply, racing clients that reused them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_timeout_bounds_request_heads_not_keep_alive() {
    let s = TestServer::start(ServerOptions {
        listener_extra: "header_timeout = \"1s\"\nidle_timeout = \"6s\"".into(),
        ..Default::default()
    });
    let health = b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\n\r\n";

    let mut kept = tls_connect(&s.addr, &s.server_ca_file, None).await;
    kept.write_all(health).await.unwrap();
    assert!(read_reply(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    kept.write_all(health).await.unwrap();
    assert!(read_reply(&mut kept).await.starts_with("HTTP/1.1 200"), "the kept-alive connection serves again");

    let trickle = tls_connect(&s.addr, &s.server_ca_file, None).await;
    let (mut rd, mut wr) = tokio::io::split(trickle);
    let started = std::time::Instant::now();
    let reader = tokio::spawn(async move { read_until_closed(&mut rd, Duration::from_secs(5)).await });
    wr.write_all(b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    while !reader.is_finished() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if wr.write_all(b"a").await.is_err() {
            break;
        }
    }
    let (reply, closed) = reader.await.unwrap();
    assert!(closed && reply.is_empty(), "a trickled head is cut off: {}", String::from_utf8_lossy(&reply));
    assert!(started.elapsed() < Duration::from_secs(4), "cut off by the header timeout, not later");

    let mut silent = tls_connect(&s.addr, &s.server_ca_file, None).await;
    let started = std::time::Instant::now();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(4), "a first request that never starts is cut off");
}

struct Producer {
    key: SigningKey,
    cert: String,
}

impl Producer {
    fn item(&self, id: &str, ts: &str, nonce: &str, body: &[u8]) -> Value {
        let msg = keyvault_api::gateway::signing_input(ts, nonce, body);
        self.item_with_signature(id, ts, nonce, body, &self.key.sign(&msg).to_bytes())
    }

    fn item_with_signature(&self, id: &str, ts: &str, nonce: &str, body: &[u8], sig: &[u8]) -> Value {
        json!({"identity": id, "cert_sha256": self.cert, "timestamp": ts, "nonce": nonce,
               "signature": STANDARD.encode(sig), "body": STANDARD.encode(body)})
    }
}

#[tokio::test]
async fn the_gateway_signing_input_and_bodies_read_one_way_only() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let p = Producer { key: SigningKey::from_bytes(&[5; 32]), cert: "cd".repeat(32) };
    let tenant = "t-1";
    let register = |skew: u64, ttl: u64| {
        json!({"cert_sha256": [p.cert], "keys": [{"key_id": "k", "public_key": STANDARD.encode(p.key.verifying_key().as_bytes())}],
               "operator_tenants": {"op-1": tenant}, "clock_skew_seconds": skew, "nonce_ttl_seconds": ttl})
    };
    // A nonce must outlive every timestamp that can be accepted: 2 x skew + 1 seconds.
    ok(c.post("gateway/producers/sensor", Some(&root), register(1, 2)).await, 400);
    ok(c.post("gateway/producers/sensor", Some(&root), register(1, 3)).await, 204);
    ok(c.post("gateway/producers/sensor", Some(&root), register(30, 24 * 3600 + 1)).await, 400);
    ok(c.post("gateway/producers/sensor", Some(&root), register(30, 120)).await, 204);
    let verify = |item: Value| {
        let (c, root) = (c.clone(), root.clone());
        async move { c.post("gateway/verify", Some(&root), item).await }
    };
    let ts = now().to_string();
    // The finding: a captured request with nonce N and body `xyz.rest`, replayed as nonce
    // `N.xyz` and body `rest` (the same signing input). Nonces are [A-Za-z0-9_-] only.
    let nonce = "nonce-aaaaaaaaaaaaaaaa";
    let body = br#"xyz.{"tenant_id":"t-1"}"#;
    let item = p.item("sensor", &ts, nonce, body);
    let r = verify(item.clone()).await;
    assert_eq!(r.body["data"]["reason"], "tenant_mapping_violation", "{r:?}");
    let sig = STANDARD.decode(item["signature"].as_str().unwrap()).unwrap();
    let shifted = p.item_with_signature("sensor", &ts, &format!("{nonce}.xyz"), br#"{"tenant_id":"t-1"}"#, &sig);
    let r = verify(shifted).await;
    assert_eq!((r.status, r.body["data"]["reason"].as_str()), (400, Some("malformed_request")), "{r:?}");
    for bad in ["short", "has space in it 0123", "dots.are.not.allowed", "ünïcödé-nonce-0123456", &"n".repeat(129)]
    {
        let r = verify(p.item("sensor", &ts, bad, b"{}")).await;
        assert_eq!((r.status, r.body["data"]["reason"].as_str()), (400, Some("malformed_request")), "{bad}: {r:?}");
    }
    for bad_ts in ["+123", "12.5", " 1", "0x10", ""] {
        let r = verify(p.item("sensor", bad_ts, "nonce-bbbbbbbbbbbbbbbb", b"{}")).await;
        assert_eq!(r.status, 400, "{bad_ts}: {r:?}");
    }
    // A signed body with a repeated key is refused: a consumer taking the first
    // `tenant_id` would see another tenant than the check did.
    let dup = br#"{"tenant_id":"t-2","tenant_id":"t-1","operator_id":"op-1","campaign_id":"c","signed_metadata":{"tenant_id":"t-1","operator_id":"op-1","campaign_id":"c"}}"#;
    let r = verify(p.item("sensor", &ts, "nonce-cccccccccccccccc", dup)).await;
    assert_eq!(r.body["data"]["reason"], "tenant_mapping_violation", "{r:?}");
    let good = br#"{"tenant_id":"t-1","operator_id":"op-1","campaign_id":"c","signed_metadata":{"tenant_id":"t-1","operator_id":"op-1","campaign_id":"c"}}"#;
    ok(verify(p.item("sensor", &ts, "nonce-dddddddddddddddd", good)).await, 200);
    // Every request body: a repeated key is 400 and changes nothing.
    for (path, body) in [
        ("secret/dup", r#"{"value":"a","value":"b"}"#),
        ("secret/dup", r#"{"a":{"x":1,"x":2}}"#),
        ("sys/policies/acl/dup", r#"{"policy":"path \"a\" { capabilities = [\"read\"] }","policy":"x"}"#),
        ("auth/approle/role/dup", r#"{"token_policies":["a"],"token_policies":["b"]}"#),
        ("gateway/verify", r#"{"identity":"sensor","identity":"other"}"#),
    ] {
        let r = c.send("POST", path, Some(&root), Some(body.as_bytes().to_vec())).await;
        assert_eq!(r.status, 400, "{path} {body}: {r:?}");
        assert!(r.body["errors"][0].as_str().unwrap().contains("duplicate key"), "{r:?}");
    }
    ok(c.get("secret/dup", &root).await, 404);
    ok(c.get("auth/approle/role/dup", &root).await, 404);
}

/// Producer signatures are domain-separated: a producer registered now accepts only
/// signatures over the tagged input (`keyvault/gateway/request/v1\n...`), so a signature its
/// key made over the same bytes without the tag (for another protocol, or by a signer of
/// before the tag) is 401 `invalid_signature`. A producer set to `tagged_or_untagged` (what
/// one registered before the tag is) accepts both, alone and mixed in a batch, and keeps
/// that when replaced by a write that leaves the field out.
#[tokio::test]
async fn gateway_signatures_are_domain_separated() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let p = Producer { key: SigningKey::from_bytes(&[6; 32]), cert: "ef".repeat(32) };
    let register = |extra: Value| {
        let mut b = json!({"cert_sha256": [p.cert], "keys": [{"key_id": "k",
            "public_key": STANDARD.encode(p.key.verifying_key().as_bytes())}]});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let untagged = |id: &str, nonce: &str| {
        let ts = now().to_string();
        let msg = keyvault_api::gateway::untagged_signing_input(&ts, nonce, b"{}");
        p.item_with_signature(id, &ts, nonce, b"{}", &p.key.sign(&msg).to_bytes())
    };
    let tagged = |id: &str, nonce: &str| p.item(id, &now().to_string(), nonce, b"{}");
    let verdict = |r: Reply| (r.status, r.body["data"]["reason"].as_str().map(str::to_owned));

    ok(c.post("gateway/producers/new", Some(&root), register(json!({}))).await, 204);
    let r = ok(c.get("gateway/producers/new", &root).await, 200);
    assert_eq!(r.body["data"]["signing_input"], "tagged");
    let r = c.post("gateway/verify", Some(&root), untagged("new", "nonce-new-000000000001")).await;
    assert_eq!(verdict(r), (401, Some("invalid_signature".into())));
    ok(c.post("gateway/verify", Some(&root), tagged("new", "nonce-new-000000000002")).await, 200);

    let legacy = json!({"signing_input": "tagged_or_untagged"});
    ok(c.post("gateway/producers/old", Some(&root), register(legacy)).await, 204);
    ok(c.post("gateway/verify", Some(&root), untagged("old", "nonce-old-000000000001")).await, 200);
    ok(c.post("gateway/verify", Some(&root), tagged("old", "nonce-old-000000000002")).await, 200);
    let batch = json!({"batch": [untagged("old", "nonce-old-000000000003"), tagged("old", "nonce-old-000000000004"),
        untagged("old", "nonce-old-000000000005"), untagged("new", "nonce-new-000000000003")]});
    let r = ok(c.post("gateway/verify", Some(&root), batch).await, 200);
    let statuses: Vec<u64> =
        r.body["data"]["batch_results"].as_array().unwrap().iter().map(|v| v["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 200, 200, 401], "{r:?}");
    // Replaced without the field: it keeps accepting both. Set to `tagged`: no longer.
    ok(c.post("gateway/producers/old", Some(&root), register(json!({"clock_skew_seconds": 20}))).await, 204);
    let r = ok(c.get("gateway/producers/old", &root).await, 200);
    assert_eq!(r.body["data"]["signing_input"], "tagged_or_untagged");
    ok(c.post("gateway/verify", Some(&root), untagged("old", "nonce-old-000000000006")).await, 200);
    ok(c.post("gateway/producers/old", Some(&root), register(json!({"signing_input": "tagged"}))).await, 204);
    let r = c.post("gateway/verify", Some(&root), untagged("old", "nonce-old-000000000007")).await;
    assert_eq!(verdict(r), (401, Some("invalid_signature".into())));
    ok(c.post("gateway/verify", Some(&root), tagged("old", "nonce-old-000000000008")).await, 200);
    // An unknown choice is refused.
    let r = c.post("gateway/producers/odd", Some(&root), register(json!({"signing_input": "none"}))).await;
    assert_eq!(r.status, 400, "{r:?}");

    // 16 writes at once: the producer left is one of them whole (its skew with its
    // choice). Then 16 writes that leave the field out: none of them resets the choice.
    let writes = |field: bool| {
        let (c, root, register) = (c.clone(), root.clone(), &register);
        (0..16).map(move |i| {
            let (c, root) = (c.clone(), root.clone());
            let mut extra = json!({"clock_skew_seconds": 10 + i});
            if field {
                extra["signing_input"] = json!(if i % 2 == 0 { "tagged" } else { "tagged_or_untagged" });
            }
            let body = register(extra);
            async move { c.post("gateway/producers/old", Some(&root), body).await.status }
        })
    };
    // (A write that loses a race is 409 and changes nothing.)
    let statuses = futures_util::future::join_all(writes(true)).await;
    assert!(statuses.iter().all(|st| [204, 409].contains(st)), "{statuses:?}");
    let r = ok(c.get("gateway/producers/old", &root).await, 200);
    let winner = r.body["data"]["clock_skew_seconds"].as_u64().unwrap() - 10;
    assert_eq!(statuses[winner as usize], 204, "the producer left is an acknowledged write: {statuses:?}");
    let choice = if winner.is_multiple_of(2) { "tagged" } else { "tagged_or_untagged" };
    assert_eq!(r.body["data"]["signing_input"], choice, "the write of skew {} whole: {r:?}", winner + 10);
    let r = c.post("gateway/verify", Some(&root), untagged("old", "nonce-old-000000000009")).await;
    assert_eq!(r.status, if winner.is_multiple_of(2) { 401 } else { 200 }, "{r:?}");
    ok(
        c.post("gateway/producers/old", Some(&root), register(json!({"signing_input": "tagged_or_untagged"}))).await,
        204,
    );
    let statuses = futures_util::future::join_all(writes(false)).await;
    assert!(statuses.iter().all(|st| [204, 409].contains(st)) && statuses.contains(&204), "{statuses:?}");
    let r = ok(c.get("gateway/producers/old", &root).await, 200);
    assert_eq!(r.body["data"]["signing_input"], "tagged_or_untagged", "{r:?}");
    ok(c.post("gateway/verify", Some(&root), untagged("old", "nonce-old-000000000010")).await, 200);
}

/// The signed input names no producer, so a nonce is spent for the key that verified it
/// too: two producers that trust one key (a unit moving to a new identity, or two naming
/// one transit key) accept one signed request once between them, not once each, also
/// in one batch and when 16 copies arrive at once under both names.
#[tokio::test]
async fn a_signed_request_is_accepted_once_by_the_producers_that_share_its_key() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let p = Producer { key: SigningKey::from_bytes(&[7; 32]), cert: "ab".repeat(32) };
    let register = json!({"cert_sha256": [p.cert], "keys": [{"key_id": "k",
        "public_key": STANDARD.encode(p.key.verifying_key().as_bytes())}]});
    for name in ["unit-old", "unit-new"] {
        ok(c.post(&format!("gateway/producers/{name}"), Some(&root), register.clone()).await, 204);
    }
    let reason = |r: &Reply| r.body["data"]["reason"].as_str().map(str::to_owned);
    let ts = now().to_string();
    let nonce = "nonce-shared-00000001";
    ok(c.post("gateway/verify", Some(&root), p.item("unit-old", &ts, nonce, b"{}")).await, 200);
    let r = c.post("gateway/verify", Some(&root), p.item("unit-new", &ts, nonce, b"{}")).await;
    assert_eq!((r.status, reason(&r)), (409, Some("replay".into())), "{r:?}");
    // A nonce of one producer does not spend another key's: a second key, same nonce.
    let q = Producer { key: SigningKey::from_bytes(&[8; 32]), cert: p.cert.clone() };
    let other = json!({"cert_sha256": [q.cert], "keys": [{"key_id": "k",
        "public_key": STANDARD.encode(q.key.verifying_key().as_bytes())}]});
    ok(c.post("gateway/producers/unit-other", Some(&root), other).await, 204);
    ok(c.post("gateway/verify", Some(&root), q.item("unit-other", &ts, nonce, b"{}")).await, 200);
    // One producer with two keys (a rotation window): a nonce spent under one of its keys
    // is spent for the producer, whichever key signs it again.
    let both = json!({"cert_sha256": [p.cert], "keys": [
        {"key_id": "k1", "public_key": STANDARD.encode(p.key.verifying_key().as_bytes())},
        {"key_id": "k2", "public_key": STANDARD.encode(q.key.verifying_key().as_bytes())}]});
    ok(c.post("gateway/producers/unit-two-keys", Some(&root), both).await, 204);
    let nonce = "nonce-shared-00000004";
    ok(c.post("gateway/verify", Some(&root), p.item("unit-two-keys", &ts, nonce, b"{}")).await, 200);
    let r = c.post("gateway/verify", Some(&root), q.item("unit-two-keys", &ts, nonce, b"{}")).await;
    assert_eq!((r.status, reason(&r)), (409, Some("replay".into())), "{r:?}");
    // In one batch: the first wins.
    let nonce = "nonce-shared-00000002";
    let batch = json!({"batch": [p.item("unit-new", &ts, nonce, b"{}"), p.item("unit-old", &ts, nonce, b"{}")]});
    let r = ok(c.post("gateway/verify", Some(&root), batch).await, 200);
    let statuses: Vec<u64> =
        r.body["data"]["batch_results"].as_array().unwrap().iter().map(|v| v["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 409], "{r:?}");
    // 16 copies at once, half under each name: one is accepted.
    let nonce = "nonce-shared-00000003";
    let copies = (0..16).map(|i| {
        let (c, root) = (c.clone(), root.clone());
        let item = p.item(if i % 2 == 0 { "unit-old" } else { "unit-new" }, &ts, nonce, b"{}");
        async move { c.post("gateway/verify", Some(&root), item).await.status }
    });
    let statuses = futures_util::future::join_all(copies).await;
    assert_eq!(statuses.iter().filter(|st| **st == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|st| [200, 409].contains(st)), "{statuses:?}");
}

/// Fire `n` copies of one request at once; the statuses.
async fn copies(c: &Client, n: usize, method: &'static str, path: &str, token: &str, body: Value) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, path, token, body) = (c.clone(), path.to_owned(), token.to_owned(), body.clone());
            tokio::spawn(async move { c.send(method, &path, Some(&token), Some(body.to_string().into_bytes())).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.status < 300 || r.status == 409 || r.status == 404, "{method} {path}: {r:?}");
        out.push(r.status);
    }
    assert!(out.iter().any(|s| *s < 300), "{method} {path}: one copy wins: {out:?}");
    out
}

/// One role namespace across auth methods, under concurrent creates and deletes of one
/// name: afterwards a role exists exactly when its name is taken, so another method can
/// take the name only when no role has it. (A delete removed the role, then released the
/// name: a create between the two kept its role, and lost its name.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_role_creates_and_deletes_keep_one_namespace() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    for round in 0..12 {
        let name = format!("ns{round}");
        ok(c.post(&format!("auth/approle/role/{name}"), Some(&root), json!({})).await, 204);
        let changes = (0..16).map(|i| {
            let (c, root, path) = (c.clone(), root.clone(), format!("auth/approle/role/{name}"));
            async move {
                if i % 2 == 0 {
                    c.post(&path, Some(&root), json!({})).await.status
                } else {
                    c.send("DELETE", &path, Some(&root), None).await.status
                }
            }
        });
        let statuses = futures_util::future::join_all(changes).await;
        assert!(statuses.iter().all(|st| [204, 404, 409].contains(st)), "{statuses:?}");
        let exists = c.get(&format!("auth/approle/role/{name}"), &root).await.status == 200;
        let other =
            c.post(&format!("auth/cert/role/{name}"), Some(&root), json!({"allowed_common_names": ["x"]})).await;
        assert_eq!(other.status, if exists { 409 } else { 204 }, "approle role there: {exists}; {other:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_copies_of_every_change_leave_usable_objects() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let versions = |r: &Reply| -> Vec<String> {
        let mut v: Vec<String> = r.body["data"]["keys"].as_object().unwrap().keys().cloned().collect();
        v.sort_by_key(|x| x.parse::<u32>().unwrap());
        v
    };
    let objects = |prefix: &str| -> Vec<String> {
        let mut v: Vec<String> = s
            .token_keys(prefix)
            .into_iter()
            .map(|l| l.rsplit('/').next().unwrap().trim_start_matches('v').to_owned())
            .collect();
        v.sort_by_key(|x| x.parse::<u32>().unwrap());
        v
    };
    let round_trip = |name: &'static str| {
        let (c, root) = (c.clone(), root.clone());
        async move {
            let ct =
                ok(c.post(&format!("transit/encrypt/{name}"), Some(&root), json!({"plaintext": "aGk="})).await, 200)
                    .body["data"]["ciphertext"]
                    .clone();
            let r = ok(c.post(&format!("transit/decrypt/{name}"), Some(&root), json!({"ciphertext": ct})).await, 200);
            assert_eq!(r.body["data"]["plaintext"], "aGk=");
        }
    };

    ok(c.post("transit/keys/k16b", Some(&root), json!({})).await, 200);
    // Transit: create, rotate (the finding: a losing rotation destroyed the winner's key),
    // configure, delete.
    copies(&c, 16, "POST", "transit/keys/k16", &root, json!({"type": "aes256-gcm96"})).await;
    round_trip("k16").await;
    let statuses = copies(&c, 16, "POST", "transit/keys/k16/rotate", &root, json!({})).await;
    assert!(statuses.contains(&409), "concurrent rotations lose with 409: {statuses:?}");
    let k = ok(c.get("transit/keys/k16", &root).await, 200);
    assert_eq!(versions(&k), objects("keyvault/transit/k16/"), "the token holds exactly the versions the key names");
    assert_eq!(k.body["data"]["latest_version"].as_u64().unwrap() as usize, versions(&k).len());
    round_trip("k16").await;
    copies(&c, 16, "POST", "transit/keys/k16/config", &root, json!({"deletion_allowed": true})).await;
    let statuses = copies(&c, 16, "DELETE", "transit/keys/k16", &root, json!({})).await;
    assert_eq!(statuses.iter().filter(|s| **s == 204).count(), 1, "{statuses:?}");
    assert!(objects("keyvault/transit/k16/").is_empty(), "a deleted key's objects are gone");
    ok(c.get("transit/keys/k16", &root).await, 404);
    // A deleted key's name is held for 3 s (by an entry that expires by the store's
    // clock: here sled's, this machine's): made again after it.
    ok(c.post("transit/keys/k16", Some(&root), json!({"type": "ed25519"})).await, 409);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    copies(&c, 16, "POST", "transit/keys/k16", &root, json!({"type": "ed25519"})).await;
    let k = ok(c.get("transit/keys/k16", &root).await, 200);
    assert_eq!(versions(&k), objects("keyvault/transit/k16/"));

    // Token-signing and master key rotations.
    copies(&c, 16, "POST", "sys/rotate/token-signing", &root, json!({})).await;
    let jwks = ok(c.send("GET", "auth/jwks", None, None).await, 200);
    let mut kids: Vec<String> = jwks.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().trim_start_matches('v').to_owned())
        .collect();
    kids.sort_by_key(|x| x.parse::<u32>().unwrap());
    assert_eq!(kids, objects("keyvault/token-signing/"));
    copies(&c, 16, "POST", "sys/rotate", &root, json!({})).await;
    let mut active = 0;
    keyvault_tests::wait_for(Duration::from_secs(30), "the rotation to finish", || {
        let r = futures_lite_block(c.get("sys/rotate/status", &root));
        active = r.body["data"]["active_version"].as_u64().unwrap();
        r.body["data"]["state"] == "idle"
    })
    .await;
    let expected: Vec<String> = (1..=active).map(|v| v.to_string()).collect();
    assert_eq!(objects("keyvault/master/"), expected);
    ok(c.put("secret/after", &root, json!({"value": "v"})).await, 200);
    ok(c.get("secret/after", &root).await, 200);
    ok(c.post("auth/approle/role/r", Some(&root), json!({})).await, 204);

    // Roles, users, policies, producers: one create wins, the rest 409 or an update.
    let p = SigningKey::from_bytes(&[3; 32]);
    for (path, body) in [
        ("auth/approle/role/r16", json!({"token_ttl": "5m"})),
        ("auth/cert/certs/c16", json!({"allowed_common_names": ["x"]})),
        ("auth/userpass/users/u16", json!({"password": "a long passphrase"})),
        ("sys/policies/acl/p16", json!({"policy": "path \"a\" { capabilities = [\"read\"] }"})),
        (
            "gateway/producers/g16",
            json!({"cert_sha256": ["ab".repeat(32)], "keys": [{"key_id": "k", "public_key": STANDARD.encode(p.verifying_key().as_bytes())}]}),
        ),
    ] {
        copies(&c, 16, "POST", path, &root, body).await;
        ok(c.get(path, &root).await, 200);
    }

    // A key version that state names but the token lacks is an error naming the key
    // (500, counted in health), not "HSM unavailable".
    ok(c.post("transit/keys/gone", Some(&root), json!({})).await, 200);
    round_trip("gone").await;
    {
        use keyvault_hsm::KeyStore;
        let token = keyvault_hsm::Pkcs11KeyStore::open(&s.token).unwrap();
        assert!(token.destroy(&keyvault_hsm::KeyLabel::new("keyvault/transit/gone/v1").unwrap()).unwrap());
    }
    // Destroyed by another process: the server's session copy of the key serves until it
    // checks the token object again (docs/architecture.md, "Session copies").
    tokio::time::sleep(keyvault_hsm::COPY_RECHECK + Duration::from_millis(100)).await;
    let r = ok(c.post("transit/encrypt/gone", Some(&root), json!({"plaintext": "aGk="})).await, 500);
    assert_eq!(r.body["errors"][0], "key keyvault/transit/gone/v1 is missing from the HSM");
    let h = ok(c.send("GET", "sys/health", None, None).await, 200);
    assert!(h.body["missing_key_errors"].as_u64().unwrap() >= 1, "{h:?}");
    round_trip("k16b").await;
}

/// Block on a future from a synchronous closure (the polling helper takes one).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test]
async fn small_findings() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();

    // Renewal arithmetic from client input is checked: 400, not a wrapped sum (on a
    // renewable token: a root token is not).
    let made = ok(c.post("auth/token/create", Some(&root), json!({"policies": []})).await, 200);
    let t = made.body["auth"]["client_token"].as_str().unwrap().to_owned();
    for inc in [json!(18446744073709551615u64), json!("1000000h"), json!(30 * 24 * 3600)] {
        let r = c.post("auth/token/renew-self", Some(&t), json!({ "increment": inc })).await;
        assert_eq!(r.status, 400, "{inc}: {r:?}");
        assert_ne!(r.body["errors"][0], "lease is not renewable");
    }
    ok(c.post("auth/token/renew-self", Some(&t), json!({"increment": "10m"})).await, 200);
    let r = ok(c.post("auth/token/renew-self", Some(&root), json!({"increment": "10m"})).await, 400);
    assert_eq!(r.body["errors"][0], "lease is not renewable");

    // Media types a browser sends across sites without asking are refused.
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/html"] {
        let r = c
            .http
            .put(c.url("secret/ct"))
            .header("X-Vault-Token", &root)
            .header("Content-Type", ct)
            .body(r#"{"value":"v"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 415, "{ct}");
    }
    ok(c.get("secret/ct", &root).await, 404);
    let r = c
        .http
        .put(c.url("secret/ct"))
        .header("X-Vault-Token", &root)
        .header("Content-Type", "application/json; charset=utf-8")
        .body(r#"{"value":"v"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // 413 over HTTP/2 as over HTTP/1.1, whether or not the length is declared.
    let h2 = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&s.server_ca_file).unwrap()).unwrap()])
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let big = format!(r#"{{"value":"{}"}}"#, "x".repeat(3 << 20));
    let r = h2.put(c.url("secret/big")).header("X-Vault-Token", &root).body(big.clone()).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status().as_u16(), 413);
    let stream = futures_stream(big.clone().into_bytes());
    let r = h2
        .put(c.url("secret/big"))
        .header("X-Vault-Token", &root)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    ok(c.get("secret/big", &root).await, 404);

    // Secret ids: a number of uses, taken atomically; and a TTL by default.
    ok(c.post("auth/approle/role/limited", Some(&root), json!({"secret_id_num_uses": 3})).await, 204);
    let r = ok(c.post("auth/approle/role/limited/secret-id", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["secret_id_num_uses"], 3);
    assert_eq!(r.body["data"]["secret_id_ttl"], 7 * 24 * 3600, "a week by default");
    let sid = r.body["data"]["secret_id"].as_str().unwrap().to_owned();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let c = Client::from_address(&s.addr, &s.server_ca_file, std::net::IpAddr::from([127, 0, 2, i + 1]));
            let sid = sid.clone();
            tokio::spawn(async move { c.post("auth", None, json!({"role": "limited", "secret_id": sid})).await.status })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        let st = t.await.unwrap();
        assert!(st == 200 || st == 401, "{st}");
        won += usize::from(st == 200);
    }
    assert_eq!(won, 3, "exactly the allowed number of uses");
    ok(c.post("auth/approle/role/short", Some(&root), json!({"secret_id_ttl": "1s"})).await, 204);
    let r = ok(c.post("auth/approle/role/short/secret-id", Some(&root), json!({})).await, 200);
    assert_eq!(r.body["data"]["secret_id_ttl"], 1);

    // The audit log and its directory are its owner's only.
    let log = s.audit_log();
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(log.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
}

/// The body in 64 KiB chunks with no declared length.
fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(chunks)
}
