//! Fixtures shared by Basphere's integration tests (test code only; never a dependency of the
//! product): keys, Unix accounts, namespaces, poll-until, PID-safe kills, and the `basphere serve`,
//! vcsim and PostgreSQL 15 process harnesses.

pub mod keys;
pub mod postgres;
pub mod process;
pub mod server;
pub mod vcsim;

pub use keys::{SSH_BATCH_OPTS, TEST_KEY, keygen};
pub use postgres::Postgres;
pub use process::{kill_child, poll_until, poll_until_blocking, run_ok, signal_child, stop_child};

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True (after printing `SKIPPED: why`) when not root: `if skip_unless_root("…") { return; }`.
pub fn skip_unless_root(why: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED: {why}");
    true
}

/// Where base images for real-VM tests are cached between runs (`BASPHERE_TEST_IMAGES`).
pub fn test_images_dir() -> PathBuf {
    std::env::var_os("BASPHERE_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/basphere-test/images"))
}

/// Deletes network namespace `name` if it exists.
pub fn delete_netns(name: &str) {
    if Path::new("/run/netns").join(name).exists() {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

/// A network namespace the test made (or will make), deleted on drop, also on panic.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.0);
    }
}

/// Removes Unix account `.0` and its home when dropped (an account something else made, e.g.
/// the server's approval); retries while its processes (an ssh session ending) still run.
pub struct AccountGuard(pub String);

impl Drop for AccountGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            let _ = Command::new("userdel").args(["--remove", &self.0]).output();
            if !matches!(nix::unistd::User::from_name(&self.0), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir_all(format!("/home/{}", self.0));
    }
}

/// An unprivileged Unix account made for one test (no home, no login shell), removed on drop.
/// Needs root and `useradd` (Debian's `passwd`).
pub struct UnixAccount {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl UnixAccount {
    /// Makes `<prefix><random hex>`; the prefix says which test made it if one is ever left.
    pub fn create(prefix: &str) -> UnixAccount {
        let mut b = [0u8; 3];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .expect("reading /dev/urandom");
        let name = format!("{prefix}{:02x}{:02x}{:02x}", b[0], b[1], b[2]);
        let st = Command::new("useradd")
            .args([
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(&name)
            .status()
            .expect("useradd (apt-get install passwd)");
        assert!(st.success(), "useradd {name} failed");
        let pw = nix::unistd::User::from_name(&name)
            .expect("reading the passwd database")
            .expect("the account useradd just made");
        UnixAccount {
            name,
            uid: pw.uid.as_raw(),
            gid: pw.gid.as_raw(),
        }
    }

    /// Runs `program args` as this account with an empty environment; (success, stderr).
    pub fn run(&self, program: &str, args: &[&Path]) -> (bool, String) {
        let out = Command::new(program)
            .args(args)
            .uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Tries to read `path` as this account (a file's first byte, a directory's listing).
    pub fn read(&self, path: &Path) -> (bool, String) {
        if path.is_dir() {
            self.run("/bin/ls", &[Path::new("-a"), path])
        } else {
            self.run("/usr/bin/head", &[Path::new("-c1"), path])
        }
    }
}

impl Drop for UnixAccount {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// Every directory and file under `root` (itself included), symlinks left out.
pub fn every_path(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        i += 1;
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
            && let Ok(entries) = std::fs::read_dir(&p)
        {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| !t.is_symlink()) {
                    out.push(e.path());
                }
            }
        }
    }
    out
}
