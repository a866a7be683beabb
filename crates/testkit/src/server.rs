//! A real `basphere serve` process on a temporary data dir, stopped by PID when dropped, and the
//! API fixtures tests use on it (registration, approval, polling a VM).

use crate::keys::TEST_KEY;
use crate::process::{kill_child, poll_until, poll_until_blocking, run_ok, stop_child};
use basphere_client::{Client, Endpoint};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A running server and its data dir.
pub struct Server {
    /// The `basphere` binary (the test crate's `env!("CARGO_BIN_EXE_basphere")`).
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub addr: String,
    pub env: Vec<(String, String)>,
    /// The PostgreSQL server of this test when `BASPHERE_TEST_BACKEND=postgres` (stopped after
    /// the basphere server).
    pub pg: Option<crate::postgres::Postgres>,
}

/// Which backend the servers of this test run use: `postgres` when `BASPHERE_TEST_BACKEND`
/// says so (each server then gets a PostgreSQL 15 of its own), else the embedded SQLite.
pub fn test_backend_is_postgres() -> bool {
    std::env::var("BASPHERE_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A TCP port free on 127.0.0.1 at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts `bin serve` with the do-nothing test provider and `extra` BASPHERE_* settings.
    pub fn start(bin: impl AsRef<Path>, extra: &[(&str, &str)]) -> Server {
        let mut s = Server::new(bin, extra);
        s.spawn_first();
        s
    }

    /// A server's config, data dir (not yet made) and database (on PostgreSQL: a new, empty
    /// one), not started: [`Server::spawn_first`] starts it.
    pub fn new(bin: impl AsRef<Path>, extra: &[(&str, &str)]) -> Server {
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
        let pg = test_backend_is_postgres().then(crate::postgres::Postgres::start);
        if let Some(pg) = &pg {
            env.push((
                "BASPHERE_DATABASE__URL".into(),
                pg.create_database("basphere"),
            ));
        }
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        Server {
            bin: bin.as_ref().to_path_buf(),
            dir,
            child: None,
            socket,
            addr,
            env,
            pg,
        }
    }

    /// Starts a [`Server::new`] and waits until it answers, moving to another port when the
    /// one picked was taken meanwhile.
    pub fn spawn_first(&mut self) {
        for attempt in 0.. {
            match self.try_spawn() {
                Ok(()) => break,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {
                    self.addr = format!("127.0.0.1:{}", free_port());
                    let listen = format!("\"{}\"", self.addr);
                    for (k, v) in self.env.iter_mut() {
                        if k == "BASPHERE_SERVER__LISTEN" && v.contains("127.0.0.1:") {
                            *v = listen.clone();
                        }
                    }
                    let _ = std::fs::remove_file(self.log_path());
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// Runs `bin ARGS` as this server's operator: with its config, data dir and database (no
    /// socket option: the command reads the config).
    pub fn operator(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the server process and waits until it answers.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// [`Server::spawn`], giving the reason (with the server's log) when it does not come up.
    fn try_spawn(&mut self) -> Result<(), String> {
        self.spawn_via(&[])
    }

    /// Starts the server as `launcher… basphere serve` (e.g. `systemd-socket-activate -l
    /// SOCKET`) and waits until it answers; the reason, with its log, when it does not.
    pub fn spawn_via(&mut self, launcher: &[&str]) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = match launcher {
            [] => Command::new(&self.bin),
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
        };
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = self
            .child
            .insert(cmd.spawn().expect("spawn basphere serve"));
        let up = poll_until_blocking(Duration::from_secs(20), Duration::from_millis(25), || {
            if let Some(st) = child.try_wait().unwrap() {
                return Ok(Some(st));
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::net::TcpStream::connect(&self.addr).is_ok()
            {
                return Ok(None);
            }
            Err(())
        });
        match up {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                self.child = None;
                Err(format!("server exited with {st}: {}", self.log()))
            }
            Err(()) => Err(format!("server did not come up: {}", self.log())),
        }
    }

    /// SIGKILLs the server (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
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

    /// The CLI against this server's socket with `args`, not yet run.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("BASPHERE_URL")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the CLI against this server with `args`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().unwrap()
    }

    /// Runs the CLI with `args` and panics with its stderr unless it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        run_ok(&mut self.cli_command(args))
    }

    /// Runs the CLI over the socket as Unix account `pw` (its uid, gid and HOME, no token).
    pub fn cli_as(&self, pw: &nix::unistd::User, args: &[&str]) -> Output {
        self.cli_command(args)
            .uid(pw.uid.as_raw())
            .gid(pw.gid.as_raw())
            .env("HOME", &pw.dir)
            .env_remove("BASPHERE_TOKEN")
            .output()
            .unwrap()
    }

    /// Registers `user` with [`TEST_KEY`] over TCP; asserts it was accepted (200).
    pub async fn register(&self, user: &str) {
        self.register_with(&registration(user)).await;
    }

    /// Registers `user` with public key `key` over TCP; asserts it was accepted (200).
    pub async fn register_key(&self, user: &str, key: &str) {
        self.register_with(&registration_with_key(user, key)).await;
    }

    async fn register_with(&self, body: &Value) {
        let r = self.anon().post("/api/v1/register", body).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    }

    /// POSTs `{}` to `path` as the admin (approve, disable, …); asserts success and returns the
    /// answer's data.
    pub async fn admin_ok(&self, path: &str) -> Value {
        let r = self.root().post(path, &json!({})).await.unwrap();
        assert!(r.body.success, "{path}: {:?}", r.body);
        r.body.data
    }

    /// Approves `user` as the admin; asserts success and returns the answer's data (with the
    /// `enrollment_code`, unless accounts are managed).
    pub async fn approve(&self, user: &str) -> Value {
        self.admin_ok(&format!("/api/v1/users/{user}/approve"))
            .await
    }

    /// Registers and approves `user`, returning a token for them (via enrollment code).
    pub async fn user(&self, user: &str) -> String {
        self.register(user).await;
        let code = self.approve(user).await["enrollment_code"]
            .as_str()
            .unwrap()
            .to_string();
        let r = self
            .anon()
            .post("/api/v1/enroll", &json!({"username": user, "code": code}))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body.data["token"].as_str().unwrap().to_string()
    }

    /// A token of the admin for TCP, named `name`, made over the socket.
    pub async fn admin_token(&self, name: &str) -> String {
        let r = self
            .root()
            .post("/api/v1/tokens", &json!({ "name": name }))
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{:?}", r.body);
        r.body.data["token"].as_str().unwrap().to_string()
    }

    /// Whether the admin sees user `user`.
    pub async fn user_exists(&self, user: &str) -> bool {
        self.root()
            .get(&format!("/api/v1/users/{user}"))
            .await
            .unwrap()
            .status
            == 200
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
    }
}

/// Writes the embedded default config into `dir`: tests never read the host's
/// /etc/basphere/basphere.toml.
pub fn default_config(dir: &Path) -> PathBuf {
    let p = dir.join("basphere.toml");
    std::fs::write(&p, basphere_config::DEFAULT_TOML).unwrap();
    p
}

/// A registration body for `user` with [`TEST_KEY`].
pub fn registration(user: &str) -> Value {
    registration_with_key(user, TEST_KEY)
}

/// A registration body for `user` with public key `key`.
pub fn registration_with_key(user: &str, key: &str) -> Value {
    json!({"username": user, "email": format!("{user}@example.org"), "team": "qa", "public_key": key})
}

/// Polls VM `name` until its status is `want` (or it is gone, if `want` is "gone"), up to `secs`.
pub async fn wait_vm(c: &Client, name: &str, secs: u64, want: &str) -> Value {
    poll_until(
        Duration::from_secs(secs),
        Duration::from_millis(50),
        || async move {
            let r = c.get(&format!("/api/v1/vms/{name}")).await.unwrap();
            if want == "gone" && r.status == 404 {
                return Ok(Value::Null);
            }
            if r.body.success && r.body.data["status"] == want {
                return Ok(r.body.data);
            }
            Err(r.body)
        },
    )
    .await
    .unwrap_or_else(|last| panic!("VM {name} did not reach {want} in {secs}s: {last:?}"))
}

/// Polls operation `op` until `done(operation)` holds, up to `secs`; returns the operation.
pub async fn wait_op(c: &Client, op: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    poll_until(
        Duration::from_secs(secs),
        Duration::from_millis(30),
        || async {
            let w = c
                .get(&format!("/api/v1/operations/{op}"))
                .await
                .unwrap()
                .body
                .data;
            if done(&w) { Ok(w) } else { Err(w) }
        },
    )
    .await
    .unwrap_or_else(|w| panic!("operation {op} did not get there in {secs}s: {w}"))
}

/// `GET path` with `c`; the answer's `data` (the test asserts on it).
pub async fn get_data(c: &Client, path: &str) -> Value {
    c.get(path).await.unwrap().body.data
}

/// The caller's quota usage as (VMs, IPs).
pub async fn quota_usage(c: &Client) -> (u64, u64) {
    let q = get_data(c, "/api/v1/quota").await;
    (
        q["usage"]["vms"].as_u64().unwrap(),
        q["usage"]["ips"].as_u64().unwrap(),
    )
}
