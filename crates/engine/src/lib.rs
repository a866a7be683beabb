//! Durable workflows: the engine runs each persisted workflow step by step.
//!
//! **Step model.** A workflow is a kind plus a persisted list of steps. What a kind's steps do
//! is a [`WorkflowDef`] registered with the engine: for each step its deadline and
//! [`RetryPolicy`] ([`StepSpec`]), how to run it and how to undo it. Every step has an
//! idempotency key (`<workflow>/<idx>/<name>`, stable across attempts, restarts and nodes)
//! that it names its outside work after. Every definition — VM create and delete
//! (`basphere-vm-workflows`), clusters, bare-metal setup, tests — is added with
//! [`Engine::register`], together with its hooks on its resource (run by the store in the
//! transaction that ends or retries a workflow).
//!
//! **Children.** A step may spawn child workflows ([`StepCommit::children`]), queued in the
//! transaction that completes it; the parent then waits, unleased, until every child has
//! ended, and its next step (typically one that reads [`Store::children`]) runs after that.
//! A parent undoes a child that succeeded with [`Engine::roll_back`].
//!
//! **Execution.** A worker claims a runnable workflow with a lease (renewed by a heartbeat at a
//! third of it); claiming a workflow claims its next step. Each step's outcome — and the
//! effects it commits ([`basphere_store::StepCommit`]) — is one transaction, which also starts
//! the next step. Retryable failures are retried with exponential backoff and jitter, by
//! whichever node claims the workflow next; a permanent failure (or exhausted attempts) undoes
//! the done steps in reverse and ends the workflow failed; the definition's hooks apply that to
//! its resource in the same transaction. A cancel is honoured at the next step boundary (a
//! running step finishes or hits its deadline first), then undoes likewise. A crashed node's workflows
//! resume when its lease expires, or at once when the same node restarts.
//!
//! **Exactly once.** A step's effect is exactly-once when it is either committed with the
//! step's completion (the store's effect outbox: a crash loses both or keeps both) or
//! idempotent under the step's key (a provider finds its earlier work). Everything else is
//! at-least-once, which the key makes harmless.
//!
//! Architecture invariant: the engine never decides admission, never writes SQL and never
//! names a resource kind; it moves workflows through the store's lease-guarded transitions and
//! calls the definitions registered with it.

/// Batch planning, re-exported so `basphere_engine::plan` keeps naming it.
pub use basphere_plan as plan;
mod error;

use basphere_store::{
    ClaimLimits, Claimed, Handoff, Hooks, LeaseTo, NewStep, NextStep, Reopen, StepCommit,
    StepStatus, Store, StoreError, Workflow, WorkflowEvent, WorkflowOutcome, WorkflowStatus,
};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};
use tracing::{info, warn};

pub use error::{StepError, StepErrorKind};

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = never retry). Only retryable errors are retried.
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    /// Each delay is scaled by a random factor in `1 ± jitter`.
    pub jitter: f64,
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: `base · 2^attempt`, capped, with jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        let j = self.jitter.clamp(0.0, 1.0);
        exp.mul_f64(1.0 - j + rand::random::<f64>() * 2.0 * j)
    }
}

/// How one step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSpec {
    /// After this long an attempt counts as a retryable failure.
    pub deadline: Duration,
    pub retry: RetryPolicy,
}

/// What a step sees when it runs or is undone.
pub struct StepCtx<'a> {
    /// The engine running it (to read children, or roll one back).
    pub engine: &'a Engine,
    pub workflow: &'a Workflow,
    pub idx: u32,
    pub name: &'a str,
    /// Stable across attempts, restarts and nodes: name outside work after it.
    pub idem_key: &'a str,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub deadline: Duration,
}

/// What the steps of one workflow kind do.
#[async_trait::async_trait]
pub trait WorkflowDef: Send + Sync + 'static {
    /// What ending or retrying a workflow registered as `definition` does to its resource
    /// (none: nothing outside the ledger).
    fn hooks(&self, _definition: &str) -> Option<Hooks> {
        None
    }
    /// Deadline and retry policy of the step called `name`.
    fn step(&self, name: &str) -> StepSpec;
    /// Runs a step. Anything in the returned commit is recorded atomically with its completion.
    async fn run(&self, ctx: &StepCtx<'_>) -> Result<StepCommit, StepError>;
    /// Undoes a done step (called in reverse order after a permanent failure or a cancel).
    async fn undo(&self, ctx: &StepCtx<'_>) -> Result<(), StepError>;
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Stable id of this server (per data dir); leases carry it.
    pub node_id: String,
    pub lease: Duration,
    /// Workflows run at once by this node.
    pub max_parallel: usize,
    /// Attempts per step before a retryable failure counts as permanent.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long `wait_ready` may take.
    pub ready_deadline: Duration,
    /// How long any other step may take before it counts as a (retryable) failure.
    pub step_deadline: Duration,
    /// Concurrency limits per user, provider and host, over every node.
    pub limits: ClaimLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node_id: "local".into(),
            lease: Duration::from_secs(15),
            max_parallel: 16,
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ready_deadline: Duration::from_secs(300),
            step_deadline: Duration::from_secs(600),
            limits: ClaimLimits::default(),
        }
    }
}

impl EngineConfig {
    /// The retry policy steps get unless their definition says otherwise.
    pub fn default_retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            base: self.backoff_base,
            max: self.backoff_max,
            jitter: 0.2,
        }
    }
}

/// Slots of an engine's held for workflows a transaction is about to queue and lease.
pub struct Reservation {
    permits: Vec<OwnedSemaphorePermit>,
    node: String,
    lease_ms: i64,
}

impl Reservation {
    /// The lease the queuing transaction takes: this node's, one workflow per slot.
    pub fn lease(&self) -> LeaseTo {
        LeaseTo {
            node: self.node.clone(),
            lease_ms: self.lease_ms,
            max: self.permits.len(),
        }
    }
}

/// The running engine; clone handles freely.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    cfg: EngineConfig,
    defs: RwLock<HashMap<String, Arc<dyn WorkflowDef>>>,
    wake: Notify,
    events: broadcast::Sender<WorkflowEvent>,
    slots: Arc<Semaphore>,
    /// Whether [`Engine::run`] is running (only then does it take work at admission).
    running: std::sync::atomic::AtomicBool,
    /// Events this node broadcast lately (by seq), so the relay of other replicas' events
    /// (PostgreSQL) passes each event on once.
    emitted: std::sync::Mutex<Recent>,
}

/// A bounded set of recent event sequence numbers.
#[derive(Default)]
struct Recent {
    set: std::collections::HashSet<i64>,
    order: std::collections::VecDeque<i64>,
}

impl Recent {
    const KEEP: usize = 65_536;

    /// Whether `seq` is new (then it is remembered).
    fn insert(&mut self, seq: i64) -> bool {
        if !self.set.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > Self::KEEP
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

impl Engine {
    /// An engine over `store` with no definitions yet ([`Engine::register`] them before `run`).
    pub fn new(store: Store, cfg: EngineConfig) -> Self {
        let (events, _) = broadcast::channel(16384);
        let slots = Arc::new(Semaphore::new(cfg.max_parallel.max(1)));
        Self {
            inner: Arc::new(Inner {
                store,
                cfg,
                defs: RwLock::new(HashMap::new()),
                wake: Notify::new(),
                events,
                slots,
                running: Default::default(),
                emitted: Default::default(),
            }),
        }
    }

    /// Adds (or replaces) the definition called `name` (workflows name it in `definition`),
    /// and gives the store its hooks.
    pub fn register(&self, name: &str, def: Arc<dyn WorkflowDef>) {
        // Present from the start, so a rate over it needs no first takeover.
        metrics::counter!("basphere_lease_takeovers_total", "definition" => name.to_string())
            .increment(0);
        if let Some(h) = def.hooks(name) {
            self.inner.store.set_hooks(name, h);
        }
        self.inner
            .defs
            .write()
            .expect("definitions lock")
            .insert(name.to_string(), def);
    }

    /// The steps `names` of `definition` to queue, each with its deadline from the registered
    /// definition ([`NewStep::DEFAULT_TIMEOUT_MS`] for a definition not registered here).
    pub fn steps(&self, definition: &str, names: &[&str]) -> Vec<NewStep> {
        let def = self.def(definition);
        names
            .iter()
            .map(|n| match &def {
                Some(d) => NewStep::new(*n, d.step(n).deadline),
                None => NewStep::from(*n),
            })
            .collect()
    }

    fn def(&self, definition: &str) -> Option<Arc<dyn WorkflowDef>> {
        self.inner
            .defs
            .read()
            .expect("definitions lock")
            .get(definition)
            .cloned()
    }

    /// Every step transition, as it is committed.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkflowEvent> {
        self.inner.events.subscribe()
    }

    /// Passes on transitions committed outside the engine (cancel and retry requests).
    pub fn publish(&self, evs: impl IntoIterator<Item = WorkflowEvent>) {
        for ev in evs {
            self.emit(ev);
        }
        self.wake();
    }

    /// Tells the engine new work was queued (saves it a poll interval).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Free slots of this engine's (up to `n`) for workflows about to be queued, when it runs
    /// and has no concurrency limits: the transaction that queues them leases them to this
    /// node ([`Reservation::lease`]), and [`Engine::adopt`] runs them, saving each a claim.
    /// Dropped unused, the slots are free again.
    pub fn reserve(&self, n: usize) -> Option<Reservation> {
        let inner = &self.inner;
        if inner.cfg.limits.any() || !inner.running.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut permits = vec![];
        while permits.len() < n {
            match inner.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        (!permits.is_empty()).then(|| Reservation {
            permits,
            node: inner.cfg.node_id.clone(),
            lease_ms: inner.cfg.lease.as_millis() as i64,
        })
    }

    /// Runs the workflows a transaction leased with `slots` (see [`Engine::reserve`]).
    pub fn adopt(&self, mut slots: Reservation, claimed: Vec<Claimed>) {
        for (wf, evs, started) in claimed {
            self.emit_all(evs);
            match slots.permits.pop() {
                Some(p) => self.spawn_drive(p, wf, started),
                // Never more than reserved; were it so, its lease runs out and any node
                // claims it.
                None => warn!(workflow = %wf.id, "leased at admission without a slot"),
            }
        }
    }

    /// Drives a claimed workflow on its own task, holding `permit`, then any batch node it
    /// hands its slot to.
    fn spawn_drive(&self, permit: OwnedSemaphorePermit, wf: Workflow, started: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut cur = Some((wf, started));
            while let Some((wf, started)) = cur.take() {
                if let Some((next, evs, started)) = me.drive(wf, started).await {
                    me.emit_all(evs);
                    cur = Some((next, started));
                }
            }
            drop(permit);
            me.wake();
        });
    }

    /// Runs until `shutdown` turns true. Reclaims this node's stale leases first.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        /// Marks the engine running while alive (also when `run`'s future is dropped).
        struct Running<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let inner = self.inner.clone();
        inner
            .running
            .store(true, std::sync::atomic::Ordering::Release);
        let _running = Running(&inner.running);
        self.run_loop(shutdown).await;
    }

    async fn run_loop(self, mut shutdown: watch::Receiver<bool>) {
        let inner = &self.inner;
        match inner.store.release_leases(&inner.cfg.node_id).await {
            Ok(n) if n > 0 => info!(
                count = n,
                "resuming workflows this node held before a restart"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not release stale leases"),
        }
        // Work another replica queues or releases wakes this one, and its events reach this
        // node's streams (PostgreSQL).
        let mut changes = inner.store.changes();
        tokio::spawn(self.clone().relay(shutdown.clone()));
        loop {
            if *shutdown.borrow() {
                return;
            }
            let permit = tokio::select! {
                p = inner.slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.changed() => return,
            };
            // Claim for every free slot at once (one transaction).
            let mut permits = vec![permit];
            while permits.len() < 32 {
                match inner.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let runs: Vec<String> = inner
                .defs
                .read()
                .expect("definitions lock")
                .keys()
                .cloned()
                .collect();
            match inner
                .store
                .claim_many(
                    &inner.cfg.node_id,
                    inner.cfg.lease.as_millis() as i64,
                    &inner.cfg.limits,
                    permits.len(),
                    &runs,
                )
                .await
            {
                Ok(claimed) if !claimed.is_empty() => {
                    for (wf, evs, started) in claimed {
                        self.emit_all(evs);
                        let permit = permits.pop().expect("a permit per claim");
                        self.spawn_drive(permit, wf, started);
                    }
                }
                Ok(_) => {
                    drop(permits);
                    let idle = match inner.store.next_due_in().await {
                        Ok(Some(ms)) => Duration::from_millis(ms.clamp(5, 1000) as u64),
                        _ => Duration::from_secs(1),
                    };
                    tokio::select! {
                        _ = inner.wake.notified() => {}
                        _ = other_replicas(&mut changes) => {}
                        _ = tokio::time::sleep(idle) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Err(e) => {
                    drop(permits);
                    warn!(error = %e, "claiming a workflow failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn emit(&self, ev: WorkflowEvent) {
        if self
            .inner
            .emitted
            .lock()
            .expect("emitted lock")
            .insert(ev.seq)
        {
            let _ = self.inner.events.send(ev);
        }
    }

    /// Passes on the events other replicas commit (PostgreSQL): each of the store's `changes`
    /// names the events one commit appended, and those are read and broadcast. When a change
    /// cannot say (the listening connection was remade), and every few seconds in case, it
    /// reads the log from a little before the newest event seen (sequence values can commit
    /// out of order) and broadcasts what this node has not. Nothing to do on SQLite (one
    /// process writes).
    async fn relay(self, mut shutdown: watch::Receiver<bool>) {
        let Some(mut changes) = self.inner.store.changes() else {
            return;
        };
        const LOOKBACK: i64 = 1024;
        let store = &self.inner.store;
        let mut newest = store.last_event_seq().await.unwrap_or(0);
        loop {
            let change = tokio::select! {
                r = changes.recv() => match r {
                    Ok(c) => c.events,
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(5)) => None,
                _ = shutdown.changed() => return,
            };
            let read = match change {
                Some((lo, hi)) => store.events_between(lo, hi).await,
                None => store.events_since((newest - LOOKBACK).max(0), 4096).await,
            };
            match read {
                Ok(evs) => {
                    for ev in evs {
                        newest = newest.max(ev.seq);
                        self.emit(ev);
                    }
                }
                Err(e) => warn!(error = %e, "reading other replicas' events failed"),
            }
        }
    }

    fn emit_all(&self, evs: Vec<WorkflowEvent>) {
        for ev in evs {
            self.emit(ev);
        }
    }

    /// Runs one claimed workflow as far as it goes now, renewing its lease meanwhile. Returns
    /// the batch node it handed its slot to, if any (leased to this node, to drive next).
    async fn drive(&self, wf: Workflow, started: bool) -> Option<Claimed> {
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let hb = {
            let store = self.inner.store.clone();
            let node = self.inner.cfg.node_id.clone();
            let lease = self.inner.cfg.lease;
            let id = wf.id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    if let Err(e) = store
                        .renew_lease(&id, &node, lease.as_millis() as i64)
                        .await
                    {
                        if matches!(e, StoreError::LeaseLost(_)) {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        warn!(workflow = %id, error = %e, "lease renewal failed");
                    }
                }
            })
        };
        let id = wf.id.clone();
        let mut handed = None;
        tokio::select! {
            r = self.advance(wf, started) => {
                match r {
                    Ok(h) => handed = h,
                    Err(e) => {
                    if matches!(e, StoreError::LeaseLost(_)) {
                        warn!(workflow = %id, "lost the lease; another node continues");
                    } else {
                        warn!(workflow = %id, error = %e, "workflow stopped on a store error; it resumes when its lease expires");
                    }
                    }
                }
            }
            _ = lost_rx.wait_for(|l| *l) => {
                warn!(workflow = %id, "lease lost mid-step; abandoning it to the new holder");
            }
        }
        hb.abort();
        handed
    }

    async fn advance(
        &self,
        wf: Workflow,
        mut started: bool,
    ) -> Result<Option<Claimed>, StoreError> {
        let store = &self.inner.store;
        let node = &self.inner.cfg.node_id;
        let Some(def) = self.def(&wf.definition) else {
            // Another node (a newer version) may know this definition; look again later.
            warn!(workflow = %wf.id, definition = %wf.definition, "no definition for this workflow here");
            store.release_workflow(&wf.id, node, 5_000).await?;
            return Ok(None);
        };
        let mut step = wf.step;
        let mut undoing = wf.status == WorkflowStatus::Undoing;
        if !undoing && wf.cancel_requested {
            self.emit(
                store
                    .begin_cancel(&wf.id, node, step - 1, "cancelled on request")
                    .await?,
            );
            undoing = true;
        }
        if !undoing {
            let n = wf.steps.len();
            // Whether the loaded step record already counts the current attempt (the claim
            // started it); steps started by a later commit are one attempt behind in `wf`.
            let mut counted = started;
            while (step as usize) < n {
                let rec = &wf.steps[step as usize];
                let idx = rec.idx;
                let spec = def.step(&rec.name);
                // The timeout stored when the workflow was queued, not today's definition.
                let deadline = Duration::from_millis(rec.timeout_ms.max(0) as u64);
                if !started {
                    self.emit(
                        store
                            .step_started(&wf.id, idx, &rec.name, node, rec.timeout_ms)
                            .await?,
                    );
                }
                let attempts = if counted {
                    rec.attempts
                } else {
                    rec.attempts + 1
                };
                counted = false;
                let ctx = StepCtx {
                    engine: self,
                    workflow: &wf,
                    idx,
                    name: &rec.name,
                    idem_key: &rec.idem_key,
                    attempt: attempts,
                    deadline,
                };
                let t0 = std::time::Instant::now();
                let result = match tokio::time::timeout(deadline, def.run(&ctx)).await {
                    Ok(r) => r,
                    Err(_) => Err(StepError::retryable(format!(
                        "{} did not finish within {}s",
                        rec.name,
                        deadline.as_secs_f64()
                    ))),
                };
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) if e.is_retryable() && attempts < spec.retry.max_attempts => "retry",
                    Err(_) => "failed",
                };
                step_metrics(&wf.definition, &rec.name, outcome, t0.elapsed());
                match result {
                    Ok(commit) if !commit.children.is_empty() => {
                        // The parent waits, unleased, for its children; it is claimed again
                        // (by any node) when the last one ends.
                        let (evs, cancel, _) = store
                            .step_done_handoff(
                                &wf.id, idx, &rec.name, node, &commit, None, false, None,
                            )
                            .await?;
                        self.emit_all(evs);
                        self.wake();
                        if !cancel {
                            return Ok(None);
                        }
                        step += 1;
                        self.emit(
                            store
                                .begin_cancel(&wf.id, node, step - 1, "cancelled on request")
                                .await?,
                        );
                        undoing = true;
                        break;
                    }
                    Ok(commit) => {
                        let next = wf.steps.get(step as usize + 1).map(|r| NextStep {
                            idx: r.idx,
                            name: &r.name,
                            deadline_ms: r.timeout_ms,
                        });
                        let last = next.is_none();
                        // Without limits a finishing batch node leases its batch's next one.
                        let unlimited = !self.inner.cfg.limits.any();
                        let handoff =
                            (last && unlimited && wf.batch_id.is_some()).then(|| Handoff {
                                lease_ms: self.inner.cfg.lease.as_millis() as i64,
                            });
                        let (evs, cancel, handed) = store
                            .step_done_handoff(
                                &wf.id, idx, &rec.name, node, &commit, next, true, handoff,
                            )
                            .await?;
                        self.emit_all(evs);
                        step += 1;
                        started = true;
                        if last && !cancel {
                            return Ok(handed);
                        }
                        if cancel {
                            self.emit(
                                store
                                    .begin_cancel(&wf.id, node, step - 1, "cancelled on request")
                                    .await?,
                            );
                            undoing = true;
                            break;
                        }
                    }
                    Err(e) if e.is_retryable() && attempts < spec.retry.max_attempts => {
                        let delay = spec.retry.delay(attempts);
                        self.emit(
                            store
                                .step_retry(
                                    &wf.id,
                                    idx,
                                    &rec.name,
                                    node,
                                    e.message(),
                                    delay.as_millis() as i64,
                                )
                                .await?,
                        );
                        self.wake();
                        return Ok(None);
                    }
                    Err(e) => {
                        let msg = if e.is_retryable() {
                            format!("{} (gave up after {attempts} attempts)", e.message())
                        } else {
                            e.message().to_string()
                        };
                        self.emit(store.begin_undo(&wf.id, idx, &rec.name, node, &msg).await?);
                        undoing = true;
                        break;
                    }
                }
            }
            if !undoing {
                self.emit_all(
                    store
                        .finish_workflow(&wf.id, node, &WorkflowOutcome::Succeeded)
                        .await?,
                );
                return Ok(None);
            }
        }
        self.undo(&*def, &wf.id).await.map(|()| None)
    }

    /// Rolls back workflow `id` — a child its caller spawned — undoing its done steps in
    /// reverse with its own definition, on this node; it ends `cancelled` with `reason` (its
    /// hooks apply that to its resource). Nothing to do if it failed or was cancelled already.
    /// A child still running is asked to cancel and gives a retryable error, as does one that
    /// another node is undoing: the caller's undo tries again.
    pub async fn roll_back(&self, id: &str, reason: &str) -> Result<(), StepError> {
        let node = &self.inner.cfg.node_id;
        let lease = self.inner.cfg.lease.as_millis() as i64;
        let wf = match self
            .inner
            .store
            .reopen_for_undo(id, node, lease, reason)
            .await
        {
            Ok(Some(wf)) => wf,
            Ok(None) => return Ok(()),
            Err(Reopen::Busy(_)) => {
                self.wake();
                return Err(StepError::retryable(format!(
                    "child {id} is still running or being undone elsewhere"
                )));
            }
            Err(Reopen::Store(e)) => {
                return Err(StepError::retryable(format!("rolling back {id}: {e}")));
            }
        };
        let Some(def) = self.def(&wf.definition) else {
            return Err(StepError::permanent(format!(
                "child {id} has definition {} that this node does not know",
                wf.definition
            )));
        };
        self.undo(&*def, id)
            .await
            .map_err(|e| StepError::retryable(format!("rolling back {id}: {e}")))
    }

    /// Undoes the done steps of an undoing workflow in reverse, then ends it.
    async fn undo(&self, def: &dyn WorkflowDef, id: &str) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let node = &self.inner.cfg.node_id;
        let wf = store.workflow(id).await?.ok_or_else(|| {
            StoreError::Corrupt("workflows", "workflow vanished while undoing".into())
        })?;
        let reason = wf.error.clone().unwrap_or_else(|| "failed".into());
        let end = |msg: String| {
            if wf.cancel_requested {
                WorkflowOutcome::Cancelled(msg)
            } else {
                WorkflowOutcome::Failed(msg)
            }
        };
        let mut step = wf.step.min(wf.steps.len() as i64 - 1);
        while step >= 0 {
            let rec = &wf.steps[step as usize];
            if rec.status == StepStatus::Done {
                let spec = def.step(&rec.name);
                let mut attempt = 0;
                loop {
                    let ctx = StepCtx {
                        engine: self,
                        workflow: &wf,
                        idx: rec.idx,
                        name: &rec.name,
                        idem_key: &rec.idem_key,
                        attempt: attempt + 1,
                        deadline: spec.deadline,
                    };
                    let r = match tokio::time::timeout(spec.deadline, def.undo(&ctx)).await {
                        Ok(r) => r,
                        Err(_) => Err(StepError::retryable(format!(
                            "undo of {} timed out",
                            rec.name
                        ))),
                    };
                    match r {
                        Ok(()) => break,
                        Err(e) if attempt + 1 < spec.retry.max_attempts => {
                            attempt += 1;
                            warn!(workflow = %wf.id, step = %rec.name, error = %e, "undo failed; retrying");
                            tokio::time::sleep(spec.retry.delay(attempt)).await;
                        }
                        Err(e) => {
                            let msg = format!(
                                "{reason}; and undoing {} failed too: {e} — what it made is left \
                                 in place",
                                rec.name
                            );
                            self.emit_all(store.finish_workflow(&wf.id, node, &end(msg)).await?);
                            return Ok(());
                        }
                    }
                }
                self.emit(store.step_undone(&wf.id, rec.idx, &rec.name, node).await?);
            }
            step -= 1;
        }
        self.emit_all(store.finish_workflow(&wf.id, node, &end(reason)).await?);
        Ok(())
    }
}

/// A step run's duration by definition, step and outcome (`ok`; `retry`: failed, to be tried
/// again — the retries are this histogram's count with that outcome; `failed`: given up).
fn step_metrics(definition: &str, step: &str, outcome: &'static str, took: Duration) {
    metrics::histogram!("basphere_step_duration_seconds",
        "definition" => definition.to_string(), "step" => step.to_string(), "outcome" => outcome)
    .record(took.as_secs_f64());
}

/// Until another replica commits work (never, without replicas).
async fn other_replicas(changes: &mut Option<broadcast::Receiver<basphere_store::Change>>) {
    match changes {
        Some(rx) => match rx.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A definition whose steps do nothing and never fail (benchmarks, tests of the engine itself).
pub struct NoopWorkflow;

#[async_trait::async_trait]
impl WorkflowDef for NoopWorkflow {
    fn step(&self, _: &str) -> StepSpec {
        StepSpec {
            deadline: Duration::from_secs(10),
            retry: RetryPolicy {
                max_attempts: 1,
                base: Duration::from_millis(1),
                max: Duration::from_millis(1),
                jitter: 0.0,
            },
        }
    }
    async fn run(&self, _: &StepCtx<'_>) -> Result<StepCommit, StepError> {
        Ok(StepCommit::default())
    }
    async fn undo(&self, _: &StepCtx<'_>) -> Result<(), StepError> {
        Ok(())
    }
}
