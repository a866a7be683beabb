//! Key changes: a user asks for a new SSH key, an admin approves or rejects it.

use super::{KeyChange, UserError, user_row_locked};
use crate::audit::audit_stmt;
use crate::db::{Cols, Filter, Row, Stmt, stmt};
use crate::{Actor, Result, Store, now_ms, parse};
use basphere_core::{SshPublicKey, Username};

fn key_change_from(r: &Row) -> Result<KeyChange> {
    Ok(KeyChange {
        id: r.int("id")?,
        username: r.text("username")?,
        public_key: r.text("public_key")?,
        email: r.opt_text("email")?,
        reason: r.opt_text("reason")?,
        status: parse("key_changes.status", &r.text("status")?)?,
        created_at: r.int("created_at")?,
        processed_by: r.opt_text("processed_by")?,
        processed_at: r.opt_int("processed_at")?,
        reject_reason: r.opt_text("reject_reason")?,
    })
}

impl Store {
    /// Files a key-change request for a user who holds a credential (see
    /// [`Store::request_key_change_with`]).
    pub async fn request_key_change(
        &self,
        username: &Username,
        key: &SshPublicKey,
        actor: &Actor,
    ) -> std::result::Result<KeyChange, UserError> {
        self.request_key_change_with(username.as_str(), key, None, None, actor)
            .await
    }

    /// Files a key-change request with the user's email and an optional reason. With
    /// `claimed_email` (a request made without any credential), the user must be active or
    /// disabled and that email must be their registered one (case-insensitively); otherwise
    /// the refusal is `NotFound`, the same as for an unknown user, so a caller cannot tell
    /// which of the two was wrong.
    ///
    /// The user's row is locked first (PostgreSQL), so two requests on two replicas cannot
    /// both find none pending.
    pub async fn request_key_change_with(
        &self,
        username: &str,
        key: &SshPublicKey,
        claimed_email: Option<&str>,
        reason: Option<&str>,
        actor: &Actor,
    ) -> std::result::Result<KeyChange, UserError> {
        let (u, key, actor) = (
            username.to_string(),
            key.as_str().to_string(),
            actor.clone(),
        );
        let claimed = claimed_email.map(str::to_string);
        let reason = reason.map(str::to_string);
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let row = user_row_locked(tx, "status, email", &u).await?;
                    let Some(row) = row else {
                        return Err(UserError::NotFound(u));
                    };
                    let email = row.text("email")?;
                    if let Some(claimed) = &claimed {
                        let status = row.text("status")?;
                        let holds_key = status == "active" || status == "disabled";
                        if !holds_key || email.is_empty() || !email.eq_ignore_ascii_case(claimed) {
                            return Err(UserError::NotFound(u));
                        }
                    }
                    let pending = tx
                        .query_one(&stmt!(
                            "SELECT COUNT(*) FROM key_changes
                             WHERE username = $1 AND status = 'pending'",
                            u.as_str()
                        ))
                        .await?
                        .first_int()?
                        .unwrap_or(0);
                    if pending > 0 {
                        return Err(UserError::State(format!(
                            "user {u} already has a key change waiting for an admin"
                        )));
                    }
                    let row = tx
                        .query_one(&stmt!(
                            "INSERT INTO key_changes (username, public_key, status, created_at,
                                email, reason)
                             VALUES ($1, $2, 'pending', $3, $4, $5) RETURNING *",
                            u.as_str(),
                            key,
                            now_ms(),
                            email.as_str(),
                            reason.as_deref(),
                        ))
                        .await?;
                    let detail = claimed.is_some().then_some("without a key (email checked)");
                    tx.exec(&audit_stmt(&actor, "key.request", &u, "ok", detail))
                        .await?;
                    Ok(key_change_from(&row)?)
                })
            })
            .await
    }

    /// Key changes of `username` (newest first), or all pending ones when `None`.
    pub async fn key_changes(&self, username: Option<&str>) -> Result<Vec<KeyChange>> {
        let s = stmt!(
            "SELECT * FROM key_changes
             WHERE (CAST($1 AS TEXT) IS NULL AND status = 'pending') OR username = $1
             ORDER BY id DESC",
            username,
        );
        self.key_changes_of(s).await
    }

    /// One page of pending key changes, newest first: at most `limit` older than id `after`.
    pub async fn key_changes_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<KeyChange>> {
        let mut f = Filter::default();
        f.and("status = 'pending'")
            .given(after, |p| format!("id < {p}"));
        let s = f.page("SELECT * FROM key_changes", "id DESC", limit);
        self.key_changes_of(s).await
    }

    async fn key_changes_of(&self, s: Stmt) -> Result<Vec<KeyChange>> {
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query(&s).await?.iter().map(key_change_from).collect() })
            })
            .await
    }

    /// Approves (replacing the user's key) or rejects the pending key change of `username`.
    pub async fn decide_key_change(
        &self,
        username: &Username,
        approve: bool,
        reason: Option<&str>,
        actor: &Actor,
    ) -> std::result::Result<KeyChange, UserError> {
        let (u, actor) = (username.to_string(), actor.clone());
        let reason = reason.map(str::to_string);
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let now = now_ms();
                    let status = if approve { "approved" } else { "rejected" };
                    let row = tx
                        .query_opt(&stmt!(
                            "UPDATE key_changes SET status = $2, processed_by = $3,
                             processed_at = $4, reject_reason = $5
                             WHERE username = $1 AND status = 'pending' RETURNING *",
                            u.as_str(),
                            status,
                            actor.name.as_str(),
                            now,
                            reason.as_deref(),
                        ))
                        .await?
                        .ok_or_else(|| {
                            UserError::State(format!("user {u} has no pending key change"))
                        })?;
                    let kc = key_change_from(&row)?;
                    let mut stmts = vec![];
                    if approve {
                        stmts.push(stmt!(
                            "UPDATE users SET public_key = $2, updated_at = $3 WHERE username = $1",
                            u.as_str(),
                            kc.public_key.as_str(),
                            now,
                        ));
                    }
                    let action = if approve { "key.approve" } else { "key.reject" };
                    stmts.push(audit_stmt(&actor, action, &u, "ok", reason.as_deref()));
                    tx.run(&stmts).await?;
                    Ok(kc)
                })
            })
            .await
    }

    /// Takes back the approval of key change `id` whose key could not be installed: the change
    /// is pending again and the user keeps `old_key`.
    pub async fn undo_key_approval(
        &self,
        username: &Username,
        id: i64,
        old_key: &str,
        reason: &str,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let u = username.as_str();
        let stmts = [
            stmt!(
                "UPDATE key_changes SET status = 'pending', processed_by = NULL,
                 processed_at = NULL, reject_reason = NULL WHERE id = $1 AND username = $2",
                id,
                u,
            ),
            stmt!(
                "UPDATE users SET public_key = $2, updated_at = $3 WHERE username = $1",
                u,
                old_key,
                now_ms(),
            ),
            audit_stmt(actor, "key.approve", u, "failed", Some(reason)),
        ];
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    tx.run(&stmts).await?;
                    Ok(())
                })
            })
            .await
    }
}
