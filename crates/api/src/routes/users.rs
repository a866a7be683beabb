use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::routes::page::{DEFAULT_LIMIT, PageQuery, first, page};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use basphere_accounts::AccountError;
use basphere_core::VmOperation;
use basphere_core::{Email, FieldErrors, Quota, SshPublicKey, Team, UserStatus, Username};
use basphere_store::{AuditFilter, NewRegistration, UserError};
use serde::Deserialize;
use serde_json::json;

fn user_err(e: UserError) -> ApiError {
    match e {
        UserError::Taken(_) => ApiError::conflict(e.to_string()),
        UserError::NotFound(_) => ApiError::not_found(e.to_string()),
        UserError::State(_) => ApiError::conflict(e.to_string()),
        UserError::PoolFull => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        UserError::Store(e) => ApiError::internal(e),
    }
}

fn account_err(e: AccountError) -> ApiError {
    let msg = e.to_string();
    account_failure(&e, msg)
}

/// `msg` (which explains `e`) as a 409 when the host refused, a 500 when it failed.
fn account_failure(e: &AccountError, msg: String) -> ApiError {
    match e {
        AccountError::Refused(_) => ApiError::conflict(msg),
        AccountError::Failed(_) => ApiError::internal(msg),
    }
}

/// Runs host account work off the async workers.
async fn on_host<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(AccountError::Failed(format!("account task failed: {e}"))))
}

fn username(s: &str) -> Result<Username, ApiError> {
    s.parse()
        .map_err(|e| ApiError::not_found(format!("user {s:?} not found ({e})")))
}

fn parse_registration(b: &Body) -> Result<NewRegistration, ApiError> {
    let mut errs = FieldErrors::new();
    let u = b
        .str("username", true, &mut errs)
        .and_then(|s| errs.check("username", s.parse::<Username>()));
    let e = b
        .str("email", true, &mut errs)
        .and_then(|s| errs.check("email", s.parse::<Email>()));
    let t = b
        .str("team", true, &mut errs)
        .and_then(|s| errs.check("team", s.parse::<Team>()));
    let k = b
        .str("public_key", true, &mut errs)
        .and_then(|s| errs.check("public_key", s.parse::<SshPublicKey>()));
    errs.into_result()?;
    Ok(NewRegistration {
        username: u.expect("checked"),
        email: e.expect("checked"),
        team: t.expect("checked"),
        public_key: k.expect("checked"),
    })
}

/// `POST /register`: anyone; a local caller registers only their own Unix account name.
pub async fn register(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let reg = parse_registration(&body)?;
    if caller.local && !caller.is_admin() && caller.name != reg.username.as_str() {
        return Err(ApiError::forbidden(format!(
            "on this host you can register only your own account name {:?}",
            caller.name
        )));
    }
    if let Some(acc) = st.accounts.clone() {
        let name = reg.username.clone();
        on_host(move || acc.check_name_free(&name))
            .await
            .map_err(account_err)?;
    }
    let r = st
        .store
        .register(&reg, &st.config.quota, &caller.actor())
        .await
        .map_err(user_err)?;
    Ok(Ok200(
        StatusCode::CREATED,
        format!(
            "registration of {} received; an admin will review it",
            r.username
        ),
        serde_json::to_value(r).unwrap_or_default(),
    ))
}

/// `POST /users`: an admin adds and approves a user in one go.
pub async fn add(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let reg = parse_registration(&body)?;
    if let Some(acc) = st.accounts.clone() {
        let name = reg.username.clone();
        on_host(move || acc.check_name_free(&name))
            .await
            .map_err(account_err)?;
    }
    let actor = caller.actor();
    st.store
        .register(&reg, &st.config.quota, &actor)
        .await
        .map_err(user_err)?;
    approve_user(&st, &caller, &reg.username).await
}

async fn approve_user(st: &AppState, caller: &Caller, u: &Username) -> Result<Ok200, ApiError> {
    let user = st
        .store
        .user(u.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {u} not found")))?;
    if user.status != UserStatus::Pending {
        return Err(ApiError::conflict(format!(
            "user {u} is {}, not pending; nothing to approve",
            user.status
        )));
    }
    let key: SshPublicKey = user
        .public_key
        .parse()
        .map_err(|e| ApiError::internal(format!("stored key of {u} is invalid: {e}")))?;
    if let Some(acc) = st.accounts.clone() {
        // The name may have become a Unix account since registration.
        let name = u.clone();
        on_host(move || acc.check_name_free(&name))
            .await
            .map_err(account_err)?;
    }
    let ttl = if st.accounts.is_none() {
        Some(i64::from(st.config.bastion.enrollment_ttl_hours) * 3_600_000)
    } else {
        None
    };
    let out = st
        .store
        .approve(
            u,
            &st.config.network,
            st.accounts.is_some(),
            ttl,
            &caller.actor(),
        )
        .await
        .map_err(user_err)?;
    // The store decided; now make the account, and take the approval back if that fails.
    if let Some(acc) = st.accounts.clone() {
        let name = u.clone();
        match on_host(move || acc.create(&name, &key)).await {
            Ok(uid) => st.store.set_unix_uid(u, uid).await?,
            Err(e) => {
                let reason = format!("creating the Unix account {u} failed: {e}");
                st.store
                    .undo_approval(u, &reason, &caller.actor())
                    .await
                    .map_err(user_err)?;
                let msg = format!("{reason}; {u} stays pending, approve again once it is fixed");
                return Err(account_failure(&e, msg));
            }
        }
    }
    let block = out.user.ip_block.and_then(|b| st.config.network.block(b));
    let msg = match &out.enrollment_code {
        Some(_) => format!(
            "user {u} approved; give them the enrollment code (works once): basphere enroll --username {u} --code <code>"
        ),
        None => format!("user {u} approved; Unix account created"),
    };
    Ok(ok(
        msg,
        json!({"user": out.user, "ip_block": block.map(|b| b.net.to_string()), "enrollment_code": out.enrollment_code}),
    ))
}

pub async fn approve(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    approve_user(&st, &caller, &username(&u)?).await
}

pub async fn reject(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let u = username(&u)?;
    let mut errs = FieldErrors::new();
    let reason = body.str("reason", false, &mut errs).unwrap_or_default();
    errs.into_result()?;
    st.store
        .reject(&u, &reason, &caller.actor())
        .await
        .map_err(user_err)?;
    Ok(ok(
        format!("registration of {u} rejected"),
        json!({"username": u, "reason": reason}),
    ))
}

pub async fn me(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let u = caller.known()?;
    let regs = st.store.registrations(Some(u.username.as_str())).await?;
    let block = u.ip_block.and_then(|b| st.config.network.block(b));
    Ok(ok(
        format!("{} ({})", u.username, u.status),
        json!({"user": u, "ip_block": block.map(|b| b.net.to_string()), "registration": regs.first()}),
    ))
}

/// `GET /pending?limit=&after=`: pending registrations, newest first (see `page`).
pub async fn pending(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let limit = p.limit()?;
    let r = st.store.pending_page(p.after_num()?, limit + 1).await?;
    Ok(page(
        |n| format!("{n} pending registration(s)"),
        r,
        limit,
        |r| r.id.to_string(),
    ))
}

pub async fn pending_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let r = st.store.registrations(Some(&u)).await?;
    let first = r
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("no registration for {u}")))?;
    Ok(ok(format!("registration of {u}: {}", first.status), first))
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
}

/// `GET /users?status=&limit=&after=`: users by username (see `page`).
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let status = q
        .status
        .map(|s| s.parse::<UserStatus>().map_err(ApiError::bad_request))
        .transpose()?;
    let limit = p.limit()?;
    let users = st
        .store
        .users_page(status, p.after.as_deref(), limit + 1)
        .await?;
    Ok(page(
        |n| format!("{n} user(s)"),
        users,
        limit,
        |u| u.username.to_string(),
    ))
}

pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.self_or_admin(&u)?;
    let user = st
        .store
        .user(&u)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {u} not found")))?;
    let usage = st.store.usage(&u).await?;
    let vms = st.store.vms(Some(&u)).await?;
    let block = user.ip_block.and_then(|b| st.config.network.block(b));
    Ok(ok(
        format!("user {u}"),
        json!({"user": user, "usage": usage, "vms": vms, "ip_block": block.map(|b| b.net.to_string())}),
    ))
}

async fn set_disabled(
    st: AppState,
    caller: Caller,
    u: String,
    disabled: bool,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let u = username(&u)?;
    let actor = caller.actor();
    st.store
        .set_disabled(&u, disabled, &actor)
        .await
        .map_err(user_err)?;
    let done = if disabled { "disabled" } else { "enabled" };
    let user = st.store.user(u.as_str()).await?;
    if let Some((acc, user)) = st.accounts.clone().zip(user.filter(|u| u.unix_account)) {
        let name = u.clone();
        let r = on_host(move || match acc.managed(&name, user.unix_uid) {
            Ok(pw) if disabled => acc.lock(&pw).map(|()| None),
            Ok(pw) => acc.unlock(&pw).map(|()| None),
            Err(AccountError::Refused(m)) => Ok(Some(m)),
            Err(e) => Err(e),
        })
        .await;
        match r {
            Ok(None) => {}
            Ok(Some(left_alone)) => {
                return Ok(ok(
                    format!("user {u} {done}; {left_alone}"),
                    json!({"username": u}),
                ));
            }
            Err(e) => {
                st.store
                    .set_disabled(&u, !disabled, &actor)
                    .await
                    .map_err(user_err)?;
                let what = if disabled { "locking" } else { "unlocking" };
                let msg = format!("{what} the Unix account {u} failed, so {u} was not {done}: {e}");
                return Err(account_failure(&e, msg));
            }
        }
    }
    Ok(ok(format!("user {u} {done}"), json!({"username": u})))
}

pub async fn disable(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    set_disabled(st, caller, u, true).await
}

pub async fn enable(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    set_disabled(st, caller, u, false).await
}

pub async fn set_quota(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let u = username(&u)?;
    let cur = st
        .store
        .user(u.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {u} not found")))?
        .quota;
    let mut errs = FieldErrors::new();
    let mut field = |k: &str, cur: u32, max: u32| -> u32 {
        match body.int(k, &mut errs) {
            Some(v) if v >= 0 && v <= i64::from(max) => v as u32,
            Some(_) => {
                errs.push(k, format!("must be between 0 and {max}"));
                cur
            }
            None => cur,
        }
    };
    let q = Quota {
        max_vms: field("max_vms", cur.max_vms, 10_000),
        max_clusters: field("max_clusters", cur.max_clusters, 10_000),
        max_ips: field("max_ips", cur.max_ips, st.config.network.block_size),
        max_vcpus: body
            .int("max_vcpus", &mut errs)
            .map(|v| v.max(0) as u32)
            .or(cur.max_vcpus),
        max_memory_mib: body
            .int("max_memory_mib", &mut errs)
            .map(|v| v.max(0) as u64)
            .or(cur.max_memory_mib),
    };
    errs.into_result()?;
    st.store
        .set_quota(&u, &q, &caller.actor())
        .await
        .map_err(user_err)?;
    Ok(ok(format!("quota of {u} updated"), q))
}

#[derive(Deserialize)]
pub struct DeleteQuery {
    #[serde(default)]
    pub purge: bool,
}

/// `DELETE /users/{u}`: deletes the user's VMs first (202 with their operations; call again
/// when they are done), then the account.
pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let u = username(&u)?;
    let user = st
        .store
        .user(u.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {u} not found")))?;
    if user.role == basphere_core::Role::Admin {
        return Err(ApiError::conflict("admin accounts cannot be deleted here"));
    }
    let vms = st.store.vms(Some(u.as_str())).await?;
    if !vms.is_empty() {
        if user.status == UserStatus::Active {
            st.store
                .set_disabled(&u, true, &caller.actor())
                .await
                .map_err(user_err)?;
            if let Some(acc) = st.accounts.clone().filter(|_| user.unix_account) {
                let (name, uid) = (u.clone(), user.unix_uid);
                on_host(move || acc.lock(&acc.managed(&name, uid)?))
                    .await
                    .map_err(|e| {
                        ApiError::internal(format!(
                            "user {u} disabled, but locking the Unix account failed: {e}"
                        ))
                    })?;
            }
        }
        let mut ops = vec![];
        let steps = basphere_vm_workflows::step_names(VmOperation::Delete);
        for vm in &vms {
            if let Ok(a) = st
                .store
                .begin_delete_vm(u.as_str(), vm.name.as_str(), &steps, &caller.actor())
                .await
            {
                ops.push(json!({"vm": a.vm.name, "operation_id": a.operation_id}));
            }
        }
        st.engine.wake();
        return Ok(accepted(
            format!(
                "user {u} disabled; deleting {} VM(s) first — run the delete again when they are gone",
                vms.len()
            ),
            json!({"operations": ops, "remaining_vms": vms.len()}),
        ));
    }
    st.store
        .delete_user(&u, q.purge, &caller.actor())
        .await
        .map_err(user_err)?;
    let done = if q.purge { "purged" } else { "deleted" };
    if let Some(acc) = st.accounts.clone().filter(|_| user.unix_account) {
        let (name, uid) = (u.clone(), user.unix_uid);
        match on_host(move || acc.remove(&name, uid)).await {
            Ok(()) => {}
            Err(AccountError::Refused(m)) => {
                return Ok(ok(
                    format!("user {u} {done}; {m}"),
                    json!({"username": u, "unix_account": "left alone"}),
                ));
            }
            Err(AccountError::Failed(m)) => {
                return Err(ApiError::internal(format!(
                    "user {u} {done}, but removing the Unix account failed: {m}; remove it with userdel"
                )));
            }
        }
    }
    Ok(ok(format!("user {u} {done}"), json!({"username": u})))
}

pub async fn key_change(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.active()?.username.clone();
    let mut errs = FieldErrors::new();
    let key = body
        .str("public_key", true, &mut errs)
        .and_then(|s| errs.check("public_key", s.parse::<SshPublicKey>()));
    errs.into_result()?;
    let kc = st
        .store
        .request_key_change(&me, &key.expect("checked"), &caller.actor())
        .await
        .map_err(user_err)?;
    Ok(Ok200(
        StatusCode::CREATED,
        "key change requested; an admin will review it".into(),
        serde_json::to_value(kc).unwrap_or_default(),
    ))
}

/// `GET /key-changes?limit=&after=`: pending key changes, newest first (see `page`).
pub async fn key_changes(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let limit = p.limit()?;
    let k = st.store.key_changes_page(p.after_num()?, limit + 1).await?;
    Ok(page(
        |n| format!("{n} pending key change(s)"),
        k,
        limit,
        |k| k.id.to_string(),
    ))
}

pub async fn key_changes_of(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.self_or_admin(&u)?;
    let k = st.store.key_changes(Some(&u)).await?;
    Ok(ok(format!("{} key change(s) of {u}", k.len()), k))
}

async fn decide_key(
    st: AppState,
    caller: Caller,
    u: String,
    approve: bool,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let u = username(&u)?;
    let mut errs = FieldErrors::new();
    let reason = body.str("reason", false, &mut errs);
    errs.into_result()?;
    let before = st.store.user(u.as_str()).await?;
    let kc = st
        .store
        .decide_key_change(&u, approve, reason.as_deref(), &caller.actor())
        .await
        .map_err(user_err)?;
    // The store decided; now install the key, and take the approval back if that fails.
    let managed = before.filter(|b| approve && b.unix_account);
    if let Some((acc, user)) = st.accounts.clone().zip(managed) {
        let key: SshPublicKey = kc
            .public_key
            .parse()
            .map_err(|e| ApiError::internal(format!("stored key is invalid: {e}")))?;
        let name = u.clone();
        let (uid, disabled) = (user.unix_uid, user.status == UserStatus::Disabled);
        let r = on_host(move || {
            let pw = acc.managed(&name, uid)?;
            acc.set_key(&pw, &key, disabled)
        })
        .await;
        if let Err(e) = r {
            let reason = format!("installing the new key of {u} failed: {e}");
            st.store
                .undo_key_approval(&u, kc.id, &user.public_key, &reason, &caller.actor())
                .await
                .map_err(user_err)?;
            let msg = format!("{reason}; the key change stays pending");
            return Err(account_failure(&e, msg));
        }
    }
    Ok(ok(
        format!(
            "key change of {u} {}",
            if approve { "approved" } else { "rejected" }
        ),
        kc,
    ))
}

pub async fn key_approve(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    decide_key(st, caller, u, true, body).await
}

pub async fn key_reject(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    decide_key(st, caller, u, false, body).await
}

/// `GET /tokens?limit=&after=`: the caller's tokens by id (see `page`).
pub async fn tokens(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let me = caller.active()?;
    let limit = p.limit()?;
    let t = st
        .store
        .tokens_page(me.username.as_str(), p.after.as_deref(), limit + 1)
        .await?;
    Ok(page(
        |n| format!("{n} token(s)"),
        t,
        limit,
        |t| t.id.clone(),
    ))
}

pub async fn token_create(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.active()?.username.clone();
    let mut errs = FieldErrors::new();
    let name = body
        .str("name", false, &mut errs)
        .unwrap_or_else(|| "cli".into());
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        errs.push("name", "must be 1 to 64 printable characters");
    }
    let ttl_days = body.int("ttl_days", &mut errs);
    if ttl_days.is_some_and(|d| !(1..=3650).contains(&d)) {
        errs.push("ttl_days", "must be between 1 and 3650");
    }
    errs.into_result()?;
    let (info, secret) = st
        .store
        .create_token(
            &me,
            &name,
            ttl_days.map(|d| d * 86_400_000),
            &caller.actor(),
        )
        .await?;
    Ok(Ok200(
        StatusCode::CREATED,
        "token created; it is shown only this once".into(),
        json!({"token": secret, "info": info}),
    ))
}

pub async fn token_revoke(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.active()?;
    if !st
        .store
        .revoke_token(me.username.as_str(), &id, &caller.actor())
        .await?
    {
        return Err(ApiError::not_found(format!("token {id} not found")));
    }
    Ok(ok(format!("token {id} revoked"), json!({"id": id})))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub limit: Option<i64>,
}

pub async fn audit(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<Ok200, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    let recs = audit_records(&st, &caller, q, &PageQuery::default()).await?;
    Ok(first(|n| format!("{n} audit record(s)"), recs, limit))
}

/// `GET /audit?actor=&action=&target=&limit=&after=`: audit records, newest first (see `page`).
pub async fn audit_page(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = p.limit()?;
    let recs = audit_records(&st, &caller, q, &p).await?;
    Ok(page(
        |n| format!("{n} audit record(s)"),
        recs,
        limit,
        |r| r.id.to_string(),
    ))
}

/// Up to one more record than the page holds (`page` looks at it to know more follow).
async fn audit_records(
    st: &AppState,
    caller: &Caller,
    q: AuditQuery,
    p: &PageQuery,
) -> Result<Vec<basphere_store::AuditRecord>, ApiError> {
    caller.admin()?;
    let limit = PageQuery {
        limit: q.limit,
        after: None,
    }
    .limit()?;
    Ok(st
        .store
        .audit_page(
            &AuditFilter {
                actor: q.actor,
                action: q.action,
                target: q.target,
                since_ms: None,
                limit: Some(limit + 1),
            },
            p.after_num()?,
        )
        .await?)
}
