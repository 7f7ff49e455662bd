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
        // It was free a moment ago; another test may have taken it since: a moto_server
        // that could not listen exits, and is started again on another port.
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut m = Moto { child: Command::new("true").spawn().unwrap(), endpoint: String::new(), port: 0 };
        for attempt in 1..=3 {
            m.port = free();
            m.endpoint = format!("http://127.0.0.1:{}", m.port);
            match m.try_spawn() {
                Ok(()) => return m,
                Err(e) if attempt < 3 => eprintln!("moto_server on port {}: {e}; another port", m.port),
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let _ = self.child.wait();
        self.child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let listening = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            // Exited: it could not listen (what answered, if anything, is not moto).
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("moto_server exited ({status})"));
            }
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("moto_server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
