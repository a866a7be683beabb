//! Persisted workflows: the engine's queue, step ledger and event log.
//!
//! Every transition is guarded by the lease: a write names the node that holds the workflow,
//! and a node whose lease expired (and was taken over) gets `LeaseLost` instead of writing.

use crate::audit::record;
use crate::vms::vm_from;
use crate::{Actor, Result, Store, StoreError, now_ms, parse};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

macro_rules! text_enum {
    ($name:ident { $($var:ident = $s:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($var),+ }
        impl $name {
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),+ } }
        }
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s { $($s => Ok($name::$var),)+ o => Err(format!("unknown {}: {o}", stringify!($name))) }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

text_enum!(WorkflowKind { CreateVm = "create_vm", DeleteVm = "delete_vm" });
text_enum!(WorkflowStatus {
    Pending = "pending",
    Running = "running",
    Undoing = "undoing",
    Succeeded = "succeeded",
    Failed = "failed",
    Cancelled = "cancelled",
});
text_enum!(StepStatus {
    Pending = "pending",
    Running = "running",
    Done = "done",
    Failed = "failed",
    Undone = "undone",
    Skipped = "skipped",
});

impl WorkflowStatus {
    /// Whether the workflow will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One step of a workflow as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub idx: u32,
    pub name: String,
    pub status: StepStatus,
    pub attempts: u32,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// A workflow (an "operation" to users) with its steps.
#[derive(Debug, Clone, Serialize)]
pub struct Workflow {
    pub id: String,
    pub kind: WorkflowKind,
    pub vm_id: Option<String>,
    pub owner: String,
    pub status: WorkflowStatus,
    /// Forward: the next step to run. Undoing: the next step to undo.
    pub step: i64,
    pub attempt: u32,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub steps: Vec<StepRecord>,
}

/// One entry of a workflow's event log (what SSE streams).
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowEvent {
    pub seq: i64,
    pub operation_id: String,
    pub at: i64,
    pub step: Option<String>,
    /// `started`, `step_started`, `step_done`, `step_retry`, `step_failed`, `undo_started`,
    /// `step_undone`, `succeeded`, `failed`.
    pub kind: String,
    pub message: String,
}

/// How a workflow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkflowOutcome {
    Succeeded,
    Failed(String),
}

pub(crate) async fn insert_workflow(
    conn: &mut SqliteConnection,
    kind: WorkflowKind,
    vm_id: Option<&str>,
    owner: &str,
    priority: i64,
    input: &serde_json::Value,
    steps: &[String],
) -> Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO workflows (id, kind, vm_id, owner, status, priority, input, next_run_at,
            created_at, updated_at)
         VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $7, $7)",
    )
    .bind(&id)
    .bind(kind.as_str())
    .bind(vm_id)
    .bind(owner)
    .bind(priority)
    .bind(input.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    for (i, name) in steps.iter().enumerate() {
        sqlx::query(
            "INSERT INTO workflow_steps (workflow_id, idx, name, status) VALUES ($1, $2, $3, 'pending')",
        )
        .bind(&id)
        .bind(i as i64)
        .bind(name)
        .execute(&mut *conn)
        .await?;
    }
    event(conn, &id, None, "queued", &format!("{kind} queued")).await?;
    Ok(id)
}

async fn event(
    conn: &mut SqliteConnection,
    wf: &str,
    step: Option<&str>,
    kind: &str,
    message: &str,
) -> Result<WorkflowEvent> {
    let now = now_ms();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES ($1, $2, $3, $4, $5) RETURNING seq",
    )
    .bind(wf)
    .bind(now)
    .bind(step)
    .bind(kind)
    .bind(message)
    .fetch_one(conn)
    .await?;
    Ok(WorkflowEvent {
        seq,
        operation_id: wf.to_string(),
        at: now,
        step: step.map(str::to_string),
        kind: kind.to_string(),
        message: message.to_string(),
    })
}

fn step_from(r: &SqliteRow) -> Result<StepRecord> {
    Ok(StepRecord {
        idx: r.try_get::<i64, _>("idx")? as u32,
        name: r.try_get("name")?,
        status: parse("workflow_steps.status", r.try_get("status")?)?,
        attempts: r.try_get::<i64, _>("attempts")? as u32,
        error: r.try_get("error")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

/// The lease on a workflow was lost to another node (or the workflow vanished).
pub const LEASE_LOST: &str = "lease lost";

fn lease_lost(wf: &str) -> StoreError {
    StoreError::Corrupt("workflows.lease_owner", format!("{LEASE_LOST} on {wf}"))
}

impl StoreError {
    /// Whether this error means another node now owns the workflow.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, StoreError::Corrupt(_, m) if m.starts_with(LEASE_LOST))
    }
}

impl Store {
    async fn load_workflow(conn: &mut SqliteConnection, id: &str) -> Result<Option<Workflow>> {
        let Some(r) = sqlx::query(
            "SELECT id, kind, vm_id, owner, status, step, attempt, error, created_at, updated_at,
                    finished_at FROM workflows WHERE id = $1",
        )
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
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Workflow {
            id: r.try_get("id")?,
            kind: parse("workflows.kind", r.try_get("kind")?)?,
            vm_id: r.try_get("vm_id")?,
            owner: r.try_get("owner")?,
            status: parse("workflows.status", r.try_get("status")?)?,
            step: r.try_get("step")?,
            attempt: r.try_get::<i64, _>("attempt")? as u32,
            error: r.try_get("error")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            finished_at: r.try_get("finished_at")?,
            steps,
        }))
    }

    /// One workflow with its steps.
    pub async fn workflow(&self, id: &str) -> Result<Option<Workflow>> {
        let mut c = self.pool.acquire().await?;
        Self::load_workflow(&mut c, id).await
    }

    /// Recent workflows of `owner` (or everyone), newest first.
    pub async fn workflows(&self, owner: Option<&str>, limit: i64) -> Result<Vec<Workflow>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM workflows WHERE ($1 IS NULL OR owner = $1)
             ORDER BY created_at DESC LIMIT $2",
        )
        .bind(owner)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut c = self.pool.acquire().await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(w) = Self::load_workflow(&mut c, &id).await? {
                out.push(w);
            }
        }
        Ok(out)
    }

    /// Events of a workflow after `after_seq`, in order.
    pub async fn events(&self, id: &str, after_seq: i64) -> Result<Vec<WorkflowEvent>> {
        let rows = sqlx::query(
            "SELECT seq, workflow_id, at, step, kind, message FROM workflow_events
             WHERE workflow_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id)
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WorkflowEvent {
                    seq: r.try_get("seq")?,
                    operation_id: r.try_get("workflow_id")?,
                    at: r.try_get("at")?,
                    step: r.try_get("step")?,
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    /// Claims the most urgent runnable workflow for `node` with a lease of `lease_ms`.
    /// A workflow is runnable when unfinished, due, and not leased (or its lease expired).
    /// On PostgreSQL the inner SELECT takes `FOR UPDATE SKIP LOCKED`.
    pub async fn claim_workflow(&self, node: &str, lease_ms: i64) -> Result<Option<Workflow>> {
        let now = now_ms();
        let mut tx = self.write().await?;
        let id: Option<String> = sqlx::query_scalar(
            "UPDATE workflows SET lease_owner = $1, lease_until = $2, updated_at = $3,
                 status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
             WHERE id = (SELECT id FROM workflows
                         WHERE status IN ('pending', 'running', 'undoing') AND next_run_at <= $3
                           AND (lease_owner IS NULL OR lease_until < $3)
                         ORDER BY priority DESC, created_at LIMIT 1)
             RETURNING id",
        )
        .bind(node)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let wf = Self::load_workflow(&mut tx, &id).await?;
        tx.commit().await?;
        Ok(wf)
    }

    /// Milliseconds until the next workflow becomes due, if any is waiting.
    pub async fn next_due_in(&self) -> Result<Option<i64>> {
        let t: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN lease_owner IS NULL THEN next_run_at
                             ELSE MAX(next_run_at, lease_until) END)
             FROM workflows WHERE status IN ('pending', 'running', 'undoing')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(t.map(|t| (t - now_ms()).max(0)))
    }

    /// Extends `node`'s lease; `LeaseLost` if another node holds it now.
    pub async fn renew_lease(&self, wf: &str, node: &str, lease_ms: i64) -> Result<()> {
        let n =
            sqlx::query("UPDATE workflows SET lease_until = $3 WHERE id = $1 AND lease_owner = $2")
                .bind(wf)
                .bind(node)
                .bind(now_ms() + lease_ms)
                .execute(&self.pool)
                .await?
                .rows_affected();
        if n == 0 { Err(lease_lost(wf)) } else { Ok(()) }
    }

    /// Drops every lease `node` holds (a restarted node reclaims its own work at once).
    pub async fn release_leases(&self, node: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE workflows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(node)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn guard(conn: &mut SqliteConnection, wf: &str, node: &str) -> Result<()> {
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT lease_owner FROM workflows WHERE id = $1")
                .bind(wf)
                .fetch_optional(&mut *conn)
                .await?;
        if owner.flatten().as_deref() == Some(node) {
            Ok(())
        } else {
            Err(lease_lost(wf))
        }
    }

    /// Records that step `idx` starts (one more attempt).
    pub async fn step_started(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        sqlx::query(
            "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1, started_at = $3
             WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let ev = event(
            &mut tx,
            wf,
            Some(name),
            "step_started",
            &format!("{name} started"),
        )
        .await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Records that step `idx` finished and moves the workflow to the next step.
    pub async fn step_done(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE workflow_steps SET status = 'done', error = NULL, finished_at = $3
             WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE workflows SET step = $2, attempt = 0, updated_at = $3 WHERE id = $1")
            .bind(wf)
            .bind(i64::from(idx) + 1)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let ev = event(
            &mut tx,
            wf,
            Some(name),
            "step_done",
            &format!("{name} done"),
        )
        .await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Records a retryable failure: the step runs again after `delay_ms`, by any node.
    pub async fn step_retry(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        error: &str,
        delay_ms: i64,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE workflow_steps SET status = 'pending', error = $3 WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(error)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE workflows SET attempt = attempt + 1, next_run_at = $2, lease_owner = NULL,
                 lease_until = NULL, updated_at = $3 WHERE id = $1",
        )
        .bind(wf)
        .bind(now + delay_ms)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let msg = format!(
            "{name} failed, retrying in {:.1}s: {error}",
            delay_ms as f64 / 1000.0
        );
        let ev = event(&mut tx, wf, Some(name), "step_retry", &msg).await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Records a permanent failure of step `idx` and turns the workflow to undoing its done steps.
    pub async fn begin_undo(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        error: &str,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE workflow_steps SET status = 'failed', error = $3, finished_at = $4
             WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(error)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0, error = $3,
                 updated_at = $4 WHERE id = $1",
        )
        .bind(wf)
        .bind(i64::from(idx) - 1)
        .bind(format!("{name}: {error}"))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        event(
            &mut tx,
            wf,
            Some(name),
            "step_failed",
            &format!("{name} failed: {error}"),
        )
        .await?;
        let ev = event(&mut tx, wf, None, "undo_started", "undoing completed steps").await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Records that the done step `idx` was undone; the next one to undo is `idx - 1`.
    pub async fn step_undone(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE workflow_steps SET status = 'undone', finished_at = $3
             WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE workflows SET step = $2, attempt = 0, updated_at = $3 WHERE id = $1")
            .bind(wf)
            .bind(i64::from(idx) - 1)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let ev = event(
            &mut tx,
            wf,
            Some(name),
            "step_undone",
            &format!("{name} undone"),
        )
        .await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Ends a workflow and applies its outcome to its VM in the same transaction:
    /// create ok → running; create failed → failed with the reason, address and quota released;
    /// delete ok → the record is gone (address and quota free); delete failed → failed.
    pub async fn finish_workflow(
        &self,
        wf: &str,
        node: &str,
        outcome: &WorkflowOutcome,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let w = Self::load_workflow(&mut tx, wf)
            .await?
            .ok_or_else(|| lease_lost(wf))?;
        let now = now_ms();
        let (status, err) = match outcome {
            WorkflowOutcome::Succeeded => ("succeeded", None),
            WorkflowOutcome::Failed(e) => ("failed", Some(e.as_str())),
        };
        sqlx::query(
            "UPDATE workflows SET status = $2, error = COALESCE($3, error), lease_owner = NULL,
                 lease_until = NULL, updated_at = $4, finished_at = $4 WHERE id = $1",
        )
        .bind(wf)
        .bind(status)
        .bind(err)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Some(vm_id) = &w.vm_id {
            let vm = sqlx::query("SELECT * FROM vms WHERE id = $1")
                .bind(vm_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| vm_from(&r))
                .transpose()?;
            if let Some(vm) = vm {
                let target = format!("{}/{}", vm.owner, vm.name);
                let actor = Actor::engine();
                match (w.kind, outcome) {
                    (WorkflowKind::CreateVm, WorkflowOutcome::Succeeded) => {
                        sqlx::query("UPDATE vms SET status = 'running', error = NULL, updated_at = $2 WHERE id = $1")
                            .bind(vm_id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        record(
                            &mut tx,
                            &actor,
                            "vm.create",
                            &target,
                            "ok",
                            vm.ip_address.map(|i| i.to_string()).as_deref(),
                        )
                        .await?;
                    }
                    (WorkflowKind::CreateVm, WorkflowOutcome::Failed(e)) => {
                        sqlx::query("UPDATE vms SET status = 'failed', error = $2, ip = NULL, updated_at = $3 WHERE id = $1")
                            .bind(vm_id)
                            .bind(e)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        record(&mut tx, &actor, "vm.create", &target, "failed", Some(e)).await?;
                    }
                    (WorkflowKind::DeleteVm, WorkflowOutcome::Succeeded) => {
                        sqlx::query("UPDATE workflows SET vm_id = NULL WHERE vm_id = $1")
                            .bind(vm_id)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM vms WHERE id = $1")
                            .bind(vm_id)
                            .execute(&mut *tx)
                            .await?;
                        record(&mut tx, &actor, "vm.delete", &target, "ok", None).await?;
                    }
                    (WorkflowKind::DeleteVm, WorkflowOutcome::Failed(e)) => {
                        let msg = format!("delete failed: {e}; run delete-vm again");
                        sqlx::query("UPDATE vms SET status = 'failed', error = $2, updated_at = $3 WHERE id = $1")
                            .bind(vm_id)
                            .bind(&msg)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        record(&mut tx, &actor, "vm.delete", &target, "failed", Some(e)).await?;
                    }
                }
            }
        }
        let msg = match outcome {
            WorkflowOutcome::Succeeded => format!("{} succeeded", w.kind),
            WorkflowOutcome::Failed(e) => format!("{} failed: {e}", w.kind),
        };
        let ev = event(&mut tx, wf, None, status, &msg).await?;
        tx.commit().await?;
        Ok(ev)
    }
}
