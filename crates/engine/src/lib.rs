//! Durable workflows: the engine runs each persisted workflow step by step through a provider.
//!
//! A worker claims a runnable workflow with a lease (renewed by a heartbeat while it works),
//! runs its next step, and commits the step's outcome before starting the next one. Retryable
//! failures are retried with exponential backoff and jitter, by whichever node claims the
//! workflow next; a permanent failure (or exhausted attempts) undoes the done steps in reverse
//! order and ends the workflow failed, which releases the VM's address and quota in the same
//! transaction. A crashed node's workflows resume when its lease expires, or at once when the
//! same node restarts (it drops its own stale leases first).
//!
//! Architecture invariant: the engine never decides admission and never writes SQL; it moves
//! workflows through the store's lease-guarded transitions and calls the provider.

use basphere_core::{NetworkPool, SshPublicKey};
use basphere_provider::{GuestNetwork, Provider, ProviderError, VmRequest, mac_for};
use basphere_store::{
    Store, StoreError, Vm, Workflow, WorkflowEvent, WorkflowKind, WorkflowOutcome, WorkflowStatus,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{info, warn};

/// Steps of a VM create, in order.
pub const CREATE_STEPS: &[&str] = &["prepare", "start", "wait_ready"];
/// Steps of a VM delete, in order.
pub const DELETE_STEPS: &[&str] = &["stop", "remove"];

/// Step names as owned strings, for the store.
pub fn step_names(kind: WorkflowKind) -> Vec<String> {
    let s = match kind {
        WorkflowKind::CreateVm => CREATE_STEPS,
        WorkflowKind::DeleteVm => DELETE_STEPS,
    };
    s.iter().map(|s| s.to_string()).collect()
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Stable id of this server (per data dir); leases carry it.
    pub node_id: String,
    pub lease: Duration,
    /// Workflows run at once by this node.
    pub max_parallel: usize,
    /// Attempts per step before a retryable failure counts as permanent.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long `wait_ready` may take.
    pub ready_deadline: Duration,
    /// How long any other step may take before it counts as a (retryable) failure.
    pub step_deadline: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node_id: "local".into(),
            lease: Duration::from_secs(15),
            max_parallel: 16,
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ready_deadline: Duration::from_secs(300),
            step_deadline: Duration::from_secs(600),
        }
    }
}

/// What the engine needs to turn a VM record into a provider request.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub pool: NetworkPool,
    /// OS image name → the provider's reference for it.
    pub image_refs: BTreeMap<String, String>,
}

/// The running engine; clone handles freely.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    provider: Arc<dyn Provider>,
    catalog: Catalog,
    cfg: EngineConfig,
    wake: Notify,
    events: broadcast::Sender<WorkflowEvent>,
    slots: Arc<Semaphore>,
}

impl Engine {
    pub fn new(
        store: Store,
        provider: Arc<dyn Provider>,
        catalog: Catalog,
        cfg: EngineConfig,
    ) -> Self {
        let (events, _) = broadcast::channel(4096);
        let slots = Arc::new(Semaphore::new(cfg.max_parallel.max(1)));
        Self {
            inner: Arc::new(Inner {
                store,
                provider,
                catalog,
                cfg,
                wake: Notify::new(),
                events,
                slots,
            }),
        }
    }

    /// Every step transition, as it is committed.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkflowEvent> {
        self.inner.events.subscribe()
    }

    /// Tells the engine new work was queued (saves it a poll interval).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.inner.provider
    }

    /// Runs until `shutdown` turns true. Reclaims this node's stale leases first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let inner = &self.inner;
        match inner.store.release_leases(&inner.cfg.node_id).await {
            Ok(n) if n > 0 => info!(
                count = n,
                "resuming workflows this node held before a restart"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not release stale leases"),
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            let permit = tokio::select! {
                p = inner.slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.changed() => return,
            };
            match inner
                .store
                .claim_workflow(&inner.cfg.node_id, inner.cfg.lease.as_millis() as i64)
                .await
            {
                Ok(Some(wf)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.drive(wf).await;
                        drop(permit);
                        me.wake();
                    });
                }
                Ok(None) => {
                    drop(permit);
                    let idle = match inner.store.next_due_in().await {
                        Ok(Some(ms)) => Duration::from_millis(ms.clamp(5, 1000) as u64),
                        _ => Duration::from_secs(1),
                    };
                    tokio::select! {
                        _ = inner.wake.notified() => {}
                        _ = tokio::time::sleep(idle) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Err(e) => {
                    drop(permit);
                    warn!(error = %e, "claiming a workflow failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn emit(&self, ev: WorkflowEvent) {
        let _ = self.inner.events.send(ev);
    }

    /// Runs one claimed workflow as far as it goes now, renewing its lease meanwhile.
    async fn drive(&self, wf: Workflow) {
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let hb = {
            let store = self.inner.store.clone();
            let node = self.inner.cfg.node_id.clone();
            let lease = self.inner.cfg.lease;
            let id = wf.id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if let Err(e) = store
                        .renew_lease(&id, &node, lease.as_millis() as i64)
                        .await
                    {
                        if e.is_lease_lost() {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        warn!(workflow = %id, error = %e, "lease renewal failed");
                    }
                }
            })
        };
        let id = wf.id.clone();
        tokio::select! {
            r = self.advance(wf) => {
                if let Err(e) = r {
                    if e.is_lease_lost() {
                        warn!(workflow = %id, "lost the lease; another node continues");
                    } else {
                        warn!(workflow = %id, error = %e, "workflow stopped on a store error; it resumes when its lease expires");
                    }
                }
            }
            _ = lost_rx.wait_for(|l| *l) => {
                warn!(workflow = %id, "lease lost mid-step; abandoning it to the new holder");
            }
        }
        hb.abort();
    }

    async fn request_for(&self, wf: &Workflow) -> Result<Option<(Vm, VmRequest)>, StoreError> {
        let Some(vm_id) = &wf.vm_id else {
            return Ok(None);
        };
        let Some(vm) = self.inner.store.vm_by_id(vm_id).await? else {
            return Ok(None);
        };
        let user = self.inner.store.user(vm.owner.as_str()).await?;
        let keys: Vec<SshPublicKey> = user
            .and_then(|u| u.public_key.parse().ok())
            .into_iter()
            .collect();
        let pool = &self.inner.catalog.pool;
        // A rolled-back VM has no address any more; stop/remove do not need one.
        let ip = vm.ip_address.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let req = VmRequest {
            instance: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            image: vm
                .os
                .parse()
                .map_err(|e| StoreError::Corrupt("vms.os", format!("{e}")))?,
            image_ref: self
                .inner
                .catalog
                .image_refs
                .get(&vm.os)
                .cloned()
                .unwrap_or_else(|| vm.os.clone()),
            login_user: vm.login_user.clone(),
            spec: basphere_core::Spec {
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                disk_gib: vm.disk_gib,
            },
            network: GuestNetwork {
                ip,
                prefix_len: pool.cidr.prefix_len(),
                gateway: pool.gateway,
                dns: pool.dns.clone(),
                mtu: pool.mtu,
                mac: mac_for(&vm.id),
            },
            ssh_keys: keys,
        };
        Ok(Some((vm, req)))
    }

    async fn run_phase(
        &self,
        kind: WorkflowKind,
        step: &str,
        req: &VmRequest,
    ) -> Result<(), ProviderError> {
        let p = &self.inner.provider;
        let cfg = &self.inner.cfg;
        let deadline = if step == "wait_ready" {
            cfg.ready_deadline + Duration::from_secs(30)
        } else {
            cfg.step_deadline
        };
        let fut = async {
            match (kind, step) {
                (WorkflowKind::CreateVm, "prepare") => p.prepare(req).await,
                (WorkflowKind::CreateVm, "start") => p.start(req).await,
                (WorkflowKind::CreateVm, "wait_ready") => {
                    p.wait_ready(req, cfg.ready_deadline).await
                }
                (WorkflowKind::DeleteVm, "stop") => p.stop(req).await,
                (WorkflowKind::DeleteVm, "remove") => p.remove(req).await,
                (k, s) => Err(ProviderError::permanent(format!("unknown step {s} of {k}"))),
            }
        };
        match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::retryable(format!(
                "{step} did not finish within {}s",
                deadline.as_secs()
            ))),
        }
    }

    async fn undo_phase(&self, step: &str, req: &VmRequest) -> Result<(), ProviderError> {
        let p = &self.inner.provider;
        let fut = async {
            match step {
                "prepare" => p.remove(req).await,
                "start" => p.stop(req).await,
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(self.inner.cfg.step_deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::retryable(format!(
                "undo of {step} timed out"
            ))),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let cfg = &self.inner.cfg;
        let exp = cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(cfg.backoff_max);
        let jitter: f64 = 0.8 + rand::random::<f64>() * 0.4;
        exp.mul_f64(jitter)
    }

    async fn advance(&self, wf: Workflow) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let node = &self.inner.cfg.node_id;
        let Some((_vm, req)) = self.request_for(&wf).await? else {
            let ev = store
                .finish_workflow(
                    &wf.id,
                    node,
                    &WorkflowOutcome::Failed("its VM record is gone".into()),
                )
                .await?;
            self.emit(ev);
            return Ok(());
        };
        let mut status = wf.status;
        let mut step = wf.step;
        if status == WorkflowStatus::Running || status == WorkflowStatus::Pending {
            while (step as usize) < wf.steps.len() {
                let rec = &wf.steps[step as usize];
                let idx = rec.idx;
                let name = rec.name.clone();
                self.emit(store.step_started(&wf.id, idx, &name, node).await?);
                let attempts = rec.attempts + 1;
                match self.run_phase(wf.kind, &name, &req).await {
                    Ok(()) => {
                        self.emit(store.step_done(&wf.id, idx, &name, node).await?);
                        step += 1;
                    }
                    Err(e) if e.retryable && attempts < self.inner.cfg.max_attempts => {
                        let delay = self.backoff(attempts);
                        self.emit(
                            store
                                .step_retry(
                                    &wf.id,
                                    idx,
                                    &name,
                                    node,
                                    &e.message,
                                    delay.as_millis() as i64,
                                )
                                .await?,
                        );
                        self.wake();
                        return Ok(());
                    }
                    Err(e) => {
                        let msg = if e.retryable {
                            format!("{} (gave up after {attempts} attempts)", e.message)
                        } else {
                            e.message.clone()
                        };
                        self.emit(store.begin_undo(&wf.id, idx, &name, node, &msg).await?);
                        status = WorkflowStatus::Undoing;
                        step = i64::from(idx) - 1;
                        break;
                    }
                }
            }
            if status != WorkflowStatus::Undoing {
                self.emit(
                    store
                        .finish_workflow(&wf.id, node, &WorkflowOutcome::Succeeded)
                        .await?,
                );
                return Ok(());
            }
        }
        // Undoing: reload to know which steps are done.
        let wf = store.workflow(&wf.id).await?.ok_or_else(|| {
            StoreError::Corrupt("workflows", "workflow vanished while undoing".into())
        })?;
        let reason = wf.error.clone().unwrap_or_else(|| "failed".into());
        while step >= 0 {
            let rec = &wf.steps[step as usize];
            if rec.status == basphere_store::StepStatus::Done {
                let mut attempt = 0;
                loop {
                    match self.undo_phase(&rec.name, &req).await {
                        Ok(()) => break,
                        Err(e) if attempt + 1 < self.inner.cfg.max_attempts => {
                            attempt += 1;
                            warn!(workflow = %wf.id, step = %rec.name, error = %e, "undo failed; retrying");
                            tokio::time::sleep(self.backoff(attempt)).await;
                        }
                        Err(e) => {
                            let msg = format!(
                                "{reason}; and undoing {} failed too: {e} — clean up by hand, then delete the VM",
                                rec.name
                            );
                            self.emit(
                                store
                                    .finish_workflow(&wf.id, node, &WorkflowOutcome::Failed(msg))
                                    .await?,
                            );
                            return Ok(());
                        }
                    }
                }
                self.emit(store.step_undone(&wf.id, rec.idx, &rec.name, node).await?);
            }
            step -= 1;
        }
        self.emit(
            store
                .finish_workflow(&wf.id, node, &WorkflowOutcome::Failed(reason))
                .await?,
        );
        Ok(())
    }
}
