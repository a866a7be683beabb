//! Users, registrations, key changes, tokens and the audit trail.

use crate::auth::{Caller, PeerInfo};
use crate::envelope::{ApiError, Ok200, accepted, created, ok};
use crate::input::Body;
use crate::limits;
use crate::routes::page::{PageQuery, page};
use crate::server::AppState;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::Response;
use basphere_service::{CAPTCHA_FIELD, UserDeletion, username};
use basphere_wire::{KeyChangeRequest, QuotaRequest, ReasonRequest, RegisterRequest, TokenRequest};
use serde::Deserialize;

/// The reCAPTCHA answer a JSON body carries (`g-recaptcha-response`, as the form field).
fn captcha_answer(body: &Body) -> Option<&str> {
    body.0.get(CAPTCHA_FIELD).and_then(|v| v.as_str())
}

/// `POST /register`: anyone; a local caller registers only their own Unix account name; an
/// anonymous (TCP) caller answers the reCAPTCHA when it is on. 200 with the registration
/// request, as the prototype answers.
pub async fn register(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    if limits::anonymous(&caller) {
        st.services
            .verify_captcha(captcha_answer(&body), limits::peer_ip(&peer))
            .await?;
    }
    let only = (caller.local && !caller.is_admin()).then_some(caller.name.as_str());
    let d = st
        .services
        .register(&caller.actor(), only, &RegisterRequest::read(&body.0))
        .await?;
    Ok(ok(d.message, d.data))
}

/// `POST /users`: an admin adds and approves a user in one go.
pub async fn add(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let a = st
        .services
        .add_user(&caller.actor(), &RegisterRequest::read(&body.0))
        .await?;
    Ok(ok(a.message(), a.0))
}

pub async fn approve(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let a = st.services.approve(&caller.actor(), &username(&u)?).await?;
    Ok(ok(a.message(), a.0))
}

pub async fn reject(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let d = st
        .services
        .reject(
            &caller.actor(),
            &username(&u)?,
            &ReasonRequest::read(&body.0),
        )
        .await?;
    Ok(ok(d.message, d.data))
}

pub async fn me(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let u = caller.known()?;
    let me = st.services.me(u).await?;
    Ok(ok(format!("{} ({})", u.username, u.status), me))
}

/// `GET /pending?limit=&after=`: pending registrations, newest first (see `page`).
pub async fn pending(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let r = st.services.pending(&p.paging()).await?;
    Ok(page(|n| format!("{n} pending registration(s)"), r))
}

pub async fn pending_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let r = st.services.registration_of(&u).await?;
    Ok(ok(format!("registration of {u}: {}", r.status), r))
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
    let users = st.services.users(q.status.as_deref(), &p.paging()).await?;
    Ok(page(|n| format!("{n} user(s)"), users))
}

pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.self_or_admin(&u)?;
    let d = st.services.user(&u).await?;
    Ok(ok(format!("user {u}"), d))
}

async fn set_disabled(
    st: AppState,
    caller: Caller,
    u: String,
    disabled: bool,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let d = st
        .services
        .set_disabled(&caller.actor(), &username(&u)?, disabled)
        .await?;
    Ok(ok(d.message, d.data))
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
    let d = st
        .services
        .set_quota(
            &caller.actor(),
            &username(&u)?,
            &QuotaRequest::read(&body.0),
        )
        .await?;
    Ok(ok(d.message, d.data))
}

#[derive(Deserialize)]
pub struct DeleteQuery {
    #[serde(default)]
    pub purge: bool,
}

/// `DELETE /users/{u}`: deletes the user's VMs first (202 with their operations; call again
/// when they are done), then the account (see `Services::delete_user` for the rule).
pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    match st
        .services
        .delete_user(&caller.actor(), &username(&u)?, q.purge)
        .await?
    {
        UserDeletion::VmsDeleting(d) => Ok(accepted(d.message, d.data)),
        UserDeletion::Deleted(d) => Ok(ok(d.message, d.data)),
    }
}

/// `POST /key-change`: a signed-in user's `public_key`, as always; or the prototype's form
/// (`username`, `email`, `new_public_key`, `reason`) from anyone, even without any
/// credential: throttled like registration, reCAPTCHA when on and the caller is anonymous,
/// and the email must be the registered one. Either waits for an admin.
pub async fn key_change(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let req = KeyChangeRequest::read(&body.0);
    let signed = caller.user.as_ref().is_some_and(|u| {
        req.username
            .as_deref()
            .is_none_or(|n| n == u.username.as_str())
    });
    let d = if signed {
        let me = caller.principal()?;
        st.services.request_key_change(&me, &req).await?
    } else {
        limits::throttle(&st.config, &peer)?;
        if limits::anonymous(&caller) {
            st.services
                .verify_captcha(captcha_answer(&body), limits::peer_ip(&peer))
                .await?;
        }
        st.services
            .request_key_change_unsigned(&caller.actor(), &req)
            .await?
    };
    Ok(ok(d.message, d.data))
}

/// `GET /key-changes?limit=&after=`: pending key changes, newest first (see `page`).
pub async fn key_changes(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let k = st.services.pending_key_changes(&p.paging()).await?;
    Ok(page(|n| format!("{n} pending key change(s)"), k))
}

/// `GET /key-changes/{u}`: `u`'s newest key change request (404 when none), as the
/// prototype answers.
pub async fn key_changes_of(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.self_or_admin(&u)?;
    let k = st.services.key_change_of(&u).await?;
    Ok(ok(format!("key change of {u}: {}", k.status), k))
}

async fn decide_key(
    st: AppState,
    caller: Caller,
    u: String,
    approve: bool,
    body: Body,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let d = st
        .services
        .decide_key(
            &caller.actor(),
            &username(&u)?,
            approve,
            &ReasonRequest::read(&body.0),
        )
        .await?;
    Ok(ok(d.message, d.data))
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
    let me = caller.principal()?;
    let t = st.services.tokens(&me, &p.paging()).await?;
    Ok(page(|n| format!("{n} token(s)"), t))
}

pub async fn token_create(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st
        .services
        .create_token(&me, &TokenRequest::read(&body.0))
        .await?;
    Ok(created(d.message, d.data))
}

pub async fn token_revoke(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st
        .services
        .revoke_token(me.name(), &id, &caller.actor())
        .await?;
    Ok(ok(d.message, d.data))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
}

/// `GET /audit?actor=&action=&target=&limit=&after=`: audit records, newest first (see `page`).
pub async fn audit_page(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    p.paging().limit()?;
    caller.admin()?;
    let recs = st
        .services
        .audit(q.actor, q.action, q.target, &p.paging())
        .await?;
    Ok(page(|n| format!("{n} audit record(s)"), recs))
}
