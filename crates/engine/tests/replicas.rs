//! Three replicas on one PostgreSQL: engine processes (different node ids) sharing a real
//! PostgreSQL 15 database work one queue. Every step's effect is committed once, no step runs
//! on two replicas at once, a replica SIGKILLed mid-step has its step taken over within the
//! lease plus 2 s, and a per-user limit holds over all three.
//!
//! The replicas are this test binary re-executed (`--exact engine_process --ignored`) with
//! `BSP_PG_URL` set; each appends `start|end NODE WF IDX MS` lines to a shared log.
mod common;
use basphere_store::{BatchWork, Completion, NewWorkflow, Store, WorkflowStatus};
use basphere_testkit::postgres::Postgres;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LEASE_MS: u64 = 1500;

/// One run of a step: the replica, its start and (unless it was killed) its end.
type Run = (String, i64, Option<i64>);

/// The child: runs an engine with the ledger definition until every workflow has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the replica tests as a child process"]
async fn engine_process() {
    engine_process_main().await;
}

fn replica(url: &str, node: &str, log: &Path, extra: &[(&str, &str)]) -> std::process::Child {
    let mut env = vec![("BSP_PG_URL", url)];
    env.extend_from_slice(extra);
    spawn_engine_with(&env, node, log, LEASE_MS)
}

fn wait_all(children: &mut [std::process::Child], secs: u64) {
    let t0 = Instant::now();
    for c in children.iter_mut() {
        while c.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "replicas never finished"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A PostgreSQL 15 of the test's own with one database, a store on it, and the log the
/// replicas append their steps to.
struct Shared {
    _pg: Postgres,
    _dir: tempfile::TempDir,
    url: String,
    log: PathBuf,
    store: Store,
}

impl Shared {
    async fn new(db: &str) -> Self {
        let pg = Postgres::start();
        let url = pg.create_database(db);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("steps.log");
        let store = Store::open_postgres(&url).await.unwrap();
        Self {
            _pg: pg,
            _dir: dir,
            url,
            log,
            store,
        }
    }

    /// Runs replicas node-a, node-b and node-c (with `extra` in their environment) until
    /// they exit, two minutes at most.
    fn run_three(&self, extra: &[(&str, &str)]) {
        let mut rs: Vec<_> = ["node-a", "node-b", "node-c"]
            .iter()
            .map(|n| replica(&self.url, n, &self.log, extra))
            .collect();
        wait_all(&mut rs, 120);
    }

    async fn assert_succeeded(&self, ids: impl IntoIterator<Item = &String>) {
        for id in ids {
            let w = self.store.workflow(id).await.unwrap().unwrap();
            assert_eq!(w.status, WorkflowStatus::Succeeded, "{id}: {w:?}");
        }
    }

    /// [`most_at_once`] of the replicas' log.
    fn most_at_once(&self) -> (i32, BTreeMap<String, usize>) {
        most_at_once(&read_log(&self.log))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_300_workflows_every_effect_once_no_overlap_and_takeover_after_sigkill() {
    let sh = Shared::new("replicas").await;
    let (url, log, store) = (&sh.url, &sh.log, &sh.store);
    let ws: Vec<NewWorkflow> = (0..300)
        .map(|_| ledger_workflow(4, json!({"sleep_ms": [5, 40]})))
        .collect();
    let ids = store.enqueue_workflows(&ws, &[]).await.unwrap();

    let mut a = replica(url, "node-a", log, &[]);
    let mut others = vec![
        replica(url, "node-b", log, &[]),
        replica(url, "node-c", log, &[]),
    ];
    // Kill A inside a step: one of its starts without an end.
    let t0 = Instant::now();
    let (killed_at, open) = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "node-a never ran");
        tokio::time::sleep(Duration::from_millis(3)).await;
        let lines = read_log(log);
        if lines
            .iter()
            .filter(|l| l.1 == "node-a" && l.0 == "end")
            .count()
            < 20
        {
            continue;
        }
        let mut open: BTreeMap<(String, u32), i64> = BTreeMap::new();
        for l in lines.iter().filter(|l| l.1 == "node-a") {
            if l.0 == "start" {
                open.insert((l.2.clone(), l.3), l.4);
            } else {
                open.remove(&(l.2.clone(), l.3));
            }
        }
        if !open.is_empty() {
            kill(Pid::from_raw(a.id() as i32), Signal::SIGKILL).unwrap();
            break (now_ms(), open);
        }
    };
    a.wait().unwrap();
    wait_all(&mut others, 120);

    // Every workflow ended, and every step's effect is there exactly once.
    for id in &ids {
        let w = store.workflow(id).await.unwrap().unwrap();
        assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
        let effects = store.step_effects(id).await.unwrap();
        let idxs: Vec<u32> = effects.iter().map(|e| e.idx).collect();
        assert_eq!(
            idxs,
            [0, 1, 2, 3],
            "each step's effect once, in order: {id}"
        );
    }
    // No step ran on two replicas at once: a step's runs do not overlap in time.
    let lines = read_log(log);
    let mut runs: BTreeMap<(String, u32), Vec<Run>> = BTreeMap::new();
    for l in &lines {
        let e = runs.entry((l.2.clone(), l.3)).or_default();
        match l.0.as_str() {
            "start" => e.push((l.1.clone(), l.4, None)),
            _ => {
                if let Some(r) = e.iter_mut().rev().find(|r| r.0 == l.1 && r.2.is_none()) {
                    r.2 = Some(l.4);
                }
            }
        }
    }
    let nodes: std::collections::BTreeSet<&str> = lines.iter().map(|l| l.1.as_str()).collect();
    assert_eq!(nodes.len(), 3, "all three replicas worked: {nodes:?}");
    for (step, rs) in &runs {
        for (i, x) in rs.iter().enumerate() {
            for y in &rs[i + 1..] {
                // A run without an end is the killed replica's: it ends at the kill.
                let (xe, ye) = (x.2.unwrap_or(killed_at), y.2.unwrap_or(killed_at));
                assert!(
                    xe <= y.1 || ye <= x.1,
                    "step {step:?} ran on two replicas at once: {x:?} and {y:?}"
                );
            }
        }
    }
    // The killed replica's open steps were taken over within the lease plus 2 s.
    for (wf, idx) in open.keys() {
        let taken = runs[&(wf.clone(), *idx)]
            .iter()
            .filter(|r| r.0 != "node-a" && r.1 >= killed_at - 5)
            .map(|r| r.1)
            .min()
            .expect("another replica ran the killed step");
        let after = taken - killed_at;
        eprintln!("step {wf}/{idx} taken over {after} ms after the kill");
        assert!(
            after <= LEASE_MS as i64 + 2000,
            "taken over after {after} ms (lease {LEASE_MS} ms)"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_user_limit_of_two_holds_across_three_replicas() {
    let sh = Shared::new("limits").await;
    let ws: Vec<NewWorkflow> = (0..18)
        .map(|_| ledger_workflow(2, json!({"sleep_ms": [30, 60]})))
        .collect();
    let ids = sh.store.enqueue_workflows(&ws, &[]).await.unwrap();
    sh.run_three(&[("BSP_PER_USER", "2")]);
    sh.assert_succeeded(&ids).await;
    let (most, per_node) = sh.most_at_once();
    eprintln!("at most {most} of the user's workflows at once; starts per replica {per_node:?}");
    assert!(most <= 2, "the per-user limit of 2 was exceeded: {most}");
    assert_eq!(most, 2, "the limit was reached (the test can fail)");
    assert!(
        per_node.len() >= 2,
        "more than one replica took work: {per_node:?}"
    );
    sh.store.close().await;
}

/// A batch's slots pass from node to node across three replicas (on PostgreSQL without turns
/// on the batch row): never more of its nodes at once than its parallelism, every slot used,
/// and every node run — the layered ones too, made ready by endings on other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_parallelism_holds_across_three_replicas() {
    let sh = Shared::new("batch_slots").await;
    let work = |node: String, requires: Vec<String>| {
        let mut w = BatchWork::new(
            node,
            "ledger",
            ledger_workflow(2, json!({"sleep_ms": [5, 25]})),
        );
        w.requires = requires;
        w
    };
    let mut works: Vec<BatchWork> = (0..30).map(|i| work(format!("n{i}"), vec![])).collect();
    // Three layers of six after them, each node requiring two of the layer before.
    for layer in 0..3 {
        for i in 0..6 {
            let before = |j: usize| match layer {
                0 => format!("n{j}"),
                _ => format!("l{}-{j}", layer - 1),
            };
            works.push(work(
                format!("l{layer}-{i}"),
                vec![before(i), before((i + 1) % 6)],
            ));
        }
    }
    let b = sh.store.enqueue_batch("tester", 4, works).await.unwrap();
    // Two at a time each: a replica passes a slot on to a node it leases itself, so the
    // batch's four are held by two replicas or three, whose passes race.
    sh.run_three(&[("BSP_MAX_PARALLEL", "2")]);
    sh.assert_succeeded(b.nodes.iter().map(|n| &n.operation_id))
        .await;
    let (most, per_node) = sh.most_at_once();
    eprintln!("at most {most} of the batch's nodes at once; starts per replica {per_node:?}");
    assert!(
        most <= 4,
        "the batch's parallelism of 4 was exceeded: {most}"
    );
    assert_eq!(most, 4, "every slot was used (the test can fail)");
    assert!(
        per_node.len() >= 2,
        "more than one replica took work: {per_node:?}"
    );
    sh.store.close().await;
}

/// The most workflows of `log` running at once (each holds its slot from its first step's
/// start to its last step's end), and the starts per replica.
fn most_at_once(log: &[(String, String, String, u32, i64)]) -> (i32, BTreeMap<String, usize>) {
    let mut span: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for l in log {
        let e = span.entry(l.2.clone()).or_insert((i64::MAX, 0));
        if l.0 == "start" {
            e.0 = e.0.min(l.4);
            *per_node.entry(l.1.clone()).or_default() += 1;
        } else {
            e.1 = e.1.max(l.4);
        }
    }
    let mut edges: Vec<(i64, i32)> = span
        .values()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    (most, per_node)
}

/// Another replica's commit made after an engine was created but before it runs reaches the
/// engine's subscribers as soon as it runs (the commit's notification was kept for it), not
/// only at the relay's periodic look-back five seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_between_engine_creation_and_run_are_relayed() {
    let Relay {
        _pg,
        here,
        other,
        e,
        mut rx,
        id,
        ..
    } = relay_fixture("relay").await;
    let runs = ["ledger".to_string()];
    let limits = basphere_store::ClaimLimits::default();
    let claimed = other
        .claim_many("node-b", 10_000, &limits, 1, &runs)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let next = basphere_store::NextStep {
        idx: 1,
        name: "s1",
        deadline_ms: 5_000,
    };
    let done = basphere_store::StepCommit::default();
    other
        .complete(Completion {
            next: Some(next),
            ..Completion::of(&id, "node-b", 0, "s0", &done)
        })
        .await
        .unwrap();
    let want: Vec<i64> = other
        .events(&id, 0)
        .await
        .unwrap()
        .iter()
        .map(|ev| ev.seq)
        .collect();
    assert!(want.len() >= 3, "the other replica's events: {want:?}");
    // Its notifications reach this store meanwhile, before the engine runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _stop = start(&e);
    let t0 = Instant::now();
    let mut got = vec![];
    while got.len() < want.len() {
        let left = Duration::from_secs(3).saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) if ev.operation_id == id => got.push(ev.seq),
            Ok(Ok(_)) => {}
            r => panic!("relayed {got:?} of {want:?} in 3 s: {r:?}"),
        }
    }
    assert_eq!(got, want);
    here.close().await;
    other.close().await;
}

/// An append committed unheard of (no notification names it: here a writer of raw SQL) is
/// relayed however far behind the newest event its number is: it was a gap the relay kept
/// looking for. (The relay once looked back 1,024 events only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unheard_commit_far_behind_the_newest_event_is_relayed() {
    let Relay {
        _pg,
        url,
        here,
        other,
        e,
        mut rx,
        id,
    } = relay_fixture("gap").await;
    let _stop = start(&e);
    let append = |kind: &str, message: &str| {
        format!(
            "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
             SELECT '{id}', 0, NULL, '{kind}', {message}"
        )
    };
    // The relay has started once it relays an event: what it reads from then on is what this
    // test is about (at its start it looks back only so far, and 2,000 events committed
    // before it read its starting point would mostly lie behind that).
    let first = basphere_testkit::postgres::connect(&url).await.unwrap();
    first
        .batch_execute(&format!(
            "{}; SELECT pg_notify('basphere', 'elsewhere')",
            append("ready", "'relay running'")
        ))
        .await
        .unwrap();
    relayed(&mut rx, "ready", 1, Duration::from_secs(10)).await;
    // One transaction takes an event number and holds it uncommitted...
    let late = basphere_testkit::postgres::connect(&url).await.unwrap();
    late.batch_execute(&format!("BEGIN; {}", append("late", "'committed late'")))
        .await
        .unwrap();
    // ...while 2,000 events after it commit, and are relayed (their notification names none).
    let bulk = basphere_testkit::postgres::connect(&url).await.unwrap();
    bulk.batch_execute(&format!(
        "{} FROM generate_series(1, 2000) g; SELECT pg_notify('basphere', 'elsewhere')",
        append("bulk", "'n' || g")
    ))
    .await
    .unwrap();
    relayed(&mut rx, "bulk", 2000, Duration::from_secs(10)).await;
    // Then it commits, and no notification tells of it: the relay's next look finds it.
    late.batch_execute("COMMIT").await.unwrap();
    relayed(&mut rx, "late", 1, Duration::from_secs(8)).await;
    here.close().await;
    other.close().await;
}

/// Waits until `n` events of `kind` were broadcast on `rx`, for at most `within`.
async fn relayed(
    rx: &mut tokio::sync::broadcast::Receiver<basphere_store::WorkflowEvent>,
    kind: &str,
    n: usize,
    within: Duration,
) {
    let t0 = Instant::now();
    let mut got = 0;
    while got < n {
        let left = within.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) if ev.kind == kind => got += 1,
            Ok(Ok(_)) => {}
            r => panic!("{got} of {n} `{kind}` events relayed in {within:?}: {r:?}"),
        }
    }
}

/// Two stores on one fresh database, an engine over the first with a subscriber, and a
/// `ledger` workflow queued through the second. The engine knows no `ledger` definition: only
/// the other replica could run it.
struct Relay {
    _pg: Postgres,
    url: String,
    here: Store,
    other: Store,
    e: basphere_engine::Engine,
    rx: tokio::sync::broadcast::Receiver<basphere_store::WorkflowEvent>,
    id: String,
}

async fn relay_fixture(db: &str) -> Relay {
    let pg = Postgres::start();
    let url = pg.create_database(db);
    let here = Store::open_postgres(&url).await.unwrap();
    let other = Store::open_postgres(&url).await.unwrap();
    let e = engine(&here, null(), engine_cfg("node-a"));
    let rx = e.subscribe();
    let id = other
        .enqueue_workflow(&ledger_workflow(2, json!({})))
        .await
        .unwrap();
    Relay {
        _pg: pg,
        url,
        here,
        other,
        e,
        rx,
        id,
    }
}
