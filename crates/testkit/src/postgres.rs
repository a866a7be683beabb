//! A real PostgreSQL 15 server (Debian's `postgresql-15`) for tests and benches: a fresh cluster
//! in a temporary dir, listening only on 127.0.0.1 at a free port and on a private socket dir,
//! stopped by its PID and removed when dropped.
//!
//! Run as root (as CI does), the cluster belongs to the `postgres` account: PostgreSQL refuses to
//! run as root. `initdb` and `postgres` are started with `Command::uid`/`gid` (std drops the
//! supplementary groups too), not through `runuser`: so the PID we hold is the postmaster's own,
//! a direct child of ours, which the PID-safe helpers of [`crate::process`] can signal and reap.
//! Not root, the cluster belongs to the current user.

use crate::process::{children_of, kill_marked, poll_until_blocking, stop_child_with};
use crate::server::free_port;
use nix::sys::signal::Signal;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_postgres::NoTls;

/// Where Debian's `postgresql-15` puts `initdb`, `postgres` and `pg_ctl`.
pub const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// How long the server has to accept connections after it is started.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a fast shutdown (SIGINT) may take before the server is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How the cluster is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Keep PostgreSQL's durability (fsync, full-page writes): for benches whose figure is the
    /// cost of a commit. Off (the default) for tests, where a crash of the machine loses nothing.
    pub durable: bool,
    /// `max_connections` (default 250: pools of several replicas in one test).
    pub max_connections: u32,
    /// More server settings (`name=value`), e.g. to preload `pg_stat_statements`.
    pub settings: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durable: false,
            max_connections: 250,
            settings: vec![],
        }
    }
}

/// Why the server could not be started; the message says what to do (and holds the log tail).
#[derive(Debug)]
pub struct PgError(String);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

fn err(msg: impl Into<String>) -> PgError {
    PgError(msg.into())
}

/// A running PostgreSQL 15 cluster of its own; dropped, it is stopped and its files removed.
pub struct Postgres {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The account the cluster runs as: `postgres` when we are root, else ourselves.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
    switch: bool,
}

impl Owner {
    fn pick() -> Result<Owner, PgError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Owner {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
                switch: false,
            });
        }
        let pw = nix::unistd::User::from_name("postgres")
            .map_err(|e| err(format!("reading the passwd database: {e}")))?
            .ok_or_else(|| {
                err(
                    "there is no `postgres` account to run PostgreSQL as (it refuses root): \
                     install Debian's postgresql-15 (scripts/install-deps)",
                )
            })?;
        Ok(Owner {
            uid: pw.uid.as_raw(),
            gid: pw.gid.as_raw(),
            switch: true,
        })
    }

    /// `program` run as this owner in `cwd`, with an empty environment and no stdin.
    fn command(self, program: &Path, cwd: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(cwd).env_clear().stdin(Stdio::null());
        if self.switch {
            c.uid(self.uid).gid(self.gid);
        }
        c
    }

    fn own(self, path: &Path) -> Result<(), PgError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| {
                err(format!(
                    "handing {} to the cluster's owner: {e}",
                    path.display()
                ))
            })
    }
}

/// The directory of Debian's PostgreSQL 15 binaries, or an error naming the package.
pub fn bin_dir() -> Result<PathBuf, PgError> {
    let dir = PathBuf::from(PG15_BIN);
    for b in ["initdb", "postgres", "pg_ctl"] {
        if !dir.join(b).is_file() {
            return Err(err(format!(
                "PostgreSQL 15 is not installed ({} is missing): install Debian's postgresql-15 \
                 (scripts/install-deps)",
                dir.join(b).display()
            )));
        }
    }
    Ok(dir)
}

impl Postgres {
    /// Starts a fresh cluster with the test settings; panics with the reason (and the server's
    /// log tail) if it cannot.
    pub fn start() -> Postgres {
        Self::start_with(&Options::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a fresh cluster set up as `o` says, and waits until it accepts connections.
    pub fn start_with(o: &Options) -> Result<Postgres, PgError> {
        let bin = bin_dir()?;
        let owner = Owner::pick()?;
        let dir = tempfile::Builder::new()
            .prefix("bsp-pg-")
            .tempdir()
            .map_err(|e| err(format!("making a temporary dir: {e}")))?;
        owner.own(dir.path())?;
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).map_err(|e| err(format!("making {}: {e}", sock.display())))?;
        owner.own(&sock)?;
        let data = dir.path().join("data");
        let out = owner
            .command(&bin.join("initdb"), dir.path())
            .arg("--pgdata")
            .arg(&data)
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .map_err(|e| err(format!("running initdb: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        // Trust only this machine: the private socket dir and 127.0.0.1 (initdb's file also
        // trusts ::1 and replication).
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| err(format!("writing pg_hba.conf: {e}")))?;
        // A free port can be taken between asking and binding: try another one then.
        let mut last = None;
        for _ in 0..3 {
            let port = free_port();
            match start_server(&bin, owner, dir.path(), &sock, port, o) {
                Ok(child) => return Ok(Postgres { child, port, dir }),
                Err(e) if e.0.contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| err("no free port")))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary dir holding the cluster, its socket dir and its log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates database `name` (a lowercase SQL identifier) and returns its URL: one per test
    /// keeps tests on one server apart.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            name.len() < 64
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "database name {name:?}: use 1-63 of a-z, 0-9, _ (not starting with a digit)"
        );
        let url = self.url();
        block_on(async {
            let c = connect(&url).await?;
            c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
        })
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url_of(name)
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.dir.path().join("postgres.log"), lines)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = self.child.id();
        let workers = children_of(pid);
        // SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for clients to leave):
        // open sessions are ended and the postmaster exits after its workers.
        stop_child_with(&mut self.child, Signal::SIGINT, STOP_GRACE);
        // After a SIGKILL the workers exit on their own when they notice; don't wait for it.
        for w in workers {
            kill_marked(w, "postgres");
        }
    }
}

/// Starts the postmaster on `port` and waits until it answers; on failure it is stopped and
/// the error holds its log tail.
fn start_server(
    bin: &Path,
    owner: Owner,
    dir: &Path,
    sock: &Path,
    port: u16,
    o: &Options,
) -> Result<Child, PgError> {
    let log_path = dir.join("postgres.log");
    let log = File::create(&log_path).map_err(|e| err(format!("creating the log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| err(format!("creating the log: {e}")))?;
    let mut settings = vec![
        "listen_addresses=127.0.0.1".to_string(),
        format!("unix_socket_directories={}", sock.display()),
        format!("max_connections={}", o.max_connections),
    ];
    if !o.durable {
        settings.extend(["fsync=off", "full_page_writes=off"].map(String::from));
    }
    settings.extend(o.settings.iter().cloned());
    let mut cmd = owner.command(&bin.join("postgres"), dir);
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()]);
    for s in &settings {
        cmd.args(["-c", s]);
    }
    let mut child = cmd
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| err(format!("starting postgres: {e}")))?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let ready = poll_until_blocking(READY_DEADLINE, Duration::from_millis(50), || {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Err(format!("postgres exited ({status})")));
        }
        block_on(async {
            let c = connect(&url).await?;
            c.simple_query("SELECT 1").await
        })
        .map(|_| Ok(()))
        .map_err(|e| e.to_string())
    });
    let why = match ready {
        Ok(Ok(())) => return Ok(child),
        Ok(Err(exited)) => exited,
        Err(last) => {
            format!("postgres did not accept connections within {READY_DEADLINE:?} (last: {last})")
        }
    };
    stop_child_with(&mut child, Signal::SIGINT, STOP_GRACE);
    Err(err(format!(
        "{why}; the end of its log:\n{}",
        log_tail(&log_path, 30)
    )))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Connects to `url` (no TLS: loopback only) and drives the connection on the current tokio
/// runtime.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own, so the fixture's
/// blocking API works both in plain and in `#[tokio::test]` tests.
fn block_on<F: Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread tokio runtime")
                .block_on(f)
        })
        .join()
        .expect("the fixture's runtime thread panicked")
    })
}
