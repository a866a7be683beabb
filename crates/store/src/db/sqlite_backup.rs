//! Whole-database copies of the SQLite file through SQLite's online backup API: every page in
//! one backup step, so the copy is one read snapshot while the write thread goes on in the WAL.

use super::sqlite::{SqliteTx, open, run_ready};
use super::{BoxFut, Tx};
use crate::{Result, StoreError};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

/// Copies every page of `from` into `to` in one step (one snapshot of `from`), waiting out a
/// busy or locked database for up to 30 s.
fn copy_pages(from: &Connection, to: &mut Connection) -> Result<()> {
    use rusqlite::backup::StepResult;
    let backup = rusqlite::backup::Backup::new(from, to)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => {
                return Err(StoreError::Backup(format!(
                    "the database stayed busy for 30 s ({other:?}); try again"
                )));
            }
        }
    }
}

/// Copies the live database at `src` into the new file `dest` as one self-contained file
/// (rollback journal: no `-wal` beside it), then runs `summary` on the copy.
pub(crate) fn backup<T>(
    src: &Path,
    dest: &Path,
    summary: impl for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>>,
) -> Result<T> {
    if !src.exists() {
        return Err(StoreError::Unavailable(format!(
            "no database at {}: is this the install's config (data_dir)?",
            src.display()
        )));
    }
    let from = open(src)?;
    let mut to = Connection::open(dest)?;
    copy_pages(&from, &mut to)?;
    drop(from);
    to.pragma_update(None, "journal_mode", "DELETE")?;
    read(&mut to, summary)
}

/// Runs `f` in one read transaction on `conn`.
fn read<T>(
    conn: &mut Connection,
    f: impl for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>>,
) -> Result<T> {
    conn.execute_batch("BEGIN")?;
    let out = run_ready(f(&mut SqliteTx { conn: &mut *conn }));
    conn.execute_batch("COMMIT")?;
    out
}

/// Opens `file` read-only after checking it is a whole, sound SQLite database: its length
/// holds every page its header counts, and SQLite's integrity check passes.
fn verify(file: &Path) -> Result<Connection> {
    let bad = |why: String| StoreError::Backup(format!("{} {why}", file.display()));
    let mut magic = [0u8; 16];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(file).map_err(|e| bad(format!("cannot be read: {e}")))?;
        f.read_exact(&mut magic)
            .map_err(|_| bad("is too short to be a backup".into()))?;
    }
    if &magic != b"SQLite format 3\0" {
        return Err(bad("is not an SQLite database".into()));
    }
    let c = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let damaged = |e: rusqlite::Error| bad(format!("is damaged: {e}"));
    let page_size: i64 = c
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(damaged)?;
    let pages: i64 = c
        .pragma_query_value(None, "page_count", |r| r.get(0))
        .map_err(damaged)?;
    let len = std::fs::metadata(file)
        .map_err(|e| bad(format!("cannot be read: {e}")))?
        .len();
    let (page_size, pages) = (page_size.max(0) as u64, pages.max(0) as u64);
    if len < page_size * pages {
        return Err(bad(format!(
            "is truncated: {len} bytes, its header counts {}",
            page_size * pages
        )));
    }
    let check: String = c
        .query_row("PRAGMA integrity_check(1)", [], |r| r.get(0))
        .map_err(damaged)?;
    if check != "ok" {
        return Err(bad(format!(
            "is damaged: SQLite's integrity check says {check}"
        )));
    }
    Ok(c)
}

/// Checks the backup `file` and runs `check` on it (read-only), then copies it into the new
/// database file `dest` (written beside it and renamed in, so a failure leaves no `dest`).
pub(crate) fn restore<T>(
    file: &Path,
    dest: &Path,
    check: impl for<'a> FnOnce(&'a mut dyn Tx) -> BoxFut<'a, Result<T>>,
) -> Result<T> {
    let mut from = verify(file)?;
    let out = read(&mut from, check)?;
    let tmp = crate::with_suffix(dest, ".restoring");
    let copied = (|| -> Result<()> {
        let mut to = Connection::open(&tmp)?;
        copy_pages(&from, &mut to)?;
        to.pragma_update(None, "journal_mode", "WAL")?;
        drop(to);
        std::fs::rename(&tmp, dest)
            .map_err(|e| StoreError::Backup(format!("moving the restored database: {e}")))
    })();
    if copied.is_err() {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(crate::with_suffix(&tmp, suffix));
        }
    }
    copied.map(|()| out)
}
