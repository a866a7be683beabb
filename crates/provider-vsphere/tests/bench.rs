//! Benchmark: 100 VM creates and deletes through the provider against one vcsim.
//!
//!   cargo test -p basphere-vsphere --test bench -- --ignored --nocapture
//!
//! Prints wall time, creates/s, SOAP round trips per VM and Basphere's own overhead per VM (wall
//! time outside SOAP round trips, measured on the sequential pass where the two do not overlap).

mod common;

use basphere_provider::Machines;
use basphere_vsphere::VsphereProvider;
use common::{Vcsim, request};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VMS: usize = 100;
const PARALLEL: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_100_creates_and_deletes() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    let mut sim = Vcsim::start(&[]);
    sim.make_template("user", "pass").await;
    let p = Arc::new(
        VsphereProvider::connect(sim.config(sim.credentials_file("user", "pass", 0o600)))
            .await
            .unwrap(),
    );

    let bench_start = Instant::now();
    // Sequential: SOAP time and wall time do not overlap, so the difference is our overhead.
    let vms: Vec<_> = (0..VMS)
        .map(|i| request(&format!("seq{i}"), i as u8))
        .collect();
    let s0 = p.soap_stats();
    let t0 = Instant::now();
    for vm in &vms {
        p.prepare(vm).await.unwrap();
        p.start(vm).await.unwrap();
        p.wait_ready(vm, Duration::from_secs(10)).await.unwrap();
    }
    let create = t0.elapsed();
    let s1 = p.soap_stats();
    let t1 = Instant::now();
    for vm in &vms {
        p.remove(vm).await.unwrap();
    }
    let delete = t1.elapsed();
    let s2 = p.soap_stats();
    let per = |d: Duration| d / VMS as u32;
    println!("sequential, {VMS} VMs against one vcsim:");
    println!(
        "  creates: {create:?} total, {:.1} creates/s, {} SOAP calls/VM, {:?} SOAP time/VM, overhead {:?}/VM",
        VMS as f64 / create.as_secs_f64(),
        (s1.calls - s0.calls) / VMS as u64,
        per(s1.time - s0.time),
        per(create.saturating_sub(s1.time - s0.time)),
    );
    println!(
        "  deletes: {delete:?} total, {:.1} deletes/s, {} SOAP calls/VM, overhead {:?}/VM",
        VMS as f64 / delete.as_secs_f64(),
        (s2.calls - s1.calls) / VMS as u64,
        per(delete.saturating_sub(s2.time - s1.time)),
    );

    // Concurrent: PARALLEL creates in flight (clones of the one template serialized).
    let vms: Vec<_> = (0..VMS)
        .map(|i| request(&format!("par{i}"), i as u8))
        .collect();
    let t0 = Instant::now();
    run_all(&p, &vms, true).await;
    let create = t0.elapsed();
    let t1 = Instant::now();
    run_all(&p, &vms, false).await;
    let delete = t1.elapsed();
    println!("concurrent ({PARALLEL} in flight), {VMS} VMs:");
    println!(
        "  creates: {create:?} total, {:.1} creates/s; deletes: {delete:?} total, {:.1} deletes/s",
        VMS as f64 / create.as_secs_f64(),
        VMS as f64 / delete.as_secs_f64()
    );
    println!("total wall time, both passes: {:?}", bench_start.elapsed());
    let left = p.list_machines().await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(sim.alive(), "vcsim died:\n{}", sim.log());
}

async fn run_all(p: &Arc<VsphereProvider>, vms: &[basphere_provider::VmRequest], create: bool) {
    let queue = Arc::new(std::sync::Mutex::new(vms.to_vec()));
    let mut workers = Vec::new();
    for _ in 0..PARALLEL {
        let (p, queue) = (p.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(vm) = queue.lock().unwrap().pop() else {
                    return;
                };
                if create {
                    p.prepare(&vm).await.unwrap();
                    p.start(&vm).await.unwrap();
                    p.wait_ready(&vm, Duration::from_secs(30)).await.unwrap();
                } else {
                    p.remove(&vm).await.unwrap();
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}
