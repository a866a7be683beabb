//! The `/api/v1` handlers: parse → authorize → one `basphere_service` call → envelope.

pub mod batch;
pub mod ops;
pub mod page;
pub mod users;
pub mod vms;

use crate::envelope::{ApiError, ok};
use crate::limits;
use crate::server::AppState;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};

pub(crate) fn all() -> Router<AppState> {
    let v1 = Router::new()
        .route("/health", get(health))
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
        .nest("/api/v1", v1)
        .fallback(not_found)
}

async fn health() -> impl IntoResponse {
    ok(
        "ok",
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
