//! Persisted workflows: the engine's queue, step ledger, effect outbox and event log, written
//! once for both backends over `db::Tx`.
//!
//! Every transition is guarded by the lease: a write names the node that holds the workflow,
//! and a node whose lease expired (and was taken over) gets `LeaseLost` instead of writing.
//! The lease is a fencing token checked inside each transition's transaction, so a node that
//! stalls past its lease can still finish running a step but can never record its outcome.
//! On PostgreSQL every lease time is the database's clock (`clock`), never a replica's.
//!
//! `ledger` holds the transitions, `claims` the claims and leases, `ending` what ending a
//! workflow writes, `sets` the set-wise statements they share, and `crate::commit` the group
//! commit of step completions.

mod claims;
mod ending;
mod ledger;
mod retry;
pub(crate) mod sets;
mod stats;

pub use stats::WorkflowCounts;

pub(crate) use claims::{LeaseNew, Leased, Start, lease_many, lease_ready, leased_by};
pub(crate) use ending::{
    ENDING_COLS, Ending, SKIP_HELD, add_dep, ending_from, fill_batch_in, fill_stmts, finish_in,
    parked_queue, pass_slots, ready_nodes, release_stmt,
};

use crate::db::{Cols, Dialect, Filter, Row, Stmt, Tx, Value, limit_by, stmt};
use crate::{Result, Store, StoreError, now_ms, parse};
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

/// The event log's columns an event is read from; a `WHERE` follows.
const EVENTS: &str = "SELECT seq, workflow_id, at, step, kind, message FROM workflow_events";

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
            format!("{id}/{i}/{}", s.name),
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
}

pub(crate) const WF_COLS: &str =
    "id, definition, resource_kind, resource_id, parent_id, owner, status, step, attempt,
    priority, error, input, cancel_requested, batch_id, node, waiting_on, created_at, updated_at,
    finished_at";

/// The steps of workflow `id`, in order.
pub(crate) async fn load_steps(tx: &mut dyn Tx, id: &str) -> Result<Vec<StepRecord>> {
    tx.query(&stmt!(
        "SELECT * FROM workflow_steps WHERE workflow_id = $1 ORDER BY idx",
        id
    ))
    .await?
    .iter()
    .map(step_from)
    .collect()
}

/// One workflow with its steps.
pub(crate) async fn load(tx: &mut dyn Tx, id: &str) -> Result<Option<Workflow>> {
    load_as(tx, id, "").await
}

/// [`load`], its row locked until the transaction ends (PostgreSQL; SQLite's one writer
/// serializes anyway): for an operator's action that reads the workflow's state and then
/// changes it (a retry, a cancel) — one racing another, or the workflow's own ending, waits
/// and is read as it committed instead of being overwritten from what was read before.
pub(crate) async fn load_for_update(tx: &mut dyn Tx, id: &str) -> Result<Option<Workflow>> {
    let lock = match tx.dialect() {
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR NO KEY UPDATE",
    };
    load_as(tx, id, lock).await
}

/// Workflow `id` with its steps, its row read with `lock` (a locking clause, or nothing).
async fn load_as(tx: &mut dyn Tx, id: &str, lock: &str) -> Result<Option<Workflow>> {
    let sql = format!("SELECT {WF_COLS} FROM workflows WHERE id = $1{lock}");
    let Some(r) = tx.query_opt(&stmt!(sql, id)).await? else {
        return Ok(None);
    };
    let steps = load_steps(tx, id).await?;
    Ok(Some(workflow_from(&r, steps)?))
}

/// Workflows `ids` with their steps, in that order (missing ones left out).
pub(crate) async fn load_many(tx: &mut dyn Tx, ids: &[String]) -> Result<Vec<Workflow>> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(w) = load(tx, id).await? {
            out.push(w);
        }
    }
    Ok(out)
}

/// Each row's first column as text.
fn texts(rows: Vec<Row>) -> Result<Vec<String>> {
    rows.iter()
        .map(|r| r.first_text().map(Option::unwrap_or_default))
        .collect()
}

impl Store {
    /// One workflow with its steps.
    pub async fn workflow(&self, id: &str) -> Result<Option<Workflow>> {
        let id = id.to_string();
        self.db
            .read(move |tx| Box::pin(async move { load(tx, &id).await }))
            .await
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
        let mut f = Filter::default();
        f.given(owner, |p| format!("owner = {p}"))
            .given(after, |p| format!("id < {p}"));
        let s = f.page("SELECT id FROM workflows", "id DESC", limit);
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let ids = texts(tx.query(&s).await?)?;
                    load_many(tx, &ids).await
                })
            })
            .await
    }

    /// The workflows of a batch, in the order they were queued (two queries in all).
    pub async fn batch_workflows(&self, batch: &str) -> Result<Vec<Workflow>> {
        let batch = batch.to_string();
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {WF_COLS} FROM workflows WHERE batch_id = $1 ORDER BY created_at, id"
                    );
                    let rows = tx.query(&stmt!(sql, batch.as_str())).await?;
                    let mut steps: std::collections::HashMap<String, Vec<StepRecord>> =
                        Default::default();
                    for r in tx
                        .query(&stmt!(
                            "SELECT s.* FROM workflow_steps s JOIN workflows w ON w.id = s.workflow_id
                             WHERE w.batch_id = $1 ORDER BY s.workflow_id, s.idx",
                            batch.as_str()
                        ))
                        .await?
                    {
                        steps
                            .entry(r.text("workflow_id")?)
                            .or_default()
                            .push(step_from(&r)?);
                    }
                    rows.iter()
                        .map(|r| workflow_from(r, steps.remove(&r.text("id")?).unwrap_or_default()))
                        .collect()
                })
            })
            .await
    }

    /// The children a workflow's steps spawned, in the order they were queued.
    pub async fn children(&self, parent: &str) -> Result<Vec<Workflow>> {
        let s = stmt!(
            "SELECT id FROM workflows WHERE parent_id = $1 ORDER BY id",
            parent
        );
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let ids = texts(tx.query(&s).await?)?;
                    load_many(tx, &ids).await
                })
            })
            .await
    }

    /// Events of a workflow after `after_seq`, in order.
    pub async fn events(&self, id: &str, after_seq: i64) -> Result<Vec<WorkflowEvent>> {
        let (id, s) = (id.to_string(), after_seq);
        self.read_events(move |_| {
            stmt!(
                format!("{EVENTS} WHERE workflow_id = $1 AND seq > $2 ORDER BY seq"),
                id,
                s
            )
        })
        .await
    }

    /// Every workflow's events after `after_seq`, oldest first, at most `limit`.
    pub async fn events_since(&self, after_seq: i64, limit: i64) -> Result<Vec<WorkflowEvent>> {
        self.read_events(move |_| {
            stmt!(
                format!("{EVENTS} WHERE seq > $1 ORDER BY seq {}", limit_by("$2")),
                after_seq,
                limit
            )
        })
        .await
    }

    /// The events numbered `lo` to `hi` (both included) that are committed, oldest first: what
    /// one commit appended (see [`crate::Change`]).
    pub async fn events_between(&self, lo: i64, hi: i64) -> Result<Vec<WorkflowEvent>> {
        self.read_events(move |_| {
            stmt!(
                format!("{EVENTS} WHERE seq >= $1 AND seq <= $2 ORDER BY seq"),
                lo,
                hi
            )
        })
        .await
    }

    /// The committed events among the numbers `seqs`, oldest first (the relay's look for
    /// numbers taken by appends it had not seen commit).
    pub async fn events_numbered(&self, seqs: &[i64]) -> Result<Vec<WorkflowEvent>> {
        let seqs = seqs.to_vec();
        self.read_events(move |d| {
            let (cond, arg) = match d {
                Dialect::Sqlite => (
                    "seq IN (SELECT value FROM json_each($1))",
                    Value::Text(serde_json::Value::from(seqs).to_string()),
                ),
                Dialect::Postgres => (
                    "seq = ANY(CAST($1 AS BIGINT[]))",
                    Value::List(seqs.into_iter().map(Value::Int).collect()),
                ),
            };
            Stmt::new(format!("{EVENTS} WHERE {cond} ORDER BY seq"), vec![arg])
        })
        .await
    }

    /// The events the statement `query` (given the backend's dialect) selects.
    async fn read_events(
        &self,
        query: impl FnOnce(Dialect) -> Stmt + Send + 'static,
    ) -> Result<Vec<WorkflowEvent>> {
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let s = query(tx.dialect());
                    tx.query(&s).await?.iter().map(event_from).collect()
                })
            })
            .await
    }

    /// The newest event's sequence number (0 when there is none).
    pub async fn last_event_seq(&self) -> Result<i64> {
        self.db
            .read(|tx| {
                Box::pin(async move {
                    Ok(tx
                        .query_one(&stmt!("SELECT MAX(seq) FROM workflow_events"))
                        .await?
                        .first_int()?
                        .unwrap_or(0))
                })
            })
            .await
    }

    /// Effects committed by a workflow's steps, in commit order.
    pub async fn step_effects(&self, wf: &str) -> Result<Vec<StepEffect>> {
        let s = stmt!(
            "SELECT seq, workflow_id, idx, key, payload FROM step_effects
             WHERE workflow_id = $1 ORDER BY seq",
            wf
        );
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    tx.query(&s)
                        .await?
                        .iter()
                        .map(|r| {
                            Ok(StepEffect {
                                seq: r.int("seq")?,
                                workflow_id: r.text("workflow_id")?,
                                idx: r.int("idx")? as u32,
                                key: r.text("key")?,
                                payload: serde_json::from_str(&r.text("payload")?)
                                    .unwrap_or(serde_json::Value::Null),
                            })
                        })
                        .collect()
                })
            })
            .await
    }

    /// Milliseconds until the next workflow becomes due, if any is waiting.
    pub async fn next_due_in(&self) -> Result<Option<i64>> {
        self.db
            .read(|tx| {
                Box::pin(async move {
                    let t = tx
                        .query_one(&stmt!(
                            "SELECT MIN(CASE WHEN lease_owner IS NULL OR lease_until < next_run_at
                                             THEN next_run_at ELSE lease_until END)
                             FROM workflows WHERE status IN ('pending', 'running', 'undoing')
                               AND waiting_on = 0 AND parked = 0"
                        ))
                        .await?
                        .first_int()?;
                    let now = clock(tx).await?;
                    Ok(t.map(|t| (t - now).max(0)))
                })
            })
            .await
    }

    /// Registers what ending or retrying a workflow of `definition` does to its resource.
    pub fn set_hooks(&self, definition: &str, hooks: crate::Hooks) {
        self.hooks.set(definition, hooks);
    }
}
