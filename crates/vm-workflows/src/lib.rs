//! The VM workflows (create: prepare → start → wait_ready; delete: stop → remove) as
//! definitions of the engine's general step model, registered by the composition root. The
//! provider's idempotency key is the VM's instance id (every phase finds its earlier work by
//! it); the step's own key is recorded beside it. What their endings do to the VM record is
//! the store's VM hooks ([`Hooks::vm`]), which these definitions register.

use basphere_core::{NetworkPool, ResourceRef, SshPublicKey, VmOperation};
use basphere_engine::{
    Engine, EngineConfig, RetryPolicy, StepCtx, StepError, StepSpec, WorkflowDef,
};
use basphere_provider::{
    DiskRequest, GuestNetwork, NicAddress, NicRequest, Provider, VmRequest, mac_for,
};
use basphere_store::{Hooks, NewStep, StepCommit, Store, StoreError, Workflow};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What the VM workflows need to turn a VM record into a provider request.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub pool: NetworkPool,
    /// OS image name → the provider's reference for it.
    pub image_refs: BTreeMap<String, String>,
    /// The extra networks (`[networks.NAME]`) by name.
    pub networks: BTreeMap<String, CatalogNetwork>,
}

/// What a provider needs to know of an extra network.
#[derive(Debug, Clone, Default)]
pub struct CatalogNetwork {
    pub prefix_len: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub bridge: Option<String>,
    pub port_group: Option<String>,
}

/// Registers the VM create and delete definitions (and their hooks) with `engine`, driving
/// `provider`; step deadlines and retries come from `tuning`.
pub fn register(
    engine: &Engine,
    provider: Arc<dyn Provider>,
    catalog: Catalog,
    tuning: &EngineConfig,
) {
    let vm: Arc<dyn WorkflowDef> = Arc::new(VmWorkflow {
        store: engine.store().clone(),
        provider,
        catalog,
        retry: tuning.default_retry(),
        ready_deadline: tuning.ready_deadline,
        step_deadline: tuning.step_deadline,
        cache: Default::default(),
    });
    for op in VmOperation::ALL {
        engine.register(op.as_str(), vm.clone());
    }
}

/// Steps of a VM create, in order.
pub const CREATE_STEPS: &[&str] = &["prepare", "start", "wait_ready"];
/// Steps of a VM delete, in order.
pub const DELETE_STEPS: &[&str] = &["stop", "remove"];

/// Step names as owned strings, for the store.
pub fn step_names(op: VmOperation) -> &'static [&'static str] {
    match op {
        VmOperation::Create => CREATE_STEPS,
        VmOperation::Delete => DELETE_STEPS,
    }
}

/// The steps of `op` to queue, with the deadlines `engine`'s registered VM definitions give.
pub fn steps(engine: &Engine, op: VmOperation) -> Vec<NewStep> {
    engine.steps(op.as_str(), step_names(op))
}

/// Create or delete of one VM through a provider.
struct VmWorkflow {
    store: Store,
    provider: Arc<dyn Provider>,
    catalog: Catalog,
    retry: RetryPolicy,
    ready_deadline: Duration,
    step_deadline: Duration,
    /// Requests built during one claim of a workflow, keyed by (workflow, its `updated_at` at
    /// the claim): the steps of one drive share one read of the VM and its owner.
    cache: std::sync::Mutex<std::collections::HashMap<(String, i64), VmRequest>>,
}

impl VmWorkflow {
    async fn request_for(&self, wf: &Workflow) -> Result<Option<VmRequest>, StoreError> {
        let Some(vm_id) = wf.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)) else {
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
            extra_disks: disks(&vm),
            extra_nics: self.nics(&vm),
        }))
    }

    /// The VM's interfaces on catalog networks; a network no longer in the catalog keeps its
    /// leased address but gets no bridge or port group (the provider then refuses it).
    fn nics(&self, vm: &basphere_store::Vm) -> Vec<NicRequest> {
        vm.extra_nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let def = self
                    .catalog
                    .networks
                    .get(&n.network)
                    .cloned()
                    .unwrap_or_default();
                NicRequest {
                    network: n.network.clone(),
                    mac: mac_for(&format!("{}#nic{}", vm.id, i + 1)),
                    address: n.ip.map(|ip| NicAddress {
                        ip,
                        prefix_len: def.prefix_len,
                    }),
                    gateway: def.gateway,
                    bridge: def.bridge,
                    port_group: def.port_group,
                }
            })
            .collect()
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
    fn hooks(&self, definition: &str) -> Option<Hooks> {
        definition.parse().ok().map(Hooks::vm)
    }

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
        let op = operation(ctx.workflow)?;
        let req = self.request(ctx).await?;
        let p = &self.provider;
        match (op, ctx.name) {
            (VmOperation::Create, "prepare") => p.prepare(&req).await?,
            (VmOperation::Create, "start") => p.start(&req).await?,
            (VmOperation::Create, "wait_ready") => p.wait_ready(&req, self.ready_deadline).await?,
            (VmOperation::Delete, "stop") => p.stop(&req).await?,
            (VmOperation::Delete, "remove") => p.remove(&req).await?,
            (k, s) => return Err(StepError::permanent(format!("unknown step {s} of {k}"))),
        }
        Ok(StepCommit::default())
    }

    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError> {
        if operation(ctx.workflow)? != VmOperation::Create {
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

/// The VM's extra disks with their stable serials and mount points (`/data`, `/data2`, … in
/// the order of the `auto` disks).
fn disks(vm: &basphere_store::Vm) -> Vec<DiskRequest> {
    let mut autos = 0;
    vm.extra_disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskRequest {
            serial: basphere_core::disk_serial(&vm.id, i),
            size_gib: d.size_gib,
            mode: d.mode,
            mount: (d.mode == basphere_core::DiskMode::Auto).then(|| {
                autos += 1;
                basphere_core::mount_point(autos - 1)
            }),
        })
        .collect()
}

/// Which VM operation a workflow of these definitions is.
fn operation(wf: &Workflow) -> Result<VmOperation, StepError> {
    wf.definition
        .parse()
        .map_err(|e| StepError::permanent(format!("not a VM workflow: {e}")))
}
