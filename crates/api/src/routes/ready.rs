//! `GET /ready`: 200 when the server can do its work, else 503 naming each failing check.
//! No authentication (load balancers and container health checks call it). Callers on the
//! Unix socket (the host's operators, `basphere doctor`) get each check's detail and fix; over
//! TCP only each check's name and status, so the public listener reveals no paths or hosts.

use crate::auth::PeerInfo;
use crate::envelope::{ApiError, ok};
use crate::openapi::Answer;
use crate::server::AppState;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use basphere_provider::{Check, all_ready};
use basphere_wire::{Envelope, Readiness, ReadyCheck};

#[utoipa::path(
    get, path = "/ready", tag = "meta", operation_id = "ready", summary = "Readiness",
    security(()),
    responses(
        (status = 200, description = "Ready: every check passes", body = Answer<Readiness>),
        (status = 503, description = "Not ready: `message` names the failing checks, `data` \
            holds every check", body = Envelope),
    ),
)]
pub(crate) async fn ready(State(st): State<AppState>, req: Request) -> Response {
    let local = matches!(
        req.extensions().get::<ConnectInfo<PeerInfo>>(),
        Some(ConnectInfo(PeerInfo::Unix { .. }))
    );
    let checks = st.services.readiness().await;
    let shown = checks
        .iter()
        .map(|c| ReadyCheck {
            name: c.name.clone(),
            status: c.status.as_str().to_string(),
            detail: local.then(|| c.detail.clone()),
            fix: c.fix.clone().filter(|_| local),
        })
        .collect();
    let ready = all_ready(&checks);
    let data = Readiness {
        ready,
        checks: shown,
    };
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
