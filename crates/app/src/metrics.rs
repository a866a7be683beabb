//! Prometheus metrics: the process-wide recorder behind the `metrics` facade, and `GET
//! /metrics` (text format 0.0.4) on the `[metrics] listen` address, a listener of its own.
//!
//! Any crate records with the facade — `metrics::counter!("basphere_…_total", "label" =>
//! value).increment(1)`, `metrics::histogram!("basphere_…_seconds", …).record(secs)`,
//! `metrics::gauge!(…).set(v)` — and it costs nothing while metrics are off (no recorder).
//! Conventions: every name starts with `basphere_`; counters end in `_total`; durations are
//! histograms in seconds ending in `_seconds` (buckets [`BUCKETS`]); labels are bounded sets
//! (route templates, states, definitions, outcomes), never user names, ids or raw paths.
//!
//! The gauges of the state (workflows by definition and status and the ready queue, VMs and
//! their resources by state, addresses, users, quota) are read from the store at each scrape,
//! aggregated over all users. The engine records step durations, retries and lease takeovers;
//! the store its group commits' latency and size.

use basphere_config::Config;
use basphere_core::{UserStatus, VmStatus, WorkflowStatus};
use basphere_store::Store;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::OnceLock;

/// Histogram buckets (seconds) of every `*_seconds` metric: 1 ms to 5 min.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Buckets of `basphere_store_group_commit_size` (completions per group commit).
const GROUP_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (one per process: servers built in one test
/// process share it).
pub fn recorder() -> anyhow::Result<&'static PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h);
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("basphere_store_group_commit_size".into()),
            GROUP_SIZES,
        )?
        .install_recorder()
        .or_else(|e| {
            // Another thread installed it meanwhile.
            HANDLE
                .get()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("installing the metrics recorder: {e}"))
        })?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// `basphere_build_info{version,backend,provider} 1`.
pub fn build_info(backend: &'static str, provider: &'static str) {
    metrics::gauge!(
        "basphere_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "backend" => backend,
        "provider" => provider,
    )
    .set(1.0);
    // Present from the first scrape, so alert rules over it are never about a missing series.
    metrics::counter!("basphere_metrics_state_errors_total").increment(0);
}

/// The `/metrics` router: the state's gauges refreshed from `store`, then every metric.
pub fn router(store: Store, cfg: std::sync::Arc<Config>) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let store = store.clone();
            let cfg = cfg.clone();
            async move {
                if let Err(e) = state_gauges(&store, &cfg).await {
                    tracing::warn!(error = %e, "metrics: reading the state's gauges failed");
                    metrics::counter!("basphere_metrics_state_errors_total").increment(1);
                }
                let body = HANDLE.get().map(|h| h.render()).unwrap_or_default();
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    body,
                )
                    .into_response()
            }
        }),
    )
}

/// VMs, their vCPUs and memory by state; addresses and blocks; users by status; quota used (as
/// admission counts it: VMs not failed, or failed but still holding their address) and the
/// limits of active users, summed; active users at their VM or address limit.
async fn state_gauges(store: &Store, cfg: &Config) -> anyhow::Result<()> {
    let wf = store.workflow_counts().await?;
    {
        // Every status of every definition seen since start, so a drained status reads 0.
        static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        let mut seen = SEEN.lock().expect("metrics lock");
        let counts: HashMap<(&str, WorkflowStatus), u64> = wf
            .by_status
            .iter()
            .map(|(d, st, n)| ((d.as_str(), *st), *n))
            .collect();
        seen.extend(wf.by_status.iter().map(|(d, _, _)| d.clone()));
        for d in seen.iter() {
            for st in WorkflowStatus::ALL {
                let n = counts.get(&(d.as_str(), *st)).copied().unwrap_or(0);
                metrics::gauge!("basphere_workflows", "definition" => d.clone(), "status" => st.as_str())
                    .set(n as f64);
            }
        }
    }
    metrics::gauge!("basphere_workflows_ready").set(wf.ready as f64);
    let vms = store.vms(None).await?;
    let users = store.users(None).await?;
    let mut by_state: HashMap<VmStatus, (u64, u64, u64)> = HashMap::new();
    let mut used: HashMap<&str, (u64, u64)> = HashMap::new();
    let (mut used_vms, mut used_ips, mut used_vcpus, mut used_mem, mut used_disk) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for vm in &vms {
        let e = by_state.entry(vm.status).or_default();
        e.0 += 1;
        e.1 += u64::from(vm.vcpus);
        e.2 += vm.memory_mib;
        if vm.status != VmStatus::Failed || vm.ip_address.is_some() {
            used_vms += 1;
            used_vcpus += u64::from(vm.vcpus);
            used_mem += vm.memory_mib;
            used_disk += vm.disk_gib
                + vm.extra_disks
                    .iter()
                    .map(|d| u64::from(d.size_gib))
                    .sum::<u64>();
            let u = used.entry(vm.owner.as_str()).or_default();
            u.0 += 1;
            if vm.ip_address.is_some() {
                used_ips += 1;
                u.1 += 1;
            }
        }
    }
    for s in VmStatus::ALL {
        let (n, vcpus, mem) = by_state.get(s).copied().unwrap_or_default();
        metrics::gauge!("basphere_vms", "state" => s.as_str()).set(n as f64);
        metrics::gauge!("basphere_vm_vcpus", "state" => s.as_str()).set(vcpus as f64);
        metrics::gauge!("basphere_vm_memory_bytes", "state" => s.as_str())
            .set((mem * 1024 * 1024) as f64);
    }
    let ips_held = vms.iter().filter(|v| v.ip_address.is_some()).count();
    metrics::gauge!("basphere_ips", "state" => "in_use").set(ips_held as f64);
    let assigned = users.iter().filter(|u| u.ip_block.is_some()).count() as u64;
    let blocks = u64::from(cfg.network.block_count());
    metrics::gauge!("basphere_ip_blocks", "state" => "assigned").set(assigned as f64);
    metrics::gauge!("basphere_ip_blocks", "state" => "free")
        .set(blocks.saturating_sub(assigned) as f64);
    for s in UserStatus::ALL {
        let n = users.iter().filter(|u| u.status == *s).count();
        metrics::gauge!("basphere_users", "status" => s.as_str()).set(n as f64);
    }
    let active: Vec<_> = users
        .iter()
        .filter(|u| u.status == UserStatus::Active)
        .collect();
    let sum = |f: &dyn Fn(&basphere_core::Quota) -> Option<u64>| -> u64 {
        active.iter().filter_map(|u| f(&u.quota)).sum()
    };
    for (resource, used, limit) in [
        ("vms", used_vms, sum(&|q| Some(q.max_vms.into()))),
        ("ips", used_ips, sum(&|q| Some(q.max_ips.into()))),
        ("vcpus", used_vcpus, sum(&|q| q.max_vcpus.map(u64::from))),
        ("memory_mib", used_mem, sum(&|q| q.max_memory_mib)),
        ("disk_gib", used_disk, sum(&|q| q.max_disk_gib)),
    ] {
        metrics::gauge!("basphere_quota_used", "resource" => resource).set(used as f64);
        metrics::gauge!("basphere_quota_limit", "resource" => resource).set(limit as f64);
    }
    let at = |pick: &dyn Fn((u64, u64), &basphere_core::Quota) -> bool| {
        active
            .iter()
            .filter(|u| {
                let usage = used.get(u.username.as_str()).copied().unwrap_or_default();
                pick(usage, &u.quota)
            })
            .count() as f64
    };
    metrics::gauge!("basphere_users_at_quota", "resource" => "vms")
        .set(at(&|u, q| u.0 >= u64::from(q.max_vms)));
    metrics::gauge!("basphere_users_at_quota", "resource" => "ips")
        .set(at(&|u, q| u.1 >= u64::from(q.max_ips)));
    Ok(())
}

/// A provider whose every lifecycle call is timed and counted:
/// `basphere_provider_call_duration_seconds{provider,phase,outcome}` and
/// `basphere_provider_calls_total{provider,phase,outcome}`, outcome `ok`, `retryable` or
/// `permanent`.
pub struct Metered(pub std::sync::Arc<dyn basphere_provider::Provider>);

impl Metered {
    async fn timed<T>(
        &self,
        phase: &'static str,
        call: impl std::future::Future<Output = basphere_provider::Result<T>>,
    ) -> basphere_provider::Result<T> {
        let start = std::time::Instant::now();
        let r = call.await;
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) if e.retryable => "retryable",
            Err(_) => "permanent",
        };
        let provider = self.0.kind();
        metrics::histogram!(
            "basphere_provider_call_duration_seconds",
            "provider" => provider,
            "phase" => phase,
            "outcome" => outcome,
        )
        .record(start.elapsed().as_secs_f64());
        metrics::counter!(
            "basphere_provider_calls_total",
            "provider" => provider,
            "phase" => phase,
            "outcome" => outcome,
        )
        .increment(1);
        r
    }
}

impl basphere_provider::Provider for Metered {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn commands(&self) -> Option<&dyn basphere_provider::NodeCommands> {
        self.0.commands()
    }
    fn readiness(&self) -> basphere_provider::ReadinessFuture<'_> {
        self.0.readiness()
    }
}

#[async_trait::async_trait]
impl basphere_provider::Machines for Metered {
    async fn prepare(&self, vm: &basphere_provider::VmRequest) -> basphere_provider::Result<()> {
        self.timed("prepare", self.0.prepare(vm)).await
    }
    async fn start(&self, vm: &basphere_provider::VmRequest) -> basphere_provider::Result<()> {
        self.timed("start", self.0.start(vm)).await
    }
    async fn wait_ready(
        &self,
        vm: &basphere_provider::VmRequest,
        deadline: std::time::Duration,
    ) -> basphere_provider::Result<()> {
        self.timed("wait_ready", self.0.wait_ready(vm, deadline))
            .await
    }
    async fn stop(&self, vm: &basphere_provider::VmRequest) -> basphere_provider::Result<()> {
        self.timed("stop", self.0.stop(vm)).await
    }
    async fn remove(&self, vm: &basphere_provider::VmRequest) -> basphere_provider::Result<()> {
        self.timed("remove", self.0.remove(vm)).await
    }
    async fn inspect(
        &self,
        vm: &basphere_provider::VmRequest,
    ) -> basphere_provider::Result<basphere_provider::MachineState> {
        self.timed("inspect", self.0.inspect(vm)).await
    }
}
