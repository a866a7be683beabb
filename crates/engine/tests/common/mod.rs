//! Shared parts of the engine tests: a "ledger" workflow definition whose steps record what
//! they do, stores with a user, and engines with the do-nothing test provider.
#![allow(dead_code)]

use basphere_config::Config;
use basphere_core::{NetworkPool, Quota, Username};
use basphere_engine::{
    Engine, EngineConfig, RetryPolicy, StepCtx, StepError, StepSpec, WorkflowDef,
};
use basphere_provider::{NullProvider, Provider};
use basphere_store::{Actor, NewRegistration, NewWorkflow, StepCommit, Store};
use basphere_testkit::postgres::Postgres;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";

pub fn now_ms() -> i64 {
    basphere_store::now_ms()
}

/// A step definition driven by the workflow's input:
/// `{"sleep_ms": [lo, hi], "fail_at": k, "slow_at": k, "slow_ms": n, "deadline_ms": n}`.
/// Each run appends `start NODE WF IDX MS` and `end NODE WF IDX MS` to `log` (a file, so
/// several processes can share it); in-process tests also read `calls`. A successful step
/// commits one effect keyed by its idempotency key, atomically with its completion.
pub struct Ledger {
    pub node: String,
    pub log: Option<PathBuf>,
    pub calls: Mutex<Vec<String>>,
    /// Fail `fail_at` only while this is set (retry tests clear it).
    pub failing: std::sync::atomic::AtomicBool,
}

impl Ledger {
    pub fn new(node: &str, log: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            node: node.into(),
            log,
            calls: Mutex::new(vec![]),
            failing: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn note(&self, what: &str, ctx: &StepCtx<'_>) {
        let line = format!(
            "{what} {} {} {} {}",
            self.node,
            ctx.workflow.id,
            ctx.idx,
            now_ms()
        );
        self.calls
            .lock()
            .unwrap()
            .push(format!("{what} {}", ctx.idx));
        if let Some(p) = &self.log {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            f.write_all(format!("{line}\n").as_bytes()).unwrap();
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl WorkflowDef for Ledger {
    fn step(&self, _name: &str) -> StepSpec {
        StepSpec {
            deadline: Duration::from_secs(5),
            retry: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_millis(20),
                max: Duration::from_millis(200),
                jitter: 0.2,
            },
        }
    }

    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        let input = &ctx.workflow.input;
        self.note("start", ctx);
        let idx = i64::from(ctx.idx);
        let mut ms = match input["sleep_ms"].as_array() {
            Some(r) => {
                let lo = r[0].as_u64().unwrap_or(0);
                let hi = r[1].as_u64().unwrap_or(lo).max(lo);
                lo + rand::random::<u64>() % (hi - lo + 1)
            }
            None => 0,
        };
        if input["slow_at"].as_i64() == Some(idx) {
            ms = input["slow_ms"].as_u64().unwrap_or(1000);
        }
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if input["fail_at"].as_i64() == Some(idx)
            && self.failing.load(std::sync::atomic::Ordering::SeqCst)
        {
            self.note("fail", ctx);
            return Err(StepError::permanent(format!("step {idx} fails as told")));
        }
        self.note("end", ctx);
        Ok(StepCommit {
            output: Some(json!({"step": idx})),
            effects: vec![(ctx.idem_key.to_string(), json!({"step": idx}))],
            ..StepCommit::default()
        })
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        self.note("undo", ctx);
        Ok(())
    }
}

/// The steps of VM operation `op`, with the default timeout.
pub fn vm_steps(op: basphere_core::VmOperation) -> Vec<basphere_store::NewStep> {
    basphere_vm_workflows::step_names(op)
        .iter()
        .map(|s| (*s).into())
        .collect()
}

/// A create of VMs `names` of `owner` (1 vCPU, 1 GiB, 10 GiB) on the null provider.
#[allow(dead_code)]
pub fn create_req(owner: &Username, names: &[&str]) -> basphere_store::AdmitRequest {
    basphere_store::AdmitRequest {
        owner: owner.clone(),
        names: names.iter().map(|n| n.parse().unwrap()).collect(),
        os: "debian-12".parse().unwrap(),
        login_user: "debian".into(),
        spec_name: "tiny".parse().unwrap(),
        spec: basphere_core::Spec {
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 10,
        },
        provider: "null".into(),
        steps: vm_steps(basphere_core::VmOperation::Create),
    }
}

/// 1 vCPU, 512 MiB, 10 GiB.
#[allow(dead_code)]
pub fn tiny() -> basphere_core::Spec {
    basphere_core::Spec {
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 10,
    }
}

/// A batch node `name` (tiny, debian-12) with its edges.
#[allow(dead_code)]
pub fn node(name: &str, requires: &[&str], optional: &[&str]) -> basphere_store::BatchVm {
    basphere_store::BatchVm {
        name: name.parse().unwrap(),
        os: "debian-12".parse().unwrap(),
        login_user: "debian".into(),
        spec_name: "tiny".parse().unwrap(),
        spec: tiny(),
        requires: requires.iter().map(|s| s.to_string()).collect(),
        optional: optional.iter().map(|s| s.to_string()).collect(),
        extras: Default::default(),
    }
}

/// A batch of `owner`'s creates on the null provider.
#[allow(dead_code)]
pub fn batch(
    owner: &basphere_core::Username,
    parallelism: u32,
    creates: Vec<basphere_store::BatchVm>,
) -> basphere_store::BatchRequest {
    basphere_store::BatchRequest {
        owner: owner.clone(),
        provider: "null".into(),
        parallelism,
        creates,
        deletes: vec![],
        create_steps: vm_steps(basphere_core::VmOperation::Create),
        delete_steps: vm_steps(basphere_core::VmOperation::Delete),
    }
}

/// A ledger workflow of `steps` steps with `input`.
pub fn ledger_workflow(steps: usize, input: serde_json::Value) -> NewWorkflow {
    let mut w = NewWorkflow::new(
        "ledger",
        "tester",
        (0..steps).map(|i| format!("s{i}").into()).collect(),
    );
    w.input = input;
    w
}

/// The tests' config: a /16 pool in blocks of 1,024 addresses, short leases and deadlines.
pub fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let env = [
            ("BASPHERE_NETWORK__CIDR", "10.200.0.0/16"),
            ("BASPHERE_NETWORK__GATEWAY", "10.200.0.1"),
            ("BASPHERE_NETWORK__DNS", "[]"),
            ("BASPHERE_NETWORK__BLOCK_SIZE", "1024"),
            ("BASPHERE_ENGINE__LEASE_SECS", "3"),
            ("BASPHERE_ENGINE__MAX_PARALLEL", "8"),
            ("BASPHERE_ENGINE__MAX_ATTEMPTS", "3"),
            ("BASPHERE_ENGINE__READY_TIMEOUT_SECS", "5"),
        ];
        Config::load(None, env.map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    })
}

pub fn pool() -> NetworkPool {
    config().network.clone()
}

/// The embedded SQLite store in `dir`: for tests whose engines in child processes open the same
/// file (`BSP_DB`).
pub async fn open_sqlite(dir: &Path) -> Store {
    Store::open(&dir.join("basphere.db")).await.unwrap()
}

/// A store on the backend the test run picks (`BASPHERE_TEST_BACKEND=postgres`: a PostgreSQL 15
/// of this test's own, returned beside it to stop when dropped; else SQLite in `dir`).
pub async fn open(dir: &Path) -> (Store, Option<Postgres>) {
    if basphere_testkit::server::test_backend_is_postgres() {
        let pg = Postgres::start();
        let url = pg.create_database("engine");
        return (Store::open_postgres(&url).await.unwrap(), Some(pg));
    }
    (open_sqlite(dir).await, None)
}

/// Registers and approves `name` with a quota of `vms` VMs.
pub async fn user(store: &Store, name: &str, vms: u32) -> Username {
    let u: Username = name.parse().unwrap();
    let actor = Actor::new("test", "test");
    let q = Quota {
        max_vms: vms,
        max_ips: vms,
        ..Quota::default()
    };
    store
        .register(
            &NewRegistration {
                username: u.clone(),
                email: "t@example.org".parse().unwrap(),
                team: "test".parse().unwrap(),
                public_key: KEY.parse().unwrap(),
            },
            &q,
            &actor,
        )
        .await
        .unwrap();
    store
        .approve(&u, &pool(), false, None, &actor)
        .await
        .unwrap();
    u
}

/// [`config`]'s engine tuning for `node`, with quick retries and a 5 s step deadline.
pub fn engine_cfg(node: &str) -> EngineConfig {
    EngineConfig {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        step_deadline: Duration::from_secs(5),
        ..basphere_app::engine_config(config(), node.into())
    }
}

/// An engine as the server builds it, over `store` with [`config`]'s catalog.
pub fn engine(store: &Store, provider: Arc<dyn Provider>, cfg: EngineConfig) -> Engine {
    basphere_app::engine(store, provider, config(), cfg)
}

/// Starts `e` in the background; drop the sender to keep it, send `true` to stop it.
pub fn start(e: &Engine) -> tokio::sync::watch::Sender<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(e.clone().run(rx));
    tx
}

pub fn null() -> Arc<NullProvider> {
    Arc::new(NullProvider::default())
}

/// Waits until workflow `id` is terminal (at most `secs`), returning it.
pub async fn wait_done(store: &Store, id: &str, secs: u64) -> basphere_store::Workflow {
    let t0 = std::time::Instant::now();
    loop {
        let w = store.workflow(id).await.unwrap().unwrap();
        if w.status.is_terminal() {
            return w;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "workflow {id} did not end within {secs}s: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts this test binary again as an engine process (its `engine_process` test) on `db`.
pub fn spawn_engine(db: &Path, node: &str, log: &Path, lease_ms: u64) -> std::process::Child {
    spawn_engine_with(&[("BSP_DB", db.to_str().unwrap())], node, log, lease_ms)
}

/// [`spawn_engine`] with other settings: `BSP_PG_URL` (a PostgreSQL database instead of
/// `BSP_DB`), `BSP_PER_USER` (a per-user claim limit).
pub fn spawn_engine_with(
    env: &[(&str, &str)],
    node: &str,
    log: &Path,
    lease_ms: u64,
) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "engine_process", "--ignored", "--nocapture"])
        .envs(env.iter().copied())
        .env("BSP_NODE", node)
        .env("BSP_LOG", log)
        .env("BSP_LEASE_MS", lease_ms.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Body of the child `engine_process` test: an engine with the ledger definition on `BSP_DB`
/// until every workflow has ended (returns at once when not run as a child).
pub async fn engine_process_main() {
    let store = match (std::env::var("BSP_DB"), std::env::var("BSP_PG_URL")) {
        (Ok(db), _) => Store::open(Path::new(&db)).await.unwrap(),
        (_, Ok(url)) => Store::open_postgres(&url).await.unwrap(),
        _ => return,
    };
    let node = std::env::var("BSP_NODE").unwrap();
    let log = std::env::var("BSP_LOG").unwrap();
    let lease: u64 = std::env::var("BSP_LEASE_MS").unwrap().parse().unwrap();
    let mut cfg = engine_cfg(&node);
    cfg.lease = Duration::from_millis(lease);
    if let Ok(n) = std::env::var("BSP_PER_USER") {
        cfg.limits.per_user = Some(n.parse().unwrap());
    }
    if let Ok(n) = std::env::var("BSP_MAX_PARALLEL") {
        cfg.max_parallel = n.parse().unwrap();
    }
    let e = engine(&store, null(), cfg);
    e.register("ledger", Ledger::new(&node, Some(log.into())));
    let _stop = start(&e);
    loop {
        let ws = store.workflows(None, 1000).await.unwrap();
        if ws.iter().all(|w| w.status.is_terminal()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lines of the shared step log: (what, node, workflow, idx, ms).
pub fn read_log(p: &Path) -> Vec<(String, String, String, u32, i64)> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split(' ').collect();
            (v.len() == 5).then(|| {
                (
                    v[0].to_string(),
                    v[1].to_string(),
                    v[2].to_string(),
                    v[3].parse().unwrap(),
                    v[4].parse().unwrap(),
                )
            })
        })
        .collect()
}
