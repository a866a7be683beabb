//! Users, registrations, key changes, tokens and the audit trail.

use crate::auth::{Caller, PeerInfo};
use crate::envelope::{ApiError, Ok200, accepted, created, ok};
use crate::input::Body;
use crate::limits;
use crate::openapi::{self as doc, Answer};
use crate::routes::page::{PageQuery, page};
use crate::server::AppState;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::Response;
use basphere_service::{CAPTCHA_FIELD, UserDeletion, username};
use basphere_wire as wire;
use basphere_wire::{KeyChangeRequest, QuotaRequest, ReasonRequest, RegisterRequest, TokenRequest};
use serde::Deserialize;
use utoipa::IntoParams;

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
#[utoipa::path(
    post, path = "/users", tag = "users", operation_id = "add_user",
    summary = "Add and approve a user (admin)",
    request_body = wire::RegisterRequest,
    responses(
        (status = 200, description = "The approved registration and the account it made", body = Answer<wire::Approved>, links(
            ("show" = (operation_id = "show_user", parameters(("username" = "$response.body#/data/username")))),
            ("quota" = (operation_id = "set_quota", parameters(("username" = "$response.body#/data/username")))),
            ("disable" = (operation_id = "disable_user", parameters(("username" = "$response.body#/data/username")))),
            ("enable" = (operation_id = "enable_user", parameters(("username" = "$response.body#/data/username")))),
            ("delete" = (operation_id = "delete_user", parameters(("username" = "$response.body#/data/username")))),
        )),
        (status = 403, response = doc::Forbidden),
        (status = 409, response = doc::Conflict),
        (status = 503, response = doc::Unavailable),
    ),
)]
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

#[utoipa::path(
    post, path = "/users/{username}/approve", tag = "users", operation_id = "approve_user",
    summary = "Approve a pending registration (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The approved registration and the account it made", body = Answer<wire::Approved>),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
        (status = 503, response = doc::Unavailable),
    ),
)]
pub async fn approve(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let a = st.services.approve(&caller.actor(), &username(&u)?).await?;
    Ok(ok(a.message(), a.0))
}

#[utoipa::path(
    post, path = "/users/{username}/reject", tag = "users", operation_id = "reject_user",
    summary = "Reject a pending registration (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    request_body = wire::ReasonRequest,
    responses(
        (status = 200, description = "The rejected registration", body = Answer<wire::Rejected>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
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

#[utoipa::path(
    get, path = "/me", tag = "users", operation_id = "me", summary = "The caller's account",
    responses(
        (status = 200, description = "The caller's account, address block and registration", body = Answer<wire::Me>),
    ),
)]
pub async fn me(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let u = caller.known()?;
    let me = st.services.me(u).await?;
    Ok(ok(format!("{} ({})", u.username, u.status), me))
}

/// `GET /pending?limit=&after=`: pending registrations, newest first (see `page`).
#[utoipa::path(
    get, path = "/pending", tag = "users", operation_id = "list_pending",
    summary = "Pending registrations, newest first (admin)",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of pending registrations", body = Answer<Vec<wire::Registration>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
pub async fn pending(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    caller.admin()?;
    let r = st.services.pending(&p.paging()).await?;
    Ok(page(|n| format!("{n} pending registration(s)"), r))
}

#[utoipa::path(
    get, path = "/pending/{username}", tag = "users", operation_id = "show_registration",
    summary = "A user's newest registration (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The registration", body = Answer<wire::Registration>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
    ),
)]
pub async fn pending_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    caller.admin()?;
    let r = st.services.registration_of(&u).await?;
    Ok(ok(format!("registration of {u}: {}", r.status), r))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only users in this state.
    #[param(value_type = Option<basphere_core::UserStatus>)]
    pub status: Option<String>,
}

/// `GET /users?status=&limit=&after=`: users by username (see `page`).
#[utoipa::path(
    get, path = "/users", tag = "users", operation_id = "list_users",
    summary = "Users by name (admin)",
    params(ListQuery, PageQuery),
    responses(
        (status = 200, description = "One page of users", body = Answer<Vec<wire::User>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
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

#[utoipa::path(
    get, path = "/users/{username}", tag = "users", operation_id = "show_user",
    summary = "A user, their usage and VMs (themselves or an admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The user", body = Answer<wire::UserDetail>),
        (status = 404, response = doc::NotFound),
    ),
)]
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

#[utoipa::path(
    post, path = "/users/{username}/disable", tag = "users", operation_id = "disable_user",
    summary = "Disable a user (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The user disabled", body = Answer<wire::UserRef>),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn disable(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    set_disabled(st, caller, u, true).await
}

#[utoipa::path(
    post, path = "/users/{username}/enable", tag = "users", operation_id = "enable_user",
    summary = "Enable a disabled user (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The user enabled", body = Answer<wire::UserRef>),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn enable(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
) -> Result<Ok200, ApiError> {
    set_disabled(st, caller, u, false).await
}

#[utoipa::path(
    put, path = "/users/{username}/quota", tag = "users", operation_id = "set_quota",
    summary = "Change a user's quota (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    request_body = wire::QuotaRequest,
    responses(
        (status = 200, description = "The new quota", body = Answer<basphere_core::Quota>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
    ),
)]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Also remove the user's registrations.
    #[serde(default)]
    pub purge: bool,
}

/// `DELETE /users/{u}`: deletes the user's VMs first (202 with their operations; call again
/// when they are done), then the account (see `Services::delete_user` for the rule).
#[utoipa::path(
    delete, path = "/users/{username}", tag = "users", operation_id = "delete_user",
    summary = "Delete a user (admin): their VMs first, then the account",
    params(("username" = String, Path, description = "The user's name", example = "dora"), DeleteQuery),
    responses(
        (status = 200, description = "The user is gone", body = Answer<wire::UserRef>),
        (status = 202, description = "The user holds VMs: they are disabled and the VMs' deletes started; call again when they are gone", body = Answer<wire::UserVmsDeleting>),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
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
#[utoipa::path(
    post, path = "/key-change", tag = "keys", operation_id = "request_key_change",
    summary = "Ask for a new SSH key (signed in, or the prototype's form without a credential)",
    security((), ("bearer" = [])),
    request_body = wire::KeyChangeRequest,
    responses(
        (status = 200, description = "The key change, waiting for an admin", body = Answer<wire::KeyChange>, links(
            ("of" = (operation_id = "key_changes_of", parameters(("username" = "$response.body#/data/username")))),
            ("approve" = (operation_id = "approve_key_change", parameters(("username" = "$response.body#/data/username")))),
            ("reject" = (operation_id = "reject_key_change", parameters(("username" = "$response.body#/data/username")))),
        )),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
        (status = 429, response = doc::TooManyRequests),
        (status = 503, response = doc::Unavailable),
    ),
)]
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
#[utoipa::path(
    get, path = "/key-changes", tag = "keys", operation_id = "list_key_changes",
    summary = "Pending key changes, newest first (admin)",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of pending key changes", body = Answer<Vec<wire::KeyChange>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
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
#[utoipa::path(
    get, path = "/key-changes/{username}", tag = "keys", operation_id = "key_changes_of",
    summary = "A user's newest key change (themselves or an admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    responses(
        (status = 200, description = "The user's newest key change", body = Answer<wire::KeyChange>),
        (status = 404, response = doc::NotFound),
    ),
)]
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

#[utoipa::path(
    post, path = "/key-changes/{username}/approve", tag = "keys", operation_id = "approve_key_change",
    summary = "Approve a user's pending key change (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    request_body = wire::ReasonRequest,
    responses(
        (status = 200, description = "The key change, approved", body = Answer<wire::KeyChange>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn key_approve(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    decide_key(st, caller, u, true, body).await
}

#[utoipa::path(
    post, path = "/key-changes/{username}/reject", tag = "keys", operation_id = "reject_key_change",
    summary = "Reject a user's pending key change (admin)",
    params(("username" = String, Path, description = "The user's name", example = "dora")),
    request_body = wire::ReasonRequest,
    responses(
        (status = 200, description = "The key change, rejected", body = Answer<wire::KeyChange>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn key_reject(
    State(st): State<AppState>,
    caller: Caller,
    Path(u): Path<String>,
    body: Body,
) -> Result<Ok200, ApiError> {
    decide_key(st, caller, u, false, body).await
}

/// `GET /tokens?limit=&after=`: the caller's tokens by id (see `page`).
#[utoipa::path(
    get, path = "/tokens", tag = "tokens", operation_id = "list_tokens",
    summary = "The caller's tokens (never their secrets)",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of tokens", body = Answer<Vec<wire::TokenInfo>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
pub async fn tokens(
    State(st): State<AppState>,
    caller: Caller,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let me = caller.principal()?;
    let t = st.services.tokens(&me, &p.paging()).await?;
    Ok(page(|n| format!("{n} token(s)"), t))
}

#[utoipa::path(
    post, path = "/tokens", tag = "tokens", operation_id = "create_token",
    summary = "Make a token for the caller (its secret is shown once)",
    request_body = wire::TokenRequest,
    responses(
        (status = 201, description = "The token and its secret", body = Answer<wire::TokenCreated>, links(
            ("revoke" = (operation_id = "revoke_token", parameters(("id" = "$response.body#/data/info/id")))),
        )),
        (status = 403, response = doc::Forbidden),
    ),
)]
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

#[utoipa::path(
    delete, path = "/tokens/{id}", tag = "tokens", operation_id = "revoke_token",
    summary = "Revoke one of the caller's tokens",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "The token is revoked", body = Answer<wire::TokenRevoked>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
    ),
)]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only records of this actor.
    pub actor: Option<String>,
    /// Only records of this action (`user.approve`, `vm.create`, …).
    pub action: Option<String>,
    /// Only records about this target.
    pub target: Option<String>,
}

/// `GET /audit?actor=&action=&target=&limit=&after=`: audit records, newest first (see `page`).
#[utoipa::path(
    get, path = "/audit", tag = "audit", operation_id = "list_audit",
    summary = "Audit records, newest first (admin)",
    params(AuditQuery, PageQuery),
    responses(
        (status = 200, description = "One page of audit records", body = Answer<Vec<wire::AuditRecord>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
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
