//! Test harness: a real `basphere serve` process on a temporary data dir, killed by PID on drop.
#![allow(dead_code)]

use basphere_client::{Client, Endpoint, Response};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_basphere");

/// A running server and its data dir.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub addr: String,
    pub env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts a server with the do-nothing test provider and `extra` BASPHERE_* settings.
    pub fn start(extra: &[(&str, &str)]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("bsp-test-")
            .tempdir()
            .unwrap();
        // Other users must reach the socket: make the path traversable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("basphere.sock");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut env: Vec<(String, String)> = vec![
            (
                "BASPHERE_CONFIG".into(),
                default_config(dir.path()).display().to_string(),
            ),
            (
                "BASPHERE_DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            ),
            (
                "BASPHERE_SERVER__SOCKET".into(),
                format!("\"{}\"", socket.display()),
            ),
            ("BASPHERE_SERVER__LISTEN".into(), format!("\"{addr}\"")),
            ("BASPHERE_PROVIDER__KIND".into(), "null".into()),
            ("BASPHERE_LOG".into(), "info".into()),
            // Tests register users in bursts; the rate limit has its own attack tests.
            ("BASPHERE_LIMITS__ANON_BURST".into(), "0".into()),
        ];
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        let mut s = Server {
            dir,
            child: None,
            socket,
            addr,
            env,
        };
        s.spawn();
        s
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Starts (or restarts) the server process and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn basphere serve"));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::net::TcpStream::connect(&self.addr).is_ok()
            {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "server exited with {st}: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "server did not come up: {}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        );
    }

    /// SIGKILLs the server (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The admin, over the Unix socket as root.
    pub fn root(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()))
    }

    pub fn anon(&self) -> Client {
        Client::new(Endpoint::Tcp {
            addr: self.addr.clone(),
            token: None,
        })
    }

    pub fn with_token(&self, token: &str) -> Client {
        Client::new(Endpoint::Tcp {
            addr: self.addr.clone(),
            token: Some(token.to_string()),
        })
    }

    /// Runs the CLI against this server with `args`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("BASPHERE_URL")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Registers and approves `user`, returning a token for them (via enrollment code).
    pub async fn user(&self, user: &str) -> String {
        let r = self
            .anon()
            .post("/api/v1/register", &registration(user))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        let r = self
            .root()
            .post(&format!("/api/v1/users/{user}/approve"), &json!({}))
            .await
            .unwrap();
        assert!(r.body.success, "{:?}", r.body);
        let code = r.body.data["enrollment_code"].as_str().unwrap().to_string();
        let r = self
            .anon()
            .post("/api/v1/enroll", &json!({"username": user, "code": code}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body.data["token"].as_str().unwrap().to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix_kill(c.id(), 15);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nix_kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let r = unsafe { libc_kill(pid as i32, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Writes the embedded default config into `dir`: tests never read the host's
/// /etc/basphere/basphere.toml.
pub fn default_config(dir: &Path) -> PathBuf {
    let p = dir.join("basphere.toml");
    std::fs::write(&p, basphere_config::DEFAULT_TOML).unwrap();
    p
}

/// A fresh ed25519 public key line (generated by ssh-keygen into `dir`).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(st.success());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, pubkey.trim().to_string())
}

pub const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@basphere";

pub fn registration(user: &str) -> Value {
    json!({"username": user, "email": format!("{user}@example.org"), "team": "qa", "public_key": KEY})
}

/// Polls a VM until `pred` holds for it (or it is gone, if `gone`), up to `secs`.
pub async fn wait_vm(c: &Client, name: &str, secs: u64, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let r: Response = c.get(&format!("/api/v1/vms/{name}")).await.unwrap();
        if want == "gone" && r.status == 404 {
            return Value::Null;
        }
        if r.body.success && r.body.data["status"] == want {
            return r.body.data;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "VM {name} did not reach {want} in {secs}s: {:?}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
