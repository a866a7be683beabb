//! Step completions on PostgreSQL: a task groups them and commits up to [`PG_IN_FLIGHT`]
//! groups at once on pooled connections, each gathered over [`PG_GATHER_YIELDS`] yields.

use super::{
    Done, DoneJob, DoneReq, GroupError, Guards, MAX_GROUP, PG_GATHER_YIELDS, PG_IN_FLIGHT, Passes,
    commit_group, observe_group,
};
use crate::Result;
use crate::db::{Db, Durability};
use crate::hooks::{Prefetch, Registry};
use std::sync::Arc;

/// Starts the PostgreSQL grouping task over `db`.
pub(crate) fn spawn_pg(
    db: Db,
    prefetched: Arc<Prefetch>,
    hooks: Registry,
) -> tokio::sync::mpsc::UnboundedSender<DoneJob> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DoneJob>();
    let slots = Arc::new(tokio::sync::Semaphore::new(PG_IN_FLIGHT));
    let passes = Arc::new(Passes::default());
    tokio::spawn(async move {
        // A group forms while the groups in flight commit: a slot first, then everything
        // queued meanwhile, and what the tasks ready to run send while this one yields.
        while let Ok(permit) = slots.clone().acquire_owned().await {
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut group = vec![first];
            take_queued(&mut rx, &mut group);
            for _ in 0..PG_GATHER_YIELDS {
                if group.len() == MAX_GROUP {
                    break;
                }
                tokio::task::yield_now().await;
                take_queued(&mut rx, &mut group);
            }
            let (db, prefetched, hooks, passes) = (
                db.clone(),
                prefetched.clone(),
                hooks.clone(),
                passes.clone(),
            );
            tokio::spawn(async move {
                let (reqs, replies): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|j| (j.req, j.reply)).unzip();
                let reqs = Arc::new(reqs);
                let t0 = std::time::Instant::now();
                let first = pg_group(&db, reqs.clone(), &prefetched, &hooks, &passes).await;
                observe_group("postgres", reqs.len(), t0.elapsed());
                let results = match first {
                    Ok(v) => {
                        passes.committed(&reqs, &v);
                        v
                    }
                    Err(e) if reqs.len() > 1 => {
                        tracing::debug!(error = %e, "group commit failed; committing one by one");
                        let mut out = Vec::with_capacity(reqs.len());
                        for r in reqs.iter() {
                            let one = Arc::new(vec![r.clone()]);
                            let res = pg_group(&db, one, &prefetched, &hooks, &passes)
                                .await
                                .and_then(|mut v| v.pop().expect("one result"));
                            passes.committed(std::slice::from_ref(r), std::slice::from_ref(&res));
                            out.push(res);
                        }
                        out
                    }
                    Err(e) => vec![Err(e)],
                };
                drop(permit);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            });
        }
    });
    tx
}

/// Moves the completions queued in `rx` into `group`, up to [`MAX_GROUP`].
fn take_queued(rx: &mut tokio::sync::mpsc::UnboundedReceiver<DoneJob>, group: &mut Vec<DoneJob>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(j) => group.push(j),
            Err(_) => break,
        }
    }
}

async fn pg_group(
    db: &Db,
    reqs: Arc<Vec<DoneReq>>,
    prefetched: &Arc<Prefetch>,
    hooks: &Registry,
    passes: &Arc<Passes>,
) -> Result<Vec<Result<Done>>> {
    // First with the writes sent beside the lease guards; the careful way if that guessed
    // wrong (a lease lost, a cancel pending, the clock moved: rolled back, nothing written).
    let run = |guards: Guards| {
        let (prefetched, hooks, reqs, passes) = (
            prefetched.clone(),
            hooks.clone(),
            reqs.clone(),
            passes.clone(),
        );
        db.write_with(Durability::Replayable, move |tx| {
            Box::pin(
                async move { commit_group(tx, &reqs, &prefetched, &hooks, &passes, guards).await },
            )
        })
    };
    match run(Guards::Guess).await {
        Err(GroupError::Guessed) => run(Guards::Read).await,
        out => out,
    }
    .map_err(GroupError::into_store)
}
