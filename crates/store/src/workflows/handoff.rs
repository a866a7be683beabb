//! A finishing batch node's hand-off, in its group's batch of writes: the lease of the next
//! ready nodes with the slots it frees, the lease of nodes ahead of their slots, and what the
//! hooks read ahead for either. [`Leased::read`](super::Leased::read) reads what the leases return.

use super::{SKIP_HELD, WF_COLS, parked_queue, ready_nodes};
use crate::db::{Dialect, Stmt, Tx, stmt};

/// A hand-off's lease of up to `max` ready nodes of `batch` to `node` (those another
/// transaction holds passed over), with the steps of the nodes it leased, for the caller's
/// batch of writes after the slots of its endings were handed on (saving the round trip that
/// would read the nodes first); [`Leased::read`](super::Leased::read) reads what they return.
///
/// On PostgreSQL one statement takes the slots straight from the queue: the next parked ready
/// nodes (queue order, as [`pass_slots`](super::ending::pass_slots) takes them) are unparked
/// and leased in one update — one row version each, not two, and one search of the queue —
/// and each row carries its steps (`steps_json`, read by key: finding the leased nodes again
/// for a second statement meant an index scan over the batch's running nodes and their dead
/// versions), and it starts their current steps, appending the starts' events ([`Start::Done`](super::Start::Done)
/// for `read`). The caller passes on only the slots it frees beyond `max`. On SQLite, after the
/// counted fill unparked them: the lease of the ready unparked nodes, then the steps of the
/// batch's nodes `node` holds with this lease (some others' among them, which `read` drops).
pub(crate) fn lease_ready(
    tx: &dyn Tx,
    batch: &str,
    max: usize,
    node: &str,
    lease_until: i64,
    now: i64,
) -> Vec<Stmt> {
    match tx.dialect() {
        // The rows come back with their steps as they were (`read` marks the one started) and
        // the start's event number (`seq`; none where no step starts: a cancel is pending).
        Dialect::Postgres => vec![stmt!(
            format!(
                "WITH l AS (
                     UPDATE workflows SET parked = 0, status = 'running', lease_owner = $3,
                         lease_until = $4, updated_at = $5
                     WHERE id = ANY(ARRAY({}))
                     RETURNING {WF_COLS}),
                 s AS (
                     UPDATE workflow_steps st SET status = 'running', attempts = st.attempts + 1,
                         started_at = $5, deadline_at = $5 + COALESCE(st.timeout_ms, {})
                     FROM l WHERE st.workflow_id = l.id AND st.idx = l.step
                       AND l.cancel_requested = 0
                     RETURNING st.workflow_id, st.name),
                 e AS (
                     INSERT INTO workflow_events (workflow_id, at, step, kind, message)
                     SELECT s.workflow_id, $5, s.name, 'step_started', s.name || ' started'
                     FROM s
                     RETURNING seq, workflow_id)
                 SELECT l.*, {STEPS_JSON},
                        (SELECT e.seq FROM e WHERE e.workflow_id = l.id) AS seq
                 FROM l",
                parked_queue(Dialect::Postgres, "CAST($2 AS BIGINT)", SKIP_HELD),
                super::NewStep::DEFAULT_TIMEOUT_MS,
            ),
            batch,
            max as i64,
            node,
            lease_until,
            now,
        )],
        Dialect::Sqlite => {
            let ready = ready_nodes(tx, batch, max, now);
            let lease = Stmt::new(
                format!(
                    "UPDATE workflows SET lease_owner = $4, lease_until = $5, updated_at = $2,
                         parked = 0,
                         status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
                     WHERE id IN ({}) AND (lease_owner IS NULL OR lease_until < $2)
                     RETURNING {WF_COLS}",
                    ready.sql
                ),
                ready
                    .args
                    .iter()
                    .cloned()
                    .chain([node.into(), lease_until.into()])
                    .collect(),
            );
            vec![lease, steps_where(LEASED_BY, batch, node, lease_until)]
        }
    }
}

/// The nodes of batch `$1` a hand-off leased to node `$2` until `$3` (a lease sets all three;
/// another node's lease, or an older one, differs in one). A leased node waits on nothing:
/// with `waiting_on = 0` this is the ready index's condition, so the lookup reads the live
/// nodes, not every node of the batch that ever ran (on PostgreSQL the batch index answered
/// only `batch_id` and `parked`: a 1,000-node batch's read-aheads read ~150 pages each).
const LEASED_BY: &str = "batch_id = $1 AND parked = 0 AND status IN ('running', 'undoing')
     AND waiting_on = 0 AND lease_owner = $2 AND lease_until = $3";

/// The resources of the nodes of `batch` a hand-off in this transaction leased to `node`
/// until `lease_until` (`resource_kind`, `resource_id`): what their hooks read ahead for the
/// steps they start (`ResourceHooks::handed_off_read`), right after the lease.
pub(crate) fn leased_by(batch: &str, node: &str, lease_until: i64) -> Stmt {
    stmt!(
        format!("SELECT resource_kind, resource_id FROM workflows WHERE {LEASED_BY}"),
        batch,
        node,
        lease_until,
    )
}

/// The nodes of batch `$1` leased ahead of their slots to node `$2` until `$3`: parked and
/// pending, waiting on nothing (the batch index's first four columns).
const HELD_BY: &str = "batch_id = $1 AND parked = 1 AND status = 'pending'
     AND waiting_on = 0 AND lease_owner = $2 AND lease_until = $3";

/// The resources of the `max` nodes of `batch` a hand-off in this transaction leased ahead to
/// `node` until `lease_until`, as [`leased_by`] selects those it leased with a slot. They are
/// the first of the batch's queue after those held before them: read in queue order, the
/// search stops at the last of them, not at the queue's end. (Only a read ahead may stop so:
/// nodes the same node held in a group committed in the same millisecond match too, and come
/// first; those it misses read their resources when they start.)
pub(crate) fn held_by(batch: &str, node: &str, lease_until: i64, max: usize) -> Stmt {
    stmt!(
        format!(
            "SELECT resource_kind, resource_id FROM workflows WHERE {HELD_BY}
             ORDER BY created_at, id LIMIT CAST($4 AS BIGINT)"
        ),
        batch,
        node,
        lease_until,
        max as i64,
    )
}

/// A hand-off's lease of up to `max` ready parked nodes of `batch` to `node` *ahead* of their
/// slots (`Handoff::ahead`): the next in the queue after those given slots in the same
/// transaction (those another transaction holds, or another node's live lease, passed over).
/// They stay parked and pending, nothing of theirs starts, and the update sets no indexed
/// column (HOT on PostgreSQL). Returned with their steps, for [`Leased::read`](super::Leased::read) with
/// [`Start::No`](super::Start::No): one statement on PostgreSQL (`steps_json`), the rows then their steps on
/// SQLite (of every node the same node holds until the same moment: a group committed in the
/// same millisecond leases until it too; `read` keeps those of the rows leased here).
pub(crate) fn lease_ahead(
    d: Dialect,
    batch: &str,
    max: usize,
    node: &str,
    lease_until: i64,
    now: i64,
) -> Vec<Stmt> {
    let queue = parked_queue(
        d,
        "CAST($2 AS BIGINT)",
        if d == Dialect::Postgres {
            SKIP_HELD
        } else {
            ""
        },
    );
    let set = "lease_owner = $3, lease_until = $4, updated_at = $5";
    match d {
        Dialect::Postgres => vec![stmt!(
            format!(
                "WITH l AS (
                     UPDATE workflows SET {set} WHERE id = ANY(ARRAY({queue}))
                     RETURNING {WF_COLS})
                 SELECT l.*, {STEPS_JSON} FROM l"
            ),
            batch,
            max as i64,
            node,
            lease_until,
            now,
        )],
        Dialect::Sqlite => vec![
            stmt!(
                format!("UPDATE workflows SET {set} WHERE id IN ({queue}) RETURNING {WF_COLS}"),
                batch,
                max as i64,
                node,
                lease_until,
                now,
            ),
            steps_where(HELD_BY, batch, node, lease_until),
        ],
    }
}

/// On PostgreSQL, the steps of each workflow a lease's `l` returns, as one column.
const STEPS_JSON: &str = "(SELECT COALESCE(CAST(json_agg(st ORDER BY st.idx) AS TEXT), '[]')
     FROM workflow_steps st WHERE st.workflow_id = l.id) AS steps_json";

/// SQLite: the steps of the nodes of `batch` that `cond` ([`LEASED_BY`], [`HELD_BY`]) selects
/// for `node` and `lease_until`, by workflow in order.
fn steps_where(cond: &str, batch: &str, node: &str, lease_until: i64) -> Stmt {
    stmt!(
        format!(
            "SELECT * FROM workflow_steps WHERE workflow_id IN (
                 SELECT id FROM workflows WHERE {cond})
             ORDER BY workflow_id, idx"
        ),
        batch,
        node,
        lease_until,
    )
}
