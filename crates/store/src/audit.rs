use crate::{Result, Store, now_ms};
use serde::Serialize;
use sqlx::{Row, SqliteConnection};

/// Who made a change and from where (`unix:uid=1001`, `tcp:127.0.0.1:5123`, `engine`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actor {
    pub name: String,
    pub source: String,
}

impl Actor {
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            source: source.into(),
        }
    }

    /// The workflow engine acting on its own.
    pub fn engine() -> Self {
        Self::new("basphere", "engine")
    }
}

/// One line of the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub source: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub detail: Option<String>,
}

/// What to select from the audit trail; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: Option<i64>,
}

pub(crate) async fn record(
    conn: &mut SqliteConnection,
    actor: &Actor,
    action: &str,
    target: &str,
    result: &str,
    detail: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit (at, actor, source, action, target, result, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(now_ms())
    .bind(&actor.name)
    .bind(&actor.source)
    .bind(action)
    .bind(target)
    .bind(result)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

impl Store {
    /// Writes an audit record on its own (for refusals, which change nothing else).
    pub async fn audit(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        result: &str,
        detail: Option<&str>,
    ) -> Result<()> {
        let mut c = self.lg()?.pool.acquire().await?;
        record(&mut c, actor, action, target, result, detail).await
    }

    /// Audit records matching `f`, newest first.
    pub async fn audit_list(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        self.audit_page(f, None).await
    }

    /// [`Store::audit_list`] from the record older than id `after` on (the next page).
    pub async fn audit_page(
        &self,
        f: &AuditFilter,
        after: Option<i64>,
    ) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, source, action, target, result, detail FROM audit
             WHERE ($1 IS NULL OR actor = $1) AND ($2 IS NULL OR action LIKE $2 || '%')
               AND ($3 IS NULL OR target = $3) AND ($4 IS NULL OR at >= $4)
               AND ($6 IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $5",
        )
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&f.target)
        .bind(f.since_ms)
        .bind(f.limit.unwrap_or(100))
        .bind(after)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    source: r.try_get("source")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    result: r.try_get("result")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}
