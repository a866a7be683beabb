//! Takeover: how long after `basphere serve` is SIGKILLed inside a step that step runs again.
//! On PostgreSQL another replica (its own data dir, the same database) takes it over once the
//! killed one's lease runs out; on SQLite there is no other replica, so the figure is a
//! restart on the same data dir, which resumes its own leases at once.

use basphere_app::{App, Overrides};
use basphere_client::{Client, Endpoint};
use basphere_config::Config;
use basphere_store::{Actor, now_ms};
use basphere_testkit::process::ChildGuard;
use basphere_testkit::server::free_port;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Backend, Bench, approved_user};

/// How long each phase of the do-nothing provider takes here: long enough to kill inside one.
const PHASE_MS: &str = "2000";

/// A `basphere serve` of the bench's, on TCP `addr`.
struct Replica {
    toml: PathBuf,
    addr: String,
}

impl Replica {
    fn new(cfg: &Config, dir: &Path) -> anyhow::Result<Self> {
        let mut cfg = cfg.clone();
        std::fs::create_dir_all(dir)?;
        cfg.data_dir = dir.to_path_buf();
        cfg.server.socket = dir.join("b.sock");
        let addr = format!("127.0.0.1:{}", free_port());
        cfg.server.listen = addr.clone();
        let toml = dir.join("basphere.toml");
        std::fs::write(&toml, toml::to_string(&cfg)?)?;
        Ok(Self { toml, addr })
    }

    /// Starts it and waits until it answers.
    async fn start(&self, exe: &Path) -> anyhow::Result<ChildGuard> {
        let child = ChildGuard::new(
            std::process::Command::new(exe)
                .args(["--config", &self.toml.display().to_string(), "serve"])
                .env("BASPHERE_LOG", "warn")
                .env("BASPHERE_NULL_DELAY_MS", PHASE_MS)
                .stderr(std::process::Stdio::null())
                .spawn()?,
            Duration::from_secs(10),
        );
        for _ in 0..400 {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(child);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("basphere serve on {} never answered", self.addr)
    }

    fn client(&self, token: &str) -> Client {
        Client::new(Endpoint::Tcp {
            addr: self.addr.clone(),
            token: Some(token.to_string()),
        })
    }
}

/// The operation's step that runs now (index, name, attempts, started at), if one does.
async fn running_step(c: &Client, op: &str) -> anyhow::Result<Option<(u64, String, u64, i64)>> {
    let r = c.get(&format!("/api/v1/operations/{op}")).await?;
    anyhow::ensure!(r.body.success, "reading {op}: {}", r.body.message);
    Ok(r.body.data["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["status"] == "running")
        .map(|s| {
            (
                s["idx"].as_u64().unwrap_or_default(),
                s["name"].as_str().unwrap_or_default().to_string(),
                s["attempts"].as_u64().unwrap_or_default(),
                s["started_at"].as_i64().unwrap_or_default(),
            )
        }))
}

/// Prints the takeover figure, measured with servers whose data is under `dir`.
pub async fn run(bench: &Bench, cfg: &Config, dir: &Path) -> anyhow::Result<()> {
    let a = Replica::new(cfg, &dir.join("a"))?;
    // The user and token, written before any server runs (SQLite has one writer).
    let token = {
        let mut c = cfg.clone();
        c.data_dir = dir.join("a");
        let app = App::build(std::sync::Arc::new(c.clone()), Overrides::default()).await?;
        let store = app.store().clone();
        let u = approved_user(&store, &c, "takeover", &c.quota).await?;
        let token = store
            .create_token(&u, "bench", None, &Actor::new("bench", "bench"))
            .await?
            .1;
        store.close().await;
        token
    };
    let exe = &bench.basphere;
    let mut first = Some(a.start(exe).await?);
    // On PostgreSQL the other replica runs from the start, idle.
    let b = match bench.backend {
        Backend::Postgres => {
            let b = Replica::new(cfg, &dir.join("b"))?;
            let child = b.start(exe).await?;
            Some((b, child))
        }
        _ => None,
    };
    let r = a
        .client(&token)
        .post("/api/v1/vms", &json!({"name": "victim", "spec": "tiny"}))
        .await?;
    anyhow::ensure!(r.body.success, "create failed: {}", r.body.message);
    let op = r.body.data["vms"][0]["operation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Kill it a little way into a step.
    let t0 = Instant::now();
    let (idx, name) = loop {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "no step ran");
        if let Some((idx, name, _, started)) = running_step(&a.client(&token), &op).await?
            && now_ms() - started >= 300
        {
            break (idx, name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let killed = first.take().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed_at = now_ms();
    drop(killed);
    // Who goes on: the other replica, or the same data dir restarted.
    let (on, _restarted) = match &b {
        Some((b, _)) => (b, None),
        None => (&a, Some(a.start(exe).await?)),
    };
    let lease = cfg.engine.lease_secs;
    let t1 = Instant::now();
    let again = loop {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(lease + 30),
            "step {name} was not taken over within the lease ({lease} s) + 30 s"
        );
        if let Some((i, _, attempts, started)) = running_step(&on.client(&token), &op).await?
            && i == idx
            && attempts >= 2
        {
            break started;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = (again - killed_at) as f64 / 1000.0;
    match bench.backend {
        Backend::Postgres => println!(
            "takeover: `basphere serve` SIGKILLed inside step {name}; another replica started it \
             again {after:.2} s later (lease {lease} s, renewed every {:.0} s)",
            lease as f64 / 3.0
        ),
        _ => println!(
            "takeover: `basphere serve` SIGKILLed inside step {name}; restarted on its data dir, \
             it started the step again {after:.2} s after the kill (restart included; its own \
             leases are resumed at start, no wait for the {lease} s lease)"
        ),
    }
    Ok(())
}
