//! VM batches: the admission of a batch's VM creates and deletes (quota for every create at
//! once, addresses, VM rows, audit) in the transaction that queues the batch's workflows
//! (`crate::batches`).

use crate::audit::audit_stmt;
use crate::batches::{BatchAdmitted, BatchWork, bulk_insert, enqueue_in};
use crate::db::{Col, Cols, RowSet, Tx, stmt};
use crate::vms::{
    AdmitError, AdmitExtras, Holdings, VM_COLS, Vm, free_ips, holdings, lease_nic, live_op_stmt,
    prefetch_vm, vm_from,
};
use crate::workflows::{LeaseTo, NewStep, NewWorkflow};
use crate::{Actor, Store, now_ms};
use basphere_core::{
    ExtraNic, ImageName, NetworkPool, ResourceRef, Spec, SpecName, Username, VmName, VmOperation,
    VmStatus,
};
use serde_json::json;
use std::collections::{HashMap, HashSet};

/// One VM to create as a batch node.
#[derive(Debug, Clone)]
pub struct BatchVm {
    pub name: VmName,
    pub os: ImageName,
    pub login_user: String,
    pub spec_name: SpecName,
    pub spec: Spec,
    /// Hard edges: node names in this batch, or existing VMs (waited for if still busy).
    pub requires: Vec<String>,
    /// Soft edges: node names in this batch (others are ignored).
    pub optional: Vec<String>,
    /// Extra disks and networks beside the spec.
    pub extras: AdmitExtras,
}

/// A planned batch to admit.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub owner: Username,
    pub provider: String,
    pub parallelism: u32,
    pub creates: Vec<BatchVm>,
    /// Existing VMs of the owner to delete.
    pub deletes: Vec<VmName>,
    pub create_steps: Vec<NewStep>,
    pub delete_steps: Vec<NewStep>,
}

const VM_ROW: &[Col] = &[
    ("id", false),
    ("owner", false),
    ("name", false),
    ("os", false),
    ("login_user", false),
    ("spec", false),
    ("vcpus", true),
    ("memory_mib", true),
    ("disk_gib", true),
    ("ip", false),
    ("provider", false),
    ("created_at", true),
    ("updated_at", true),
    ("extra_disks", false),
    ("extra_nics", false),
    ("extra_disk_gib", true),
];
const AUDIT_ROW: &[Col] = &[
    ("at", true),
    ("actor", false),
    ("source", false),
    ("target", false),
    ("detail", false),
];
/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("VM {0} is {1}; wait for its operation to finish, then apply again")]
    Busy(String, VmStatus),
}

impl From<crate::StoreError> for BatchError {
    fn from(e: crate::StoreError) -> Self {
        BatchError::Admit(e.into())
    }
}

impl From<basphere_core::QuotaExceeded> for BatchError {
    fn from(e: basphere_core::QuotaExceeded) -> Self {
        BatchError::Admit(e.into())
    }
}

/// A batch admitted, with the VMs of the nodes it leased and their owner's key (what their
/// first steps read: [`Store::vm_and_key`] takes them from the prefetch).
type AdmittedBatch = (BatchAdmitted, Vec<Vm>, Option<String>);

/// Admits the batch `req` (see [`Store::admit_batch`]).
async fn admit(
    tx: &mut dyn Tx,
    req: &BatchRequest,
    pool: &NetworkPool,
    actor: &Actor,
    lease: Option<&LeaseTo>,
) -> std::result::Result<AdmittedBatch, BatchError> {
    let owner = req.owner.as_str();
    let vms = stmt!(format!("SELECT {VM_COLS} FROM vms WHERE owner = $1"), owner);
    let Holdings {
        quota,
        block,
        admin,
        mut used,
        rows,
        key,
        ..
    } = holdings(tx, owner, pool, vms).await?;
    for v in &req.creates {
        let each = Spec {
            disk_gib: v.spec.disk_gib + v.extras.disk_gib(),
            ..v.spec
        };
        quota.admit(&used, 1, &each)?;
        used.vms += 1;
        used.ips += 1;
        used.vcpus += each.vcpus;
        used.memory_mib += each.memory_mib;
        used.disk_gib += each.disk_gib;
    }
    let existing: HashMap<String, (String, VmStatus)> = rows
        .into_iter()
        .map(|r| vm_from(r).map(|v| (v.name.to_string(), (v.id, v.status))))
        .collect::<crate::Result<_>>()?;
    let mut seen = HashSet::new();
    for v in &req.creates {
        if !seen.insert(v.name.as_str()) {
            return Err(AdmitError::DuplicateInRequest(v.name.clone()).into());
        }
        if existing.contains_key(v.name.as_str()) {
            return Err(AdmitError::NameTaken(v.name.clone()).into());
        }
    }
    let mut free = free_ips(tx, pool, &block, req.creates.len())
        .await?
        .into_iter();
    let batch_id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let mut nic_locked = false;
    let mut works = Vec::with_capacity(req.creates.len() + req.deletes.len());
    // VM rows and audit records in one statement each: a 1,000-node batch is a handful.
    let (mut vms, mut audit) = (RowSet::new(VM_ROW), RowSet::new(AUDIT_ROW));
    // The VMs as their rows read, by the workflow that creates each (for those leased).
    let mut made: HashMap<String, Vm> = HashMap::new();
    let priority = if admin { 5 } else { 0 };
    for v in &req.creates {
        let ip = free
            .next()
            .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?;
        let id = uuid::Uuid::now_v7().to_string();
        let mut nics = Vec::with_capacity(v.extras.networks.len());
        for net in &v.extras.networks {
            let ip = lease_nic(tx, net, &id, &mut nic_locked).await?;
            nics.push(ExtraNic {
                network: net.name.clone(),
                ip,
            });
        }
        vms.push(vec![
            (&id).into(),
            owner.into(),
            v.name.as_str().into(),
            v.os.as_str().into(),
            (&v.login_user).into(),
            v.spec_name.as_str().into(),
            i64::from(v.spec.vcpus).into(),
            (v.spec.memory_mib as i64).into(),
            (v.spec.disk_gib as i64).into(),
            ip.to_string().into(),
            (&req.provider).into(),
            now.into(),
            now.into(),
            json!(v.extras.disks).to_string().into(),
            json!(nics).to_string().into(),
            (v.extras.disk_gib() as i64).into(),
        ]);
        let mut w = NewWorkflow::new(
            VmOperation::Create.as_str(),
            owner,
            req.create_steps.clone(),
        );
        w.resource = Some(ResourceRef::vm(&id));
        w.priority = priority;
        w.provider = Some(req.provider.clone());
        let mut work = BatchWork::new(v.name.as_str(), "create", w);
        if lease.is_some() {
            made.insert(
                work.id.clone(),
                Vm {
                    id: id.clone(),
                    name: v.name.clone(),
                    owner: req.owner.clone(),
                    os: v.os.to_string(),
                    login_user: v.login_user.clone(),
                    spec: v.spec_name.to_string(),
                    vcpus: v.spec.vcpus,
                    memory_mib: v.spec.memory_mib,
                    disk_gib: v.spec.disk_gib,
                    ip_address: Some(ip),
                    status: VmStatus::Creating,
                    error: None,
                    provider: req.provider.clone(),
                    created_at: now,
                    updated_at: now,
                    extra_disks: v.extras.disks.clone(),
                    extra_nics: nics.clone(),
                },
            );
        }
        audit.push(vec![
            now.into(),
            (&actor.name).into(),
            (&actor.source).into(),
            format!("{owner}/{}", v.name).into(),
            format!(
                "ip={ip} spec={} os={} operation={} batch={batch_id}",
                v.spec_name, v.os, work.id
            )
            .into(),
        ]);
        work.optional = v.optional.clone();
        for r in &v.requires {
            match existing.get(r) {
                // An existing VM still being made: wait for its operation.
                Some((vm_id, _)) => {
                    if let Some(op) = tx.query_opt(&live_op_stmt(vm_id)).await? {
                        work.after.push(op.text("id")?);
                    }
                }
                None => work.requires.push(r.clone()),
            }
        }
        works.push(work);
    }
    let mut later = vec![];
    for name in &req.deletes {
        let Some((vm_id, status)) = existing.get(name.as_str()) else {
            continue;
        };
        if matches!(status, VmStatus::Creating | VmStatus::Deleting) {
            return Err(BatchError::Busy(name.to_string(), *status));
        }
        later.push(stmt!(
            "UPDATE vms SET status = 'deleting', updated_at = $2 WHERE id = $1",
            vm_id.as_str(),
            now
        ));
        let mut w = NewWorkflow::new(
            VmOperation::Delete.as_str(),
            owner,
            req.delete_steps.clone(),
        );
        w.resource = Some(ResourceRef::vm(vm_id));
        w.priority = 10;
        w.provider = Some(req.provider.clone());
        let work = BatchWork::new(name.as_str(), "delete", w);
        later.push(audit_stmt(
            actor,
            "vm.delete",
            &format!("{owner}/{name}"),
            "accepted",
            Some(&format!("operation={} batch={batch_id}", work.id)),
        ));
        works.push(work);
    }
    let d = tx.dialect();
    let inserts = [
        bulk_insert(d, "vms", &[("status", "'creating'")], vms),
        bulk_insert(
            d,
            "audit",
            &[("action", "'vm.create'"), ("result", "'accepted'")],
            audit,
        ),
    ];
    later.extend(inserts.into_iter().flatten());
    tx.run(&later).await?;
    let admitted = enqueue_in(tx, &batch_id, owner, req.parallelism, &works, lease).await?;
    let leased = admitted
        .leased
        .iter()
        .map(|(wf, _, _)| wf)
        .chain(&admitted.held)
        .filter_map(|wf| made.remove(&wf.id))
        .collect();
    Ok((admitted, leased, key))
}

impl Store {
    /// Admits a whole batch or nothing: quota for every create at once, addresses, VM rows,
    /// workflows, edges, the batch row and audit records, in one transaction (exact across
    /// replicas: it takes the locks [`Store::admit_vms`] takes).
    pub async fn admit_batch(
        &self,
        req: &BatchRequest,
        pool: &NetworkPool,
        actor: &Actor,
    ) -> std::result::Result<BatchAdmitted, BatchError> {
        self.admit_batch_leased(req, pool, actor, None).await
    }

    /// [`Store::admit_batch`], leasing up to `lease.max` of the nodes given a slot to `lease`'s
    /// node with their first step started ([`BatchAdmitted::leased`]), as
    /// [`Store::admit_vms_leased`] does for creates.
    pub async fn admit_batch_leased(
        &self,
        req: &BatchRequest,
        pool: &NetworkPool,
        actor: &Actor,
        lease: Option<LeaseTo>,
    ) -> std::result::Result<BatchAdmitted, BatchError> {
        let (req, pool, actor) = (req.clone(), pool.clone(), actor.clone());
        let (admitted, leased, key) = self
            .db
            .write(move |tx| {
                Box::pin(async move { admit(tx, &req, &pool, &actor, lease.as_ref()).await })
            })
            .await?;
        for vm in leased {
            prefetch_vm(&self.prefetched, vm, key.clone());
        }
        Ok(admitted)
    }

    /// Names of `owner`'s VMs that a batch made (what `plan` may delete when they leave a
    /// manifest; VMs made one by one are never touched by a plan).
    pub async fn managed_vm_names(&self, owner: &str) -> crate::Result<Vec<String>> {
        let s = stmt!(
            "SELECT DISTINCT v.name FROM vms v JOIN workflows w ON w.resource_id = v.id
             WHERE v.owner = $1 AND w.definition = 'create_vm' AND w.batch_id IS NOT NULL",
            owner
        );
        self.db
            .read(move |tx| {
                Box::pin(
                    async move { tx.query(&s).await?.iter().map(|r| r.text("name")).collect() },
                )
            })
            .await
    }
}
