//! A throwaway PostgreSQL cluster for a test process: `initdb` in a temporary directory,
//! `postgres` listening only on a Unix socket in that directory (no TCP port to collide
//! with anything), trust authentication for the `keyvault` user. PostgreSQL refuses to
//! run as root, so as root it runs as the `postgres` system user.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct TestPostgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    /// The directory of the server's Unix socket.
    pub socket_dir: PathBuf,
    child: Option<Child>,
}

/// The port number names the socket file (`.s.PGSQL.5432`) in a directory of our own.
const PORT: &str = "5432";

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL is not installed: run the README's test command, which installs it")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// A command that runs as the `postgres` user when we are root.
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    pub fn start() -> TestPostgres {
        let dir = tempfile::Builder::new().prefix("keyvault-pg-").tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(status.success());
        }
        let bin = bin_dir();
        let out = pg_command(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "keyvault", "--auth=trust", "-E", "UTF8", "--no-instructions", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        // The keyvault user needs no password; every other role logs in with its own
        // (the database engine's tests check that a rotated password works and the old
        // one does not).
        std::fs::write(data.join("pg_hba.conf"), "local all keyvault trust\nlocal all all scram-sha-256\n").unwrap();
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        if is_root() {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(&socket_dir).status().unwrap();
            assert!(status.success());
        }
        let mut pg = TestPostgres { _dir: dir, data, bin, socket_dir, child: None };
        pg.run();
        pg
    }

    fn log_path(&self) -> PathBuf {
        self._dir.path().join("postgres.log")
    }

    /// The server's log (appended to by each start).
    fn log_file(&self) -> Stdio {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        Stdio::from(f)
    }

    /// What the server has logged so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Start the server process (again).
    pub fn run(&mut self) {
        let child = pg_command(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", PORT, "-c", "listen_addresses="])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.socket_dir.display()))
            .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
            // Every ALTER ROLE (and every failed statement) in the server's log, which
            // tests read: a password must never be found there.
            .args(["-c", "log_statement=ddl"])
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..200 {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", PORT, "-U", "keyvault"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("PostgreSQL did not start");
    }

    /// Stop the server at once (as a crash or an outage would). If `pg_ctl` cannot, the
    /// postmaster is killed, so that waiting for it cannot hang.
    pub fn halt(&mut self) {
        let stopped = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate", "-w", "-t", "10"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped {
            let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().map(str::to_owned));
            if let Some(pid) = pid {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
            if let Some(c) = &mut self.child {
                let _ = c.kill();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// A libpq connection string for `user` on database `db`, over the Unix socket.
    pub fn connection_string(&self, user: &str, db: &str) -> String {
        format!("host={} port={PORT} user={user} dbname={db}", self.socket_dir.display())
    }

    /// Run SQL as the superuser `keyvault` on database `postgres`.
    pub fn psql(&self, sql: &str) {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", PORT, "-U", "keyvault", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The first column of the first row `sql` returns, as text (run as `keyvault`).
    pub fn query_value(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", PORT, "-U", "keyvault", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Whether `user` can log in with `password`.
    pub async fn can_log_in(&self, user: &str, password: &str) -> bool {
        let mut c: tokio_postgres::Config = self.connection_string(user, "postgres").parse().unwrap();
        c.password(password);
        c.connect(tokio_postgres::NoTls).await.is_ok()
    }

    /// Create a database and return its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", PORT, "-U", "keyvault", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        format!("postgres://keyvault@localhost:{PORT}/{name}?host={}", self.socket_dir.display())
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Wait (up to 30 s) until some session of the cluster waits for a lock that `client`'s
/// own session holds: a statement the test made block on a row or role it holds (a wait
/// on any other lock does not count). `what` names it in the failure.
pub async fn wait_for_a_lock_wait(client: &tokio_postgres::Client, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))", &[])
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never reached the held lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
