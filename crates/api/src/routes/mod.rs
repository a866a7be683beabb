//! The `/api/v1` handlers: parse → authorize → one `basphere_service` call → envelope.

pub mod batch;
pub(crate) mod clusters;
pub mod ops;
pub mod page;
pub(crate) mod ready;
pub mod users;
pub mod vms;

use crate::envelope::{ApiError, ok};
use crate::limits;
use crate::openapi::Answer;
use crate::server::AppState;
use axum::Router;
use axum::extract::Request;
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};

/// Declares the `/api/v1` routes once: the router is built from this table, and
/// [`V1_ROUTES`] names each path with its methods, for the test that holds the OpenAPI
/// document (`crate::openapi`) and the router to the same routes.
macro_rules! v1_routes {
    ($($path:literal => $m0:ident($h0:expr) $(. $m:ident($h:expr))*;)+) => {
        /// Every `/api/v1` route: its path (below `/api/v1`) and its methods, lowercase.
        pub const V1_ROUTES: &[(&str, &[&str])] =
            &[$(($path, &[stringify!($m0) $(, stringify!($m))*])),+];

        fn v1_router() -> Router<AppState> {
            Router::new()$(.route($path, $m0($h0)$(.$m($h))*))+
        }
    };
}

v1_routes! {
    "/health" => get(health);
    "/ready" => get(ready::ready);
    "/openapi.json" => get(crate::openapi::serve);
    "/register" => post(limits::register);
    "/enroll" => post(limits::enroll);
    "/me" => get(users::me);
    "/pending" => get(users::pending);
    "/pending/{username}" => get(users::pending_one);
    "/users" => get(users::list).post(users::add);
    "/users/{username}" => get(users::show).delete(users::delete);
    "/users/{username}/approve" => post(users::approve);
    "/users/{username}/reject" => post(users::reject);
    "/users/{username}/disable" => post(users::disable);
    "/users/{username}/enable" => post(users::enable);
    "/users/{username}/quota" => put(users::set_quota);
    "/key-change" => post(users::key_change);
    "/key-changes" => get(users::key_changes);
    "/key-changes/{username}" => get(users::key_changes_of);
    "/key-changes/{username}/approve" => post(users::key_approve);
    "/key-changes/{username}/reject" => post(users::key_reject);
    "/tokens" => get(users::tokens).post(users::token_create);
    "/tokens/{id}" => delete(users::token_revoke);
    "/audit" => get(users::audit_page);
    "/catalog" => get(vms::catalog);
    "/vms" => get(vms::list_page).post(vms::create);
    "/vms/{name}" => get(vms::show).delete(vms::delete);
    "/quota" => get(vms::quota);
    "/resources" => get(vms::resources);
    "/operations" => get(ops::list);
    "/operations/{id}" => get(ops::show);
    "/operations/{id}/events" => get(ops::events);
    "/operations/{id}/cancel" => post(batch::cancel);
    "/operations/{id}/retry" => post(batch::retry);
    "/events" => get(ops::events_all);
    "/batches" => post(batch::apply);
    "/batches/plan" => post(batch::plan);
    "/batches/{id}" => get(batch::show);
    "/clusters" => get(clusters::list).post(clusters::create);
    "/clusters/quota" => get(clusters::quota);
    "/clusters/{name}" => get(clusters::show).delete(clusters::delete);
    "/clusters/{name}/kubeconfig" => get(clusters::kubeconfig);
    "/clusters/{name}/status" => get(clusters::status);
}

pub(crate) fn all() -> Router<AppState> {
    let v1 = v1_router().route_layer(axum::middleware::from_fn(limits::require_json));
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

/// Always 200 while the process serves; `/ready` says whether it can do its work.
#[utoipa::path(
    get, path = "/health", tag = "meta", operation_id = "health", summary = "Liveness",
    security(()),
    responses((status = 200, description = "The server is alive", body = Answer<basphere_wire::Health>)),
)]
pub(crate) async fn health() -> impl IntoResponse {
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

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /api/v1 routes in the README")
}
