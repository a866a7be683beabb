//! Retrying a failed or cancelled workflow: its definition's hooks make the resource ready,
//! then it is queued again from its first step not done, with the batch dependents that were
//! skipped because of it.

use super::{StepStatus, WorkflowEvent, WorkflowStatus, clock, event, load_for_update};
use crate::audit::audit_stmt;
use crate::db::{Tx, stmt};
use crate::hooks::{Registry, RetryCtx};
use crate::workflows::OpError;
use crate::{Actor, Store};
use basphere_core::NetworkPool;

impl Store {
    /// Queues a failed or cancelled workflow again from its first step that is not done (after
    /// a rollback, that is the first step). Its definition's hooks make the resource ready
    /// first (a VM create gets its address and quota back, or the retry is refused); a batch
    /// node's skipped dependents are queued again with it.
    pub async fn retry_workflow(
        &self,
        wf: &str,
        ctx: &RetryCtx<'_>,
        actor: &Actor,
    ) -> std::result::Result<Vec<WorkflowEvent>, OpError> {
        let (wf, pool, actor, hooks) = (
            wf.to_string(),
            ctx.pool.clone(),
            actor.clone(),
            self.hooks.clone(),
        );
        self.db
            .write(move |tx| Box::pin(retry(tx, hooks, wf, pool, actor)))
            .await
    }
}

async fn retry(
    tx: &mut dyn Tx,
    hooks: Registry,
    wf: String,
    pool: NetworkPool,
    actor: Actor,
) -> std::result::Result<Vec<WorkflowEvent>, OpError> {
    let ctx = RetryCtx { pool: &pool };
    let mut todo = vec![wf];
    let mut evs = vec![];
    let mut first = true;
    while let Some(id) = todo.pop() {
        let w = load_for_update(tx, &id)
            .await?
            .ok_or_else(|| OpError::NotFound(id.clone()))?;
        if !matches!(w.status, WorkflowStatus::Failed | WorkflowStatus::Cancelled) {
            if first {
                return Err(OpError::State(
                    id,
                    w.status,
                    "only failed or cancelled operations can be retried",
                ));
            }
            continue;
        }
        first = false;
        if let Some(h) = hooks.get(&w.definition) {
            h.0.retrying(tx, &w, &ctx).await?;
        }
        let now = clock(tx).await?;
        let from: i64 = w
            .steps
            .iter()
            .find(|s| s.status != StepStatus::Done)
            .map(|s| i64::from(s.idx))
            .unwrap_or(w.steps.len() as i64);
        tx.run(&[
            stmt!(
                "UPDATE workflow_steps SET status = 'pending', attempts = 0, error = NULL
                 WHERE workflow_id = $1 AND status <> 'done'",
                id.as_str()
            ),
            stmt!(
                "UPDATE workflows SET status = 'pending', step = $2, attempt = 0, error = NULL,
                     cancel_requested = 0, lease_owner = NULL, lease_until = NULL,
                     next_run_at = $3, updated_at = $3, finished_at = NULL, parked = 0,
                     waiting_on = (SELECT COUNT(*) FROM workflow_deps d
                                   JOIN workflows o ON o.id = d.depends_on
                                   WHERE d.workflow_id = $1 AND o.status <> 'succeeded')
                 WHERE id = $1",
                id.as_str(),
                from,
                now,
            ),
            audit_stmt(
                &actor,
                "operation.retry",
                &id,
                "accepted",
                Some(&w.definition),
            ),
        ])
        .await?;
        let msg = format!("queued again by {} from step {from}", actor.name);
        evs.push(event(tx, &id, None, "retried", &msg, now).await?);
        // Skipped dependents come back too; each waits for this one again.
        for r in tx
            .query(&stmt!(
                "SELECT d.workflow_id FROM workflow_deps d JOIN workflows o ON o.id = d.workflow_id
                 WHERE d.depends_on = $1 AND o.status = 'cancelled' AND o.error LIKE 'skipped:%'",
                id.as_str()
            ))
            .await?
        {
            todo.extend(r.first_text()?);
        }
    }
    Ok(evs)
}
