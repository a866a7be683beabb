//! Group commit of step completions, written once over `db::Tx`, and the two ways it runs.
//!
//! Every step completion is a write transaction. Completions that arrive together share one:
//! each keeps its own meaning — lease-guarded, atomic with its effects and children — only the
//! transaction is shared. One completion may record several steps of its workflow that ran one
//! after another (`DoneReq::ran`; the engine's fuse window). If a group fails, each completion
//! is retried alone so that one bad completion cannot fail the others. [`commit_group`] sends
//! each group in a few batches of statements (the lease-guarded moves, the rows of the others,
//! then every write), which PostgreSQL pipelines in one round trip each — or, where each of
//! its completions that ends says what its workflow is (`Completion::claimed`), all in one
//! round trip on the guess that the guards hold, their answers checked before the commit
//! ([`Guards::Guess`]; a wrong guess is rolled back and the group sent the careful way).
//!
//! - SQLite: one OS thread owns the write connection. It runs every write transaction of the
//!   store ([`Job::Tx`]) and groups the completions queued while its last transaction ran
//!   ([`Job::Done`]); being the only writer of this process, it never waits in SQLite's busy
//!   handler for itself. A second thread checkpoints the WAL in quiet moments, off every
//!   commit path.
//! - PostgreSQL: a task groups the completions likewise and commits one group at a time on a
//!   pooled connection; before sending a group it lets the runtime run the tasks that are
//!   ready (a few yields), so the completions they are about to send join it. PostgreSQL's
//!   cost is mostly per commit (its statements' and the commit's own work), so fewer, larger
//!   groups are what lets both cores do more nodes.
//!
//! `group` holds the transaction a group is (the SQL, once for both backends), `guards` how it
//! learns what its lease guards find, `slots` where the batch slots its endings free go;
//! `sqlite` and `postgres` hold how groups form and run on each.

mod group;
mod guards;
mod postgres;
mod slots;
mod sqlite;

use group::{GroupError, commit_group};
use guards::Guards;
pub(crate) use postgres::spawn_pg;
pub(crate) use sqlite::spawn;

use crate::Result;
use crate::workflows::{Claimed, Ending, Handoff, StepCommit, WorkflowEvent};
use rusqlite::Connection;
use std::time::Duration;
use tokio::sync::oneshot;

/// Most completions in one transaction.
const MAX_GROUP: usize = 64;
/// Groups committing at once on PostgreSQL. Two let a group form while one commits, but
/// halve the groups. Measured, two → one with [`PG_GATHER_YIELDS`]: a 1,000-node batch at
/// parallelism 10, PostgreSQL's CPU 0.43–0.56 → 0.26–0.33 s; no-op steps on three replicas
/// 8–10k → 12–13k steps/s, on one the same; fused steps on one replica 50–56k → 42–43k (two large
/// groups at once had used both cores).
const PG_IN_FLIGHT: usize = 1;
/// Times the PostgreSQL grouping task yields to the runtime before it sends a group, taking
/// the completions sent meanwhile (about a microsecond each when nothing else is ready).
const PG_GATHER_YIELDS: usize = 16;

/// One step completion to record: step `idx`, and before it the steps `ran` (the first the
/// one recorded running; the others ran unrecorded after it, see [`Store::complete`]).
///
/// [`Store::complete`]: crate::Store::complete
#[derive(Clone)]
pub(crate) struct DoneReq {
    pub wf: String,
    pub ran: Vec<(u32, String)>,
    pub idx: u32,
    pub name: String,
    pub node: String,
    pub commit: StepCommit,
    pub next: Option<(u32, String, i64)>,
    pub finish: bool,
    pub handoff: Option<Handoff>,
    /// See `Completion::pass_to`, `took_slot_of` and `unstarted`.
    pub pass_to: Option<String>,
    pub took_slot_of: Option<String>,
    pub unstarted: bool,
    /// What ending the workflow needs, as the engine claimed it (see `Completion::claimed`).
    pub ending: Option<Ending>,
}

pub(crate) struct DoneJob {
    pub req: DoneReq,
    pub reply: oneshot::Sender<Result<Done>>,
}

/// What a completion recorded: its events, whether a cancel was requested, the batch node
/// handed to it with a slot and those leased to it ahead of one; and the node its slot
/// passed to, with whether that node was there to take it (see [`Passes`]).
#[derive(Debug, Default)]
pub(crate) struct Done {
    pub events: Vec<WorkflowEvent>,
    pub cancel: bool,
    pub handed: Option<Claimed>,
    pub ahead: Vec<Claimed>,
    pub passed: Option<(String, bool)>,
}

/// A committer's record of the nodes leased ahead whose pass a committed group recorded
/// (`true`: the node took the slot; `false`: it was not there to take it), until they end.
/// A node's completions are recorded in order, so the pass to it is in the group of its
/// completion or in one committed before; this says which, and whether that node's slot is
/// one the batch counts.
#[derive(Debug, Default)]
pub(crate) struct Passes(std::sync::Mutex<std::collections::HashMap<String, bool>>);

impl Passes {
    const MAX: usize = 65_536;

    /// Whether the earlier pass to `wf` gave it a slot.
    fn took(&self, wf: &str) -> bool {
        self.0
            .lock()
            .expect("passes lock")
            .get(wf)
            .copied()
            .unwrap_or(false)
    }

    /// Notes what the committed group `reqs` answered `results` with (each `Ok` committed).
    fn committed(&self, reqs: &[DoneReq], results: &[Result<Done>]) {
        let mut m = self.0.lock().expect("passes lock");
        // Entries of nodes that never ended here (their lease lost) are forgotten in bulk
        // (a node forgotten so counts as not running when it ends: its slot waits for the
        // batch's next counted fill).
        if m.len() > Self::MAX {
            m.clear();
        }
        for (j, r) in reqs.iter().zip(results) {
            if let Ok(d) = r {
                if let Some((to, took)) = &d.passed {
                    m.insert(to.clone(), *took);
                }
                if j.finish && j.next.is_none() && j.commit.children.is_empty() {
                    m.remove(&j.wf);
                }
            }
        }
    }
}

/// What the SQLite write thread does: a step completion (grouped with others queued at the
/// same time), or one whole write transaction of the store's (see `db::sqlite`).
pub(crate) enum Job {
    Done(Box<DoneJob>),
    Tx(Box<dyn FnOnce(&mut Connection) + Send>),
    /// The store is closing: the thread ends (later sends fail as `Closed`).
    Stop,
}

/// Where a store sends its step completions.
#[derive(Clone, Debug)]
pub(crate) enum Committer {
    /// The SQLite write thread (through `Db::Sqlite`).
    Thread,
    /// The PostgreSQL grouping task.
    Task(tokio::sync::mpsc::UnboundedSender<DoneJob>),
}

/// A group commit's size and how long it took (`basphere_store_group_commit_*`).
fn observe_group(backend: &'static str, size: usize, took: Duration) {
    metrics::histogram!("basphere_store_group_commit_seconds", "backend" => backend)
        .record(took.as_secs_f64());
    metrics::histogram!("basphere_store_group_commit_size", "backend" => backend)
        .record(size as f64);
}
