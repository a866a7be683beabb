//! The VM workflows (create: prepare → start → wait_ready; delete: stop → remove) as
//! definitions of the general step model. The provider's idempotency key is the VM's instance
//! id (every phase finds its earlier work by it); the step's own key is recorded beside it.

use crate::{Catalog, RetryPolicy, StepCtx, StepError, StepSpec, WorkflowDef};
use basphere_core::SshPublicKey;
use basphere_provider::{GuestNetwork, Provider, VmRequest, mac_for};
use basphere_store::{StepCommit, Store, StoreError, Workflow, WorkflowKind};
use std::sync::Arc;
use std::time::Duration;

/// Steps of a VM create, in order.
pub const CREATE_STEPS: &[&str] = &["prepare", "start", "wait_ready"];
/// Steps of a VM delete, in order.
pub const DELETE_STEPS: &[&str] = &["stop", "remove"];

/// Step names as owned strings, for the store.
pub fn step_names(kind: WorkflowKind) -> Vec<String> {
    let s: &[&str] = match kind {
        WorkflowKind::CreateVm => CREATE_STEPS,
        WorkflowKind::DeleteVm => DELETE_STEPS,
    };
    s.iter().map(|s| s.to_string()).collect()
}

/// Create or delete of one VM through a provider.
pub(crate) struct VmWorkflow {
    pub store: Store,
    pub provider: Arc<dyn Provider>,
    pub catalog: Catalog,
    pub retry: RetryPolicy,
    pub ready_deadline: Duration,
    pub step_deadline: Duration,
    /// Requests built during one claim of a workflow, keyed by (workflow, its `updated_at` at
    /// the claim): the steps of one drive share one read of the VM and its owner.
    pub cache: std::sync::Mutex<std::collections::HashMap<(String, i64), VmRequest>>,
}

impl VmWorkflow {
    async fn request_for(&self, wf: &Workflow) -> Result<Option<VmRequest>, StoreError> {
        let Some(vm_id) = &wf.vm_id else {
            return Ok(None);
        };
        let Some((vm, key)) = self.store.vm_and_key(vm_id).await? else {
            return Ok(None);
        };
        let keys: Vec<SshPublicKey> = key.and_then(|k| k.parse().ok()).into_iter().collect();
        let pool = &self.catalog.pool;
        // A rolled-back VM has no address any more; stop/remove do not need one.
        let ip = vm.ip_address.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        Ok(Some(VmRequest {
            instance: vm.id.clone(),
            name: vm.name.clone(),
            owner: vm.owner.clone(),
            image: vm
                .os
                .parse()
                .map_err(|e| StoreError::Corrupt("vms.os", format!("{e}")))?,
            image_ref: self
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
        }))
    }

    async fn request(&self, ctx: &StepCtx<'_>) -> Result<VmRequest, StepError> {
        let key = (ctx.workflow.id.clone(), ctx.workflow.updated_at);
        if let Some(r) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(r.clone());
        }
        match self.request_for(ctx.workflow).await {
            Ok(Some(r)) => {
                let mut c = self.cache.lock().expect("cache lock");
                if c.len() > 4096 {
                    c.clear();
                }
                c.insert(key, r.clone());
                Ok(r)
            }
            Ok(None) => Err(StepError::permanent("its VM record is gone")),
            Err(e) => Err(StepError::retryable(format!("reading the VM record: {e}"))),
        }
    }
}

#[async_trait::async_trait]
impl WorkflowDef for VmWorkflow {
    fn step(&self, name: &str) -> StepSpec {
        let deadline = if name == "wait_ready" {
            self.ready_deadline + Duration::from_secs(30)
        } else {
            self.step_deadline
        };
        StepSpec {
            deadline,
            retry: self.retry,
        }
    }

    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        let req = self.request(ctx).await?;
        let p = &self.provider;
        match (ctx.workflow.kind, ctx.name) {
            (WorkflowKind::CreateVm, "prepare") => p.prepare(&req).await?,
            (WorkflowKind::CreateVm, "start") => p.start(&req).await?,
            (WorkflowKind::CreateVm, "wait_ready") => {
                p.wait_ready(&req, self.ready_deadline).await?
            }
            (WorkflowKind::DeleteVm, "stop") => p.stop(&req).await?,
            (WorkflowKind::DeleteVm, "remove") => p.remove(&req).await?,
            (k, s) => return Err(StepError::permanent(format!("unknown step {s} of {k}"))),
        }
        Ok(StepCommit::default())
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        if ctx.workflow.kind != WorkflowKind::CreateVm {
            return Ok(());
        }
        let req = match self.request_for(ctx.workflow).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => return Err(StepError::retryable(format!("reading the VM record: {e}"))),
        };
        match ctx.name {
            "prepare" => self.provider.remove(&req).await?,
            "start" => self.provider.stop(&req).await?,
            _ => {}
        }
        Ok(())
    }
}
