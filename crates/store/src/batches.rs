//! Batches of workflows of any definition: a DAG admitted in one transaction.
//!
//! Each node is an ordinary workflow tagged with its batch; its edges are rows of
//! `workflow_deps`, and the claim query runs a node only once its dependencies ended and the
//! batch has fewer than `parallelism` nodes in flight. A failed node skips the nodes that
//! require it (see `Store::finish_workflow`). What a node does to a resource before it is
//! queued (a VM's row, quota, address) is its resource's admission, in the same transaction
//! (`vms::batch`).

use crate::db::{Col, Cols, Dialect, RowSet, Stmt, Tx, stmt};
use crate::workflows::sets::{id_in, ids_arg};
use crate::workflows::{
    Claimed, LeaseTo, NewWorkflow, StepRecord, StepStatus, Workflow, WorkflowStatus, clock,
    fill_batch_in, idem_key, lease_many, ready_nodes,
};
use crate::{Result, Store, now_ms};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// One node of a batch: a workflow to queue, and what it runs after.
#[derive(Debug, Clone)]
pub struct BatchWork {
    /// The operation id it is queued under (a UUIDv7, made by [`BatchWork::new`]: nodes made
    /// in order get slots in that order).
    pub id: String,
    /// Its name in the batch (unique there).
    pub node: String,
    /// What the node's reference reports it does (`create`, `delete`, a definition's name).
    pub action: String,
    pub workflow: NewWorkflow,
    /// Hard edges to other nodes of this batch (a failed one skips this node).
    pub requires: Vec<String>,
    /// Soft edges to other nodes of this batch (order only; others are ignored).
    pub optional: Vec<String>,
    /// Hard edges to workflows outside the batch, by operation id (waited for while live).
    pub after: Vec<String>,
}

impl BatchWork {
    pub fn new(node: impl Into<String>, action: impl Into<String>, workflow: NewWorkflow) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            node: node.into(),
            action: action.into(),
            workflow,
            requires: vec![],
            optional: vec![],
            after: vec![],
        }
    }
}

/// One node of an admitted batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchNodeRef {
    pub node: String,
    pub action: String,
    pub operation_id: String,
}

/// An admitted batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchAdmitted {
    pub batch_id: String,
    pub nodes: Vec<BatchNodeRef>,
    /// The nodes the admission leased to the caller's node, their first step started (none
    /// without a lease): the caller's engine runs them ([`crate::LeaseTo`]).
    #[serde(skip)]
    pub leased: Vec<Claimed>,
    /// The nodes the admission leased to the caller's node *ahead* of their slots, in queue
    /// order (nothing of theirs started): its engine passes them the slots of the nodes it
    /// runs (`Handoff::ahead`). Only where no node waits on another.
    #[serde(skip)]
    pub held: Vec<Workflow>,
}

/// One statement inserting every row of `set` into `table`, whatever their number;
/// `consts` are columns set to the same SQL constant in every row. Rows are inserted in order.
pub(crate) fn bulk_insert(
    dialect: Dialect,
    table: &str,
    consts: &[(&str, &str)],
    set: RowSet,
) -> Option<Stmt> {
    if set.is_empty() {
        return None;
    }
    let cols = set.cols();
    let names = cols
        .iter()
        .map(|c| c.0)
        .chain(consts.iter().map(|c| c.0))
        .collect::<Vec<_>>()
        .join(", ");
    let values = cols
        .iter()
        .map(|c| format!("v.{}", c.0))
        .chain(consts.iter().map(|c| c.1.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!(
        "INSERT INTO {table} ({names}) SELECT {values} FROM {}",
        set.relation(dialect, 1)
    );
    if table == "workflow_events" {
        // Appends to the event log say which sequence numbers they took (see `db::postgres`).
        sql.push_str(" RETURNING seq");
    }
    Some(Stmt::new(sql, set.args(dialect)))
}

const WORKFLOW_ROW: &[Col] = WORKFLOW_ROW_HELD.split_at(WORKFLOW_ROW_HELD.len() - 2).0;
/// A queued workflow's columns, then the lease of a node held ahead at admission
/// ([`WORKFLOW_ROW`] without it).
const WORKFLOW_ROW_HELD: &[Col] = &[
    ("id", false),
    ("definition", false),
    ("resource_kind", false),
    ("resource_id", false),
    ("owner", false),
    ("priority", true),
    ("input", false),
    ("next_run_at", true),
    ("provider", false),
    ("host", false),
    ("batch_id", false),
    ("node", false),
    ("created_at", true),
    ("updated_at", true),
    ("lease_owner", false),
    ("lease_until", true),
];
const STEP_ROW: &[Col] = &[
    ("workflow_id", false),
    ("idx", true),
    ("name", false),
    ("idem_key", false),
    ("timeout_ms", true),
];
const EVENT_ROW: &[Col] = &[("workflow_id", false), ("at", true), ("message", false)];
const EDGE_ROW: &[Col] = &[
    ("workflow_id", false),
    ("depends_on", false),
    ("hard", true),
];

/// Queues `works` as batch `batch_id` of `owner` inside the caller's transaction: the batch
/// row, every workflow with its steps and queued event (a handful of statements whatever the
/// number of nodes), the edges, and the first `parallelism` ready nodes given a slot. Node
/// names are unique; edges to names not in the batch are ignored.
pub(crate) async fn enqueue_in(
    tx: &mut dyn Tx,
    batch_id: &str,
    owner: &str,
    parallelism: u32,
    works: &[BatchWork],
    lease: Option<&LeaseTo>,
) -> Result<BatchAdmitted> {
    let now = now_ms();
    tx.exec(&stmt!(
        "INSERT INTO batches (id, owner, parallelism, nodes, created_at) VALUES ($1, $2, $3, $4, $5)",
        batch_id,
        owner,
        parallelism.max(1),
        works.len() as i64,
        now,
    ))
    .await?;
    let op_of: HashMap<&str, &str> = works
        .iter()
        .map(|w| (w.node.as_str(), w.id.as_str()))
        .collect();
    // Where no node waits on another, the caller's node holds every node ahead of its slot
    // from the insert on (no row version of its own for it): its engine passes the slots of
    // the nodes it runs along them. The lease runs by the database's clock.
    let hold = lease.filter(|l| {
        l.max > 0
            && works
                .iter()
                .all(|b| b.requires.is_empty() && b.optional.is_empty() && b.after.is_empty())
    });
    let held_until = match hold {
        Some(l) => Some(clock(tx).await? + l.lease_ms),
        None => None,
    };
    let cols = if hold.is_some() {
        WORKFLOW_ROW_HELD
    } else {
        WORKFLOW_ROW
    };
    let (mut wfs, mut steps) = (RowSet::new(cols), RowSet::new(STEP_ROW));
    let (mut evs, mut edges) = (RowSet::new(EVENT_ROW), RowSet::new(EDGE_ROW));
    // One edge per pair (a name listed twice, or both required and optional, is one; the
    // hard one wins): `workflow_deps` keys on the pair.
    let mut paired = HashSet::new();
    for b in works {
        let (op, w) = (&b.id, &b.workflow);
        let mut row = vec![
            op.into(),
            (&w.definition).into(),
            w.resource.as_ref().map(|r| r.kind.as_str()).into(),
            w.resource.as_ref().map(|r| r.id.as_str()).into(),
            (&w.owner).into(),
            w.priority.into(),
            w.input.to_string().into(),
            now.into(),
            w.provider.as_ref().into(),
            w.host.as_ref().into(),
            batch_id.into(),
            (&b.node).into(),
            now.into(),
            now.into(),
        ];
        if let (Some(l), Some(until)) = (hold, held_until) {
            row.extend([l.node.as_str().into(), until.into()]);
        }
        wfs.push(row);
        for (i, s) in w.steps.iter().enumerate() {
            steps.push(vec![
                op.into(),
                (i as i64).into(),
                (&s.name).into(),
                idem_key(op, i, &s.name).into(),
                s.timeout_ms.into(),
            ]);
        }
        evs.push(vec![
            op.into(),
            now.into(),
            format!("{} queued", w.definition).into(),
        ]);
        let inside = b
            .requires
            .iter()
            .map(|r| (op_of.get(r.as_str()).copied(), true));
        let soft = b
            .optional
            .iter()
            .map(|r| (op_of.get(r.as_str()).copied(), false));
        let outside = b.after.iter().map(|a| (Some(a.as_str()), true));
        for (target, hard) in inside.chain(outside).chain(soft) {
            if let Some(t) = target.filter(|t| paired.insert((op.as_str(), *t))) {
                edges.push(vec![op.into(), t.into(), hard.into()]);
            }
        }
    }
    let d = tx.dialect();
    let inserts = [
        bulk_insert(
            d,
            "workflows",
            &[("status", "'pending'"), ("parked", "1")],
            wfs,
        ),
        bulk_insert(d, "workflow_steps", &[("status", "'pending'")], steps),
        bulk_insert(
            d,
            "workflow_events",
            &[("step", "NULL"), ("kind", "'queued'")],
            evs,
        ),
        bulk_insert(d, "workflow_deps", &[], edges),
    ];
    let has_edges = inserts[3].is_some();
    tx.run(&inserts.into_iter().flatten().collect::<Vec<_>>())
        .await?;
    // On PostgreSQL the workflows outside the batch that its nodes wait for are share-locked
    // (in id order) before they are counted: one ending meanwhile has either committed, and is
    // counted as ended, or waits for this commit and then releases these edges. Unlocked, an
    // ending that had found no edges to release could commit after the count saw it live,
    // and its dependents would wait for it forever. (SQLite's one writer orders them anyway.)
    let mut outside: Vec<String> = works.iter().flat_map(|b| b.after.clone()).collect();
    outside.sort_unstable();
    outside.dedup();
    if d == Dialect::Postgres && !outside.is_empty() {
        let sql = format!(
            "SELECT 1 FROM workflows WHERE {} ORDER BY id FOR SHARE",
            id_in(d, "id", 1)
        );
        tx.exec(&Stmt::new(sql, vec![ids_arg(d, &outside)])).await?;
    }
    if has_edges {
        tx.exec(&stmt!(
            "UPDATE workflows SET waiting_on = (
                 SELECT COUNT(*) FROM workflow_deps d JOIN workflows o ON o.id = d.depends_on
                 WHERE d.workflow_id = workflows.id
                   AND o.status IN ('pending', 'running', 'undoing'))
             WHERE batch_id = $1",
            batch_id
        ))
        .await?;
    }
    // Every node waits for a slot (all were inserted parked); the first `parallelism` ready
    // ones get one now (those held ahead given back first: the claims take them).
    match hold {
        Some(_) => {
            tx.exec(&stmt!(
                "UPDATE workflows SET parked = 0, lease_owner = NULL, lease_until = NULL
                 WHERE id IN (SELECT id FROM workflows WHERE batch_id = $1 AND parked = 1
                              ORDER BY created_at, id LIMIT CAST($2 AS BIGINT))",
                batch_id,
                i64::from(parallelism.max(1)),
            ))
            .await?;
        }
        None => fill_batch_in(tx, batch_id).await?,
    }
    // The caller's node takes up to `lease.max` of the nodes given a slot, saving each a
    // claim. They were inserted ready at `now` (this machine's clock); their lease runs by
    // the database's.
    let leased = match lease.filter(|l| l.max > 0) {
        Some(l) => {
            let ready = ready_nodes(tx, batch_id, l.max, now);
            let ids = tx
                .query(&ready)
                .await?
                .iter()
                .map(|r| r.text("id"))
                .collect::<Result<Vec<_>>>()?;
            let at = clock(tx).await?;
            lease_many(tx, &ids, &l.node, at + l.lease_ms, at, true).await?
        }
        None => vec![],
    };
    // Those held are the rest, in the queue's order (`created_at`, all `now`, then `id`):
    // as inserted, read from nothing.
    let held = match hold {
        Some(_) => {
            let mut rest: Vec<&BatchWork> = works.iter().collect();
            rest.sort_by(|a, b| a.id.cmp(&b.id));
            rest.into_iter()
                .skip(parallelism.max(1) as usize)
                .map(|b| queued(b, batch_id, now))
                .collect()
        }
        None => vec![],
    };
    Ok(BatchAdmitted {
        batch_id: batch_id.to_string(),
        nodes: works
            .iter()
            .map(|b| BatchNodeRef {
                node: b.node.clone(),
                action: b.action.clone(),
                operation_id: b.id.clone(),
            })
            .collect(),
        leased,
        held,
    })
}

/// Node `b` of batch `batch_id` as [`enqueue_in`] queued it at `now`, waiting on nothing.
fn queued(b: &BatchWork, batch_id: &str, now: i64) -> Workflow {
    let w = &b.workflow;
    Workflow {
        id: b.id.clone(),
        definition: w.definition.clone(),
        resource: w.resource.clone(),
        parent_id: None,
        owner: w.owner.clone(),
        status: WorkflowStatus::Pending,
        step: 0,
        attempt: 0,
        priority: w.priority,
        error: None,
        input: w.input.clone(),
        cancel_requested: false,
        batch_id: Some(batch_id.to_string()),
        node: Some(b.node.clone()),
        waiting_on: 0,
        created_at: now,
        updated_at: now,
        finished_at: None,
        steps: w
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepRecord {
                idx: i as u32,
                name: s.name.clone(),
                status: StepStatus::Pending,
                attempts: 0,
                error: None,
                started_at: None,
                finished_at: None,
                idem_key: idem_key(&b.id, i, &s.name),
                deadline_at: None,
                timeout_ms: s.timeout_ms,
                output: None,
            })
            .collect(),
    }
}

impl Store {
    /// Queues `works` as one batch of `owner`'s, in one transaction, for workflows of any
    /// registered definition (VM batches add their admission: [`Store::admit_batch`]).
    pub async fn enqueue_batch(
        &self,
        owner: &str,
        parallelism: u32,
        works: Vec<BatchWork>,
    ) -> Result<BatchAdmitted> {
        let owner = owner.to_string();
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let batch_id = uuid::Uuid::now_v7().to_string();
                    enqueue_in(tx, &batch_id, &owner, parallelism, &works, None).await
                })
            })
            .await
    }

    /// The owner of a batch, if it exists.
    pub async fn batch_owner(&self, id: &str) -> Result<Option<String>> {
        let s = stmt!("SELECT owner FROM batches WHERE id = $1", id);
        self.db
            .read(move |tx| {
                Box::pin(
                    async move { tx.query_opt(&s).await?.map(|r| r.text("owner")).transpose() },
                )
            })
            .await
    }
}
