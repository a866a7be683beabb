//! Batches: a DAG of VM creates (and deletes) admitted in one transaction.
//!
//! Each node becomes an ordinary workflow tagged with the batch; its edges are rows of
//! `workflow_deps`, and the claim query runs a node only once its dependencies ended and the
//! batch has fewer than `parallelism` nodes in flight. A failed node skips the nodes that
//! require it (see `Store::finish_workflow`).

use crate::audit::audit_stmt;
use crate::db::{Col, Cols, Dialect, RowSet, Stmt, Tx, stmt};
use crate::vms::{
    AdmitError, AdmitExtras, VM_COLS, lease_nic, live_op_stmt, owner_limits, taken_ips, usage,
    vm_from,
};
use crate::workflows::{NewStep, NewWorkflow, fill_batch_in, insert_stmts};
use crate::{Actor, Store, now_ms};
use basphere_core::{
    ExtraNic, ImageName, NetworkPool, ResourceRef, Spec, SpecName, Username, VmName, VmOperation,
    VmStatus,
};
use serde::Serialize;
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

/// One node of an admitted batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchNodeRef {
    pub node: String,
    pub action: &'static str,
    pub operation_id: String,
}

/// An admitted batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchAdmitted {
    pub batch_id: String,
    pub nodes: Vec<BatchNodeRef>,
}

/// One statement inserting every row of `rows` (each a JSON array, one value per column of
/// `cols`) into `table`, whatever their number (a [`RowSet`]); `consts` are columns set to
/// the same SQL constant in every row. Rows are inserted in order.
fn bulk_insert(
    dialect: Dialect,
    table: &str,
    cols: &'static [Col],
    consts: &[(&str, &str)],
    rows: Vec<serde_json::Value>,
) -> Option<Stmt> {
    if rows.is_empty() {
        return None;
    }
    let names = cols
        .iter()
        .map(|c| c.0)
        .chain(consts.iter().map(|c| c.0))
        .collect::<Vec<_>>()
        .join(", ");
    let values = cols
        .iter()
        .map(|c| format!("v.{}", c.0))
        .chain(consts.iter().map(|c| c.1.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut set = RowSet::new(cols);
    for r in &rows {
        set.push_json(r);
    }
    let mut sql = format!(
        "INSERT INTO {table} ({names}) SELECT {values} FROM {}",
        set.relation(dialect, 1)
    );
    if table == "workflow_events" {
        // Appends to the event log say which sequence numbers they took (see `db::postgres`).
        sql.push_str(" RETURNING seq");
    }
    Some(Stmt::new(sql, set.args(dialect)))
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
const WORKFLOW_ROW: &[Col] = &[
    ("id", false),
    ("resource_id", false),
    ("owner", false),
    ("priority", true),
    ("next_run_at", true),
    ("provider", false),
    ("batch_id", false),
    ("node", false),
    ("created_at", true),
    ("updated_at", true),
];
const STEP_ROW: &[Col] = &[
    ("workflow_id", false),
    ("idx", true),
    ("name", false),
    ("idem_key", false),
    ("timeout_ms", true),
];
const EVENT_ROW: &[Col] = &[("workflow_id", false), ("at", true)];
const AUDIT_ROW: &[Col] = &[
    ("at", true),
    ("actor", false),
    ("source", false),
    ("target", false),
    ("detail", false),
];
const EDGE_ROW: &[Col] = &[
    ("workflow_id", false),
    ("depends_on", false),
    ("hard", true),
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

/// Admits the batch `req` (see [`Store::admit_batch`]).
async fn admit(
    tx: &mut dyn Tx,
    req: &BatchRequest,
    pool: &NetworkPool,
    actor: &Actor,
) -> std::result::Result<BatchAdmitted, BatchError> {
    let owner = req.owner.as_str();
    let (quota, block, admin) = owner_limits(tx, owner, pool).await?;
    let mut used = usage(tx, owner).await?;
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
    let existing: HashMap<String, (String, VmStatus)> = tx
        .query(&stmt!(
            format!("SELECT {VM_COLS} FROM vms WHERE owner = $1"),
            owner
        ))
        .await?
        .iter()
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
    let taken = taken_ips(tx).await?;
    let mut free = pool
        .assignable_in(&block)
        .filter(|a| !taken.contains(&a.to_string()));
    let batch_id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    tx.exec(&stmt!(
        "INSERT INTO batches (id, owner, parallelism, nodes, created_at) VALUES ($1, $2, $3, $4, $5)",
        batch_id.as_str(),
        owner,
        req.parallelism.max(1),
        (req.creates.len() + req.deletes.len()) as i64,
        now,
    ))
    .await?;
    let mut nodes = Vec::with_capacity(req.creates.len() + req.deletes.len());
    let mut nic_locked = false;
    let mut op_of: HashMap<&str, String> = HashMap::new();
    // Rows of one statement per table: a 1,000-node batch is a handful of statements.
    let (mut vms, mut wfs, mut steps, mut evs, mut audit) =
        (vec![], vec![], vec![], vec![], vec![]);
    let priority = if admin { 5 } else { 0 };
    for v in &req.creates {
        let ip = free
            .next()
            .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?;
        let id = uuid::Uuid::now_v7().to_string();
        let op = uuid::Uuid::now_v7().to_string();
        let mut nics = Vec::with_capacity(v.extras.networks.len());
        for net in &v.extras.networks {
            let ip = lease_nic(tx, net, &id, &mut nic_locked).await?;
            nics.push(ExtraNic {
                network: net.name.clone(),
                ip,
            });
        }
        vms.push(json!([
            id,
            owner,
            v.name.as_str(),
            v.os.as_str(),
            v.login_user,
            v.spec_name.as_str(),
            v.spec.vcpus,
            v.spec.memory_mib,
            v.spec.disk_gib,
            ip.to_string(),
            req.provider,
            now,
            now,
            json!(v.extras.disks).to_string(),
            json!(nics).to_string(),
            v.extras.disk_gib(),
        ]));
        wfs.push(json!([
            op,
            id,
            owner,
            priority,
            now,
            req.provider,
            batch_id,
            v.name.as_str(),
            now,
            now,
        ]));
        for (i, s) in req.create_steps.iter().enumerate() {
            steps.push(json!([
                op,
                i,
                s.name,
                format!("{op}/{i}/{}", s.name),
                s.timeout_ms
            ]));
        }
        evs.push(json!([op, now]));
        audit.push(json!([
            now,
            actor.name,
            actor.source,
            format!("{owner}/{}", v.name),
            format!(
                "ip={ip} spec={} os={} operation={op} batch={batch_id}",
                v.spec_name, v.os
            ),
        ]));
        op_of.insert(v.name.as_str(), op.clone());
        nodes.push(BatchNodeRef {
            node: v.name.to_string(),
            action: "create",
            operation_id: op,
        });
    }
    let d = tx.dialect();
    let inserts = [
        bulk_insert(d, "vms", VM_ROW, &[("status", "'creating'")], vms),
        bulk_insert(
            d,
            "workflows",
            WORKFLOW_ROW,
            &[
                ("definition", "'create_vm'"),
                ("resource_kind", "'vm'"),
                ("status", "'pending'"),
                ("input", "'{}'"),
                ("parked", "1"),
            ],
            wfs,
        ),
        bulk_insert(
            d,
            "workflow_steps",
            STEP_ROW,
            &[("status", "'pending'")],
            steps,
        ),
        bulk_insert(
            d,
            "workflow_events",
            EVENT_ROW,
            &[
                ("step", "NULL"),
                ("kind", "'queued'"),
                ("message", "'create_vm queued'"),
            ],
            evs,
        ),
        bulk_insert(
            d,
            "audit",
            AUDIT_ROW,
            &[("action", "'vm.create'"), ("result", "'accepted'")],
            audit,
        ),
    ];
    tx.run(&inserts.into_iter().flatten().collect::<Vec<_>>())
        .await?;
    let mut edges = vec![];
    // One edge per pair (a name listed twice, or both required and optional, is one; the
    // hard one wins): `workflow_deps` keys on the pair.
    let mut paired = HashSet::new();
    for v in &req.creates {
        let me = &op_of[v.name.as_str()];
        for (deps, hard) in [(&v.requires, true), (&v.optional, false)] {
            for d in deps {
                let target = match op_of.get(d.as_str()) {
                    Some(op) => Some(op.clone()),
                    // An existing VM still being made: wait for its operation.
                    None if existing.contains_key(d) => tx
                        .query_opt(&live_op_stmt(&existing[d].0))
                        .await?
                        .map(|r| r.text("id"))
                        .transpose()?,
                    None => None,
                };
                if let Some(t) = target.filter(|t| paired.insert((me.clone(), t.clone()))) {
                    edges.push(json!([me, t, i64::from(hard)]));
                }
            }
        }
    }
    if let Some(s) = bulk_insert(d, "workflow_deps", EDGE_ROW, &[], edges) {
        tx.exec(&s).await?;
        tx.exec(&stmt!(
            "UPDATE workflows SET waiting_on = (
                 SELECT COUNT(*) FROM workflow_deps d JOIN workflows o ON o.id = d.depends_on
                 WHERE d.workflow_id = workflows.id
                   AND o.status IN ('pending', 'running', 'undoing'))
             WHERE batch_id = $1",
            batch_id.as_str()
        ))
        .await?;
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
        w.batch = Some((batch_id.clone(), name.to_string()));
        let op = uuid::Uuid::now_v7().to_string();
        later.extend(insert_stmts(&w, &op, None, now_ms()));
        later.push(audit_stmt(
            actor,
            "vm.delete",
            &format!("{owner}/{name}"),
            "accepted",
            Some(&format!("operation={op} batch={batch_id}")),
        ));
        nodes.push(BatchNodeRef {
            node: name.to_string(),
            action: "delete",
            operation_id: op,
        });
    }
    // Every node waits for a slot (creates were inserted parked); the first `parallelism`
    // ready ones get one now.
    later.push(stmt!(
        "UPDATE workflows SET parked = 1 WHERE batch_id = $1 AND parked = 0",
        batch_id.as_str()
    ));
    tx.run(&later).await?;
    fill_batch_in(tx, &batch_id).await?;
    Ok(BatchAdmitted { batch_id, nodes })
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
        let (req, pool, actor) = (req.clone(), pool.clone(), actor.clone());
        self.db
            .write(move |tx| Box::pin(async move { admit(tx, &req, &pool, &actor).await }))
            .await
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

    /// The owner of a batch, if it exists.
    pub async fn batch_owner(&self, id: &str) -> crate::Result<Option<String>> {
        let s = stmt!("SELECT owner FROM batches WHERE id = $1", id);
        self.db
            .read(move |tx| {
                Box::pin(
                    async move { tx.query_opt(&s).await?.map(|r| r.text("owner")).transpose() },
                )
            })
            .await
    }
}
