//! The ledger's transitions: queueing, step starts and outcomes, undo, cancel, ending,
//! children (claims and leases are in `claims`). Each is one transaction, guarded by the
//! caller's lease.

use super::{
    Claimed, Completed, Completion, Ending, NewWorkflow, Reopen, Workflow, WorkflowEvent,
    WorkflowOutcome, WorkflowStatus, add_dep, clock, event, finish_in, insert_stmts, lease_lost,
    load, load_for_update, row_lock,
};
use crate::audit::audit_stmt;
use crate::db::{BoxFut, Durability, Tx, stmt};
use crate::workflows::OpError;
use crate::{Actor, Result, Store, StoreError};

/// `LeaseLost` unless `node` holds the lease on `wf`. On PostgreSQL the row stays locked
/// until the transaction ends, so a claim committing meanwhile cannot slip in between this
/// read and the writes it guards (see `commit::group`'s `rows_of`).
async fn guard(tx: &mut dyn Tx, wf: &str, node: &str) -> Result<()> {
    let sql = format!(
        "SELECT lease_owner FROM workflows WHERE id = $1{}",
        row_lock(tx.dialect())
    );
    let owner = tx
        .query_opt(&stmt!(sql, wf))
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

    /// Records a step completion (see [`Completion`]): the step done with its output and
    /// effects, atomically; the workflow moved on, `next` started, or the workflow ended — all
    /// in one transaction. Completions arriving together share one (see the `commit` module).
    /// Returns the events, whether a cancel was requested meanwhile (then `next` was not
    /// started and the workflow did not end; every step that ran is recorded done, so its undo
    /// runs), and the batch node handed off (claimed as by [`Store::claim_many`]; use a
    /// hand-off only when no concurrency limit is set).
    pub async fn complete(
        &self,
        c: Completion<'_>,
    ) -> Result<(Vec<WorkflowEvent>, bool, Option<Claimed>)> {
        let d = self.complete_with(c).await?;
        Ok((d.events, d.cancel, d.handed))
    }

    /// [`Store::complete`], with the nodes leased ahead too (see [`Handoff::ahead`]).
    pub async fn complete_with(&self, c: Completion<'_>) -> Result<Completed> {
        self.send_completion(c)?.await
    }

    /// Queues completion `c` at once — a node's completions are recorded in the order they
    /// are queued — and returns what waits for its commit ([`Store::complete_with`]'s answer).
    pub fn send_completion(
        &self,
        c: Completion<'_>,
    ) -> Result<impl std::future::Future<Output = Result<Completed>> + Send + 'static> {
        let Completion {
            wf,
            node,
            idx,
            name,
            commit,
            ran,
            next,
            finish,
            handoff,
            pass_to,
            took_slot_of,
            unstarted,
            claimed,
        } = c;
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = crate::commit::DoneJob {
            req: crate::commit::DoneReq {
                wf: wf.to_string(),
                ran: ran.iter().map(|(i, n)| (*i, n.to_string())).collect(),
                idx,
                name: name.to_string(),
                node: node.to_string(),
                commit: commit.clone(),
                next: next.map(|n| (n.idx, n.name.to_string(), n.deadline_ms)),
                finish,
                handoff,
                pass_to: pass_to.map(str::to_string),
                took_slot_of: took_slot_of.map(str::to_string),
                unstarted,
                ending: claimed.filter(|_| finish && next.is_none()).map(Ending::of),
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
        Ok(async move {
            let d = rx
                .await
                .map_err(|_| StoreError::Corrupt("store", "the committer stopped".into()))??;
            Ok(Completed {
                events: d.events,
                cancel: d.cancel,
                handed: d.handed,
                ahead: d.ahead.into_iter().map(|(w, _, _)| w).collect(),
            })
        })
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
                    let w = load_for_update(tx, &wf)
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
    let w = load_for_update(tx, &wf)
        .await?
        .ok_or_else(|| lease_lost(&wf))?;
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
