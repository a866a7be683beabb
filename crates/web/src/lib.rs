//! The web portal: server-rendered pages on the same listeners as the API.
//!
//! Architecture invariant: the portal decides nothing itself. Every change and every listing
//! goes through the same application service the `/api/v1` handlers call (`basphere_service`),
//! with the same validation and audit; the portal reads a form into the same wire request type
//! (`basphere_wire`), checks the same authorization on its `Caller`, and turns the typed result
//! (or the `ApiError` the API would answer with) into a page.
//! Sessions and CSRF: see `session.rs`. Pages carry no inline script or style, so the
//! Content-Security-Policy allows only this origin.

// A refused request's `Err` is the page that says why (an axum `Response`); boxing it would
// only add noise on a path that ends the request anyway.
#![allow(clippy::result_large_err)]

mod admin;
mod api_docs;
mod assets;
mod html;
mod public;
mod session;
mod user;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use basphere_api::{AppState, PeerInfo};
use serde_json::{Map, Value};
use std::collections::HashMap;

pub use session::SESSION_HOURS;

/// The portal's routes, merged beside the API's by `basphere serve`.
pub fn router(state: AppState) -> Router {
    // Forms an anonymous visitor can send over and over: the API's per-client rate limit.
    let throttled = Router::new()
        .route(
            "/register",
            get(public::register_form).post(public::register),
        )
        .route("/signin", get(public::signin_form).post(public::signin))
        .route("/enroll", post(public::enroll))
        .route(
            "/key-change",
            get(user::key_change_form).post(user::key_change),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            throttle_posts,
        ));
    let cfg = state.config.clone();
    let app = Router::new()
        .merge(throttled)
        .route("/", get(public::home))
        .route("/success", get(public::success))
        .route("/key-change-success", get(public::key_change_success))
        .route("/ssh-guide", get(public::ssh_guide))
        .route("/api-docs", get(api_docs::page))
        .route("/signout", post(public::signout))
        .route("/dashboard", get(user::dashboard))
        .route("/vms", post(user::create))
        .route("/vms/{name}", get(user::vm_page))
        .route(
            "/vms/{name}/delete",
            get(user::delete_confirm).post(user::delete),
        )
        .route("/admin", get(admin::approvals))
        .route(
            "/admin/registrations/{u}/{decision}",
            post(admin::decide_registration),
        )
        .route("/admin/key-changes/{u}/{decision}", post(admin::decide_key))
        .route("/admin/users", get(admin::users))
        .route("/admin/users/{u}/quota", post(admin::set_quota))
        .route("/admin/users/{u}/{what}", post(admin::set_state))
        .route("/admin/vms", get(admin::vms))
        .route("/admin/audit", get(admin::audit))
        .route("/static/{file}", get(assets::serve))
        .layer(axum::middleware::map_response_with_state(
            state.clone(),
            security_headers,
        ))
        .with_state(state);
    // The portal's own forms get the 64 KiB body limit and the Host check even where the
    // server does not wrap the merged router in `basphere_api::limits::harden`.
    basphere_api::limits::harden(app, &cfg)
}

/// Counts a POST against the sender's rate limit; over it, a 429 page with `Retry-After`.
async fn throttle_posts(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::POST
        && let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<PeerInfo>>()
        && let Err(e) = basphere_api::limits::throttle(&st.config, peer)
    {
        let mut r = session::error_page_plain(e.status, &e.message);
        if let Some(s) = e.retry_after {
            r.headers_mut().insert(RETRY_AFTER, s.into());
        }
        return r;
    }
    next.run(req).await
}

/// The Content-Security-Policy of every page: this origin only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// [`CSP`] plus Google's reCAPTCHA script and frame (when reCAPTCHA is on).
const CSP_RECAPTCHA: &str = "default-src 'self'; \
     script-src 'self' https://www.google.com/recaptcha/ https://www.gstatic.com/recaptcha/; \
     frame-src https://www.google.com/recaptcha/ https://recaptcha.google.com/recaptcha/; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// Headers on every portal response: no inline code, no framing, no sniffing.
async fn security_headers(State(st): State<AppState>, mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    let csp = if st.config.recaptcha.enabled() {
        CSP_RECAPTCHA
    } else {
        CSP
    };
    set(h, "content-security-policy", csp);
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "x-frame-options", "DENY");
    if !h.contains_key("cache-control") {
        set(h, "cache-control", "no-store");
    }
    r
}

/// A form as the JSON object the API would get (for a wire request type's `read`): every field
/// but `csrf` as a string, blank optional fields left out.
pub(crate) fn body_of(form: &HashMap<String, String>, keep_blank: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in form {
        if k == "csrf" || (v.trim().is_empty() && !keep_blank.contains(&k.as_str())) {
            continue;
        }
        m.insert(k.clone(), Value::String(v.clone()));
    }
    m
}

/// A service's result with its refusal as the API would answer it.
pub(crate) fn api<T>(
    r: Result<T, basphere_service::ServiceError>,
) -> Result<T, basphere_api::ApiError> {
    r.map_err(basphere_api::ApiError::from)
}
