//! Where the batch slots a group's endings free go: along the passes to nodes leased ahead
//! (freed once, or unparked), and the hand-offs' read-ahead for the nodes they lease.

use super::{DoneReq, Passes};
use crate::db::postgres::TX_CLOCK;
use crate::db::{Col, Dialect, RowSet, Stmt};
use crate::hooks::{Hooks, Registry};
use crate::workflows::sets::set_stmt;
use std::collections::HashMap;

/// A node leased ahead that a slot passed to, and the node holding its lease.
const UNPARK_ROW: &[Col] = &[("wf", false), ("node", false)];

/// Per completion of a group: whether its ending frees a slot the batch counts, and the node
/// leased ahead its slot passes to here (to unpark); the rows of those passes ([`UNPARK_ROW`]).
pub(super) struct Flow {
    pub frees: Vec<bool>,
    pub unparks: Vec<Option<String>>,
    pub rows: RowSet,
}

/// Where each slot goes, given which completions of `reqs` end succeeded here (`ends_ok`): a
/// node that succeeds frees its slot, or passes it to the node leased ahead that took it in
/// memory — which, succeeding here too, frees or passes it in turn; one not succeeding here is
/// unparked (it runs, counted from now). A node leased ahead holds a slot only once a pass to
/// it is recorded: here, or in a group committed before (`passes`). One whose pass failed (the
/// passing node lost its lease, or undoes) ran on that node's slot, which stays counted until
/// it ends.
pub(super) fn slot_flow(reqs: &[DoneReq], ends_ok: &[bool], passes: &Passes) -> Flow {
    let n = reqs.len();
    let at: HashMap<&str, usize> = reqs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.wf.as_str(), i))
        .collect();
    let mut holds: Vec<bool> = reqs
        .iter()
        .map(|j| match &j.took_slot_of {
            None => true,
            Some(from) => !at.contains_key(from.as_str()) && passes.took(&j.wf),
        })
        .collect();
    let mut flow = Flow {
        frees: vec![false; n],
        unparks: vec![None; n],
        rows: RowSet::new(UNPARK_ROW),
    };
    for i in 0..n {
        if !(holds[i] && ends_ok[i]) {
            continue;
        }
        let Some(to) = &reqs[i].pass_to else {
            flow.frees[i] = true;
            continue;
        };
        match at.get(to.as_str()) {
            Some(&q) if q > i && ends_ok[q] => holds[q] = true,
            _ => {
                flow.rows
                    .push(vec![to.as_str().into(), reqs[i].node.as_str().into()]);
                flow.unparks[i] = Some(to.clone());
            }
        }
    }
    flow
}

/// A hand-off's read ahead: the hooks that read, and their statement among the group's batch of writes.
pub(super) type ReadAhead = Option<(Hooks, usize)>;

/// Adds to `batch` the read ahead of definition `def`'s hooks for the nodes `leased`
/// selects, if they read.
pub(super) fn read_ahead(
    batch: &mut Vec<Stmt>,
    hooks: &Registry,
    def: &str,
    leased: Stmt,
) -> ReadAhead {
    let hk = hooks.get(def)?;
    let s = hk.0.handed_off_read(&leased)?;
    batch.push(s);
    Some((hk, batch.len() - 1))
}

/// The statement recording the passes of rows `v` ([`UNPARK_ROW`]): each node, still leased
/// ahead to the node named, is unparked (it runs: it counts against its batch's parallelism
/// from here). It returns those unparked and their batches.
pub(super) fn unpark_stmt(d: Dialect, rows: RowSet, now: i64) -> Option<Stmt> {
    const RUN: &str =
        "parked = 0, status = CASE WHEN status = 'pending' THEN 'running' ELSE status END";
    match d {
        Dialect::Sqlite => set_stmt(
            d,
            rows,
            |v| {
                format!(
                    "UPDATE workflows SET {RUN}, updated_at = $1 FROM {v}
                     WHERE workflows.id = v.wf AND workflows.lease_owner = v.node
                       AND workflows.parked = 1
                     RETURNING id, batch_id"
                )
            },
            now,
        ),
        Dialect::Postgres => (!rows.is_empty()).then(|| {
            Stmt::new(
                format!(
                    "UPDATE workflows SET {RUN}, updated_at = {TX_CLOCK}
                     WHERE id = ANY(CAST($1 AS TEXT[])) AND parked = 1
                       AND lease_owner = (CAST($2 AS TEXT[]))[array_position(CAST($1 AS TEXT[]), id)]
                     RETURNING id, batch_id"
                ),
                rows.args(d),
            )
        }),
    }
}
