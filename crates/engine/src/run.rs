//! Running: claiming work, slots reserved at admission, the relay of other replicas' events.

use crate::Engine;
use crate::ahead::{Pending, Then};
use basphere_store::{Claimed, LeaseTo, Workflow};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};
use tracing::{info, warn};

/// What a transaction leased to this node for [`Engine::adopt`]: workflows to run in the
/// slots reserved, and batch nodes held ahead of their slots (`BatchAdmitted::held`).
#[derive(Debug, Default)]
pub struct Adopt {
    pub claimed: Vec<Claimed>,
    pub ahead: Vec<Workflow>,
}

impl From<Vec<Claimed>> for Adopt {
    fn from(claimed: Vec<Claimed>) -> Self {
        Adopt {
            claimed,
            ahead: vec![],
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

    /// Runs the workflows a transaction leased with `slots` (see [`Engine::reserve`]), and
    /// keeps the batch nodes it held ahead of their slots for them to pass their slots to.
    pub fn adopt(&self, mut slots: Reservation, work: impl Into<Adopt>) {
        let Adopt { claimed, ahead } = work.into();
        if let Some(b) = ahead.first().and_then(|w| w.batch_id.clone()) {
            match claimed.is_empty() {
                true => self.release_ahead(&b, ahead.into_iter().map(|w| w.id).collect()),
                false => self.inner.pools.hold(&b, ahead),
            }
        }
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
    /// hands its slot to (a chain, see `ahead`): one handed off with a slot, or one held
    /// ahead that it runs while the completion that passed it the slot commits. Those
    /// completions are seen to between nodes (a cancel one finds is undone there, in this
    /// slot) and all before the chain ends.
    fn spawn_drive(&self, permit: OwnedSemaphorePermit, wf: Workflow, started: bool) {
        let me = self.clone();
        let batch = wf.batch_id.clone();
        if let Some(b) = &batch {
            me.inner.pools.join(b);
        }
        tokio::spawn(async move {
            let mut cur = Some((wf, started, None));
            let mut pending: VecDeque<Pending> = VecDeque::new();
            let mut handed: VecDeque<Claimed> = VecDeque::new();
            loop {
                if cur.is_none()
                    && let Some((next, evs, started)) = handed.pop_front()
                {
                    me.emit_all(evs);
                    cur = Some((next, started, None));
                }
                if let Some((wf, started, from)) = cur.take() {
                    match me.drive(wf, started, from).await {
                        Then::Stop => {}
                        Then::Handed(c) => handed.push_back(c),
                        Then::Pass { next, pending: p } => {
                            cur = Some((next, false, Some(p.wf.clone())));
                            pending.push_back(p);
                        }
                    }
                    while pending.front().is_some_and(|p| {
                        p.done.is_finished() || pending.len() > crate::ahead::IN_FLIGHT
                    }) {
                        let p = pending.pop_front().expect("a pending completion");
                        handed.extend(me.settle(p).await);
                    }
                    continue;
                }
                // Nothing to run: the oldest completion may yet hand this slot a node.
                let Some(p) = pending.pop_front() else {
                    break;
                };
                handed.extend(me.settle(p).await);
            }
            if let Some(b) = &batch {
                let left = me.inner.pools.leave(b);
                me.release_ahead(b, left);
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
        // The leases this node held before a restart are released before it takes work at
        // admission: released after, the fresh leases of an admission would go too, and
        // their workflows would run twice (adopted, and claimed again).
        match inner.store.release_leases(&inner.cfg.node_id).await {
            Ok(n) if n > 0 => info!(
                count = n,
                "resuming workflows this node held before a restart"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not release stale leases"),
        }
        inner
            .running
            .store(true, std::sync::atomic::Ordering::Release);
        let _running = Running(&inner.running);
        self.run_loop(shutdown).await;
    }

    async fn run_loop(self, mut shutdown: watch::Receiver<bool>) {
        let inner = &self.inner;
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
    /// cannot say (the listening connection was remade, the receiver lagged), and every few
    /// seconds in case, it reads the numbers it has not seen below the newest it has (an
    /// append takes its number before it commits: a late commit fills a gap, see [`Gaps`]),
    /// then the log past the newest to its end, page by page. At its start it reads a little
    /// of the log before the newest event. Nothing to do on SQLite (one process writes).
    async fn relay(self, mut shutdown: watch::Receiver<bool>) {
        let held = self.inner.changes.lock().expect("changes lock").take();
        let Some(mut changes) = held.or_else(|| self.inner.store.changes()) else {
            return;
        };
        const LOOKBACK: i64 = 1024;
        const PAGE: i64 = 4096;
        let store = &self.inner.store;
        let newest = store.last_event_seq().await.unwrap_or(0);
        // Until the first read, the numbers just before the newest count as seen: that read
        // starts from them. Every event broadcast from then on is noted (`Engine::emit`).
        *self.inner.seen.lock().expect("seen lock") = Some(Gaps::new((newest - LOOKBACK).max(0)));
        let mut change = None;
        loop {
            let read = match change {
                Some((lo, hi)) => store
                    .events_between(lo, hi)
                    .await
                    .map(|evs| self.emit_all(evs)),
                None => self.relay_unheard(PAGE).await,
            };
            if let Err(e) = read {
                warn!(error = %e, "reading other replicas' events failed");
            }
            change = tokio::select! {
                r = changes.recv() => match r {
                    Ok(c) => c.events,
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(Duration::from_secs(5)) => None,
                _ = shutdown.changed() => return,
            };
        }
    }

    /// Broadcasts what was committed unheard of: the numbers not seen below the newest seen,
    /// then the log past it to its end, `page` events at a time.
    async fn relay_unheard(&self, page: i64) -> basphere_store::Result<()> {
        let (open, mut from) = {
            let mut seen = self.inner.seen.lock().expect("seen lock");
            // `relay` notes what is seen before it first calls this.
            let Some(g) = seen.as_mut() else {
                return Ok(());
            };
            g.expire(std::time::Instant::now());
            (g.open(), g.newest())
        };
        if !open.is_empty() {
            self.emit_all(self.inner.store.events_numbered(&open).await?);
        }
        loop {
            let evs = self.inner.store.events_since(from, page).await?;
            let more = evs.len() as i64 == page;
            if let Some(last) = evs.last() {
                from = last.seq;
            }
            self.emit_all(evs);
            if !more {
                return Ok(());
            }
        }
    }
}

/// The event numbers the relay has not seen below the newest it has. A number is taken when
/// an append runs and becomes visible when its transaction commits, so numbers commit out of
/// order: a gap is a transaction still open (its commit fills it) or one rolled back (it
/// never fills). A gap is looked for until [`Gaps::TTL`] after it was noticed, and at most
/// [`Gaps::MAX`] are kept (the oldest go first).
#[derive(Debug)]
pub(crate) struct Gaps {
    newest: i64,
    open: std::collections::BTreeMap<i64, std::time::Instant>,
}

impl Gaps {
    /// Longer than any transaction of the store's holds an appended event uncommitted.
    const TTL: Duration = Duration::from_secs(600);
    const MAX: usize = 16_384;

    /// Every number up to `newest` seen.
    pub(crate) fn new(newest: i64) -> Self {
        Self {
            newest,
            open: Default::default(),
        }
    }

    fn newest(&self) -> i64 {
        self.newest
    }

    /// `seq` was read (at `now`): a gap filled, or the newest, past any numbers skipped.
    pub(crate) fn saw(&mut self, seq: i64, now: std::time::Instant) {
        if seq <= self.newest {
            self.open.remove(&seq);
            return;
        }
        // More skipped than can be kept: only the newest of them.
        let from = (self.newest + 1).max(seq - Self::MAX as i64);
        for s in from..seq {
            self.open.insert(s, now);
        }
        self.newest = seq;
        while self.open.len() > Self::MAX {
            self.open.pop_first();
        }
    }

    /// Forgets the gaps noticed more than [`Gaps::TTL`] before `now`.
    fn expire(&mut self, now: std::time::Instant) {
        self.open
            .retain(|_, at| now.saturating_duration_since(*at) < Self::TTL);
    }

    /// The numbers not seen yet, lowest first.
    fn open(&self) -> Vec<i64> {
        self.open.keys().copied().collect()
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

#[cfg(test)]
mod tests {
    use super::Gaps;
    use std::time::{Duration, Instant};

    #[test]
    fn skipped_numbers_stay_open_until_read_or_expired() {
        let t0 = Instant::now();
        let mut g = Gaps::new(10);
        g.saw(11, t0);
        g.saw(14, t0);
        assert_eq!(g.open(), vec![12, 13]);
        assert_eq!(g.newest(), 14);
        // A late commit fills its gap; one already seen changes nothing.
        g.saw(13, t0);
        g.saw(11, t0);
        assert_eq!(g.open(), vec![12]);
        g.saw(20, t0 + Duration::from_secs(1));
        assert_eq!(g.open(), vec![12, 15, 16, 17, 18, 19]);
        g.expire(t0 + Gaps::TTL);
        assert_eq!(g.open(), vec![15, 16, 17, 18, 19]);
        g.expire(t0 + Gaps::TTL + Duration::from_secs(1));
        assert!(g.open().is_empty());
    }

    #[test]
    fn at_most_max_gaps_are_kept_the_newest() {
        let t0 = Instant::now();
        let mut g = Gaps::new(0);
        let far = 3 * Gaps::MAX as i64;
        g.saw(far, t0);
        let open = g.open();
        assert_eq!(open.len(), Gaps::MAX);
        assert_eq!(open.first(), Some(&(far - Gaps::MAX as i64)));
        assert_eq!(open.last(), Some(&(far - 1)));
        g.saw(far + 2, t0);
        assert_eq!(g.open().len(), Gaps::MAX);
        assert_eq!(g.open().last(), Some(&(far + 1)));
    }
}
