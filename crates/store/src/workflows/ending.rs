//! What ending a workflow writes, in the transaction that ends it: its row and event, its
//! definition's hooks on its resource (and its parent's wait), its batch dependents released
//! or skipped, and batch slots handed on.

use super::sets::{id_in, ids_arg};
use super::{WorkflowEvent, WorkflowOutcome, event, lease_lost, resource_from, skip_locked};
use crate::Result;
use crate::db::{Cols, Dialect, Stmt, Tx, limit_by, stmt};
use crate::hooks::Registry;
use crate::workflows::ResourceRef;

/// The parts of a workflow that ending it needs.
#[derive(Clone, Debug, PartialEq)]
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

impl Ending {
    /// What ending `w` needs, as its record says.
    pub fn of(w: &super::Workflow) -> Self {
        Ending {
            id: w.id.clone(),
            definition: w.definition.clone(),
            resource: w.resource.clone(),
            node: w.node.clone(),
            batch_id: w.batch_id.clone(),
            has_parent: w.parent_id.is_some(),
        }
    }
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

async fn ending(tx: &mut dyn Tx, wf: &str) -> Result<Ending> {
    let sql = format!("SELECT {ENDING_COLS} FROM workflows WHERE id = $1");
    let r = tx
        .query_opt(&stmt!(sql, wf))
        .await?
        .ok_or_else(|| lease_lost(wf))?;
    ending_from(&r, wf)
}

/// `UPDATE workflows SET {set} WHERE id` is one of the ids `select` returns, then `rest`.
/// PostgreSQL reads the ids first (`= ANY(ARRAY(…))`, one init plan) and can then look each
/// row up by its key rather than plan a join on the table's statistics.
fn update_ids(d: Dialect, set: &str, select: &str, rest: &str) -> String {
    match d {
        Dialect::Sqlite => format!("UPDATE workflows SET {set} WHERE id IN ({select}){rest}"),
        Dialect::Postgres => {
            format!("UPDATE workflows SET {set} WHERE id = ANY(ARRAY({select})){rest}")
        }
    }
}

/// A batch's ready parked nodes (`$1` the batch) in queue order, at most `limit`, locked by
/// `lock`: the nodes a counted fill, a slot pass and a hand-off's lease give slots to. A node
/// leased ahead of its slot (`Handoff::ahead`) is passed over while its lease lasts (judged by
/// the database's clock); its holder runs it.
pub(crate) fn parked_queue(d: Dialect, limit: &str, lock: &str) -> String {
    let now = match d {
        Dialect::Postgres => crate::db::postgres::TX_CLOCK,
        Dialect::Sqlite => SQLITE_CLOCK,
    };
    format!(
        "SELECT id FROM workflows
         WHERE batch_id = $1 AND parked = 1 AND status = 'pending' AND waiting_on = 0
           AND (lease_owner IS NULL OR lease_until < {now})
         ORDER BY created_at, id LIMIT {limit}{lock}"
    )
}

/// SQLite's clock in ms, in SQL.
const SQLITE_CLOCK: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// On PostgreSQL a slot pass and a hand-off pass over the queued nodes another transaction
/// holds (it is giving them their slots).
pub(crate) const SKIP_HELD: &str = " FOR UPDATE SKIP LOCKED";

/// A batch's free slots: its parallelism less its unparked nodes that have not ended.
/// (`{max}`: the dialect's larger of two values; a `CASE` would count the nodes twice.)
const FREE_SLOTS: &str = "(SELECT {max}(0, COALESCE((SELECT parallelism FROM batches WHERE id = $1), 0)
         - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'pending')
         - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'running')
         - (SELECT COUNT(*) FROM workflows WHERE batch_id = $1 AND parked = 0 AND status = 'undoing')))";

/// The statement that hands the free slots of batch `batch` to its ready parked nodes, in
/// queue order — one statement. On PostgreSQL the nodes another transaction holds are passed
/// over: a slot pass ([`pass_slots`]) is giving them theirs, and the ending it passes from
/// still counts as running here.
fn fill_stmt(d: Dialect, batch: &str) -> Stmt {
    let (max, lock) = match d {
        Dialect::Sqlite => ("max", ""),
        Dialect::Postgres => ("GREATEST", SKIP_HELD),
    };
    let ids = parked_queue(d, &FREE_SLOTS.replace("{max}", max), lock);
    stmt!(update_ids(d, "parked = 0", &ids, ""), batch)
}

/// PostgreSQL's way for the slots of `freed` nodes of `batch` that succeeded in this
/// transaction: each passes straight to the next ready parked node (queue order), without
/// the turns on the batch row a counted fill takes. One slot freed, one filled: the number
/// of running nodes stays what it was, whatever commits meanwhile, and `SKIP LOCKED` keeps
/// two passes off one node. It returns the nodes given a slot. Fewer than `freed` means the
/// queue looked empty, or held by others: the caller then runs the counted fill
/// ([`fill_batch_in`]), which sees every ending committed before its turn, so a node made
/// ready meanwhile by another transaction does not wait for a slot left free.
pub(crate) fn pass_slots(batch: &str, freed: usize) -> Stmt {
    stmt!(
        format!(
            "UPDATE workflows SET parked = 0 WHERE id = ANY(ARRAY({})) RETURNING id",
            parked_queue(Dialect::Postgres, "CAST($2 AS BIGINT)", SKIP_HELD)
        ),
        batch,
        freed as i64,
    )
}

/// The statement by which the pending dependents of the workflows `ended` (only their soft
/// dependents with `soft_only`) wait for as many edges less as they had on them; it returns
/// their batches. One statement for any number of endings (a group commit's, or one).
pub(crate) fn release_stmt(d: Dialect, ended: &[String], soft_only: bool) -> Stmt {
    let hard = if soft_only { " AND hard = 0" } else { "" };
    // On PostgreSQL `status || ''` is not a condition an index answers, so the dependents are
    // found by key: with a young table's statistics the planner otherwise scanned every
    // pending workflow through the batch index (0.3–2 ms per ending, even with no dependent).
    let pending = match d {
        Dialect::Sqlite => "status = 'pending'",
        Dialect::Postgres => "status || '' = 'pending'",
    };
    let on = format!("{}{hard}", id_in(d, "depends_on", 1));
    let sql = update_ids(
        d,
        &format!(
            "waiting_on = waiting_on - (SELECT COUNT(*) FROM workflow_deps \
             WHERE workflow_id = workflows.id AND {on})"
        ),
        &format!("SELECT workflow_id FROM workflow_deps WHERE {on}"),
        &format!(" AND {pending} RETURNING batch_id"),
    );
    Stmt::new(sql, vec![ids_arg(d, ended)])
}

/// The statements that hand free slots of batch `batch` to its ready parked nodes (in queue
/// order).
///
/// On PostgreSQL the counted fills of one batch take turns on its row: a fill counts the free
/// slots with every ending committed before it. Two at once each saw only its own ending,
/// handed the same parked node its slot (leaving the other slot idle until a later fill) and
/// could deadlock on the nodes both unparked. (SQLite's one writer serializes them anyway.)
/// A node that succeeds passes its slot on without turns instead ([`pass_slots`]).
pub(crate) fn fill_stmts(d: Dialect, batch: &str) -> Vec<Stmt> {
    match d {
        Dialect::Postgres => vec![
            stmt!("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", batch),
            fill_stmt(d, batch),
        ],
        Dialect::Sqlite => vec![fill_stmt(d, batch)],
    }
}

/// The query for up to `max` ready nodes of `batch`, in queue order (locked on PostgreSQL,
/// passing over those another transaction holds).
pub(crate) fn ready_nodes(tx: &dyn Tx, batch: &str, max: usize, now: i64) -> Stmt {
    let sql = format!(
        "SELECT id FROM workflows
         WHERE batch_id = $1 AND parked = 0 AND status IN ('pending', 'running', 'undoing')
           AND waiting_on = 0 AND next_run_at <= $2
           AND (lease_owner IS NULL OR lease_until < $2) AND cancel_requested = 0
         ORDER BY priority DESC, created_at {}{}",
        limit_by("$3"),
        skip_locked(tx)
    );
    stmt!(sql, batch, now, max as i64)
}

/// Runs [`fill_stmts`] (in one round trip on PostgreSQL).
pub(crate) async fn fill_batch_in(tx: &mut dyn Tx, batch: &str) -> Result<()> {
    let stmts = fill_stmts(tx.dialect(), batch);
    tx.run(&stmts).await
}

/// Adds the edge `wf` runs after `depends_on`; counts it while `depends_on` has not ended.
pub(crate) async fn add_dep(tx: &mut dyn Tx, wf: &str, depends_on: &str, hard: bool) -> Result<()> {
    tx.run(&[
        stmt!(
            "INSERT INTO workflow_deps (workflow_id, depends_on, hard) VALUES ($1, $2, $3)",
            wf,
            depends_on,
            hard,
        ),
        stmt!(
            "UPDATE workflows SET waiting_on = waiting_on + 1 WHERE id = $1
               AND (SELECT status FROM workflows WHERE id = $2) IN ('pending', 'running', 'undoing')",
            wf,
            depends_on,
        ),
    ])
    .await
}

/// Ends workflow `wf` inside the caller's (lease-guarded) transaction; the events written,
/// the workflow's final one first.
pub(crate) async fn finish_in(
    tx: &mut dyn Tx,
    hooks: &Registry,
    wf: &str,
    outcome: &WorkflowOutcome,
    now: i64,
) -> Result<Vec<WorkflowEvent>> {
    let status = outcome.status().as_str();
    let err = match outcome {
        WorkflowOutcome::Succeeded => None,
        WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e) => Some(e.as_str()),
    };
    // The end and what the rest of the ending needs, in one statement.
    let sql = format!(
        "UPDATE workflows SET status = $2, error = COALESCE($3, error), lease_owner = NULL,
             lease_until = NULL, updated_at = $4, finished_at = $4 WHERE id = $1
         RETURNING {ENDING_COLS}"
    );
    let r = tx
        .query_opt(&stmt!(sql, wf, status, err, now))
        .await?
        .ok_or_else(|| lease_lost(wf))?;
    let w = ending_from(&r, wf)?;
    finish_rest(tx, hooks, &w, outcome, now).await
}

/// The rest of an ending once the workflow row says so: the hooks, the event, the dependents
/// and the batch slots.
pub(crate) async fn finish_rest(
    tx: &mut dyn Tx,
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
    tx.run(&hooks.ending(w, outcome, now)).await?;
    let mut evs = vec![event(tx, wf, None, status, &msg, now).await?];
    let failed = outcome != &WorkflowOutcome::Succeeded;
    let mut batches: Vec<String> = w.batch_id.iter().cloned().collect();
    batches.extend(release_dependents(tx, hooks, w, failed, now, &mut evs).await?);
    batches.sort_unstable();
    batches.dedup();
    // Its slot, and dependents it released, go to the next ready nodes of their batches.
    for b in batches {
        fill_batch_in(tx, &b).await?;
    }
    Ok(evs)
}

/// Releases or skips the batch dependents of `w`: on success each waits for one edge less;
/// on failure hard dependents are skipped (cancelled, transitively) and soft ones only lose
/// the edge. Returns the batches whose nodes changed.
async fn release_dependents(
    tx: &mut dyn Tx,
    hooks: &Registry,
    w: &Ending,
    failed: bool,
    now: i64,
    evs: &mut Vec<WorkflowEvent>,
) -> Result<Vec<String>> {
    let mut batches = vec![];
    let mut queue = vec![(
        w.id.clone(),
        w.node.clone().unwrap_or_else(|| w.id.clone()),
        failed,
    )];
    while let Some((id, name, failed)) = queue.pop() {
        if !failed {
            for r in tx
                .query(&release_stmt(
                    tx.dialect(),
                    std::slice::from_ref(&id),
                    false,
                ))
                .await?
            {
                batches.extend(r.opt_text("batch_id")?);
            }
            continue;
        }
        let hard = tx
            .query(&stmt!(
                "SELECT d.workflow_id, o.batch_id FROM workflow_deps d
                   JOIN workflows o ON o.id = d.workflow_id
                 WHERE d.depends_on = $1 AND d.hard = 1 AND o.status = 'pending'",
                id.as_str()
            ))
            .await?;
        for r in tx
            .query(&release_stmt(tx.dialect(), std::slice::from_ref(&id), true))
            .await?
        {
            batches.extend(r.opt_text("batch_id")?);
        }
        for r in hard {
            let d = r.text("workflow_id")?;
            batches.extend(r.opt_text("batch_id")?);
            let dw = ending(tx, &d).await?;
            let reason = format!("skipped: requires {name}, which did not succeed");
            tx.run(&[
                stmt!(
                    "UPDATE workflows SET status = 'cancelled', error = $2, updated_at = $3,
                         finished_at = $3, lease_owner = NULL, lease_until = NULL WHERE id = $1",
                    d.as_str(),
                    reason.as_str(),
                    now,
                ),
                stmt!(
                    "UPDATE workflow_steps SET status = 'skipped'
                     WHERE workflow_id = $1 AND status = 'pending'",
                    d.as_str()
                ),
            ])
            .await?;
            let skipped = WorkflowOutcome::Cancelled(reason.clone());
            tx.run(&hooks.ending(&dw, &skipped, now)).await?;
            evs.push(event(tx, &d, None, "skipped", &reason, now).await?);
            evs.push(event(tx, &d, None, "cancelled", &reason, now).await?);
            queue.push((d, dw.node.unwrap_or_default(), true));
        }
    }
    Ok(batches)
}
