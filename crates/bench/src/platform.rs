//! The platform's figures: create overhead, idle `basphere serve` RSS, `list-vms -a -j` with
//! many VMs end to end, and the takeover of a killed server's step.

use basphere_api::{Listeners, ServeOptions};
use basphere_app::{App, Overrides};
use basphere_client::{Client, Endpoint};
use basphere_provider::NullProvider;
use basphere_store::Actor;
use basphere_testkit::process::ChildGuard;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Args, Bench, approved_user, serve_tcp};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A config for an in-process or `basphere serve` server with its data (and socket) in `dir`.
fn config(bench: &Bench, dir: &Path) -> anyhow::Result<basphere_config::Config> {
    let socket = format!("\"{}\"", dir.join("b.sock").display());
    bench.config(
        dir,
        &[
            ("BASPHERE_SERVER__SOCKET", &socket),
            ("BASPHERE_SERVER__LISTEN", "\"\""),
            ("BASPHERE_NETWORK__CIDR", "10.200.0.0/16"),
            ("BASPHERE_NETWORK__GATEWAY", "10.200.0.1"),
        ],
    )
}

/// Prints the platform's figures, measured in servers whose data is under `dir`.
pub async fn run(bench: &Bench, dir: &Path, a: &Args) -> anyhow::Result<()> {
    // 1. Overhead of a create: request sent → provider asked to start, in-process server.
    let cfg = Arc::new(config(bench, &dir.join("overhead"))?);
    let provider = Arc::new(NullProvider::default());
    let app = App::build(cfg.clone(), Overrides::with_provider(provider.clone())).await?;
    let store = app.store().clone();
    // The bench speaks as token holders, so over a TCP listener of its own.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let mut listeners = Listeners::bind(&cfg).await?;
    listeners.tcp = Some(tcp);
    let server = app.serve(listeners, ServeOptions::from_config(&cfg.server)?);
    let (lat, replied) = create_times(
        &store,
        &cfg,
        &provider,
        &addr.to_string(),
        a.creates,
        "bench",
    )
    .await?;
    println!(
        "create overhead (request sent → provider start), {} creates, do-nothing test provider:",
        a.creates
    );
    println!(
        "  p50 {}   p99 {}   max {}",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(*lat.last().unwrap())
    );
    println!(
        "  of which the request until its reply (admission): p50 {}   p99 {}",
        ms(pct(&replied, 0.5)),
        ms(pct(&replied, 0.99)),
    );
    server.shutdown().await;
    let admin = Actor::new("bench", "bench");

    // 2. Idle RSS of `basphere serve` and list-vms -a -j with many VMs, as separate processes.
    let cfg2 = Arc::new(config(bench, &dir.join("serve"))?);
    let toml_path = dir.join("serve.toml");
    std::fs::write(&toml_path, toml::to_string(&*cfg2)?)?;
    let per_user = 10;
    let mut users = 0;
    for (k, &count) in a.list_vms.iter().enumerate() {
        // Fill the store up to `count` VMs (the server is stopped meanwhile).
        let app2 = App::build(cfg2.clone(), Overrides::default()).await?;
        let store2 = app2.store();
        while users < count.div_ceil(per_user) {
            let u = approved_user(store2, &cfg2, &format!("list{users}"), &cfg2.quota).await?;
            let spec = cfg2.specs[&"tiny".parse()?];
            let n = per_user.min(count - users * per_user);
            store2
                .admit_vms(
                    &basphere_store::AdmitRequest {
                        owner: u,
                        names: (0..n)
                            .map(|j| format!("vm{j}").parse())
                            .collect::<Result<_, _>>()?,
                        os: "debian-12".parse()?,
                        login_user: "debian".into(),
                        spec_name: "tiny".parse()?,
                        spec,
                        provider: "null".into(),
                        steps: vec![],
                    },
                    &cfg2.network,
                    &admin,
                )
                .await?;
            users += 1;
        }
        store2.close().await;
        drop(app2);
        let (times, rss) =
            list_times(&bench.basphere, &toml_path, &cfg2.server.socket, count).await?;
        if k == 0 {
            println!(
                "idle `basphere serve` RSS: {:.1} MB (target ≤ 30 MB)",
                rss as f64 / 1024.0
            );
        }
        let target = if count <= 1000 {
            "≤ 30 ms"
        } else {
            "≤ 100 ms"
        };
        println!(
            "`list-vms -a -j` with {count} VMs, end to end (process start to exit): p50 {}  max {} (target {target})",
            ms(pct(&times, 0.5)),
            ms(*times.last().unwrap())
        );
    }
    // 3. The create overhead again, with the list figures' VMs in the store: an admission
    //    reads its owner's rows and block, never every VM.
    if let Some(&count) = a.list_vms.last() {
        let provider = Arc::new(NullProvider::default());
        let app = App::build(cfg2.clone(), Overrides::with_provider(provider.clone())).await?;
        let store = app.store().clone();
        let (addr, server) = serve_tcp(app, &cfg2).await?;
        let creates = a.creates.min(50);
        let (lat, replied) = create_times(&store, &cfg2, &provider, &addr, creates, "late").await?;
        println!(
            "create overhead with {count} VMs in the store, {creates} creates: p50 {}   p99 {} (reply: p50 {})",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(pct(&replied, 0.5)),
        );
        server.shutdown().await;
    }
    // 3. Takeover after a SIGKILL inside a step.
    takeover(bench, &dir.join("takeover")).await
}

/// Prints the takeover figure ([`crate::takeover`]) with servers whose data is under `dir`.
pub async fn takeover(bench: &Bench, dir: &Path) -> anyhow::Result<()> {
    crate::takeover::run(bench, &config(bench, dir)?, dir).await
}

/// Starts `basphere serve` on the config at `toml_path`, times `list-vms -a -j` (expecting
/// `count` VMs) ten times, and stops it; the sorted times and the server's idle RSS in KiB.
async fn list_times(
    exe: &Path,
    toml_path: &Path,
    sock: &Path,
    count: usize,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    // Stopped however this returns (an error, or a panic on a closed stdout).
    let child = ChildGuard::new(
        std::process::Command::new(exe)
            .args(["--config", &toml_path.display().to_string(), "serve"])
            .env("BASPHERE_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()?,
        Duration::from_secs(10),
    );
    async {
        for _ in 0..400 {
            if std::os::unix::net::UnixStream::connect(sock).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The admitted VMs' workflows run first (a busy server is not what is measured).
        let list = || {
            std::process::Command::new(exe)
                .args([
                    "--socket",
                    &sock.display().to_string(),
                    "vm",
                    "list",
                    "-a",
                    "-j",
                ])
                .output()
        };
        for _ in 0..600 {
            let o = list()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            let busy = v
                .as_array()
                .is_none_or(|a| a.iter().any(|vm| vm["status"] == "creating"));
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .unwrap_or(0);
        // Where the time goes: one page of the API (1,000 VMs), as the CLI asks for it.
        let c = basphere_client::Client::new(basphere_client::Endpoint::Unix(sock.to_path_buf()));
        let mut page = vec![];
        for _ in 0..10 {
            let t0 = Instant::now();
            let r = c.get("/api/v1/vms?all=true&limit=1000").await?;
            page.push(t0.elapsed());
            anyhow::ensure!(r.body.success, "listing failed: {}", r.body.message);
        }
        page.sort();
        println!(
            "  `GET /api/v1/vms?all=true&limit=1000` (one page, in process): p50 {}",
            ms(pct(&page, 0.5))
        );
        let mut times = vec![];
        for _ in 0..10 {
            let t0 = Instant::now();
            let o = list()?;
            times.push(t0.elapsed());
            anyhow::ensure!(
                o.status.success(),
                "list failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            anyhow::ensure!(
                v.as_array().map(|a| a.len()) == Some(count),
                "list returned the wrong count"
            );
        }
        times.sort();
        // A profiler's window on the idle, filled server (`BASPHERE_BENCH_HOLD` seconds).
        if let Some(s) = std::env::var("BASPHERE_BENCH_HOLD")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            eprintln!("holding the server (pid {}) for {s} s", child.id());
            tokio::time::sleep(Duration::from_secs(s)).await;
        }
        anyhow::Ok((times, rss))
    }
    .await
}

/// Times `creates` VM creates over HTTP at `addr` (ten per user, users `{prefix}N` made here):
/// request sent → provider start, and request sent → reply; each sorted.
async fn create_times(
    store: &basphere_store::Store,
    cfg: &basphere_config::Config,
    provider: &NullProvider,
    addr: &str,
    creates: usize,
    prefix: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let users = creates.div_ceil(10);
    let admin = Actor::new("bench", "bench");
    let mut tokens = vec![];
    for i in 0..users {
        let u = approved_user(store, cfg, &format!("{prefix}{i}"), &cfg.quota).await?;
        tokens.push(store.create_token(&u, "bench", None, &admin).await?.1);
    }
    let (mut lat, mut replied) = (vec![], vec![]);
    for i in 0..creates {
        let c = Client::new(Endpoint::Tcp {
            addr: addr.to_string(),
            token: Some(tokens[i / 10].clone()),
        });
        let t0 = Instant::now();
        let r = c
            .post(
                "/api/v1/vms",
                &json!({"name": format!("vm{i}"), "spec": "tiny"}),
            )
            .await?;
        replied.push(t0.elapsed());
        anyhow::ensure!(r.body.success, "create failed: {}", r.body.message);
        let inst = r.body.data["vms"][0]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        lat.push(provider.called(&inst, "start").await.duration_since(t0));
    }
    lat.sort();
    replied.sort();
    Ok((lat, replied))
}
