//! Running: claiming work, slots reserved at admission, the relay of other replicas' events.

use crate::Engine;
use basphere_store::{Claimed, LeaseTo, Workflow};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};
use tracing::{info, warn};

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

impl Engine {
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

    /// Passes on the events other replicas commit (PostgreSQL): each of the store's `changes`
    /// names the events one commit appended, and those are read and broadcast. When a change
    /// cannot say (the listening connection was remade), and every few seconds in case, it
    /// reads the log from a little before the newest event seen (sequence values can commit
    /// out of order) to its end, page by page, and broadcasts what this node has not. Nothing
    /// to do on SQLite (one process writes).
    async fn relay(self, mut shutdown: watch::Receiver<bool>) {
        let held = self.inner.changes.lock().expect("changes lock").take();
        let Some(mut changes) = held.or_else(|| self.inner.store.changes()) else {
            return;
        };
        const LOOKBACK: i64 = 1024;
        const PAGE: i64 = 4096;
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
            // What the commit appended; else the log from a little before the newest event
            // seen to its end, page by page (however much was committed unheard).
            let mut from = (newest - LOOKBACK).max(0);
            loop {
                let read = match change {
                    Some((lo, hi)) => store.events_between(lo, hi).await,
                    None => store.events_since(from, PAGE).await,
                };
                let evs = match read {
                    Ok(evs) => evs,
                    Err(e) => {
                        warn!(error = %e, "reading other replicas' events failed");
                        break;
                    }
                };
                let more = change.is_none() && evs.len() as i64 == PAGE;
                for ev in evs {
                    from = ev.seq;
                    newest = newest.max(ev.seq);
                    self.emit(ev);
                }
                if !more {
                    break;
                }
            }
        }
    }
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
