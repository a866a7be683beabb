//! Batches (plan/apply of manifests) and operation cancel/retry. The global event stream is
//! `ops::events_all`.
//!
//! `POST /batches/plan` and `POST /batches` take `{"manifest": TEXT, "format": "toml"|"yaml",
//! "parallelism": N}`; planning and admission are `Services::plan` and `Services::apply`.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::server::AppState;
use axum::extract::{Path, State};
use basphere_service::BatchOutcome;
use basphere_wire::BatchRequest;

/// `POST /batches/plan`: what applying the manifest would do.
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
pub async fn retry(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st.services.retry(&me, &id).await?;
    Ok(accepted(d.message, d.data))
}
