//! Basphere's own figures, measured on this machine, from a binary of their own
//! (`basphere-bench`) so the product binary carries no bench code.
//!
//! Every server, store and engine a bench uses is built by [`basphere_app::App`] from a
//! [`Config`] that [`Bench::config`] makes, so what is measured is what `basphere serve` runs,
//! and the store backend is chosen in one place ([`Backend`]).

pub mod cpu;
pub mod engine;
pub mod floor;
pub mod pg_probe;
pub mod platform;
pub mod takeover;

use basphere_config::Config;
use basphere_core::{Quota, Username};
use basphere_store::{Actor, NewRegistration, Store};
use std::path::{Path, PathBuf};

/// The SSH key the benches' users register with.
pub const BENCH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bench";

/// `basphere-bench`: prints the platform's and the engine's figures.
#[derive(clap::Parser, Debug)]
#[command(name = "basphere-bench", version, max_term_width = 100)]
pub struct Args {
    /// Which figures: all (platform and engine), platform (create overhead, RSS, list,
    /// takeover after a SIGKILL), engine
    /// (throughput, batches vs terraform, plan), throughput (the engine's no-op steps only),
    /// pg-floor (PostgreSQL's least work for a 1,000-node batch; part of `engine` on
    /// PostgreSQL), pg-probe (step completions per second on a
    /// PostgreSQL 15 the probe starts itself; not part of `all`).
    #[arg(long, value_enum, default_value_t = Part::All)]
    pub part: Part,
    /// The store the figures are measured on (`both`: every figure on SQLite, then on a
    /// PostgreSQL 15 the bench starts itself, durable as in production).
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    pub backend: Backend,
    /// Measure on this PostgreSQL server (`postgres://…/postgres`; the bench makes a fresh
    /// database per server on it, `bench_PID_N`, and leaves them there: use a scratch server)
    /// instead of one the bench starts itself: for profiling with the server's own tools. The
    /// bench also passes it to its child processes.
    #[arg(long, value_name = "URL")]
    pub pg_server: Option<String>,
    /// The product binary the figures start (`serve`, `vm list`, `plan`)
    /// [default: `basphere` beside this executable].
    #[arg(long, value_name = "PATH")]
    pub basphere: Option<PathBuf>,
    /// Nodes of the batch figures.
    #[arg(long, default_value_t = 1000)]
    pub batch_nodes: usize,
    /// Batch parallelism (terraform gets the same -parallelism).
    #[arg(long, default_value_t = 10)]
    pub parallelism: u32,
    /// Skip running terraform (print the figure on record instead).
    #[arg(long)]
    pub no_terraform: bool,
    /// Creates measured for the overhead figure.
    #[arg(long, default_value_t = 100)]
    pub creates: usize,
    /// VMs in the store for the list figures (one figure per count).
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 10_000])]
    pub list_vms: Vec<usize>,
    /// Print the statements that took the most time: after the first throughput run
    /// (PostgreSQL: server time from pg_stat_statements; SQLite: each statement's run on this
    /// process's connections), and after the batch child's applies; on PostgreSQL also each
    /// kind of round trip, by how long this process waited for it. Where to look when a
    /// figure drops.
    #[arg(long, alias = "pg-statements")]
    pub statements: bool,
    /// The child's engine slots (`[engine] max_parallel`; the product's default when absent).
    #[arg(long, hide = true)]
    pub engine_slots: Option<usize>,
    /// The child applies only the independent batch (no layers, chain or plans).
    #[arg(long, hide = true)]
    pub independent_only: bool,
    /// Step completions per mode of the PostgreSQL probe.
    #[arg(long, default_value_t = 20_000)]
    pub probe_steps: usize,
}

/// A set of figures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    All,
    Platform,
    Engine,
    /// Only the no-op step throughput (of `engine`).
    Throughput,
    /// Only the takeover of a SIGKILLed server's step (of `platform`).
    Takeover,
    /// The child process the engine part starts (its peak RSS is the batches' own).
    #[value(hide = true)]
    Batch,
    PgProbe,
    /// PostgreSQL's floor for a 1,000-node batch (of `engine`, on PostgreSQL).
    PgFloor,
}

/// The store backend a bench's servers use. Each variant only adds config settings
/// ([`Backend::settings`]); everything else is built from the config by `basphere-app`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite file in the data dir (no `[database] url`).
    Sqlite,
    /// A PostgreSQL 15 database (`[database] url`), a fresh one per server.
    Postgres,
    /// SQLite, then PostgreSQL, in one run.
    Both,
}

impl Backend {
    /// The name the figures are printed with.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::Both => "SQLite and PostgreSQL",
        }
    }

    /// The `--backend` value that names this backend (for the child processes a bench starts).
    pub fn as_arg(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Both => "both",
        }
    }
}

/// What every part needs: the backend and the product binary.
#[derive(Clone, Debug)]
pub struct Bench {
    pub backend: Backend,
    /// The PostgreSQL server (`postgres://…/postgres`) fresh databases are made on.
    pub pg_server: Option<String>,
    /// The `basphere` binary, started as a separate process where a figure is end to end.
    pub basphere: PathBuf,
}

impl Bench {
    /// A config for a server on the do-nothing test provider with its data in `dir`, on this
    /// bench's backend, with `settings` (`BASPHERE_*` keys) on top.
    pub fn config(&self, dir: &Path, settings: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut env = vec![
            ("BASPHERE_DATA_DIR".to_string(), dir.display().to_string()),
            ("BASPHERE_PROVIDER__KIND".into(), "null".into()),
        ];
        if self.backend == Backend::Postgres {
            let server = self.pg_server.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "no PostgreSQL server for the bench: give --pg-server URL (a bench part \
                         started alone, such as --part batch, does not start one; --part engine \
                         and the others start a PostgreSQL 15 of their own when it is missing)"
                )
            })?;
            env.push(("BASPHERE_DATABASE__URL".into(), fresh_database(server)?));
        }
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Ok(Config::load(None, env)?)
    }
}

/// Registers `name` (with [`BENCH_KEY`] and `quota`) and approves it, as the bench's admin.
pub async fn approved_user(
    store: &Store,
    cfg: &Config,
    name: &str,
    quota: &Quota,
) -> anyhow::Result<Username> {
    let admin = Actor::new("bench", "bench");
    let user: Username = name.parse()?;
    store
        .register(
            &NewRegistration {
                username: user.clone(),
                email: "b@example.org".parse()?,
                team: "bench".parse()?,
                public_key: BENCH_KEY.parse()?,
            },
            quota,
            &admin,
        )
        .await?;
    store
        .approve(&user, &cfg.network, false, None, &admin)
        .await?;
    Ok(user)
}

/// Serves `app` (built from `cfg`) on a TCP listener of its own on loopback, with no Unix
/// socket: the listener's address and the running server.
pub async fn serve_tcp(
    app: basphere_app::App,
    cfg: &Config,
) -> anyhow::Result<(String, basphere_app::Running)> {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?.to_string();
    let listeners = basphere_api::Listeners {
        unix: None,
        tcp: Some(tcp),
    };
    let opts = basphere_api::ServeOptions::from_config(&cfg.server)?;
    Ok((addr, app.serve(listeners, opts)))
}

/// `explicit`, else the `basphere` binary beside this executable; an error says how to build it.
pub fn product_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("basphere"),
    };
    anyhow::ensure!(
        path.is_file(),
        "the benches start the product binary, and there is none at {}: build it with \
         `cargo build --release -p basphere` (or pass --basphere PATH)",
        path.display()
    );
    Ok(path)
}

/// Runs the parts `a` names and prints their figures.
pub async fn run(a: Args) -> anyhow::Result<()> {
    if a.part == Part::PgProbe {
        return pg_probe::run(a.probe_steps).await;
    }
    let basphere = product_binary(a.basphere.clone())?;
    if a.part == Part::Batch {
        let bench = Bench {
            backend: a.backend,
            pg_server: a.pg_server.clone(),
            basphere,
        };
        let dir = std::env::var_os("BASPHERE_BENCH_DIR")
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("--part batch is started by the engine part itself"))?;
        let child = engine::Child {
            nodes: a.batch_nodes,
            parallelism: a.parallelism,
            engine_slots: a.engine_slots,
            independent_only: a.independent_only,
            statements: a.statements,
        };
        return engine::batch_child(&bench, &dir, &child).await;
    }
    let backends = match a.backend {
        Backend::Both => vec![Backend::Sqlite, Backend::Postgres],
        b => vec![b],
    };
    anyhow::ensure!(
        a.part != Part::PgFloor || backends.contains(&Backend::Postgres),
        "--part pg-floor measures PostgreSQL: add --backend postgres"
    );
    // Durable, as a production server runs it: the figures include the cost of a commit.
    let pg = if backends.contains(&Backend::Postgres) && a.pg_server.is_none() {
        let mut o = basphere_testkit::postgres::Options {
            durable: true,
            ..Default::default()
        };
        if a.statements {
            o.settings = vec![
                "shared_preload_libraries=pg_stat_statements".into(),
                "pg_stat_statements.track=all".into(),
                "pg_stat_statements.track_planning=on".into(),
            ];
        }
        Some(
            basphere_testkit::postgres::Postgres::start_with(&o)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        None
    };
    for backend in backends {
        let bench = Bench {
            backend,
            pg_server: pg.as_ref().map(|p| p.url()).or_else(|| a.pg_server.clone()),
            basphere: basphere.clone(),
        };
        println!("== {}", backend.label());
        run_parts(&a, &bench).await?;
    }
    Ok(())
}

async fn run_parts(a: &Args, bench: &Bench) -> anyhow::Result<()> {
    let bench = bench.clone();
    let tmp = std::env::temp_dir().join(format!(
        "basphere-bench-{}-{}",
        std::process::id(),
        bench.backend.as_arg()
    ));
    std::fs::create_dir_all(&tmp)?;
    let r = async {
        if matches!(a.part, Part::All | Part::Platform) {
            platform::run(&bench, &tmp, a).await?;
        }
        if a.part == Part::Takeover {
            platform::takeover(&bench, &tmp.join("takeover")).await?;
        }
        if a.part == Part::Throughput {
            engine::print_throughput(&bench, &tmp.join("engine"), a.statements).await?;
        }
        if matches!(a.part, Part::All | Part::Engine) {
            engine::run(
                &bench,
                &tmp.join("engine"),
                a.batch_nodes,
                a.parallelism,
                !a.no_terraform,
                a.statements,
            )
            .await?;
        }
        let floor = matches!(a.part, Part::All | Part::Engine | Part::PgFloor);
        if floor && bench.backend == Backend::Postgres {
            floor::run(&bench, &tmp.join("floor")).await?;
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

/// A new, empty database on the PostgreSQL `server`; its URL.
fn fresh_database(server: &str) -> anyhow::Result<String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "bench_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let base = server
        .rsplit_once('/')
        .map(|(b, _)| b)
        .unwrap_or(server)
        .to_string();
    let server = server.to_string();
    let n = name.clone();
    // Its own thread and runtime: callers may be inside a runtime or not.
    std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            c.batch_execute(&format!("CREATE DATABASE {n}")).await?;
            anyhow::Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("creating a database panicked"))??;
    Ok(format!("{base}/{name}"))
}
