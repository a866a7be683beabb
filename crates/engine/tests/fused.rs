//! Quick steps of one workflow are recorded together: those finishing within the fuse window
//! of the first share one commit, a slower step gets its predecessors recorded while it runs,
//! and a cancel that arrives before they are recorded still undoes every step that ran.
mod common;
use basphere_engine::{EngineConfig, RetryPolicy, StepCtx, StepError, StepSpec, WorkflowDef};
use basphere_store::{NewWorkflow, StepCommit, StepStatus, Store, Workflow, WorkflowStatus};
use common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Steps named `slow` wait for `release` (after telling `entered`); every other step returns at
/// once. Runs and undos are logged.
#[derive(Default)]
struct Steps {
    log: Mutex<Vec<String>>,
    entered: Notify,
    release: Notify,
}

#[async_trait::async_trait]
impl WorkflowDef for Steps {
    fn step(&self, _: &str) -> StepSpec {
        StepSpec {
            deadline: Duration::from_secs(30),
            retry: RetryPolicy {
                max_attempts: 1,
                base: Duration::from_millis(10),
                max: Duration::from_millis(10),
                jitter: 0.0,
            },
        }
    }

    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        if ctx.name == "slow" {
            self.entered.notify_one();
            self.release.notified().await;
        }
        self.log.lock().unwrap().push(ctx.name.to_string());
        Ok(StepCommit::default())
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        self.log.lock().unwrap().push(format!("undo {}", ctx.name));
        Ok(())
    }
}

fn workflow(steps: &[&str]) -> NewWorkflow {
    NewWorkflow::new(
        "steps",
        "tester",
        steps.iter().map(|s| (*s).into()).collect(),
    )
}

fn engine_with(store: &Store, window: Duration) -> (basphere_engine::Engine, Arc<Steps>) {
    let e = basphere_engine::Engine::new(
        store.clone(),
        EngineConfig {
            fuse_window: window,
            ..engine_cfg("n1")
        },
    );
    let def = Arc::new(Steps::default());
    e.register("steps", def.clone());
    (e, def)
}

/// Runs `a`, `b`, `slow`, `d` with fuse window `window` until `slow` has begun: the data
/// dir with the PostgreSQL server if any, store, workflow id, definition and the engine's
/// stop switch.
async fn until_slow(
    window: Duration,
) -> (
    (
        tempfile::TempDir,
        Option<basphere_testkit::postgres::Postgres>,
    ),
    Store,
    String,
    Arc<Steps>,
    tokio::sync::watch::Sender<bool>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (store, pg) = open(dir.path()).await;
    let (e, def) = engine_with(&store, window);
    let id = store
        .enqueue_workflow(&workflow(&["a", "b", "slow", "d"]))
        .await
        .unwrap();
    let stop = start(&e);
    def.entered.notified().await;
    ((dir, pg), store, id, def, stop)
}

/// Polls workflow `id` until `ok` holds (at most 10 s).
async fn until(store: &Store, id: &str, ok: impl Fn(&Workflow) -> bool) -> Workflow {
    let t0 = Instant::now();
    loop {
        let w = store.workflow(id).await.unwrap().unwrap();
        if ok(&w) {
            return w;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{w:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs a workflow of five quick steps; returns its record, events and the commits it took.
async fn five_quick(window: Duration) -> (Workflow, Vec<(String, String, i64)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let (e, def) = engine_with(&store, window);
    let id = store
        .enqueue_workflow(&workflow(&["a", "b", "c", "d", "e"]))
        .await
        .unwrap();
    let before = store.commits();
    let _stop = start(&e);
    let w = wait_done(&store, &id, 10).await;
    let commits = store.commits() - before;
    assert_eq!(*def.log.lock().unwrap(), ["a", "b", "c", "d", "e"]);
    let evs = store
        .events(&id, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.step.unwrap_or_default(), e.at))
        .collect();
    (w, evs, commits)
}

/// The events' kinds and steps, without their times.
fn kinds(evs: &[(String, String, i64)]) -> Vec<(String, String)> {
    evs.iter().map(|(k, s, _)| (k.clone(), s.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_steps_share_one_commit_with_every_event_in_order() {
    let (w, evs, commits) = five_quick(Duration::from_secs(5)).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    for s in &w.steps {
        assert_eq!((s.status, s.attempts), (StepStatus::Done, 1), "{s:?}");
        assert!(s.started_at.is_some() && s.finished_at.is_some(), "{s:?}");
    }
    let mut want = vec![("queued".to_string(), String::new())];
    for s in ["a", "b", "c", "d", "e"] {
        want.push(("step_started".into(), s.into()));
        want.push(("step_done".into(), s.into()));
    }
    want.push(("succeeded".into(), String::new()));
    assert_eq!(kinds(&evs), want);
    // Everything after the claim (queued, a started) was written by one transaction: one time.
    let at: Vec<i64> = evs[3..].iter().map(|e| e.2).collect();
    assert!(at.iter().all(|&t| t == at[0]), "one commit: {evs:?}");
    // With no window, each step commits on its own: the same record, more commits (the
    // engine's idle claims add a few to both counts).
    let (w, evs0, commits0) = five_quick(Duration::ZERO).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded);
    assert_eq!(kinds(&evs0), want);
    assert!(
        commits < commits0,
        "five completions in one commit ({commits} in all) against one each ({commits0})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_step_has_the_quick_ones_before_it_recorded_while_it_runs() {
    let (_dir, store, id, def, _stop) = until_slow(Duration::from_millis(50)).await;
    // The window closes while `slow` runs: `a` and `b` are recorded done, `slow` running.
    let w = until(&store, &id, |w| w.step == 2).await;
    let st: Vec<StepStatus> = w.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        [
            StepStatus::Done,
            StepStatus::Done,
            StepStatus::Running,
            StepStatus::Pending
        ]
    );
    assert_eq!(w.steps[2].attempts, 1);
    def.release.notify_one();
    let w = wait_done(&store, &id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    assert_eq!(*def.log.lock().unwrap(), ["a", "b", "slow", "d"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_quick_steps_are_recorded_still_undoes_every_step_that_ran() {
    // A window long enough for the cancel to land before anything after the claim is recorded.
    let (_dir, store, id, def, _stop) = until_slow(Duration::from_millis(1500)).await;
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(w.step, 0, "nothing recorded yet but the claim: {w:?}");
    store
        .request_cancel(&id, &basphere_store::Actor::new("tester", "test"))
        .await
        .unwrap();
    // The window closes and records `a` and `b` (seeing the cancel) while `slow` still runs.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    def.release.notify_one();
    let w = wait_done(&store, &id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Cancelled, "{w:?}");
    assert_eq!(
        *def.log.lock().unwrap(),
        ["a", "b", "slow", "undo slow", "undo b", "undo a"],
        "`slow` ran unrecorded and is undone too; `d` never runs"
    );
    let st: Vec<StepStatus> = w.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        [
            StepStatus::Undone,
            StepStatus::Undone,
            StepStatus::Undone,
            StepStatus::Skipped
        ]
    );
}
