//! A user's credentials: key changes (asked with a credential, or without one by username and
//! email, decided by an admin and installed in the Unix account), API tokens and enrollment.

use crate::check::Check;
use crate::error::Result;
use crate::users::{not_pending, on_host, ssh_key};
use crate::{Done, Paged, Paging, Principal, ServiceError, Services, convert};
use basphere_core::{Email, SshPublicKey, UserStatus, Username};
use basphere_store::{Actor, UserError};
use basphere_wire as wire;

/// The one refusal of a key change asked for without a key when the username is unknown or
/// the email is not the registered one.
pub const NO_SUCH_ACCOUNT: &str = "no account matches this username and email; check both \
     (the email must be the one you registered with), or ask an admin";

/// A new token's secret (shown this once) and what is kept of it.
fn token_created(
    message: &str,
    info: &basphere_store::TokenInfo,
    secret: String,
) -> Done<wire::TokenCreated> {
    Done {
        message: message.into(),
        data: wire::TokenCreated {
            token: secret,
            info: convert::token_info(info),
        },
    }
}

/// What a key-change decision recorded.
pub type KeyDecision = Done<wire::KeyChange>;

impl Services {
    /// Files a key change for the (active) principal: `public_key` (or the prototype's
    /// `new_public_key`) and an optional `reason`.
    pub async fn request_key_change(
        &self,
        me: &Principal,
        req: &wire::KeyChangeRequest,
    ) -> Result<Done<wire::KeyChange>> {
        let mut c = Check::new(&req.unreadable);
        let given = c.opt("public_key", req.public_key.as_deref());
        let given = given.or(c.opt("new_public_key", req.new_public_key.as_deref()));
        let key = c
            .req("public_key", given)
            .and_then(|s| c.errs.check("public_key", ssh_key(s)));
        let reason = c.opt("reason", req.reason.as_deref()).map(str::trim);
        c.finish()?;
        let kc = self
            .store
            .request_key_change_with(
                me.name(),
                &key.expect("checked"),
                None,
                reason.filter(|r| !r.is_empty()),
                &me.actor,
            )
            .await?;
        Ok(Done {
            message: "key change requested; an admin will review it".into(),
            data: convert::key_change(&kc),
        })
    }

    /// Files a key change for someone who may hold no credential at all (the prototype's
    /// form): `username`, `email` (which must be the registered one), `new_public_key`, and
    /// an optional `reason`. An unknown user and a wrong email get the same refusal, so the
    /// answer tells nobody which accounts exist. An admin decides, as for every key change.
    pub async fn request_key_change_unsigned(
        &self,
        actor: &Actor,
        req: &wire::KeyChangeRequest,
    ) -> Result<Done<wire::KeyChange>> {
        let mut c = Check::new(&req.unreadable);
        let u = c
            .req("username", req.username.as_deref())
            .and_then(|s| c.errs.check("username", s.parse::<Username>()));
        let e = c
            .req("email", req.email.as_deref())
            .and_then(|s| c.errs.check("email", s.parse::<Email>()));
        let key = c
            .req("new_public_key", req.new_public_key.as_deref())
            .and_then(|s| c.errs.check("new_public_key", ssh_key(s)));
        let reason = c.opt("reason", req.reason.as_deref()).map(str::trim);
        if reason.is_some_and(|r| r.chars().count() > 500) {
            c.errs.push("reason", "must be at most 500 characters");
        }
        c.finish()?;
        let (u, e) = (u.expect("checked"), e.expect("checked"));
        let kc = self
            .store
            .request_key_change_with(
                u.as_str(),
                &key.expect("checked"),
                Some(e.as_str()),
                reason.filter(|r| !r.is_empty()),
                actor,
            )
            .await
            .map_err(|err| match err {
                UserError::NotFound(_) => ServiceError::Conflict(NO_SUCH_ACCOUNT.into()),
                err => err.into(),
            })?;
        Ok(Done {
            message: "Key change request submitted; an admin will review it".into(),
            data: convert::key_change(&kc),
        })
    }

    /// Pending key changes, newest first.
    pub async fn pending_key_changes(&self, p: &Paging) -> Result<Paged<wire::KeyChange>> {
        let limit = p.limit()?;
        let k = self
            .store
            .key_changes_page(p.after_num()?, limit + 1)
            .await?;
        Ok(
            Paged::of(k, limit, |k| wire::request_id(wire::KEY_CHANGE_ID, k.id))
                .map(|k| convert::key_change(&k)),
        )
    }

    /// Key changes of one user (`None`: everyone's).
    pub async fn key_changes(&self, u: Option<&str>) -> Result<Vec<wire::KeyChange>> {
        let k = self.store.key_changes(u).await?;
        Ok(k.iter().map(convert::key_change).collect())
    }

    /// `u`'s newest key change request (the prototype's `GET /key-changes/{u}`).
    pub async fn key_change_of(&self, u: &str) -> Result<wire::KeyChange> {
        let k = self.store.key_changes(Some(u)).await?;
        k.first()
            .map(convert::key_change)
            .ok_or_else(|| ServiceError::NotFound(format!("no key change request for {u}")))
    }

    /// Approves or rejects `u`'s pending key change; an approved key is installed in their
    /// Unix account, and the approval taken back if that fails.
    pub async fn decide_key(
        &self,
        actor: &Actor,
        u: &Username,
        approve: bool,
        req: &wire::ReasonRequest,
    ) -> Result<KeyDecision> {
        let mut c = Check::new(&req.unreadable);
        let reason = c.opt("reason", req.reason.clone());
        c.finish()?;
        let before = self.store.user(u.as_str()).await?;
        let kc = self
            .store
            .decide_key_change(u, approve, reason.as_deref(), actor)
            .await
            .map_err(not_pending)?;
        let managed = before.filter(|b| approve && b.unix_account);
        if let Some((acc, user)) = self.accounts.clone().zip(managed) {
            let key: SshPublicKey = kc
                .public_key
                .parse()
                .map_err(|e| ServiceError::Internal(format!("stored key is invalid: {e}")))?;
            let name = u.clone();
            let (uid, disabled) = (user.unix_uid, user.status == UserStatus::Disabled);
            let r = on_host(move || {
                let pw = acc.managed(&name, uid)?;
                acc.set_key(&pw, &key, disabled)
            })
            .await;
            if let Err(e) = r {
                let reason = format!("installing the new key of {u} failed: {e}");
                self.store
                    .undo_key_approval(u, kc.id, &user.public_key, &reason, actor)
                    .await?;
                let msg = format!("{reason}; the key change stays pending");
                return Err(ServiceError::account(&e, msg));
            }
        }
        Ok(Done {
            message: format!(
                "key change of {u} {}",
                if approve { "approved" } else { "rejected" }
            ),
            data: convert::key_change(&kc),
        })
    }

    /// The principal's tokens by id.
    pub async fn tokens(&self, me: &Principal, p: &Paging) -> Result<Paged<wire::TokenInfo>> {
        let limit = p.limit()?;
        let t = self
            .store
            .tokens_page(me.name(), p.after.as_deref(), limit + 1)
            .await?;
        Ok(Paged::of(t, limit, |t| t.id.clone()).map(|t| convert::token_info(&t)))
    }

    /// Makes a token for the principal; its secret is in the answer only.
    pub async fn create_token(
        &self,
        me: &Principal,
        req: &wire::TokenRequest,
    ) -> Result<Done<wire::TokenCreated>> {
        let mut c = Check::new(&req.unreadable);
        let name = c
            .opt("name", req.name.clone())
            .unwrap_or_else(|| "cli".into());
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            c.errs.push("name", "must be 1 to 64 printable characters");
        }
        let ttl_days = c.opt("ttl_days", req.ttl_days);
        if ttl_days.is_some_and(|d| !(1..=3650).contains(&d)) {
            c.errs.push("ttl_days", "must be between 1 and 3650");
        }
        c.finish()?;
        let (info, secret) = self
            .store
            .create_token(
                &me.user.username,
                &name,
                ttl_days.map(|d| d * 86_400_000),
                &me.actor,
            )
            .await?;
        Ok(token_created(
            "token created; it is shown only this once",
            &info,
            secret,
        ))
    }

    /// A token for a web session of `user`, valid `ttl_ms`: `(token id, secret)`.
    pub async fn session_token(
        &self,
        user: &Username,
        ttl_ms: i64,
        actor: &Actor,
    ) -> Result<(String, String)> {
        let (info, secret) = self
            .store
            .create_token(user, "web session", Some(ttl_ms), actor)
            .await?;
        Ok((info.id, secret))
    }

    /// Revokes one of `owner`'s tokens.
    pub async fn revoke_token(
        &self,
        owner: &str,
        id: &str,
        actor: &Actor,
    ) -> Result<Done<wire::TokenRevoked>> {
        if !self.store.revoke_token(owner, id, actor).await? {
            return Err(ServiceError::NotFound(format!("token {id} not found")));
        }
        Ok(Done {
            message: format!("token {id} revoked"),
            data: wire::TokenRevoked { id: id.to_string() },
        })
    }

    /// Exchanges `u`'s one-time enrollment code for a token. Refusals from `client` within
    /// `limits.enroll_audit_window_secs` share one audit record that counts them.
    pub async fn enroll(
        &self,
        actor: &Actor,
        client: &str,
        req: &wire::EnrollRequest,
    ) -> Result<Done<wire::TokenCreated>> {
        let mut c = Check::new(&req.unreadable);
        let u = c
            .req("username", req.username.as_deref())
            .and_then(|s| c.errs.check("username", s.parse::<Username>()));
        let code = c.req("code", req.code.clone());
        c.finish()?;
        let window = i64::try_from(self.config.limits.enroll_audit_window_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        match self
            .store
            .enroll_folding_refusals(
                &u.expect("checked"),
                &code.expect("checked"),
                actor,
                client,
                window,
            )
            .await?
        {
            Some((info, secret)) => Ok(token_created(
                "enrolled; keep this token, it is shown only this once",
                &info,
                secret,
            )),
            None => Err(ServiceError::Unauthorized(
                "enrollment code is wrong, used or expired; ask an admin for a new approval".into(),
            )),
        }
    }
}
