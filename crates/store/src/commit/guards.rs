//! How a group learns what its lease guards find: read before its writes, or guessed and
//! checked once they answer (`Guards`).

use super::DoneReq;
use super::group::{fin, r_int, r_opt_text, r_text, spawns};
use crate::Result;
use crate::db::{Dialect, Row, Stmt, Tx};
use crate::workflows::sets::{id_in, ids_arg};
use crate::workflows::{ENDING_COLS, Ending, clock, ending_from, lease_lost, row_lock};
use std::collections::BTreeMap;

/// What a completion found when its workflow did not simply move on.
pub(super) struct Found {
    pub cancel: bool,
    pub end: Ending,
}

/// How a group learns what its lease guards find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guards {
    /// Reads them, then sends the writes they call for: two round trips before the `COMMIT`
    /// on PostgreSQL.
    Read,
    /// Sends the writes with them, in one round trip, on the guess that every lease holds,
    /// no cancel is pending and each ending workflow is as the engine claimed it (PostgreSQL,
    /// where each of its completions that ends says so); then checks that guess, and the
    /// clock it wrote by, against what they read ([`GroupError::Guessed`](super::group::GroupError::Guessed) if it was wrong).
    Guess,
}

/// The clock reading a guessed group may differ from its `BEGIN`'s reading by.
pub(super) const CLOCK_SLACK_MS: u64 = 1_000;

/// The rows of workflows `ids` a guard reads: the lease, a pending cancel, what an ending needs.
/// On PostgreSQL they stay locked until the group commits: a claim committing meanwhile (the
/// lease had run out) is either waited for, and its new owner read, or kept from the rows
/// (claims pass over locked ones) — never read as the old owner while the writes that follow
/// land on the claimed workflow.
pub(super) fn rows_of(d: Dialect, ids: Vec<String>) -> Stmt {
    let sql = format!(
        "SELECT id, cancel_requested, lease_owner, {ENDING_COLS} FROM workflows WHERE {}{}",
        id_in(d, "id", 1),
        row_lock(d)
    );
    Stmt::new(sql, vec![ids_arg(d, &ids)])
}

/// Sends the guards `first` (the moves first where some move) and reads what they found: per
/// completion whether it moved on, or its lease, pending cancel and ending; and the clock.
pub(super) async fn read_guards(
    tx: &mut dyn Tx,
    reqs: &[DoneReq],
    first: &[Stmt],
    moving: bool,
    sqlite_now: Option<i64>,
) -> Result<(Vec<bool>, Vec<Option<Result<Found>>>, i64)> {
    let d = tx.dialect();
    let mut moved = vec![false; reqs.len()];
    let mut found: Vec<Option<Result<Found>>> = (0..reqs.len()).map(|_| None).collect();
    let mut res = tx.query_many(first).await?.into_iter();
    let now = match sqlite_now {
        Some(now) => now,
        None => clock(tx).await?,
    };
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    if moving {
        let ids = res
            .next()
            .unwrap_or_default()
            .iter()
            .map(|r| r_text(r, "id"))
            .collect::<Result<std::collections::HashSet<_>>>()?;
        for (i, j) in reqs.iter().enumerate() {
            moved[i] = ids.contains(&j.wf);
        }
        // 2. Those that did not move (a lease lost, a cancel pending), read as the others.
        let stuck: Vec<String> = reqs
            .iter()
            .enumerate()
            .filter(|&(i, j)| !moved[i] && !fin(j) && !spawns(j))
            .map(|(_, j)| j.wf.clone())
            .collect();
        if !stuck.is_empty() {
            for r in tx.query(&rows_of(d, stuck)).await? {
                rows.insert(r_text(&r, "id")?, r);
            }
        }
    }
    for r in res.next().unwrap_or_default() {
        rows.insert(r_text(&r, "id")?, r);
    }
    for (i, j) in reqs.iter().enumerate().filter(|(i, _)| !moved[*i]) {
        found[i] = Some(match rows.get(&j.wf) {
            Some(r) if r_opt_text(r, "lease_owner")?.as_deref() == Some(j.node.as_str()) => {
                Ok(Found {
                    cancel: r_int(r, "cancel_requested")? != 0,
                    end: ending_from(r, &j.wf)?,
                })
            }
            _ => Err(lease_lost(&j.wf)),
        });
    }
    Ok((moved, found, now))
}

/// What a guessed group writes by: each completion that goes on moves, and each other one's
/// lease holds with no cancel pending, its workflow as claimed.
pub(super) fn guessed_guards(reqs: &[DoneReq]) -> (Vec<bool>, Vec<Option<Result<Found>>>) {
    let mut moved = vec![false; reqs.len()];
    let mut found: Vec<Option<Result<Found>>> = (0..reqs.len()).map(|_| None).collect();
    for (i, j) in reqs.iter().enumerate() {
        match &j.ending {
            Some(end) if fin(j) || spawns(j) => {
                found[i] = Some(Ok(Found {
                    cancel: false,
                    end: end.clone(),
                }))
            }
            _ => moved[i] = true,
        }
    }
    (moved, found)
}

/// Whether what the guards read (`guards`: the moves' answer where some move, then the
/// rows of the others) is what a guessed group wrote by: every move made, every other lease
/// held with no cancel pending and its workflow as claimed.
pub(super) fn guess_held(guards: &[Vec<Row>], reqs: &[DoneReq], moving: bool) -> Result<bool> {
    let mut res = guards.iter();
    let ids: std::collections::HashSet<String> = match moving {
        true => res
            .next()
            .into_iter()
            .flatten()
            .map(|r| r_text(r, "id"))
            .collect::<Result<_>>()?,
        false => Default::default(),
    };
    let mut rows: BTreeMap<String, &Row> = BTreeMap::new();
    for r in res.next().into_iter().flatten() {
        rows.insert(r_text(r, "id")?, r);
    }
    for j in reqs {
        let held = match (&j.ending, rows.get(&j.wf)) {
            (Some(end), Some(r)) if fin(j) || spawns(j) => {
                r_opt_text(r, "lease_owner")?.as_deref() == Some(j.node.as_str())
                    && r_int(r, "cancel_requested")? == 0
                    && ending_from(*r, &j.wf)? == *end
            }
            _ => !(fin(j) || spawns(j)) && ids.contains(&j.wf),
        };
        if !held {
            return Ok(false);
        }
    }
    Ok(true)
}
