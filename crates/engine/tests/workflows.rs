//! Undo, cancel, retry, batches and limits, with the engine in this process.
mod common;
use basphere_core::VmStatus;
use basphere_provider::NullProvider;
use basphere_store::{Actor, BatchVm, BatchWork, StepStatus, WorkflowStatus};
use common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn admin() -> Actor {
    Actor::new("test", "test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_k_fails_permanently_done_steps_undone_in_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let e = engine(&store, null(), engine_cfg("n1"));
    let ledger = Ledger::new("n1", None);
    e.register("ledger", ledger.clone());
    let _stop = start(&e);
    let id = store
        .enqueue_workflow(&ledger_workflow(6, json!({"fail_at": 4})))
        .await
        .unwrap();
    e.wake();
    let w = wait_done(&store, &id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Failed);
    assert_eq!(w.error.as_deref(), Some("s4: step 4 fails as told"));
    assert_eq!(
        ledger.calls(),
        [
            "start 0", "end 0", "start 1", "end 1", "start 2", "end 2", "start 3", "end 3",
            "start 4", "fail 4", "undo 3", "undo 2", "undo 1", "undo 0"
        ]
    );
    let st: Vec<StepStatus> = w.steps.iter().map(|s| s.status).collect();
    use StepStatus::*;
    assert_eq!(st, [Undone, Undone, Undone, Undone, Failed, Pending]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_create_failing_releases_address_and_quota_and_marks_the_vm_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let u = user(&store, "alice", 5).await;
    let mut provider = NullProvider::default();
    provider.fail_phase = Some("wait_ready");
    let provider = Arc::new(provider);
    let e = engine(&store, provider.clone(), engine_cfg("n1"));
    let _stop = start(&e);
    let a = store
        .admit_vms(&create_req(&u, &["fail-web"]), &pool(), &admin())
        .await
        .unwrap();
    e.wake();
    let w = wait_done(&store, &a[0].operation_id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Failed);
    let phases: Vec<&str> = provider.calls().iter().map(|c| c.phase).collect();
    assert_eq!(phases, ["prepare", "start", "wait_ready", "stop", "remove"]);
    let vm = store.vm(u.as_str(), "fail-web").await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Failed);
    assert!(vm.error.unwrap().contains("wait_ready fails"));
    assert_eq!(vm.ip_address, None);
    let used = store.usage(u.as_str()).await.unwrap();
    assert_eq!((used.vms, used.ips), (0, 0));

    // Retry: the address and quota come back, and it fails the same way again.
    let evs = store
        .retry_workflow(&w.id, &basphere_store::RetryCtx { pool: &pool() }, &admin())
        .await
        .unwrap();
    e.publish(evs);
    let vm = store.vm(u.as_str(), "fail-web").await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Creating);
    assert!(vm.ip_address.is_some());
    let w = wait_done(&store, &w.id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Failed);
    assert_eq!(store.usage(u.as_str()).await.unwrap().ips, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_the_running_step_then_undoes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let e = engine(&store, null(), engine_cfg("n1"));
    let ledger = Ledger::new("n1", None);
    e.register("ledger", ledger.clone());
    let _stop = start(&e);
    let id = store
        .enqueue_workflow(&ledger_workflow(5, json!({"slow_at": 2, "slow_ms": 800})))
        .await
        .unwrap();
    e.wake();
    let t0 = Instant::now();
    while !ledger.calls().contains(&"start 2".to_string()) {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = Instant::now();
    e.publish([store.request_cancel(&id, &admin()).await.unwrap()]);
    let w = wait_done(&store, &id, 10).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(600),
        "the running step was not cut short"
    );
    assert_eq!(w.status, WorkflowStatus::Cancelled);
    assert_eq!(
        ledger.calls(),
        [
            "start 0", "end 0", "start 1", "end 1", "start 2", "end 2", "undo 2", "undo 1",
            "undo 0"
        ]
    );
    let st: Vec<StepStatus> = w.steps.iter().map(|s| s.status).collect();
    use StepStatus::*;
    assert_eq!(st, [Undone, Undone, Undone, Skipped, Skipped]);
    // A cancelled workflow can be retried from the start.
    e.publish(
        store
            .retry_workflow(&id, &basphere_store::RetryCtx { pool: &pool() }, &admin())
            .await
            .unwrap(),
    );
    let w = wait_done(&store, &id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_hanging_step_waits_for_its_deadline() {
    struct Hang;
    #[async_trait::async_trait]
    impl basphere_engine::WorkflowDef for Hang {
        fn step(&self, _: &str) -> basphere_engine::StepSpec {
            basphere_engine::StepSpec {
                deadline: Duration::from_millis(700),
                retry: basphere_engine::RetryPolicy {
                    max_attempts: 10,
                    base: Duration::from_secs(5),
                    max: Duration::from_secs(5),
                    jitter: 0.0,
                },
            }
        }
        async fn run(
            &self,
            ctx: &basphere_engine::StepCtx<'_>,
        ) -> Result<basphere_store::StepCommit, basphere_engine::StepError> {
            if ctx.idx == 1 {
                std::future::pending::<()>().await;
            }
            Ok(Default::default())
        }
        async fn undo(
            &self,
            _: &basphere_engine::StepCtx<'_>,
        ) -> Result<(), basphere_engine::StepError> {
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let e = engine(&store, null(), engine_cfg("n1"));
    e.register("hang", Arc::new(Hang));
    let _stop = start(&e);
    let mut w = ledger_workflow(3, json!({}));
    w.definition = "hang".into();
    // Queued with the definition's deadlines: 700 ms a step.
    w.steps = e.steps("hang", &["s0", "s1", "s2"]);
    assert_eq!(w.steps[1].timeout_ms, 700);
    let id = store.enqueue_workflow(&w).await.unwrap();
    e.wake();
    let t0 = Instant::now();
    loop {
        let w = store.workflow(&id).await.unwrap().unwrap();
        if w.steps[1].status == StepStatus::Running {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.publish([store.request_cancel(&id, &admin()).await.unwrap()]);
    let w = wait_done(&store, &id, 10).await;
    let took = t0.elapsed();
    assert_eq!(w.status, WorkflowStatus::Cancelled);
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(4),
        "ended at the step's deadline, not after the 5 s retry delay: {took:?}"
    );
    assert_eq!(w.steps[0].status, StepStatus::Undone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_runs_in_dependency_order_and_a_failure_skips_its_dependents() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let u = user(&store, "bob", 20).await;
    let mut provider = NullProvider::new(Duration::from_millis(20));
    provider.fail_phase = Some("start");
    let provider = Arc::new(provider);
    let e = engine(&store, provider.clone(), engine_cfg("n1"));
    let _stop = start(&e);
    // db ← app ← web; fail-cache ← worker (hard), ← report (soft); lone.
    let b = store
        .admit_batch(
            &batch(
                &u,
                10,
                vec![
                    node("web", &["app"], &[]),
                    node("app", &["db"], &["fail-cache"]),
                    node("db", &[], &[]),
                    node("fail-cache", &[], &[]),
                    node("worker", &["fail-cache"], &[]),
                    node("deep", &["worker"], &[]),
                    node("report", &[], &["fail-cache"]),
                    node("lone", &[], &[]),
                ],
            ),
            &pool(),
            &admin(),
        )
        .await
        .unwrap();
    e.wake();
    let op = |n: &str| {
        b.nodes
            .iter()
            .find(|x| x.node == n)
            .unwrap()
            .operation_id
            .clone()
    };
    for n in [
        "web",
        "app",
        "db",
        "fail-cache",
        "worker",
        "deep",
        "report",
        "lone",
    ] {
        wait_done(&store, &op(n), 10).await;
    }
    let status = |n: &'static str| {
        let store = store.clone();
        let id = op(n);
        async move { store.workflow(&id).await.unwrap().unwrap() }
    };
    for n in ["web", "app", "db", "report", "lone"] {
        assert_eq!(status(n).await.status, WorkflowStatus::Succeeded, "{n}");
    }
    assert_eq!(status("fail-cache").await.status, WorkflowStatus::Failed);
    for n in ["worker", "deep"] {
        let w = status(n).await;
        assert_eq!(w.status, WorkflowStatus::Cancelled, "{n}");
        assert!(w.error.unwrap().starts_with("skipped: requires"), "{n}");
        let vm = store.vm(u.as_str(), n).await.unwrap().unwrap();
        assert_eq!(vm.status, VmStatus::Failed);
        assert_eq!(vm.ip_address, None, "skipped node's address released");
    }
    // Order: a node's provider calls all come after its hard requirements finished.
    let calls = provider.calls();
    let vm_id = |n: &str| {
        let store = store.clone();
        let n = n.to_string();
        let u = u.clone();
        async move { store.vm(u.as_str(), &n).await.unwrap().unwrap().id }
    };
    let first = |id: &str| calls.iter().position(|c| c.instance == id).unwrap();
    let last = |id: &str| calls.iter().rposition(|c| c.instance == id).unwrap();
    let (db, app, web) = (vm_id("db").await, vm_id("app").await, vm_id("web").await);
    let (cache, report) = (vm_id("fail-cache").await, vm_id("report").await);
    assert!(last(&db) < first(&app));
    assert!(last(&app) < first(&web));
    assert!(last(&cache) < first(&app), "soft edge orders when present");
    assert!(last(&cache) < first(&report));
    assert_eq!(store.usage(u.as_str()).await.unwrap().vms, 5);
    // Each VM made is in the audit trail once, with its address; the failed and the skipped
    // are not.
    let f = basphere_store::AuditFilter {
        action: Some("vm.create".into()),
        ..Default::default()
    };
    let mut made: Vec<(String, Option<String>)> = (store.audit_list(&f).await.unwrap())
        .into_iter()
        .filter(|a| a.result == "ok")
        .map(|a| (a.target, a.detail))
        .collect();
    made.sort();
    let mut want = vec![];
    for n in ["app", "db", "lone", "report", "web"] {
        let vm = store.vm(u.as_str(), n).await.unwrap().unwrap();
        let ip = vm.ip_address.map(|ip| ip.to_string());
        want.push((format!("{u}/{n}"), ip));
    }
    assert_eq!(made, want);
}

/// A batch of another definition than VMs (the engine's ledger workflows): edges order it,
/// a failed node skips what requires it, a soft edge only orders, and its parallelism holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_any_definition_runs_like_a_vm_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let e = engine(&store, null(), engine_cfg("n1"));
    e.register("ledger", Ledger::new("n1", None));
    let _stop = start(&e);
    let work = |node: &str, requires: &[&str], optional: &[&str], input: serde_json::Value| {
        let mut w = BatchWork::new(node, "ledger", ledger_workflow(2, input));
        w.requires = requires.iter().map(|s| s.to_string()).collect();
        w.optional = optional.iter().map(|s| s.to_string()).collect();
        w
    };
    let slow = json!({"sleep_ms": [40, 40]});
    let mut works = vec![
        work("a", &[], &[], slow.clone()),
        work("b", &["a"], &[], slow.clone()),
        work("c", &["b"], &[], json!({"fail_at": 1})),
        work("d", &["c"], &[], slow.clone()),
        work("e", &[], &["c"], slow.clone()),
    ];
    works.extend((0..4).map(|i| work(&format!("lone{i}"), &[], &[], slow.clone())));
    let b = store.enqueue_batch("tester", 2, works).await.unwrap();
    e.wake();
    let mut ws = vec![];
    for n in &b.nodes {
        assert_eq!(n.action, "ledger");
        ws.push((n.node.clone(), wait_done(&store, &n.operation_id, 20).await));
    }
    let get = |n: &str| &ws.iter().find(|(x, _)| x == n).unwrap().1;
    for n in ["a", "b", "e", "lone0", "lone3"] {
        assert_eq!(get(n).status, WorkflowStatus::Succeeded, "{n}");
    }
    assert_eq!(get("c").status, WorkflowStatus::Failed);
    assert_eq!(get("d").status, WorkflowStatus::Cancelled);
    assert!(
        get("d")
            .error
            .as_deref()
            .unwrap()
            .starts_with("skipped: requires")
    );
    assert!(
        get("d").steps.iter().all(|s| s.attempts == 0),
        "d never ran"
    );
    let span = |w: &basphere_store::Workflow| {
        let start = w.steps.iter().filter_map(|s| s.started_at).min().unwrap();
        let end = w.steps.iter().filter_map(|s| s.finished_at).max().unwrap();
        (start, end)
    };
    assert!(span(get("a")).1 <= span(get("b")).0, "b after a");
    assert!(
        span(get("c")).1 <= span(get("e")).0,
        "the soft edge orders e after c"
    );
    // No more than 2 nodes ever ran at once.
    let spans: Vec<(i64, i64)> = ws
        .iter()
        .filter(|(_, w)| w.steps.iter().any(|s| s.started_at.is_some()))
        .map(|(_, w)| span(w))
        .collect();
    for (s, _) in &spans {
        let at_once = spans.iter().filter(|(a, b)| a <= s && s < b).count();
        assert!(at_once <= 2, "{at_once} nodes in flight at {s}: {spans:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_parallelism_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let u = user(&store, "carol", 40).await;
    let provider = Arc::new(NullProvider::new(Duration::from_millis(30)));
    let mut cfg = engine_cfg("n1");
    cfg.max_parallel = 16;
    let e = engine(&store, provider.clone(), cfg);
    let _stop = start(&e);
    let nodes: Vec<BatchVm> = (0..24).map(|i| node(&format!("n{i}"), &[], &[])).collect();
    let b = store
        .admit_batch(&batch(&u, 3, nodes), &pool(), &admin())
        .await
        .unwrap();
    e.wake();
    let t0 = Instant::now();
    let mut peak = 0;
    loop {
        let ws = store.batch_workflows(&b.batch_id).await.unwrap();
        let running = ws
            .iter()
            .filter(|w| w.steps.iter().any(|s| s.status == StepStatus::Running))
            .count();
        peak = peak.max(running);
        if ws.iter().all(|w| w.status.is_terminal()) {
            assert!(ws.iter().all(|w| w.status == WorkflowStatus::Succeeded));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "stalled: {ws:?}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(peak <= 3, "at most 3 nodes in flight, saw {peak}");
    assert!(peak >= 2, "nodes did run in parallel ({peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_claim_before_creates() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let mut w1 = ledger_workflow(1, json!({}));
    w1.priority = 0;
    let mut w2 = ledger_workflow(1, json!({}));
    w2.priority = 10;
    let a = store.enqueue_workflow(&w1).await.unwrap();
    let b = store.enqueue_workflow(&w2).await.unwrap();
    let got = store
        .claim_workflow("n", 1000, &Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, b, "higher priority first although queued later");
    let got = store
        .claim_workflow("n", 1000, &Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id, a);
    assert!(
        store
            .claim_workflow("m", 1000, &Default::default())
            .await
            .unwrap()
            .is_none(),
        "leased workflows are not claimed twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limit_holds_across_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let mut cfg = engine_cfg("n1");
    cfg.max_parallel = 16;
    cfg.limits.per_user = Some(2);
    let e = engine(&store, null(), cfg);
    e.register("ledger", Ledger::new("n1", None));
    let mut ids = vec![];
    for _ in 0..8 {
        ids.push(
            store
                .enqueue_workflow(&ledger_workflow(2, json!({"sleep_ms": [30, 30]})))
                .await
                .unwrap(),
        );
    }
    let _stop = start(&e);
    let t0 = Instant::now();
    let mut peak = 0;
    loop {
        let ws = store.workflows(None, 100).await.unwrap();
        let running = ws
            .iter()
            .filter(|w| w.steps.iter().any(|s| s.status == StepStatus::Running))
            .count();
        peak = peak.max(running);
        if ws.iter().all(|w| w.status.is_terminal()) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert!(
        peak <= 2,
        "at most 2 of one user's workflows at once, saw {peak}"
    );
    assert_eq!(peak, 2);
}

/// `cargo test -p basphere-engine --test workflows throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let ws: Vec<_> = (0..100)
        .map(|_| {
            let mut w = ledger_workflow(50, json!({}));
            w.definition = "noop".into();
            w
        })
        .collect();
    store.enqueue_workflows(&ws, &[]).await.unwrap();
    let mut cfg = engine_cfg("n1");
    cfg.max_parallel = 32;
    let e = engine(&store, null(), cfg);
    e.register("noop", Arc::new(basphere_engine::NoopWorkflow));
    let t0 = Instant::now();
    let _stop = start(&e);
    loop {
        let ws = store.workflows(None, 200).await.unwrap();
        if ws.iter().all(|w| w.status.is_terminal()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{:.0} steps/s", 5000.0 / t0.elapsed().as_secs_f64());
}

/// `cargo test -p basphere-engine --test workflows batch_speed -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn batch_speed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let u = user(&store, "speedy", 1000).await;
    let e = engine(&store, null(), engine_cfg("n1"));
    let nodes: Vec<BatchVm> = (0..1000)
        .map(|i| node(&format!("n{i}"), &[], &[]))
        .collect();
    let mut rx = e.subscribe();
    let _stop = start(&e);
    let t0 = Instant::now();
    let b = store
        .admit_batch(
            &batch(
                &u,
                std::env::var("PAR")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(10),
                nodes,
            ),
            &pool(),
            &admin(),
        )
        .await
        .unwrap();
    let t1 = t0.elapsed();
    e.wake();
    let mut left = b.nodes.len();
    let mut first_claim = None;
    while left > 0 {
        let ev = rx.recv().await.unwrap();
        if first_claim.is_none() && ev.kind == "step_started" {
            first_claim = Some(t0.elapsed());
        }
        if ev.kind == "succeeded" {
            left -= 1;
        }
    }
    eprintln!(
        "admit {t1:?}, first step {first_claim:?}, all {:?}",
        t0.elapsed()
    );
}
