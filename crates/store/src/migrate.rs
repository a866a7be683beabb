//! Versioned migrations, embedded in the binary and applied in order at open.

use crate::{Result, StoreError, now_ms};
use sqlx::{Executor, SqlitePool};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "engine",
        include_str!("../migrations/sqlite/0002_engine.sql"),
    ),
    (
        3,
        "batch_slots",
        include_str!("../migrations/sqlite/0003_batch_slots.sql"),
    ),
    (
        4,
        "lean_indexes",
        include_str!("../migrations/sqlite/0004_lean_indexes.sql"),
    ),
    (
        5,
        "accounts",
        include_str!("../migrations/sqlite/0005_accounts.sql"),
    ),
    (
        6,
        "ledger",
        include_str!("../migrations/sqlite/0006_ledger.sql"),
    ),
];

pub(crate) async fn run(pool: &SqlitePool) -> Result<()> {
    pool.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .await?;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut *tx)
        .await?;
    let current = current.unwrap_or(0);
    let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > newest {
        return Err(StoreError::Migration(format!(
            "the database is at schema version {current} but this basphere knows only up to {newest}; \
             run a newer basphere or restore a backup"
        )));
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute(sqlx::raw_sql(*sql)).await.map_err(|e| {
            StoreError::Migration(format!("migration {version} ({name}) failed: {e}"))
        })?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
