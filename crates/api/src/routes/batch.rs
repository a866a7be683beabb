//! Batches (plan/apply of manifests) and operation cancel/retry. The global event stream is
//! `ops::events_all`.
//!
//! `POST /batches/plan` and `POST /batches` take `{"manifest": TEXT, "format": "toml"|"yaml",
//! "parallelism": N}`; planning and admission are `Services::plan` and `Services::apply`.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::openapi::{self as doc, Answer};
use crate::server::AppState;
use axum::extract::{Path, State};
use basphere_service::BatchOutcome;
use basphere_wire as wire;
use basphere_wire::BatchRequest;

/// `POST /batches/plan`: what applying the manifest would do.
#[utoipa::path(
    post, path = "/batches/plan", tag = "batches", operation_id = "plan_batch",
    summary = "What applying a manifest would do",
    request_body = wire::BatchRequest,
    responses(
        (status = 200, description = "The plan", body = Answer<wire::Planned>),
        (status = 403, response = doc::Forbidden),
        (status = 422, response = doc::Unprocessable),
    ),
)]
pub async fn plan(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let p = st.services.plan(&me, &BatchRequest::read(&body.0)).await?;
    Ok(ok(format!("plan: {}", p.summary()), p.wire()))
}

/// `POST /batches`: plans the manifest and admits it as one batch (202).
#[utoipa::path(
    post, path = "/batches", tag = "batches", operation_id = "apply_batch",
    summary = "Plan a manifest and admit it as one batch",
    request_body = wire::BatchRequest,
    responses(
        (status = 200, description = "Nothing to do: no batch", body = Answer<wire::BatchApplied>),
        (status = 202, description = "Admitted: an operation per node", body = Answer<wire::BatchApplied>, links(
            ("show" = (operation_id = "show_batch", parameters(("id" = "$response.body#/data/batch_id")))),
            ("operation" = (operation_id = "show_operation", parameters(("id" = "$response.body#/data/nodes/0/operation_id")))),
        )),
        (status = 403, response = doc::Forbidden),
        (status = 409, response = doc::Conflict),
        (status = 422, response = doc::Unprocessable),
        (status = 503, response = doc::Unavailable),
    ),
)]
pub async fn apply(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    match st.services.apply(&me, &BatchRequest::read(&body.0)).await? {
        BatchOutcome::Admitted(d) => Ok(accepted(d.message, d.data)),
        BatchOutcome::NothingToDo(d) => Ok(ok(d.message, d.data)),
    }
}

/// `GET /batches/{id}`: every node's state.
#[utoipa::path(
    get, path = "/batches/{id}", tag = "batches", operation_id = "show_batch",
    summary = "Every node of a batch and its state",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = Answer<wire::Batch>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
    ),
)]
pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let (b, done) = st.services.batch(&me, &id).await?;
    Ok(ok(format!("batch {id}: {done}/{} ended", b.nodes.len()), b))
}

/// `POST /operations/{id}/cancel`: stops at the next step boundary and undoes (202).
#[utoipa::path(
    post, path = "/operations/{id}/cancel", tag = "operations", operation_id = "cancel_operation",
    summary = "Cancel an operation: it stops at the next step and undoes",
    params(("id" = String, Path, description = "The operation's id")),
    responses(
        (status = 202, description = "Cancel requested", body = Answer<Option<wire::Operation>>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st.services.cancel(&me, &id).await?;
    Ok(accepted(d.message, d.data))
}

/// `POST /operations/{id}/retry`: queues a failed or cancelled operation again (202).
#[utoipa::path(
    post, path = "/operations/{id}/retry", tag = "operations", operation_id = "retry_operation",
    summary = "Queue a failed or cancelled operation again",
    params(("id" = String, Path, description = "The operation's id")),
    responses(
        (status = 202, description = "Queued again", body = Answer<Option<wire::Operation>>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
pub async fn retry(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st.services.retry(&me, &id).await?;
    Ok(accepted(d.message, d.data))
}
