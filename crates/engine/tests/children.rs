//! Child workflows: a cluster-shaped definition whose first step spawns one workflow per node
//! and whose second step joins them. One node failing permanently makes the parent fail with
//! that node's reason and roll the other nodes back in reverse; a SIGKILL before or after the
//! spawn commits leaves exactly five children after restart.
//!
//! The crash test runs engines in child processes: this test binary re-executed with
//! `--exact cluster_engine_process --ignored`, which runs an engine on the database `BSP_DB`
//! with the definitions listed in `BSP_DEFS`.
mod common;
use basphere_engine::{Engine, RetryPolicy, StepCtx, StepError, StepSpec, WorkflowDef};
use basphere_store::{NewWorkflow, StepCommit, Store, WorkflowStatus};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: usize = 5;

fn quick() -> StepSpec {
    StepSpec {
        deadline: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 20,
            base: Duration::from_millis(20),
            max: Duration::from_millis(100),
            jitter: 0.0,
        },
    }
}

/// `cluster`: `spawn` queues one `cluster_node` per node (input `{"fail_node": i}` makes node
/// `i` fail), `join` fails with the first failed node's reason; undoing `spawn` rolls back
/// the nodes that succeeded, last first.
struct Cluster {
    log: Arc<Mutex<Vec<String>>>,
    spawn_sleep: Duration,
}

#[async_trait::async_trait]
impl WorkflowDef for Cluster {
    fn step(&self, _: &str) -> StepSpec {
        quick()
    }

    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        let wf = ctx.workflow;
        match ctx.name {
            "spawn" => {
                tokio::time::sleep(self.spawn_sleep).await;
                let fail = wf.input["fail_node"].as_u64();
                let children = (0..NODES as u64)
                    .map(|i| {
                        let mut c = NewWorkflow::new(
                            "cluster_node",
                            wf.owner.clone(),
                            vec!["provision".into(), "configure".into()],
                        );
                        c.input = json!({"i": i, "fail": fail == Some(i)});
                        c
                    })
                    .collect();
                Ok(StepCommit {
                    children,
                    ..StepCommit::default()
                })
            }
            "join" => {
                let children = ctx
                    .engine
                    .store()
                    .children(&wf.id)
                    .await
                    .map_err(|e| StepError::retryable(format!("reading the children: {e}")))?;
                self.log.lock().unwrap().push("join".into());
                if let Some(bad) = children
                    .iter()
                    .find(|c| c.status != WorkflowStatus::Succeeded)
                {
                    return Err(StepError::permanent(format!(
                        "node {} did not come up: {}",
                        bad.input["i"],
                        bad.error.clone().unwrap_or_default()
                    )));
                }
                Ok(StepCommit::default())
            }
            s => Err(StepError::permanent(format!("no step {s}"))),
        }
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        if ctx.name == "spawn" {
            let children = ctx
                .engine
                .store()
                .children(&ctx.workflow.id)
                .await
                .map_err(|e| StepError::retryable(format!("reading the children: {e}")))?;
            for c in children.iter().rev() {
                ctx.engine.roll_back(&c.id, "the cluster failed").await?;
            }
        }
        Ok(())
    }
}

/// `cluster_node`: `provision` then `configure`, each logged, with their undos logged too.
struct Node {
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl WorkflowDef for Node {
    fn step(&self, _: &str) -> StepSpec {
        quick()
    }

    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        let i = &ctx.workflow.input["i"];
        if ctx.name == "provision" && ctx.workflow.input["fail"] == json!(true) {
            return Err(StepError::permanent(format!("disk full on node {i}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.log.lock().unwrap().push(format!("{} {i}", ctx.name));
        Ok(StepCommit::default())
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        let i = &ctx.workflow.input["i"];
        self.log
            .lock()
            .unwrap()
            .push(format!("undo {} {i}", ctx.name));
        Ok(())
    }
}

fn cluster(input: serde_json::Value) -> NewWorkflow {
    let mut w = NewWorkflow::new("cluster", "tester", vec!["spawn".into(), "join".into()]);
    w.input = input;
    w
}

fn engine_with(
    store: &Store,
    node: &str,
    defs: &[&str],
    spawn_sleep: Duration,
) -> (Engine, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(vec![]));
    let e = Engine::new(store.clone(), engine_cfg(node));
    if defs.contains(&"cluster") {
        e.register(
            "cluster",
            Arc::new(Cluster {
                log: log.clone(),
                spawn_sleep,
            }),
        );
    }
    if defs.contains(&"cluster_node") {
        e.register("cluster_node", Arc::new(Node { log: log.clone() }));
    }
    (e, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_all_up_then_the_parent_joins_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let (e, log) = engine_with(&store, "n1", &["cluster", "cluster_node"], Duration::ZERO);
    let _stop = start(&e);
    let id = store.enqueue_workflow(&cluster(json!({}))).await.unwrap();
    let w = wait_done(&store, &id, 30).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    let children = store.children(&id).await.unwrap();
    assert_eq!(children.len(), NODES);
    for c in &children {
        assert_eq!(c.status, WorkflowStatus::Succeeded, "{c:?}");
        assert_eq!(c.parent_id.as_deref(), Some(id.as_str()));
        assert!(
            c.finished_at.unwrap() <= w.steps[1].started_at.unwrap(),
            "join ran after every child ended"
        );
    }
    let log = log.lock().unwrap().clone();
    let join = log.iter().position(|l| l == "join").expect("join ran");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("configure")).count(),
        NODES
    );
    assert!(
        log[..join]
            .iter()
            .filter(|l| l.starts_with("configure"))
            .count()
            == NODES,
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_failing_rolls_the_others_back_in_reverse_and_fails_the_parent_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let (e, log) = engine_with(&store, "n1", &["cluster", "cluster_node"], Duration::ZERO);
    let _stop = start(&e);
    let id = store
        .enqueue_workflow(&cluster(json!({"fail_node": 2})))
        .await
        .unwrap();
    let w = wait_done(&store, &id, 30).await;
    assert_eq!(w.status, WorkflowStatus::Failed, "{w:?}");
    let err = w.error.clone().unwrap();
    assert!(
        err.contains("node 2 did not come up") && err.contains("disk full on node 2"),
        "{err}"
    );
    let children = store.children(&id).await.unwrap();
    assert_eq!(children.len(), NODES);
    for c in &children {
        let i = c.input["i"].as_u64().unwrap();
        if i == 2 {
            assert_eq!(c.status, WorkflowStatus::Failed, "{c:?}");
        } else {
            assert_eq!(c.status, WorkflowStatus::Cancelled, "rolled back: {c:?}");
            assert!(
                c.error.as_deref().unwrap().contains("the cluster failed"),
                "{c:?}"
            );
            assert!(
                c.steps.iter().all(|s| s.status.as_str() == "undone"),
                "{c:?}"
            );
        }
    }
    // The parent undid the nodes that came up, last spawned first, each in reverse.
    let undos: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("undo"))
        .cloned()
        .collect();
    let want: Vec<String> = [4, 3, 1, 0]
        .iter()
        .flat_map(|i| [format!("undo configure {i}"), format!("undo provision {i}")])
        .collect();
    assert_eq!(undos, want);
}

/// The child: an engine with the definitions in `BSP_DEFS` on `BSP_DB` until every workflow has
/// ended (returns at once when not run as a child).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash test as a child process"]
async fn cluster_engine_process() {
    let Ok(db) = std::env::var("BSP_DB") else {
        return;
    };
    let defs = std::env::var("BSP_DEFS").unwrap();
    let defs: Vec<&str> = defs.split(',').collect();
    let sleep: u64 = std::env::var("BSP_SPAWN_SLEEP_MS")
        .unwrap()
        .parse()
        .unwrap();
    let store = Store::open(Path::new(&db)).await.unwrap();
    // The same node id every run: a restart reclaims its own leases at once.
    let (e, _) = engine_with(&store, "crashy", &defs, Duration::from_millis(sleep));
    let _stop = start(&e);
    loop {
        let ws = store.workflows(None, 1000).await.unwrap();
        if ws.iter().all(|w| w.status.is_terminal()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_process(db: &Path, defs: &str, spawn_sleep_ms: u64) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cluster_engine_process",
            "--ignored",
            "--nocapture",
        ])
        .env("BSP_DB", db)
        .env("BSP_DEFS", defs)
        .env("BSP_SPAWN_SLEEP_MS", spawn_sleep_ms.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn until(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_and_after_the_spawn_commits_leaves_exactly_five_children() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("basphere.db");
    let store = open_sqlite(dir.path()).await;
    let id = store.enqueue_workflow(&cluster(json!({}))).await.unwrap();
    let spawn_started = async |store: &Store| {
        let w = store.workflow(&id).await.unwrap().unwrap();
        w.steps[0].attempts > 0
    };

    // 1. Killed while `spawn` runs (it sleeps 2 s): nothing spawned.
    let mut child = spawn_process(&db, "cluster", 2000);
    until("spawn to start", 30, async || spawn_started(&store).await).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_eq!(
        store.children(&id).await.unwrap().len(),
        0,
        "no child before the commit"
    );

    // 2. Killed once the spawn committed, before any child started: this engine knows no
    //    `cluster_node`, so its children stay unstarted.
    let mut child = spawn_process(&db, "cluster", 0);
    until("the spawn to commit", 30, async || {
        store.children(&id).await.unwrap().len() == NODES
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let children = store.children(&id).await.unwrap();
    assert_eq!(children.len(), NODES);
    assert!(
        children
            .iter()
            .all(|c| c.steps.iter().all(|s| s.attempts == 0)),
        "killed between the spawn and the children's start: {children:?}"
    );

    // 3. Restarted with both definitions: the run ends, still with exactly five children.
    let mut child = spawn_process(&db, "cluster,cluster_node", 0);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "engine never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    assert_eq!(
        w.steps[0].attempts, 2,
        "spawn ran twice (killed once mid-step), committed once"
    );
    let children = store.children(&id).await.unwrap();
    assert_eq!(
        children.len(),
        NODES,
        "exactly five children after the restarts"
    );
    assert!(
        children
            .iter()
            .all(|c| c.status == WorkflowStatus::Succeeded),
        "{children:?}"
    );
    let all = store.workflows(None, 100).await.unwrap();
    assert_eq!(all.len(), NODES + 1, "no stray workflow");
}
