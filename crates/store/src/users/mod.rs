//! Accounts: users and their registrations, key changes, API tokens and enrollment codes.
//!
//! Every transaction here is written once, over [`Tx`], for SQLite and PostgreSQL. SQLite's one
//! write thread serializes every write transaction; on PostgreSQL (READ COMMITTED, several
//! replicas) a decision that reads and then writes takes a lock first: the user's row
//! ([`user_row_locked`]) for decisions about one user, the advisory lock [`IP_BLOCK_LOCK`] for
//! handing out IP blocks.

mod accounts;
mod keys;
mod registrations;
mod tokens;

pub(crate) use tokens::{token_stmts, use_code_stmt};

use crate::db::{Cols, Dialect, Filter, Row, Stmt, Tx, stmt};
use crate::{Result, Store, StoreError, now_ms, parse};
use basphere_core::{Quota, RegistrationStatus, Role, UserStatus, Username};
use serde::Serialize;

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
    pub email: basphere_core::Email,
    pub team: basphere_core::Team,
    pub public_key: basphere_core::SshPublicKey,
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
    /// The email a key change asked for without a key was checked against.
    pub email: Option<String>,
    /// Why the user asked, when they said.
    pub reason: Option<String>,
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

const USER_COLS: &str = "username, email, team, public_key, role, status, max_vms, max_clusters, \
     max_ips, max_vcpus, max_memory_mib, max_disk_gib, ip_block, unix_account, unix_uid, created_at";

/// The quota columns of a `users` row.
pub(crate) fn quota_from(r: &Row) -> Result<Quota> {
    Ok(Quota {
        max_vms: r.int("max_vms")? as u32,
        max_clusters: r.int("max_clusters")? as u32,
        max_ips: r.int("max_ips")? as u32,
        max_vcpus: r.opt_int("max_vcpus")?.map(|v| v as u32),
        max_memory_mib: r.opt_int("max_memory_mib")?.map(|v| v as u64),
        max_disk_gib: r.opt_int("max_disk_gib")?.map(|v| v as u64),
    })
}

fn user_from(r: &Row) -> Result<User> {
    Ok(User {
        username: parse("users.username", &r.text("username")?)?,
        email: r.text("email")?,
        team: r.text("team")?,
        public_key: r.text("public_key")?,
        role: parse("users.role", &r.text("role")?)?,
        status: parse("users.status", &r.text("status")?)?,
        quota: quota_from(r)?,
        ip_block: r.opt_int("ip_block")?.map(|v| v as u32),
        unix_account: r.int("unix_account")? != 0,
        unix_uid: r.opt_int("unix_uid")?.map(|v| v as u32),
        created_at: r.int("created_at")?,
    })
}

/// One user, read inside `tx`.
async fn user_in(tx: &mut dyn Tx, username: &str) -> Result<Option<User>> {
    let s = stmt!(
        format!("SELECT {USER_COLS} FROM users WHERE username = $1"),
        username
    );
    tx.query_opt(&s).await?.as_ref().map(user_from).transpose()
}

/// `SELECT cols FROM users WHERE username = $1`, on PostgreSQL `FOR UPDATE`: the row stays
/// locked until the transaction ends, so a per-user decision (read, then write) holds while
/// other replicas decide about the same user. SQLite's one writer serializes them already.
async fn user_row_locked(tx: &mut dyn Tx, cols: &str, username: &str) -> Result<Option<Row>> {
    let lock = match tx.dialect() {
        Dialect::Postgres => " FOR UPDATE",
        Dialect::Sqlite => "",
    };
    let s = stmt!(
        format!("SELECT {cols} FROM users WHERE username = $1{lock}"),
        username
    );
    tx.query_opt(&s).await
}

/// Key of the PostgreSQL transaction-level advisory lock that serializes handing out IP blocks
/// (`pg_advisory_xact_lock`, released at commit or rollback). A block is picked by reading which
/// blocks are used: without the lock two replicas approving at once would read the same free
/// block, and one would fail on `UNIQUE (ip_block)`. No row lock can express "no other user
/// takes this block", hence a lock over the whole decision. (Taken keys: 4242000001
/// migrations, 4242000002 the ledger's claims.)
pub(crate) const IP_BLOCK_LOCK: i64 = 4_242_000_003;

/// The lowest block of a pool of `blocks` no user holds yet. On PostgreSQL, first takes
/// [`IP_BLOCK_LOCK`] (held until the transaction ends, so the caller can then write the block).
async fn lowest_free_block(tx: &mut dyn Tx, blocks: u32) -> Result<Option<i64>> {
    if tx.dialect() == Dialect::Postgres {
        tx.query(&stmt!("SELECT pg_advisory_xact_lock($1)", IP_BLOCK_LOCK))
            .await?;
    }
    let used = tx
        .query(&stmt!(
            "SELECT ip_block FROM users WHERE ip_block IS NOT NULL ORDER BY ip_block"
        ))
        .await?
        .iter()
        .map(|r| r.int("ip_block"))
        .collect::<Result<Vec<i64>>>()?;
    Ok((0..i64::from(blocks)).find(|i| used.binary_search(i).is_err()))
}

/// A users row to insert.
struct NewUserRow<'a> {
    username: &'a str,
    email: &'a str,
    team: &'a str,
    public_key: &'a str,
    role: Role,
    status: UserStatus,
    quota: &'a Quota,
    ip_block: Option<i64>,
}

/// The insert of `u`; with `if_free`, it does nothing (changes no row) when the username is
/// taken.
fn insert_user(u: NewUserRow<'_>, if_free: bool) -> Stmt {
    let conflict = if if_free {
        " ON CONFLICT (username) DO NOTHING"
    } else {
        ""
    };
    stmt!(
        format!(
            "INSERT INTO users (username, email, team, public_key, role, status, max_vms,
                max_clusters, max_ips, max_vcpus, max_memory_mib, max_disk_gib, created_at,
                updated_at, ip_block)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $14){conflict}"
        ),
        u.username,
        u.email,
        u.team,
        u.public_key,
        u.role.as_str(),
        u.status.as_str(),
        u.quota.max_vms,
        u.quota.max_clusters,
        u.quota.max_ips,
        u.quota.max_vcpus,
        u.quota.max_memory_mib.map(|v| v as i64),
        u.quota.max_disk_gib.map(|v| v as i64),
        now_ms(),
        u.ip_block,
    )
}

impl Store {
    /// One user, if it exists.
    pub async fn user(&self, username: &str) -> Result<Option<User>> {
        let u = username.to_string();
        self.db
            .read(move |tx| Box::pin(async move { user_in(tx, &u).await }))
            .await
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
        let mut f = Filter::default();
        f.given(status.map(|s| s.as_str()), |p| format!("status = {p}"))
            .given(after, |p| format!("username > {p}"));
        let s = f.page(&format!("SELECT {USER_COLS} FROM users"), "username", limit);
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query(&s).await?.iter().map(user_from).collect() })
            })
            .await
    }
}
