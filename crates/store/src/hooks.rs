//! What happens to a workflow's resource when the workflow ends or is retried.
//!
//! The ledger (`workflows`, `commit`) knows no resource kind: it ends a workflow and runs the
//! hooks its definition registered, inside the same transaction. Each resource kind's hooks
//! live beside its records (the VM's in `vms`). A definition without hooks changes nothing
//! outside the ledger.

use crate::db::{Dialect, Row, Stmt, Tx, stmt};
use crate::workflows::sets::Write;
use crate::workflows::{Ending, OpError, Workflow, WorkflowOutcome};
use basphere_core::NetworkPool;
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What hooks read inside a transaction for the engine's next step to take instead of reading
/// it again, by key (each entry taken once, and only while fresh).
#[derive(Default)]
pub(crate) struct Prefetch(Mutex<HashMap<String, Fetched>>);

/// When an entry was read, and the entry.
type Fetched = (Instant, Box<dyn Any + Send>);

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prefetch")
    }
}

impl Prefetch {
    const FRESH: Duration = Duration::from_secs(2);

    pub(crate) fn put<T: Any + Send>(&self, key: String, value: T) {
        let mut m = self.0.lock().expect("prefetch lock");
        if m.len() >= 4096 {
            m.retain(|_, (at, _)| at.elapsed() < Self::FRESH);
        }
        m.insert(key, (Instant::now(), Box::new(value)));
    }

    pub(crate) fn take<T: Any>(&self, key: &str) -> Option<T> {
        let (at, hit) = self.0.lock().expect("prefetch lock").remove(key)?;
        if at.elapsed() >= Self::FRESH {
            return None;
        }
        hit.downcast::<T>().ok().map(|b| *b)
    }
}

/// What a retry's hooks may need from the caller's configuration.
pub struct RetryCtx<'a> {
    /// The network pool a resource gets its address from again.
    pub pool: &'a NetworkPool,
}

/// One definition's hooks on its resource.
#[async_trait::async_trait]
pub(crate) trait ResourceHooks: Send + Sync {
    /// Statements that apply `outcome` to the resource; they run in the ending transaction.
    fn ended(&self, w: &Ending, outcome: &WorkflowOutcome, now: i64) -> Vec<Stmt>;

    /// Statements that apply success to the resources of `ws` (this definition's workflows
    /// ending together), as few as can, as parts of the group's writes where they read
    /// nothing those change ([`Write::Part`]): by default [`ResourceHooks::ended`] for each.
    fn succeeded_many(&self, _d: Dialect, ws: &[&Ending], now: i64) -> Vec<Write> {
        each_succeeded(self, ws, now)
    }

    /// Refuses a cancel (with what to do instead) when the definition's steps cannot be undone.
    fn cancellable(&self, _w: &Workflow) -> Result<(), String> {
        Ok(())
    }

    /// A hand-off leased workflows inside this transaction and their steps start at once:
    /// a read of what those steps need, for all of them, in the same round trip. `leased`
    /// selects their `resource_kind` and `resource_id` (its parameters first: the read's own
    /// follow them), and may run before the lease is answered; the rows go to
    /// [`ResourceHooks::handed_off_rows`].
    fn handed_off_read(&self, _leased: &Stmt) -> Option<Stmt> {
        None
    }

    /// Keeps what [`ResourceHooks::handed_off_read`] read in `cache`, for the steps to take.
    fn handed_off_rows(&self, _rows: &[Row], _cache: &Prefetch) -> crate::Result<()> {
        Ok(())
    }

    /// Makes the resource ready for a retry of `w`, inside the retry's transaction; an error
    /// refuses the retry and changes nothing.
    async fn retrying(
        &self,
        _tx: &mut dyn Tx,
        _w: &Workflow,
        _ctx: &RetryCtx<'_>,
    ) -> Result<(), OpError> {
        Ok(())
    }
}

/// A set of resource hooks a workflow definition registers (`Engine::register`).
#[derive(Clone)]
pub struct Hooks(pub(crate) Arc<dyn ResourceHooks>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

/// Definition name → its hooks; shared by the async side and the write thread.
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<RwLock<HashMap<String, Hooks>>>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    pub fn set(&self, definition: &str, hooks: Hooks) {
        self.0
            .write()
            .expect("hooks lock")
            .insert(definition.to_string(), hooks);
    }

    pub fn get(&self, definition: &str) -> Option<Hooks> {
        self.0.read().expect("hooks lock").get(definition).cloned()
    }

    /// Everything ending `w` writes besides its own row, event and batch edges: the
    /// resource's hooks, then the parent's wait for its children.
    pub fn ending(&self, w: &Ending, outcome: &WorkflowOutcome, now: i64) -> Vec<Stmt> {
        let mut out = self
            .get(&w.definition)
            .map(|h| h.0.ended(w, outcome, now))
            .unwrap_or_default();
        out.extend(parent_wait(w, now));
        out
    }

    /// [`Registry::ending`] of several workflows that succeeded together: each definition's
    /// hooks once for all of its own ([`ResourceHooks::succeeded_many`]), then the parents'.
    pub fn succeeded(&self, d: Dialect, ws: &[&Ending], now: i64) -> Vec<Write> {
        let mut by_def: BTreeMap<&str, Vec<&Ending>> = BTreeMap::new();
        for w in ws {
            by_def.entry(w.definition.as_str()).or_default().push(w);
        }
        let mut out = vec![];
        for (def, group) in by_def {
            if let Some(h) = self.get(def) {
                out.extend(h.0.succeeded_many(d, &group, now));
            }
        }
        out.extend(
            ws.iter()
                .filter_map(|w| parent_wait(w, now))
                .map(Write::Own),
        );
        out
    }
}

/// [`ResourceHooks::ended`] with success, for each of `ws` in turn.
pub(crate) fn each_succeeded<H: ResourceHooks + ?Sized>(
    h: &H,
    ws: &[&Ending],
    now: i64,
) -> Vec<Write> {
    ws.iter()
        .flat_map(|w| h.ended(w, &WorkflowOutcome::Succeeded, now))
        .map(Write::Own)
        .collect()
}

/// A child's ending counts down its parent's wait.
fn parent_wait(w: &Ending, now: i64) -> Option<Stmt> {
    w.has_parent.then(|| {
        stmt!(
            "UPDATE workflows SET waiting_on = waiting_on - 1, updated_at = $2
             WHERE id = (SELECT parent_id FROM workflows WHERE id = $1) AND waiting_on > 0",
            w.id.as_str(),
            now,
        )
    })
}
