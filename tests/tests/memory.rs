//! Memory hygiene of a running server (docs/threat-model.md, "Memory"): its memory is
//! locked, it cannot be dumped, and after a secret was written and read back (and after
//! `sys/seal`) the value is nowhere in the process's memory: every buffer that held it
//! (the request body, the decrypted record, the JSON reply, the TLS records) was zeroed
//! when it was freed. The test reads `/proc/<pid>/mem`, which needs root (the test set-up
//! runs as root).

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use keyvault_tests::{DevServer, json};

/// Every place `needle` occurs in the readable, writable memory of process `pid`, as
/// (mapping, offset in it). Read-only mappings are the binary and libraries: a secret
/// value cannot be there.
fn occurrences(pid: u32, needle: &[u8]) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = Vec::new();
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let name = fields.nth(3).unwrap_or("[anonymous]");
        if !perms.starts_with("rw") || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut at = start;
        // Chunks overlap by the needle's length so that an occurrence across a chunk
        // boundary is found.
        let chunk = 1 << 20;
        while at < end {
            let len = chunk.min(end - at) as usize;
            let mut buf = vec![0u8; len];
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf).is_err() {
                break;
            }
            scanned += len as u64;
            for i in memchr::memmem::find_iter(&buf, needle) {
                found.push(format!("{name} {:#x}+{:#x}", start, at - start + i as u64));
            }
            if at + len as u64 >= end {
                break;
            }
            at += (len - needle.len()) as u64;
        }
    }
    assert!(scanned > 1 << 20, "read only {scanned} bytes of the server's memory: is the test root?");
    found
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default().trim().to_owned()
}

#[tokio::test]
async fn a_secret_value_is_gone_from_memory_once_its_request_is_done_and_after_seal() {
    let s = DevServer::start();
    let pid = s.child.id();
    let root = s.root_token.clone();

    // Locked (mlockall as root: allowed) and not dumpable (logged: the state is not
    // visible from outside to root, who may ptrace anything).
    assert_ne!(status_field(pid, "VmLck:"), "0 kB", "the server's memory is not locked");
    let log = s.log_text();
    assert!(log.contains("process hardening: core dumps and ptrace attach disabled"), "{log}");
    assert!(!log.contains("memory is NOT locked"), "{log}");

    // A value that appears nowhere else: 40 random hex digits, built here so that the
    // test's own binary does not carry it.
    let value = format!("mem-{}", hex::encode(rand_bytes()));
    {
        let c = s.client();
        let r = c.put("secret/memory/probe", &root, json!({"value": value})).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = c.get("secret/memory/probe", &root).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["data"]["value"], value.as_str());
        // Positive control: while the server may still hold the reply, the scan can see
        // a value that it does hold: the secret's path is in its storage cache.
        assert!(!occurrences(pid, b"secret/memory/probe").is_empty() || !occurrences(pid, b"memory/probe").is_empty());
    } // the client and its connections are dropped here
    // The server frees a connection's buffers when it notices the close.
    absent_within(pid, value.as_bytes(), "after the request").await;

    // Read again on a fresh connection, then seal: the epoch keys and every cache go.
    let c = s.client();
    let r = c.get("secret/memory/probe", &root).await;
    assert_eq!(r.body["data"]["value"], value.as_str());
    let r = c.post("sys/seal", Some(&root), json!({})).await;
    assert_eq!(r.status, 204, "{r:?}");
    drop(c);
    absent_within(pid, value.as_bytes(), "after seal").await;
}

/// Poll until `needle` is nowhere in the process's memory, for at most 10 s.
async fn absent_within(pid: u32, needle: &[u8], when: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = occurrences(pid, needle);
        if found.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the secret value is still in the server's memory {when}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn hardening_makes_the_process_non_dumpable() {
    assert!(keyvault::hardening::is_dumpable());
    let applied =
        keyvault::hardening::apply(&keyvault::hardening::MemoryConfig { lock: keyvault::hardening::MemoryLock::Off })
            .unwrap();
    assert!(applied.not_dumpable && !applied.locked);
    assert!(!keyvault::hardening::is_dumpable());
}

fn rand_bytes() -> [u8; 20] {
    let mut b = [0u8; 20];
    getrandom::fill(&mut b).unwrap();
    b
}

/// Without `CAP_IPC_LOCK` and with a finite `RLIMIT_MEMLOCK` (an unprivileged service),
/// locking all memory could make a later allocation fail: the server does not lock, says
/// why, and serves (`lock = "try"`); with `lock = "required"` it refuses to start, naming
/// the fix.
#[tokio::test]
async fn without_the_right_to_lock_memory_the_server_warns_or_refuses_as_configured() {
    let mut s = keyvault_tests::server::TestServer::start(Default::default());
    s.stop();
    let unprivileged = |extra: &str| {
        let config = std::fs::read_to_string(&s.config_file).unwrap() + extra;
        let file = s.config_file.with_file_name("unprivileged.toml");
        std::fs::write(&file, config).unwrap();
        let mut cmd = std::process::Command::new("prlimit");
        cmd.args(["--memlock=65536:65536", "setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"])
            .arg(keyvault_tests::keyvault_bin())
            .args(["server", "--config"])
            .arg(&file);
        cmd
    };
    let out = unprivileged("\n[memory]\nlock = \"required\"\n").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without the right to lock memory");
    assert!(err.contains("cannot lock memory") && err.contains("CAP_IPC_LOCK"), "{err}");

    let mut child =
        unprivileged("").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    use std::io::BufRead;
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let listening = stdout.lines().map_while(Result::ok).any(|l| l.contains("KeyVault listening on"));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(listening, "the server did not start: {err}");
    assert!(err.contains("memory is NOT locked") && err.contains("RLIMIT_MEMLOCK"), "{err}");
}
