//! Reading workflows: one with its steps (locked, for an action that changes what it read),
//! pages of them, a batch's nodes, a parent's children, the event log and the effect outbox.

use super::{
    StepEffect, StepRecord, Workflow, WorkflowEvent, clock, event_from, step_from, workflow_from,
};
use crate::db::{Cols, Dialect, Filter, Row, Stmt, Tx, Value, limit_by, stmt};
use crate::{Result, Store};

/// The event log's columns an event is read from; a `WHERE` follows.
const EVENTS: &str = "SELECT seq, workflow_id, at, step, kind, message FROM workflow_events";

/// The columns a [`Workflow`] is read from.
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
    let lock = row_lock(tx.dialect());
    load_as(tx, id, lock).await
}

/// The clause that keeps the workflow rows a `SELECT` reads locked until the transaction ends,
/// so the writes that follow never land on a row a racing transaction changed meanwhile
/// (PostgreSQL; SQLite's one writer serializes these transactions anyway). It does not block
/// a reader, and claims pass over a locked row.
pub(crate) fn row_lock(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "",
        Dialect::Postgres => " FOR NO KEY UPDATE",
    }
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
    /// The workflows whose ids `ids` (a query) lists, in its order, in one snapshot.
    async fn workflows_listed(&self, ids: Stmt) -> Result<Vec<Workflow>> {
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let ids = texts(tx.query(&ids).await?)?;
                    load_many(tx, &ids).await
                })
            })
            .await
    }

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
        self.workflows_listed(s).await
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
        self.workflows_listed(s).await
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
            .read_int(stmt!("SELECT MAX(seq) FROM workflow_events"))
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
