//! The engine's figures: no-op step throughput on the bench's backend, 1,000-node
//! batches (independent, and 10 layers) side by side with `terraform apply` of 1,000
//! `terraform_data` resources, and `plan` of a 1,000-node manifest against 1,000 VMs.
//! The batch part runs in a child process (`basphere-bench --part batch`) so its peak RSS is
//! its own.

use basphere_app::{App, Overrides};
use basphere_client::{Client, Endpoint};
use basphere_config::Config;
use basphere_provider::NullProvider;
use basphere_store::{Actor, NewWorkflow};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Backend, Bench, approved_user, serve_tcp};

/// Terraform's figures on record, used when it is missing: `terraform apply -parallelism=10`
/// (terraform 1.11) on this machine kind, 2026-12-03 afternoon. Its speed drifts: 1,000
/// independent took 6.2–11.3 s over stops 21–23. The chain was measured once, in stage 1.
const TF_RECORD_INDEPENDENT_S: f64 = 6.5;
const TF_RECORD_LAYERED_S: f64 = 29.1;
const TF_RECORD_CHAIN300_S: f64 = 14.0;

/// No-op steps per second through the whole engine (claim, lease, step commits, events),
/// with `replicas` engines (each its own store pool and node id) on the bench's database;
/// `fuse_ms` is the engine's fuse window (0: every step its own completion commit).
pub async fn throughput(
    bench: &Bench,
    dir: &Path,
    workflows: usize,
    steps: usize,
    replicas: usize,
    fuse_ms: u64,
    statements: bool,
) -> anyhow::Result<(f64, f64)> {
    let fuse = fuse_ms.to_string();
    let profiling = start_profile(statements);
    let cfg = Arc::new(batch_config(
        bench,
        dir,
        &[
            ("BASPHERE_ENGINE__MAX_PARALLEL", "128"),
            ("BASPHERE_ENGINE__FUSE_WINDOW_MS", &fuse),
        ],
    )?);
    let mut apps = vec![];
    for r in 0..replicas {
        let o = Overrides {
            node_id: Some(format!("bench{r}")),
            ..Overrides::with_provider(Arc::new(NullProvider::default()))
        };
        apps.push(App::build(cfg.clone(), o).await?);
    }
    let store = apps[0].store().clone();
    let ws: Vec<NewWorkflow> = (0..workflows)
        .map(|_| {
            NewWorkflow::new(
                "noop",
                "bench",
                (0..steps).map(|i| format!("s{i}").into()).collect(),
            )
        })
        .collect();
    let ids: HashSet<String> = store
        .enqueue_workflows(&ws, &[])
        .await?
        .into_iter()
        .collect();
    // Every replica's events reach the first one's broadcast (relayed on PostgreSQL).
    let mut rx = apps[0].engine().subscribe();
    let (tx, srx) = tokio::sync::watch::channel(false);
    let commits0: u64 = apps.iter().map(|a| a.store().commits()).sum();
    let t0 = Instant::now();
    for a in &apps {
        let engine = a.engine();
        engine.register("noop", Arc::new(basphere_engine::NoopWorkflow));
        tokio::spawn(engine.clone().run(srx.clone()));
    }
    let mut left = ids.len();
    while left > 0 {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Ok(ev)) if ev.kind == "succeeded" && ids.contains(&ev.operation_id) => left -= 1,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                left = ids.len()
                    - store
                        .workflows(None, (ids.len() + 10) as i64)
                        .await?
                        .iter()
                        .filter(|w| w.status.is_terminal())
                        .count();
            }
            _ => {
                let open: Vec<String> = store
                    .workflows(None, (ids.len() + 10) as i64)
                    .await?
                    .iter()
                    .filter(|w| ids.contains(&w.id) && !w.status.is_terminal())
                    .map(|w| format!("{} {} at step {}", w.id, w.status, w.step))
                    .collect();
                anyhow::bail!(
                    "no event for 60 s with {left} workflows not seen ending; not ended in the \
                     store: {open:?}"
                )
            }
        }
    }
    let dt = t0.elapsed();
    let commits: u64 = apps.iter().map(|a| a.store().commits()).sum::<u64>() - commits0;
    if statements && let Some(url) = &cfg.database.url {
        print_statements(url).await?;
    }
    if profiling {
        println!("{}", profile_text(bench));
    }
    let _ = tx.send(true);
    for a in &apps {
        a.store().close().await;
    }
    let n = (workflows * steps) as f64;
    Ok((n / dt.as_secs_f64(), commits as f64 * 1000.0 / n))
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0)
        .unwrap_or(0.0)
}

fn independent_manifest(n: usize) -> String {
    let mut s = String::from("[defaults]\nspec = \"tiny\"\n");
    for i in 0..n {
        s.push_str(&format!("[vms.n{i}]\n"));
    }
    s
}

fn layered_manifest(layers: usize, width: usize) -> String {
    let mut s = String::from("[defaults]\nspec = \"tiny\"\n");
    for l in 0..layers {
        for i in 0..width {
            s.push_str(&format!("[vms.l{l}-{i}]\n"));
            if l > 0 {
                s.push_str(&format!(
                    "requires = [\"l{}-{i}\", \"l{}-{}\"]\n",
                    l - 1,
                    l - 1,
                    (i + 1) % width
                ));
            }
        }
    }
    s
}

/// Each node requires the one before it.
fn chain_manifest(n: usize) -> String {
    let mut s = String::from("[defaults]\nspec = \"tiny\"\n");
    for i in 0..n {
        s.push_str(&format!("[vms.c{i}]\n"));
        if i > 0 {
            s.push_str(&format!("requires = [\"c{}\"]\n", i - 1));
        }
    }
    s
}

fn tf_independent(n: usize) -> String {
    format!("resource \"terraform_data\" \"n\" {{\n  count = {n}\n  input = count.index\n}}\n")
}

fn tf_layered(layers: usize, width: usize) -> String {
    let mut s = format!(
        "resource \"terraform_data\" \"l0\" {{\n  count = {width}\n  input = count.index\n}}\n"
    );
    for l in 1..layers {
        s.push_str(&format!(
            "resource \"terraform_data\" \"l{l}\" {{\n  count = {width}\n  input = [terraform_data.l{p}[count.index].id, terraform_data.l{p}[(count.index + 1) % {width}].id]\n}}\n",
            p = l - 1
        ));
    }
    s
}

/// Seconds `terraform apply` takes for `main_tf` (after an untimed `init`), if terraform runs.
fn terraform(dir: &Path, main_tf: &str, parallelism: u32) -> Option<f64> {
    std::fs::create_dir_all(dir).ok()?;
    std::fs::write(dir.join("main.tf"), main_tf).ok()?;
    let tf = |args: &[&str]| {
        std::process::Command::new("terraform")
            .args(args)
            .current_dir(dir)
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
    };
    tf(&["init", "-input=false", "-no-color"])?;
    let t0 = Instant::now();
    tf(&[
        "apply",
        "-auto-approve",
        "-input=false",
        "-no-color",
        &format!("-parallelism={parallelism}"),
    ])?;
    Some(t0.elapsed().as_secs_f64())
}

/// A config with no listeners (the caller binds its own) and room for many VMs, plus `extra`.
fn batch_config(bench: &Bench, dir: &Path, extra: &[(&str, &str)]) -> anyhow::Result<Config> {
    let mut settings = vec![
        ("BASPHERE_SERVER__SOCKET", "\"\""),
        ("BASPHERE_SERVER__LISTEN", "\"\""),
        ("BASPHERE_NETWORK__CIDR", "10.64.0.0/12"),
        ("BASPHERE_NETWORK__GATEWAY", "10.64.0.1"),
        ("BASPHERE_NETWORK__BLOCK_SIZE", "4096"),
    ];
    settings.extend_from_slice(extra);
    bench.config(dir, &settings)
}

/// What the batch child applies, and on how many engine slots.
#[derive(Clone, Debug)]
pub struct Child {
    pub nodes: usize,
    pub parallelism: u32,
    /// `[engine] max_parallel` (the product's default when `None`).
    pub engine_slots: Option<usize>,
    /// Only the independent batch: no layers, chain or plans.
    pub independent_only: bool,
    pub statements: bool,
}

/// The child process: an in-process server; applies 1,000-node batches over HTTP and plans
/// one against 1,000 VMs; prints one JSON line of figures (with its own peak RSS).
pub async fn batch_child(bench: &Bench, dir: &Path, child: &Child) -> anyhow::Result<()> {
    let (nodes, parallelism) = (child.nodes, child.parallelism);
    let profiling = start_profile(child.statements);
    let slots = child.engine_slots.map(|n| n.to_string());
    let extra: Vec<(&str, &str)> = slots
        .iter()
        .map(|n| ("BASPHERE_ENGINE__MAX_PARALLEL", n.as_str()))
        .collect();
    let cfg = Arc::new(batch_config(bench, dir, &extra)?);
    let app = App::build(cfg.clone(), Overrides::default()).await?;
    let store = app.store().clone();
    let mut events = app.engine().subscribe();
    let (addr, _server) = serve_tcp(app, &cfg).await?;
    let admin = Actor::new("bench", "bench");
    // Each shape is applied RUNS times (by its own user, so each apply starts from nothing);
    // the figure is the median, since a 2-core machine's run-to-run noise is ±15%.
    const RUNS: usize = 3;
    let shapes: &[&str] = if child.independent_only {
        &["flat"]
    } else {
        &["flat", "layered"]
    };
    let mut users: Vec<String> = shapes
        .iter()
        .flat_map(|u| (0..RUNS).map(move |r| format!("{u}{r}")))
        .collect();
    // The chain runs once: its time is a sum of 1,000 hand-offs, steady from run to run.
    if !child.independent_only {
        users.push("chain0".into());
    }
    let mut clients = vec![];
    for u in &users {
        let q = basphere_core::Quota {
            max_vms: 4000,
            max_ips: 4000,
            ..basphere_core::Quota::default()
        };
        let name = approved_user(&store, &cfg, u, &q).await?;
        store.set_quota(&name, &q, &admin).await?;
        let token = store.create_token(&name, "bench", None, &admin).await?.1;
        clients.push(Client::new(Endpoint::Tcp {
            addr: addr.clone(),
            token: Some(token),
        }));
    }
    let layers = 10;
    let manifests = [
        independent_manifest(nodes),
        layered_manifest(layers, nodes / layers),
    ];
    let mut secs = vec![];
    let mut admit_ms = vec![];
    let chain = chain_manifest(nodes);
    let runs = manifests[..shapes.len()]
        .iter()
        .flat_map(|m| std::iter::repeat_n(m, RUNS))
        .chain(std::iter::once(&chain).filter(|_| !child.independent_only));
    let postmaster = match &cfg.database.url {
        Some(url) => crate::cpu::postmaster_pid(url).await,
        None => None,
    };
    let mut cpu = vec![];
    for (c, m) in clients.iter().zip(runs) {
        let u0 = crate::cpu::Usage::now(postmaster);
        let commits0 = store.commits();
        let t0 = Instant::now();
        let r = c
            .post(
                "/api/v1/batches",
                &json!({"manifest": m, "parallelism": parallelism}),
            )
            .await?;
        admit_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            r.body.success,
            "apply refused: {} {:?}",
            r.body.message,
            r.body.errors
        );
        let batch = r.body.data["batch_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut ops: HashSet<String> = r.body.data["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["operation_id"].as_str().map(str::to_string))
            .collect();
        // Follow the engine's own transitions (as the SSE stream does), not by polling.
        while !ops.is_empty() {
            match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
                Ok(Ok(ev)) if ev.kind == "succeeded" => {
                    ops.remove(&ev.operation_id);
                }
                Ok(Ok(ev)) if ev.kind == "failed" || ev.kind == "cancelled" => {
                    anyhow::bail!("node {} failed: {}", ev.operation_id, ev.message)
                }
                Ok(Ok(_)) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                    let d = c.get(&format!("/api/v1/batches/{batch}")).await?.body.data;
                    for n in d["nodes"].as_array().into_iter().flatten() {
                        if n["status"] == "succeeded" {
                            ops.remove(n["operation_id"].as_str().unwrap_or_default());
                        }
                    }
                }
                _ => anyhow::bail!("batch {batch} stalled"),
            }
        }
        secs.push(t0.elapsed().as_secs_f64());
        cpu.push((
            crate::cpu::Usage::now(postmaster).since(&u0),
            store.commits() - commits0,
        ));
    }
    // The batches' peak, before the plans below add theirs (and this client's parse of them).
    let batches_rss = peak_rss_mb();
    if profiling {
        // On stderr: the parent reads this process's last line of stdout.
        eprintln!("the batch applies' {}", profile_text(bench).trim_start());
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // The CPU of the independent apply whose time is the median.
    let (ind, ind_admit) = (&secs[..RUNS], &admit_ms[..RUNS]);
    let (mid, mid_commits) = (0..RUNS)
        .find(|&i| ind[i] == median(ind))
        .map_or(cpu[0], |i| cpu[i]);
    let independent = json!({
        "independent_s": median(ind),
        "independent_runs_s": ind,
        "independent_admit_ms": median(ind_admit),
        "independent_cpu_s": mid.process_s,
        "independent_postgres_cpu_s": mid.postgres_s,
        "independent_commits": mid_commits,
    });
    if child.independent_only {
        println!("{independent}");
        return Ok(());
    }
    // Plan the independent manifest again: 1,000 to keep against 1,000 VMs.
    let mut plan_ms = vec![];
    for _ in 0..10 {
        let t0 = Instant::now();
        let r = clients[0]
            .post("/api/v1/batches/plan", &json!({"manifest": manifests[0]}))
            .await?;
        plan_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            r.body.data["plan"]["keep"].as_array().map(|a| a.len()) == Some(nodes),
            "plan did not keep all {nodes}"
        );
    }
    plan_ms.sort_by(f64::total_cmp);
    // And end to end through the CLI process.
    let mf = dir.join("flat.toml");
    std::fs::write(&mf, &manifests[0])?;
    let tokens_c = match clients[0].endpoint() {
        Endpoint::Tcp { token, .. } => token.clone().unwrap_or_default(),
        _ => String::new(),
    };
    let mut cli_ms = vec![];
    for _ in 0..5 {
        let t0 = Instant::now();
        let o = std::process::Command::new(&bench.basphere)
            .args(["--url", &addr, "--token", &tokens_c, "plan", "-f"])
            .arg(&mf)
            .output()?;
        cli_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            o.status.success(),
            "plan failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    cli_ms.sort_by(f64::total_cmp);
    let (lay, lay_admit) = (&secs[RUNS..2 * RUNS], &admit_ms[RUNS..2 * RUNS]);
    let mut figures = independent;
    figures["layered_s"] = json!(median(lay));
    figures["chain_s"] = json!(secs[2 * RUNS]);
    figures["layered_runs_s"] = json!(lay);
    figures["layered_admit_ms"] = json!(median(lay_admit));
    figures["plan_api_ms_p50"] = json!(plan_ms[plan_ms.len() / 2]);
    figures["plan_cli_ms_p50"] = json!(cli_ms[cli_ms.len() / 2]);
    figures["peak_rss_mb"] = json!(batches_rss);
    figures["peak_rss_with_plans_mb"] = json!(peak_rss_mb());
    println!("{figures}");
    Ok(())
}

/// The parallelism of the batch that measures larger commits, and the engine's slots for it
/// (more than the batch takes, as at parallelism 10 with the default 16).
const WIDE_PARALLELISM: u32 = 100;
const WIDE_SLOTS: usize = 128;

/// Figure `k` of a child's line (NaN when it is missing).
fn num(figures: &Value, k: &str) -> f64 {
    figures[k].as_f64().unwrap_or(f64::NAN)
}

/// Runs the batch child (`--part batch`) in `dir` and reads its line of figures.
fn spawn_child(bench: &Bench, dir: &Path, c: &Child) -> anyhow::Result<Value> {
    let mut child = std::process::Command::new(std::env::current_exe()?);
    if c.statements {
        child.arg("--statements");
    }
    if let Some(n) = c.engine_slots {
        child.args(["--engine-slots", &n.to_string()]);
    }
    if c.independent_only {
        child.arg("--independent-only");
    }
    let o = child
        .args([
            "--part",
            "batch",
            "--backend",
            bench.backend.as_arg(),
            "--pg-server",
            bench.pg_server.as_deref().unwrap_or(""),
            "--basphere",
            &bench.basphere.display().to_string(),
            "--batch-nodes",
            &c.nodes.to_string(),
            "--parallelism",
            &c.parallelism.to_string(),
        ])
        .env("BASPHERE_BENCH_DIR", dir)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(o.status.success(), "the batch bench child failed");
    let line = String::from_utf8_lossy(&o.stdout);
    Ok(serde_json::from_str(line.lines().last().unwrap_or("{}"))?)
}

/// The statements that took the most server time on the database at `url` (needs
/// `pg_stat_statements` preloaded), one line each: calls, total time, rows, the statement.
async fn print_statements(url: &str) -> anyhow::Result<()> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    // Planning is timed only where the server tracks it (`pg_stat_statements.track_planning`,
    // on in the server the bench starts itself); elsewhere its column reads 0.
    println!(
        "  statements by server time, planning included (calls, ms executing, ms planning, rows, statement):"
    );
    let rows = c
        .query(
            "SELECT calls, round(total_exec_time::numeric, 1)::text,
                    round(total_plan_time::numeric, 1)::text, rows,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 100)
             FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 12",
            &[],
        )
        .await?;
    for r in rows {
        println!(
            "  {:>7} {:>9} {:>9} {:>7}  {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3),
            r.get::<_, String>(4)
        );
    }
    Ok(())
}

/// Starts the store's statement profile if `statements` are asked for; whether it did.
fn start_profile(statements: bool) -> bool {
    if statements {
        basphere_store::statement_profile::start();
    }
    statements
}

/// What the store's statement profile recorded since [`start_profile`] that took the most time,
/// one line each: calls, total ms, µs per call, and the statement (SQLite) or the round trip
/// with its first statement (PostgreSQL: how long this process waited for it, queueing
/// included). Stops recording.
fn profile_text(bench: &Bench) -> String {
    let mut out = match bench.backend {
        Backend::Postgres => String::from(
            "  PostgreSQL round trips by the time this process waited (calls, ms, µs per call, \
             what went):",
        ),
        _ => String::from("  SQLite statements by time (calls, ms, µs per call, statement):"),
    };
    for s in basphere_store::statement_profile::stop().iter().take(15) {
        let ms = s.total.as_secs_f64() * 1000.0;
        let sql: String = s.sql.chars().take(110).collect();
        out.push_str(&format!(
            "\n  {:>7} {:>9.1} {:>7.1}  {sql}",
            s.calls,
            ms,
            ms * 1000.0 / s.calls.max(1) as f64
        ));
    }
    out
}

/// Runs of each throughput figure: it swings by a third from run to run on a 2-core machine
/// (more between minutes, with the host's load), so the median of five is printed with the
/// range.
const THROUGHPUT_RUNS: usize = 5;

/// Prints the no-op step throughput (the median of [`THROUGHPUT_RUNS`], each on a fresh
/// database, and, on PostgreSQL with `statements`, where the server's time went in the first);
/// on PostgreSQL also with three replicas.
pub async fn print_throughput(bench: &Bench, dir: &Path, statements: bool) -> anyhow::Result<()> {
    let replicas: &[usize] = if bench.backend == Backend::Postgres {
        &[1, 3]
    } else {
        &[1]
    };
    // Every step its own completion commit (the figure comparable to job queues'), then with
    // the default fuse window, where a workflow's quick steps share one.
    for (fuse_ms, &r) in [0, 20]
        .into_iter()
        .flat_map(|f| replicas.iter().map(move |r| (f, r)))
    {
        let mut runs = vec![];
        for i in 0..THROUGHPUT_RUNS {
            runs.push(
                throughput(
                    bench,
                    &dir.join(format!("throughput{r}-{fuse_ms}-{i}")),
                    200,
                    50,
                    r,
                    fuse_ms,
                    statements && r == 1 && i == 0 && fuse_ms == 0,
                )
                .await?,
            );
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (tput, per_k) = runs[runs.len() / 2];
        let range = format!("{:.0}–{:.0}", runs[0].0, runs[runs.len() - 1].0);
        let on = if r == 1 {
            bench.backend.label().to_string()
        } else {
            format!("{} with {r} replicas", bench.backend.label())
        };
        let how = if fuse_ms == 0 {
            "each step its own commit".to_string()
        } else {
            format!("quick steps fused, fuse_window_ms = {fuse_ms}")
        };
        println!(
            "engine throughput, no-op steps on {on} (200 workflows × 50 steps, {how}): {tput:.0} \
             steps/s (median of {THROUGHPUT_RUNS}, {range}), {per_k:.1} commits per 1,000 steps"
        );
    }
    Ok(())
}

/// Prints the engine's figures (runs the batch child and terraform).
pub async fn run(
    bench: &Bench,
    dir: &Path,
    nodes: usize,
    parallelism: u32,
    terraform_too: bool,
    statements: bool,
) -> anyhow::Result<()> {
    print_throughput(bench, dir, false).await?;
    let v = spawn_child(
        bench,
        &dir.join("batch"),
        &Child {
            nodes,
            parallelism,
            engine_slots: None,
            independent_only: false,
            statements,
        },
    )?;
    // The same independent batch at ten times the parallelism and the slots: what holding
    // nodes ahead at `parallelism` leaves on the table, if anything.
    let wide = spawn_child(
        bench,
        &dir.join("batch-wide"),
        &Child {
            nodes,
            parallelism: WIDE_PARALLELISM,
            engine_slots: Some(WIDE_SLOTS),
            independent_only: true,
            statements: false,
        },
    )?;
    let f = |k: &str| num(&v, k);
    let (tf_ind, tf_lay) = if terraform_too {
        (
            terraform(
                &dir.join("tf-independent"),
                &tf_independent(nodes),
                parallelism,
            ),
            terraform(
                &dir.join("tf-layered"),
                &tf_layered(10, nodes / 10),
                parallelism,
            ),
        )
    } else {
        (None, None)
    };
    let runs = |k: &str| {
        v[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The targets for the independent batch; the layered one has none.
    let target = match bench.backend {
        Backend::Postgres => " (target ≥ 30×)",
        _ => " (target ≥ 50×)",
    };
    let side = |name: &str,
                ours: f64,
                tf: Option<f64>,
                record: &str,
                record_s: f64,
                target: &str| match tf {
        Some(t) => println!(
            "{name}: basphere {ours:.3} s, terraform apply {t:.2} s → {:.0}× faster{target}",
            t / ours
        ),
        None => println!(
            "{name}: basphere {ours:.3} s; terraform not run here — on record {record}: {record_s:.0} s → {:.0}×{target}",
            record_s / ours
        ),
    };
    side(
        &format!(
            "batch of {nodes} independent VMs, parallelism {parallelism}, do-nothing test provider"
        ),
        f("independent_s"),
        tf_ind,
        "for 1,000 independent terraform_data",
        TF_RECORD_INDEPENDENT_S,
        target,
    );
    let wide_s = num(&wide, "independent_s");
    println!(
        "  the same at parallelism {WIDE_PARALLELISM} (engine slots {WIDE_SLOTS}): {wide_s:.3} s, \
         {:.0} commits, apply request {:.0} ms{}",
        num(&wide, "independent_commits"),
        num(&wide, "independent_admit_ms"),
        tf_ind.map_or(String::new(), |t| format!(
            " → {:.0}× terraform's at parallelism {parallelism}",
            t / wide_s
        )),
    );
    side(
        &format!("batch of {nodes} VMs in 10 layers (each node requires 2 of the layer before)"),
        f("layered_s"),
        tf_lay,
        "for the same 10 layers of terraform_data",
        TF_RECORD_LAYERED_S,
        "",
    );
    println!(
        "batch of a chain of {nodes} VMs (each requires the one before): basphere {:.3} s ({:.2} ms per link); terraform on record: {TF_RECORD_CHAIN300_S:.0} s for a chain of 300",
        f("chain_s"),
        f("chain_s") * 1000.0 / nodes as f64
    );
    println!(
        "  basphere's times are the median of 3 applies (independent: {} s; layered: {} s)",
        runs("independent_runs_s"),
        runs("layered_runs_s")
    );
    println!(
        "  of which the apply request (plan and admission, until its reply): independent {:.0} ms, layered {:.0} ms",
        f("independent_admit_ms"),
        f("layered_admit_ms")
    );
    let (own, server) = (
        f("independent_cpu_s"),
        v["independent_postgres_cpu_s"].as_f64(),
    );
    let cores = crate::cpu::cores();
    let commits = format!("{:.0} commits", f("independent_commits"));
    match server {
        Some(pg) => println!(
            "  the median independent apply: {commits}; CPU: this process {own:.2} s, \
             PostgreSQL {pg:.2} s (on {cores} cores no less than {:.3} s)",
            (own + pg) / cores as f64
        ),
        None => println!(
            "  the median independent apply: {commits}; CPU: this process {own:.2} s{}",
            if bench.backend == Backend::Postgres {
                " (PostgreSQL's is not readable here)"
            } else {
                ""
            }
        ),
    }
    println!(
        "peak RSS of the process serving the batches: {:.1} MB (target ≤ 50 MB); with the plans below and their client in the same process: {:.1} MB",
        f("peak_rss_mb"),
        f("peak_rss_with_plans_mb")
    );
    println!(
        "`basphere plan` of a {nodes}-node manifest against {nodes} VMs: API p50 {:.1} ms, CLI end to end p50 {:.1} ms (target ≤ 200 ms)",
        f("plan_api_ms_p50"),
        f("plan_cli_ms_p50")
    );
    Ok(())
}
