//! The set-wise statements several transitions share (a group of step completions, a claim of
//! many workflows, a batch's hand-off): each writes any number of rows in one statement.

use crate::db::{Col, Dialect, RowSet, Stmt, Value};

/// A step to start: its workflow, index and deadline.
pub(crate) const STEP_START_ROW: &[Col] = &[("wf", false), ("idx", true), ("deadline", true)];

/// An event to append: its order among the statement's rows, workflow, step, kind and message.
pub(crate) const EVENT_ROW: &[Col] = &[
    ("ord", true),
    ("wf", false),
    ("step", false),
    ("kind", false),
    ("message", false),
];

/// `sql` (the time `$1`, the rows' parameters from `$2` on) over `rows`; none when empty.
pub(crate) fn set_stmt(
    d: Dialect,
    rows: RowSet,
    sql: impl FnOnce(&str) -> String,
    now: i64,
) -> Option<Stmt> {
    if rows.is_empty() {
        return None;
    }
    let sql = sql(&rows.relation(d, 2));
    let mut args = vec![Value::Int(now)];
    args.extend(rows.args(d));
    Some(Stmt::new(sql, args))
}

/// Starts the steps `rows` ([`STEP_START_ROW`]) at `now`: one more attempt each.
pub(crate) fn start_steps(d: Dialect, rows: RowSet, now: i64) -> Option<Stmt> {
    set_stmt(
        d,
        rows,
        |v| {
            format!(
                "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1,
                     started_at = $1, deadline_at = v.deadline
                 FROM {v}
                 WHERE workflow_steps.workflow_id = v.wf AND workflow_steps.idx = v.idx"
            )
        },
        now,
    )
}

/// Appends the events `rows` ([`EVENT_ROW`]) at `now`, numbered in their `ord` order;
/// returns each one's `seq` and `workflow_id`.
pub(crate) fn append_events(d: Dialect, rows: RowSet, now: i64) -> Option<Stmt> {
    set_stmt(
        d,
        rows,
        |v| {
            format!(
                "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
                 SELECT v.wf, $1, v.step, v.kind, v.message FROM {v} ORDER BY v.ord
                 RETURNING seq, workflow_id"
            )
        },
        now,
    )
}

/// `col` is one of the ids given as parameter `$param` ([`ids_arg`]). On PostgreSQL an
/// `= ANY` over one array, an index lookup whatever the table's statistics say (a join to
/// the unnested array was planned as a rescan per row on a fresh table).
pub(crate) fn id_in(d: Dialect, col: &str, param: usize) -> String {
    match d {
        Dialect::Sqlite => format!("{col} IN (SELECT value FROM json_each(${param}))"),
        Dialect::Postgres => format!("{col} = ANY(CAST(${param} AS TEXT[]))"),
    }
}

/// The parameter [`id_in`] reads.
pub(crate) fn ids_arg(d: Dialect, ids: &[String]) -> Value {
    match d {
        Dialect::Sqlite => {
            Value::Text(serde_json::to_string(ids).expect("a list of strings serializes"))
        }
        Dialect::Postgres => Value::List(ids.iter().map(|s| Value::Text(s.clone())).collect()),
    }
}
