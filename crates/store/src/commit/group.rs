//! One group of step completions as one transaction, over `db::Tx`: the same SQL path for
//! both backends.

use super::guards::{
    CLOCK_SLACK_MS, Found, Guards, guess_held, guessed_guards, read_guards, rows_of,
};
use super::slots::{Flow, ReadAhead, read_ahead, slot_flow, unpark_stmt};
use super::{Done, DoneReq, Passes};
use crate::db::postgres::TX_CLOCK;
use crate::db::{Col, Dialect, Row, RowSet, Stmt, Tx, stmt};
use crate::hooks::{Prefetch, Registry};
use crate::workflows::sets::{
    EVENT_ROW, STEP_START_ROW, SetSql, Write, append_events, set_stmt, set_stmts, start_steps,
};
use crate::workflows::{
    Ending, Leased, Start, WorkflowEvent, WorkflowStatus, clock, fill_batch_in, fill_stmts,
    held_by, insert_stmts, lease_ahead, lease_lost, lease_ready, leased_by, pass_slots,
    release_stmt,
};
use crate::{Result, StoreError};
use std::collections::BTreeMap;

/// How each completion's results are read back from the batch of writes.
struct Plan {
    /// The events it wrote (seq filled in after).
    events: Vec<WorkflowEvent>,
    cancel: bool,
}

const MOVE_ROW: &[Col] = &[("wf", false), ("step", true), ("node", false)];
/// A workflow ending succeeded, and the step it ends on.
const END_ROW: &[Col] = &[("wf", false), ("step", true)];
/// A step done: `ran` 1 for one that ran unrecorded (it is counted started too).
const STEP_DONE_ROW: &[Col] = &[
    ("wf", false),
    ("idx", true),
    ("output", false),
    ("ran", true),
];
const EFFECT_ROW: &[Col] = &[
    ("wf", false),
    ("idx", true),
    ("key", false),
    ("payload", false),
];

/// Why a group's transaction is rolled back.
#[derive(Debug)]
pub(crate) enum GroupError {
    Store(StoreError),
    /// Its writes went with its lease guards on what the engine knew (see
    /// `Completion::claimed`), and the guards read otherwise: commit it the careful way.
    Guessed,
}

impl From<StoreError> for GroupError {
    fn from(e: StoreError) -> Self {
        GroupError::Store(e)
    }
}

impl GroupError {
    /// As the store's error (a guess is made only where it can be checked: never on SQLite).
    pub(crate) fn into_store(self) -> StoreError {
        match self {
            GroupError::Store(e) => e,
            GroupError::Guessed => {
                StoreError::Corrupt("group commit", "a guessed group was not retried".into())
            }
        }
    }
}

/// Records a group of completions in the caller's transaction; per completion its outcome or
/// `LeaseLost`. Whatever the group's size, it is a fixed number of set-wise statements (each
/// over a [`RowSet`]; the workflows that end succeeded, their hooks and the release of their
/// dependents too) plus the rows of spawned children and a few per batch whose slots it fills.
pub(crate) async fn commit_group(
    tx: &mut dyn Tx,
    reqs: &[DoneReq],
    prefetched: &Prefetch,
    hooks: &Registry,
    passes: &Passes,
    guards: Guards,
) -> std::result::Result<Vec<Result<Done>>, GroupError> {
    let d = tx.dialect();
    // A guess needs PostgreSQL's reading of its clock, and what each ending workflow is.
    let guess = match guards {
        Guards::Guess
            if reqs
                .iter()
                .all(|j| !(fin(j) || spawns(j)) || j.ending.is_some()) =>
        {
            tx.clock_guess()
        }
        _ => None,
    };

    // 1. The lease guard and the move on in one statement when no cancel is pending and the
    //    workflow goes on (it sets no indexed column: the update stays HOT on PostgreSQL).
    //    With it, the rows of those that end or spawn: the lease, a pending cancel, what an
    //    ending needs. On PostgreSQL both go with the `BEGIN`, in its round trip, and read the
    //    clock in SQL (the transaction's, as the `BEGIN` reads it); with a guess the writes
    //    go in that round trip too, and what they read is checked once it answers.
    //    SQLite knows the time without asking; it is read once, for the whole group.
    let sqlite_now = match d {
        Dialect::Sqlite => Some(clock(tx).await?),
        Dialect::Postgres => None,
    };
    let mut moves = RowSet::new(MOVE_ROW);
    for j in reqs.iter().filter(|j| !fin(j) && !spawns(j)) {
        moves.push(vec![
            j.wf.as_str().into(),
            (i64::from(j.idx) + 1).into(),
            j.node.as_str().into(),
        ]);
    }
    let moves = match d {
        Dialect::Sqlite => set_stmt(
            d,
            moves,
            |v| {
                format!(
                    "UPDATE workflows SET step = v.step, attempt = 0, updated_at = $1 FROM {v}
                     WHERE workflows.id = v.wf AND workflows.lease_owner = v.node
                       AND workflows.cancel_requested = 0
                     RETURNING id"
                )
            },
            sqlite_now.unwrap_or_default(),
        ),
        // Not a join: its plan would rest on the table's statistics (a fresh table's made
        // PostgreSQL rescan the rows per workflow). `id = ANY` is an index lookup whatever
        // they say, and each row finds its values by its position.
        Dialect::Postgres => (!moves.is_empty()).then(|| {
            Stmt::new(
                format!(
                    "UPDATE workflows
                     SET step = (CAST($2 AS BIGINT[]))[array_position(CAST($1 AS TEXT[]), id)],
                         attempt = 0, updated_at = {TX_CLOCK}
                     WHERE id = ANY(CAST($1 AS TEXT[])) AND cancel_requested = 0
                       AND lease_owner = (CAST($3 AS TEXT[]))[array_position(CAST($1 AS TEXT[]), id)]
                     RETURNING id"
                ),
                moves.args(d),
            )
        }),
    };
    let others: Vec<String> = reqs
        .iter()
        .filter(|j| fin(j) || spawns(j))
        .map(|j| j.wf.clone())
        .collect();
    let mut first: Vec<Stmt> = moves.into_iter().collect();
    let moving = !first.is_empty();
    if !others.is_empty() {
        first.push(rows_of(d, others));
    }
    let (moved, found, now, batch) = match guess {
        Some(now) => {
            let (moved, found) = guessed_guards(reqs);
            (moved, found, now, first)
        }
        None => {
            let (moved, found, now) = read_guards(tx, reqs, &first, moving, sqlite_now).await?;
            (moved, found, now, vec![])
        }
    };
    let guessed = batch.len();

    let mut w = Writes::plan(d, reqs, (&moved, found), now, (hooks, passes), batch);
    let slots = w.batch_slots(&*tx, hooks, now);
    let results = tx.query_many(&w.batch).await?;
    if guess.is_some() {
        // The guess, checked against what the guards read (and the clock against the
        //    `BEGIN`'s): one thing otherwise and every write is undone.
        if !guess_held(&results[..guessed], reqs, moving)? {
            return Err(GroupError::Guessed);
        }
        if tx
            .began_at()
            .is_none_or(|read| read.abs_diff(now) > CLOCK_SLACK_MS)
        {
            return Err(GroupError::Guessed);
        }
    }
    Ok(w.read_back(tx, reqs, slots, &results, prefetched, now)
        .await?)
}

/// A group's writes, planned: every statement in the order it is sent, and how each
/// completion's outcome is read back from their results.
struct Writes {
    batch: Vec<Stmt>,
    plans: Vec<Option<Plan>>,
    failed: Vec<Option<StoreError>>,
    /// Per batch, how many slots the nodes that succeed here free (those not passed on).
    fills: BTreeMap<String, usize>,
    /// Per batch and node, the hand-offs there.
    wants: BTreeMap<(String, String), Want>,
    /// Per completion, the node leased ahead its slot passes to here (see `Completion::pass_to`).
    unparks: Vec<Option<String>>,
    /// Per batch, how many passes here; and the statement that records them.
    passed: BTreeMap<String, usize>,
    unparked_at: Option<usize>,
    /// The statement that returns the events' numbers.
    events_at: Option<usize>,
    /// The statement that releases the dependents of the workflows that succeeded.
    released: Option<usize>,
}

/// Where the batch slots these endings free went, among [`Writes::batch`]: per batch its
/// freed slots and the statements that gave them (PostgreSQL), and per hand-off the
/// completions, its lease's statements and its hooks' read-ahead.
struct Slots {
    passes: Vec<(String, usize, Vec<usize>)>,
    ready_at: Vec<(Vec<usize>, std::ops::Range<usize>, ReadAhead)>,
    /// Per lease ahead, the completions it is for (and how many each asked for).
    ahead_at: Vec<(Asks, std::ops::Range<usize>, ReadAhead)>,
}

/// The completions a lease ahead is for, and how many nodes each asked for.
type Asks = Vec<(usize, u32)>;

/// The hand-offs of one batch and node in a group: the completions whose freed slot each
/// leases a node with, those leasing nodes ahead (and how many each), the lease's length and
/// the first one's definition.
struct Want {
    slot: Vec<usize>,
    ahead: Asks,
    lease_ms: i64,
    def: String,
}

impl Writes {
    /// Every write of the completions `reqs` (after the guards' statements `batch`), given
    /// which moved on in their guard and what the others' guards found (`guards`), and the
    /// passes earlier groups recorded.
    fn plan(
        d: Dialect,
        reqs: &[DoneReq],
        guards: (&[bool], Vec<Option<Result<Found>>>),
        now: i64,
        (hooks, passes): (&Registry, &Passes),
        mut batch: Vec<Stmt>,
    ) -> Self {
        let (moved, mut found) = guards;
        let ends_ok: Vec<bool> = (0..reqs.len())
            .map(|i| fin(&reqs[i]) && matches!(&found[i], Some(Ok(f)) if !f.cancel))
            .collect();
        let Flow {
            frees,
            unparks,
            rows: unpark_rows,
        } = slot_flow(reqs, &ends_ok, passes);
        // 3. Every write of every completion, in one batch: the rare ones row by row (endings,
        //    children), then one statement each for the steps done, the effects, the steps
        //    started and the events.
        let (mut done_rows, mut start_rows) =
            (RowSet::new(STEP_DONE_ROW), RowSet::new(STEP_START_ROW));
        let (mut effect_rows, mut event_rows) = (RowSet::new(EFFECT_ROW), RowSet::new(EVENT_ROW));
        let mut n_events = 0i64;
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(reqs.len());
        let mut fills: BTreeMap<String, usize> = BTreeMap::new();
        let mut wants: BTreeMap<(String, String), Want> = BTreeMap::new();
        let mut passed: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed: Vec<Option<StoreError>> = (0..reqs.len()).map(|_| None).collect();
        // The workflows that end succeeded (their new step), and their endings.
        let mut ends = RowSet::new(END_ROW);
        let mut succeeded: Vec<Ending> = vec![];
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
            if !moved[i] && fin(j) && !cancel {
                // Ended set-wise after this loop, with their resources' hooks.
                ends.push(vec![wf.into(), step.into()]);
            } else if !moved[i] {
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
                } else {
                    stmt!(
                        "UPDATE workflows SET step = $2, attempt = 0, updated_at = $3 WHERE id = $1",
                        wf,
                        step,
                        now,
                    )
                });
            }
            for (k, (idx, _)) in j.ran.iter().enumerate() {
                done_rows.push(vec![
                    wf.into(),
                    (*idx).into(),
                    None::<String>.into(),
                    i64::from(k > 0 || j.unstarted).into(),
                ]);
            }
            done_rows.push(vec![
                wf.into(),
                j.idx.into(),
                j.commit.output.as_ref().map(|o| o.to_string()).into(),
                i64::from(!j.ran.is_empty() || j.unstarted).into(),
            ]);
            for (key, payload) in &j.commit.effects {
                effect_rows.push(vec![
                    wf.into(),
                    j.idx.into(),
                    key.as_str().into(),
                    payload.to_string().into(),
                ]);
            }
            let ev = |step: Option<&str>, kind: &str, message: String| WorkflowEvent {
                seq: 0,
                operation_id: j.wf.clone(),
                at: now,
                step: step.map(str::to_string),
                kind: kind.to_string(),
                message,
            };
            let mut evs = vec![];
            for (k, name) in j.ran.iter().map(|(_, n)| n).chain([&j.name]).enumerate() {
                if k > 0 || j.unstarted {
                    evs.push(ev(Some(name), "step_started", format!("{name} started")));
                }
                evs.push(ev(Some(name), "step_done", format!("{name} done")));
            }
            let then = if spawns(j) && !cancel {
                // Queued with the step's completion: a crash keeps both or neither. (A cancel
                // asked for meanwhile wins: the parent undoes instead of spawning.)
                for c in &j.commit.children {
                    let id = uuid::Uuid::now_v7().to_string();
                    batch.extend(insert_stmts(c, &id, Some(wf), now));
                }
                let n = j.commit.children.len();
                let msg = format!("{} spawned {n} child workflows; waiting for them", j.name);
                Some(ev(Some(&j.name), "spawned", msg))
            } else if let (Some((idx, name, dl)), false) = (&j.next, cancel) {
                start_rows.push(vec![wf.into(), (*idx).into(), (now + dl).into()]);
                Some(ev(Some(name), "step_started", format!("{name} started")))
            } else if let (Some(end), true, false) = (&end, fin(j), cancel) {
                succeeded.push(end.clone());
                if let Some(b) = &end.batch_id {
                    if frees[i] {
                        *fills.entry(b.clone()).or_default() += 1;
                    }
                    if unparks[i].is_some() {
                        *passed.entry(b.clone()).or_default() += 1;
                    }
                    if let Some(h) = j.handoff {
                        let w = wants
                            .entry((b.clone(), j.node.clone()))
                            .or_insert_with(|| Want {
                                slot: vec![],
                                ahead: vec![],
                                lease_ms: h.lease_ms,
                                def: end.definition.clone(),
                            });
                        if frees[i] {
                            w.slot.push(i);
                        }
                        if h.ahead > 0 {
                            w.ahead.push((i, h.ahead));
                        }
                    }
                }
                let ended = format!("{} succeeded", end.definition);
                Some(ev(None, WorkflowStatus::Succeeded.as_str(), ended))
            } else {
                None
            };
            evs.extend(then);
            for e in &evs {
                event_rows.push(vec![
                    n_events.into(),
                    wf.into(),
                    e.step.clone().into(),
                    e.kind.as_str().into(),
                    e.message.as_str().into(),
                ]);
                n_events += 1;
            }
            plans.push(Some(Plan {
                events: evs,
                cancel,
            }));
        }
        // The endings, the steps done, the effects, the steps started, the hooks' parts and the
        // events: one statement on PostgreSQL; the events' numbers are what the last one returns.
        // The hooks' own statements after, seeing the workflows ended and their steps done.
        let ended: Vec<&Ending> = succeeded.iter().collect();
        let (mut parts, mut own) = (vec![], vec![]);
        for w in hooks.succeeded(d, &ended, now) {
            match w {
                Write::Part(name, s) => parts.push((name, s)),
                Write::Own(s) => own.push(s),
            }
        }
        let has_events = !event_rows.is_empty();
        let writes = set_stmts(
            d,
            vec![
                (ends, end_succeeded as SetSql),
                (done_rows, steps_done),
                (effect_rows, effects),
                (start_rows, start_steps),
                (event_rows, append_events),
            ],
            parts,
            now,
        );
        let events_at = has_events.then(|| batch.len() + writes.len() - 1);
        batch.extend(writes);
        batch.extend(own);
        // The passes, before any fill counts the batches' free slots.
        let unparked_at = unpark_stmt(d, unpark_rows, now).map(|s| {
            batch.push(s);
            batch.len() - 1
        });
        // Their dependents wait for them no more (RETURNING the dependents' batches).
        let released = (!succeeded.is_empty()).then(|| {
            let ids: Vec<String> = succeeded.iter().map(|e| e.id.clone()).collect();
            batch.push(release_stmt(d, &ids, false));
            batch.len() - 1
        });
        Writes {
            batch,
            plans,
            failed,
            fills,
            wants,
            unparks,
            passed,
            unparked_at,
            events_at,
            released,
        }
    }

    /// The statements that give the slots these endings free, after the writes in the same
    /// round trip.
    fn batch_slots(&mut self, tx: &dyn Tx, hooks: &Registry, now: i64) -> Slots {
        let d = tx.dialect();
        // 4. Batch slots, after the writes in the same round trip: the slots freed by these
        //    endings go to the next ready nodes of their batches, and each finishing batch node
        //    with a hand-off leases the next ready node of its batch. On PostgreSQL a hand-off
        //    takes its slot with its lease and the other freed slots pass on, a counted fill
        //    after only where the queue looked empty; on SQLite a counted fill, then the leases.
        //    The finishing node's hooks read ahead for the leased nodes right after the lease;
        //    on PostgreSQL the lease also starts their steps. Then the nodes leased ahead of
        //    their slots, and the read ahead for them.
        let batch = &mut self.batch;
        let (mut passes, mut ready_at, mut ahead_at) = (vec![], vec![], vec![]);
        let mut batches: Vec<&String> = self.fills.keys().collect();
        batches.extend(self.wants.keys().map(|(b, _)| b));
        batches.sort_unstable();
        batches.dedup();
        for b in batches {
            let freed = self.fills.get(b).copied().unwrap_or(0);
            if d == Dialect::Sqlite && freed > 0 {
                batch.extend(fill_stmts(d, b));
            }
            // On PostgreSQL the hand-offs take their slots with their leases; the rest pass on.
            let (mut left, mut given) = (freed, vec![]);
            let mine = || self.wants.iter().filter(|((batch_id, _), _)| batch_id == b);
            for ((batch_id, node), w) in mine() {
                let n = w.slot.len().min(left);
                if n == 0 {
                    continue;
                }
                if d == Dialect::Postgres {
                    left -= n;
                    given.push(batch.len());
                }
                let until = now + w.lease_ms;
                let lease = lease_ready(tx, batch_id, n, node, until, now);
                let at = batch.len()..batch.len() + lease.len();
                batch.extend(lease);
                let read = read_ahead(batch, hooks, &w.def, leased_by(batch_id, node, until));
                ready_at.push((w.slot.clone(), at, read));
            }
            if d == Dialect::Postgres && freed > 0 {
                if left > 0 {
                    given.push(batch.len());
                    batch.push(pass_slots(b, left));
                }
                passes.push((b.clone(), freed, given));
            }
            for ((batch_id, node), w) in mine() {
                let m: u32 = w.ahead.iter().map(|(_, k)| k).sum();
                if m == 0 {
                    continue;
                }
                let until = now + w.lease_ms;
                let lease = lease_ahead(d, batch_id, m as usize, node, until, now);
                let at = batch.len()..batch.len() + lease.len();
                batch.extend(lease);
                let held = held_by(batch_id, node, until, m as usize);
                let read = read_ahead(batch, hooks, &w.def, held);
                ahead_at.push((w.ahead.clone(), at, read));
            }
        }
        Slots {
            passes,
            ready_at,
            ahead_at,
        }
    }

    /// Each completion's outcome from the `results` of [`Writes::batch`]; a counted fill where
    /// the slots freed found fewer ready nodes than they could take, or a dependent was
    /// released in a batch none of these endings was in; on SQLite the leased nodes' starts.
    async fn read_back(
        mut self,
        tx: &mut dyn Tx,
        reqs: &[DoneReq],
        slots: Slots,
        results: &[Vec<Row>],
        prefetched: &Prefetch,
        now: i64,
    ) -> Result<Vec<Result<Done>>> {
        let Slots {
            passes,
            ready_at,
            ahead_at,
        } = slots;
        let d = tx.dialect();
        for (b, freed, given) in &passes {
            if given.iter().map(|&at| results[at].len()).sum::<usize>() < *freed {
                fill_batch_in(tx, b).await?;
            }
        }
        // A pass whose node was no longer there to take the slot (its lease lost) left it
        // free: a counted fill gives it.
        let mut took: std::collections::HashSet<String> = Default::default();
        let mut unparked: BTreeMap<String, usize> = BTreeMap::new();
        for r in self
            .unparked_at
            .map(|k| &results[k][..])
            .unwrap_or_default()
        {
            took.insert(r_text(r, "id")?);
            if let Some(b) = r_opt_text(r, "batch_id")? {
                *unparked.entry(b).or_default() += 1;
            }
        }
        for (b, &n) in &self.passed {
            if unparked.get(b).copied().unwrap_or(0) < n {
                fill_batch_in(tx, b).await?;
            }
        }
        let mut seqs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for r in self
            .events_at
            .and_then(|k| results.get(k))
            .into_iter()
            .flatten()
        {
            seqs.entry(r_text(r, "workflow_id")?)
                .or_default()
                .push(r_int(r, "seq")?);
        }
        // A dependent in a batch none of these endings was in gets its slot in a round trip of
        // its own.
        let mut more: Vec<String> = vec![];
        if let Some(k) = self.released {
            for r in &results[k] {
                more.extend(r_opt_text(r, "batch_id")?.filter(|b| !self.fills.contains_key(b)));
            }
        }
        more.sort_unstable();
        more.dedup();
        for b in &more {
            fill_batch_in(tx, b).await?;
        }
        let mut out: Vec<Result<Done>> = Vec::with_capacity(reqs.len());
        for (i, plan) in self.plans.into_iter().enumerate() {
            let Some(Plan { mut events, cancel }) = plan else {
                out.push(Err(self.failed[i]
                    .take()
                    .unwrap_or_else(|| lease_lost(&reqs[i].wf))));
                continue;
            };
            let mut mine = seqs.remove(&reqs[i].wf).unwrap_or_default();
            mine.sort_unstable();
            for (e, s) in events.iter_mut().zip(mine) {
                e.seq = s;
            }
            let passed = self.unparks[i].take().map(|to| {
                let t = took.contains(&to);
                (to, t)
            });
            out.push(Ok(Done {
                events,
                cancel,
                passed,
                ..Done::default()
            }));
        }

        // 5. The hand-offs leased their batches' next ready nodes in the batch above, and their
        //    hooks read ahead there. On PostgreSQL that was all; on SQLite those nodes' steps
        //    start now.
        let start = match d {
            Dialect::Postgres => Start::Done,
            Dialect::Sqlite => Start::Write,
        };
        let mut leases: Vec<(Vec<usize>, Leased)> = vec![];
        for (idxs, at, read) in ready_at {
            if let Some((h, k)) = read {
                h.0.handed_off_rows(&results[k], prefetched)?;
            }
            if let Some(l) = Leased::read(&results[at], None, start, now)? {
                leases.push((idxs, l));
            }
        }
        let mut stmts: Vec<Stmt> = vec![];
        let mut spans = vec![];
        for (_, l) in &mut leases {
            let s = l.stmts(d, now);
            spans.push(stmts.len()..stmts.len() + s.len());
            stmts.extend(s);
        }
        let res = match stmts.is_empty() {
            true => vec![],
            false => tx.query_many(&stmts).await?,
        };
        for ((idxs, l), span) in leases.into_iter().zip(spans) {
            let started = if span.is_empty() { &[][..] } else { &res[span] };
            for (i, c) in idxs.into_iter().zip(l.claimed(started)?) {
                if let Ok(done) = &mut out[i] {
                    done.handed = Some(c);
                }
            }
        }
        // The nodes leased ahead, nothing of theirs started: the first asked for go to the
        // first that asked.
        for (asks, at, read) in ahead_at {
            if let Some((h, k)) = read {
                h.0.handed_off_rows(&results[k], prefetched)?;
            }
            let Some(l) = Leased::read(&results[at], None, Start::No, now)? else {
                continue;
            };
            let mut got = l.claimed(&[])?.into_iter();
            for (i, k) in asks {
                if let Ok(done) = &mut out[i] {
                    done.ahead.extend(got.by_ref().take(k as usize));
                }
            }
        }
        Ok(out)
    }
}

/// Whether a completion ends its workflow (a step done, nothing next, no children).
pub(super) fn fin(j: &DoneReq) -> bool {
    j.finish && j.next.is_none() && j.commit.children.is_empty()
}

/// Whether a completion queues child workflows.
pub(super) fn spawns(j: &DoneReq) -> bool {
    !j.commit.children.is_empty()
}

/// Ends the workflows of rows `v` ([`END_ROW`]) succeeded, on the step given.
fn end_succeeded(v: &str) -> String {
    format!(
        "UPDATE workflows SET step = v.step, attempt = 0, updated_at = $1,
             status = 'succeeded', lease_owner = NULL, lease_until = NULL, finished_at = $1
         FROM {v} WHERE workflows.id = v.wf"
    )
}

/// Records the steps of rows `v` ([`STEP_DONE_ROW`]) done.
fn steps_done(v: &str) -> String {
    format!(
        "UPDATE workflow_steps SET status = 'done', error = NULL, finished_at = $1,
             output = v.output, attempts = attempts + v.ran,
             started_at = CASE WHEN v.ran = 1 THEN $1 ELSE started_at END
         FROM {v}
         WHERE workflow_steps.workflow_id = v.wf AND workflow_steps.idx = v.idx"
    )
}

/// Records the effects of rows `v` ([`EFFECT_ROW`]).
fn effects(v: &str) -> String {
    format!(
        "INSERT INTO step_effects (workflow_id, idx, key, payload, at)
         SELECT v.wf, v.idx, v.key, v.payload, $1 FROM {v}"
    )
}

pub(super) fn r_text(r: &Row, c: &str) -> Result<String> {
    crate::db::Cols::text(r, c)
}

pub(super) fn r_int(r: &Row, c: &str) -> Result<i64> {
    crate::db::Cols::int(r, c)
}

pub(super) fn r_opt_text(r: &Row, c: &str) -> Result<Option<String>> {
    crate::db::Cols::opt_text(r, c)
}
