//! Persisted workflows: the engine's queue, step ledger, effect outbox and event log.
//!
//! Every transition is guarded by the lease: a write names the node that holds the workflow,
//! and a node whose lease expired (and was taken over) gets `LeaseLost` instead of writing.
//! The lease is a fencing token checked inside each transition's transaction, so a node that
//! stalls past its lease can still finish running a step but can never record its outcome.

use crate::audit::record;
use crate::hooks::{Registry, RetryCtx};
use crate::db::sqlite::run_sqlx as run_async;
use crate::db::{Cols, Stmt, stmt};
use crate::{Actor, Result, Store, StoreError, now_ms, parse};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

pub use basphere_core::{ResourceRef, StepStatus, WorkflowStatus};

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
    /// Stable across attempts, restarts and nodes: `<workflow id>/<idx>/<name>`.
    pub idem_key: String,
    /// When the current (or last) attempt's deadline expires.
    pub deadline_at: Option<i64>,
    /// What the step reported when it finished, if anything.
    pub output: Option<serde_json::Value>,
}

/// A workflow (an "operation" to users) with its steps.
#[derive(Debug, Clone, Serialize)]
pub struct Workflow {
    pub id: String,
    /// The engine definition that runs the steps (`create_vm`, `delete_vm`, or any registered).
    pub definition: String,
    /// What it acts on, if anything (cleared when the resource is gone).
    pub resource: Option<ResourceRef>,
    /// The workflow whose step spawned this one.
    pub parent_id: Option<String>,
    pub owner: String,
    pub status: WorkflowStatus,
    /// Forward: the next step to run. Undoing: the next step to undo.
    pub step: i64,
    pub attempt: u32,
    pub priority: i64,
    pub error: Option<String>,
    pub input: serde_json::Value,
    pub cancel_requested: bool,
    pub batch_id: Option<String>,
    /// The node name within its batch.
    pub node: Option<String>,
    /// Dependencies (batch edges) that have not ended yet.
    pub waiting_on: i64,
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
    /// `queued`, `step_started`, `step_done`, `step_retry`, `step_failed`, `undo_started`,
    /// `step_undone`, `cancel_requested`, `retried`, `skipped`, `succeeded`, `failed`,
    /// `cancelled`.
    pub kind: String,
    pub message: String,
}

/// How a workflow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkflowOutcome {
    Succeeded,
    Failed(String),
    /// Cancelled on request (after its done steps were undone).
    Cancelled(String),
}

impl WorkflowOutcome {
    /// The status a workflow ending this way records.
    pub fn status(&self) -> WorkflowStatus {
        match self {
            Self::Succeeded => WorkflowStatus::Succeeded,
            Self::Failed(_) => WorkflowStatus::Failed,
            Self::Cancelled(_) => WorkflowStatus::Cancelled,
        }
    }
}

/// A workflow to queue.
#[derive(Debug, Clone)]
pub struct NewWorkflow {
    /// The engine definition that runs it.
    pub definition: String,
    pub resource: Option<ResourceRef>,
    pub owner: String,
    /// Higher runs first (deletes 10, admins 5, others 0).
    pub priority: i64,
    pub input: serde_json::Value,
    pub steps: Vec<String>,
    /// Key of the per-provider concurrency limit.
    pub provider: Option<String>,
    /// Key of the per-host concurrency limit.
    pub host: Option<String>,
    /// Batch id and node name.
    pub batch: Option<(String, String)>,
}

impl NewWorkflow {
    pub fn new(
        definition: impl Into<String>,
        owner: impl Into<String>,
        steps: Vec<String>,
    ) -> Self {
        Self {
            definition: definition.into(),
            resource: None,
            owner: owner.into(),
            priority: 0,
            input: serde_json::json!({}),
            steps,
            provider: None,
            host: None,
            batch: None,
        }
    }
}

/// Concurrency limits applied when claiming (`None`: unlimited). Counted over workflows whose
/// lease is live, on every node sharing the database.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClaimLimits {
    pub per_user: Option<u32>,
    pub per_provider: Option<u32>,
    pub per_host: Option<u32>,
}

/// What a finished step commits together with its completion.
#[derive(Debug, Clone, Default)]
pub struct StepCommit {
    /// Recorded on the step (`output`).
    pub output: Option<serde_json::Value>,
    /// Appended to the effect outbox (`step_effects`) in the same transaction: (key, payload).
    pub effects: Vec<(String, serde_json::Value)>,
    /// Child workflows queued in the same transaction. The parent then waits, unleased, until
    /// every child has ended; its next step runs after that.
    pub children: Vec<NewWorkflow>,
}

/// The step to start right after one finishes (saves a transaction per step).
#[derive(Debug, Clone, Copy)]
pub struct NextStep<'a> {
    pub idx: u32,
    pub name: &'a str,
    pub deadline_ms: i64,
}

/// Why a workflow cannot be cancelled or retried.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("operation {0} not found")]
    NotFound(String),
    #[error("operation {0} is {1}; {2}")]
    State(String, WorkflowStatus, &'static str),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        OpError::Store(e.into())
    }
}

/// Why [`Store::reopen_for_undo`] could not take a workflow back now.
#[derive(Debug, thiserror::Error)]
pub enum Reopen {
    /// It is still running (a cancel was asked for) or another node is undoing it: try later.
    #[error("operation {0} is still running or being undone elsewhere; try again shortly")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for Reopen {
    fn from(e: sqlx::Error) -> Self {
        Reopen::Store(e.into())
    }
}

/// One committed effect of a step (see [`StepCommit::effects`]).
#[derive(Debug, Clone, Serialize)]
pub struct StepEffect {
    pub seq: i64,
    pub workflow_id: String,
    pub idx: u32,
    pub key: String,
    pub payload: serde_json::Value,
}

pub(crate) async fn insert_new(conn: &mut SqliteConnection, w: &NewWorkflow) -> Result<String> {
    let id = uuid::Uuid::now_v7().to_string();
    run_async(conn, &insert_stmts(w, &id, None, now_ms())).await?;
    Ok(id)
}

/// Queues `w` as workflow `id` (a child of `parent`, if given): its row, its steps and its
/// `queued` event.
pub(crate) fn insert_stmts(w: &NewWorkflow, id: &str, parent: Option<&str>, now: i64) -> Vec<Stmt> {
    let mut out = Vec::with_capacity(w.steps.len() + 2);
    out.push(stmt!(
        "INSERT INTO workflows (id, definition, resource_kind, resource_id, parent_id, owner,
            status, priority, input, next_run_at, created_at, updated_at, provider, host,
            batch_id, node)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, $9, $9, $10, $11, $12, $13)",
        id,
        w.definition.as_str(),
        w.resource.as_ref().map(|r| r.kind.as_str()),
        w.resource.as_ref().map(|r| r.id.as_str()),
        parent,
        w.owner.as_str(),
        w.priority,
        w.input.to_string(),
        now,
        w.provider.as_deref(),
        w.host.as_deref(),
        w.batch.as_ref().map(|b| b.0.as_str()),
        w.batch.as_ref().map(|b| b.1.as_str()),
    ));
    for (i, name) in w.steps.iter().enumerate() {
        out.push(stmt!(
            "INSERT INTO workflow_steps (workflow_id, idx, name, status, idem_key)
             VALUES ($1, $2, $3, 'pending', $4)",
            id,
            i as i64,
            name.as_str(),
            format!("{id}/{i}/{name}"),
        ));
    }
    out.push(stmt!(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES ($1, $2, NULL, 'queued', $3)",
        id,
        now,
        format!("{} queued", w.definition),
    ));
    out
}

/// A batch's free slots: its parallelism less its unparked nodes that have not ended (three
/// equality counts: an `IN` list would make SQLite build a table on every run). Shared with
/// the write thread (`commit`), like the two statements below.
pub(crate) const FREE_SLOTS: &str =
    "SELECT COALESCE((SELECT parallelism FROM batches WHERE id = $1), 0)
     - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'pending')
     - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'running')
     - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'undoing')";
/// A batch's ready parked nodes, in queue order.
pub(crate) const PARKED_READY: &str = "SELECT id FROM workflows
     WHERE batch_id = $1 AND parked = 1 AND status = 'pending' AND waiting_on = 0 ORDER BY rowid";
pub(crate) const UNPARK: &str = "UPDATE workflows SET parked = 0 WHERE id = $1";

/// Hands free slots of batch `batch` to its ready parked nodes (in queue order).
pub(crate) async fn fill_batch(conn: &mut SqliteConnection, batch: &str) -> Result<()> {
    let free: i64 = sqlx::query_scalar(FREE_SLOTS)
        .bind(batch)
        .fetch_one(&mut *conn)
        .await?;
    if free <= 0 {
        return Ok(());
    }
    let ids: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("{PARKED_READY} LIMIT $2")))
            .bind(batch)
            .bind(free)
            .fetch_all(&mut *conn)
            .await?;
    for id in ids {
        sqlx::query(UNPARK).bind(id).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Adds the edge `wf` runs after `depends_on`; counts it while `depends_on` has not ended.
pub(crate) async fn add_dep(
    conn: &mut SqliteConnection,
    wf: &str,
    depends_on: &str,
    hard: bool,
) -> Result<()> {
    sqlx::query("INSERT INTO workflow_deps (workflow_id, depends_on, hard) VALUES ($1, $2, $3)")
        .bind(wf)
        .bind(depends_on)
        .bind(hard as i64)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE workflows SET waiting_on = waiting_on + 1 WHERE id = $1
           AND (SELECT status FROM workflows WHERE id = $2) IN ('pending', 'running', 'undoing')",
    )
    .bind(wf)
    .bind(depends_on)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(crate) async fn event(
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

fn event_from(r: &SqliteRow) -> Result<WorkflowEvent> {
    Ok(WorkflowEvent {
        seq: r.try_get("seq")?,
        operation_id: r.try_get("workflow_id")?,
        at: r.try_get("at")?,
        step: r.try_get("step")?,
        kind: r.try_get("kind")?,
        message: r.try_get("message")?,
    })
}

pub(crate) fn step_from(r: &impl Cols) -> Result<StepRecord> {
    Ok(StepRecord {
        idx: r.int("idx")? as u32,
        name: r.text("name")?,
        status: parse("workflow_steps.status", &r.text("status")?)?,
        attempts: r.int("attempts")? as u32,
        error: r.opt_text("error")?,
        started_at: r.opt_int("started_at")?,
        finished_at: r.opt_int("finished_at")?,
        idem_key: r.opt_text("idem_key")?.unwrap_or_default(),
        deadline_at: r.opt_int("deadline_at")?,
        output: r
            .opt_text("output")?
            .and_then(|o| serde_json::from_str(&o).ok()),
    })
}

/// The lease on a workflow was lost to another node (or the workflow vanished).
pub(crate) fn lease_lost(wf: &str) -> StoreError {
    StoreError::LeaseLost(wf.to_string())
}

impl StoreError {
    /// Whether this error means another node now owns the workflow.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, StoreError::LeaseLost(_))
    }
}

pub(crate) fn resource_from(r: &impl Cols) -> Result<Option<ResourceRef>> {
    Ok(
        match (r.opt_text("resource_kind")?, r.opt_text("resource_id")?) {
            (Some(kind), Some(id)) => Some(ResourceRef { kind, id }),
            _ => None,
        },
    )
}

pub(crate) fn workflow_from(r: &impl Cols, steps: Vec<StepRecord>) -> Result<Workflow> {
    Ok(Workflow {
        id: r.text("id")?,
        definition: r.opt_text("definition")?.unwrap_or_default(),
        resource: resource_from(r)?,
        parent_id: r.opt_text("parent_id")?,
        owner: r.text("owner")?,
        status: parse("workflows.status", &r.text("status")?)?,
        step: r.int("step")?,
        attempt: r.int("attempt")? as u32,
        priority: r.int("priority")?,
        error: r.opt_text("error")?,
        input: serde_json::from_str(&r.text("input")?).unwrap_or(serde_json::Value::Null),
        cancel_requested: r.int("cancel_requested")? != 0,
        batch_id: r.opt_text("batch_id")?,
        node: r.opt_text("node")?,
        waiting_on: r.int("waiting_on")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
        finished_at: r.opt_int("finished_at")?,
        steps,
    })
}

/// A claimed workflow, the events of its claim, and whether the claim started its step.
pub type Claimed = (Workflow, Vec<WorkflowEvent>, bool);

/// A finishing batch node hands its slot to the next ready node of its batch: leased to the
/// same node in the finishing transaction, its first step started with `deadline_ms`.
#[derive(Clone)]
pub struct Handoff {
    pub lease_ms: i64,
    #[allow(clippy::type_complexity)]
    pub deadline_ms: std::sync::Arc<dyn Fn(&Workflow) -> Option<i64> + Send + Sync>,
}

pub(crate) const WF_COLS: &str =
    "id, definition, resource_kind, resource_id, parent_id, owner, status, step, attempt, priority, error, input,
    cancel_requested, batch_id, node, waiting_on, created_at, updated_at, finished_at";

impl Store {
    pub(crate) async fn load_workflow(
        conn: &mut SqliteConnection,
        id: &str,
    ) -> Result<Option<Workflow>> {
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
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(workflow_from(&r, steps)?))
    }

    /// One workflow with its steps.
    pub async fn workflow(&self, id: &str) -> Result<Option<Workflow>> {
        let mut c = self.lg()?.pool.acquire().await?;
        Self::load_workflow(&mut c, id).await
    }

    /// Recent workflows of `owner` (or everyone), newest first.
    pub async fn workflows(&self, owner: Option<&str>, limit: i64) -> Result<Vec<Workflow>> {
        self.workflows_page(owner, None, limit).await
    }

    /// One page of the workflows of `owner` (or everyone), newest first (ids are UUIDv7): at
    /// most `limit` older than id `after`.
    pub async fn workflows_page(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Workflow>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM workflows WHERE ($1 IS NULL OR owner = $1) AND ($2 IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(owner)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        self.load_many(ids).await
    }

    /// The workflows of a batch, in the order they were queued (two queries in all).
    pub async fn batch_workflows(&self, batch: &str) -> Result<Vec<Workflow>> {
        let mut c = self.lg()?.pool.acquire().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WF_COLS} FROM workflows WHERE batch_id = $1 ORDER BY created_at, rowid"
        )))
        .bind(batch)
        .fetch_all(&mut *c)
        .await?;
        let mut steps: std::collections::HashMap<String, Vec<StepRecord>> = Default::default();
        for r in sqlx::query(
            "SELECT s.* FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id
             WHERE w.batch_id = $1 ORDER BY s.workflow_id, s.idx",
        )
        .bind(batch)
        .fetch_all(&mut *c)
        .await?
        {
            let wf: String = r.try_get("workflow_id")?;
            steps.entry(wf).or_default().push(step_from(&r)?);
        }
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                workflow_from(r, steps.remove(&id).unwrap_or_default())
            })
            .collect()
    }

    async fn load_many(&self, ids: Vec<String>) -> Result<Vec<Workflow>> {
        let mut c = self.lg()?.pool.acquire().await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(w) = Self::load_workflow(&mut c, &id).await? {
                out.push(w);
            }
        }
        Ok(out)
    }

    /// Queues a workflow of any kind (VM workflows are queued by admission instead).
    pub async fn enqueue_workflow(&self, w: &NewWorkflow) -> Result<String> {
        let mut tx = self.write().await?;
        let id = insert_new(&mut tx, w).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Queues many workflows in one transaction (benchmarks, batches of custom kinds), with
    /// edges between them given as (dependent index, dependency index, hard).
    pub async fn enqueue_workflows(
        &self,
        ws: &[NewWorkflow],
        edges: &[(usize, usize, bool)],
    ) -> Result<Vec<String>> {
        let mut tx = self.write().await?;
        let mut ids = Vec::with_capacity(ws.len());
        for w in ws {
            ids.push(insert_new(&mut tx, w).await?);
        }
        for &(a, b, hard) in edges {
            add_dep(&mut tx, &ids[a], &ids[b], hard).await?;
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Events of a workflow after `after_seq`, in order.
    pub async fn events(&self, id: &str, after_seq: i64) -> Result<Vec<WorkflowEvent>> {
        let rows = sqlx::query(
            "SELECT seq, workflow_id, at, step, kind, message FROM workflow_events
             WHERE workflow_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id)
        .bind(after_seq)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(event_from).collect()
    }

    /// Every workflow's events after `after_seq`, oldest first, at most `limit`.
    pub async fn events_since(&self, after_seq: i64, limit: i64) -> Result<Vec<WorkflowEvent>> {
        let rows = sqlx::query(
            "SELECT seq, workflow_id, at, step, kind, message FROM workflow_events
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(event_from).collect()
    }

    /// The newest event's sequence number (0 when there is none).
    pub async fn last_event_seq(&self) -> Result<i64> {
        let s: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM workflow_events")
            .fetch_one(&self.lg()?.pool)
            .await?;
        Ok(s.unwrap_or(0))
    }

    /// Effects committed by a workflow's steps, in commit order.
    pub async fn step_effects(&self, wf: &str) -> Result<Vec<StepEffect>> {
        let rows = sqlx::query(
            "SELECT seq, workflow_id, idx, key, payload FROM step_effects
             WHERE workflow_id = $1 ORDER BY seq",
        )
        .bind(wf)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let p: String = r.try_get("payload")?;
                Ok(StepEffect {
                    seq: r.try_get("seq")?,
                    workflow_id: r.try_get("workflow_id")?,
                    idx: r.try_get::<i64, _>("idx")? as u32,
                    key: r.try_get("key")?,
                    payload: serde_json::from_str(&p).unwrap_or(serde_json::Value::Null),
                })
            })
            .collect()
    }

    /// Claims the most urgent runnable workflow for `node` with a lease of `lease_ms`.
    ///
    /// Runnable: unfinished, due, not leased (or its lease expired), its batch dependencies
    /// ended and a batch slot given (`parked = 0`) — or a cancel was asked for, which needs
    /// neither. Among those, one whose user, provider and host are under their concurrency
    /// limits; highest priority first, then oldest. Claiming a workflow claims its next step:
    /// steps of one workflow run in order, so the workflow's lease is the step's lease.
    ///
    /// SQLite: `BEGIN IMMEDIATE` makes the select-then-update one serialized write.
    /// PostgreSQL: the SELECTs end with `FOR UPDATE SKIP LOCKED` so concurrent claimers pass
    /// over each other's rows instead of waiting, then the same UPDATE; the limit counts there
    /// are per-snapshot, so a limit can be overshot by at most one workflow per concurrently
    /// claiming node unless the claim also takes `pg_advisory_xact_lock` on the limit keys.
    pub async fn claim_workflow(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
    ) -> Result<Option<Workflow>> {
        Ok(self
            .claim_and_start(node, lease_ms, limits, &|_| None)
            .await?
            .map(|c| c.0))
    }

    /// [`Store::claim_workflow`], and in the same transaction starts the claimed workflow's
    /// next step when `deadline_ms(&workflow)` gives its deadline (not when undoing or
    /// cancelling). Returns the workflow as it is after that, the events, and whether it
    /// started the step.
    pub async fn claim_and_start(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        deadline_ms: &(dyn Fn(&Workflow) -> Option<i64> + Send + Sync),
    ) -> Result<Option<(Workflow, Vec<WorkflowEvent>, bool)>> {
        Ok(self
            .claim_many(node, lease_ms, limits, 1, deadline_ms)
            .await?
            .pop())
    }

    /// Claims up to `max` workflows in one transaction (see [`Store::claim_and_start`]).
    /// With any concurrency limit set it claims one: the limit sets are computed per query.
    #[allow(clippy::type_complexity)]
    pub async fn claim_many(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        max: usize,
        deadline_ms: &(dyn Fn(&Workflow) -> Option<i64> + Send + Sync),
    ) -> Result<Vec<(Workflow, Vec<WorkflowEvent>, bool)>> {
        let limited =
            limits.per_user.is_some() || limits.per_provider.is_some() || limits.per_host.is_some();
        let max = if limited { 1 } else { max.max(1) } as i64;
        let now = now_ms();
        let mut tx = self.write().await?;
        // A cancel needs no dependency or slot: those first.
        let mut ids: Vec<String> = sqlx::query_scalar(
            "SELECT w.id FROM workflows w
             WHERE w.cancel_requested = 1 AND w.status IN ('pending', 'running', 'undoing')
               AND (w.lease_owner IS NULL OR w.lease_until < $1)
             ORDER BY w.priority DESC, w.created_at LIMIT $2",
        )
        .bind(now)
        .bind(max)
        .fetch_all(&mut *tx)
        .await?;
        if (ids.len() as i64) < max {
            // Ready workflows in priority order (the partial index `workflows_ready`); the
            // limits exclude keys already at their maximum, each set computed once.
            let mut sql = String::from(
                "SELECT w.id FROM workflows w
                 WHERE w.status IN ('pending', 'running', 'undoing') AND w.waiting_on = 0
                   AND w.parked = 0 AND w.next_run_at <= $1
                   AND (w.lease_owner IS NULL OR w.lease_until < $1)
                   AND w.cancel_requested = 0",
            );
            for (col, n, lim) in [
                ("owner", 2, limits.per_user),
                ("provider", 3, limits.per_provider),
                ("host", 4, limits.per_host),
            ] {
                if lim.is_some() {
                    sql.push_str(&format!(
                        " AND (w.{col} IS NULL OR w.{col} NOT IN (SELECT o.{col} FROM workflows o
                           WHERE o.status IN ('pending', 'running', 'undoing')
                             AND o.waiting_on = 0 AND o.parked = 0
                             AND o.lease_until >= $1 AND o.{col} IS NOT NULL
                           GROUP BY o.{col} HAVING COUNT(*) >= ${n}))"
                    ));
                }
            }
            sql.push_str(" ORDER BY w.priority DESC, w.created_at LIMIT $5");
            sql.push_str(" /* PostgreSQL: FOR UPDATE SKIP LOCKED */");
            let more: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind(limits.per_user.map(i64::from))
                .bind(limits.per_provider.map(i64::from))
                .bind(limits.per_host.map(i64::from))
                .bind(max - ids.len() as i64)
                .fetch_all(&mut *tx)
                .await?;
            ids.extend(more);
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let c = Self::lease_in(
                &mut tx,
                &format!("id = $4 RETURNING {WF_COLS}"),
                &id,
                node,
                now + lease_ms,
                now,
                deadline_ms,
            )
            .await?;
            out.extend(c);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Leases to `node` the workflow that `filter` (the rest of an `UPDATE … WHERE`, binding
    /// the workflow or batch as `$4`, ending in `RETURNING` the workflow's columns) selects,
    /// loads its steps and starts the next one when `deadline_ms` gives its deadline.
    pub(crate) async fn lease_in(
        conn: &mut SqliteConnection,
        filter: &str,
        key: &str,
        node: &str,
        lease_until: i64,
        now: i64,
        deadline_ms: &(dyn Fn(&Workflow) -> Option<i64> + Send + Sync),
    ) -> Result<Option<Claimed>> {
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE workflows SET lease_owner = $1, lease_until = $2, updated_at = $3,
                 status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
             WHERE {filter}"
        )))
        .bind(node)
        .bind(lease_until)
        .bind(now)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        let steps = sqlx::query("SELECT * FROM workflow_steps WHERE workflow_id = $1 ORDER BY idx")
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(step_from)
            .collect::<Result<Vec<_>>>()?;
        let mut wf = workflow_from(&row, steps)?;
        let mut evs = vec![];
        let mut started = false;
        let runnable = matches!(wf.status, WorkflowStatus::Running) && !wf.cancel_requested;
        if let (true, Some(i)) = (runnable, usize::try_from(wf.step).ok())
            && i < wf.steps.len()
            && let Some(d) = deadline_ms(&wf)
        {
            let rec = &mut wf.steps[i];
            evs.push(Self::mark_started(conn, &id, rec.idx, &rec.name, d, now).await?);
            rec.status = StepStatus::Running;
            rec.attempts += 1;
            rec.started_at = Some(now);
            rec.deadline_at = Some(now + d);
            started = true;
        }
        Ok(Some((wf, evs, started)))
    }

    /// Milliseconds until the next workflow becomes due, if any is waiting.
    pub async fn next_due_in(&self) -> Result<Option<i64>> {
        let t: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN lease_owner IS NULL THEN next_run_at
                             ELSE MAX(next_run_at, lease_until) END)
             FROM workflows WHERE status IN ('pending', 'running', 'undoing')
               AND waiting_on = 0 AND parked = 0",
        )
        .fetch_one(&self.lg()?.pool)
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
                .execute(&self.lg()?.pool)
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
        .execute(&self.lg()?.pool)
        .await?
        .rows_affected())
    }

    /// Gives a claimed workflow back without changing it (e.g. its kind is unknown here).
    pub async fn release_workflow(&self, wf: &str, node: &str, delay_ms: i64) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "UPDATE workflows SET lease_owner = NULL, lease_until = NULL, next_run_at = $3
             WHERE id = $1 AND lease_owner = $2",
        )
        .bind(wf)
        .bind(node)
        .bind(now + delay_ms)
        .execute(&self.lg()?.pool)
        .await?;
        Ok(())
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

    async fn mark_started(
        conn: &mut SqliteConnection,
        wf: &str,
        idx: u32,
        name: &str,
        deadline_ms: i64,
        now: i64,
    ) -> Result<WorkflowEvent> {
        sqlx::query(
            "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1, started_at = $3,
                 deadline_at = $4
             WHERE workflow_id = $1 AND idx = $2",
        )
        .bind(wf)
        .bind(i64::from(idx))
        .bind(now)
        .bind(now + deadline_ms)
        .execute(&mut *conn)
        .await?;
        event(
            conn,
            wf,
            Some(name),
            "step_started",
            &format!("{name} started"),
        )
        .await
    }

    /// Records that step `idx` starts (one more attempt) with a deadline `deadline_ms` away.
    pub async fn step_started(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        deadline_ms: i64,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let ev = Self::mark_started(&mut tx, wf, idx, name, deadline_ms, now_ms()).await?;
        tx.commit().await?;
        Ok(ev)
    }

    /// Records that step `idx` finished — with its output and effects, atomically — moves the
    /// workflow on, and starts `next` in the same transaction. Returns the events and whether
    /// a cancel was requested meanwhile (then `next` was not started).
    pub async fn step_done(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        commit: &StepCommit,
        next: Option<NextStep<'_>>,
    ) -> Result<(Vec<WorkflowEvent>, bool)> {
        self.step_done_then(wf, idx, name, node, commit, next, false)
            .await
    }

    /// [`Store::step_done`]; with `finish` (and no `next`) the workflow also ends succeeded in
    /// the same transaction unless a cancel was requested — one commit for the last step.
    /// Completions arriving together share one transaction (see the `commit` module).
    #[allow(clippy::too_many_arguments)]
    pub async fn step_done_then(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        commit: &StepCommit,
        next: Option<NextStep<'_>>,
        finish: bool,
    ) -> Result<(Vec<WorkflowEvent>, bool)> {
        let (evs, cancel, _) = self
            .step_done_handoff(wf, idx, name, node, commit, next, finish, None)
            .await?;
        Ok((evs, cancel))
    }

    /// [`Store::step_done_then`]; with a `handoff`, a finishing batch node also leases the
    /// next ready node of its batch to `node` in the same transaction and returns it (claimed
    /// as by [`Store::claim_many`]). Use it only when no concurrency limit is set.
    #[allow(clippy::too_many_arguments)]
    pub async fn step_done_handoff(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        commit: &StepCommit,
        next: Option<NextStep<'_>>,
        finish: bool,
        handoff: Option<Handoff>,
    ) -> Result<(Vec<WorkflowEvent>, bool, Option<Claimed>)> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = crate::commit::DoneJob {
            wf: wf.to_string(),
            idx,
            name: name.to_string(),
            node: node.to_string(),
            commit: commit.clone(),
            next: next.map(|n| (n.idx, n.name.to_string(), n.deadline_ms)),
            finish,
            handoff,
            reply,
        };
        match &self.db {
            crate::db::Db::Sqlite(d) => d.send(crate::commit::Job::Done(job))?,
            crate::db::Db::Postgres(_) => return Err(StoreError::Unsupported("step completion")),
        }
        rx.await
            .map_err(|_| StoreError::Corrupt("store", "the committer stopped".into()))?
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
            "UPDATE workflows SET attempt = attempt + 1, lease_owner = NULL, lease_until = NULL,
                 next_run_at = CASE WHEN cancel_requested = 1 THEN $3 ELSE $2 END,
                 updated_at = $3 WHERE id = $1",
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

    /// Turns a cancelled workflow to undoing, starting with step `undo_from` (the last done).
    pub async fn begin_cancel(
        &self,
        wf: &str,
        node: &str,
        undo_from: i64,
        reason: &str,
    ) -> Result<WorkflowEvent> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE workflow_steps SET status = 'skipped'
             WHERE workflow_id = $1 AND status IN ('pending', 'running')",
        )
        .bind(wf)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0, error = $3,
                 updated_at = $4 WHERE id = $1",
        )
        .bind(wf)
        .bind(undo_from)
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let ev = event(
            &mut tx,
            wf,
            None,
            "undo_started",
            &format!("{reason}; undoing completed steps"),
        )
        .await?;
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

    /// Asks for a workflow to be cancelled. The engine stops it at the next step boundary (a
    /// running step finishes or reaches its deadline first), undoes its done steps in reverse
    /// and ends it `cancelled`; batch dependents that require it are skipped.
    pub async fn request_cancel(
        &self,
        wf: &str,
        actor: &Actor,
    ) -> std::result::Result<WorkflowEvent, OpError> {
        let mut tx = self.write().await?;
        let w = Self::load_workflow(&mut tx, wf)
            .await?
            .ok_or_else(|| OpError::NotFound(wf.to_string()))?;
        if w.status.is_terminal() {
            return Err(OpError::State(
                wf.into(),
                w.status,
                "there is nothing to cancel",
            ));
        }
        if w.status == WorkflowStatus::Undoing {
            return Err(OpError::State(
                wf.into(),
                w.status,
                "it is already being rolled back",
            ));
        }
        if w.cancel_requested {
            return Err(OpError::Refused(format!(
                "operation {wf} is already being cancelled"
            )));
        }
        if let Some(h) = self.hooks.get(&w.definition) {
            h.0.cancellable(&w).map_err(OpError::Refused)?;
        }
        sqlx::query(
            "UPDATE workflows SET cancel_requested = 1,
                 next_run_at = CASE WHEN next_run_at < $2 THEN next_run_at ELSE $2 END
             WHERE id = $1",
        )
        .bind(wf)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let ev = event(
            &mut tx,
            wf,
            None,
            "cancel_requested",
            &format!("cancel requested by {}", actor.name),
        )
        .await?;
        record(
            &mut tx,
            actor,
            "operation.cancel",
            wf,
            "accepted",
            Some(&w.definition),
        )
        .await?;
        tx.commit().await?;
        Ok(ev)
    }

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
            let w = Self::load_workflow(&mut tx, &id)
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
                    None,
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

    /// Ends a workflow; its definition's hooks apply the outcome to its resource in the same
    /// transaction (see `vms` for a VM's), and a child's parent stops waiting for it. In a batch, dependents waiting on it are released (success, or a soft edge) or skipped
    /// (a hard edge to a failed or cancelled node), transitively, in the same transaction.
    /// Returns the events written, the workflow's final one first.
    pub async fn finish_workflow(
        &self,
        wf: &str,
        node: &str,
        outcome: &WorkflowOutcome,
    ) -> Result<Vec<WorkflowEvent>> {
        let mut tx = self.write().await?;
        Self::guard(&mut tx, wf, node).await?;
        let evs = finish_in(&mut tx, &self.hooks, wf, outcome).await?;
        tx.commit().await?;
        Ok(evs)
    }

    /// Registers what ending or retrying a workflow of `definition` does to its resource.
    pub fn set_hooks(&self, definition: &str, hooks: crate::Hooks) {
        self.hooks.set(definition, hooks);
    }

    /// The children a workflow's steps spawned, in the order they were queued.
    pub async fn children(&self, parent: &str) -> Result<Vec<Workflow>> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM workflows WHERE parent_id = $1 ORDER BY id")
                .bind(parent)
                .fetch_all(&self.lg()?.pool)
                .await?;
        self.load_many(ids).await
    }

    /// Takes a workflow back so `node` can undo its done steps (a parent rolling back a child
    /// that succeeded): a succeeded one turns undoing, cancelled with `reason`, leased to
    /// `node`; an undoing one whose lease is free (or `node`'s) is leased to `node`. Returns it
    /// then, or `None` when there is nothing to undo (it failed or was cancelled: its own
    /// rollback ran). A workflow still running forward is asked to cancel and gives `Busy`.
    pub async fn reopen_for_undo(
        &self,
        wf: &str,
        node: &str,
        lease_ms: i64,
        reason: &str,
    ) -> std::result::Result<Option<Workflow>, Reopen> {
        let mut tx = self.write().await?;
        let w = Self::load_workflow(&mut tx, wf)
            .await?
            .ok_or_else(|| Reopen::Store(lease_lost(wf)))?;
        let now = now_ms();
        let free = w.status == WorkflowStatus::Undoing
            && sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM workflows WHERE id = $1
                   AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3)",
            )
            .bind(wf)
            .bind(node)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
                == 1;
        let last = w.steps.len() as i64 - 1;
        match w.status {
            WorkflowStatus::Failed | WorkflowStatus::Cancelled => return Ok(None),
            WorkflowStatus::Succeeded => {
                sqlx::query(
                    "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0, error = $3,
                         cancel_requested = 1, finished_at = NULL, updated_at = $4,
                         lease_owner = $5, lease_until = $6
                     WHERE id = $1",
                )
                .bind(wf)
                .bind(last)
                .bind(reason)
                .bind(now)
                .bind(node)
                .bind(now + lease_ms)
                .execute(&mut *tx)
                .await?;
                let ev = format!("{reason}; undoing completed steps");
                event(&mut tx, wf, None, "undo_started", &ev).await?;
            }
            WorkflowStatus::Undoing if free => {
                sqlx::query(
                    "UPDATE workflows SET lease_owner = $2, lease_until = $3 WHERE id = $1",
                )
                .bind(wf)
                .bind(node)
                .bind(now + lease_ms)
                .execute(&mut *tx)
                .await?;
            }
            WorkflowStatus::Undoing => return Err(Reopen::Busy(wf.to_string())),
            WorkflowStatus::Pending | WorkflowStatus::Running => {
                if !w.cancel_requested {
                    sqlx::query("UPDATE workflows SET cancel_requested = 1 WHERE id = $1")
                        .bind(wf)
                        .execute(&mut *tx)
                        .await?;
                    let msg = format!("cancel requested: {reason}");
                    event(&mut tx, wf, None, "cancel_requested", &msg).await?;
                }
                tx.commit().await?;
                return Err(Reopen::Busy(wf.to_string()));
            }
        }
        let w = Self::load_workflow(&mut tx, wf).await?;
        tx.commit().await?;
        Ok(w)
    }
}

/// The parts of a workflow that ending it needs.
pub(crate) struct Ending {
    pub id: String,
    pub definition: String,
    pub resource: Option<ResourceRef>,
    pub node: Option<String>,
    pub batch_id: Option<String>,
    pub has_parent: bool,
}

/// The columns [`Ending`] is read from.
pub(crate) const ENDING_COLS: &str =
    "definition, resource_kind, resource_id, node, batch_id, parent_id";

async fn ending(conn: &mut SqliteConnection, wf: &str) -> Result<Ending> {
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDING_COLS} FROM workflows WHERE id = $1"
    )))
    .bind(wf)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| lease_lost(wf))?;
    ending_from(&r, wf)
}

pub(crate) fn ending_from(r: &impl Cols, wf: &str) -> Result<Ending> {
    Ok(Ending {
        id: wf.to_string(),
        definition: r.opt_text("definition")?.unwrap_or_default(),
        resource: resource_from(r)?,
        node: r.opt_text("node")?,
        batch_id: r.opt_text("batch_id")?,
        has_parent: r.opt_text("parent_id")?.is_some(),
    })
}

/// Ends workflow `wf` inside the caller's (lease-guarded) transaction.
pub(crate) async fn finish_in(
    conn: &mut SqliteConnection,
    hooks: &Registry,
    wf: &str,
    outcome: &WorkflowOutcome,
) -> Result<Vec<WorkflowEvent>> {
    let now = now_ms();
    let status = outcome.status().as_str();
    let err = match outcome {
        WorkflowOutcome::Succeeded => None,
        WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e) => Some(e.as_str()),
    };
    // The end and what the rest of the ending needs, in one statement.
    let r = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE workflows SET status = $2, error = COALESCE($3, error), lease_owner = NULL,
             lease_until = NULL, updated_at = $4, finished_at = $4 WHERE id = $1
         RETURNING {ENDING_COLS}"
    )))
    .bind(wf)
    .bind(status)
    .bind(err)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| lease_lost(wf))?;
    let w = ending_from(&r, wf)?;
    finish_rest(conn, hooks, &w, outcome, now).await
}

/// The rest of an ending once the workflow row says so: the hooks, the event, the dependents
/// and the batch slots.
pub(crate) async fn finish_rest(
    conn: &mut SqliteConnection,
    hooks: &Registry,
    w: &Ending,
    outcome: &WorkflowOutcome,
    now: i64,
) -> Result<Vec<WorkflowEvent>> {
    let wf = w.id.as_str();
    let status = outcome.status().as_str();
    let msg = match outcome {
        WorkflowOutcome::Succeeded => format!("{} succeeded", w.definition),
        WorkflowOutcome::Failed(e) => format!("{} failed: {e}", w.definition),
        WorkflowOutcome::Cancelled(e) => format!("{} cancelled: {e}", w.definition),
    };
    let mut evs = vec![];
    run_async(conn, &hooks.ending(w, outcome, now)).await?;
    evs.push(event(conn, wf, None, status, &msg).await?);
    let failed = outcome != &WorkflowOutcome::Succeeded;
    let mut released = vec![];
    let touched = release_dependents(conn, hooks, w, failed, now, &mut evs, &mut released).await?;
    // Its slot, and dependents it released, go to the next ready nodes of their batches.
    let mut batches: Vec<String> = w.batch_id.iter().cloned().collect();
    let others: Vec<String> = if !failed {
        // The batches of the dependents a success released (from the release itself).
        released.sort_unstable();
        released.dedup();
        released.retain(|b| Some(b) != w.batch_id.as_ref());
        released
    } else if !touched {
        vec![]
    } else {
        sqlx::query_scalar(
        "SELECT DISTINCT w.batch_id FROM workflow_deps d JOIN workflows w ON w.id = d.workflow_id
         WHERE d.depends_on = $1 AND w.batch_id IS NOT NULL
           AND ($2 IS NULL OR w.batch_id <> $2)",
    )
        .bind(wf)
        .bind(w.batch_id.as_deref())
        .fetch_all(&mut *conn)
        .await?
    };
    batches.extend(others);
    for b in batches {
        fill_batch(conn, &b).await?;
    }
    Ok(evs)
}

/// Releases or skips the batch dependents of `w` (see [`Store::finish_workflow`]).
async fn release_dependents(
    conn: &mut SqliteConnection,
    hooks: &Registry,
    w: &Ending,
    failed: bool,
    now: i64,
    evs: &mut Vec<WorkflowEvent>,
    released: &mut Vec<String>,
) -> Result<bool> {
    // Whether any dependent may have changed (then their batches get a fill).
    let mut touched = failed;
    let mut queue = vec![(
        w.id.clone(),
        w.node.clone().unwrap_or_else(|| w.id.clone()),
        failed,
    )];
    while let Some((id, name, failed)) = queue.pop() {
        if failed {
            // Hard dependents are skipped; soft ones only lose an edge to wait on.
            let hard: Vec<String> = sqlx::query_scalar(
                "SELECT d.workflow_id FROM workflow_deps d JOIN workflows o ON o.id = d.workflow_id
                 WHERE d.depends_on = $1 AND d.hard = 1 AND o.status = 'pending'",
            )
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE workflows SET waiting_on = waiting_on - 1 WHERE status = 'pending'
                   AND id IN (SELECT workflow_id FROM workflow_deps WHERE depends_on = $1 AND hard = 0)",
            )
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            for d in hard {
                let dw = ending(conn, &d).await?;
                let reason = format!("skipped: requires {name}, which did not succeed");
                sqlx::query(
                    "UPDATE workflows SET status = 'cancelled', error = $2, updated_at = $3,
                         finished_at = $3, lease_owner = NULL, lease_until = NULL WHERE id = $1",
                )
                .bind(&d)
                .bind(&reason)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE workflow_steps SET status = 'skipped' WHERE workflow_id = $1 AND status = 'pending'",
                )
                .bind(&d)
                .execute(&mut *conn)
                .await?;
                let skipped = WorkflowOutcome::Cancelled(reason.clone());
                run_async(conn, &hooks.ending(&dw, &skipped, now)).await?;
                evs.push(event(conn, &d, None, "skipped", &reason).await?);
                evs.push(event(conn, &d, None, "cancelled", &reason).await?);
                queue.push((d, dw.node.unwrap_or_default(), true));
            }
        } else {
            let batches: Vec<Option<String>> = sqlx::query_scalar(
                "UPDATE workflows SET waiting_on = waiting_on - 1 WHERE status = 'pending'
                   AND id IN (SELECT workflow_id FROM workflow_deps WHERE depends_on = $1)
                 RETURNING batch_id",
            )
            .bind(&id)
            .fetch_all(&mut *conn)
            .await?;
            touched |= !batches.is_empty();
            released.extend(batches.into_iter().flatten());
        }
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renewing_a_lease_one_does_not_hold_is_lease_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db.sqlite"))
            .await
            .expect("open store");
        let e = store
            .renew_lease("no-such-workflow", "node-a", 1000)
            .await
            .expect_err("no node holds a lease on a missing workflow");
        assert!(
            matches!(&e, StoreError::LeaseLost(wf) if wf == "no-such-workflow"),
            "{e:?}"
        );
        assert!(e.is_lease_lost());
        store.close().await;
    }
}
