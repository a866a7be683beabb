//! API tokens: minting, listing, revoking, authenticating, and enrollment codes exchanged for
//! a token.

use super::{TokenInfo, TokenOwner, USER_COLS, user_from};
use crate::audit::audit_stmt;
use crate::db::{Cols, Filter, Row, Stmt, stmt};
use crate::{Actor, Result, Store, hash_secret, now_ms, random_hex};
use basphere_core::Username;

/// How stale a token's `last_used_at` may get before [`Store::authenticate`] writes it again:
/// most requests then only read.
const LAST_USED_GRANULARITY_MS: i64 = 60_000;

fn token_info_from(r: &Row) -> Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.text("id")?,
        name: r.text("name")?,
        created_at: r.int("created_at")?,
        last_used_at: r.opt_int("last_used_at")?,
        expires_at: r.opt_int("expires_at")?,
    })
}

/// A new token of `username` (its listing and secret, shown once) and the statements that
/// store it with its audit record.
pub(crate) fn token_stmts(
    username: &str,
    name: &str,
    ttl_ms: Option<i64>,
    actor: &Actor,
) -> (TokenInfo, String, [Stmt; 2]) {
    let id = random_hex(4);
    let secret = format!("bsp_{}", random_hex(32));
    let now = now_ms();
    let expires_at = ttl_ms.map(|t| now + t);
    let stmts = [
        stmt!(
            "INSERT INTO tokens (id, username, name, hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            id.as_str(),
            username,
            name,
            hash_secret(&secret),
            now,
            expires_at,
        ),
        audit_stmt(actor, "token.create", username, "ok", Some(&id)),
    ];
    let info = TokenInfo {
        id,
        name: name.to_string(),
        created_at: now,
        last_used_at: None,
        expires_at,
    };
    (info, secret, stmts)
}

/// Marks the unused enrollment code `code` of `username` used; whether there was one.
pub(crate) fn use_code_stmt(username: &str, code: &str, now: i64) -> Stmt {
    stmt!(
        "UPDATE enrollment_codes SET used_at = $3
         WHERE hash = $1 AND username = $2 AND used_at IS NULL AND expires_at >= $3",
        hash_secret(code),
        username,
        now,
    )
}

impl Store {
    /// Mints an API token for `username`; returns its listing and the secret (shown once).
    pub async fn create_token(
        &self,
        username: &Username,
        name: &str,
        ttl_ms: Option<i64>,
        actor: &Actor,
    ) -> Result<(TokenInfo, String)> {
        let (info, secret, stmts) = token_stmts(username.as_str(), name, ttl_ms, actor);
        self.db
            .write(move |tx| Box::pin(async move { tx.run(&stmts).await }))
            .await?;
        Ok((info, secret))
    }

    /// The tokens of `username`.
    pub async fn tokens(&self, username: &str) -> Result<Vec<TokenInfo>> {
        let s = stmt!(
            "SELECT id, name, created_at, last_used_at, expires_at FROM tokens
             WHERE username = $1 ORDER BY created_at",
            username,
        );
        self.tokens_of(s).await
    }

    /// One page of `username`'s tokens, by id: at most `limit` after id `after`.
    pub async fn tokens_page(
        &self,
        username: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TokenInfo>> {
        let mut f = Filter::default();
        f.given(Some(username), |p| format!("username = {p}"))
            .given(after, |p| format!("id > {p}"));
        let s = f.page(
            "SELECT id, name, created_at, last_used_at, expires_at FROM tokens",
            "id",
            limit,
        );
        self.tokens_of(s).await
    }

    async fn tokens_of(&self, s: Stmt) -> Result<Vec<TokenInfo>> {
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query(&s).await?.iter().map(token_info_from).collect() })
            })
            .await
    }

    /// Revokes token `id` of `username`; false if there was none.
    pub async fn revoke_token(&self, username: &str, id: &str, actor: &Actor) -> Result<bool> {
        let del = stmt!(
            "DELETE FROM tokens WHERE username = $1 AND id = $2",
            username,
            id
        );
        let audit = audit_stmt(actor, "token.revoke", username, "ok", Some(id));
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    let n = tx.exec(&del).await?;
                    if n > 0 {
                        tx.exec(&audit).await?;
                    }
                    Ok(n > 0)
                })
            })
            .await
    }

    /// The owner of a presented token secret, if the token exists and has not expired.
    ///
    /// Runs on every request: one read (the token joined with its user); `last_used_at` is
    /// written only when it is more than a minute old, and only if no replica wrote it since.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<TokenOwner>> {
        let s = stmt!(
            format!(
                "SELECT {USER_COLS}, t_id, t_expires_at, t_last_used_at FROM users
                 JOIN (SELECT id AS t_id, username AS t_username, expires_at AS t_expires_at,
                              last_used_at AS t_last_used_at
                       FROM tokens WHERE hash = $1) t ON users.username = t.t_username"
            ),
            hash_secret(secret),
        );
        let row = self
            .db
            .read(move |tx| Box::pin(async move { tx.query_opt(&s).await }))
            .await?;
        let Some(row) = row else { return Ok(None) };
        let now = now_ms();
        if row.opt_int("t_expires_at")?.is_some_and(|e| e < now) {
            return Ok(None);
        }
        let token_id = row.text("t_id")?;
        let stale = now - LAST_USED_GRANULARITY_MS;
        if row.opt_int("t_last_used_at")?.is_none_or(|l| l < stale) {
            let s = stmt!(
                "UPDATE tokens SET last_used_at = $2
                 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $3)",
                token_id.as_str(),
                now,
                stale,
            );
            self.db
                .write(move |tx| Box::pin(async move { tx.exec(&s).await.map(drop) }))
                .await?;
        }
        Ok(Some(TokenOwner {
            user: user_from(&row)?,
            token_id,
        }))
    }

    /// Exchanges a one-time enrollment code of `username` for a new token (in one transaction:
    /// the code is used only if the token is stored).
    pub async fn enroll(
        &self,
        username: &Username,
        code: &str,
        actor: &Actor,
    ) -> Result<Option<(TokenInfo, String)>> {
        let use_code = use_code_stmt(username.as_str(), code, now_ms());
        let (info, secret, stmts) = token_stmts(username.as_str(), "enrollment", None, actor);
        let refused = audit_stmt(actor, "token.enroll", username.as_str(), "refused", None);
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    if tx.exec(&use_code).await? == 0 {
                        tx.exec(&refused).await?;
                        return Ok(None);
                    }
                    tx.run(&stmts).await?;
                    Ok(Some((info, secret)))
                })
            })
            .await
    }
}
