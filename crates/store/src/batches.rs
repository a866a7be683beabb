//! Batches: a DAG of VM creates (and deletes) admitted in one transaction.
//!
//! Each node becomes an ordinary workflow tagged with the batch; its edges are rows of
//! `workflow_deps`, and the claim query runs a node only once its dependencies ended and the
//! batch has fewer than `parallelism` nodes in flight. A failed node skips the nodes that
//! require it (see `Store::finish_workflow`).

use crate::audit::record;
use crate::vms::{AdmitError, VM_COLS, owner_limits, taken_ips, usage, vm_from};
use crate::workflows::{NewWorkflow, insert_new};
use crate::{Actor, Store, now_ms};
use basphere_core::{
    ImageName, NetworkPool, ResourceRef, Spec, SpecName, Username, VmName, VmOperation, VmStatus,
};
use serde::Serialize;
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
    pub create_steps: Vec<String>,
    pub delete_steps: Vec<String>,
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

/// One bound value of a multi-row insert.
enum A {
    S(String),
    I(i64),
}

/// Inserts `rows` (each of the same width) with `head` (ending in `VALUES`); `tail` is SQL of
/// constants appended to every row. Parameters are anonymous (`?`): SQLite looks a named one up
/// by a linear scan, which made binding a 1,000-parameter statement quadratic.
async fn insert_rows(
    conn: &mut sqlx::SqliteConnection,
    head: &str,
    tail: &str,
    rows: &[Vec<A>],
) -> crate::Result<()> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(());
    };
    let mut one = vec!["?"; width].join(", ");
    if !tail.is_empty() {
        one = format!("{one}, {tail}");
    }
    for chunk in rows.chunks((1_000 / width).max(1)) {
        let sql = format!("{head} ({})", vec![one.as_str(); chunk.len()].join("), ("));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for a in row {
                q = match a {
                    A::S(s) => q.bind(s.clone()),
                    A::I(i) => q.bind(*i),
                };
            }
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

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

impl From<sqlx::Error> for BatchError {
    fn from(e: sqlx::Error) -> Self {
        BatchError::Admit(e.into())
    }
}

impl From<basphere_core::QuotaExceeded> for BatchError {
    fn from(e: basphere_core::QuotaExceeded) -> Self {
        BatchError::Admit(e.into())
    }
}

impl Store {
    /// Admits a whole batch or nothing: quota for every create at once, addresses, VM rows,
    /// workflows, edges, the batch row and audit records, in one transaction.
    pub async fn admit_batch(
        &self,
        req: &BatchRequest,
        pool: &NetworkPool,
        actor: &Actor,
    ) -> std::result::Result<BatchAdmitted, BatchError> {
        let mut tx = self.write().await?;
        let owner = req.owner.as_str();
        let (quota, block, admin) = owner_limits(&mut tx, owner, pool).await?;
        let mut used = usage(&mut tx, owner).await?;
        for v in &req.creates {
            quota.admit(&used, 1, v.spec.vcpus, v.spec.memory_mib)?;
            used.vms += 1;
            used.ips += 1;
            used.vcpus += v.spec.vcpus;
            used.memory_mib += v.spec.memory_mib;
        }
        let existing: HashMap<String, (String, VmStatus)> = sqlx::query(sqlx::AssertSqlSafe(
            format!("SELECT {VM_COLS} FROM vms WHERE owner = $1"),
        ))
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| vm_from(r).map(|v| (v.name.to_string(), (v.id, v.status))))
        .collect::<crate::Result<_>>()?;
        let mut seen = std::collections::HashSet::new();
        for v in &req.creates {
            if !seen.insert(v.name.as_str()) {
                return Err(AdmitError::DuplicateInRequest(v.name.clone()).into());
            }
            if existing.contains_key(v.name.as_str()) {
                return Err(AdmitError::NameTaken(v.name.clone()).into());
            }
        }
        let taken = taken_ips(&mut tx).await?;
        let mut free = pool
            .assignable_in(&block)
            .filter(|a| !taken.contains(&a.to_string()));
        let batch_id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO batches (id, owner, parallelism, nodes, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&batch_id)
        .bind(owner)
        .bind(i64::from(req.parallelism.max(1)))
        .bind((req.creates.len() + req.deletes.len()) as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut nodes = Vec::with_capacity(req.creates.len() + req.deletes.len());
        let mut op_of: HashMap<&str, String> = HashMap::new();
        // Rows for multi-row inserts: a 1,000-node batch is a few dozen statements.
        let (mut vms, mut wfs, mut steps, mut evs, mut audit) =
            (vec![], vec![], vec![], vec![], vec![]);
        let priority = if admin { 5 } else { 0 };
        for v in &req.creates {
            let ip = free
                .next()
                .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?;
            let id = uuid::Uuid::now_v7().to_string();
            let op = uuid::Uuid::now_v7().to_string();
            vms.push(vec![
                A::S(id.clone()),
                A::S(owner.to_string()),
                A::S(v.name.to_string()),
                A::S(v.os.to_string()),
                A::S(v.login_user.clone()),
                A::S(v.spec_name.to_string()),
                A::I(i64::from(v.spec.vcpus)),
                A::I(v.spec.memory_mib as i64),
                A::I(v.spec.disk_gib as i64),
                A::S(ip.to_string()),
                A::S(req.provider.clone()),
                A::I(now),
                A::I(now),
            ]);
            wfs.push(vec![
                A::S(op.clone()),
                A::S(id),
                A::S(owner.to_string()),
                A::I(priority),
                A::I(now),
                A::S(req.provider.clone()),
                A::S(batch_id.clone()),
                A::S(v.name.to_string()),
                A::I(now),
                A::I(now),
            ]);
            for (i, name) in req.create_steps.iter().enumerate() {
                steps.push(vec![
                    A::S(op.clone()),
                    A::I(i as i64),
                    A::S(name.clone()),
                    A::S(format!("{op}/{i}/{name}")),
                ]);
            }
            evs.push(vec![A::S(op.clone()), A::I(now)]);
            audit.push(vec![
                A::I(now),
                A::S(actor.name.clone()),
                A::S(actor.source.clone()),
                A::S(format!("{owner}/{}", v.name)),
                A::S(format!(
                    "ip={ip} spec={} os={} operation={op} batch={batch_id}",
                    v.spec_name, v.os
                )),
            ]);
            op_of.insert(v.name.as_str(), op.clone());
            nodes.push(BatchNodeRef {
                node: v.name.to_string(),
                action: "create",
                operation_id: op,
            });
        }
        insert_rows(
            &mut tx,
            "INSERT INTO vms (id, owner, name, os, login_user, spec, vcpus, memory_mib, disk_gib,
                 ip, provider, created_at, updated_at, status) VALUES",
            "'creating'",
            &vms,
        )
        .await?;
        insert_rows(
            &mut tx,
            "INSERT INTO workflows (id, resource_id, owner, priority, next_run_at, provider,
                 batch_id, node, created_at, updated_at, definition, resource_kind, status, input,
                 parked) VALUES",
            "'create_vm', 'vm', 'pending', '{}', 1",
            &wfs,
        )
        .await?;
        insert_rows(
            &mut tx,
            "INSERT INTO workflow_steps (workflow_id, idx, name, idem_key, status) VALUES",
            "'pending'",
            &steps,
        )
        .await?;
        insert_rows(
            &mut tx,
            "INSERT INTO workflow_events (workflow_id, at, step, kind, message) VALUES",
            "NULL, 'queued', 'create_vm queued'",
            &evs,
        )
        .await?;
        insert_rows(
            &mut tx,
            "INSERT INTO audit (at, actor, source, target, detail, action, result) VALUES",
            "'vm.create', 'accepted'",
            &audit,
        )
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
                        None if existing.contains_key(d) => {
                            // An existing VM still being made: wait for its operation.
                            sqlx::query_scalar(
                                "SELECT id FROM workflows WHERE resource_id = $1
                                   AND status IN ('pending', 'running', 'undoing')
                                 ORDER BY created_at DESC LIMIT 1",
                            )
                            .bind(&existing[d].0)
                            .fetch_optional(&mut *tx)
                            .await?
                        }
                        None => None,
                    };
                    if let Some(t) = target.filter(|t| paired.insert((me.clone(), t.clone()))) {
                        edges.push(vec![A::S(me.clone()), A::S(t), A::I(hard as i64)]);
                    }
                }
            }
        }
        insert_rows(
            &mut tx,
            "INSERT INTO workflow_deps (workflow_id, depends_on, hard) VALUES",
            "",
            &edges,
        )
        .await?;
        if !edges.is_empty() {
            sqlx::query(
                "UPDATE workflows SET waiting_on = (
                     SELECT COUNT(*) FROM workflow_deps d JOIN workflows o ON o.id = d.depends_on
                     WHERE d.workflow_id = workflows.id
                       AND o.status IN ('pending', 'running', 'undoing'))
                 WHERE batch_id = $1",
            )
            .bind(&batch_id)
            .execute(&mut *tx)
            .await?;
        }
        for name in &req.deletes {
            let Some((vm_id, status)) = existing.get(name.as_str()) else {
                continue;
            };
            if matches!(status, VmStatus::Creating | VmStatus::Deleting) {
                return Err(BatchError::Busy(name.to_string(), *status));
            }
            sqlx::query("UPDATE vms SET status = 'deleting', updated_at = $2 WHERE id = $1")
                .bind(vm_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            let mut w = NewWorkflow::new(
                VmOperation::Delete.as_str(),
                owner,
                req.delete_steps.clone(),
            );
            w.resource = Some(ResourceRef::vm(vm_id));
            w.priority = 10;
            w.provider = Some(req.provider.clone());
            w.batch = Some((batch_id.clone(), name.to_string()));
            let op = insert_new(&mut tx, &w).await?;
            record(
                &mut tx,
                actor,
                "vm.delete",
                &format!("{owner}/{name}"),
                "accepted",
                Some(&format!("operation={op} batch={batch_id}")),
            )
            .await?;
            nodes.push(BatchNodeRef {
                node: name.to_string(),
                action: "delete",
                operation_id: op,
            });
        }
        // Every node waits for a slot (creates were inserted parked); the first `parallelism`
        // ready ones get one now.
        sqlx::query("UPDATE workflows SET parked = 1 WHERE batch_id = $1 AND parked = 0")
            .bind(&batch_id)
            .execute(&mut *tx)
            .await?;
        crate::workflows::fill_batch(&mut tx, &batch_id).await?;
        tx.commit().await?;
        Ok(BatchAdmitted { batch_id, nodes })
    }

    /// Names of `owner`'s VMs that a batch made (what `plan` may delete when they leave a
    /// manifest; VMs made one by one are never touched by a plan).
    pub async fn managed_vm_names(&self, owner: &str) -> crate::Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT v.name FROM vms v JOIN workflows w ON w.resource_id = v.id
             WHERE v.owner = $1 AND w.definition = 'create_vm' AND w.batch_id IS NOT NULL",
        )
        .bind(owner)
        .fetch_all(&self.lg()?.pool)
        .await?)
    }

    /// The owner of a batch, if it exists.
    pub async fn batch_owner(&self, id: &str) -> crate::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT owner FROM batches WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.lg()?.pool)
                .await?,
        )
    }
}
