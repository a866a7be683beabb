use crate::db::{Cols, Filter, Row, Stmt, stmt};
use crate::{Result, Store, now_ms};
use serde::Serialize;

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

/// The statement that writes one audit record (inside the caller's transaction).
pub(crate) fn audit_stmt(
    actor: &Actor,
    action: &str,
    target: &str,
    result: &str,
    detail: Option<&str>,
) -> Stmt {
    stmt!(
        "INSERT INTO audit (at, actor, source, action, target, result, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        now_ms(),
        actor.name.as_str(),
        actor.source.as_str(),
        action,
        target,
        result,
        detail,
    )
}

fn record_from(r: &Row) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.int("id")?,
        at: r.int("at")?,
        actor: r.text("actor")?,
        source: r.text("source")?,
        action: r.text("action")?,
        target: r.text("target")?,
        result: r.text("result")?,
        detail: r.opt_text("detail")?,
    })
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
        let s = audit_stmt(actor, action, target, result, detail);
        self.db
            .write(move |tx| Box::pin(async move { tx.exec(&s).await.map(drop) }))
            .await
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
        let mut w = Filter::default();
        w.given(f.actor.as_deref(), |p| format!("actor = {p}"))
            .given(f.action.as_deref(), |p| format!("action LIKE {p} || '%'"))
            .given(f.target.as_deref(), |p| format!("target = {p}"))
            .given(f.since_ms, |p| format!("at >= {p}"))
            .given(after, |p| format!("id < {p}"));
        let s = w.page(
            "SELECT id, at, actor, source, action, target, result, detail FROM audit",
            "id DESC",
            f.limit.unwrap_or(100),
        );
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query(&s).await?.iter().map(record_from).collect() })
            })
            .await
    }
}
