use crate::audit::record;
use crate::{Actor, Result, Store, StoreError, hash_secret, now_ms, parse, random_hex};
use basphere_core::{
    Email, NetworkPool, Quota, RegistrationStatus, Role, SshPublicKey, Team, UserStatus, Username,
};
use serde::Serialize;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

/// A Basphere account.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub username: Username,
    pub email: String,
    pub team: String,
    pub public_key: String,
    pub role: Role,
    pub status: UserStatus,
    pub quota: Quota,
    /// Index of the user's block in the network pool, once approved.
    pub ip_block: Option<u32>,
    /// Whether Basphere made a Unix account for this user on the bastion.
    pub unix_account: bool,
    /// The uid of that account, recorded when Basphere created it (absent for accounts of
    /// installs older than schema v5).
    #[serde(skip)]
    pub unix_uid: Option<u32>,
    pub created_at: i64,
}

/// A request to join, as submitted.
#[derive(Debug, Clone)]
pub struct NewRegistration {
    pub username: Username,
    pub email: Email,
    pub team: Team,
    pub public_key: SshPublicKey,
}

/// A registration and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub team: String,
    pub public_key: String,
    pub status: RegistrationStatus,
    pub created_at: i64,
    pub processed_by: Option<String>,
    pub processed_at: Option<i64>,
    pub reject_reason: Option<String>,
}

/// A request to replace a user's SSH key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyChange {
    pub id: i64,
    pub username: String,
    pub public_key: String,
    pub status: RegistrationStatus,
    pub created_at: i64,
    pub processed_by: Option<String>,
    pub processed_at: Option<i64>,
    pub reject_reason: Option<String>,
}

/// An API token as listed (never the secret).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
}

/// The user a presented token belongs to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub user: User,
    pub token_id: String,
}

/// What approving a registration produced.
#[derive(Debug, Clone, Serialize)]
pub struct ApproveOutcome {
    pub user: User,
    /// One-time enrollment code, when the caller asked for one (shown once, stored hashed).
    pub enrollment_code: Option<String>,
}

const USER_COLS: &str = "username, email, team, public_key, role, status, max_vms, max_clusters, \
     max_ips, max_vcpus, max_memory_mib, ip_block, unix_account, unix_uid, created_at";

fn user_from(r: &SqliteRow) -> Result<User> {
    Ok(User {
        username: parse("users.username", r.try_get("username")?)?,
        email: r.try_get("email")?,
        team: r.try_get("team")?,
        public_key: r.try_get("public_key")?,
        role: parse("users.role", r.try_get("role")?)?,
        status: parse("users.status", r.try_get("status")?)?,
        quota: Quota {
            max_vms: r.try_get::<i64, _>("max_vms")? as u32,
            max_clusters: r.try_get::<i64, _>("max_clusters")? as u32,
            max_ips: r.try_get::<i64, _>("max_ips")? as u32,
            max_vcpus: r.try_get::<Option<i64>, _>("max_vcpus")?.map(|v| v as u32),
            max_memory_mib: r
                .try_get::<Option<i64>, _>("max_memory_mib")?
                .map(|v| v as u64),
        },
        ip_block: r.try_get::<Option<i64>, _>("ip_block")?.map(|v| v as u32),
        unix_account: r.try_get::<i64, _>("unix_account")? != 0,
        unix_uid: r.try_get::<Option<i64>, _>("unix_uid")?.map(|v| v as u32),
        created_at: r.try_get("created_at")?,
    })
}

fn registration_from(r: &SqliteRow) -> Result<Registration> {
    Ok(Registration {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        email: r.try_get("email")?,
        team: r.try_get("team")?,
        public_key: r.try_get("public_key")?,
        status: parse("registrations.status", r.try_get("status")?)?,
        created_at: r.try_get("created_at")?,
        processed_by: r.try_get("processed_by")?,
        processed_at: r.try_get("processed_at")?,
        reject_reason: r.try_get("reject_reason")?,
    })
}

fn token_info_from(r: &SqliteRow) -> Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        expires_at: r.try_get("expires_at")?,
    })
}

fn key_change_from(r: &SqliteRow) -> Result<KeyChange> {
    Ok(KeyChange {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        public_key: r.try_get("public_key")?,
        status: parse("key_changes.status", r.try_get("status")?)?,
        created_at: r.try_get("created_at")?,
        processed_by: r.try_get("processed_by")?,
        processed_at: r.try_get("processed_at")?,
        reject_reason: r.try_get("reject_reason")?,
    })
}

/// The lowest block of `pool` no user holds yet.
async fn lowest_free_block(conn: &mut SqliteConnection, pool: &NetworkPool) -> Result<Option<i64>> {
    let used: Vec<i64> = sqlx::query_scalar(
        "SELECT ip_block FROM users WHERE ip_block IS NOT NULL ORDER BY ip_block",
    )
    .fetch_all(conn)
    .await?;
    Ok((0..i64::from(pool.block_count())).find(|i| used.binary_search(i).is_err()))
}

/// A users row to insert.
struct NewUserRow<'a> {
    username: &'a str,
    email: &'a str,
    team: &'a str,
    public_key: &'a str,
    role: &'a str,
    status: &'a str,
    quota: &'a Quota,
    ip_block: Option<i64>,
}

async fn insert_user(conn: &mut SqliteConnection, u: NewUserRow<'_>) -> Result<()> {
    sqlx::query(
        "INSERT INTO users (username, email, team, public_key, role, status, max_vms,
            max_clusters, max_ips, max_vcpus, max_memory_mib, created_at, updated_at, ip_block)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13)",
    )
    .bind(u.username)
    .bind(u.email)
    .bind(u.team)
    .bind(u.public_key)
    .bind(u.role)
    .bind(u.status)
    .bind(i64::from(u.quota.max_vms))
    .bind(i64::from(u.quota.max_clusters))
    .bind(i64::from(u.quota.max_ips))
    .bind(u.quota.max_vcpus.map(i64::from))
    .bind(u.quota.max_memory_mib.map(|v| v as i64))
    .bind(now_ms())
    .bind(u.ip_block)
    .execute(conn)
    .await?;
    Ok(())
}

/// Business-rule refusals of user operations.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("username {0} is already taken")]
    Taken(String),
    #[error("user {0} not found")]
    NotFound(String),
    #[error("{0}")]
    State(String),
    #[error("the network pool has no free block of addresses left; enlarge network.cidr")]
    PoolFull,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        UserError::Store(e.into())
    }
}

impl Store {
    /// Creates the first admin if no admin exists, with the pool's lowest free IP block so the
    /// admin can make VMs too; returns whether one was made.
    pub async fn ensure_admin(
        &self,
        username: &Username,
        quota: &Quota,
        pool: &NetworkPool,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin'")
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            return Ok(false);
        }
        let block = lowest_free_block(&mut tx, pool).await?;
        insert_user(
            &mut tx,
            NewUserRow {
                username: username.as_str(),
                email: "",
                team: "admins",
                public_key: "",
                role: Role::Admin.as_str(),
                status: UserStatus::Active.as_str(),
                quota,
                ip_block: block,
            },
        )
        .await?;
        record(
            &mut tx,
            &Actor::new("basphere", "init"),
            "user.create_admin",
            username.as_str(),
            "ok",
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a registration and a pending user. A rejected username may register again, but
    /// only with the email it was first registered with (otherwise an admin purges it first).
    pub async fn register(
        &self,
        reg: &NewRegistration,
        quota: &Quota,
        actor: &Actor,
    ) -> std::result::Result<Registration, UserError> {
        let mut tx = self.write().await?;
        let existing: Option<(String, String)> =
            sqlx::query_as("SELECT status, email FROM users WHERE username = $1")
                .bind(reg.username.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let now = now_ms();
        match existing.as_ref().map(|(s, e)| (s.as_str(), e)) {
            Some(("rejected", email)) if !email.eq_ignore_ascii_case(reg.email.as_str()) => {
                return Err(UserError::State(format!(
                    "username {} was registered with another email and rejected; only that \
                     email may register it again. Choose another username, or ask an admin to \
                     purge it",
                    reg.username
                )));
            }
            Some(("rejected", _)) => {
                sqlx::query(
                    "UPDATE users SET email = $2, team = $3, public_key = $4, status = 'pending',
                     updated_at = $5 WHERE username = $1",
                )
                .bind(reg.username.as_str())
                .bind(reg.email.as_str())
                .bind(reg.team.as_str())
                .bind(reg.public_key.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            Some(_) => return Err(UserError::Taken(reg.username.to_string())),
            None => {
                insert_user(
                    &mut tx,
                    NewUserRow {
                        username: reg.username.as_str(),
                        email: reg.email.as_str(),
                        team: reg.team.as_str(),
                        public_key: reg.public_key.as_str(),
                        role: Role::User.as_str(),
                        status: UserStatus::Pending.as_str(),
                        quota,
                        ip_block: None,
                    },
                )
                .await?;
            }
        }
        let row = sqlx::query(
            "INSERT INTO registrations (username, email, team, public_key, status, created_at)
             VALUES ($1, $2, $3, $4, 'pending', $5) RETURNING *",
        )
        .bind(reg.username.as_str())
        .bind(reg.email.as_str())
        .bind(reg.team.as_str())
        .bind(reg.public_key.as_str())
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            "user.register",
            reg.username.as_str(),
            "ok",
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(registration_from(&row)?)
    }

    /// One user, if it exists.
    pub async fn user(&self, username: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE username = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(username)
            .fetch_optional(&self.lg()?.pool)
            .await?;
        row.as_ref().map(user_from).transpose()
    }

    /// All users, optionally only those in `status`, by username.
    pub async fn users(&self, status: Option<UserStatus>) -> Result<Vec<User>> {
        self.users_page(status, None, i64::MAX).await
    }

    /// One page of users with `status` (or all), by username: at most `limit` after `after`.
    pub async fn users_page(
        &self,
        status: Option<UserStatus>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<User>> {
        let sql = format!(
            "SELECT {USER_COLS} FROM users WHERE ($1 IS NULL OR status = $1)
               AND ($2 IS NULL OR username > $2) ORDER BY username LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(status.map(|s| s.as_str()))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.lg()?.pool)
            .await?;
        rows.iter().map(user_from).collect()
    }

    /// One page of pending registrations, newest first: at most `limit` older than id `after`.
    pub async fn pending_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<Registration>> {
        let rows = sqlx::query(
            "SELECT * FROM registrations WHERE status = 'pending' AND ($1 IS NULL OR id < $1)
             ORDER BY id DESC LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(registration_from).collect()
    }

    /// The registrations of `username` (newest first), or all pending ones when `None`.
    pub async fn registrations(&self, username: Option<&str>) -> Result<Vec<Registration>> {
        let rows = sqlx::query(
            "SELECT * FROM registrations
             WHERE ($1 IS NULL AND status = 'pending') OR username = $1 ORDER BY id DESC",
        )
        .bind(username)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(registration_from).collect()
    }

    /// Approves a pending registration: the user becomes active and gets the lowest free IP
    /// block of `pool`. With `enrollment_ttl_ms`, also mints a one-time enrollment code.
    pub async fn approve(
        &self,
        username: &Username,
        pool: &NetworkPool,
        unix_account: bool,
        enrollment_ttl_ms: Option<i64>,
        actor: &Actor,
    ) -> std::result::Result<ApproveOutcome, UserError> {
        let mut tx = self.write().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM users WHERE username = $1")
                .bind(username.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        match status.as_deref() {
            None => return Err(UserError::NotFound(username.to_string())),
            Some("pending") => {}
            Some(s) => {
                return Err(UserError::State(format!(
                    "user {username} is {s}, not pending; nothing to approve"
                )));
            }
        }
        let block = lowest_free_block(&mut tx, pool)
            .await?
            .ok_or(UserError::PoolFull)?;
        let now = now_ms();
        sqlx::query(
            "UPDATE users SET status = 'active', ip_block = $2, unix_account = $3, updated_at = $4
             WHERE username = $1",
        )
        .bind(username.as_str())
        .bind(block)
        .bind(i64::from(unix_account))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE registrations SET status = 'approved', processed_by = $2, processed_at = $3
             WHERE username = $1 AND status = 'pending'",
        )
        .bind(username.as_str())
        .bind(&actor.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let enrollment_code = match enrollment_ttl_ms {
            Some(ttl) => {
                let code = format!("bspe_{}", random_hex(16));
                sqlx::query(
                    "INSERT INTO enrollment_codes (hash, username, expires_at) VALUES ($1, $2, $3)",
                )
                .bind(hash_secret(&code))
                .bind(username.as_str())
                .bind(now + ttl)
                .execute(&mut *tx)
                .await?;
                Some(code)
            }
            None => None,
        };
        let detail = format!("ip_block={block}");
        record(
            &mut tx,
            actor,
            "user.approve",
            username.as_str(),
            "ok",
            Some(&detail),
        )
        .await?;
        tx.commit().await?;
        let user = self
            .user(username.as_str())
            .await?
            .ok_or_else(|| UserError::NotFound(username.to_string()))?;
        Ok(ApproveOutcome {
            user,
            enrollment_code,
        })
    }

    /// Rejects a pending registration with a reason.
    pub async fn reject(
        &self,
        username: &Username,
        reason: &str,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let mut tx = self.write().await?;
        let now = now_ms();
        let n = sqlx::query(
            "UPDATE users SET status = 'rejected', updated_at = $2 WHERE username = $1 AND status = 'pending'",
        )
        .bind(username.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(match self.user(username.as_str()).await? {
                None => UserError::NotFound(username.to_string()),
                Some(u) => UserError::State(format!(
                    "user {username} is {}, not pending; nothing to reject",
                    u.status
                )),
            });
        }
        sqlx::query(
            "UPDATE registrations SET status = 'rejected', processed_by = $2, processed_at = $3,
             reject_reason = $4 WHERE username = $1 AND status = 'pending'",
        )
        .bind(username.as_str())
        .bind(&actor.name)
        .bind(now)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            "user.reject",
            username.as_str(),
            "ok",
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

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
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE users SET status = $3, updated_at = $4 WHERE username = $1 AND status = $2",
        )
        .bind(username.as_str())
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(UserError::State(format!(
                "user {username} is not {from}; nothing changed"
            )));
        }
        record(&mut tx, actor, action, username.as_str(), "ok", None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a user's quota.
    pub async fn set_quota(
        &self,
        username: &Username,
        q: &Quota,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE users SET max_vms = $2, max_clusters = $3, max_ips = $4, max_vcpus = $5,
             max_memory_mib = $6, updated_at = $7 WHERE username = $1",
        )
        .bind(username.as_str())
        .bind(i64::from(q.max_vms))
        .bind(i64::from(q.max_clusters))
        .bind(i64::from(q.max_ips))
        .bind(q.max_vcpus.map(i64::from))
        .bind(q.max_memory_mib.map(|v| v as i64))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(UserError::NotFound(username.to_string()));
        }
        let detail = serde_json::to_string(q).unwrap_or_default();
        record(
            &mut tx,
            actor,
            "user.quota",
            username.as_str(),
            "ok",
            Some(&detail),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a user that holds no VMs. With `purge`, their registrations go too.
    pub async fn delete_user(
        &self,
        username: &Username,
        purge: bool,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let mut tx = self.write().await?;
        let vms: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE owner = $1")
            .bind(username.as_str())
            .fetch_one(&mut *tx)
            .await?;
        if vms > 0 {
            return Err(UserError::State(format!(
                "user {username} still has {vms} VM(s); they are being deleted first"
            )));
        }
        sqlx::query("DELETE FROM workflows WHERE owner = $1")
            .bind(username.as_str())
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query("DELETE FROM users WHERE username = $1 AND role <> 'admin'")
            .bind(username.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(UserError::NotFound(username.to_string()));
        }
        if purge {
            sqlx::query("DELETE FROM registrations WHERE username = $1")
                .bind(username.as_str())
                .execute(&mut *tx)
                .await?;
        }
        let action = if purge { "user.purge" } else { "user.delete" };
        record(&mut tx, actor, action, username.as_str(), "ok", None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Files a key-change request for an active user.
    pub async fn request_key_change(
        &self,
        username: &Username,
        key: &SshPublicKey,
        actor: &Actor,
    ) -> std::result::Result<KeyChange, UserError> {
        let mut tx = self.write().await?;
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM key_changes WHERE username = $1 AND status = 'pending'",
        )
        .bind(username.as_str())
        .fetch_one(&mut *tx)
        .await?;
        if pending > 0 {
            return Err(UserError::State(format!(
                "user {username} already has a key change waiting for an admin"
            )));
        }
        let row = sqlx::query(
            "INSERT INTO key_changes (username, public_key, status, created_at)
             VALUES ($1, $2, 'pending', $3) RETURNING *",
        )
        .bind(username.as_str())
        .bind(key.as_str())
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await?;
        record(&mut tx, actor, "key.request", username.as_str(), "ok", None).await?;
        tx.commit().await?;
        Ok(key_change_from(&row)?)
    }

    /// Key changes of `username` (newest first), or all pending ones when `None`.
    pub async fn key_changes(&self, username: Option<&str>) -> Result<Vec<KeyChange>> {
        let rows = sqlx::query(
            "SELECT * FROM key_changes
             WHERE ($1 IS NULL AND status = 'pending') OR username = $1 ORDER BY id DESC",
        )
        .bind(username)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(key_change_from).collect()
    }

    /// One page of pending key changes, newest first: at most `limit` older than id `after`.
    pub async fn key_changes_page(&self, after: Option<i64>, limit: i64) -> Result<Vec<KeyChange>> {
        let rows = sqlx::query(
            "SELECT * FROM key_changes WHERE status = 'pending' AND ($1 IS NULL OR id < $1)
             ORDER BY id DESC LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(key_change_from).collect()
    }

    /// Approves (replacing the user's key) or rejects the pending key change of `username`.
    pub async fn decide_key_change(
        &self,
        username: &Username,
        approve: bool,
        reason: Option<&str>,
        actor: &Actor,
    ) -> std::result::Result<KeyChange, UserError> {
        let mut tx = self.write().await?;
        let now = now_ms();
        let status = if approve { "approved" } else { "rejected" };
        let row = sqlx::query(
            "UPDATE key_changes SET status = $2, processed_by = $3, processed_at = $4,
             reject_reason = $5 WHERE username = $1 AND status = 'pending' RETURNING *",
        )
        .bind(username.as_str())
        .bind(status)
        .bind(&actor.name)
        .bind(now)
        .bind(reason)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| UserError::State(format!("user {username} has no pending key change")))?;
        let kc = key_change_from(&row)?;
        if approve {
            sqlx::query("UPDATE users SET public_key = $2, updated_at = $3 WHERE username = $1")
                .bind(username.as_str())
                .bind(&kc.public_key)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        let action = if approve { "key.approve" } else { "key.reject" };
        record(&mut tx, actor, action, username.as_str(), "ok", reason).await?;
        tx.commit().await?;
        Ok(kc)
    }

    /// Mints an API token for `username`; returns its listing and the secret (shown once).
    pub async fn create_token(
        &self,
        username: &Username,
        name: &str,
        ttl_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<(TokenInfo, String)> {
        let id = random_hex(4);
        let secret = format!("bsp_{}", random_hex(32));
        let now = now_ms();
        let expires_at = ttl_ms.map(|t| now + t);
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO tokens (id, username, name, hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(username.as_str())
        .bind(name)
        .bind(hash_secret(&secret))
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            "token.create",
            username.as_str(),
            "ok",
            Some(&id),
        )
        .await?;
        tx.commit().await?;
        Ok((
            TokenInfo {
                id,
                name: name.to_string(),
                created_at: now,
                last_used_at: None,
                expires_at,
            },
            secret,
        ))
    }

    /// The tokens of `username`.
    pub async fn tokens(&self, username: &str) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at, expires_at FROM tokens
             WHERE username = $1 ORDER BY created_at",
        )
        .bind(username)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(token_info_from).collect()
    }

    /// One page of `username`'s tokens, by id: at most `limit` after id `after`.
    pub async fn tokens_page(
        &self,
        username: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, last_used_at, expires_at FROM tokens
             WHERE username = $1 AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3",
        )
        .bind(username)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(token_info_from).collect()
    }

    /// Revokes token `id` of `username`; false if there was none.
    pub async fn revoke_token(&self, username: &str, id: &str, actor: &Actor) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM tokens WHERE username = $1 AND id = $2")
            .bind(username)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            record(&mut tx, actor, "token.revoke", username, "ok", Some(id)).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    /// The owner of a presented token secret, if the token exists and has not expired.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenOwner>> {
        let hash = hash_secret(secret);
        let row = sqlx::query(
            "SELECT id, username, expires_at, last_used_at FROM tokens WHERE hash = $1",
        )
        .bind(&hash)
        .fetch_optional(&self.lg()?.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let now = now_ms();
        let expires_at: Option<i64> = row.try_get("expires_at")?;
        if expires_at.is_some_and(|e| e < now) {
            return Ok(None);
        }
        let id: String = row.try_get("id")?;
        let last: Option<i64> = row.try_get("last_used_at")?;
        if last.is_none_or(|l| now - l > 60_000) {
            sqlx::query("UPDATE tokens SET last_used_at = $2 WHERE id = $1")
                .bind(&id)
                .bind(now)
                .execute(&self.lg()?.pool)
                .await?;
        }
        let username: String = row.try_get("username")?;
        Ok(self
            .user(&username)
            .await?
            .map(|user| TokenOwner { user, token_id: id }))
    }

    /// Exchanges a one-time enrollment code of `username` for a new token.
    pub async fn enroll(
        &self,
        username: &Username,
        code: &str,
        actor: &Actor,
    ) -> Result<Option<(TokenInfo, String)>> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE enrollment_codes SET used_at = $3
             WHERE hash = $1 AND username = $2 AND used_at IS NULL AND expires_at >= $3",
        )
        .bind(hash_secret(code))
        .bind(username.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            drop(tx);
            self.audit(actor, "token.enroll", username.as_str(), "refused", None)
                .await?;
            return Ok(None);
        }
        tx.commit().await?;
        self.create_token(username, "enrollment", None, actor)
            .await
            .map(Some)
    }
}

/// Compensations for host actions that failed after the store had decided.
impl Store {
    /// Records the uid of the Unix account Basphere created for `username`.
    pub async fn set_unix_uid(&self, username: &Username, uid: u32) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE users SET unix_account = 1, unix_uid = $2, updated_at = $3 WHERE username = $1",
        )
        .bind(username.as_str())
        .bind(i64::from(uid))
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes back an approval whose Unix account could not be made: the user is pending again,
    /// without an IP block, and the audit log says why.
    pub async fn undo_approval(
        &self,
        username: &Username,
        reason: &str,
        actor: &Actor,
    ) -> std::result::Result<(), UserError> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE users SET status = 'pending', ip_block = NULL, unix_account = 0,
             unix_uid = NULL, updated_at = $2 WHERE username = $1 AND status = 'active'",
        )
        .bind(username.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(UserError::State(format!(
                "user {username} is not active; no approval to take back"
            )));
        }
        sqlx::query(
            "UPDATE registrations SET status = 'pending', processed_by = NULL, processed_at = NULL
             WHERE id = (SELECT MAX(id) FROM registrations WHERE username = $1
                         AND status = 'approved')",
        )
        .bind(username.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM enrollment_codes WHERE username = $1 AND used_at IS NULL")
            .bind(username.as_str())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            "user.approve",
            username.as_str(),
            "failed",
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        Ok(())
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
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE key_changes SET status = 'pending', processed_by = NULL, processed_at = NULL,
             reject_reason = NULL WHERE id = $1 AND username = $2",
        )
        .bind(id)
        .bind(username.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE users SET public_key = $2, updated_at = $3 WHERE username = $1")
            .bind(username.as_str())
            .bind(old_key)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            "key.approve",
            username.as_str(),
            "failed",
            Some(reason),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
