//! `GET /ready`: 200 when the server can do its work, else 503 naming each failing check.
//! No authentication (load balancers and container health checks call it). Callers on the
//! Unix socket (the host's operators, `basphere doctor`) get each check's detail and fix; over
//! TCP only each check's name and status, so the public listener reveals no paths or hosts.

use crate::auth::PeerInfo;
use crate::envelope::{ApiError, ok};
use crate::server::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use basphere_provider::{Check, all_ready};
use serde_json::json;

pub(crate) async fn ready(State(st): State<AppState>, req: Request) -> Response {
    let local = matches!(
        req.extensions().get::<ConnectInfo<PeerInfo>>(),
        Some(ConnectInfo(PeerInfo::Unix { .. }))
    );
    let checks = st.services.readiness().await;
    let shown: Vec<serde_json::Value> = checks
        .iter()
        .map(|c| {
            if local {
                serde_json::to_value(c).unwrap_or_default()
            } else {
                json!({"name": c.name, "status": c.status})
            }
        })
        .collect();
    let ready = all_ready(&checks);
    let data = json!({"ready": ready, "checks": shown});
    if ready {
        return ok("ready", data).into_response();
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| c.failed()).collect();
    let names: Vec<&str> = failed.iter().map(|c| c.name.as_str()).collect();
    let errors = failed
        .iter()
        .map(|c| {
            if local {
                format!("{}: {}", c.name, c.detail)
            } else {
                format!("{}: failed", c.name)
            }
        })
        .collect();
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}", names.join(", ")),
    )
    .with_errors(errors)
    .with_data(data)
    .into_response()
}
