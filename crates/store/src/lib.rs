//! Basphere's persistent state.
//!
//! Architecture invariant: every decision that must not race — admitting VMs against a quota,
//! handing out IP addresses and blocks, claiming a workflow step — is one SQL transaction here.
//! Nothing above this crate reads, decides and then writes in separate steps. Every change a
//! user or admin makes writes its audit record in the same transaction as the change.
//!
//! Two backends sit behind one `Store` (see `db`): the embedded SQLite file (the default) and
//! PostgreSQL (`[database] url`), which several replicas share. On SQLite every write
//! transaction runs on one write thread that also group-commits the engine's step completions
//! (`commit`); reads use a small pool of their own connections, in WAL mode.

mod audit;
mod backup;
mod batches;
mod commit;
mod copy;
mod db;
mod hooks;
mod limits;
mod migrate;
mod users;
mod vms;
mod workflows;

pub use audit::{Actor, AuditFilter, AuditRecord};
pub use backup::{BackupReport, Location, RestoreReport, Summary};
pub use batches::{BatchAdmitted, BatchNodeRef, BatchWork};
pub use copy::CopyReport;
pub use db::statement_profile;
pub use hooks::{Hooks, RetryCtx};
pub use users::{
    ApproveOutcome, KeyChange, NewRegistration, Registration, TokenInfo, TokenOwner, User,
    UserError,
};
pub use vms::batch::{BatchError, BatchRequest, BatchVm};
pub use vms::{
    AdmitError, AdmitExtras, AdmitRequest, Admitted, DeleteError, ExtraNetwork, Vm, VmAndKey,
};
pub use workflows::{
    ClaimLimits, Claimed, Completed, Completion, Handoff, LeaseTo, NewStep, NewWorkflow, NextStep,
    OpError, Reopen, ResourceRef, StepCommit, StepEffect, StepRecord, StepStatus, Workflow,
    WorkflowCounts, WorkflowEvent, WorkflowOutcome, WorkflowStatus,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A failure of the database itself (not of a business rule).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database holds an invalid value in {0}: {1}")]
    Corrupt(&'static str, String),
    #[error("{0}")]
    Migration(String),
    /// Another node now holds the lease on this workflow (or the workflow is gone): this node
    /// must stop driving it and write nothing more for it.
    #[error("lease lost on {0}: another node continues this workflow")]
    LeaseLost(String),
    /// The store was shut down; nothing more can be written through this handle.
    #[error("the store is closed")]
    Closed,
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A backup could not be made or restored; says why and what to do.
    #[error("{0}")]
    Backup(String),
    /// The database server cannot be reached (or its url is wrong).
    #[error("{0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A commit another replica made with events (PostgreSQL; see [`Store::changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The lowest and highest event `seq` it appended; `None` when unknown (read from the
    /// last event seen then, e.g. after the listening connection was lost and remade).
    pub events: Option<(i64, i64)>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: db::Db,
    /// VMs the write thread read when it leased their workflows.
    prefetched: Arc<hooks::Prefetch>,
    /// Each definition's hooks on its resource (shared with the write thread).
    hooks: hooks::Registry,
    /// Where step completions go to be group-committed.
    committer: commit::Committer,
    /// PostgreSQL: told whenever any replica commits events (see [`Store::changes`]).
    changes: Option<(
        tokio::sync::broadcast::Sender<Change>,
        tokio::task::AbortHandle,
    )>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 text of a Unix-millisecond time, for output.
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

impl Store {
    /// Opens (creating if missing) the SQLite database at `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        private_files(path).map_err(|e| {
            StoreError::Migration(format!(
                "cannot make the database {} private (mode 0600): {e}",
                path.display()
            ))
        })?;
        let prefetched = Arc::new(hooks::Prefetch::default());
        let hooks = hooks::Registry::default();
        let (jobs, commits) = commit::spawn(path, prefetched.clone(), hooks.clone())?;
        let db = db::Db::Sqlite(db::sqlite::Sqlite::new(path, jobs, commits));
        migrate::run(&db).await?;
        Ok(Self {
            db,
            prefetched,
            hooks,
            committer: commit::Committer::Thread,
            changes: None,
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host:port/db`) and
    /// applies pending migrations. Several servers (replicas) may share it.
    pub async fn open_postgres(url: &str) -> Result<Self> {
        let pg = db::postgres::Postgres::new(url)?;
        let changes = Some(pg.listen());
        let db = db::Db::Postgres(pg);
        migrate::run(&db).await?;
        let prefetched = Arc::new(hooks::Prefetch::default());
        let hooks = hooks::Registry::default();
        let committer = commit::Committer::Task(commit::spawn_pg(
            db.clone(),
            prefetched.clone(),
            hooks.clone(),
        ));
        Ok(Self {
            db,
            prefetched,
            hooks,
            committer,
            changes,
        })
    }

    /// Which backend this store runs on: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.db {
            db::Db::Sqlite(_) => "sqlite",
            db::Db::Postgres(_) => "postgres",
        }
    }

    /// On PostgreSQL, every transaction another replica commits with events (queued, claimed,
    /// finished work), with the range of event numbers it appended: the engine wakes on it and
    /// passes those events on. `None` on SQLite, where one process writes.
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        self.changes.as_ref().map(|(tx, _)| tx.subscribe())
    }

    /// Write transactions committed so far by this handle (a benchmark's commits per step).
    pub fn commits(&self) -> u64 {
        use std::sync::atomic::Ordering;
        match &self.db {
            db::Db::Sqlite(d) => d.commits.load(Ordering::Relaxed),
            db::Db::Postgres(d) => d.commits.load(Ordering::Relaxed),
        }
    }

    /// Closes all connections.
    pub async fn close(&self) {
        if let Some((_, task)) = &self.changes {
            task.abort();
        }
        match &self.db {
            db::Db::Sqlite(d) => d.close(),
            db::Db::Postgres(d) => d.close(),
        }
    }
}

/// Creates the database file as 0600 when missing and takes group/other access from an existing
/// one and its `-wal`/`-shm`. SQLite creates the `-wal` and `-shm` files with the database's mode.
fn private_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let p = with_suffix(path, suffix);
        match std::fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                let mode = m.permissions().mode() & 0o7700;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name (`db` → `db-wal`, `file` → `file.partial`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

pub(crate) fn parse<T: std::str::FromStr>(what: &'static str, s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| StoreError::Corrupt(what, format!("{s:?}: {e}")))
}

/// Random bytes as lowercase hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// SHA-256 of a secret, as hex. Secrets here are 256-bit random tokens, so a fast hash suffices.
pub fn hash_secret(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
