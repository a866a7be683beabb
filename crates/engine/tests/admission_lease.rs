//! Work leased at admission: the admitting transaction leases new workflows to this node's
//! free engine slots, and the engine runs them without claiming them.
mod common;
use basphere_core::VmStatus;
use basphere_provider::NullProvider;
use basphere_store::{Actor, AdmitExtras, ClaimLimits, NewWorkflow, WorkflowStatus};
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// Reserves up to `n` slots once the engine runs.
async fn reserve(e: &basphere_engine::Engine, n: usize) -> basphere_engine::Reservation {
    for _ in 0..500 {
        if let Some(r) = e.reserve(n) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine never offered a slot");
}

/// `u`'s batch of `n` independent nodes `{prefix}0…` at parallelism `par`, admitted with slots
/// of `e`'s and adopted by it: `par` nodes leased with their slots, and (no node waiting on
/// another) the rest held ahead.
async fn admit_held(
    e: &basphere_engine::Engine,
    store: &basphere_store::Store,
    u: &basphere_core::Username,
    prefix: &str,
    n: usize,
    par: u32,
) -> basphere_store::BatchAdmitted {
    let nodes: Vec<_> = (0..n)
        .map(|i| node(&format!("{prefix}{i}"), &[], &[]))
        .collect();
    let slots = reserve(e, 8).await;
    let b = store
        .admit_batch_leased(
            &batch(u, par, nodes),
            &pool(),
            &Actor::new("test", "test"),
            Some(slots.lease()),
        )
        .await
        .unwrap();
    assert_eq!(
        (b.leased.len(), b.held.len()),
        (par as usize, n - par as usize),
        "only the batch's slots are leased, the rest held"
    );
    e.adopt(
        slots,
        basphere_engine::Adopt {
            claimed: b.leased.clone(),
            ahead: b.held.clone(),
        },
    );
    b
}

/// How many nodes of `batch` have succeeded.
async fn succeeded(store: &basphere_store::Store, batch: &str) -> usize {
    let wfs = store.batch_workflows(batch).await.unwrap();
    wfs.iter()
        .filter(|w| w.status == WorkflowStatus::Succeeded)
        .count()
}

/// The most runs at once of `marks` (when one starts, +1, or ends, −1); at one instant a start
/// counts before an end with `starts_first`.
fn most_at_once(mut marks: Vec<(std::time::Instant, i32)>, starts_first: bool) -> i32 {
    marks.sort_by_key(|m| (m.0, if starts_first { -m.1 } else { m.1 }));
    let (mut running, mut most) = (0i32, 0i32);
    for (_, d) in marks {
        running += d;
        most = most.max(running);
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_at_admission_the_engine_runs_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let p = null();
    let e = engine(&store, p.clone(), engine_cfg("n1"));
    assert!(
        e.reserve(1).is_none(),
        "an engine not running takes no work"
    );
    let stop = start(&e);
    // Slots: as many as free, at most as asked for; given back when dropped.
    let all = reserve(&e, 100).await;
    assert_eq!(all.lease().max, 8);
    assert!(e.reserve(1).is_none(), "every slot is held");
    drop(all);
    let u = user(&store, "alice", 3).await;
    let slots = reserve(&e, 2).await;
    let lease = slots.lease();
    assert_eq!((lease.node.as_str(), lease.max), ("n1", 2));
    let (admitted, claimed) = store
        .admit_vms_leased(
            &create_req(&u, &["a", "b", "c"]),
            &AdmitExtras::default(),
            &pool(),
            &Actor::new("test", "test"),
            Some(lease),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    e.adopt(slots, claimed);
    e.wake();
    // All three end (the third claimed as usual), each step run once.
    for a in &admitted {
        let w = wait_done(&store, &a.operation_id, 20).await;
        assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
        let vm = store.vm_by_id(&a.vm.id).await.unwrap().unwrap();
        assert_eq!(vm.status, VmStatus::Running);
        let starts: Vec<String> = store
            .events(&a.operation_id, 0)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "step_started")
            .filter_map(|e| e.step)
            .collect();
        assert_eq!(starts, ["prepare", "start", "wait_ready"]);
        let phases: Vec<&str> = p
            .calls()
            .into_iter()
            .filter(|c| c.instance == a.vm.id)
            .map(|c| c.phase)
            .collect();
        assert_eq!(phases.iter().filter(|ph| **ph == "start").count(), 1);
    }
    // A delete leased at its admission runs likewise, once.
    let slots = reserve(&e, 1).await;
    let (del, claimed) = store
        .begin_delete_vm_leased(
            "alice",
            "a",
            &vm_steps(basphere_core::VmOperation::Delete),
            &Actor::new("test", "test"),
            Some(slots.lease()),
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    e.adopt(slots, claimed);
    let w = wait_done(&store, &del.operation_id, 20).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    assert!(store.vm_by_id(&admitted[0].vm.id).await.unwrap().is_none());
    let removes = p
        .calls()
        .into_iter()
        .filter(|c| c.instance == admitted[0].vm.id && c.phase == "remove")
        .count();
    assert_eq!(removes, 1, "{:?}", p.calls());
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leased_at_admission_runs_each_node_once_within_its_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let p = Arc::new(NullProvider::new(Duration::from_millis(30)));
    let e = engine(&store, p.clone(), engine_cfg("n1"));
    let stop = start(&e);
    let u = user(&store, "alice", 10).await;
    // Only the batch's two slots are leased; no node waits on another, so the other three are
    // held ahead for the two to pass their slots to.
    let b = admit_held(&e, &store, &u, "a", 5, 2).await;
    e.wake();
    for n in &b.nodes {
        let w = wait_done(&store, &n.operation_id, 30).await;
        assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    }
    // Each node's VM started once, and never more than two at once.
    let calls = p.calls();
    let vms: Vec<String> = store
        .vms(Some("alice"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(vms.len(), 5);
    for vm in &vms {
        let starts = calls
            .iter()
            .filter(|c| &c.instance == vm && c.phase == "start")
            .count();
        assert_eq!(starts, 1, "{vm}: {calls:?}");
    }
    let mut marks: Vec<(std::time::Instant, i32)> = vec![];
    for c in &calls {
        match c.phase {
            "prepare" => marks.push((c.at, 1)),
            "wait_ready" => marks.push((c.at + Duration::from_millis(30), -1)),
            _ => {}
        }
    }
    let most = most_at_once(marks, false);
    assert_eq!(
        most, 2,
        "nodes at once, at parallelism 2 with both slots leased"
    );
    let _ = stop.send(true);
}

/// Quick nodes held ahead: each finishing node passes its slot in memory to the next held
/// one and runs it while its completion commits. Every node runs once, all succeed, and
/// never more than the parallelism at once, in memory as in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_nodes_held_ahead_run_once_each_within_the_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let p = Arc::new(NullProvider::new(Duration::ZERO));
    let e = engine(&store, p.clone(), engine_cfg("n1"));
    let stop = start(&e);
    let u = user(&store, "alice", 40).await;
    let b = admit_held(&e, &store, &u, "q", 40, 3).await;
    for n in &b.nodes {
        let w = wait_done(&store, &n.operation_id, 30).await;
        assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
    }
    let calls = p.calls();
    let vms = store.vms(Some("alice")).await.unwrap();
    assert_eq!(vms.len(), 40);
    assert!(vms.iter().all(|v| v.status == VmStatus::Running));
    let mut marks: Vec<(std::time::Instant, i32)> = vec![];
    for vm in &vms {
        let mine: Vec<_> = calls.iter().filter(|c| c.instance == vm.id).collect();
        let at = |phase: &str| {
            let hits: Vec<_> = mine.iter().filter(|c| c.phase == phase).collect();
            assert_eq!(hits.len(), 1, "{}: {phase} {mine:?}", vm.name);
            hits[0].at
        };
        marks.push((at("prepare"), 1));
        marks.push((at("wait_ready"), -1));
    }
    let most = most_at_once(marks, true);
    assert!(most <= 3, "{most} nodes at once at parallelism 3");
    let _ = stop.send(true);
}

/// The engine holding a batch's nodes ahead dies mid-batch (its runtime dropped: its tasks
/// stop where they are, its leases stay): another engine finishes every node once its leases
/// run out — the running ones claimed, those held given slots as the ending ones free them —
/// and the parallelism holds throughout. No node recorded done at the death runs again; those
/// in flight may (per slot the one running and at most `IN_FLIGHT` whose completions were
/// committing), none more than twice.
#[test]
fn an_engine_dying_with_nodes_held_ahead_leaves_them_to_another() {
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, pg) = main.block_on(open(dir.path()));
    let p = Arc::new(NullProvider::new(Duration::from_millis(2)));
    let u = main.block_on(user(&store, "alice", 120));
    let lease = Duration::from_secs(1);
    // The first engine on a runtime of its own, holding the batch. On PostgreSQL it has a store
    // of its own, as a replica would: a connection opened on that runtime dies with it.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let b = doomed.block_on(async {
        let store = match &pg {
            Some(pg) => basphere_store::Store::open_postgres(&pg.url_of("engine"))
                .await
                .unwrap(),
            None => store.clone(),
        };
        let e = engine(
            &store,
            p.clone(),
            basphere_engine::EngineConfig {
                lease,
                ..engine_cfg("n1")
            },
        );
        std::mem::forget(start(&e));
        admit_held(&e, &store, &u, "d", 120, 3).await
    });
    // Some done, most not: it dies.
    main.block_on(async {
        let t0 = std::time::Instant::now();
        loop {
            let done = succeeded(&store, &b.batch_id).await;
            if done >= 10 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{done} done");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    doomed.shutdown_background();
    let died = std::time::Instant::now();
    let durable: std::collections::HashSet<String> = main
        .block_on(store.batch_workflows(&b.batch_id))
        .unwrap()
        .into_iter()
        .filter(|w| w.status == WorkflowStatus::Succeeded)
        .filter_map(|w| w.resource.map(|r| r.id))
        .collect();
    assert!(
        durable.len() < 120,
        "the batch ended before the engine died"
    );
    main.block_on(async {
        let e2 = engine(
            &store,
            p.clone(),
            basphere_engine::EngineConfig {
                lease,
                ..engine_cfg("n2")
            },
        );
        let stop = start(&e2);
        for n in &b.nodes {
            let w = wait_done(&store, &n.operation_id, 60).await;
            assert_eq!(w.status, WorkflowStatus::Succeeded, "{w:?}");
        }
        let _ = stop.send(true);
    });
    // Each node's runs: from a `prepare` to its `wait_ready` (one cut short ends at the death).
    let calls = p.calls();
    let vms = main.block_on(store.vms(Some("alice"))).unwrap();
    assert_eq!(vms.len(), 120);
    let mut marks: Vec<(std::time::Instant, i32)> = vec![];
    let mut again = 0;
    for vm in &vms {
        let mine: Vec<_> = calls.iter().filter(|c| c.instance == vm.id).collect();
        let runs = mine.iter().filter(|c| c.phase == "prepare").count();
        let most = if durable.contains(&vm.id) { 1 } else { 2 };
        if !(1..=most).contains(&runs) {
            let wfs = main.block_on(store.batch_workflows(&b.batch_id)).unwrap();
            let w = wfs
                .iter()
                .find(|w| w.resource.as_ref().is_some_and(|r| r.id == vm.id))
                .unwrap();
            let evs = main.block_on(store.events(&w.id, 0)).unwrap();
            panic!(
                "{} (done at the death: {}): {mine:?} {w:?} {evs:?}",
                vm.name,
                most == 1
            );
        }
        again += runs - 1;
        let mut open = None;
        for c in &mine {
            match c.phase {
                "prepare" => {
                    if open.replace(c.at).is_some() {
                        marks.push((died, -1));
                    }
                    marks.push((c.at, 1));
                }
                "wait_ready" if open.take().is_some() => marks.push((c.at, -1)),
                _ => {}
            }
        }
    }
    let bound = 3 * (basphere_engine::IN_FLIGHT + 1);
    assert!(again <= bound, "{again} nodes ran twice; at most {bound}");
    let most = most_at_once(marks, true);
    assert!(most <= 3, "{most} nodes at once at parallelism 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_concurrency_limits_nothing_is_leased_at_admission() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let mut cfg = engine_cfg("n1");
    cfg.limits = ClaimLimits {
        per_user: Some(1),
        ..ClaimLimits::default()
    };
    let e = engine(&store, null(), cfg);
    let _stop = start(&e);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The limits are counted at claims, across replicas: every workflow goes through one.
    assert!(e.reserve(1).is_none());
}

/// A restarted engine takes work at admission only once the leases it held before are released:
/// released after, the fresh leases of an admission would go with them, and its workflows would
/// run twice (adopted, and claimed again). PostgreSQL only: another session's row lock holds the
/// release back (the SQLite run has no second writer to do it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_engine_takes_no_work_until_its_old_leases_are_released() {
    if !basphere_testkit::server::test_backend_is_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (store, pg) = open(dir.path()).await;
    let pg = pg.expect("a PostgreSQL of this test's own");
    // A workflow this node leased before its restart (of a definition no engine here runs).
    let ids = store
        .enqueue_workflows(
            &[NewWorkflow::new("ghost", "tester", vec!["s".into()])],
            &[],
        )
        .await
        .unwrap();
    let ghost = vec!["ghost".to_string()];
    let none = ClaimLimits::default();
    let held = store
        .claim_many("n1", 60_000, &none, 1, &ghost)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let other = basphere_testkit::postgres::connect(&pg.url_of("engine"))
        .await
        .unwrap();
    other
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM workflows WHERE id = '{}' FOR UPDATE",
            ids[0]
        ))
        .await
        .unwrap();
    let e = engine(&store, null(), engine_cfg("n1"));
    let stop = start(&e);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        e.reserve(1).is_none(),
        "the engine offered slots before its old leases were released"
    );
    other.batch_execute("COMMIT").await.unwrap();
    drop(reserve(&e, 1).await);
    let taken = store
        .claim_many("n2", 60_000, &none, 1, &ghost)
        .await
        .unwrap();
    assert_eq!(taken.len(), 1, "the old lease is released");
    let _ = stop.send(true);
}
