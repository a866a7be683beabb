//! Basphere's persistent state.
//!
//! Architecture invariant: every decision that must not race — admitting VMs against a quota,
//! handing out IP addresses and blocks, claiming a workflow step — is one SQL transaction here.
//! Nothing above this crate reads, decides and then writes in separate steps. Every change a
//! user or admin makes writes its audit record in the same transaction as the change.
//!
//! The embedded backend is SQLite in WAL mode; write transactions start with `BEGIN IMMEDIATE`
//! so concurrent writers queue instead of failing at commit. The SQL is kept portable (`$n`
//! parameters, `RETURNING`, `ON CONFLICT`) so that a PostgreSQL backend can serve the same API;
//! there the claim queries take `FOR UPDATE SKIP LOCKED`. The one SQLite-only part is `commit`,
//! the engine's hot path: a write thread on its own rusqlite connection that group-commits step
//! completions (a PostgreSQL backend would pipeline the same statements on one connection).

mod audit;
mod batches;
mod commit;
mod hooks;
mod limits;
mod migrate;
mod stmt;
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
    ClaimLimits, Claimed, Handoff, NewWorkflow, NextStep, OpError, Reopen, ResourceRef, StepCommit,
    StepEffect, StepRecord, StepStatus, Workflow, WorkflowEvent, WorkflowOutcome, WorkflowStatus,
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
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    /// The one connection write transactions use: its page cache stays warm (a write on
    /// another connection would make SQLite drop that connection's cache).
    wpool: SqlitePool,
    /// Serializes this process's write transactions. SQLite allows one writer at a time anyway;
    /// queueing here (FIFO, async) instead of in SQLite's busy handler (which sleeps in
    /// millisecond steps) is what lets the engine commit thousands of step transitions a second.
    /// Other processes on the same file still wait in the busy handler.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Queue of the write thread that group-commits step completions (see `commit`).
    committer: std::sync::mpsc::Sender<commit::DoneJob>,
    /// VMs the write thread read when it leased their workflows.
    prefetched: Arc<vms::Prefetched>,
    /// Each definition's hooks on its resource (shared with the write thread).
    hooks: hooks::Registry,
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
        migrate::run(&pool).await?;
        let writer = Arc::new(tokio::sync::Mutex::new(()));
        let prefetched = Arc::new(vms::Prefetched::default());
        let hooks = hooks::Registry::default();
        let committer = commit::spawn(path, writer.clone(), prefetched.clone(), hooks.clone())?;
        Ok(Self {
            pool,
            wpool,
            writer,
            committer,
            prefetched,
            hooks,
        })
    }

    /// Closes all connections.
    pub async fn close(&self) {
        self.wpool.close().await;
        self.pool.close().await;
    }

    /// A write transaction that holds the database's write lock from its first statement.
    async fn write(&self) -> Result<WriteTx> {
        let w = self.writer.clone().lock_owned().await;
        Ok(WriteTx {
            tx: self.wpool.begin_with("BEGIN IMMEDIATE").await?,
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
