//! Persisted workflows: the engine's queue, step ledger, effect outbox and event log, written
//! once for both backends over `db::Tx`.
//!
//! Every transition is guarded by the lease: a write names the node that holds the workflow,
//! and a node whose lease expired (and was taken over) gets `LeaseLost` instead of writing.
//! The lease is a fencing token checked inside each transition's transaction, so a node that
//! stalls past its lease can still finish running a step but can never record its outcome.
//! On PostgreSQL every lease time is the database's clock (`clock`), never a replica's.
//!
//! `ledger` holds the transitions, `claims` the claims and leases, `handoff` a finishing batch
//! node's leases of the next nodes (with a slot, or ahead of one), `ending` what ending a
//! workflow writes, `retry` a retry, `reads` what reads workflows and the event log, `sets` the
//! set-wise statements they share, and `crate::commit` the group commit of step completions.

mod claims;
mod ending;
mod handoff;
mod ledger;
mod reads;
mod retry;
pub(crate) mod sets;
mod stats;

pub use stats::WorkflowCounts;

pub(crate) use claims::{LeaseNew, Leased, Start, lease_many};
pub(crate) use ending::{
    ENDING_COLS, Ending, SKIP_HELD, add_dep, ending_from, fill_batch_in, fill_stmts, finish_in,
    parked_queue, pass_slots, ready_nodes, release_stmt,
};
pub(crate) use handoff::{held_by, lease_ahead, lease_ready, leased_by};
pub(crate) use reads::{WF_COLS, load, load_for_update, row_lock};

use crate::db::{Cols, Dialect, Row, Stmt, Tx, stmt};
use crate::{Result, StoreError, now_ms, parse};
use serde::Serialize;

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
    /// How long one attempt may take, fixed when the workflow was queued.
    pub timeout_ms: i64,
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
    pub steps: Vec<NewStep>,
    /// Key of the per-provider concurrency limit.
    pub provider: Option<String>,
    /// Key of the per-host concurrency limit.
    pub host: Option<String>,
    /// Batch id and node name.
    pub batch: Option<(String, String)>,
}

/// The idempotency key of step `idx` (`name`) of workflow `wf` ([`StepRecord::idem_key`]).
pub(crate) fn idem_key(wf: &str, idx: usize, name: &str) -> String {
    format!("{wf}/{idx}/{name}")
}

/// A step of a workflow to queue, with how long one attempt may take (stored with it, so
/// whichever node starts the step reads its deadline from the ledger).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewStep {
    pub name: String,
    pub timeout_ms: i64,
}

impl NewStep {
    /// The timeout of a step queued without one, and of steps queued before timeouts were
    /// stored (10 minutes).
    pub const DEFAULT_TIMEOUT_MS: i64 = 600_000;

    pub fn new(name: impl Into<String>, timeout: std::time::Duration) -> Self {
        Self {
            name: name.into(),
            timeout_ms: timeout.as_millis() as i64,
        }
    }
}

impl From<&str> for NewStep {
    /// A step with [`NewStep::DEFAULT_TIMEOUT_MS`].
    fn from(name: &str) -> Self {
        Self {
            name: name.to_string(),
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
        }
    }
}

impl From<String> for NewStep {
    fn from(name: String) -> Self {
        name.as_str().into()
    }
}

impl NewWorkflow {
    pub fn new(
        definition: impl Into<String>,
        owner: impl Into<String>,
        steps: Vec<NewStep>,
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

impl ClaimLimits {
    /// Whether any limit is set (then every workflow goes through a counted claim).
    pub fn any(&self) -> bool {
        self.per_user.is_some() || self.per_provider.is_some() || self.per_host.is_some()
    }
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

impl StepCommit {
    /// Whether it commits nothing but the step's completion (no output, effects or children).
    pub fn is_empty(&self) -> bool {
        self.output.is_none() && self.effects.is_empty() && self.children.is_empty()
    }
}

/// The step to start right after one finishes (saves a transaction per step).
#[derive(Debug, Clone, Copy)]
pub struct NextStep<'a> {
    pub idx: u32,
    pub name: &'a str,
    pub deadline_ms: i64,
}

/// One step completion for [`Store::complete`]: step `idx` of workflow `wf` is done, by
/// `node` (which must hold its lease), committing `commit` with it.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub wf: &'a str,
    pub node: &'a str,
    pub idx: u32,
    pub name: &'a str,
    pub commit: &'a StepCommit,
    /// Steps before `idx`, in order, that ran in one go with it: the first is the one recorded
    /// running, the others (and `idx`) ran after it unrecorded. Empty: `idx` was recorded
    /// running itself.
    pub ran: &'a [(u32, &'a str)],
    /// The step to start in the same transaction.
    pub next: Option<NextStep<'a>>,
    /// With no `next`: the workflow ends succeeded in the same transaction (unless a cancel
    /// was requested).
    pub finish: bool,
    /// A finishing batch node leases the next ready node of its batch to `node`.
    pub handoff: Option<Handoff>,
    /// When it ends here: the node of its batch, leased ahead to `node`, that took its slot
    /// in memory and runs already. The same transaction records the pass (that node counts
    /// as running from then on, whatever this one's slot did meanwhile), or, where that
    /// node's own ending is in it too, frees the slot once.
    pub pass_to: Option<&'a str>,
    /// This workflow was leased ahead (see [`Handoff::ahead`]) and runs on the slot that
    /// workflow `took_slot_of` passed it (`pass_to`), in this completion or an earlier one.
    pub took_slot_of: Option<&'a str>,
    /// None of the steps that ran (`ran`, then `idx`) was recorded running: the workflow was
    /// leased ahead and this is its first completion.
    pub unstarted: bool,
    /// The workflow as `node` claimed it, when it ends here: on PostgreSQL the completion's
    /// writes then go with the lease guards, in their round trip, and what the guards read
    /// is checked against it (a difference, or a guard that fails, undoes them and the group
    /// is committed the careful way).
    pub claimed: Option<&'a Workflow>,
}

impl<'a> Completion<'a> {
    /// Step `idx` (`name`) of `wf` done by `node` with `commit`; nothing ran with it, nothing
    /// starts next, the workflow does not end.
    pub fn of(wf: &'a str, node: &'a str, idx: u32, name: &'a str, commit: &'a StepCommit) -> Self {
        Self {
            wf,
            node,
            idx,
            name,
            commit,
            ran: &[],
            next: None,
            finish: false,
            handoff: None,
            pass_to: None,
            took_slot_of: None,
            unstarted: false,
            claimed: None,
        }
    }
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

/// Why [`Store::reopen_for_undo`] could not take a workflow back now.
#[derive(Debug, thiserror::Error)]
pub enum Reopen {
    /// It is still running (a cancel was asked for) or another node is undoing it: try later.
    #[error("operation {0} is still running or being undone elsewhere; try again shortly")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    for (i, s) in w.steps.iter().enumerate() {
        out.push(stmt!(
            "INSERT INTO workflow_steps (workflow_id, idx, name, status, idem_key, timeout_ms)
             VALUES ($1, $2, $3, 'pending', $4, $5)",
            id,
            i as i64,
            s.name.as_str(),
            idem_key(id, i, &s.name),
            s.timeout_ms,
        ));
    }
    out.push(stmt!(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES ($1, $2, NULL, 'queued', $3) RETURNING seq",
        id,
        now,
        format!("{} queued", w.definition),
    ));
    out
}

/// The current time in Unix milliseconds by the database's clock on PostgreSQL (leases of
/// several replicas compare against one clock), by this machine's on SQLite.
pub(crate) async fn clock(tx: &mut dyn Tx) -> Result<i64> {
    if tx.began_at().is_none() {
        // A transaction asking for the clock first begins alone: its `BEGIN` reads it.
        tx.begin_now().await?;
    }
    if let Some(now) = tx.began_at() {
        return Ok(now);
    }
    match tx.dialect() {
        Dialect::Sqlite => Ok(now_ms()),
        Dialect::Postgres => tx
            .query_one(&stmt!(crate::db::postgres::READ_CLOCK))
            .await?
            .first_int()?
            .ok_or_else(|| StoreError::Corrupt("clock", "no time from the database".into())),
    }
}

/// `FOR UPDATE SKIP LOCKED` on PostgreSQL (concurrent claimers pass over each other's rows);
/// nothing on SQLite, whose write thread serializes every claim.
pub(crate) fn skip_locked(tx: &dyn Tx) -> &'static str {
    match tx.dialect() {
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
    }
}

/// Appends one event to a workflow's log.
pub(crate) async fn event(
    tx: &mut dyn Tx,
    wf: &str,
    step: Option<&str>,
    kind: &str,
    message: &str,
    now: i64,
) -> Result<WorkflowEvent> {
    let seq = tx
        .query_one(&stmt!(
            "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
             VALUES ($1, $2, $3, $4, $5) RETURNING seq",
            wf,
            now,
            step,
            kind,
            message,
        ))
        .await?
        .int("seq")?;
    Ok(WorkflowEvent {
        seq,
        operation_id: wf.to_string(),
        at: now,
        step: step.map(str::to_string),
        kind: kind.to_string(),
        message: message.to_string(),
    })
}

fn event_from(r: &Row) -> Result<WorkflowEvent> {
    Ok(WorkflowEvent {
        seq: r.int("seq")?,
        operation_id: r.text("workflow_id")?,
        at: r.int("at")?,
        step: r.opt_text("step")?,
        kind: r.text("kind")?,
        message: r.text("message")?,
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
        timeout_ms: r
            .opt_int("timeout_ms")?
            .unwrap_or(NewStep::DEFAULT_TIMEOUT_MS),
        output: r
            .opt_text("output")?
            .and_then(|o| serde_json::from_str(&o).ok()),
    })
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

/// A lease the transaction that queues workflows also takes on them for `node` (whose
/// engine holds a free slot for each), starting their first step: the claim that would
/// otherwise follow is saved. At most `max` are leased; the rest wait to be claimed.
#[derive(Debug, Clone)]
pub struct LeaseTo {
    pub node: String,
    pub lease_ms: i64,
    pub max: usize,
}

/// A finishing batch node hands its slot to the next ready node of its batch: leased to the
/// same node in the finishing transaction (for `lease_ms`), its first step started.
#[derive(Debug, Clone, Copy)]
pub struct Handoff {
    pub lease_ms: i64,
    /// Up to this many more ready nodes of the batch are leased to the same node *ahead* of
    /// their slots: they stay parked (the batch's parallelism counts only unparked nodes)
    /// and nothing of theirs starts, and no fill or other lease takes them while the lease
    /// lasts. The node runs one when a slot of its frees in memory, and its next completion
    /// records the pass ([`Completion::pass_to`]).
    pub ahead: u32,
}

/// What [`crate::Store::complete_with`] recorded: the events, whether a cancel was requested
/// meanwhile, the batch node handed off with a slot (claimed, its first step started) and
/// the nodes leased ahead of their slots (claimed, nothing started; see [`Handoff::ahead`]).
#[derive(Debug, Default)]
pub struct Completed {
    pub events: Vec<WorkflowEvent>,
    pub cancel: bool,
    pub handed: Option<Claimed>,
    pub ahead: Vec<Workflow>,
}
