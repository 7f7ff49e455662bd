//! Size-limited file systems for tests of a full disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs, unmounted on drop. Mounting needs root (the test command runs
/// as root or with sudo, as it installs packages).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

pub fn as_root(args: &[&str]) -> std::process::ExitStatus {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let mut cmd = if root { Command::new(args[0]) } else { Command::new("sudo") };
    if root {
        cmd.args(&args[1..]);
    } else {
        cmd.arg("-n").args(args);
    }
    cmd.status().unwrap()
}

impl Tmpfs {
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("keyvault-tmpfs-").tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_owned();
        let st = as_root(&["mount", "-t", "tmpfs", "-o", &format!("size={size},mode=0777"), "tmpfs", &path]);
        assert!(st.success(), "mounting a tmpfs needs root (or sudo without a password)");
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fill the file system; returns the filler's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).and_then(|()| f.flush()).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        as_root(&["umount", "-l", self.dir.path().to_str().unwrap()]);
    }
}
