//! moto's server (PyPI `moto[server]`, installed by the README's test command): AWS APIs
//! on a local port, for the AWS Secrets Manager adapter's tests. Stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_bin() -> std::path::PathBuf {
    crate::installed_tool("moto_server", "MOTO_SERVER_BIN")
}

impl Moto {
    pub fn start() -> Moto {
        // moto cannot report a port it picked: take a free one from the OS.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut m =
            Moto { child: Command::new("true").spawn().unwrap(), endpoint: format!("http://127.0.0.1:{port}"), port };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let _ = self.child.wait();
        self.child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
