//! Counts and records behind the server's request limits: how many registrations wait, and
//! refused enrollments folded into one audit record per client and window (so a flood of bad
//! codes cannot flood the audit trail).

use crate::audit::{Actor, audit_stmt};
use crate::db::{Cols, Dialect, stmt};
use crate::users::{TokenInfo, token_stmts, use_code_stmt};
use crate::{Result, Store, now_ms};
use basphere_core::Username;

/// Usernames listed in an aggregated refusal record, at most.
const NAMES_SHOWN: usize = 10;

impl Store {
    /// Registrations waiting for an admin's review.
    pub async fn pending_count(&self) -> Result<i64> {
        self.db
            .read_int(stmt!("SELECT COUNT(*) FROM users WHERE status = 'pending'"))
            .await
    }

    /// Exchanges a one-time enrollment code of `username` for a new token, like
    /// [`Store::enroll`]; a refusal adds to the audit record of `client` (an IP address or uid,
    /// without port) for the current `window_ms` instead of writing one record per attempt.
    ///
    /// On PostgreSQL the open record is read `FOR UPDATE`, so refusals counted on several
    /// replicas at once are all counted.
    pub async fn enroll_folding_refusals(
        &self,
        username: &Username,
        code: &str,
        actor: &Actor,
        client: &str,
        window_ms: i64,
    ) -> Result<Option<(TokenInfo, String)>> {
        let now = now_ms();
        let use_code = use_code_stmt(username.as_str(), code, now);
        let (info, secret, stmts) = token_stmts(username.as_str(), "enrollment", None, actor);
        let source = format!("refusals:{client}");
        let refused_by = Actor::new(&actor.name, &source);
        let name = username.to_string();
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    if tx.exec(&use_code).await? > 0 {
                        tx.run(&stmts).await?;
                        return Ok(Some((info, secret)));
                    }
                    let lock = match tx.dialect() {
                        Dialect::Postgres => " FOR UPDATE",
                        Dialect::Sqlite => "",
                    };
                    let open = tx
                        .query_opt(&stmt!(
                            format!(
                                "SELECT id, detail FROM audit
                                 WHERE at >= $1 AND source = $2 AND action = 'token.enroll'
                                   AND result = 'refused'
                                 ORDER BY id DESC LIMIT 1{lock}"
                            ),
                            now - window_ms.max(1),
                            source.as_str(),
                        ))
                        .await?;
                    let write = match open {
                        Some(row) => {
                            let detail = row.opt_text("detail")?;
                            let (count, mut names) = parse_detail(detail.as_deref().unwrap_or(""));
                            if names.len() < NAMES_SHOWN && !names.contains(&name) {
                                names.push(name);
                            }
                            stmt!(
                                "UPDATE audit SET detail = $2 WHERE id = $1",
                                row.int("id")?,
                                detail_text(count + 1, &names),
                            )
                        }
                        None => {
                            let detail = detail_text(1, std::slice::from_ref(&name));
                            audit_stmt(&refused_by, "token.enroll", &name, "refused", Some(&detail))
                        }
                    };
                    tx.exec(&write).await?;
                    Ok(None)
                })
            })
            .await
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
