//! Joining: the first admin, registrations, and an admin's approval or rejection of them.

use super::{
    ApproveOutcome, NewRegistration, NewUserRow, Registration, UserError, insert_user,
    lowest_free_block, user_in, user_row_locked,
};
use crate::audit::audit_stmt;
use crate::db::{Cols, Dialect, Filter, Row, stmt};
use crate::{Actor, Result, Store, hash_secret, now_ms, parse, random_hex};
use basphere_core::{NetworkPool, Quota, Role, UserStatus, Username};

fn registration_from(r: &Row) -> Result<Registration> {
    Ok(Registration {
        id: r.int("id")?,
        username: r.text("username")?,
        email: r.text("email")?,
        team: r.text("team")?,
        public_key: r.text("public_key")?,
        status: parse("registrations.status", &r.text("status")?)?,
        created_at: r.int("created_at")?,
        processed_by: r.opt_text("processed_by")?,
        processed_at: r.opt_int("processed_at")?,
        reject_reason: r.opt_text("reject_reason")?,
    })
}

impl Store {
    /// Creates the first admin if no admin exists, with the pool's lowest free IP block so the
    /// admin can make VMs too; returns whether one was made.
    ///
    /// On PostgreSQL the IP-block lock is taken before counting admins, so replicas starting
    /// together make one admin.
    pub async fn ensure_admin(
        &self,
        username: &Username,
        quota: &Quota,
        pool: &NetworkPool,
    ) -> Result<bool> {
        let (u, quota, blocks) = (username.to_string(), *quota, pool.block_count());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let block = lowest_free_block(tx, blocks).await?;
                    let admins = tx
                        .query_one(&stmt!("SELECT COUNT(*) FROM users WHERE role = 'admin'"))
                        .await?
                        .first_int()?;
                    if admins.unwrap_or(0) > 0 {
                        return Ok(false);
                    }
                    let row = NewUserRow {
                        username: &u,
                        email: "",
                        team: "admins",
                        public_key: "",
                        role: Role::Admin,
                        status: UserStatus::Active,
                        quota: &quota,
                        ip_block: block,
                    };
                    let init = Actor::new("basphere", "init");
                    tx.run(&[
                        insert_user(row, false),
                        audit_stmt(&init, "user.create_admin", &u, "ok", None),
                    ])
                    .await?;
                    Ok(true)
                })
            })
            .await
    }

    /// Records a registration and a pending user. A rejected username may register again, but
    /// only with the email it was first registered with (otherwise an admin purges it first).
    ///
    /// Across replicas: an existing user's row is locked before it is judged, and a new user
    /// is inserted `ON CONFLICT DO NOTHING`, so of several registrations of one new name
    /// exactly one inserts it and the others are told it is taken.
    pub async fn register(
        &self,
        reg: &NewRegistration,
        quota: &Quota,
        actor: &Actor,
    ) -> std::result::Result<Registration, UserError> {
        let (reg, quota, actor) = (reg.clone(), *quota, actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let name = reg.username.as_str();
                    let taken = || UserError::Taken(reg.username.to_string());
                    let now = now_ms();
                    let existing = user_row_locked(tx, "status, email", name).await?;
                    // One pending registration per email, exact under concurrency: the write
                    // thread serializes SQLite; on PostgreSQL registrations of one email take
                    // one transaction-level advisory lock (keyed by a hash of the email).
                    if tx.dialect() == Dialect::Postgres {
                        tx.query(&stmt!(
                            "SELECT pg_advisory_xact_lock(hashtextextended(LOWER($1), 4242000005))",
                            reg.email.as_str()
                        ))
                        .await?;
                    }
                    if let Some(other) = tx
                        .query_opt(&stmt!(
                            "SELECT username FROM registrations
                             WHERE status = 'pending' AND LOWER(email) = LOWER($1)
                               AND username <> $2
                             ORDER BY id LIMIT 1",
                            reg.email.as_str(),
                            name,
                        ))
                        .await?
                    {
                        return Err(UserError::State(format!(
                            "a registration with email {} already waits for review (as {}); \
                             wait for the admin's decision, or register with another email",
                            reg.email,
                            other.text("username")?
                        )));
                    }
                    match existing {
                        Some(r) if r.text("status")? == "rejected" => {
                            if !r.text("email")?.eq_ignore_ascii_case(reg.email.as_str()) {
                                return Err(UserError::State(format!(
                                    "username {} was registered with another email and \
                                     rejected; only that email may register it again. Choose \
                                     another username, or ask an admin to purge it",
                                    reg.username
                                )));
                            }
                            tx.exec(&stmt!(
                                "UPDATE users SET email = $2, team = $3, public_key = $4,
                                 status = 'pending', updated_at = $5 WHERE username = $1",
                                name,
                                reg.email.as_str(),
                                reg.team.as_str(),
                                reg.public_key.as_str(),
                                now,
                            ))
                            .await?;
                        }
                        Some(_) => return Err(taken()),
                        None => {
                            let row = NewUserRow {
                                username: name,
                                email: reg.email.as_str(),
                                team: reg.team.as_str(),
                                public_key: reg.public_key.as_str(),
                                role: Role::User,
                                status: UserStatus::Pending,
                                quota: &quota,
                                ip_block: None,
                            };
                            if tx.exec(&insert_user(row, true)).await? == 0 {
                                return Err(taken());
                            }
                        }
                    }
                    let row = tx
                        .query_one(&stmt!(
                            "INSERT INTO registrations (username, email, team, public_key,
                                status, created_at)
                             VALUES ($1, $2, $3, $4, 'pending', $5) RETURNING *",
                            name,
                            reg.email.as_str(),
                            reg.team.as_str(),
                            reg.public_key.as_str(),
                            now,
                        ))
                        .await?;
                    tx.exec(&audit_stmt(&actor, "user.register", name, "ok", None))
                        .await?;
                    Ok(registration_from(&row)?)
                })
            })
            .await
    }

    /// One page of pending registrations, newest first: at most `limit` older than id `after`.
    pub async fn pending_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<Registration>> {
        let mut f = Filter::default();
        f.and("status = 'pending'")
            .given(after, |p| format!("id < {p}"));
        let s = f.page("SELECT * FROM registrations", "id DESC", limit);
        self.registrations_of(s).await
    }

    /// The registrations of `username` (newest first), or all pending ones when `None`.
    pub async fn registrations(&self, username: Option<&str>) -> Result<Vec<Registration>> {
        let s = stmt!(
            "SELECT * FROM registrations
             WHERE (CAST($1 AS TEXT) IS NULL AND status = 'pending') OR username = $1
             ORDER BY id DESC",
            username,
        );
        self.registrations_of(s).await
    }

    async fn registrations_of(&self, s: crate::db::Stmt) -> Result<Vec<Registration>> {
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query(&s).await?.iter().map(registration_from).collect() })
            })
            .await
    }

    /// Approves a pending registration: the user becomes active and gets the lowest free IP
    /// block of `pool`. With `enrollment_ttl_ms`, also mints a one-time enrollment code.
    ///
    /// On PostgreSQL the IP-block advisory lock ([`super::IP_BLOCK_LOCK`]) is taken first, so
    /// approvals on several replicas hand out distinct blocks; the user's row is then locked
    /// so a concurrent reject or second approval sees the outcome.
    pub async fn approve(
        &self,
        username: &Username,
        pool: &NetworkPool,
        unix_account: bool,
        enrollment_ttl_ms: Option<i64>,
        actor: &Actor,
    ) -> std::result::Result<ApproveOutcome, UserError> {
        let (u, blocks, actor) = (username.to_string(), pool.block_count(), actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let block = lowest_free_block(tx, blocks).await?;
                    let status = match user_row_locked(tx, "status", &u).await? {
                        None => return Err(UserError::NotFound(u)),
                        Some(r) => r.text("status")?,
                    };
                    if status != "pending" {
                        return Err(UserError::State(format!(
                            "user {u} is {status}, not pending; nothing to approve"
                        )));
                    }
                    let block = block.ok_or(UserError::PoolFull)?;
                    let now = now_ms();
                    let mut stmts = vec![
                        stmt!(
                            "UPDATE users SET status = 'active', ip_block = $2, unix_account = $3,
                             updated_at = $4 WHERE username = $1",
                            u.as_str(),
                            block,
                            unix_account,
                            now,
                        ),
                        stmt!(
                            "UPDATE registrations SET status = 'approved', processed_by = $2,
                             processed_at = $3 WHERE username = $1 AND status = 'pending'",
                            u.as_str(),
                            actor.name.as_str(),
                            now,
                        ),
                    ];
                    let enrollment_code = enrollment_ttl_ms.map(|ttl| {
                        let code = format!("bspe_{}", random_hex(16));
                        stmts.push(stmt!(
                            "INSERT INTO enrollment_codes (hash, username, expires_at)
                             VALUES ($1, $2, $3)",
                            hash_secret(&code),
                            u.as_str(),
                            now + ttl,
                        ));
                        code
                    });
                    let detail = format!("ip_block={block}");
                    stmts.push(audit_stmt(&actor, "user.approve", &u, "ok", Some(&detail)));
                    tx.run(&stmts).await?;
                    let user = user_in(tx, &u)
                        .await?
                        .ok_or_else(|| UserError::NotFound(u.clone()))?;
                    Ok(ApproveOutcome {
                        user,
                        enrollment_code,
                    })
                })
            })
            .await
    }

    /// Rejects a pending registration with a reason.
    pub async fn reject(
        &self,
        username: &Username,
        reason: &str,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let (u, reason, actor) = (username.to_string(), reason.to_string(), actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let now = now_ms();
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE users SET status = 'rejected', updated_at = $2
                             WHERE username = $1 AND status = 'pending'",
                            u.as_str(),
                            now,
                        ))
                        .await?;
                    if n == 0 {
                        return Err(match user_in(tx, &u).await? {
                            None => UserError::NotFound(u),
                            Some(user) => UserError::State(format!(
                                "user {u} is {}, not pending; nothing to reject",
                                user.status
                            )),
                        });
                    }
                    tx.run(&[
                        stmt!(
                            "UPDATE registrations SET status = 'rejected', processed_by = $2,
                             processed_at = $3, reject_reason = $4
                             WHERE username = $1 AND status = 'pending'",
                            u.as_str(),
                            actor.name.as_str(),
                            now,
                            reason.as_str(),
                        ),
                        audit_stmt(&actor, "user.reject", &u, "ok", Some(&reason)),
                    ])
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    /// Takes back an approval whose Unix account could not be made: the user is pending again,
    /// without an IP block, and the audit log says why.
    pub async fn undo_approval(
        &self,
        username: &Username,
        reason: &str,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let (u, reason, actor) = (username.to_string(), reason.to_string(), actor.clone());
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let n = tx
                        .exec(&stmt!(
                            "UPDATE users SET status = 'pending', ip_block = NULL,
                             unix_account = 0, unix_uid = NULL, updated_at = $2
                             WHERE username = $1 AND status = 'active'",
                            u.as_str(),
                            now_ms(),
                        ))
                        .await?;
                    if n == 0 {
                        return Err(UserError::State(format!(
                            "user {u} is not active; no approval to take back"
                        )));
                    }
                    tx.run(&[
                        stmt!(
                            "UPDATE registrations SET status = 'pending', processed_by = NULL,
                             processed_at = NULL
                             WHERE id = (SELECT MAX(id) FROM registrations WHERE username = $1
                                         AND status = 'approved')",
                            u.as_str(),
                        ),
                        stmt!(
                            "DELETE FROM enrollment_codes WHERE username = $1 AND used_at IS NULL",
                            u.as_str(),
                        ),
                        audit_stmt(&actor, "user.approve", &u, "failed", Some(&reason)),
                    ])
                    .await?;
                    Ok(())
                })
            })
            .await
    }
}
