//! Step completions on SQLite: the write thread that groups them between the store's other
//! write transactions, and the thread that checkpoints the WAL.

use super::{
    Done, DoneReq, GroupError, Guards, Job, MAX_GROUP, Passes, commit_group, observe_group,
};
use crate::db::sqlite::{SqliteTx, run_ready};
use crate::hooks::{Prefetch, Registry};
use crate::{Result, StoreError};
use rusqlite::Connection;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Starts the SQLite write thread and the checkpoint thread for the database at `path`.
pub(crate) fn spawn(
    path: &Path,
    prefetched: Arc<Prefetch>,
    hooks: Registry,
) -> Result<(mpsc::Sender<Job>, Arc<AtomicU64>)> {
    let mut conn = crate::db::sqlite::open_writer(path)?;
    if let Err(e) = crate::db::sqlite::reserve_wal(&conn, path, crate::db::sqlite::WAL_RESERVE) {
        tracing::warn!(error = %e, "cannot write the WAL file ahead; commits grow it instead");
    }
    let ckpt = crate::db::sqlite::open(path)?;
    // A checkpoint copies frames through its own buffer; this connection needs no page cache.
    ckpt.pragma_update(None, "cache_size", -64)?;
    let wrote = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Job>();
    let stop = Arc::new(AtomicBool::new(false));
    let w = wrote.clone();
    let commits = wrote.clone();
    let s = stop.clone();
    std::thread::Builder::new()
        .name("basphere-writer".into())
        .spawn(move || {
            let mut next = None;
            let passes = Passes::default();
            while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
                let first = match first {
                    Job::Tx(f) => {
                        f(&mut conn);
                        w.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Job::Stop => break,
                    Job::Done(j) => *j,
                };
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Job::Done(j)) => group.push(*j),
                        Ok(tx_job) => {
                            next = Some(tx_job);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let (reqs, replies): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|j| (j.req, j.reply)).unzip();
                let t0 = std::time::Instant::now();
                let results = sqlite_group(&mut conn, &reqs, &prefetched, &hooks, &passes);
                observe_group("sqlite", reqs.len(), t0.elapsed());
                w.fetch_add(1, Ordering::Relaxed);
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            s.store(true, Ordering::Relaxed);
        })
        .map_err(|e| StoreError::Corrupt("store", format!("starting the write thread: {e}")))?;
    std::thread::Builder::new()
        .name("basphere-ckpt".into())
        .spawn(move || checkpoints(ckpt, wrote, stop))
        .map_err(|e| {
            StoreError::Corrupt("store", format!("starting the checkpoint thread: {e}"))
        })?;
    Ok((tx, commits))
}

/// One group on the write thread's connection, each completion alone if the group fails.
fn sqlite_group(
    conn: &mut Connection,
    reqs: &[DoneReq],
    prefetched: &Prefetch,
    hooks: &Registry,
    passes: &Passes,
) -> Vec<Result<Done>> {
    let once = |conn: &mut Connection, reqs: &[DoneReq]| -> Result<Vec<Result<Done>>> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = run_ready(commit_group(
            &mut SqliteTx { conn: &mut *conn },
            reqs,
            prefetched,
            hooks,
            passes,
            Guards::Read,
        ))
        .map_err(GroupError::into_store);
        let _timed = crate::statement_profile::time("COMMIT");
        match r.and_then(|v| conn.execute_batch("COMMIT").map(|()| v).map_err(Into::into)) {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    };
    match once(conn, reqs) {
        Ok(v) => {
            passes.committed(reqs, &v);
            v
        }
        Err(e) if reqs.len() > 1 => {
            tracing::debug!(error = %e, "group commit failed; committing one by one");
            reqs.iter()
                .map(|r| {
                    let one = once(conn, std::slice::from_ref(r))
                        .and_then(|mut v| v.pop().expect("one result"));
                    passes.committed(std::slice::from_ref(r), std::slice::from_ref(&one));
                    one
                })
                .collect()
        }
        Err(e) => vec![Err(e)],
    }
}

/// Copies the WAL back into the database. It waits for a quiet moment (a checkpoint then
/// completes and the next commit starts the WAL over, which is also cheaper than appending),
/// but not for longer than a few seconds of continuous writing; PASSIVE never blocks a writer.
fn checkpoints(conn: Connection, wrote: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    const TICK: Duration = Duration::from_millis(100);
    let (mut seen, mut done) = (0, 0);
    let mut ticks = 0u32;
    loop {
        std::thread::sleep(TICK);
        let now = wrote.load(Ordering::Relaxed);
        let stopping = stop.load(Ordering::Relaxed);
        let quiet = now == seen;
        seen = now;
        ticks += 1;
        // Other processes' writes do not count here, so look now and then anyway.
        if (quiet && now != done) || ticks >= 40 || stopping {
            done = now;
            ticks = 0;
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "WAL checkpoint failed; trying again later");
            }
        }
        if stopping {
            return;
        }
    }
}
