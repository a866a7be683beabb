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
mod advance;
mod ahead;
mod error;
mod run;

use basphere_store::{ClaimLimits, Hooks, NewStep, StepCommit, Store, Workflow, WorkflowEvent};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, broadcast};

pub use ahead::IN_FLIGHT;
pub use error::{StepError, StepErrorKind};
pub use run::{Adopt, Reservation};

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
    /// Steps of one workflow that finish within this long of the first of them are recorded
    /// in one commit (zero: each step in its own). A slower step's predecessors are recorded
    /// when the window closes, while it runs.
    pub fuse_window: Duration,
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
            fuse_window: Duration::from_millis(20),
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
    /// The event numbers below the newest this node has not seen (PostgreSQL; `None` until
    /// the relay starts): what the relay looks for when a commit was not heard of.
    seen: std::sync::Mutex<Option<run::Gaps>>,
    /// The store's changes, listened to from the engine's creation on: the relay takes them
    /// when it starts, so that no other replica's commit made in between goes unrelayed.
    changes: std::sync::Mutex<Option<broadcast::Receiver<basphere_store::Change>>>,
    /// Batch nodes leased ahead of their slots, per batch (see `ahead`).
    pools: ahead::Pools,
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
        let changes = std::sync::Mutex::new(store.changes());
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
                seen: Default::default(),
                pools: Default::default(),
                changes,
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

    fn emit(&self, ev: WorkflowEvent) {
        let new = self
            .inner
            .emitted
            .lock()
            .expect("emitted lock")
            .insert(ev.seq);
        if let Some(g) = self.inner.seen.lock().expect("seen lock").as_mut() {
            g.saw(ev.seq, std::time::Instant::now());
        }
        if new {
            let _ = self.inner.events.send(ev);
        }
    }

    fn emit_all(&self, evs: Vec<WorkflowEvent>) {
        for ev in evs {
            self.emit(ev);
        }
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
