//! Advancing one workflow: its steps in order under a lease, and undoing them in reverse.

use crate::ahead::{Pending, Then};
use crate::{Engine, StepCtx, StepError, WorkflowDef};
use basphere_store::{
    Completed, Completion, Handoff, NextStep, Reopen, StepCommit, StepStatus, StoreError, Workflow,
    WorkflowOutcome, WorkflowStatus,
};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::warn;

impl Engine {
    /// Runs one claimed workflow as far as it goes now, renewing its lease meanwhile (`from`:
    /// it was leased ahead and runs on the slot of that node). Says where its chain goes next.
    pub(crate) async fn drive(&self, wf: Workflow, started: bool, from: Option<String>) -> Then {
        let id = wf.id.clone();
        self.leased(&id, self.advance(wf, started, from))
            .await
            .unwrap_or(Then::Stop)
    }

    /// Runs `work` on workflow `id` while renewing its lease; `None` where the lease was lost
    /// or the store failed (logged: the workflow resumes when its lease expires).
    pub(crate) async fn leased<T>(
        &self,
        id: &str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let hb = {
            let store = self.inner.store.clone();
            let node = self.inner.cfg.node_id.clone();
            let lease = self.inner.cfg.lease;
            let id = id.to_string();
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
        let mut out = None;
        tokio::select! {
            r = work => {
                match r {
                    Ok(t) => out = Some(t),
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
        out
    }

    async fn advance(
        &self,
        wf: Workflow,
        mut started: bool,
        from: Option<String>,
    ) -> Result<Then, StoreError> {
        let store = &self.inner.store;
        let node = &self.inner.cfg.node_id;
        let Some(def) = self.def(&wf.definition) else {
            // Another node (a newer version) may know this definition; look again later.
            warn!(workflow = %wf.id, definition = %wf.definition, "no definition for this workflow here");
            store.release_workflow(&wf.id, node, 5_000).await?;
            return Ok(Then::Stop);
        };
        let mut step = wf.step;
        let mut undoing = wf.status == WorkflowStatus::Undoing;
        if !undoing && wf.cancel_requested {
            self.cancel_from(&wf.id, step - 1).await?;
            undoing = true;
        }
        if !undoing {
            let n = wf.steps.len();
            let window = self.inner.cfg.fuse_window;
            // Whether the loaded step record already counts the current attempt (the claim
            // started it); steps started by a later commit are one attempt behind in `wf`.
            let mut counted = started;
            // Steps done but not recorded yet (the first is the one recorded running), and
            // when the first began: the steps that finish within `window` of it, committing
            // nothing of their own, are recorded in one commit. A crash re-runs them.
            let mut ran: Vec<(u32, String)> = vec![];
            let mut since = Instant::now();
            let began = since;
            // Leased ahead: none of its steps is recorded running until its first completion.
            let mut held = Held {
                from: from.as_deref(),
                unstarted: from.is_some(),
            };
            while (step as usize) < n {
                let rec = &wf.steps[step as usize];
                let idx = rec.idx;
                let spec = def.step(&rec.name);
                // The timeout stored when the workflow was queued, not today's definition.
                let deadline = Duration::from_millis(rec.timeout_ms.max(0) as u64);
                if !started && !held.unstarted {
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
                if ran.is_empty() {
                    since = Instant::now();
                }
                let ctx = StepCtx {
                    engine: self,
                    workflow: &wf,
                    idx,
                    name: &rec.name,
                    idem_key: &rec.idem_key,
                    attempt: attempts,
                    deadline,
                };
                let t0 = Instant::now();
                let run = async {
                    match tokio::time::timeout(deadline, def.run(&ctx)).await {
                        Ok(r) => r,
                        Err(_) => Err(StepError::retryable(format!(
                            "{} did not finish within {}s",
                            rec.name,
                            deadline.as_secs_f64()
                        ))),
                    }
                };
                let this = NextStep {
                    idx,
                    name: &rec.name,
                    deadline_ms: rec.timeout_ms,
                };
                let result = if ran.is_empty() && !held.unstarted {
                    run.await
                } else {
                    tokio::pin!(run);
                    tokio::select! {
                        biased;
                        r = &mut run => r,
                        _ = tokio::time::sleep(window.saturating_sub(since.elapsed())), if ran.is_empty() => {
                            // The first step of a node leased ahead, slower than the window:
                            // its start is recorded while it runs.
                            let (ev, r) = tokio::join!(
                                store.step_started(&wf.id, idx, &rec.name, node, rec.timeout_ms),
                                &mut run
                            );
                            self.emit(ev?);
                            held.unstarted = false;
                            r
                        }
                        _ = tokio::time::sleep(window.saturating_sub(since.elapsed())), if !ran.is_empty() => {
                            // A slower step: the ones before it, and its start, are recorded
                            // while it runs.
                            let (cancel, r) = tokio::join!(self.record_ran(&wf.id, &mut ran, this, &mut held), &mut run);
                            if cancel? {
                                // It ran unrecorded: recorded done now, it is undone too.
                                let last_done = match &r {
                                    Ok(c) => {
                                        let (evs, _, _) = store
                                            .complete(Completion::of(&wf.id, node, idx, &rec.name, c))
                                            .await?;
                                        self.emit_all(evs);
                                        step
                                    }
                                    Err(_) => step - 1,
                                };
                                self.cancel_from(&wf.id, last_done).await?;
                                undoing = true;
                                break;
                            }
                            r
                        }
                    }
                };
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) if e.is_retryable() && attempts < spec.retry.max_attempts => "retry",
                    Err(_) => "failed",
                };
                step_metrics(&wf.definition, &rec.name, outcome, t0.elapsed());
                if result.is_err()
                    && !ran.is_empty()
                    && self.record_ran(&wf.id, &mut ran, this, &mut held).await?
                {
                    // Cancelled meanwhile; this step failed, so undo from the one before.
                    self.cancel_from(&wf.id, step - 1).await?;
                    undoing = true;
                    break;
                }
                let before = refs(&ran);
                match result {
                    Ok(commit) if !commit.children.is_empty() => {
                        // The parent waits, unleased, for its children; it is claimed again
                        // (by any node) when the last one ends.
                        let (evs, cancel, _) = store
                            .complete(Completion {
                                ran: &before,
                                took_slot_of: held.from,
                                unstarted: held.unstarted,
                                ..Completion::of(&wf.id, node, idx, &rec.name, &commit)
                            })
                            .await?;
                        self.emit_all(evs);
                        self.wake();
                        if !cancel {
                            return Ok(Then::Stop);
                        }
                        step += 1;
                        self.cancel_from(&wf.id, step - 1).await?;
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
                        if !last && commit.is_empty() && since.elapsed() < window {
                            drop(before);
                            ran.push((idx, rec.name.clone()));
                            step += 1;
                            started = true;
                            continue;
                        }
                        // Without limits a finishing batch node leases its batch's next one; one
                        // that finished quickly passes its slot to the next this engine holds
                        // ahead, if any, and asks for more (see `ahead`).
                        let unlimited = !self.inner.cfg.limits.any();
                        let batch = wf.batch_id.as_deref().filter(|_| last && unlimited);
                        let (pass, ask) = match batch {
                            Some(b) if began.elapsed() < window => self.take_ahead(b),
                            Some(b) => {
                                self.give_back_ahead(b).await;
                                (None, 0)
                            }
                            None => (None, 0),
                        };
                        let pass_id = pass.as_ref().map(|w| w.id.clone());
                        let c = Completion {
                            ran: &before,
                            next,
                            finish: true,
                            handoff: batch.map(|_| Handoff {
                                lease_ms: self.inner.cfg.lease.as_millis() as i64,
                                ahead: ask,
                            }),
                            pass_to: pass_id.as_deref(),
                            took_slot_of: held.from,
                            unstarted: held.unstarted,
                            claimed: Some(&wf),
                            ..Completion::of(&wf.id, node, idx, &rec.name, &commit)
                        };
                        if let (Some(next), Some(b)) = (pass, batch) {
                            let done = match store.send_completion(c) {
                                Ok(f) => tokio::spawn(f),
                                Err(e) => {
                                    self.got_ahead(b, ask, vec![next]);
                                    return Err(e);
                                }
                            };
                            return Ok(Then::Pass {
                                next,
                                pending: Pending {
                                    wf: wf.id.clone(),
                                    last: step,
                                    definition: wf.definition.clone(),
                                    batch: b.to_string(),
                                    asked: ask,
                                    done,
                                },
                            });
                        }
                        let mut done = store.complete_with(c).await;
                        if let Some(b) = batch {
                            let got = done.as_mut().map(|d| std::mem::take(&mut d.ahead));
                            self.got_ahead(b, ask, got.unwrap_or_default());
                        }
                        let Completed {
                            events: evs,
                            cancel,
                            handed,
                            ..
                        } = done?;
                        drop(before);
                        ran.clear();
                        held.unstarted = false;
                        self.emit_all(evs);
                        step += 1;
                        started = true;
                        if last && !cancel {
                            return Ok(handed.map_or(Then::Stop, Then::Handed));
                        }
                        if cancel {
                            self.cancel_from(&wf.id, step - 1).await?;
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
                        return Ok(Then::Stop);
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
                return Ok(Then::Stop);
            }
        }
        self.undo(&*def, &wf.id).await.map(|()| Then::Stop)
    }

    /// Records the steps that `ran` unrecorded done (see [`basphere_store::Store::complete`])
    /// and starts `next`; whether a cancel was asked for meanwhile (then `next` did not start).
    async fn record_ran(
        &self,
        wf: &str,
        ran: &mut Vec<(u32, String)>,
        next: NextStep<'_>,
        held: &mut Held<'_>,
    ) -> Result<bool, StoreError> {
        let (idx, name) = ran.pop().expect("a step ran");
        let before = refs(ran);
        let (evs, cancel, _) = self
            .inner
            .store
            .complete(Completion {
                ran: &before,
                next: Some(next),
                took_slot_of: held.from,
                unstarted: held.unstarted,
                ..Completion::of(
                    wf,
                    &self.inner.cfg.node_id,
                    idx,
                    &name,
                    &StepCommit::default(),
                )
            })
            .await?;
        drop(before);
        ran.clear();
        held.unstarted = false;
        self.emit_all(evs);
        Ok(cancel)
    }

    /// Starts undoing workflow `id`, whose cancel was asked for, from step `last_done` down.
    pub(crate) async fn cancel_from(&self, id: &str, last_done: i64) -> Result<(), StoreError> {
        let node = &self.inner.cfg.node_id;
        let ev = self
            .inner
            .store
            .begin_cancel(id, node, last_done, "cancelled on request")
            .await?;
        self.emit(ev);
        Ok(())
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
    pub(crate) async fn undo(&self, def: &dyn WorkflowDef, id: &str) -> Result<(), StoreError> {
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

/// Steps that ran unrecorded, as [`basphere_store::Store::complete`] takes them.
fn refs(ran: &[(u32, String)]) -> Vec<(u32, &str)> {
    ran.iter().map(|(i, n)| (*i, n.as_str())).collect()
}

/// A node leased ahead, as its completions say so: the node whose slot it took, and whether
/// none of its steps is recorded running yet.
struct Held<'a> {
    from: Option<&'a str>,
    unstarted: bool,
}
