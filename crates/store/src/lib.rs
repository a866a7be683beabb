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
//!
//! Transition: the domain modules move onto `db::Tx` one by one (written once, for both
//! backends); those not moved yet still speak sqlx to SQLite and answer
//! [`StoreError::Unsupported`] on PostgreSQL.

mod audit;
mod batches;
mod commit;
mod db;
mod hooks;
mod limits;
mod migrate;
mod users;
mod vms;
mod workflows;

pub use audit::{Actor, AuditFilter, AuditRecord};
pub use batches::{BatchAdmitted, BatchError, BatchNodeRef, BatchRequest, BatchVm};
pub use hooks::{Hooks, RetryCtx};
pub use users::{
    ApproveOutcome, KeyChange, NewRegistration, Registration, TokenInfo, TokenOwner, User,
    UserError,
};
pub use vms::{AdmitError, AdmitRequest, Admitted, DeleteError, Vm};
pub use workflows::{
    ClaimLimits, Claimed, DeadlineFn, Handoff, NewWorkflow, NextStep, OpError, Reopen, ResourceRef,
    StepCommit, StepEffect, StepRecord, StepStatus, Workflow, WorkflowEvent, WorkflowOutcome,
    WorkflowStatus,
};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A failure of the database itself (not of a business rule).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// From the engine's write thread (see `commit`).
    #[error("database error: {0}")]
    Write(#[from] rusqlite::Error),
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
    /// The database server cannot be reached (or its url is wrong).
    #[error("{0}")]
    Unavailable(String),
    /// An operation whose domain module is not yet on the PostgreSQL backend.
    #[error("{0} is not available on PostgreSQL yet; use the embedded SQLite database")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: db::Db,
    /// sqlx's connections to the SQLite file, for the domain modules not yet on `db`.
    legacy: Option<Legacy>,
    /// VMs the write thread read when it leased their workflows.
    prefetched: Arc<vms::Prefetched>,
    /// Each definition's hooks on its resource (shared with the write thread).
    hooks: hooks::Registry,
    /// Where step completions go to be group-committed.
    committer: commit::Committer,
    /// PostgreSQL: told whenever any replica commits events (see [`Store::changes`]).
    changes: Option<(tokio::sync::broadcast::Sender<()>, tokio::task::AbortHandle)>,
}

#[derive(Clone, Debug)]
struct Legacy {
    pool: SqlitePool,
    /// The one connection write transactions use: its page cache stays warm (a write on
    /// another connection would make SQLite drop that connection's cache).
    wpool: SqlitePool,
    /// Serializes this process's write transactions with the write thread's. SQLite allows one
    /// writer at a time anyway; queueing here (FIFO, async) instead of in SQLite's busy
    /// handler (which sleeps in millisecond steps) is what lets the engine commit thousands of
    /// step transitions a second. Other processes on the same file wait in the busy handler.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction holding this process's writer lock; derefs to the connection.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _writer: tokio::sync::OwnedMutexGuard<()>,
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl WriteTx {
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }
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
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30))
            // The checkpoint thread copies the WAL back, off every commit path (see `commit`).
            .pragma("wal_autocheckpoint", "0");
        let writer = Arc::new(tokio::sync::Mutex::new(()));
        let prefetched = Arc::new(vms::Prefetched::default());
        let hooks = hooks::Registry::default();
        let jobs = commit::spawn(path, writer.clone(), prefetched.clone(), hooks.clone())?;
        let db = db::Db::Sqlite(db::sqlite::Sqlite::new(path, jobs));
        migrate::run(&db).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .connect_with(opts.clone())
            .await?;
        let wpool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        Ok(Self {
            db,
            legacy: Some(Legacy {
                pool,
                wpool,
                writer,
            }),
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
        let prefetched = Arc::new(vms::Prefetched::default());
        let hooks = hooks::Registry::default();
        let committer = commit::Committer::Task(commit::spawn_pg(
            db.clone(),
            prefetched.clone(),
            hooks.clone(),
        ));
        Ok(Self {
            db,
            legacy: None,
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

    /// On PostgreSQL, a signal for every transaction any replica commits with events (queued,
    /// claimed, finished work): the engine wakes on it and event streams read what is new.
    /// `None` on SQLite, where one process writes.
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
        self.changes.as_ref().map(|(tx, _)| tx.subscribe())
    }

    /// Closes all connections.
    pub async fn close(&self) {
        if let Some((_, task)) = &self.changes {
            task.abort();
        }
        if let Some(l) = &self.legacy {
            l.wpool.close().await;
            l.pool.close().await;
        }
    }

    /// sqlx's connections, for the domain modules not yet on the backend seam.
    fn lg(&self) -> Result<&Legacy> {
        self.legacy
            .as_ref()
            .ok_or(StoreError::Unsupported("this operation"))
    }

    /// A write transaction that holds the database's write lock from its first statement.
    async fn write(&self) -> Result<WriteTx> {
        let l = self.lg()?;
        let w = l.writer.clone().lock_owned().await;
        Ok(WriteTx {
            tx: l.wpool.begin_with("BEGIN IMMEDIATE").await?,
            _writer: w,
        })
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
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
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
