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

/// SQL over a relation of rows named `v`, `$1` being the time (see [`set_stmt`]).
pub(crate) type SetSql = fn(&str) -> String;

/// A statement a transition's hooks add to its writes ([`set_stmts`]).
#[derive(Debug, Clone)]
pub(crate) enum Write {
    /// A statement of its own, after the writes (it may read what they wrote).
    Own(Stmt),
    /// On PostgreSQL a part of the writes' one statement: a data-modifying CTE named `.0`
    /// (unique among the parts; a later part may read what it returns), with its own
    /// parameters (`$1` on). It must read nothing the other writes change: the parts of one
    /// statement see none of each other's changes. On SQLite a statement of its own, before
    /// the [`Write::Own`] ones.
    Part(&'static str, Stmt),
}

/// Several set-wise writes ([`set_stmt`] each: its rows and its SQL), in order, at `now`,
/// then the hooks' `parts` ([`Write::Part`]); empty writes are left out. On PostgreSQL they
/// are one statement — every write but the last set-wise one as a data-modifying CTE, that
/// last one the one that answers — since each statement of a pipeline costs the server a
/// flush and a send of its own; they must touch different rows, as CTEs see none of each
/// other's changes. On SQLite one statement each, the parts before the one that answers.
/// Either way the last set-wise statement answers as the last write with rows.
pub(crate) fn set_stmts(
    d: Dialect,
    writes: Vec<(RowSet, SetSql)>,
    parts: Vec<(&'static str, Stmt)>,
    now: i64,
) -> Vec<Stmt> {
    let writes = writes.into_iter().filter(|(rows, _)| !rows.is_empty());
    if d == Dialect::Sqlite {
        let mut out: Vec<Stmt> = writes
            .filter_map(|(rows, sql)| set_stmt(d, rows, sql, now))
            .collect();
        let last = out.pop();
        out.extend(parts.into_iter().map(|(_, s)| s));
        out.extend(last);
        return out;
    }
    let mut args = vec![Value::Int(now)];
    let mut sqls = vec![];
    for (rows, sql) in writes {
        sqls.push(sql(&rows.relation(d, args.len() + 1)));
        args.extend(rows.args(d));
    }
    let Some(last) = sqls.pop() else {
        // Nothing set-wise: the parts are statements of their own.
        return parts.into_iter().map(|(_, s)| s).collect();
    };
    let mut ctes: Vec<String> = (sqls.iter().enumerate())
        .map(|(i, s)| format!("w{i} AS ({s})"))
        .collect();
    for (name, s) in parts {
        ctes.push(format!("{name} AS ({})", shift_params(&s.sql, args.len())));
        args.extend(s.args);
    }
    let sql = match ctes.is_empty() {
        true => last,
        false => format!("WITH {} {last}", ctes.join(", ")),
    };
    vec![Stmt::new(sql, args)]
}

/// `sql` with each placeholder `$n` made `$(n + by)`; text in single quotes is left as it is.
fn shift_params(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        match c {
            '\'' => quoted = !quoted,
            '$' if !quoted && chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut n = 0usize;
                while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                    n = n * 10 + d as usize;
                    chars.next();
                }
                out.push_str(&(n + by).to_string());
            }
            _ => {}
        }
    }
    out
}

/// Starts the steps of rows `v` ([`STEP_START_ROW`]): one more attempt each.
pub(crate) fn start_steps(v: &str) -> String {
    format!(
        "UPDATE workflow_steps SET status = 'running', attempts = attempts + 1,
             started_at = $1, deadline_at = v.deadline
         FROM {v}
         WHERE workflow_steps.workflow_id = v.wf AND workflow_steps.idx = v.idx"
    )
}

/// The starts `starts` ([`STEP_START_ROW`]) and their events `events` ([`EVENT_ROW`]) at
/// `now` ([`set_stmts`]: the last statement returns the events' numbers).
pub(crate) fn starts_with_events(
    d: Dialect,
    starts: RowSet,
    events: RowSet,
    now: i64,
) -> Vec<Stmt> {
    set_stmts(
        d,
        vec![(starts, start_steps), (events, append_events)],
        vec![],
        now,
    )
}

/// Appends the events of rows `v` ([`EVENT_ROW`]), numbered in their `ord` order; returns each
/// one's `seq` and `workflow_id`.
pub(crate) fn append_events(v: &str) -> String {
    format!(
        "INSERT INTO workflow_events (workflow_id, at, step, kind, message)
         SELECT v.wf, $1, v.step, v.kind, v.message FROM {v} ORDER BY v.ord
         RETURNING seq, workflow_id"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(n: usize) -> RowSet {
        let mut r = RowSet::new(STEP_START_ROW);
        for i in 0..n {
            r.push(vec![format!("wf{i}").into(), 0i64.into(), 9i64.into()]);
        }
        r
    }

    fn events(n: usize) -> RowSet {
        let mut r = RowSet::new(EVENT_ROW);
        for i in 0..n {
            let wf = format!("wf{i}");
            r.push(vec![
                (i as i64).into(),
                wf.into(),
                "a".into(),
                "k".into(),
                "m".into(),
            ]);
        }
        r
    }

    /// On PostgreSQL the writes are one statement whose parts read their own parameters (the
    /// time `$1`, then each part's columns in turn) and whose last part answers; an empty part
    /// is left out, and on SQLite each part is a statement.
    #[test]
    fn writes_join_into_one_statement_on_postgres_only() {
        let pg = starts_with_events(Dialect::Postgres, starts(2), events(2), 7);
        assert_eq!(pg.len(), 1);
        let sql = &pg[0].sql;
        assert!(
            sql.starts_with("WITH w0 AS (UPDATE workflow_steps"),
            "{sql}"
        );
        assert!(
            sql.contains("CAST($4 AS BIGINT[])) AS v(wf, idx, deadline)"),
            "{sql}"
        );
        assert!(sql.contains("CAST($5 AS BIGINT[])") && sql.contains("CAST($9 AS TEXT[])"));
        assert!(
            sql.trim_end().ends_with("RETURNING seq, workflow_id"),
            "{sql}"
        );
        // The time, three columns of starts, five of events; each column one list.
        assert_eq!(pg[0].args.len(), 9);
        assert_eq!(pg[0].args[0], Value::Int(7));
        assert!(
            pg[0].args[1..]
                .iter()
                .all(|a| matches!(a, Value::List(v) if v.len() == 2))
        );

        let alone = starts_with_events(Dialect::Postgres, starts(0), events(1), 7);
        assert_eq!(alone.len(), 1);
        assert!(
            alone[0]
                .sql
                .trim_start()
                .starts_with("INSERT INTO workflow_events")
        );
        assert!(alone[0].sql.contains("CAST($2 AS BIGINT[])"));
        assert!(starts_with_events(Dialect::Postgres, starts(0), events(0), 7).is_empty());

        let lite = starts_with_events(Dialect::Sqlite, starts(2), events(2), 7);
        assert_eq!(lite.len(), 2);
        assert!(lite[1].sql.contains("RETURNING seq, workflow_id"));
    }

    /// A hook's part joins the statement as a CTE of its name, its parameters after the
    /// set-wise ones (renumbered, text in quotes untouched); on SQLite it is a statement
    /// before the one that answers.
    #[test]
    fn a_hooks_part_joins_with_its_parameters_renumbered() {
        let part = || {
            (
                "vm_up",
                Stmt::new(
                    "UPDATE vms SET status = 'a$1', updated_at = $1 WHERE id = $2 RETURNING id",
                    vec![Value::Int(5), "vm".into()],
                ),
            )
        };
        let writes = || {
            vec![
                (starts(2), start_steps as SetSql),
                (events(2), append_events),
            ]
        };
        let pg = set_stmts(Dialect::Postgres, writes(), vec![part()], 7);
        assert_eq!(pg.len(), 1);
        let sql = &pg[0].sql;
        assert!(
            sql.contains(
                "vm_up AS (UPDATE vms SET status = 'a$1', updated_at = $10 WHERE id = $11 RETURNING id)"
            ),
            "{sql}"
        );
        assert!(
            sql.trim_end().ends_with("RETURNING seq, workflow_id"),
            "{sql}"
        );
        assert_eq!(pg[0].args.len(), 11);
        assert_eq!(pg[0].args[9], Value::Int(5));

        let lite = set_stmts(Dialect::Sqlite, writes(), vec![part()], 7);
        assert_eq!(lite.len(), 3);
        assert!(lite[1].sql.starts_with("UPDATE vms") && lite[1].sql.contains("$2"));
        assert!(lite[2].sql.contains("RETURNING seq, workflow_id"));

        // With no set-wise write the part is a statement of its own.
        let alone = set_stmts(Dialect::Postgres, vec![], vec![part()], 7);
        assert_eq!(alone.len(), 1);
        assert!(alone[0].sql.starts_with("UPDATE vms"));
    }
}
