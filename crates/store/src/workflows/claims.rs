//! Claims and leases: which workflows a node takes, in one transaction each, and how it
//! keeps or gives back their leases.

use super::sets::{EVENT_ROW, STEP_START_ROW, id_in, ids_arg, starts_with_events};
use super::{
    ClaimLimits, Claimed, StepRecord, StepStatus, WF_COLS, Workflow, WorkflowEvent, WorkflowStatus,
    clock, lease_lost, skip_locked, step_from, workflow_from,
};
use crate::db::{Col, Cols, Dialect, Durability, RowSet, Stmt, Tx, Value, limit_by, stmt};
use crate::{Result, Store};
use std::collections::HashMap;
/// Advisory lock key of limited claims on PostgreSQL: with a per-user, -provider or -host
/// limit set, claims of all replicas take turns, so the limit counts are exact.
const CLAIM_LOCK: i64 = 4_242_000_002;

/// The one column of the set of definitions a node runs.
const DEFINITION: &[Col] = &[("definition", false)];

/// Leases the workflows `ids` to `node` (those still claimable, in their order), loads their
/// steps and, with `start`, starts the current step of each that runs forward (not one that is
/// undoing or has a cancel pending): two round trips.
pub(crate) async fn lease_many(
    tx: &mut dyn Tx,
    ids: &[String],
    node: &str,
    lease_until: i64,
    now: i64,
    start: bool,
) -> Result<Vec<Claimed>> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let d = tx.dialect();
    let sql = format!(
        "UPDATE workflows SET lease_owner = $1, lease_until = $2, updated_at = $3, parked = 0,
             status = CASE WHEN status = 'pending' THEN 'running' ELSE status END
         WHERE {} AND (lease_owner IS NULL OR lease_until < $3)
         RETURNING {WF_COLS}",
        id_in(d, "id", 4)
    );
    // The steps of every one asked for are read in the same round trip (those of a workflow
    // no longer claimable are dropped).
    let steps_sql = format!(
        "SELECT * FROM workflow_steps WHERE {} ORDER BY workflow_id, idx",
        id_in(d, "workflow_id", 1)
    );
    let res = tx
        .query_many(&[
            Stmt::new(
                sql,
                vec![node.into(), lease_until.into(), now.into(), ids_arg(d, ids)],
            ),
            Stmt::new(steps_sql, vec![ids_arg(d, ids)]),
        ])
        .await?;
    let start = if start { Start::Write } else { Start::No };
    let Some(mut leased) = Leased::read(&res, Some(ids), start, now)? else {
        return Ok(vec![]);
    };
    let stmts = leased.stmts(d, now);
    if stmts.is_empty() {
        return leased.claimed(&[]);
    }
    let results = tx.query_many(&stmts).await?;
    leased.claimed(&results)
}

/// A workflow's steps as `json_agg` of its `workflow_steps` rows gives them.
fn steps_of_json(json: &str) -> Result<Vec<crate::StepRecord>> {
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(json)
        .map_err(|e| crate::StoreError::Corrupt("workflow_steps", e.to_string()))?;
    rows.iter().map(step_from).collect()
}

/// What [`Leased::read`] does about the current step of each workflow that runs forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Nothing: it is not started here.
    No,
    /// Starts it: [`Leased::stmts`] writes the starts.
    Write,
    /// The lease's statement started it: its row's `seq` numbers the start's event (none
    /// where it started nothing).
    Done,
}

/// Workflows just leased, read from their rows, with the starts of their current steps to
/// write ([`Leased::stmts`]); then, from what those returned, claimed ([`Leased::claimed`]).
pub(crate) struct Leased {
    out: Vec<(Workflow, Vec<WorkflowEvent>, bool)>,
    starts: RowSet,
    events: RowSet,
}

impl Leased {
    /// The workflows of a lease's rows `[leased, steps]` (in the order of `ids` if given),
    /// with the current step of each that runs forward started as `start` says. None if none.
    pub(crate) fn read(
        res: &[Vec<crate::db::Row>],
        ids: Option<&[String]>,
        start: Start,
        now: i64,
    ) -> Result<Option<Leased>> {
        let (rows, step_rows) = match res {
            [rows, step_rows] => (rows, Some(step_rows)),
            // Each row with its steps ([`lease_ready`] on PostgreSQL).
            [rows] => (rows, None),
            _ => {
                return Err(crate::StoreError::Corrupt(
                    "workflows",
                    "a lease returned the wrong number of results".into(),
                ));
            }
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let mut by_id: HashMap<String, Option<Workflow>> = HashMap::new();
        let mut order = vec![];
        let mut started_seq: HashMap<String, i64> = HashMap::new();
        for r in rows {
            let id = r.text("id")?;
            if start == Start::Done
                && let Some(seq) = r.opt_int("seq")?
            {
                started_seq.insert(id.clone(), seq);
            }
            let steps = match step_rows {
                Some(_) => vec![],
                None => steps_of_json(&r.text("steps_json")?)?,
            };
            by_id.insert(id.clone(), Some(workflow_from(r, steps)?));
            order.push(id);
        }
        for r in step_rows.into_iter().flatten() {
            if let Some(Some(wf)) = by_id.get_mut(&r.text("workflow_id")?) {
                wf.steps.push(step_from(r)?);
            }
        }
        let order: Vec<&String> = match ids {
            Some(ids) => ids.iter().collect(),
            None => order.iter().collect(),
        };
        let (mut starts, mut events) = (RowSet::new(STEP_START_ROW), RowSet::new(EVENT_ROW));
        let mut out = Vec::with_capacity(by_id.len());
        for id in order {
            let Some(mut wf) = by_id.get_mut(id).and_then(Option::take) else {
                continue;
            };
            if let Some(rec) = usize::try_from(wf.step).ok().and_then(|i| wf.steps.get(i))
                && rec.status == StepStatus::Running
            {
                // Its step was started under a lease that ran out before the step ended.
                metrics::counter!("basphere_lease_takeovers_total", "definition" => wf.definition.clone())
                    .increment(1);
            }
            let runnable = match start {
                Start::No => false,
                Start::Write => wf.status == WorkflowStatus::Running && !wf.cancel_requested,
                Start::Done => started_seq.contains_key(&wf.id),
            };
            let mut evs = vec![];
            let mut started = false;
            if let (true, Ok(i)) = (runnable, usize::try_from(wf.step))
                && i < wf.steps.len()
            {
                let rec = &mut wf.steps[i];
                let d = rec.timeout_ms;
                evs.push(match started_seq.get(&wf.id) {
                    Some(&seq) => WorkflowEvent {
                        seq,
                        ..started_event(&wf.id, &rec.name, now)
                    },
                    None => start_one(
                        &mut starts,
                        &mut events,
                        &wf.id,
                        i64::from(rec.idx),
                        &rec.name,
                        d,
                        now,
                    ),
                });
                rec.status = StepStatus::Running;
                rec.attempts += 1;
                rec.started_at = Some(now);
                rec.deadline_at = Some(now + d);
                started = true;
            }
            out.push((wf, evs, started));
        }
        Ok(Some(Leased {
            out,
            starts,
            events,
        }))
    }

    /// The starts to write: the steps, then their events (returning their numbers). Empty if
    /// none starts.
    pub(crate) fn stmts(&mut self, d: Dialect, now: i64) -> Vec<Stmt> {
        let starts = std::mem::replace(&mut self.starts, RowSet::new(STEP_START_ROW));
        let events = std::mem::replace(&mut self.events, RowSet::new(EVENT_ROW));
        starts_with_events(d, starts, events, now)
    }

    /// The claimed workflows, their events numbered from `results`, the results of
    /// [`Leased::stmts`] (the events' are the last; none when the lease started them).
    pub(crate) fn claimed(self, results: &[Vec<crate::db::Row>]) -> Result<Vec<Claimed>> {
        let mut seqs: HashMap<String, i64> = HashMap::new();
        for r in results.last().into_iter().flatten() {
            seqs.insert(r.text("workflow_id")?, r.int("seq")?);
        }
        let mut out = self.out;
        for (wf, evs, _) in &mut out {
            if let Some(&seq) = seqs.get(&wf.id) {
                for e in evs {
                    e.seq = seq;
                }
            }
        }
        Ok(out)
    }
}

/// Workflows just queued in the caller's transaction, to lease to `node` with their first
/// step started, as [`lease_many`] would, but known runnable: its statements go in the caller's
/// batch of writes (no round trip of their own). [`leased_new`] reads what they returned.
pub(crate) struct LeaseNew {
    stmts: Vec<Stmt>,
    /// Each workflow's `step_started` event (its number comes with the results).
    started: HashMap<String, WorkflowEvent>,
    /// Which of `stmts` returns the events' numbers.
    events_at: usize,
}

impl LeaseNew {
    /// The lease of workflows `ids` to `node`, each starting its first step `first`.
    fn new(
        d: Dialect,
        ids: &[String],
        first: &super::NewStep,
        node: &str,
        lease_until: i64,
        now: i64,
    ) -> Self {
        let (mut starts, mut events) = (RowSet::new(STEP_START_ROW), RowSet::new(EVENT_ROW));
        let started = ids
            .iter()
            .map(|id| {
                let (name, timeout) = (&first.name, first.timeout_ms);
                let ev = start_one(&mut starts, &mut events, id, 0, name, timeout, now);
                (id.clone(), ev)
            })
            .collect();
        let lease = Stmt::new(
            format!(
                "UPDATE workflows SET lease_owner = $1, lease_until = $2, updated_at = $3,
                     status = 'running'
                 WHERE {} RETURNING {WF_COLS}",
                id_in(d, "id", 4)
            ),
            vec![node.into(), lease_until.into(), now.into(), ids_arg(d, ids)],
        );
        let steps = Stmt::new(
            format!(
                "SELECT * FROM workflow_steps WHERE {} ORDER BY workflow_id, idx",
                id_in(d, "workflow_id", 1)
            ),
            vec![ids_arg(d, ids)],
        );
        let mut stmts = vec![lease];
        stmts.extend(starts_with_events(d, starts, events, now));
        let events_at = stmts.len() - 1;
        stmts.push(steps);
        Self {
            stmts,
            started,
            events_at,
        }
    }

    /// The lease of the first `lease.max` of the workflows `ids`, just queued with `steps`:
    /// none without a lease, a slot or a step.
    pub(crate) async fn first(
        tx: &mut dyn Tx,
        ids: &[String],
        steps: &[super::NewStep],
        lease: Option<&super::LeaseTo>,
    ) -> Result<Option<Self>> {
        let (Some(l), Some(first)) = (lease, steps.first()) else {
            return Ok(None);
        };
        if l.max == 0 || ids.is_empty() {
            return Ok(None);
        }
        let now = clock(tx).await?;
        let ids = &ids[..ids.len().min(l.max)];
        Ok(Some(Self::new(
            tx.dialect(),
            ids,
            first,
            &l.node,
            now + l.lease_ms,
            now,
        )))
    }

    pub(crate) fn stmts(&self) -> &[Stmt] {
        &self.stmts
    }

    /// The leased workflows from the rows of [`LeaseNew::stmts`] (in their order).
    pub(crate) fn leased(&self, results: &[Vec<crate::db::Row>]) -> Result<Vec<Claimed>> {
        let (Some(lease), Some(events), Some(steps)) = (
            results.first(),
            results.get(self.events_at),
            results.get(self.stmts.len() - 1),
        ) else {
            return Err(crate::StoreError::Corrupt(
                "workflows",
                "a lease of new workflows returned the wrong number of results".into(),
            ));
        };
        let mut by_wf: HashMap<String, Vec<StepRecord>> = HashMap::new();
        for r in steps {
            by_wf
                .entry(r.text("workflow_id")?)
                .or_default()
                .push(step_from(r)?);
        }
        let seqs: HashMap<String, i64> = events
            .iter()
            .map(|r| Ok((r.text("workflow_id")?, r.int("seq")?)))
            .collect::<Result<_>>()?;
        lease
            .iter()
            .map(|r| {
                let id = r.text("id")?;
                let wf = workflow_from(r, by_wf.remove(&id).unwrap_or_default())?;
                let evs = self.started.get(&id).cloned().map(|mut ev| {
                    ev.seq = seqs.get(&id).copied().unwrap_or_default();
                    ev
                });
                Ok((wf, evs.into_iter().collect(), true))
            })
            .collect()
    }
}

/// Adds the start of step `idx` (`name`, its timeout `timeout_ms`) of workflow `id` at `now`
/// to `starts`, and its `step_started` event to `events`; the event (numbered when appended).
fn start_one(
    starts: &mut RowSet,
    events: &mut RowSet,
    id: &str,
    idx: i64,
    name: &str,
    timeout_ms: i64,
    now: i64,
) -> WorkflowEvent {
    starts.push(vec![id.into(), idx.into(), (now + timeout_ms).into()]);
    let ev = started_event(id, name, now);
    events.push(vec![
        (events.len() as i64).into(),
        id.into(),
        name.into(),
        ev.kind.as_str().into(),
        ev.message.as_str().into(),
    ]);
    ev
}

/// The event of step `name` of workflow `id` started at `now` (its number once appended).
/// [`lease_ready`] writes the same on PostgreSQL.
fn started_event(id: &str, name: &str, now: i64) -> WorkflowEvent {
    WorkflowEvent {
        seq: 0,
        operation_id: id.to_string(),
        at: now,
        step: Some(name.to_string()),
        kind: "step_started".into(),
        message: format!("{name} started"),
    }
}

/// Each row's first column as text.
fn ids(rows: Vec<crate::db::Row>) -> Result<Vec<String>> {
    rows.iter()
        .map(|r| r.first_text().map(Option::unwrap_or_default))
        .collect()
}

async fn claim_in(
    tx: &mut dyn Tx,
    node: &str,
    lease_ms: i64,
    limits: ClaimLimits,
    max: i64,
    runs: Option<&[String]>,
) -> Result<Vec<Claimed>> {
    let limited = limits.any();
    if limited && tx.dialect() == Dialect::Postgres {
        tx.query(&stmt!("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK))
            .await?;
    }
    let now = clock(tx).await?;
    let lock = skip_locked(tx);
    // Only definitions this node runs: `AND w.definition IN (…)` reading parameter `$n`.
    let d = tx.dialect();
    let only = |n: usize| match runs {
        Some(_) => {
            let set = RowSet::new(DEFINITION);
            format!(
                " AND w.definition IN (SELECT v.definition FROM {})",
                set.relation(d, n)
            )
        }
        None => String::new(),
    };
    let defs = || -> Vec<Value> {
        let mut set = RowSet::new(DEFINITION);
        for r in runs.unwrap_or_default() {
            set.push(vec![Value::Text(r.clone())]);
        }
        match runs {
            Some(_) => set.args(d),
            None => vec![],
        }
    };
    // A cancel needs no dependency or slot: those first.
    let sql = format!(
        "SELECT w.id FROM workflows w
         WHERE w.cancel_requested = 1 AND w.status IN ('pending', 'running', 'undoing')
           AND (w.lease_owner IS NULL OR w.lease_until < $1){}
         ORDER BY w.priority DESC, w.created_at {}{lock}",
        only(3),
        limit_by("$2")
    );
    let mut args = vec![now.into(), max.into()];
    args.extend(defs());
    let cancels = Stmt::new(sql, args);
    // Then ready workflows in priority order (the partial index `workflows_ready`); the limits
    // exclude keys already at their maximum, each set computed once. Both queries go in one
    // round trip, each up to `max` (cancels are rare: the few extra rows a claim may lock
    // then stay unleased and are free again at its commit).
    let ready = {
        let mut sql = String::from(
            "SELECT w.id FROM workflows w
             WHERE w.status IN ('pending', 'running', 'undoing') AND w.waiting_on = 0
               AND w.parked = 0 AND w.next_run_at <= $1
               AND (w.lease_owner IS NULL OR w.lease_until < $1)
               AND w.cancel_requested = 0",
        );
        let mut args: Vec<Value> = vec![now.into()];
        for (col, lim) in [
            ("owner", limits.per_user),
            ("provider", limits.per_provider),
            ("host", limits.per_host),
        ] {
            if let Some(max) = lim {
                args.push(max.into());
                let n = args.len();
                sql.push_str(&format!(
                    " AND (w.{col} IS NULL OR w.{col} NOT IN (SELECT o.{col} FROM workflows o
                       WHERE o.status IN ('pending', 'running', 'undoing')
                         AND o.waiting_on = 0 AND o.parked = 0
                         AND o.lease_until >= $1 AND o.{col} IS NOT NULL
                       GROUP BY o.{col} HAVING COUNT(*) >= ${n}))"
                ));
            }
        }
        if runs.is_some() {
            sql.push_str(&only(args.len() + 1));
            args.extend(defs());
        }
        args.push(max.into());
        sql.push_str(&format!(
            " ORDER BY w.priority DESC, w.created_at {}{lock}",
            limit_by(&format!("${}", args.len()))
        ));
        Stmt::new(sql, args)
    };
    let mut todo = vec![];
    for rows in tx.query_many(&[cancels, ready]).await? {
        todo.extend(ids(rows)?);
    }
    todo.truncate(max as usize);
    lease_many(tx, &todo, node, now + lease_ms, now, runs.is_some()).await
}

impl Store {
    /// Claims the most urgent runnable workflow for `node` with a lease of `lease_ms`.
    ///
    /// Runnable: unfinished, due, not leased (or its lease expired), its batch dependencies
    /// ended and a batch slot given (`parked = 0`) — or a cancel was asked for, which needs
    /// neither. Among those, one whose user, provider and host are under their concurrency
    /// limits; highest priority first, then oldest. Claiming a workflow claims its next step:
    /// steps of one workflow run in order, so the workflow's lease is the step's lease.
    pub async fn claim_workflow(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
    ) -> Result<Option<Workflow>> {
        Ok(self
            .claim(node, lease_ms, limits, 1, None)
            .await?
            .pop()
            .map(|c| c.0))
    }

    /// Claims up to `max` workflows of the `definitions` this node runs in one transaction
    /// (see [`Store::claim_workflow`]) and starts each one's next step with the timeout stored
    /// when it was queued (not when undoing or cancelling). Returns each workflow as it is
    /// after that, the events, and whether it started the step. With any concurrency limit
    /// set it claims one. On PostgreSQL the SELECTs take `FOR UPDATE SKIP LOCKED`, so replicas
    /// claiming at once pass over each other's rows; limited claims also take an advisory lock
    /// ([`CLAIM_LOCK`]) so that the counts behind the limits are exact across replicas.
    pub async fn claim_many(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        max: usize,
        definitions: &[String],
    ) -> Result<Vec<Claimed>> {
        self.claim(node, lease_ms, limits, max, Some(definitions.to_vec()))
            .await
    }

    /// Claims as [`Store::claim_many`] does with `runs`; without, of any definition and
    /// starting no step.
    async fn claim(
        &self,
        node: &str,
        lease_ms: i64,
        limits: &ClaimLimits,
        max: usize,
        runs: Option<Vec<String>>,
    ) -> Result<Vec<Claimed>> {
        let limited = limits.any();
        let max = if limited { 1 } else { max.max(1) } as i64;
        let (node, limits) = (node.to_string(), *limits);
        self.db
            .write_with(Durability::Replayable, move |tx| {
                Box::pin(async move {
                    claim_in(tx, &node, lease_ms, limits, max, runs.as_deref()).await
                })
            })
            .await
    }

    /// Extends `node`'s lease; `LeaseLost` if another node holds it now.
    pub async fn renew_lease(&self, wf: &str, node: &str, lease_ms: i64) -> Result<()> {
        let (wf, node) = (wf.to_string(), node.to_string());
        self.db
            .write_with(Durability::Replayable, move |tx| {
                Box::pin(async move {
                    let now = clock(tx).await?;
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE workflows SET lease_until = $3 WHERE id = $1 AND lease_owner = $2",
                            wf.as_str(),
                            node.as_str(),
                            now + lease_ms,
                        ))
                        .await?;
                    if n == 0 { Err(lease_lost(&wf)) } else { Ok(()) }
                })
            })
            .await
    }

    /// Drops every lease `node` holds (a restarted node reclaims its own work at once).
    pub async fn release_leases(&self, node: &str) -> Result<u64> {
        let s = stmt!(
            "UPDATE workflows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
            node
        );
        self.db
            .write(move |tx| Box::pin(async move { tx.exec(&s).await }))
            .await
    }

    /// Gives a claimed workflow back without changing it (e.g. its definition is unknown
    /// here), to be claimed again after `delay_ms`.
    pub async fn release_workflow(&self, wf: &str, node: &str, delay_ms: i64) -> Result<()> {
        let (wf, node) = (wf.to_string(), node.to_string());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let now = clock(tx).await?;
                    tx.exec(&stmt!(
                        "UPDATE workflows SET lease_owner = NULL, lease_until = NULL, next_run_at = $3
                         WHERE id = $1 AND lease_owner = $2",
                        wf.as_str(),
                        node.as_str(),
                        now + delay_ms,
                    ))
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Gives back the nodes of `batch` leased ahead to `node` (`Handoff::ahead`) that it will
    /// not run, `ids`: any node's again, and the batch's free slots go to its ready nodes.
    pub async fn release_ahead(&self, batch: &str, ids: &[String], node: &str) -> Result<()> {
        let (batch, ids, node) = (batch.to_string(), ids.to_vec(), node.to_string());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let d = tx.dialect();
                    let sql = format!(
                        "UPDATE workflows SET lease_owner = NULL, lease_until = NULL
                         WHERE {} AND lease_owner = $2 AND parked = 1",
                        id_in(d, "id", 1)
                    );
                    tx.exec(&Stmt::new(sql, vec![ids_arg(d, &ids), node.into()]))
                        .await?;
                    super::fill_batch_in(tx, &batch).await
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::steps_of_json;

    #[test]
    fn steps_read_from_json_agg_keep_nulls_numbers_and_order() {
        let json = r#"[
            {"workflow_id": "w", "idx": 0, "name": "prepare", "status": "done", "attempts": 1,
             "error": null, "started_at": 1733300000000, "finished_at": 1733300000001,
             "idem_key": "k0", "deadline_at": null, "output": "{\"ip\":\"10.0.0.2\"}",
             "timeout_ms": 600000},
            {"workflow_id": "w", "idx": 1, "name": "boot", "status": "pending", "attempts": 0,
             "error": null, "started_at": null, "finished_at": null, "idem_key": null,
             "deadline_at": null, "output": null, "timeout_ms": null}
        ]"#;
        let steps = steps_of_json(json).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!((steps[0].idx, steps[0].name.as_str()), (0, "prepare"));
        assert_eq!(steps[0].finished_at, Some(1_733_300_000_001));
        assert_eq!(steps[0].output, Some(serde_json::json!({"ip": "10.0.0.2"})));
        assert_eq!(steps[1].timeout_ms, crate::NewStep::DEFAULT_TIMEOUT_MS);
        assert_eq!(steps[1].idem_key, "");
        assert!(steps[1].started_at.is_none());
    }

    #[test]
    fn a_step_row_of_the_wrong_shape_is_an_error_not_a_default() {
        let text_for_int = r#"[{"workflow_id": "w", "idx": "0", "name": "a", "status": "done",
            "attempts": 1, "timeout_ms": 1}]"#;
        let e = steps_of_json(text_for_int).unwrap_err().to_string();
        assert!(e.contains("idx"), "{e}");
        let missing_name = r#"[{"workflow_id": "w", "idx": 0, "status": "done", "attempts": 1}]"#;
        let e = steps_of_json(missing_name).unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
        assert!(steps_of_json("not json").is_err());
    }
}
