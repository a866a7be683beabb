//! Copying a whole database into an empty one of either backend (`basphere db copy`): every
//! table, row by row with the same ids, in one read snapshot and one write transaction, so an
//! embedded install moves to PostgreSQL with nothing lost (tokens, sessions' users, audit,
//! unfinished workflows).

use crate::db::{Dialect, Row, Stmt, Tx, Value, stmt};
use crate::{Result, Store, StoreError};

/// Every table, parents before children, with the column that orders its rows.
const TABLES: &[(&str, &str)] = &[
    ("users", "username"),
    ("registrations", "id"),
    ("key_changes", "id"),
    ("tokens", "id"),
    ("enrollment_codes", "hash"),
    ("vms", "id"),
    ("vm_nic_leases", "network, ip"),
    ("batches", "id"),
    ("workflows", "id"),
    ("workflow_steps", "workflow_id, idx"),
    ("workflow_deps", "workflow_id, depends_on"),
    ("workflow_events", "seq"),
    ("step_effects", "seq"),
    ("audit", "id"),
];

/// Identity columns PostgreSQL numbers itself: after a copy they continue past the copied ids.
const IDENTITIES: &[(&str, &str)] = &[
    ("registrations", "id"),
    ("key_changes", "id"),
    ("workflow_events", "seq"),
    ("step_effects", "seq"),
    ("audit", "id"),
];

/// Rows per INSERT (PostgreSQL takes at most 65,535 parameters per statement).
const CHUNK: usize = 500;

/// How many rows of each table a copy wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
}

async fn read_all(tx: &mut dyn Tx) -> Result<Vec<(&'static str, Vec<Row>)>> {
    let mut out = Vec::with_capacity(TABLES.len());
    for (t, order) in TABLES {
        let rows = tx
            .query(&Stmt::new(
                format!("SELECT * FROM {t} ORDER BY {order}"),
                vec![],
            ))
            .await?;
        out.push((*t, rows));
    }
    Ok(out)
}

/// Rows of every table, in [`TABLES`] order.
pub(crate) async fn row_counts(tx: &mut dyn Tx) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::with_capacity(TABLES.len());
    for (t, _) in TABLES {
        let n = tx
            .query_one(&Stmt::new(format!("SELECT COUNT(*) FROM {t}"), vec![]))
            .await?
            .first_int()?
            .unwrap_or(0);
        out.push((*t, n.max(0) as u64));
    }
    Ok(out)
}

async fn write_all(tx: &mut dyn Tx, data: Vec<(&'static str, Vec<Row>)>) -> Result<CopyReport> {
    for (t, n) in row_counts(tx).await? {
        if n > 0 {
            return Err(StoreError::Migration(format!(
                "the target database is not empty ({t} has {n} rows); copy into a new, empty database"
            )));
        }
    }
    let mut report = vec![];
    for (t, rows) in data {
        let Some(first) = rows.first() else {
            report.push((t.to_string(), 0));
            continue;
        };
        let cols = first.columns().to_vec();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = format!("INSERT INTO {t} ({}) VALUES ", cols.join(", "));
            let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * cols.len());
            for (r, row) in chunk.iter().enumerate() {
                if r > 0 {
                    sql.push_str(", ");
                }
                let marks: Vec<String> = (0..cols.len())
                    .map(|c| format!("${}", r * cols.len() + c + 1))
                    .collect();
                sql.push_str(&format!("({})", marks.join(", ")));
                args.extend(row.values().iter().cloned());
            }
            tx.exec(&Stmt::new(sql, args)).await?;
        }
        report.push((t.to_string(), rows.len() as u64));
    }
    if tx.dialect() == Dialect::Postgres {
        for (t, c) in IDENTITIES {
            tx.query(&stmt!(format!(
                "SELECT setval(pg_get_serial_sequence('{t}', '{c}'),
                               COALESCE((SELECT MAX({c}) FROM {t}), 0) + 1, false)"
            )))
            .await?;
        }
    }
    Ok(CopyReport { tables: report })
}

impl Store {
    /// Copies every row of this database into `target`, which must be empty (freshly
    /// migrated). Stop the servers on this database first: what they write during the copy is
    /// not copied.
    pub async fn copy_into(&self, target: &Store) -> Result<CopyReport> {
        let data = self.db.read(|tx| Box::pin(read_all(tx))).await?;
        let report = target
            .db
            .write(move |tx| Box::pin(write_all(tx, data)))
            .await?;
        target.analyze().await?;
        Ok(report)
    }

    /// Gives PostgreSQL's planner the statistics of tables just filled in bulk (a copy, a
    /// restore), which autovacuum would gather only a minute or more later; until then it
    /// plans as if it knew nothing of them. Nothing to do on SQLite.
    pub(crate) async fn analyze(&self) -> Result<()> {
        if let crate::db::Db::Postgres(_) = &self.db {
            self.db
                .write(|tx| Box::pin(async move { tx.script("ANALYZE").await }))
                .await?;
        }
        Ok(())
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i64> {
        self.db
            .read_int(stmt!("SELECT MAX(version) FROM schema_migrations"))
            .await
    }
}
