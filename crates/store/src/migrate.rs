//! Versioned migrations per backend, embedded in the binary and applied in order at open, in
//! one transaction (on PostgreSQL under an advisory lock, so replicas starting together apply
//! them once).

use crate::db::{Db, Dialect, Tx, stmt};
use crate::{Result, StoreError, now_ms};

type Migration = (i64, &'static str, &'static str);

const SQLITE: &[Migration] = &[
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
    (
        7,
        "compat",
        include_str!("../migrations/sqlite/0007_compat.sql"),
    ),
    (
        8,
        "extra",
        include_str!("../migrations/sqlite/0008_extra.sql"),
    ),
    (
        9,
        "disk_quota",
        include_str!("../migrations/sqlite/0009_disk_quota.sql"),
    ),
    (
        10,
        "step_timeouts",
        include_str!("../migrations/sqlite/0010_step_timeouts.sql"),
    ),
    (
        11,
        "batch_queue_order",
        include_str!("../migrations/sqlite/0011_batch_queue_order.sql"),
    ),
];

/// PostgreSQL starts at SQLite's schema 6 in one file; later changes get a file each, on both
/// backends or on the one that needs it (8: PostgreSQL's event log without a foreign key).
const POSTGRES: &[Migration] = &[
    (
        6,
        "schema",
        include_str!("../migrations/postgres/0001_schema.sql"),
    ),
    (
        7,
        "compat",
        include_str!("../migrations/postgres/0002_compat.sql"),
    ),
    (
        8,
        "lean_event_log",
        include_str!("../migrations/postgres/0003_lean_event_log.sql"),
    ),
    (
        9,
        "extra",
        include_str!("../migrations/postgres/0004_extra.sql"),
    ),
    (
        10,
        "disk_quota",
        include_str!("../migrations/postgres/0005_disk_quota.sql"),
    ),
    (
        11,
        "step_timeouts",
        include_str!("../migrations/postgres/0006_step_timeouts.sql"),
    ),
    (
        12,
        "vm_name_order",
        include_str!("../migrations/postgres/0007_vm_name_order.sql"),
    ),
    (
        13,
        "batch_queue_order",
        include_str!("../migrations/postgres/0008_batch_queue_order.sql"),
    ),
    (
        14,
        "lean_steps",
        include_str!("../migrations/postgres/0009_lean_steps.sql"),
    ),
    (
        15,
        "hot_vm_status",
        include_str!("../migrations/postgres/0010_hot_vm_status.sql"),
    ),
    (
        16,
        "hot_fillfactor",
        include_str!("../migrations/postgres/0011_hot_fillfactor.sql"),
    ),
];

/// The migrations of `dialect`, oldest first.
fn migrations(dialect: Dialect) -> &'static [Migration] {
    match dialect {
        Dialect::Sqlite => SQLITE,
        Dialect::Postgres => POSTGRES,
    }
}

/// The newest schema version this binary knows for `dialect`.
pub(crate) fn newest(dialect: Dialect) -> i64 {
    migrations(dialect).last().map_or(0, |m| m.0)
}

/// Applies the pending migrations of `db`'s backend.
pub(crate) async fn run(db: &Db) -> Result<()> {
    db.write(|tx| Box::pin(apply(tx))).await
}

async fn apply(tx: &mut dyn Tx) -> Result<()> {
    let dialect = tx.dialect();
    if dialect == Dialect::Postgres {
        tx.query(&stmt!("SELECT pg_advisory_xact_lock(4242000001)"))
            .await?;
    }
    tx.script(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let current = tx
        .query_one(&stmt!("SELECT MAX(version) FROM schema_migrations"))
        .await?
        .first_int()?
        .unwrap_or(0);
    let all = migrations(dialect);
    let newest = newest(dialect);
    if current > newest {
        return Err(StoreError::Migration(format!(
            "the database is at schema version {current} but this basphere knows only up to {newest}; \
             run a newer basphere or restore a backup"
        )));
    }
    for (version, name, sql) in all.iter().filter(|m| m.0 > current) {
        tx.script(sql).await.map_err(|e| {
            StoreError::Migration(format!("migration {version} ({name}) failed: {e}"))
        })?;
        tx.exec(&stmt!(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            *version,
            *name,
            now_ms(),
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SQLITE as MIGRATIONS;
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
