//! The vSphere API simulator (vcsim) as a process: built once by
//! `crates/provider-vsphere/vcsim.sh`, one per test on 127.0.0.1, killed by PID when dropped.

use crate::process::kill_child;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of the vcsim binary, built by `vcsim.sh` on first use when missing.
pub fn vcsim_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../provider-vsphere/vcsim.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run vcsim.sh");
        assert!(
            out.status.success(),
            "{} failed: it needs root (apt-get) and the Debian package archive",
            script.display()
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(
            path.exists(),
            "vcsim.sh printed {path:?}, which does not exist"
        );
        path
    })
    .clone()
}

/// A running vcsim; its log is printed if the test panics or it died, and it is killed when
/// dropped.
pub struct Vcsim {
    child: Child,
    /// SOAP endpoint, `https://127.0.0.1:PORT/sdk`.
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim on a free port of 127.0.0.1 with extra command-line `args`.
    pub fn start(args: &[&str]) -> Vcsim {
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("vcsim.err")).unwrap();
        // vcsim makes its datastores' directories under the temporary directory and never
        // removes them; under `dir` they go with it.
        let mut child = Command::new(vcsim_binary())
            .env("TMPDIR", dir.path())
            .args(["-l", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start vcsim");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let started = Instant::now();
        let mut line = String::new();
        let url = loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0
                || started.elapsed() > Duration::from_secs(20)
            {
                kill_child(&mut child);
                panic!("vcsim exited before printing GOVC_URL");
            }
            if let Some(rest) = line.split("GOVC_URL=").nth(1) {
                let url = rest.split_whitespace().next().unwrap();
                // https://user:pass@127.0.0.1:PORT/sdk -> https://127.0.0.1:PORT/sdk
                let (scheme, rest) = url.split_once("://").unwrap();
                let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
                break format!("{scheme}://{host}");
            }
        };
        assert!(url.contains("://127.0.0.1:"), "vcsim listens on {url}");
        std::thread::spawn(move || for _ in stdout.lines() {});
        Vcsim { child, url, dir }
    }

    /// Whether the simulator is still running (it crashes on some races).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// vcsim's own log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vcsim.err")).unwrap_or_default()
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.alive() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- vcsim log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        kill_child(&mut self.child);
    }
}
