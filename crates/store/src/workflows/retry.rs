//! Retrying a failed or cancelled workflow. Transitional: its resource hooks (`retrying`)
//! still speak sqlx to SQLite, so this transaction does too until the VM module is on the
//! seam; on PostgreSQL it answers `Unsupported`.

use super::{
    StepRecord, WF_COLS, Workflow, WorkflowEvent, WorkflowStatus, step_from, workflow_from,
};
use crate::audit::record;
use crate::hooks::RetryCtx;
use crate::workflows::{OpError, StepStatus};
use crate::{Actor, Result, Store, now_ms};
use sqlx::SqliteConnection;

async fn load_workflow(conn: &mut SqliteConnection, id: &str) -> Result<Option<Workflow>> {
    let Some(r) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WF_COLS} FROM workflows WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let steps = sqlx::query("SELECT * FROM workflow_steps WHERE workflow_id = $1 ORDER BY idx")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(step_from)
        .collect::<Result<Vec<StepRecord>>>()?;
    Ok(Some(workflow_from(&r, steps)?))
}

async fn event(
    conn: &mut SqliteConnection,
    wf: &str,
    kind: &str,
    message: &str,
) -> Result<WorkflowEvent> {
    let now = now_ms();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES ($1, $2, NULL, $3, $4) RETURNING seq",
    )
    .bind(wf)
    .bind(now)
    .bind(kind)
    .bind(message)
    .fetch_one(conn)
    .await?;
    Ok(WorkflowEvent {
        seq,
        operation_id: wf.to_string(),
        at: now,
        step: None,
        kind: kind.to_string(),
        message: message.to_string(),
    })
}

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
        let mut tx = self.write().await?;
        let mut todo = vec![wf.to_string()];
        let mut evs = vec![];
        let mut first = true;
        while let Some(id) = todo.pop() {
            let w = load_workflow(&mut tx, &id)
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
            if let Some(h) = self.hooks.get(&w.definition) {
                h.0.retrying(&mut tx, &w, ctx).await?;
            }
            let now = now_ms();
            sqlx::query(
                "UPDATE workflow_steps SET status = 'pending', attempts = 0, error = NULL
                 WHERE workflow_id = $1 AND status <> 'done'",
            )
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            let from: i64 = w
                .steps
                .iter()
                .find(|s| s.status != StepStatus::Done)
                .map(|s| i64::from(s.idx))
                .unwrap_or(w.steps.len() as i64);
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM workflow_deps d JOIN workflows o ON o.id = d.depends_on
                 WHERE d.workflow_id = $1 AND o.status <> 'succeeded'",
            )
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE workflows SET status = 'pending', step = $2, attempt = 0, error = NULL,
                     cancel_requested = 0, lease_owner = NULL, lease_until = NULL, next_run_at = $3,
                     updated_at = $3, finished_at = NULL, waiting_on = $4, parked = 0
                 WHERE id = $1",
            )
            .bind(&id)
            .bind(from)
            .bind(now)
            .bind(waiting)
            .execute(&mut *tx)
            .await?;
            evs.push(
                event(
                    &mut tx,
                    &id,
                    "retried",
                    &format!("queued again by {} from step {from}", actor.name),
                )
                .await?,
            );
            record(
                &mut tx,
                actor,
                "operation.retry",
                &id,
                "accepted",
                Some(&w.definition),
            )
            .await?;
            // Skipped dependents come back too; each waits for this one again.
            let deps: Vec<String> = sqlx::query_scalar(
                "SELECT d.workflow_id FROM workflow_deps d JOIN workflows o ON o.id = d.workflow_id
                 WHERE d.depends_on = $1 AND o.status = 'cancelled' AND o.error LIKE 'skipped:%'",
            )
            .bind(&id)
            .fetch_all(&mut *tx)
            .await?;
            todo.extend(deps);
        }
        tx.commit().await?;
        Ok(evs)
    }
}
