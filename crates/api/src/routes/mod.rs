//! The `/api/v1` handlers: parse → authorize → one `basphere_service` call → envelope.

pub mod batch;
pub mod ops;
pub mod page;
mod ready;
pub mod users;
pub mod vms;

use crate::envelope::{ApiError, ok};
use crate::limits;
use crate::server::AppState;
use axum::Router;
use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

pub(crate) fn all() -> Router<AppState> {
    let v1 = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready::ready))
        .route("/register", post(limits::register))
        .route("/enroll", post(limits::enroll))
        .route("/me", get(users::me))
        .route("/pending", get(users::pending))
        .route("/pending/{username}", get(users::pending_one))
        .route("/users", get(users::list).post(users::add))
        .route("/users/{username}", get(users::show).delete(users::delete))
        .route("/users/{username}/approve", post(users::approve))
        .route("/users/{username}/reject", post(users::reject))
        .route("/users/{username}/disable", post(users::disable))
        .route("/users/{username}/enable", post(users::enable))
        .route("/users/{username}/quota", put(users::set_quota))
        .route("/key-change", post(users::key_change))
        .route("/key-changes", get(users::key_changes))
        .route("/key-changes/{username}", get(users::key_changes_of))
        .route("/key-changes/{username}/approve", post(users::key_approve))
        .route("/key-changes/{username}/reject", post(users::key_reject))
        .route("/tokens", get(users::tokens).post(users::token_create))
        .route("/tokens/{id}", axum::routing::delete(users::token_revoke))
        .route("/audit", get(users::audit_page))
        .route("/catalog", get(vms::catalog))
        .route("/vms", get(vms::list_page).post(vms::create))
        .route("/vms/{name}", get(vms::show).delete(vms::delete))
        .route("/quota", get(vms::quota))
        .route("/resources", get(vms::resources))
        .route("/operations", get(ops::list))
        .route("/operations/{id}", get(ops::show))
        .route("/operations/{id}/events", get(ops::events))
        .route("/operations/{id}/cancel", post(batch::cancel))
        .route("/operations/{id}/retry", post(batch::retry))
        .route("/events", get(ops::events_all))
        .route("/batches", post(batch::apply))
        .route("/batches/plan", post(batch::plan))
        .route("/batches/{id}", get(batch::show))
        .route("/clusters", get(clusters).post(clusters))
        .route("/clusters/quota", get(clusters))
        .route("/clusters/{name}", get(clusters).delete(clusters))
        .route("/clusters/{name}/kubeconfig", get(clusters))
        .route("/clusters/{name}/status", get(clusters))
        .route_layer(axum::middleware::from_fn(limits::require_json));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready::ready))
        .nest("/api/v1", v1)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(envelope_errors))
        .fallback(not_found)
}

/// Middleware: an error answered by something other than a handler (axum's rejection of a
/// path or query, a body over the limit, a method the route lacks) gets the envelope too, with
/// its text as the message; its status and headers (`Allow`, `Retry-After`) are kept.
async fn envelope_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/json") || ct.starts_with("text/event-stream")
        });
    if !(r.status().is_client_error() || r.status().is_server_error()) || json {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let mut out = ApiError::new(parts.status, message).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; see the header Allow for the methods it takes",
            uri.path()
        ),
    )
}

async fn health() -> impl IntoResponse {
    // The prototype's message (`TestHealthCheck`).
    ok(
        "OK",
        basphere_wire::Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            streams: limits::open_streams(),
        },
    )
}

async fn clusters() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "clusters are not available yet (they arrive with Stage 2); use VMs for now",
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /api/v1 routes in the README")
}
