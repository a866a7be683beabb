//! Crash exactness: a 20-step workflow whose steps record their effects in a ledger; the engine
//! process is SIGKILLed at random points 20 times and restarted → every step's effect appears
//! exactly once, and the workflow completes.
//!
//! The engine runs in a child process: this test binary re-executed with `--exact
//! engine_process --ignored`, which runs the engine on the database named by `BSP_DB`.
mod common;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The child: runs an engine with the ledger definition until every workflow has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash test as a child process"]
async fn engine_process() {
    engine_process_main().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_20_times_every_effect_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("basphere.db");
    let log = dir.path().join("steps.log");
    let store = open_sqlite(dir.path()).await;
    let id = store
        .enqueue_workflow(&ledger_workflow(20, json!({"sleep_ms": [100, 250]})))
        .await
        .unwrap();
    let mut kills = 0;
    for round in 0..20 {
        let mut child = spawn_engine(&db, "crashy", &log, 3000);
        let at = Duration::from_millis(60 + rand::random::<u64>() % 240);
        tokio::time::sleep(at).await;
        if child.try_wait().unwrap().is_none() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        let w = store.workflow(&id).await.unwrap().unwrap();
        eprintln!(
            "round {round}: killed after {at:?}, workflow at step {}",
            w.step
        );
    }
    // The last restart runs to the end.
    let mut child = spawn_engine(&db, "crashy", &log, 3000);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "engine never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(w.status.as_str(), "succeeded", "{w:?}");
    let effects = store.step_effects(&id).await.unwrap();
    let mut per_step: BTreeMap<u32, usize> = BTreeMap::new();
    for e in &effects {
        *per_step.entry(e.idx).or_default() += 1;
        assert_eq!(e.key, format!("{id}/{}/s{}", e.idx, e.idx));
    }
    assert_eq!(
        per_step.len(),
        20,
        "every step's effect is there: {per_step:?}"
    );
    assert!(
        per_step.values().all(|&n| n == 1),
        "every effect exactly once: {per_step:?}"
    );
    let idxs: Vec<u32> = effects.iter().map(|e| e.idx).collect();
    assert_eq!(idxs, (0..20).collect::<Vec<_>>(), "in step order");
    // The kills did land mid-step: some steps started more often than they finished.
    let lines = read_log(&log);
    let starts = lines.iter().filter(|l| l.0 == "start").count();
    eprintln!("{kills} kills, {starts} step starts for 20 steps");
    assert!(kills >= 15, "most rounds killed a running engine ({kills})");
    assert!(starts > 20, "some steps were interrupted and ran again");
}
