//! Group commit of step completions.
//!
//! Every step completion is a write transaction, and with SQLite every statement is a hop to
//! the connection's thread; per transaction those hops, not the disk, set the pace. So the
//! completions that arrive while one commit runs are written together by one task: one
//! `BEGIN IMMEDIATE`, one statement each for the lease guard, the step rows and the events of
//! the whole group, then `COMMIT`. Each completion keeps its own meaning — lease-guarded,
//! atomic with its effects, committed before its workflow's next step starts (its caller
//! waits for the reply) — only the transaction is shared. If the group's transaction fails,
//! each completion is retried alone so that one bad completion cannot fail the others.

use crate::workflows::{
    Claimed, Deferred, Ending, Handoff, NextStep, StepCommit, WorkflowEvent, WorkflowKind,
    WorkflowOutcome, ending_from, fill_batch, finish_rest, lease_lost,
};
use crate::{Result, Store, now_ms};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

/// Most completions in one transaction.
const MAX_GROUP: usize = 64;

pub(crate) struct DoneJob {
    pub wf: String,
    pub idx: u32,
    pub name: String,
    pub node: String,
    pub commit: StepCommit,
    pub next: Option<(u32, String, i64)>,
    pub finish: bool,
    pub handoff: Option<Handoff>,
    pub reply: oneshot::Sender<Result<Done>>,
}

/// A completion's events, whether a cancel was requested, and the batch node handed to it.
pub(crate) type Done = (Vec<WorkflowEvent>, bool, Option<Claimed>);

pub(crate) fn spawn(store: Store) -> mpsc::UnboundedSender<DoneJob> {
    let (tx, mut rx) = mpsc::unbounded_channel::<DoneJob>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            // Let the tasks that are about to finish a step queue theirs into this group.
            tokio::task::yield_now().await;
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            if group.len() == 1 {
                let j = group.pop().expect("one");
                let r = store.single(&j).await;
                let _ = j.reply.send(r);
                continue;
            }
            match store.group(&group).await {
                Ok(results) => {
                    for (j, r) in group.into_iter().zip(results) {
                        let _ = j.reply.send(r);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "group commit failed; committing one by one");
                    for j in group {
                        let r = store.single(&j).await;
                        let _ = j.reply.send(r);
                    }
                }
            }
        }
    });
    tx
}

impl Store {
    async fn single(&self, j: &DoneJob) -> Result<Done> {
        self.step_done_single(
            &j.wf,
            j.idx,
            &j.name,
            &j.node,
            &j.commit,
            j.next.as_ref().map(|(idx, name, deadline_ms)| NextStep {
                idx: *idx,
                name,
                deadline_ms: *deadline_ms,
            }),
            j.finish,
            j.handoff.as_ref(),
        )
        .await
    }

    /// Commits a group; per job its events and cancel flag, or its lease-lost error.
    #[allow(clippy::type_complexity)]
    async fn group(&self, jobs: &[DoneJob]) -> Result<Vec<Result<Done>>> {
        let mut tx = self.write().await?;
        let now = now_ms();
        // 1. Lease guard and move on, for all at once.
        //    A job whose last step this was also ends its workflow here (succeeded, lease
        //    dropped) unless a cancel was requested: the rest of the ending follows in step 4.
        let values = (0..jobs.len())
            .map(|i| {
                let b = 4 * i + 2;
                format!("(${b}, ${}, ${}, ${})", b + 1, b + 2, b + 3)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "WITH v(id, step, node, fin) AS (VALUES {values})
             UPDATE workflows SET step = v.step, attempt = 0, updated_at = $1,
                 status = CASE WHEN v.fin = 1 AND cancel_requested = 0 THEN 'succeeded'
                     ELSE status END,
                 lease_owner = CASE WHEN v.fin = 1 AND cancel_requested = 0 THEN NULL
                     ELSE lease_owner END,
                 lease_until = CASE WHEN v.fin = 1 AND cancel_requested = 0 THEN NULL
                     ELSE lease_until END,
                 finished_at = CASE WHEN v.fin = 1 AND cancel_requested = 0 THEN $1
                     ELSE finished_at END
             FROM v WHERE workflows.id = v.id AND workflows.lease_owner = v.node
             RETURNING workflows.id AS id, workflows.cancel_requested AS cancel,
                 workflows.kind AS kind, workflows.definition AS definition,
                 workflows.vm_id AS vm_id, workflows.node AS node,
                 workflows.batch_id AS batch_id"
        );
        let fin = |j: &DoneJob| j.finish && j.next.is_none();
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for j in jobs {
            q = q
                .bind(&j.wf)
                .bind(i64::from(j.idx) + 1)
                .bind(&j.node)
                .bind(i64::from(fin(j)));
        }
        let mut held: std::collections::HashMap<String, bool> = Default::default();
        let mut endings: std::collections::HashMap<String, Ending> = Default::default();
        for r in q.fetch_all(&mut *tx).await? {
            let id: String = r.try_get("id")?;
            let cancel = r.try_get::<i64, _>("cancel")? != 0;
            if !cancel {
                endings.insert(id.clone(), ending_from(&r, &id)?);
            }
            held.insert(id, cancel);
        }
        let mut out: Vec<Result<Done>> = jobs
            .iter()
            .map(|j| match held.get(&j.wf) {
                Some(&c) => Ok((vec![], c, None)),
                None => Err(lease_lost(&j.wf)),
            })
            .collect();
        // 2. The rest of the endings: created VMs marked running, dependents released and
        //    batch slots filled in a few statements for the whole group; anything else one
        //    by one. Then each finishing batch node hands its slot on.
        let mut deferred = Deferred::default();
        let mut ends: Vec<Option<(&'static str, String)>> = vec![None; jobs.len()];
        let mut vms: Vec<String> = vec![];
        let mut finished: Vec<String> = vec![];
        let mut batches: Vec<String> = vec![];
        for (i, j) in jobs.iter().enumerate() {
            if !fin(j) {
                continue;
            }
            let (Ok((v, false, _)), Some(w)) = (&mut out[i], endings.get(&j.wf)) else {
                continue;
            };
            match (&w.vm_id, w.kind) {
                (Some(vm), WorkflowKind::CreateVm) => {
                    vms.push(vm.clone());
                    finished.push(j.wf.clone());
                    batches.extend(w.batch_id.clone());
                    ends[i] = Some(("succeeded", format!("{} succeeded", w.definition)));
                }
                _ => {
                    let (evs, _) = finish_rest(
                        &mut tx,
                        w,
                        &WorkflowOutcome::Succeeded,
                        Some(&mut deferred),
                        now,
                    )
                    .await?;
                    v.extend(evs);
                    ends[i] = deferred.events.pop().map(|(_, kind, msg)| (kind, msg));
                }
            }
        }
        if !vms.is_empty() {
            let list = serde_json::to_string(&vms).unwrap_or_default();
            sqlx::query(
                "UPDATE vms SET status = 'running', error = NULL, updated_at = $2
                 WHERE id IN (SELECT value FROM json_each($1))",
            )
            .bind(&list)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let actor = crate::Actor::engine();
            sqlx::query(
                "INSERT INTO audit (at, actor, source, action, target, result, detail)
                 SELECT $2, $3, $4, 'vm.create', owner || '/' || name, 'ok', ip FROM vms
                 WHERE id IN (SELECT value FROM json_each($1))",
            )
            .bind(&list)
            .bind(now)
            .bind(&actor.name)
            .bind(&actor.source)
            .execute(&mut *tx)
            .await?;
            let list = serde_json::to_string(&finished).unwrap_or_default();
            let released: Vec<Option<String>> = sqlx::query_scalar(
                "UPDATE workflows SET waiting_on = waiting_on - (SELECT COUNT(*) FROM workflow_deps d
                     WHERE d.workflow_id = workflows.id
                       AND d.depends_on IN (SELECT value FROM json_each($1)))
                 WHERE status = 'pending' AND id IN (SELECT workflow_id FROM workflow_deps
                     WHERE depends_on IN (SELECT value FROM json_each($1)))
                 RETURNING batch_id",
            )
            .bind(&list)
            .fetch_all(&mut *tx)
            .await?;
            batches.extend(released.into_iter().flatten());
            batches.sort_unstable();
            batches.dedup();
            for b in &batches {
                fill_batch(&mut tx, b).await?;
            }
        }
        // The first steps of the handed-on nodes: (job, workflow, step, name, deadline).
        let mut starts: Vec<(usize, String, u32, String, i64)> = vec![];
        let mut wants: std::collections::BTreeMap<(&str, &str), Vec<usize>> = Default::default();
        for (i, j) in jobs.iter().enumerate() {
            let (Some(_), Some(w)) = (&j.handoff, endings.get(&j.wf)) else {
                continue;
            };
            if let (true, Ok((_, false, _)), Some(b)) = (fin(j), &out[i], &w.batch_id) {
                wants
                    .entry((b.as_str(), j.node.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        for ((b, node), idxs) in wants {
            let Some(h) = &jobs[idxs[0]].handoff else {
                continue;
            };
            let (claimed, started) =
                Store::lease_batch_many(&mut tx, b, node, h.lease_ms, idxs.len(), &*h.deadline_ms)
                    .await?;
            for (k, idx, name, dl) in started {
                starts.push((idxs[k], claimed[k].0.id.clone(), idx, name, dl));
            }
            for (i, c) in idxs.into_iter().zip(claimed) {
                if let Ok((_, _, next)) = &mut out[i] {
                    *next = Some(c);
                }
            }
        }
        // 3. Steps done, and next steps started (unless cancelled), with the handed-on ones.
        let mut rows: Vec<(&str, u32, i64, Option<String>, i64)> = vec![];
        for j in jobs {
            let Some(&cancel) = held.get(&j.wf) else {
                continue;
            };
            rows.push((
                &j.wf,
                j.idx,
                0,
                j.commit.output.as_ref().map(|o| o.to_string()),
                0,
            ));
            if let (Some((idx, _, dl)), false) = (&j.next, cancel) {
                rows.push((&j.wf, *idx, 1, None, now + dl));
            }
        }
        for (_, wf, idx, _, dl) in &starts {
            rows.push((wf, *idx, 1, None, *dl));
        }
        if !rows.is_empty() {
            let values = (0..rows.len())
                .map(|i| {
                    let b = 5 * i + 2;
                    format!("(${b}, ${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "WITH v(wf, idx, start, out, dl) AS (VALUES {values})
                 UPDATE workflow_steps SET
                     status = CASE WHEN v.start = 1 THEN 'running' ELSE 'done' END,
                     error = CASE WHEN v.start = 1 THEN workflow_steps.error ELSE NULL END,
                     finished_at = CASE WHEN v.start = 1 THEN workflow_steps.finished_at ELSE $1 END,
                     output = CASE WHEN v.start = 1 THEN workflow_steps.output ELSE v.out END,
                     attempts = workflow_steps.attempts + v.start,
                     started_at = CASE WHEN v.start = 1 THEN $1 ELSE workflow_steps.started_at END,
                     deadline_at = CASE WHEN v.start = 1 THEN v.dl ELSE workflow_steps.deadline_at END
                 FROM v WHERE workflow_steps.workflow_id = v.wf AND workflow_steps.idx = v.idx"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for (wf, idx, start, out, dl) in &rows {
                q = q
                    .bind(*wf)
                    .bind(i64::from(*idx))
                    .bind(*start)
                    .bind(out.clone())
                    .bind(*dl);
            }
            q.execute(&mut *tx).await?;
        }
        // 4. Effects (the outbox), each with its step.
        for j in jobs.iter().filter(|j| held.contains_key(&j.wf)) {
            for (key, payload) in &j.commit.effects {
                sqlx::query(
                    "INSERT INTO step_effects (workflow_id, idx, key, payload, at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&j.wf)
                .bind(i64::from(j.idx))
                .bind(key)
                .bind(payload.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        // 5. Events, in one insert: per job its step's, then its end.
        //    The handed-on nodes' start events go to their claims (`true`).
        let mut evs: Vec<(usize, bool, Option<String>, &'static str, String)> = vec![];
        for (i, j) in jobs.iter().enumerate() {
            let Some(&cancel) = held.get(&j.wf) else {
                continue;
            };
            evs.push((
                i,
                false,
                Some(j.name.clone()),
                "step_done",
                format!("{} done", j.name),
            ));
            if let (Some((_, name, _)), false) = (&j.next, cancel) {
                evs.push((
                    i,
                    false,
                    Some(name.clone()),
                    "step_started",
                    format!("{name} started"),
                ));
            }
            if let Some((kind, msg)) = ends[i].take() {
                evs.push((i, false, None, kind, msg));
            }
        }
        for (i, _, _, name, _) in &starts {
            evs.push((
                *i,
                true,
                Some(name.clone()),
                "step_started",
                format!("{name} started"),
            ));
        }
        let wf_of = |i: usize, claim: bool| -> String {
            match (&out[i], claim) {
                (Ok((_, _, Some(c))), true) => c.0.id.clone(),
                _ => jobs[i].wf.clone(),
            }
        };
        let ids: Vec<String> = evs.iter().map(|e| wf_of(e.0, e.1)).collect();
        if !evs.is_empty() {
            let values = (0..evs.len())
                .map(|i| {
                    let b = 4 * i + 2;
                    format!("(${b}, $1, ${}, ${}, ${})", b + 1, b + 2, b + 3)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
                 VALUES {values}"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
            for ((_, _, step, kind, msg), id) in evs.iter().zip(&ids) {
                q = q.bind(id).bind(step).bind(*kind).bind(msg);
            }
            // One statement under the write lock numbers its rows consecutively (no rows to
            // ship back: the last number says them all).
            let last = q.execute(&mut *tx).await?.last_insert_rowid();
            let first = last + 1 - evs.len() as i64;
            for ((seq, (i, claim, step, kind, message)), id) in (first..=last).zip(evs).zip(ids) {
                let ev = WorkflowEvent {
                    seq,
                    operation_id: id,
                    at: now,
                    step,
                    kind: kind.to_string(),
                    message,
                };
                match &mut out[i] {
                    Ok((_, _, Some(c))) if claim => c.1.push(ev),
                    Ok((v, _, _)) if !claim => v.push(ev),
                    _ => {}
                }
            }
        }
        // 6. The audit records of the VMs that came up, in one insert.
        if !deferred.audits.is_empty() {
            let actor = crate::Actor::engine();
            let values = (0..deferred.audits.len())
                .map(|i| {
                    let b = 2 * i + 4;
                    format!("($1, $2, $3, 'vm.create', ${b}, 'ok', ${})", b + 1)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO audit (at, actor, source, action, target, result, detail) VALUES {values}"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind(&actor.name)
                .bind(&actor.source);
            for (target, ip) in &deferred.audits {
                q = q.bind(target).bind(ip);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(out)
    }
}
