//! Counts and records behind the server's request limits: how many registrations wait, and
//! refused enrollments folded into one audit record per client and window (so a flood of bad
//! codes cannot flood the audit trail).

use crate::audit::{Actor, record};
use crate::users::TokenInfo;
use crate::{Result, Store, hash_secret, now_ms};
use basphere_core::Username;
use sqlx::Row;

/// Usernames listed in an aggregated refusal record, at most.
const NAMES_SHOWN: usize = 10;

impl Store {
    /// Registrations waiting for an admin's review.
    pub async fn pending_count(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE status = 'pending'")
                .fetch_one(&self.lg()?.pool)
                .await?,
        )
    }

    /// Exchanges a one-time enrollment code of `username` for a new token, like
    /// [`Store::enroll`]; a refusal adds to the audit record of `client` (an IP address or uid,
    /// without port) for the current `window_ms` instead of writing one record per attempt.
    pub async fn enroll_folding_refusals(
        &self,
        username: &Username,
        code: &str,
        actor: &Actor,
        client: &str,
        window_ms: i64,
    ) -> Result<Option<(TokenInfo, String)>> {
        let mut tx = self.write().await?;
        let now = now_ms();
        let n = sqlx::query(
            "UPDATE enrollment_codes SET used_at = $3
             WHERE hash = $1 AND username = $2 AND used_at IS NULL AND expires_at >= $3",
        )
        .bind(hash_secret(code))
        .bind(username.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            tx.commit().await?;
            return self
                .create_token(username, "enrollment", None, actor)
                .await
                .map(Some);
        }
        let source = format!("refusals:{client}");
        let open = sqlx::query(
            "SELECT id, detail FROM audit
             WHERE at >= $1 AND source = $2 AND action = 'token.enroll' AND result = 'refused'
             ORDER BY id DESC LIMIT 1",
        )
        .bind(now - window_ms.max(1))
        .bind(&source)
        .fetch_optional(&mut *tx)
        .await?;
        match open {
            Some(row) => {
                let id: i64 = row.try_get("id")?;
                let detail: Option<String> = row.try_get("detail")?;
                let (count, mut names) = parse_detail(detail.as_deref().unwrap_or(""));
                if names.len() < NAMES_SHOWN && !names.iter().any(|n| n == username.as_str()) {
                    names.push(username.to_string());
                }
                sqlx::query("UPDATE audit SET detail = $2 WHERE id = $1")
                    .bind(id)
                    .bind(detail_text(count + 1, &names))
                    .execute(&mut *tx)
                    .await?;
            }
            None => {
                let detail = detail_text(1, &[username.to_string()]);
                record(
                    &mut tx,
                    &Actor::new(&actor.name, &source),
                    "token.enroll",
                    username.as_str(),
                    "refused",
                    Some(&detail),
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(None)
    }
}

fn detail_text(count: u64, names: &[String]) -> String {
    format!("attempts={count}; usernames={}", names.join(","))
}

fn parse_detail(d: &str) -> (u64, Vec<String>) {
    let mut count = 1;
    let mut names = vec![];
    for part in d.split("; ") {
        if let Some(c) = part.strip_prefix("attempts=") {
            count = c.parse().unwrap_or(1);
        } else if let Some(n) = part.strip_prefix("usernames=") {
            names = n
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
    }
    (count, names)
}

#[cfg(test)]
mod tests {
    #[test]
    fn refusal_detail_round_trips() {
        let names = vec!["bob".to_string(), "eve".to_string()];
        let t = super::detail_text(41, &names);
        assert_eq!(t, "attempts=41; usernames=bob,eve");
        assert_eq!(super::parse_detail(&t), (41, names));
    }
}
