//! Group commit of step completions on a dedicated write thread.
//!
//! Every step completion is a write transaction; with sqlx each statement would be a hop
//! between the async runtime and the connection's thread, and those hops, not SQLite, set
//! the pace. So completions go to one OS thread that owns its own connection: it takes
//! everything queued while its last transaction ran, writes it in one `BEGIN IMMEDIATE` with
//! cached prepared statements, commits, and replies. Each completion keeps its own meaning —
//! lease-guarded, atomic with its effects, committed before its workflow's next step starts
//! (its caller waits for the reply) — only the transaction is shared. If a group fails, each
//! completion is retried alone so that one bad completion cannot fail the others.
//!
//! The thread takes the store's writer lock around each transaction, so it never meets this
//! process's sqlx writes in SQLite's busy handler. Its connection does not checkpoint the WAL;
//! the checkpoint thread does that off the commit path.

use crate::hooks::Registry;
use crate::db::sqlite::run_on;
use crate::vms::{Prefetched, VM_AND_KEY, vm_from};
use crate::workflows::{
    Claimed, ENDING_COLS, Ending, FREE_SLOTS, Handoff, PARKED_READY, ResourceRef, StepCommit,
    StepStatus, UNPARK, WF_COLS, Workflow, WorkflowEvent, WorkflowOutcome, WorkflowStatus,
    ending_from, insert_stmts, lease_lost, step_from, workflow_from,
};
use crate::{Result, StoreError, now_ms};
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

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

/// What the write thread does: a step completion (grouped with others queued at the same
/// time), or one whole write transaction of the store's (see `db::sqlite`).
pub(crate) enum Job {
    Done(DoneJob),
    Tx(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// Starts the write thread and the checkpoint thread for the database at `path`.
pub(crate) fn spawn(
    path: &Path,
    lock: Arc<tokio::sync::Mutex<()>>,
    prefetched: Arc<Prefetched>,
    hooks: Registry,
) -> Result<mpsc::Sender<Job>> {
    let mut conn = crate::db::sqlite::open(path)?;
    let ckpt = crate::db::sqlite::open(path)?;
    // A checkpoint copies frames through its own buffer; this connection needs no page cache.
    ckpt.pragma_update(None, "cache_size", -64)?;
    let wrote = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Job>();
    let stop = Arc::new(AtomicBool::new(false));
    let w = wrote.clone();
    let s = stop.clone();
    std::thread::Builder::new()
        .name("basphere-writer".into())
        .spawn(move || {
            let mut next = None;
            while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
                let first = match first {
                    Job::Tx(f) => {
                        let guard = lock.blocking_lock();
                        f(&mut conn);
                        drop(guard);
                        w.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Job::Done(j) => j,
                };
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Job::Done(j)) => group.push(j),
                        Ok(tx_job) => {
                            next = Some(tx_job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let guard = lock.blocking_lock();
                let results = match commit_group(&mut conn, &group, &prefetched, &hooks) {
                    Ok(r) => r,
                    Err(e) if group.len() > 1 => {
                        tracing::debug!(error = %e, "group commit failed; committing one by one");
                        group
                            .iter()
                            .map(|j| {
                                commit_group(
                                    &mut conn,
                                    std::slice::from_ref(j),
                                    &prefetched,
                                    &hooks,
                                )
                                .and_then(|mut v| v.pop().expect("one result"))
                            })
                            .collect()
                    }
                    Err(e) => vec![Err(e)],
                };
                drop(guard);
                w.fetch_add(1, Ordering::Relaxed);
                for (j, r) in group.into_iter().zip(results) {
                    let _ = j.reply.send(r);
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
    Ok(tx)
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
        // Other writers (sqlx, other processes) do not count here, so look now and then anyway.
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

/// One group's transaction; per job its outcome (or lease-lost error).
fn commit_group(
    conn: &mut Connection,
    jobs: &[DoneJob],
    prefetched: &Prefetched,
    hooks: &Registry,
) -> Result<Vec<Result<Done>>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let mut out: Vec<Result<Done>> = Vec::with_capacity(jobs.len());
    // Batches whose free slots go to their next ready nodes, and (batch, node) → jobs that
    // hand their slot on.
    let mut fills: Vec<String> = vec![];
    let mut wants: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        let fin = j.finish && j.next.is_none() && j.commit.children.is_empty();
        let spawns = !j.commit.children.is_empty();
        // The lease guard and the move on in one statement when no cancel is pending and the
        // workflow goes on (it sets no indexed column: one row, no index). Otherwise read the
        // row first: a last step also ends the workflow unless a cancel was requested.
        // (No RETURNING in this module: SQLite buffers its rows in a temporary b-tree it
        // builds and drops per statement.)
        let moved = !fin
            && !spawns
            && tx
                .prepare_cached(
                    "UPDATE workflows SET step = ?2, attempt = 0, updated_at = ?3
                     WHERE id = ?1 AND lease_owner = ?4 AND cancel_requested = 0",
                )?
                .execute(params![j.wf, i64::from(j.idx) + 1, now, j.node])?
                == 1;
        let (cancel, end) = if moved {
            (false, None)
        } else {
            let row = {
                let mut st = tx.prepare_cached(&format!(
                    "SELECT cancel_requested, lease_owner, {ENDING_COLS} FROM workflows WHERE id = ?1"
                ))?;
                let mut rows = st.query(params![j.wf])?;
                match rows.next()? {
                    Some(r) => Some((
                        r.get::<_, i64>("cancel_requested")? != 0,
                        ending_from(r, &j.wf)?,
                        r.get::<_, Option<String>>("lease_owner")?,
                    )),
                    None => None,
                }
            };
            let Some((cancel, end, _)) = row.filter(|r| r.2.as_deref() == Some(j.node.as_str()))
            else {
                out.push(Err(lease_lost(&j.wf)));
                continue;
            };
            let sql = if spawns && !cancel {
                // The parent waits, unleased, for the children queued below.
                "UPDATE workflows SET step = ?2, attempt = 0, updated_at = ?3, lease_owner = NULL,
                     lease_until = NULL, next_run_at = ?3, waiting_on = waiting_on + ?4
                 WHERE id = ?1"
            } else if fin && !cancel {
                "UPDATE workflows SET step = ?2, attempt = 0, updated_at = ?3, status = 'succeeded',
                     lease_owner = NULL, lease_until = NULL, finished_at = ?3 WHERE id = ?1"
            } else {
                "UPDATE workflows SET step = ?2, attempt = 0, updated_at = ?3 WHERE id = ?1"
            };
            let mut st = tx.prepare_cached(sql)?;
            if spawns && !cancel {
                let n = j.commit.children.len() as i64;
                st.execute(params![j.wf, i64::from(j.idx) + 1, now, n])?;
            } else {
                st.execute(params![j.wf, i64::from(j.idx) + 1, now])?;
            }
            (cancel, Some(end).filter(|_| fin && !cancel))
        };
        let mut evs = vec![];
        tx.prepare_cached(
            "UPDATE workflow_steps SET status = 'done', error = NULL, finished_at = ?3,
                 output = ?4 WHERE workflow_id = ?1 AND idx = ?2",
        )?
        .execute(params![
            j.wf,
            j.idx,
            now,
            j.commit.output.as_ref().map(|o| o.to_string())
        ])?;
        for (key, payload) in &j.commit.effects {
            tx.prepare_cached(
                "INSERT INTO step_effects (workflow_id, idx, key, payload, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![j.wf, j.idx, key, payload.to_string(), now])?;
        }
        let done = format!("{} done", j.name);
        if spawns && !cancel {
            // Queued with the step's completion: a crash keeps both or neither. (A cancel
            // asked for meanwhile wins: the parent undoes instead of spawning.)
            for c in &j.commit.children {
                let id = uuid::Uuid::now_v7().to_string();
                run_on(&tx, &insert_stmts(c, &id, Some(&j.wf), now))?;
            }
            let n = j.commit.children.len();
            let spawned = format!("{} spawned {n} child workflows; waiting for them", j.name);
            evs.extend(event_pair(
                &tx,
                &j.wf,
                [
                    (Some(&j.name), "step_done", &done),
                    (Some(&j.name), "spawned", &spawned),
                ],
                now,
            )?);
            out.push(Ok((evs, cancel, None)));
            continue;
        }
        match (&j.next, cancel, end) {
            (Some((idx, name, dl)), false, _) => {
                start_step(&tx, &j.wf, *idx, now, now + dl)?;
                let started = format!("{name} started");
                evs.extend(event_pair(
                    &tx,
                    &j.wf,
                    [
                        (Some(&j.name), "step_done", &done),
                        (Some(name), "step_started", &started),
                    ],
                    now,
                )?);
            }
            (_, _, Some(end)) => {
                let ended = format!("{} succeeded", end.definition);
                evs.extend(event_pair(
                    &tx,
                    &j.wf,
                    [
                        (Some(&j.name), "step_done", &done),
                        (None, WorkflowStatus::Succeeded.as_str(), &ended),
                    ],
                    now,
                )?);
                succeed(&tx, hooks, &end, now, &mut fills)?;
                if let Some(b) = end.batch_id {
                    fills.push(b.clone());
                    if j.handoff.is_some() {
                        wants.entry((b, j.node.clone())).or_default().push(i);
                    }
                }
            }
            _ => evs.push(event(&tx, &j.wf, Some(&j.name), "step_done", &done, now)?),
        }
        out.push(Ok((evs, cancel, None)));
    }
    fills.sort_unstable();
    fills.dedup();
    let mut unparked: BTreeMap<String, std::collections::VecDeque<String>> = BTreeMap::new();
    for b in fills {
        // The nodes that will be handed on get their slot with their lease.
        let handed: usize = wants
            .iter()
            .filter(|((wb, _), _)| *wb == b)
            .map(|(_, v)| v.len())
            .sum();
        let ids = fill_batch(&tx, &b, handed)?;
        unparked.insert(b, ids.into());
    }
    // Each finishing batch node hands its slot to the next ready node of its batch (the
    // nodes just given slots first), leased to the same node, its first step started.
    for ((batch, node), idxs) in wants {
        let Some(h) = &jobs[idxs[0]].handoff else {
            continue;
        };
        let fresh = unparked.entry(batch.clone()).or_default();
        let claimed = lease_batch(&tx, &batch, fresh, &node, h, idxs.len(), now)?;
        // Their first step reads their VM: hand it over from here.
        for (wf, _, _) in &claimed {
            if let Some(vm) = wf.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)) {
                let mut st = tx.prepare_cached(VM_AND_KEY)?;
                let mut rows = st.query(params![vm])?;
                if let Some(r) = rows.next()? {
                    prefetched.put(vm_from(r)?, r.get("owner_key")?);
                }
            }
        }
        for (i, c) in idxs.into_iter().zip(claimed) {
            if let Ok((_, _, next)) = &mut out[i] {
                *next = Some(c);
            }
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Marks step `idx` of `wf` running (one more attempt) until `deadline`.
fn start_step(tx: &Connection, wf: &str, idx: u32, now: i64, deadline: i64) -> Result<()> {
    tx.prepare_cached(
        "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1,
             started_at = ?3, deadline_at = ?4 WHERE workflow_id = ?1 AND idx = ?2",
    )?
    .execute(params![wf, idx, now, deadline])?;
    Ok(())
}

fn event(
    tx: &Connection,
    wf: &str,
    step: Option<&str>,
    kind: &str,
    message: &str,
    now: i64,
) -> Result<WorkflowEvent> {
    tx.prepare_cached(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![wf, now, step, kind, message])?;
    Ok(WorkflowEvent {
        seq: tx.last_insert_rowid(),
        operation_id: wf.to_string(),
        at: now,
        step: step.map(str::to_string),
        kind: kind.to_string(),
        message: message.to_string(),
    })
}

/// Two events of one workflow in one statement (rows of one INSERT are numbered in order).
fn event_pair(
    tx: &Connection,
    wf: &str,
    evs: [(Option<&String>, &str, &String); 2],
    now: i64,
) -> Result<[WorkflowEvent; 2]> {
    let [(s1, k1, m1), (s2, k2, m2)] = evs;
    tx.prepare_cached(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         VALUES (?1, ?2, ?3, ?4, ?5), (?1, ?2, ?6, ?7, ?8)",
    )?
    .execute(params![wf, now, s1, k1, m1, s2, k2, m2])?;
    let last = tx.last_insert_rowid();
    let ev = |seq, step: Option<&String>, kind: &str, message: &String| WorkflowEvent {
        seq,
        operation_id: wf.to_string(),
        at: now,
        step: step.cloned(),
        kind: kind.to_string(),
        message: message.clone(),
    };
    Ok([ev(last - 1, s1, k1, m1), ev(last, s2, k2, m2)])
}

/// The rest of a success once the workflow row says so: its definition's hooks and its
/// dependents (their batches are added to `fills`).
fn succeed(
    tx: &Connection,
    hooks: &Registry,
    end: &Ending,
    now: i64,
    fills: &mut Vec<String>,
) -> Result<()> {
    run_on(tx, &hooks.ending(end, &WorkflowOutcome::Succeeded, now))?;
    let deps: Vec<String> = tx
        .prepare_cached("SELECT workflow_id FROM workflow_deps WHERE depends_on = ?1")?
        .query_map(params![end.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for d in deps {
        let released = tx
            .prepare_cached(
                "UPDATE workflows SET waiting_on = waiting_on - 1 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![d])?;
        if released == 1 {
            let batch: Option<String> = tx
                .prepare_cached("SELECT batch_id FROM workflows WHERE id = ?1")?
                .query_row(params![d], |r| r.get(0))?;
            fills.extend(batch);
        }
    }
    Ok(())
}

/// Hands the free slots of `batch` to its ready parked nodes, in queue order; returns them.
/// The first `handed` are left for [`lease_batch`] to unpark with their lease.
/// (No `IN` lists and no bound `LIMIT`: SQLite builds a table for the one and, with STAT4,
/// re-prepares the statement for the other on every run.)
fn fill_batch(tx: &Connection, batch: &str, handed: usize) -> Result<Vec<String>> {
    let free: i64 = tx
        .prepare_cached(FREE_SLOTS)?
        .query_row(params![batch], |r| r.get(0))?;
    if free <= 0 {
        return Ok(vec![]);
    }
    // No bound LIMIT here: the rows are taken lazily instead.
    let ids: Vec<String> = tx
        .prepare_cached(PARKED_READY)?
        .query_map(params![batch], |r| r.get(0))?
        .take(free as usize)
        .collect::<rusqlite::Result<_>>()?;
    for id in ids.iter().skip(handed) {
        unpark(tx, id)?;
    }
    Ok(ids)
}

fn unpark(tx: &Connection, id: &str) -> Result<()> {
    tx.prepare_cached(UNPARK)?.execute(params![id])?;
    Ok(())
}

/// Leases up to `max` ready nodes of `batch` to `node` and starts their current steps:
/// the nodes in `fresh` (just given slots) first, then any other ready one.
fn lease_batch(
    tx: &Connection,
    batch: &str,
    fresh: &mut std::collections::VecDeque<String>,
    node: &str,
    h: &Handoff,
    max: usize,
    now: i64,
) -> Result<Vec<Claimed>> {
    let mut ids: Vec<String> = fresh.drain(..max.min(fresh.len())).collect();
    let n_fresh = ids.len();
    if ids.len() < max {
        let more: Vec<String> = tx
            .prepare_cached(
                "SELECT id FROM workflows
                 WHERE batch_id = ?1 AND parked = 0 AND status IN ('pending', 'running', 'undoing')
                   AND waiting_on = 0 AND next_run_at <= ?2
                   AND (lease_owner IS NULL OR lease_until < ?2) AND cancel_requested = 0
                 ORDER BY priority DESC, created_at",
            )?
            .query_map(params![batch, now], |r| r.get(0))?
            .filter(|id| !matches!(id, Ok(id) if ids.contains(id)))
            .take(max - ids.len())
            .collect::<rusqlite::Result<_>>()?;
        ids.extend(more);
    }
    let mut wfs: Vec<Workflow> = Vec::with_capacity(ids.len());
    for (k, id) in ids.into_iter().enumerate() {
        let leased = tx
            .prepare_cached(
                "UPDATE workflows SET parked = 0, lease_owner = ?2, lease_until = ?3, updated_at = ?4,
                     status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
                 WHERE id = ?1 AND (lease_owner IS NULL OR lease_until < ?4)
                   AND cancel_requested = 0",
            )?
            .execute(params![id, node, now + h.lease_ms, now])?;
        if leased == 1 {
            let mut st =
                tx.prepare_cached(&format!("SELECT {WF_COLS} FROM workflows WHERE id = ?1"))?;
            let mut rows = st.query(params![id])?;
            if let Some(r) = rows.next()? {
                wfs.push(workflow_from(r, vec![])?);
            }
        } else if k < n_fresh {
            // Not leasable after all (a cancel is pending): it keeps the slot fill gave it.
            unpark(tx, &id)?;
        }
    }
    let mut out = Vec::with_capacity(wfs.len());
    for mut wf in wfs {
        {
            let mut st = tx.prepare_cached(
                "SELECT * FROM workflow_steps WHERE workflow_id = ?1 ORDER BY idx",
            )?;
            let mut rows = st.query(params![wf.id])?;
            while let Some(r) = rows.next()? {
                wf.steps.push(step_from(r)?);
            }
        }
        let mut evs = vec![];
        let mut started = false;
        let runnable = wf.status == WorkflowStatus::Running && !wf.cancel_requested;
        if let (true, Ok(i)) = (runnable, usize::try_from(wf.step))
            && i < wf.steps.len()
            && let Some(d) = (h.deadline_ms)(&wf)
        {
            let rec = &mut wf.steps[i];
            start_step(tx, &wf.id, rec.idx, now, now + d)?;
            rec.status = StepStatus::Running;
            rec.attempts += 1;
            rec.started_at = Some(now);
            rec.deadline_at = Some(now + d);
            let msg = format!("{} started", rec.name);
            evs.push(event(
                tx,
                &wf.id,
                Some(&rec.name.clone()),
                "step_started",
                &msg,
                now,
            )?);
            started = true;
        }
        out.push((wf, evs, started));
    }
    Ok(out)
}
