//! Online backups of a whole database and restores into an empty one (`basphere backup`,
//! `basphere restore`), one implementation per backend below the seam: SQLite through its
//! online backup API (`db/sqlite_backup.rs`), PostgreSQL through `pg_dump`/`pg_restore` in
//! the custom format (`db/pg_tools.rs`). A backup is one snapshot taken while servers write;
//! its summary is read from that same snapshot. A restore checks the file whole before it
//! writes, refuses a database that is not empty, and leaves a refused or failed target as it
//! was; it then migrates the restored database and drops the leases its workflows held (the
//! nodes holding them do not run here), so the first server started on it resumes them at once.

use crate::copy::row_counts;
use crate::db::{Db, Tx, pg_tools, postgres::Postgres, sqlite_backup, stmt};
use crate::workflows::WorkflowStatus;
use crate::{Result, Store, StoreError};
use std::path::{Path, PathBuf};

/// Where an install's database lives (what its `[database]` says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database: `postgres://user@host:port/db`.
    Postgres(String),
}

/// What a database holds, read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    pub schema_version: i64,
    /// Rows of every table, parents first.
    pub tables: Vec<(String, u64)>,
    /// Workflows not yet ended (pending, running, undoing): a server on a restored database
    /// resumes them.
    pub unfinished_workflows: u64,
}

impl Summary {
    /// Rows of `table`.
    pub fn rows(&self, table: &str) -> u64 {
        self.tables
            .iter()
            .find(|(t, _)| t == table)
            .map_or(0, |(_, n)| *n)
    }
}

/// A finished backup.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub file: PathBuf,
    pub bytes: u64,
    /// The database as the backup holds it.
    pub summary: Summary,
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The schema version the backup held (the summary's is after this binary's migrations).
    pub backup_schema_version: i64,
    /// Workflow leases dropped: their workflows resume as soon as a server starts.
    pub leases_released: u64,
    /// The restored database, migrated.
    pub summary: Summary,
}

impl Store {
    /// What the database holds: its schema version, the rows of every table, the workflows
    /// not yet ended.
    pub async fn summary(&self) -> Result<Summary> {
        self.db.read(|tx| Box::pin(summarize(tx))).await
    }
}

async fn summarize(tx: &mut dyn Tx) -> Result<Summary> {
    let backend = match tx.dialect() {
        crate::db::Dialect::Sqlite => "sqlite",
        crate::db::Dialect::Postgres => "postgres",
    };
    let schema_version = tx
        .query_one(&stmt!("SELECT MAX(version) FROM schema_migrations"))
        .await?
        .first_int()?
        .unwrap_or(0);
    let tables = row_counts(tx)
        .await?
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();
    let unfinished = tx
        .query_one(&stmt!(
            "SELECT COUNT(*) FROM workflows WHERE status IN ($1, $2, $3)",
            WorkflowStatus::Pending.as_str(),
            WorkflowStatus::Running.as_str(),
            WorkflowStatus::Undoing.as_str(),
        ))
        .await?
        .first_int()?
        .unwrap_or(0);
    Ok(Summary {
        backend,
        schema_version,
        tables,
        unfinished_workflows: unfinished as u64,
    })
}

/// Drops every workflow lease: after a restore no node holding one runs on this database.
async fn release_all_leases(tx: &mut dyn Tx) -> Result<u64> {
    tx.exec(&stmt!(
        "UPDATE workflows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL"
    ))
    .await
}

/// The file a backup is written to until it is whole (then renamed to its name).
fn partial(file: &Path) -> PathBuf {
    crate::with_suffix(file, ".partial")
}

impl Location {
    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgres",
        }
    }

    /// Opens the database (applying pending migrations).
    pub async fn open(&self) -> Result<Store> {
        match self {
            Location::Sqlite(path) => Store::open(path).await,
            Location::Postgres(url) => Store::open_postgres(url).await,
        }
    }

    /// Writes a consistent snapshot of the database into the new file `file` (mode 0600) while
    /// servers keep writing to it: an SQLite database file, or a `pg_dump` custom-format
    /// archive. Nothing is left at `file` when it fails.
    pub async fn backup(&self, file: &Path) -> Result<BackupReport> {
        if file.exists() {
            return Err(StoreError::Backup(format!(
                "{} already exists; name a new file (a backup never overwrites one)",
                file.display()
            )));
        }
        let tmp = partial(file);
        private_new_file(&tmp)?;
        let made = self.backup_into(&tmp).await;
        let renamed = made.and_then(|summary| {
            std::fs::rename(&tmp, file).map(|()| summary).map_err(|e| {
                StoreError::Backup(format!("naming the backup {}: {e}", file.display()))
            })
        });
        let summary = match renamed {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        Ok(BackupReport {
            file: file.to_path_buf(),
            bytes,
            summary,
        })
    }

    async fn backup_into(&self, tmp: &Path) -> Result<Summary> {
        match self {
            Location::Sqlite(src) => {
                // The empty placeholder (0600) is an empty database to SQLite: copied into.
                let (src, tmp) = (src.clone(), tmp.to_path_buf());
                tokio::task::spawn_blocking(move || {
                    sqlite_backup::backup(&src, &tmp, |tx| Box::pin(summarize(tx)))
                })
                .await
                .map_err(|e| StoreError::Backup(format!("the backup stopped: {e}")))?
            }
            Location::Postgres(url) => {
                let db = Db::Postgres(Postgres::new(url)?);
                let (url, tmp) = (url.clone(), tmp.to_path_buf());
                // pg_dump reads the snapshot this read transaction exported, which stays
                // open until it is done: the archive and the summary agree.
                let out = db
                    .read(move |tx| {
                        Box::pin(async move {
                            let snapshot = tx
                                .query_one(&stmt!("SELECT pg_export_snapshot()"))
                                .await?
                                .first_text()?
                                .unwrap_or_default();
                            let summary = summarize(tx).await?;
                            pg_tools::dump(&url, &snapshot, &tmp).await?;
                            Ok(summary)
                        })
                    })
                    .await;
                close(&db);
                out
            }
        }
    }

    /// Restores the backup `file` into this database, which must be empty (SQLite: no database
    /// file yet; PostgreSQL: no tables). The file is checked whole first; on any refusal or
    /// failure the target is left as it was.
    pub async fn restore(&self, file: &Path) -> Result<RestoreReport> {
        let backup_schema_version = match self {
            Location::Sqlite(dest) => restore_sqlite(file, dest).await?,
            Location::Postgres(url) => restore_postgres(file, url).await?,
        };
        let store = self.open().await?;
        let done = async {
            let leases_released = store
                .db
                .write(|tx| Box::pin(release_all_leases(tx)))
                .await?;
            store.analyze().await?;
            let summary = store.summary().await?;
            Ok(RestoreReport {
                backup_schema_version,
                leases_released,
                summary,
            })
        }
        .await;
        store.close().await;
        done
    }
}

/// Restores `file` into the new SQLite database `dest`; the backup's schema version.
async fn restore_sqlite(file: &Path, dest: &Path) -> Result<i64> {
    for suffix in ["", "-wal", "-shm"] {
        let p = crate::with_suffix(dest, suffix);
        if p.exists() {
            return Err(StoreError::Backup(format!(
                "{} exists: restore only into an empty data dir",
                p.display()
            )));
        }
    }
    let (file, dest) = (file.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        sqlite_backup::restore(&file, &dest, |tx| {
            Box::pin(async move {
                let s = summarize(tx).await?;
                check_version(crate::db::Dialect::Sqlite, s.schema_version)?;
                Ok(s.schema_version)
            })
        })
    })
    .await
    .map_err(|e| StoreError::Backup(format!("the restore stopped: {e}")))?
}

/// Restores the `pg_dump` archive `file` into the empty database of `url`; the backup's schema
/// version.
async fn restore_postgres(file: &Path, url: &str) -> Result<i64> {
    let version = pg_tools::schema_version(file).await?;
    check_version(crate::db::Dialect::Postgres, version)?;
    let db = Db::Postgres(Postgres::new(url)?);
    let tables = db.read(|tx| Box::pin(user_tables(tx))).await;
    close(&db);
    match tables? {
        0 => {}
        n => {
            return Err(StoreError::Backup(format!(
                "the database at [database] url is not empty ({n} tables): restore only into a \
                 new, empty database (CREATE DATABASE …)"
            )));
        }
    }
    pg_tools::restore(url, file).await?;
    Ok(version)
}

/// Tables in the database's own schemas (not PostgreSQL's catalogs).
async fn user_tables(tx: &mut dyn Tx) -> Result<i64> {
    Ok(tx
        .query_one(&stmt!(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ))
        .await?
        .first_int()?
        .unwrap_or(0))
}

/// A backup newer than this binary's migrations would not open: refused before any write.
fn check_version(dialect: crate::db::Dialect, version: i64) -> Result<()> {
    let newest = crate::migrate::newest(dialect);
    if version > newest {
        return Err(StoreError::Backup(format!(
            "the backup is at schema version {version}, this basphere knows only up to \
             {newest}: restore it with the basphere that made it (or a newer one)"
        )));
    }
    Ok(())
}

fn close(db: &Db) {
    if let Db::Postgres(pg) = db {
        pg.close();
    }
}

/// Creates `path` as a new, empty file only its owner may read.
fn private_new_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| StoreError::Backup(format!("cannot create {}: {e}", path.display())))
}
