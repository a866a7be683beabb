//! An admin's changes to existing accounts: disable/enable, quota, delete, and the uid of the
//! Unix account Basphere made.

use super::{UserError, user_row_locked};
use crate::audit::audit_stmt;
use crate::db::stmt;
use crate::{Actor, Result, Store, now_ms};
use basphere_core::{Quota, UserStatus, Username};

impl Store {
    /// Sets an active user disabled, or a disabled one active.
    pub async fn set_disabled(
        &self,
        username: &Username,
        disabled: bool,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let (from, to, action) = if disabled {
            (UserStatus::Active, UserStatus::Disabled, "user.disable")
        } else {
            (UserStatus::Disabled, UserStatus::Active, "user.enable")
        };
        let (u, actor) = (username.to_string(), actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE users SET status = $3, updated_at = $4
                             WHERE username = $1 AND status = $2",
                            u.as_str(),
                            from.as_str(),
                            to.as_str(),
                            now_ms(),
                        ))
                        .await?;
                    if n == 0 {
                        return Err(UserError::State(format!(
                            "user {u} is not {from}; nothing changed"
                        )));
                    }
                    tx.exec(&audit_stmt(&actor, action, &u, "ok", None)).await?;
                    Ok(())
                })
            })
            .await
    }

    /// Replaces a user's quota.
    pub async fn set_quota(
        &self,
        username: &Username,
        q: &Quota,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let (u, q, actor) = (username.to_string(), *q, actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE users SET max_vms = $2, max_clusters = $3, max_ips = $4,
                             max_vcpus = $5, max_memory_mib = $6, max_disk_gib = $7,
                             updated_at = $8
                             WHERE username = $1",
                            u.as_str(),
                            q.max_vms,
                            q.max_clusters,
                            q.max_ips,
                            q.max_vcpus,
                            q.max_memory_mib.map(|v| v as i64),
                            q.max_disk_gib.map(|v| v as i64),
                            now_ms(),
                        ))
                        .await?;
                    if n == 0 {
                        return Err(UserError::NotFound(u));
                    }
                    let detail = serde_json::to_string(&q).unwrap_or_default();
                    tx.exec(&audit_stmt(&actor, "user.quota", &u, "ok", Some(&detail)))
                        .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Removes a user that holds no VMs. With `purge`, their registrations go too.
    ///
    /// The user's row is locked first (PostgreSQL), so no replica admits a VM for them between
    /// the count and the delete.
    pub async fn delete_user(
        &self,
        username: &Username,
        purge: bool,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let (u, actor) = (username.to_string(), actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    user_row_locked(tx, "username", &u).await?;
                    let vms = tx
                        .query_one(&stmt!(
                            "SELECT COUNT(*) FROM vms WHERE owner = $1",
                            u.as_str()
                        ))
                        .await?
                        .first_int()?
                        .unwrap_or(0);
                    if vms > 0 {
                        return Err(UserError::State(format!(
                            "user {u} still has {vms} VM(s); they are being deleted first"
                        )));
                    }
                    // The event log, the steps and the edges have no foreign key on
                    // PostgreSQL (the store writes them with their workflows, thousands a
                    // second): their rows go first, by hand.
                    let of_user = |sql: &str| {
                        stmt!(
                            format!("{sql} IN (SELECT id FROM workflows WHERE owner = $1)"),
                            u.as_str()
                        )
                    };
                    tx.run(&[
                        of_user("DELETE FROM workflow_events WHERE workflow_id"),
                        of_user("DELETE FROM workflow_steps WHERE workflow_id"),
                        of_user("DELETE FROM workflow_deps WHERE workflow_id"),
                        of_user("DELETE FROM workflow_deps WHERE depends_on"),
                        stmt!("DELETE FROM workflows WHERE owner = $1", u.as_str()),
                    ])
                    .await?;
                    let n = tx
                        .exec(&stmt!(
                            "DELETE FROM users WHERE username = $1 AND role <> 'admin'",
                            u.as_str()
                        ))
                        .await?;
                    if n == 0 {
                        return Err(UserError::NotFound(u));
                    }
                    let mut stmts = vec![];
                    if purge {
                        stmts.push(stmt!(
                            "DELETE FROM registrations WHERE username = $1",
                            u.as_str()
                        ));
                    }
                    let action = if purge { "user.purge" } else { "user.delete" };
                    stmts.push(audit_stmt(&actor, action, &u, "ok", None));
                    tx.run(&stmts).await?;
                    Ok(())
                })
            })
            .await
    }

    /// Records the uid of the Unix account Basphere created for `username`.
    pub async fn set_unix_uid(&self, username: &Username, uid: u32) -> Result<()> {
        let s = stmt!(
            "UPDATE users SET unix_account = 1, unix_uid = $2, updated_at = $3
             WHERE username = $1",
            username.as_str(),
            uid,
            now_ms(),
        );
        self.db
            .write(move |tx| Box::pin(async move { tx.exec(&s).await.map(drop) }))
            .await
    }
}
