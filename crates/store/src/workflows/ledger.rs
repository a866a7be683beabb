//! The ledger's transitions: queueing, claims and leases, step starts and outcomes, undo,
//! cancel, ending, children. Each is one transaction, guarded by the caller's lease.

use super::sets::{EVENT_ROW, STEP_START_ROW, append_events, id_in, ids_arg, start_steps};
use super::{
    ClaimLimits, Claimed, Handoff, NewWorkflow, NextStep, Reopen, StepCommit, StepRecord,
    StepStatus, WF_COLS, Workflow, WorkflowEvent, WorkflowOutcome, WorkflowStatus, add_dep, clock,
    event, finish_in, insert_stmts, lease_lost, load, skip_locked, step_from, workflow_from,
};
use crate::audit::audit_stmt;
use crate::db::{BoxFut, Col, Cols, Dialect, Durability, RowSet, Stmt, Tx, Value, stmt};
use crate::workflows::OpError;
use crate::{Actor, Result, Store, StoreError};
use std::collections::HashMap;

/// Advisory lock key of limited claims on PostgreSQL: with a per-user, -provider or -host
/// limit set, claims of all replicas take turns, so the limit counts are exact.
const CLAIM_LOCK: i64 = 4_242_000_002;

/// The one column of the set of definitions a node runs.
const DEFINITION: &[Col] = &[("definition", false)];

/// `LeaseLost` unless `node` holds the lease on `wf`.
async fn guard(tx: &mut dyn Tx, wf: &str, node: &str) -> Result<()> {
    let owner = tx
        .query_opt(&stmt!(
            "SELECT lease_owner FROM workflows WHERE id = $1",
            wf
        ))
        .await?
        .map(|r| r.first_text())
        .transpose()?
        .flatten();
    if owner.as_deref() == Some(node) {
        Ok(())
    } else {
        Err(lease_lost(wf))
    }
}

/// Marks step `idx` of `wf` running (one more attempt) until `now + deadline_ms`.
async fn mark_started(
    tx: &mut dyn Tx,
    wf: &str,
    idx: u32,
    name: &str,
    deadline_ms: i64,
    now: i64,
) -> Result<WorkflowEvent> {
    tx.exec(&stmt!(
        "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1, started_at = $3,
             deadline_at = $4
         WHERE workflow_id = $1 AND idx = $2",
        wf,
        idx,
        now,
        now + deadline_ms,
    ))
    .await?;
    event(
        tx,
        wf,
        Some(name),
        "step_started",
        &format!("{name} started"),
        now,
    )
    .await
}

/// Leases the workflows `ids` to `node` (those still claimable, in their order), loads their
/// steps and, with `start`, starts each one's next step (not when undoing or cancelling) with
/// its stored timeout: a fixed number of statements, whatever their count.
pub(crate) async fn lease_many(
    tx: &mut dyn Tx,
    ids: &[String],
    node: &str,
    lease_until: i64,
    now: i64,
    start: bool,
) -> Result<Vec<Claimed>> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let d = tx.dialect();
    let sql = format!(
        "UPDATE workflows SET lease_owner = $1, lease_until = $2, updated_at = $3, parked = 0,
             status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
         WHERE {} AND (lease_owner IS NULL OR lease_until < $3)
         RETURNING {WF_COLS}",
        id_in(d, "id", 4)
    );
    // The steps of every one asked for are read in the same round trip (those of a workflow
    // no longer claimable are dropped).
    let steps_sql = format!(
        "SELECT * FROM workflow_steps WHERE {} ORDER BY workflow_id, idx",
        id_in(d, "workflow_id", 1)
    );
    let mut res = tx
        .query_many(&[
            Stmt::new(
                sql,
                vec![node.into(), lease_until.into(), now.into(), ids_arg(d, ids)],
            ),
            Stmt::new(steps_sql, vec![ids_arg(d, ids)]),
        ])
        .await?;
    let step_rows = res.pop().unwrap_or_default();
    let rows = res.pop().unwrap_or_default();
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let mut steps: HashMap<String, Vec<StepRecord>> = HashMap::new();
    for r in &step_rows {
        steps
            .entry(r.text("workflow_id")?)
            .or_default()
            .push(step_from(r)?);
    }
    let mut by_id: HashMap<String, Workflow> = HashMap::new();
    for r in &rows {
        let id = r.text("id")?;
        let wf = workflow_from(r, steps.remove(&id).unwrap_or_default())?;
        by_id.insert(id, wf);
    }
    let (mut starts, mut events) = (RowSet::new(STEP_START_ROW), RowSet::new(EVENT_ROW));
    let mut out: Vec<Claimed> = Vec::with_capacity(by_id.len());
    for id in ids {
        let Some(mut wf) = by_id.remove(id) else {
            continue;
        };
        if let Some(rec) = usize::try_from(wf.step).ok().and_then(|i| wf.steps.get(i))
            && rec.status == StepStatus::Running
        {
            // Its step was started under a lease that ran out before the step ended.
            metrics::counter!("basphere_lease_takeovers_total", "definition" => wf.definition.clone())
                .increment(1);
        }
        let runnable = start && wf.status == WorkflowStatus::Running && !wf.cancel_requested;
        let mut evs = vec![];
        let mut started = false;
        if let (true, Ok(i)) = (runnable, usize::try_from(wf.step))
            && i < wf.steps.len()
        {
            let rec = &mut wf.steps[i];
            let d = rec.timeout_ms;
            starts.push(vec![id.as_str().into(), rec.idx.into(), (now + d).into()]);
            let message = format!("{} started", rec.name);
            events.push(vec![
                (events.len() as i64).into(),
                id.as_str().into(),
                rec.name.as_str().into(),
                "step_started".into(),
                message.as_str().into(),
            ]);
            evs.push(WorkflowEvent {
                seq: 0,
                operation_id: id.clone(),
                at: now,
                step: Some(rec.name.clone()),
                kind: "step_started".into(),
                message,
            });
            rec.status = StepStatus::Running;
            rec.attempts += 1;
            rec.started_at = Some(now);
            rec.deadline_at = Some(now + d);
            started = true;
        }
        out.push((wf, evs, started));
    }
    let mut batch: Vec<Stmt> = start_steps(d, starts, now).into_iter().collect();
    let appended = batch.len();
    batch.extend(append_events(d, events, now));
    if appended == batch.len() {
        return Ok(out);
    }
    let results = tx.query_many(&batch).await?;
    let mut seqs: HashMap<String, i64> = HashMap::new();
    for r in &results[appended] {
        seqs.insert(r.text("workflow_id")?, r.int("seq")?);
    }
    for (wf, evs, _) in &mut out {
        for e in evs {
            e.seq = seqs.get(&wf.id).copied().unwrap_or_default();
        }
    }
    Ok(out)
}

/// Each row's first column as text.
fn ids(rows: Vec<crate::db::Row>) -> Result<Vec<String>> {
    rows.iter()
        .map(|r| r.first_text().map(Option::unwrap_or_default))
        .collect()
}

async fn claim_in(
    tx: &mut dyn Tx,
    node: &str,
    lease_ms: i64,
    limits: ClaimLimits,
    max: i64,
    runs: Option<&[String]>,
) -> Result<Vec<Claimed>> {
    let limited =
        limits.per_user.is_some() || limits.per_provider.is_some() || limits.per_host.is_some();
    if limited && tx.dialect() == Dialect::Postgres {
        tx.query(&stmt!("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK))
            .await?;
    }
    let now = clock(tx).await?;
    let lock = skip_locked(tx);
    // Only definitions this node runs: `AND w.definition IN (…)` reading parameter `$n`.
    let d = tx.dialect();
    let only = |n: usize| match runs {
        Some(_) => {
            let set = RowSet::new(DEFINITION);
            format!(
                " AND w.definition IN (SELECT v.definition FROM {})",
                set.relation(d, n)
            )
        }
        None => String::new(),
    };
    let defs = || -> Vec<Value> {
        let mut set = RowSet::new(DEFINITION);
        for r in runs.unwrap_or_default() {
            set.push(vec![Value::Text(r.clone())]);
        }
        match runs {
            Some(_) => set.args(d),
            None => vec![],
        }
    };
    // A cancel needs no dependency or slot: those first.
    let sql = format!(
        "SELECT w.id FROM workflows w
         WHERE w.cancel_requested = 1 AND w.status IN ('pending', 'running', 'undoing')
           AND (w.lease_owner IS NULL OR w.lease_until < $1){}
         ORDER BY w.priority DESC, w.created_at LIMIT $2{lock}",
        only(3)
    );
    let mut args = vec![now.into(), max.into()];
    args.extend(defs());
    let mut todo = ids(tx.query(&Stmt::new(sql, args)).await?)?;
    if (todo.len() as i64) < max {
        // Ready workflows in priority order (the partial index `workflows_ready`); the limits
        // exclude keys already at their maximum, each set computed once.
        let mut sql = String::from(
            "SELECT w.id FROM workflows w
             WHERE w.status IN ('pending', 'running', 'undoing') AND w.waiting_on = 0
               AND w.parked = 0 AND w.next_run_at <= $1
               AND (w.lease_owner IS NULL OR w.lease_until < $1)
               AND w.cancel_requested = 0",
        );
        let mut args: Vec<Value> = vec![now.into()];
        for (col, lim) in [
            ("owner", limits.per_user),
            ("provider", limits.per_provider),
            ("host", limits.per_host),
        ] {
            if let Some(max) = lim {
                args.push(max.into());
                let n = args.len();
                sql.push_str(&format!(
                    " AND (w.{col} IS NULL OR w.{col} NOT IN (SELECT o.{col} FROM workflows o
                       WHERE o.status IN ('pending', 'running', 'undoing')
                         AND o.waiting_on = 0 AND o.parked = 0
                         AND o.lease_until >= $1 AND o.{col} IS NOT NULL
                       GROUP BY o.{col} HAVING COUNT(*) >= ${n}))"
                ));
            }
        }
        if runs.is_some() {
            sql.push_str(&only(args.len() + 1));
            args.extend(defs());
        }
        args.push((max - todo.len() as i64).into());
        sql.push_str(&format!(
            " ORDER BY w.priority DESC, w.created_at LIMIT ${}{lock}",
            args.len()
        ));
        let more = tx.query(&Stmt::new(sql, args)).await?;
        todo.extend(ids(more)?);
    }
    lease_many(tx, &todo, node, now + lease_ms, now, runs.is_some()).await
}

impl Store {
    /// Runs `f` in one write transaction once `node` is known to hold `wf`'s lease, with the
    /// workflow's id and the database's time: the opening every lease-guarded transition shares.
    async fn guarded<T, F>(&self, wf: &str, node: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx, String, i64) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        self.guarded_with(Durability::Flushed, wf, node, f).await
    }

    /// [`Store::guarded`] committed with `durability`.
    async fn guarded_with<T, F>(
        &self,
        durability: Durability,
        wf: &str,
        node: &str,
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut dyn Tx, String, i64) -> BoxFut<'a, Result<T>> + Send + 'static,
    {
        let (wf, node) = (wf.to_string(), node.to_string());
        self.db
            .write_with(durability, move |tx| {
                Box::pin(async move {
                    guard(tx, &wf, &node).await?;
                    let now = clock(tx).await?;
                    f(tx, wf, now).await
                })
            })
            .await
    }

    /// Queues a workflow of any definition (VM workflows are queued by admission instead).
    pub async fn enqueue_workflow(&self, w: &NewWorkflow) -> Result<String> {
        Ok(self
            .enqueue_workflows(std::slice::from_ref(w), &[])
            .await?
            .remove(0))
    }

    /// Queues many workflows in one transaction (benchmarks, batches of custom definitions),
    /// with edges between them given as (dependent index, dependency index, hard).
    pub async fn enqueue_workflows(
        &self,
        ws: &[NewWorkflow],
        edges: &[(usize, usize, bool)],
    ) -> Result<Vec<String>> {
        let ws = ws.to_vec();
        let edges = edges.to_vec();
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let now = crate::now_ms();
                    let mut ids = Vec::with_capacity(ws.len());
                    for w in &ws {
                        let id = uuid::Uuid::now_v7().to_string();
                        tx.run(&insert_stmts(w, &id, None, now)).await?;
                        ids.push(id);
                    }
                    for (a, b, hard) in edges {
                        add_dep(tx, &ids[a], &ids[b], hard).await?;
                    }
                    Ok(ids)
                })
            })
            .await
    }

    /// Claims the most urgent runnable workflow for `node` with a lease of `lease_ms`.
    ///
    /// Runnable: unfinished, due, not leased (or its lease expired), its batch dependencies
    /// ended and a batch slot given (`parked = 0`) — or a cancel was asked for, which needs
    /// neither. Among those, one whose user, provider and host are under their concurrency
    /// limits; highest priority first, then oldest. Claiming a workflow claims its next step:
    /// steps of one workflow run in order, so the workflow's lease is the step's lease.
    pub async fn claim_workflow(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
    ) -> Result<Option<Workflow>> {
        Ok(self
            .claim(node, lease_ms, limits, 1, None)
            .await?
            .pop()
            .map(|c| c.0))
    }

    /// Claims up to `max` workflows of the `definitions` this node runs in one transaction
    /// (see [`Store::claim_workflow`]) and starts each one's next step with the timeout stored
    /// when it was queued (not when undoing or cancelling). Returns each workflow as it is
    /// after that, the events, and whether it started the step. With any concurrency limit
    /// set it claims one. On PostgreSQL the SELECTs take `FOR UPDATE SKIP LOCKED`, so replicas
    /// claiming at once pass over each other's rows; limited claims also take an advisory lock
    /// ([`CLAIM_LOCK`]) so that the counts behind the limits are exact across replicas.
    pub async fn claim_many(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        max: usize,
        definitions: &[String],
    ) -> Result<Vec<Claimed>> {
        self.claim(node, lease_ms, limits, max, Some(definitions.to_vec()))
            .await
    }

    /// Claims as [`Store::claim_many`] does with `runs`; without, of any definition and
    /// starting no step.
    async fn claim(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        max: usize,
        runs: Option<Vec<String>>,
    ) -> Result<Vec<Claimed>> {
        let limited =
            limits.per_user.is_some() || limits.per_provider.is_some() || limits.per_host.is_some();
        let max = if limited { 1 } else { max.max(1) } as i64;
        let (node, limits) = (node.to_string(), *limits);
        self.db
            .write_with(Durability::Replayable, move |tx| {
                Box::pin(async move {
                    claim_in(tx, &node, lease_ms, limits, max, runs.as_deref()).await
                })
            })
            .await
    }

    /// Extends `node`'s lease; `LeaseLost` if another node holds it now.
    pub async fn renew_lease(&self, wf: &str, node: &str, lease_ms: i64) -> Result<()> {
        let (wf, node) = (wf.to_string(), node.to_string());
        self.db
            .write_with(Durability::Replayable, move |tx| {
                Box::pin(async move {
                    let now = clock(tx).await?;
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE workflows SET lease_until = $3 WHERE id = $1 AND lease_owner = $2",
                            wf.as_str(),
                            node.as_str(),
                            now + lease_ms,
                        ))
                        .await?;
                    if n == 0 { Err(lease_lost(&wf)) } else { Ok(()) }
                })
            })
            .await
    }

    /// Drops every lease `node` holds (a restarted node reclaims its own work at once).
    pub async fn release_leases(&self, node: &str) -> Result<u64> {
        let s = stmt!(
            "UPDATE workflows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
            node
        );
        self.db
            .write(move |tx| Box::pin(async move { tx.exec(&s).await }))
            .await
    }

    /// Gives a claimed workflow back without changing it (e.g. its definition is unknown
    /// here), to be claimed again after `delay_ms`.
    pub async fn release_workflow(&self, wf: &str, node: &str, delay_ms: i64) -> Result<()> {
        let (wf, node) = (wf.to_string(), node.to_string());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let now = clock(tx).await?;
                    tx.exec(&stmt!(
                        "UPDATE workflows SET lease_owner = NULL, lease_until = NULL, next_run_at = $3
                         WHERE id = $1 AND lease_owner = $2",
                        wf.as_str(),
                        node.as_str(),
                        now + delay_ms,
                    ))
                    .await?;
                    Ok(())
                })
            })
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
        let name = name.to_string();
        self.guarded_with(Durability::Replayable, wf, node, move |tx, wf, now| {
            Box::pin(async move { mark_started(tx, &wf, idx, &name, deadline_ms, now).await })
        })
        .await
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
            req: crate::commit::DoneReq {
                wf: wf.to_string(),
                idx,
                name: name.to_string(),
                node: node.to_string(),
                commit: commit.clone(),
                next: next.map(|n| (n.idx, n.name.to_string(), n.deadline_ms)),
                finish,
                handoff,
            },
            reply,
        };
        match (&self.db, &self.committer) {
            (crate::db::Db::Sqlite(d), _) => d.send(crate::commit::Job::Done(Box::new(job)))?,
            (_, crate::commit::Committer::Task(t)) => {
                t.send(job).map_err(|_| StoreError::Closed)?
            }
            (_, crate::commit::Committer::Thread) => return Err(StoreError::Closed),
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
        let (name, error) = (name.to_string(), error.to_string());
        self.guarded(wf, node, move |tx, wf, now| {
            Box::pin(async move {
                tx.run(&[
                    stmt!(
                        "UPDATE workflow_steps SET status = 'pending', error = $3
                         WHERE workflow_id = $1 AND idx = $2",
                        wf.as_str(),
                        idx,
                        error.as_str(),
                    ),
                    stmt!(
                        "UPDATE workflows SET attempt = attempt + 1, lease_owner = NULL,
                             lease_until = NULL,
                             next_run_at = CASE WHEN cancel_requested = 1 THEN CAST($3 AS BIGINT)
                                 ELSE CAST($2 AS BIGINT) END,
                             updated_at = $3 WHERE id = $1",
                        wf.as_str(),
                        now + delay_ms,
                        now,
                    ),
                ])
                .await?;
                let msg = format!(
                    "{name} failed, retrying in {:.1}s: {error}",
                    delay_ms as f64 / 1000.0
                );
                event(tx, &wf, Some(&name), "step_retry", &msg, now).await
            })
        })
        .await
    }

    /// Records a permanent failure of step `idx` and turns the workflow to undoing its done
    /// steps.
    pub async fn begin_undo(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
        error: &str,
    ) -> Result<WorkflowEvent> {
        let (name, error) = (name.to_string(), error.to_string());
        self.guarded(wf, node, move |tx, wf, now| {
            Box::pin(async move {
                tx.run(&[
                    stmt!(
                        "UPDATE workflow_steps SET status = 'failed', error = $3, finished_at = $4
                         WHERE workflow_id = $1 AND idx = $2",
                        wf.as_str(),
                        idx,
                        error.as_str(),
                        now,
                    ),
                    stmt!(
                        "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0,
                             error = $3, updated_at = $4 WHERE id = $1",
                        wf.as_str(),
                        i64::from(idx) - 1,
                        format!("{name}: {error}"),
                        now,
                    ),
                ])
                .await?;
                let msg = format!("{name} failed: {error}");
                event(tx, &wf, Some(&name), "step_failed", &msg, now).await?;
                event(
                    tx,
                    &wf,
                    None,
                    "undo_started",
                    "undoing completed steps",
                    now,
                )
                .await
            })
        })
        .await
    }

    /// Turns a cancelled workflow to undoing, starting with step `undo_from` (the last done).
    pub async fn begin_cancel(
        &self,
        wf: &str,
        node: &str,
        undo_from: i64,
        reason: &str,
    ) -> Result<WorkflowEvent> {
        let reason = reason.to_string();
        self.guarded(wf, node, move |tx, wf, now| {
            Box::pin(async move {
                tx.run(&[
                    stmt!(
                        "UPDATE workflow_steps SET status = 'skipped'
                         WHERE workflow_id = $1 AND status IN ('pending', 'running')",
                        wf.as_str()
                    ),
                    stmt!(
                        "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0,
                             error = $3, updated_at = $4 WHERE id = $1",
                        wf.as_str(),
                        undo_from,
                        reason.as_str(),
                        now,
                    ),
                ])
                .await?;
                let msg = format!("{reason}; undoing completed steps");
                event(tx, &wf, None, "undo_started", &msg, now).await
            })
        })
        .await
    }

    /// Records that the done step `idx` was undone; the next one to undo is `idx - 1`.
    pub async fn step_undone(
        &self,
        wf: &str,
        idx: u32,
        name: &str,
        node: &str,
    ) -> Result<WorkflowEvent> {
        let name = name.to_string();
        self.guarded(wf, node, move |tx, wf, now| {
            Box::pin(async move {
                tx.run(&[
                    stmt!(
                        "UPDATE workflow_steps SET status = 'undone', finished_at = $3
                         WHERE workflow_id = $1 AND idx = $2",
                        wf.as_str(),
                        idx,
                        now,
                    ),
                    stmt!(
                        "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3 WHERE id = $1",
                        wf.as_str(),
                        i64::from(idx) - 1,
                        now,
                    ),
                ])
                .await?;
                event(tx, &wf, Some(&name), "step_undone", &format!("{name} undone"), now).await
            })
        })
        .await
    }

    /// Asks for a workflow to be cancelled. The engine stops it at the next step boundary (a
    /// running step finishes or reaches its deadline first), undoes its done steps in reverse
    /// and ends it `cancelled`; batch dependents that require it are skipped. A definition's
    /// hooks may refuse (a VM delete cannot be cancelled).
    pub async fn request_cancel(
        &self,
        wf: &str,
        actor: &Actor,
    ) -> std::result::Result<WorkflowEvent, OpError> {
        let (wf, actor, hooks) = (wf.to_string(), actor.clone(), self.hooks.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let w = load(tx, &wf)
                        .await?
                        .ok_or_else(|| OpError::NotFound(wf.clone()))?;
                    if w.status.is_terminal() {
                        return Err(OpError::State(wf, w.status, "there is nothing to cancel"));
                    }
                    if w.status == WorkflowStatus::Undoing {
                        return Err(OpError::State(
                            wf,
                            w.status,
                            "it is already being rolled back",
                        ));
                    }
                    if w.cancel_requested {
                        return Err(OpError::Refused(format!(
                            "operation {wf} is already being cancelled"
                        )));
                    }
                    if let Some(h) = hooks.get(&w.definition) {
                        h.0.cancellable(&w).map_err(OpError::Refused)?;
                    }
                    let now = clock(tx).await?;
                    tx.run(&[
                        stmt!(
                            "UPDATE workflows SET cancel_requested = 1,
                                 next_run_at = CASE WHEN next_run_at < $2 THEN next_run_at ELSE $2 END
                             WHERE id = $1",
                            wf.as_str(),
                            now,
                        ),
                        audit_stmt(&actor, "operation.cancel", &wf, "accepted", Some(&w.definition)),
                    ])
                    .await?;
                    let msg = format!("cancel requested by {}", actor.name);
                    Ok(event(tx, &wf, None, "cancel_requested", &msg, now).await?)
                })
            })
            .await
    }

    /// Ends a workflow; its definition's hooks apply the outcome to its resource in the same
    /// transaction (see `vms` for a VM's), and a child's parent stops waiting for it. In a
    /// batch, dependents waiting on it are released (success, or a soft edge) or skipped (a
    /// hard edge to a failed or cancelled node), transitively, in the same transaction.
    /// Returns the events written, the workflow's final one first.
    pub async fn finish_workflow(
        &self,
        wf: &str,
        node: &str,
        outcome: &WorkflowOutcome,
    ) -> Result<Vec<WorkflowEvent>> {
        let (outcome, hooks) = (outcome.clone(), self.hooks.clone());
        self.guarded(wf, node, move |tx, wf, now| {
            Box::pin(async move { finish_in(tx, &hooks, &wf, &outcome, now).await })
        })
        .await
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
        let (wf, node, reason) = (wf.to_string(), node.to_string(), reason.to_string());
        let busy = wf.clone();
        match self
            .db
            .write(move |tx| Box::pin(reopen(tx, wf, node, lease_ms, reason)))
            .await?
        {
            Reopened::Taken(w) => Ok(Some(*w)),
            Reopened::NothingToUndo => Ok(None),
            Reopened::Busy => Err(Reopen::Busy(busy)),
        }
    }
}

/// What [`reopen`] found; committed in every case (a cancel request it made stands).
enum Reopened {
    Taken(Box<Workflow>),
    NothingToUndo,
    Busy,
}

async fn reopen(
    tx: &mut dyn Tx,
    wf: String,
    node: String,
    lease_ms: i64,
    reason: String,
) -> Result<Reopened> {
    let w = load(tx, &wf).await?.ok_or_else(|| lease_lost(&wf))?;
    let now = clock(tx).await?;
    let wf = wf.as_str();
    match w.status {
        WorkflowStatus::Failed | WorkflowStatus::Cancelled => return Ok(Reopened::NothingToUndo),
        WorkflowStatus::Succeeded => {
            tx.exec(&stmt!(
                "UPDATE workflows SET status = 'undoing', step = $2, attempt = 0, error = $3,
                     cancel_requested = 1, finished_at = NULL, updated_at = $4,
                     lease_owner = $5, lease_until = $6
                 WHERE id = $1",
                wf,
                w.steps.len() as i64 - 1,
                reason.as_str(),
                now,
                node.as_str(),
                now + lease_ms,
            ))
            .await?;
            let msg = format!("{reason}; undoing completed steps");
            event(tx, wf, None, "undo_started", &msg, now).await?;
        }
        WorkflowStatus::Undoing => {
            let n = tx
                .exec(&stmt!(
                    "UPDATE workflows SET lease_owner = $2, lease_until = $3 WHERE id = $1
                       AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4)",
                    wf,
                    node.as_str(),
                    now + lease_ms,
                    now,
                ))
                .await?;
            if n == 0 {
                return Ok(Reopened::Busy);
            }
        }
        WorkflowStatus::Pending | WorkflowStatus::Running => {
            if !w.cancel_requested {
                tx.exec(&stmt!(
                    "UPDATE workflows SET cancel_requested = 1 WHERE id = $1",
                    wf
                ))
                .await?;
                let msg = format!("cancel requested: {reason}");
                event(tx, wf, None, "cancel_requested", &msg, now).await?;
            }
            return Ok(Reopened::Busy);
        }
    }
    match load(tx, wf).await? {
        Some(w) => Ok(Reopened::Taken(Box::new(w))),
        None => Err(lease_lost(wf)),
    }
}
