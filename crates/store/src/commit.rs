//! Group commit of step completions, written once over `db::Tx`, and the two ways it runs.
//!
//! Every step completion is a write transaction. Completions that arrive together share one:
//! each keeps its own meaning — lease-guarded, atomic with its effects and children, committed
//! before its workflow's next step starts (its caller waits for the reply) — only the
//! transaction is shared. If a group fails, each completion is retried alone so that one bad
//! completion cannot fail the others. [`commit_group`] sends each group in a few batches of
//! statements (the lease-guarded moves, the rows of the others, then every write), which
//! PostgreSQL pipelines in one round trip each.
//!
//! - SQLite: one OS thread owns the write connection. It runs every write transaction of the
//!   store ([`Job::Tx`]) and groups the completions queued while its last transaction ran
//!   ([`Job::Done`]); being the only writer of this process, it never waits in SQLite's busy
//!   handler for itself. A second thread checkpoints the WAL in quiet moments, off every
//!   commit path.
//! - PostgreSQL: a task groups the completions likewise and commits up to two groups at once on
//!   pooled connections (a group does not wait for the previous one's commit).

use crate::db::sqlite::{SqliteTx, run_ready};
use crate::db::{Db, Row, Stmt, Tx, stmt};
use crate::hooks::Registry;
use crate::vms::{Prefetched, VM_AND_KEY, vm_from};
use crate::workflows::{
    Claimed, ENDING_COLS, Ending, Handoff, ResourceRef, StepCommit, WorkflowEvent, WorkflowOutcome,
    WorkflowStatus, clock, ending_from, fill_batch_in, insert_stmts, lease_lost, skip_locked,
};
use crate::{Result, StoreError};
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Most completions in one transaction.
const MAX_GROUP: usize = 64;
/// Groups committing at once on PostgreSQL.
const PG_IN_FLIGHT: usize = 2;

/// One step completion to record.
#[derive(Clone)]
pub(crate) struct DoneReq {
    pub wf: String,
    pub idx: u32,
    pub name: String,
    pub node: String,
    pub commit: StepCommit,
    pub next: Option<(u32, String, i64)>,
    pub finish: bool,
    pub handoff: Option<Handoff>,
}

pub(crate) struct DoneJob {
    pub req: DoneReq,
    pub reply: oneshot::Sender<Result<Done>>,
}

/// A completion's events, whether a cancel was requested, and the batch node handed to it.
pub(crate) type Done = (Vec<WorkflowEvent>, bool, Option<Claimed>);

/// What the SQLite write thread does: a step completion (grouped with others queued at the
/// same time), or one whole write transaction of the store's (see `db::sqlite`).
pub(crate) enum Job {
    Done(Box<DoneJob>),
    Tx(Box<dyn FnOnce(&mut Connection) + Send>),
    /// The store is closing: the thread ends (later sends fail as `Closed`).
    Stop,
}

/// Where a store sends its step completions.
#[derive(Clone, Debug)]
pub(crate) enum Committer {
    /// The SQLite write thread (through `Db::Sqlite`).
    Thread,
    /// The PostgreSQL grouping task.
    Task(tokio::sync::mpsc::UnboundedSender<DoneJob>),
}

/// Starts the SQLite write thread and the checkpoint thread for the database at `path`.
pub(crate) fn spawn(
    path: &Path,
    prefetched: Arc<Prefetched>,
    hooks: Registry,
) -> Result<(mpsc::Sender<Job>, Arc<AtomicU64>)> {
    let mut conn = crate::db::sqlite::open(path)?;
    let ckpt = crate::db::sqlite::open(path)?;
    // A checkpoint copies frames through its own buffer; this connection needs no page cache.
    ckpt.pragma_update(None, "cache_size", -64)?;
    let wrote = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Job>();
    let stop = Arc::new(AtomicBool::new(false));
    let w = wrote.clone();
    let commits = wrote.clone();
    let s = stop.clone();
    std::thread::Builder::new()
        .name("basphere-writer".into())
        .spawn(move || {
            let mut next = None;
            while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
                let first = match first {
                    Job::Tx(f) => {
                        f(&mut conn);
                        w.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Job::Stop => break,
                    Job::Done(j) => *j,
                };
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Job::Done(j)) => group.push(*j),
                        Ok(tx_job) => {
                            next = Some(tx_job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let (reqs, replies): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|j| (j.req, j.reply)).unzip();
                let results = sqlite_group(&mut conn, &reqs, &prefetched, &hooks);
                w.fetch_add(1, Ordering::Relaxed);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            s.store(true, Ordering::Relaxed);
        })
        .map_err(|e| StoreError::Corrupt("store", format!("starting the write thread: {e}")))?;
    std::thread::Builder::new()
        .name("basphere-ckpt".into())
        .spawn(move || checkpoints(ckpt, wrote, stop))
        .map_err(|e| {
            StoreError::Corrupt("store", format!("starting the checkpoint thread: {e}"))
        })?;
    Ok((tx, commits))
}

/// One group on the write thread's connection, each completion alone if the group fails.
fn sqlite_group(
    conn: &mut Connection,
    reqs: &[DoneReq],
    prefetched: &Prefetched,
    hooks: &Registry,
) -> Vec<Result<Done>> {
    let once = |conn: &mut Connection, reqs: &[DoneReq]| -> Result<Vec<Result<Done>>> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = run_ready(commit_group(
            &mut SqliteTx { conn: &mut *conn },
            reqs,
            prefetched,
            hooks,
        ));
        match r.and_then(|v| conn.execute_batch("COMMIT").map(|()| v).map_err(Into::into)) {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    };
    match once(conn, reqs) {
        Ok(v) => v,
        Err(e) if reqs.len() > 1 => {
            tracing::debug!(error = %e, "group commit failed; committing one by one");
            reqs.iter()
                .map(|r| {
                    once(conn, std::slice::from_ref(r))
                        .and_then(|mut v| v.pop().expect("one result"))
                })
                .collect()
        }
        Err(e) => vec![Err(e)],
    }
}

/// Starts the PostgreSQL grouping task over `db`.
pub(crate) fn spawn_pg(
    db: Db,
    prefetched: Arc<Prefetched>,
    hooks: Registry,
) -> tokio::sync::mpsc::UnboundedSender<DoneJob> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DoneJob>();
    let slots = Arc::new(tokio::sync::Semaphore::new(PG_IN_FLIGHT));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (db, prefetched, hooks) = (db.clone(), prefetched.clone(), hooks.clone());
            tokio::spawn(async move {
                let (reqs, replies): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|j| (j.req, j.reply)).unzip();
                let reqs = Arc::new(reqs);
                let results = match pg_group(&db, reqs.clone(), &prefetched, &hooks).await {
                    Ok(v) => v,
                    Err(e) if reqs.len() > 1 => {
                        tracing::debug!(error = %e, "group commit failed; committing one by one");
                        let mut out = Vec::with_capacity(reqs.len());
                        for r in reqs.iter() {
                            let one = Arc::new(vec![r.clone()]);
                            out.push(
                                pg_group(&db, one, &prefetched, &hooks)
                                    .await
                                    .and_then(|mut v| v.pop().expect("one result")),
                            );
                        }
                        out
                    }
                    Err(e) => vec![Err(e)],
                };
                drop(permit);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            });
        }
    });
    tx
}

async fn pg_group(
    db: &Db,
    reqs: Arc<Vec<DoneReq>>,
    prefetched: &Arc<Prefetched>,
    hooks: &Registry,
) -> Result<Vec<Result<Done>>> {
    let (prefetched, hooks) = (prefetched.clone(), hooks.clone());
    db.write(move |tx| Box::pin(async move { commit_group(tx, &reqs, &prefetched, &hooks).await }))
        .await
}

/// Copies the WAL back into the database. It waits for a quiet moment (a checkpoint then
/// completes and the next commit starts the WAL over, which is also cheaper than appending),
/// but not for longer than a few seconds of continuous writing; PASSIVE never blocks a writer.
fn checkpoints(conn: Connection, wrote: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    const TICK: Duration = Duration::from_millis(100);
    let (mut seen, mut done) = (0, 0);
    let mut ticks = 0u32;
    loop {
        std::thread::sleep(TICK);
        let now = wrote.load(Ordering::Relaxed);
        let stopping = stop.load(Ordering::Relaxed);
        let quiet = now == seen;
        seen = now;
        ticks += 1;
        // Other processes' writes do not count here, so look now and then anyway.
        if (quiet && now != done) || ticks >= 40 || stopping {
            done = now;
            ticks = 0;
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "WAL checkpoint failed; trying again later");
            }
        }
        if stopping {
            return;
        }
    }
}

/// What a completion found when its workflow did not simply move on.
struct Found {
    cancel: bool,
    end: Ending,
}

/// How each completion's results are read back from the batch of writes.
struct Plan {
    /// Index of the event insert in the batch, and the events it wrote (seq filled in after).
    events: (usize, Vec<WorkflowEvent>),
    /// Index of the statement releasing its dependents (RETURNING their batches), if any.
    released: Option<usize>,
    cancel: bool,
}

/// Records a group of completions in the caller's transaction; per completion its outcome or
/// `LeaseLost`.
pub(crate) async fn commit_group(
    tx: &mut dyn Tx,
    reqs: &[DoneReq],
    prefetched: &Prefetched,
    hooks: &Registry,
) -> Result<Vec<Result<Done>>> {
    let now = clock(tx).await?;
    let fin = |j: &DoneReq| j.finish && j.next.is_none() && j.commit.children.is_empty();
    let spawns = |j: &DoneReq| !j.commit.children.is_empty();

    // 1. The lease guard and the move on in one statement when no cancel is pending and the
    //    workflow goes on (it sets no indexed column: the update stays HOT on PostgreSQL).
    let fast: Vec<usize> = (0..reqs.len())
        .filter(|&i| !fin(&reqs[i]) && !spawns(&reqs[i]))
        .collect();
    let moves: Vec<Stmt> = fast
        .iter()
        .map(|&i| {
            let j = &reqs[i];
            stmt!(
                "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3
                 WHERE id = $1 AND lease_owner = $4 AND cancel_requested = 0",
                j.wf.as_str(),
                i64::from(j.idx) + 1,
                now,
                j.node.as_str(),
            )
        })
        .collect();
    let mut moved = vec![false; reqs.len()];
    for (&i, n) in fast.iter().zip(tx.exec_many(&moves).await?) {
        moved[i] = n == 1;
    }

    // 2. The others' rows: the lease, a pending cancel, what an ending needs.
    let slow: Vec<usize> = (0..reqs.len()).filter(|&i| !moved[i]).collect();
    let sql =
        format!("SELECT cancel_requested, lease_owner, {ENDING_COLS} FROM workflows WHERE id = $1");
    let reads: Vec<Stmt> = slow
        .iter()
        .map(|&i| stmt!(sql.clone(), reqs[i].wf.as_str()))
        .collect();
    let mut found: Vec<Option<Result<Found>>> = (0..reqs.len()).map(|_| None).collect();
    for (&i, rows) in slow.iter().zip(tx.query_many(&reads).await?) {
        let j = &reqs[i];
        found[i] = Some(match rows.first() {
            Some(r) if r_opt_text(r, "lease_owner")?.as_deref() == Some(j.node.as_str()) => {
                Ok(Found {
                    cancel: r_int(r, "cancel_requested")? != 0,
                    end: ending_from(r, &j.wf)?,
                })
            }
            _ => Err(lease_lost(&j.wf)),
        });
    }

    // 3. Every write of every completion, in one batch.
    let mut batch: Vec<Stmt> = vec![];
    let mut plans: Vec<Option<Plan>> = Vec::with_capacity(reqs.len());
    let mut fills: Vec<String> = vec![];
    let mut wants: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    let mut failed: Vec<Option<StoreError>> = (0..reqs.len()).map(|_| None).collect();
    for (i, j) in reqs.iter().enumerate() {
        let (cancel, end) = match found[i].take() {
            None => (false, None),
            Some(Err(e)) => {
                failed[i] = Some(e);
                plans.push(None);
                continue;
            }
            Some(Ok(f)) => (f.cancel, Some(f.end)),
        };
        let wf = j.wf.as_str();
        let step = i64::from(j.idx) + 1;
        if !moved[i] {
            batch.push(if spawns(j) && !cancel {
                // The parent waits, unleased, for the children queued below.
                stmt!(
                    "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3,
                         lease_owner = NULL, lease_until = NULL, next_run_at = $3,
                         waiting_on = waiting_on + $4
                     WHERE id = $1",
                    wf,
                    step,
                    now,
                    j.commit.children.len() as i64,
                )
            } else if fin(j) && !cancel {
                stmt!(
                    "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3,
                         status = 'succeeded', lease_owner = NULL, lease_until = NULL,
                         finished_at = $3
                     WHERE id = $1",
                    wf,
                    step,
                    now,
                )
            } else {
                stmt!(
                    "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3 WHERE id = $1",
                    wf,
                    step,
                    now,
                )
            });
        }
        batch.push(stmt!(
            "UPDATE workflow_steps SET status = 'done', error = NULL, finished_at = $3,
                 output = $4 WHERE workflow_id = $1 AND idx = $2",
            wf,
            j.idx,
            now,
            j.commit.output.as_ref().map(|o| o.to_string()),
        ));
        for (key, payload) in &j.commit.effects {
            batch.push(stmt!(
                "INSERT INTO step_effects (workflow_id, idx, key, payload, at)
                 VALUES ($1, $2, $3, $4, $5)",
                wf,
                j.idx,
                key.as_str(),
                payload.to_string(),
                now,
            ));
        }
        let ev = |step: Option<&str>, kind: &str, message: String| WorkflowEvent {
            seq: 0,
            operation_id: j.wf.clone(),
            at: now,
            step: step.map(str::to_string),
            kind: kind.to_string(),
            message,
        };
        let done = ev(Some(&j.name), "step_done", format!("{} done", j.name));
        let mut released = None;
        let evs = if spawns(j) && !cancel {
            // Queued with the step's completion: a crash keeps both or neither. (A cancel
            // asked for meanwhile wins: the parent undoes instead of spawning.)
            for c in &j.commit.children {
                let id = uuid::Uuid::now_v7().to_string();
                batch.extend(insert_stmts(c, &id, Some(wf), now));
            }
            let n = j.commit.children.len();
            let msg = format!("{} spawned {n} child workflows; waiting for them", j.name);
            vec![done, ev(Some(&j.name), "spawned", msg)]
        } else if let (Some((idx, name, dl)), false) = (&j.next, cancel) {
            batch.push(stmt!(
                "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1,
                     started_at = $3, deadline_at = $4 WHERE workflow_id = $1 AND idx = $2",
                wf,
                *idx,
                now,
                now + dl,
            ));
            vec![
                done,
                ev(Some(name), "step_started", format!("{name} started")),
            ]
        } else if let (Some(end), true, false) = (&end, fin(j), cancel) {
            batch.extend(hooks.ending(end, &WorkflowOutcome::Succeeded, now));
            released = Some(batch.len());
            batch.push(stmt!(
                "UPDATE workflows SET waiting_on = waiting_on - 1 WHERE status = 'pending'
                   AND id IN (SELECT workflow_id FROM workflow_deps WHERE depends_on = $1)
                 RETURNING batch_id",
                wf
            ));
            if let Some(b) = &end.batch_id {
                fills.push(b.clone());
                if j.handoff.is_some() {
                    wants
                        .entry((b.clone(), j.node.clone()))
                        .or_default()
                        .push(i);
                }
            }
            let ended = format!("{} succeeded", end.definition);
            vec![done, ev(None, WorkflowStatus::Succeeded.as_str(), ended)]
        } else {
            vec![done]
        };
        let at = batch.len();
        batch.push(event_insert(&evs));
        plans.push(Some(Plan {
            events: (at, evs),
            released,
            cancel,
        }));
    }
    let results = tx.query_many(&batch).await?;

    let mut out: Vec<Result<Done>> = Vec::with_capacity(reqs.len());
    for (i, plan) in plans.into_iter().enumerate() {
        let Some(Plan {
            events: (at, mut evs),
            released,
            cancel,
        }) = plan
        else {
            out.push(Err(failed[i]
                .take()
                .unwrap_or_else(|| lease_lost(&reqs[i].wf))));
            continue;
        };
        let mut seqs = results[at]
            .iter()
            .map(|r| r_int(r, "seq"))
            .collect::<Result<Vec<_>>>()?;
        seqs.sort_unstable();
        for (e, s) in evs.iter_mut().zip(seqs) {
            e.seq = s;
        }
        if let Some(k) = released {
            for r in &results[k] {
                fills.extend(r_opt_text(r, "batch_id")?);
            }
        }
        out.push(Ok((evs, cancel, None)));
    }

    // 4. Batch slots: freed slots go to the next ready nodes, and each finishing batch node
    //    with a hand-off leases the next ready node of its batch.
    fills.sort_unstable();
    fills.dedup();
    for b in &fills {
        fill_batch_in(tx, b).await?;
    }
    for ((batch_id, node), idxs) in wants {
        let Some(h) = reqs[idxs[0]].handoff.clone() else {
            continue;
        };
        let claimed = lease_batch(tx, &batch_id, &node, &h, idxs.len(), now).await?;
        // Their first step reads their VM: hand it over from here.
        for (wf, _, _) in &claimed {
            if let Some(vm) = wf.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM))
                && let Some(r) = tx.query_opt(&stmt!(VM_AND_KEY, vm)).await?
            {
                prefetched.put(vm_from(&r)?, r_opt_text(&r, "owner_key")?);
            }
        }
        for (i, c) in idxs.into_iter().zip(claimed) {
            if let Ok((_, _, next)) = &mut out[i] {
                *next = Some(c);
            }
        }
    }
    Ok(out)
}

/// One INSERT of a completion's events (rows of one INSERT are numbered in order).
fn event_insert(evs: &[WorkflowEvent]) -> Stmt {
    let mut sql =
        String::from("INSERT INTO workflow_events (workflow_id, at, step, kind, message) VALUES ");
    let mut args = vec![];
    for (k, e) in evs.iter().enumerate() {
        let b = k * 5;
        if k > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5
        ));
        args.extend([
            e.operation_id.as_str().into(),
            e.at.into(),
            e.step.clone().into(),
            e.kind.as_str().into(),
            e.message.as_str().into(),
        ]);
    }
    sql.push_str(" RETURNING seq");
    Stmt::new(sql, args)
}

fn r_int(r: &Row, c: &str) -> Result<i64> {
    crate::db::Cols::int(r, c)
}

fn r_opt_text(r: &Row, c: &str) -> Result<Option<String>> {
    crate::db::Cols::opt_text(r, c)
}

/// Leases up to `max` ready nodes of `batch` to `node` and starts their current steps.
async fn lease_batch(
    tx: &mut dyn Tx,
    batch: &str,
    node: &str,
    h: &Handoff,
    max: usize,
    now: i64,
) -> Result<Vec<Claimed>> {
    let sql = format!(
        "SELECT id FROM workflows
         WHERE batch_id = $1 AND parked = 0 AND status IN ('pending', 'running', 'undoing')
           AND waiting_on = 0 AND next_run_at <= $2
           AND (lease_owner IS NULL OR lease_until < $2) AND cancel_requested = 0
         ORDER BY priority DESC, created_at LIMIT $3{}",
        skip_locked(tx)
    );
    let ids = tx
        .query(&stmt!(sql, batch, now, max as i64))
        .await?
        .iter()
        .map(|r| r.first_text().map(Option::unwrap_or_default))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.extend(
            crate::workflows::lease_in(tx, &id, node, now + h.lease_ms, now, &h.deadline_ms)
                .await?,
        );
    }
    Ok(out)
}
