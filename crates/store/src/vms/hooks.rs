//! The VM's workflow hooks: what ending or retrying a create or delete does to its record.

use super::{VMS_AND_KEYS, prefetch_vm, readmit, vm_and_key_from};
use crate::db::{Cols, Dialect, Row, Stmt, Tx, stmt};
use crate::hooks::{Hooks, Prefetch, ResourceHooks, RetryCtx, each_succeeded};
use crate::workflows::sets::{Write, id_in, ids_arg};
use crate::workflows::{Ending, OpError, Workflow, WorkflowOutcome};
use crate::{Actor, Result, now_ms};
use basphere_core::{NetworkPool, ResourceRef, VmOperation};

/// What a VM's workflows do to it when they end or are retried (registered by the VM
/// definitions as [`Hooks::vm`]):
/// create ok → running; create failed → failed with the reason, addresses (its own and on
/// extra networks) and quota released once every done step was undone (else both stay until a delete confirms the cleanup);
/// delete ok → the record is gone (address and quota free); delete failed → failed.
/// Each ending writes its audit record; a retry gives a failed create its address and quota
/// back (refused if they are gone) and marks a failed delete deleting again.
struct VmHooks(VmOperation);

impl Hooks {
    /// The hooks of the VM operation `op` on its VM record.
    pub fn vm(op: VmOperation) -> Self {
        Hooks(std::sync::Arc::new(VmHooks(op)))
    }
}

/// The engine's audit record about VM `$1`, named `owner/name` (none if the VM is gone).
const VM_AUDIT: &str = "INSERT INTO audit (at, actor, source, action, target, result, detail)
     SELECT $2, $3, $4, $5, owner || '/' || name, $6, $7 FROM vms WHERE id = $1";

fn vm_audit(vm: &str, now: i64, action: &str, result: &str, detail: Option<&str>) -> Stmt {
    let actor = Actor::engine();
    stmt!(
        VM_AUDIT,
        vm,
        now,
        actor.name,
        actor.source,
        action,
        result,
        detail
    )
}

#[async_trait::async_trait]
impl ResourceHooks for VmHooks {
    fn ended(&self, w: &Ending, outcome: &WorkflowOutcome, now: i64) -> Vec<Stmt> {
        let Some(vm) = w.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)) else {
            return vec![];
        };
        let result = outcome.status().as_str();
        match (self.0, outcome) {
            (VmOperation::Create, WorkflowOutcome::Succeeded) => vec![
                stmt!(
                    "UPDATE vms SET status = 'running', error = NULL, updated_at = $2 WHERE id = $1",
                    vm,
                    now
                ),
                stmt!(
                    "INSERT INTO audit (at, actor, source, action, target, result, detail)
                     SELECT $2, $3, $4, 'vm.create', owner || '/' || name, 'ok', ip
                     FROM vms WHERE id = $1",
                    vm,
                    now,
                    Actor::engine().name,
                    Actor::engine().source,
                ),
            ],
            // A step still done was not undone: the machine may exist and use the address,
            // so the VM keeps it (and counts) until a delete confirms the cleanup.
            (VmOperation::Create, WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e)) => {
                vec![
                    stmt!(
                        "UPDATE vms SET status = 'failed', updated_at = $3,
                             error = $2 || CASE WHEN EXISTS (SELECT 1 FROM workflow_steps
                                 WHERE workflow_id = $4 AND status = 'done')
                               THEN ' — the VM keeps its address until it is cleaned up: \
run delete-vm to retry the cleanup' ELSE '' END,
                             ip = CASE WHEN EXISTS (SELECT 1 FROM workflow_steps
                                 WHERE workflow_id = $4 AND status = 'done') THEN ip END
                         WHERE id = $1",
                        vm,
                        e.as_str(),
                        now,
                        w.id.as_str(),
                    ),
                    stmt!(
                        "DELETE FROM vm_nic_leases WHERE vm_id = $1 AND NOT EXISTS (
                             SELECT 1 FROM workflow_steps WHERE workflow_id = $2 AND status = 'done')",
                        vm,
                        w.id.as_str(),
                    ),
                    vm_audit(vm, now, "vm.create", result, Some(e)),
                ]
            }
            (VmOperation::Delete, WorkflowOutcome::Succeeded) => vec![
                vm_audit(vm, now, "vm.delete", "ok", None),
                stmt!(
                    "UPDATE workflows SET resource_kind = NULL, resource_id = NULL
                     WHERE resource_id = $1",
                    vm
                ),
                stmt!("DELETE FROM vm_nic_leases WHERE vm_id = $1", vm),
                stmt!("DELETE FROM vms WHERE id = $1", vm),
            ],
            (VmOperation::Delete, WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e)) => {
                vec![
                    stmt!(
                        "UPDATE vms SET status = 'failed', error = $2, updated_at = $3 WHERE id = $1",
                        vm,
                        format!("delete failed: {e}; run delete-vm again"),
                        now,
                    ),
                    vm_audit(vm, now, "vm.delete", "failed", Some(e)),
                ]
            }
        }
    }

    fn succeeded_many(&self, d: Dialect, ws: &[&Ending], now: i64) -> Vec<Write> {
        if self.0 != VmOperation::Create {
            return each_succeeded(self, ws, now);
        }
        // Created: one statement for every VM and one for their audit records.
        let vms: Vec<String> = ws
            .iter()
            .filter_map(|w| w.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)))
            .map(str::to_string)
            .collect();
        if vms.is_empty() {
            return vec![];
        }
        let actor = Actor::engine();
        let running = format!(
            "UPDATE vms SET status = 'running', error = NULL, updated_at = $1 WHERE {}",
            id_in(d, "id", 2)
        );
        let audit = |from: &str| {
            format!(
                "INSERT INTO audit (at, actor, source, action, target, result, detail)
                 SELECT $1, $2, $3, 'vm.create', owner || '/' || name, 'ok', ip FROM {from}"
            )
        };
        let who = || vec![now.into(), actor.name.into(), actor.source.into()];
        match d {
            // Parts of the group's writes (they read only `vms`, which those do not change):
            // the audit records come from the rows the update returns.
            Dialect::Postgres => vec![
                Write::Part(
                    "vm_created",
                    Stmt::new(
                        format!("{running} RETURNING owner, name, ip"),
                        vec![now.into(), ids_arg(d, &vms)],
                    ),
                ),
                Write::Part("vm_created_audit", Stmt::new(audit("vm_created"), who())),
            ],
            Dialect::Sqlite => {
                let ids = ids_arg(d, &vms);
                let mut args = who();
                args.push(ids.clone());
                vec![
                    Write::Own(Stmt::new(running, vec![now.into(), ids])),
                    Write::Own(Stmt::new(
                        audit(&format!("vms WHERE {}", id_in(d, "id", 4))),
                        args,
                    )),
                ]
            }
        }
    }

    fn cancellable(&self, w: &Workflow) -> std::result::Result<(), String> {
        match (self.0, &w.resource) {
            // Its steps have no undo: a cancelled delete would leave a VM half taken apart.
            (VmOperation::Delete, Some(_)) => Err(format!(
                "operation {0} deletes a VM; a delete cannot be cancelled once accepted. \
                 Wait for it to end (basphere ops watch {0})",
                w.id
            )),
            _ => Ok(()),
        }
    }

    async fn retrying(
        &self,
        tx: &mut dyn Tx,
        w: &Workflow,
        ctx: &RetryCtx<'_>,
    ) -> std::result::Result<(), OpError> {
        self.retrying_tx(tx, w, ctx.pool).await
    }

    /// The steps about to start read their VMs with their owners' keys: read them here, in
    /// the hand-off's transaction, in one query (`Store::vm_and_key` takes each).
    fn handed_off_read(&self, leased: &Stmt) -> Option<Stmt> {
        let sql = format!(
            "{VMS_AND_KEYS} WHERE v.id IN (SELECT h.resource_id FROM ({}) h
                                            WHERE h.resource_kind = '{}')",
            leased.sql,
            ResourceRef::VM
        );
        Some(Stmt::new(sql, leased.args.clone()))
    }

    fn handed_off_rows(&self, rows: &[Row], cache: &Prefetch) -> Result<()> {
        for r in rows {
            let (vm, key) = vm_and_key_from(r.clone())?;
            prefetch_vm(cache, vm, key);
        }
        Ok(())
    }
}

impl VmHooks {
    /// Makes the VM ready for a retry of `w`, inside the retry's transaction: a failed create
    /// gets its quota and an address again ([`readmit`]), a failed delete is deleting again.
    async fn retrying_tx(
        &self,
        tx: &mut dyn Tx,
        w: &Workflow,
        pool: &NetworkPool,
    ) -> std::result::Result<(), OpError> {
        let gone = || {
            OpError::Refused(format!(
                "operation {}'s VM is gone; create it again instead",
                w.id
            ))
        };
        let vm_id = w
            .resource
            .as_ref()
            .and_then(|r| r.id_of(ResourceRef::VM))
            .ok_or_else(gone)?;
        vm_idle_and_failed(tx, vm_id, &w.id).await?;
        match self.0 {
            VmOperation::Create => readmit(tx, vm_id, pool)
                .await
                .map_err(|e| OpError::Refused(e.to_string()))?,
            VmOperation::Delete => {
                tx.exec(&stmt!(
                    "UPDATE vms SET status = 'deleting', error = NULL, updated_at = $2 WHERE id = $1",
                    vm_id,
                    now_ms()
                ))
                .await?;
            }
        }
        Ok(())
    }
}

/// Refuses a retry of `wf` unless its VM is failed and no other live workflow touches it
/// (inside the retry's transaction, so nothing can start on the VM in between).
async fn vm_idle_and_failed(
    tx: &mut dyn Tx,
    vm_id: &str,
    wf: &str,
) -> std::result::Result<(), OpError> {
    let live = tx
        .query_opt(&stmt!(
            "SELECT id, definition FROM workflows WHERE resource_id = $1 AND id <> $2
               AND status IN ('pending', 'running', 'undoing') LIMIT 1",
            vm_id,
            wf
        ))
        .await?;
    let vm = tx
        .query_opt(&stmt!(
            "SELECT owner, name, status FROM vms WHERE id = $1",
            vm_id
        ))
        .await?;
    let Some(vm) = vm else {
        return Err(OpError::Refused(format!(
            "operation {wf}'s VM is gone; create it again instead"
        )));
    };
    let (owner, name, status) = (vm.text("owner")?, vm.text("name")?, vm.text("status")?);
    if let Some(l) = live {
        let (op, def) = (l.text("id")?, l.opt_text("definition")?);
        return Err(OpError::Refused(format!(
            "VM {owner}/{name} has operation {op} ({}) in progress; wait for it to end \
             (basphere ops watch {op}) before retrying {wf}",
            def.unwrap_or_default()
        )));
    }
    if status != "failed" {
        return Err(OpError::Refused(format!(
            "VM {owner}/{name} is {status}; only an operation of a failed VM can be retried"
        )));
    }
    Ok(())
}
