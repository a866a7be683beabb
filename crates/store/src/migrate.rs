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

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;
    use crate::{ResourceRef, Store};

    /// A database made by an older basphere (schema 5: `kind` + `vm_id`) opens with each
    /// workflow's definition and resource kept.
    #[tokio::test]
    async fn workflows_of_schema_5_keep_their_definition_and_vm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE schema_migrations (
                    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
            )
            .unwrap();
            for (v, name, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 5) {
                c.execute_batch(sql).unwrap();
                c.execute(
                    "INSERT INTO schema_migrations VALUES (?1, ?2, 0)",
                    rusqlite::params![v, name],
                )
                .unwrap();
            }
            for (id, kind, vm, def) in [
                ("w1", "create_vm", Some("vm-1"), None),
                ("w2", "delete_vm", None, None),
                ("w3", "create_vm", None, Some("ledger")),
            ] {
                c.execute(
                    "INSERT INTO workflows (id, kind, vm_id, definition, owner, status, input,
                         next_run_at, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 'alice', 'succeeded', '{}', 0, 0, 0)",
                    rusqlite::params![id, kind, vm, def],
                )
                .unwrap();
            }
        }
        let store = Store::open(&path).await.unwrap();
        let w1 = store.workflow("w1").await.unwrap().unwrap();
        assert_eq!(w1.definition, "create_vm");
        assert_eq!(w1.resource, Some(ResourceRef::vm("vm-1")));
        let w2 = store.workflow("w2").await.unwrap().unwrap();
        assert_eq!((w2.definition.as_str(), w2.resource), ("delete_vm", None));
        let w3 = store.workflow("w3").await.unwrap().unwrap();
        assert_eq!((w3.definition.as_str(), w3.resource), ("ledger", None));
        store.close().await;
    }
}
