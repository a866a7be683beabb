//! Batch nodes leased ahead of their slots. A batch node that finishes quickly hands its slot,
//! in memory, to the next node of its batch this engine holds ahead (`Handoff::ahead`) and
//! runs it at once, while its own completion — which records the pass (`Completion::pass_to`)
//! — commits. A slot so runs several quick nodes in the time of one commit, and the commits
//! grow larger and fewer; the batch never runs more than its parallelism, in memory or as
//! the store counts it.
//!
//! A *chain* is one engine slot running nodes of one batch one after another. The nodes held
//! ahead are shared by the batch's chains on this engine; when its last chain ends, those
//! left are given back (`Store::release_ahead`).

use crate::Engine;
use basphere_store::{Claimed, Completed, StoreError, Workflow};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::warn;

/// Nodes held ahead per chain of a batch. Each pass asks for one more, so a chain can run
/// this many nodes past its last commit before it waits for one.
pub(crate) const PER_CHAIN: usize = 8;

/// Completions a chain may have committing while it runs on. A chain with this many waits
/// for the oldest before it starts another node, so an engine that dies leaves at most this
/// many finished nodes per slot to run again (their completions were not durable), besides the
/// one running: at most this many fuse windows of work. Measured on PostgreSQL's 1,000-node
/// batch at parallelism 10: 32 costs nothing against no bound, 8 costs 5–10 %.
pub const IN_FLIGHT: usize = 32;

/// The nodes held ahead, per batch.
#[derive(Default)]
pub(crate) struct Pools(std::sync::Mutex<HashMap<String, Pool>>);

#[derive(Default)]
struct Pool {
    nodes: VecDeque<(Workflow, Instant)>,
    chains: usize,
    /// Nodes asked for by completions not answered yet.
    asked: usize,
    /// After an answer short of what was asked (the batch's ready queue ran dry; in a
    /// chain of dependencies it stays so), the completions to pass before asking again:
    /// twice as many after each short answer in a row (`short`), up to 128 times.
    dry: usize,
    short: u32,
}

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.0.lock().expect("ahead pools lock")
    }

    /// A chain of `batch` starts.
    pub(crate) fn join(&self, batch: &str) {
        self.lock().entry(batch.to_string()).or_default().chains += 1;
    }

    /// Keeps `nodes` of `batch`, held ahead at its admission.
    pub(crate) fn hold(&self, batch: &str, nodes: Vec<Workflow>) {
        let now = Instant::now();
        let mut m = self.lock();
        let p = m.entry(batch.to_string()).or_default();
        p.nodes.extend(nodes.into_iter().map(|w| (w, now)));
    }

    /// Empties the pool of `batch`: the ids of the nodes it held.
    pub(crate) fn drain(&self, batch: &str) -> Vec<String> {
        let mut m = self.lock();
        let Some(p) = m.get_mut(batch) else {
            return vec![];
        };
        p.nodes.drain(..).map(|(w, _)| w.id).collect()
    }

    /// A chain of `batch` ends; the ids of the nodes held that no chain is left to run.
    pub(crate) fn leave(&self, batch: &str) -> Vec<String> {
        let mut m = self.lock();
        let Some(p) = m.get_mut(batch) else {
            return vec![];
        };
        p.chains = p.chains.saturating_sub(1);
        if p.chains > 0 {
            return vec![];
        }
        let p = m.remove(batch).expect("pool present");
        p.nodes.into_iter().map(|(w, _)| w.id).collect()
    }

    /// For a node of `batch` finishing quickly: the next node held (one taken less than
    /// `fresh` ago), the ids of those held too long to start now, and how many more nodes
    /// to ask for (counted as asked).
    pub(crate) fn take(
        &self,
        batch: &str,
        fresh: Duration,
    ) -> (Option<Workflow>, Vec<String>, u32) {
        let mut m = self.lock();
        let Some(p) = m.get_mut(batch) else {
            return (None, vec![], 0);
        };
        let mut stale = vec![];
        let mut next = None;
        while let Some((w, at)) = p.nodes.pop_front() {
            if at.elapsed() < fresh {
                next = Some(w);
                break;
            }
            stale.push(w.id);
        }
        let mut want = (PER_CHAIN * p.chains).saturating_sub(p.nodes.len() + p.asked);
        if p.dry > 0 {
            p.dry -= 1;
            want = 0;
        }
        p.asked += want;
        (next, stale, want as u32)
    }

    /// The answer to a completion of `batch` that asked for `asked` nodes: the nodes it got;
    /// returns the ids of those no chain is left to run.
    pub(crate) fn got(&self, batch: &str, asked: u32, nodes: Vec<Workflow>) -> Vec<String> {
        let mut m = self.lock();
        match m.get_mut(batch) {
            Some(p) => {
                p.asked = p.asked.saturating_sub(asked as usize);
                if nodes.len() < asked as usize {
                    p.dry = (PER_CHAIN * p.chains) << p.short.min(7);
                    p.short += 1;
                } else if asked > 0 {
                    p.short = 0;
                }
                let now = Instant::now();
                p.nodes.extend(nodes.into_iter().map(|w| (w, now)));
                vec![]
            }
            None => nodes.into_iter().map(|w| w.id).collect(),
        }
    }
}

/// A completion that passed its slot on, committing while the node it passed to runs.
pub(crate) struct Pending {
    pub wf: String,
    /// The step its undo starts from, should a cancel have been asked for meanwhile.
    pub last: i64,
    pub definition: String,
    pub batch: String,
    pub asked: u32,
    pub done: tokio::task::JoinHandle<Result<Completed, StoreError>>,
}

/// Where a chain goes after a node.
pub(crate) enum Then {
    Stop,
    /// A node handed off with a slot, its first step started.
    Handed(Claimed),
    /// A node held ahead took the slot; the finished one's completion commits meanwhile.
    Pass {
        next: Workflow,
        pending: Pending,
    },
}

impl Engine {
    /// Runs a completion that passed its slot on to its end: the nodes it leased ahead join
    /// the pool; a cancel asked for meanwhile is undone here, in the chain's slot (the node
    /// it passed to has finished by now). Returns a node handed to it with a slot.
    pub(crate) async fn settle(&self, p: Pending) -> Option<Claimed> {
        let res = match p.done.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Corrupt(
                "engine",
                format!("a completion's task: {e}"),
            )),
        };
        let (ahead, res) = match res {
            Ok(mut d) => (std::mem::take(&mut d.ahead), Ok(d)),
            Err(e) => (vec![], Err(e)),
        };
        self.got_ahead(&p.batch, p.asked, ahead);
        let d = match res {
            Ok(d) => d,
            Err(e) => {
                warn!(workflow = %p.wf, error = %e, "recording a finished batch node failed; it resumes when its lease expires");
                return None;
            }
        };
        self.emit_all(d.events);
        if d.cancel {
            let def = self.def(&p.definition)?;
            let id = p.wf.clone();
            self.leased(&id, async {
                self.cancel_from(&p.wf, p.last).await?;
                self.undo(&*def, &p.wf).await
            })
            .await;
        }
        d.handed
    }

    /// A node to pass a finishing node's slot of `batch` to, and how many nodes to ask for.
    pub(crate) fn take_ahead(&self, batch: &str) -> (Option<Workflow>, u32) {
        let fresh = self.inner.cfg.lease / 2;
        let (next, stale, want) = self.inner.pools.take(batch, fresh);
        self.release_ahead(batch, stale);
        (next, want)
    }

    /// Notes the nodes a completion that asked for `asked` got.
    pub(crate) fn got_ahead(&self, batch: &str, asked: u32, nodes: Vec<Workflow>) {
        let left = self.inner.pools.got(batch, asked, nodes);
        self.release_ahead(batch, left);
    }

    /// Gives back every node of `batch` held ahead, once one of its nodes was slow: holding
    /// them saves nothing then, and other replicas may run them meanwhile.
    pub(crate) async fn give_back_ahead(&self, batch: &str) {
        let ids = self.inner.pools.drain(batch);
        if ids.is_empty() {
            return;
        }
        let node = &self.inner.cfg.node_id;
        if let Err(e) = self.inner.store.release_ahead(batch, &ids, node).await {
            warn!(batch = %batch, error = %e, "giving back batch nodes leased ahead failed; they are free when their leases expire");
        }
        self.wake();
    }

    /// Gives back nodes of `batch` held ahead that this engine will not run.
    pub(crate) fn release_ahead(&self, batch: &str, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let me = self.clone();
        let batch = batch.to_string();
        tokio::spawn(async move {
            let node = &me.inner.cfg.node_id;
            if let Err(e) = me.inner.store.release_ahead(&batch, &ids, node).await {
                warn!(batch = %batch, error = %e, "giving back batch nodes leased ahead failed; they are free when their leases expire");
            }
            me.wake();
        });
    }
}
