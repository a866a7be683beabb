use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, ok};
use crate::routes::page::{PageQuery, page};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use basphere_store::Workflow;
use futures_util::Stream;
use serde::Deserialize;
use std::convert::Infallible;
use tokio_stream::wrappers::ReceiverStream;

async fn visible(st: &AppState, caller: &Caller, id: &str) -> Result<Workflow, ApiError> {
    let me = caller.active()?;
    let wf = st.store.workflow(id).await?;
    match wf {
        Some(w) if caller.is_admin() || w.owner == me.username.as_str() => Ok(w),
        _ => Err(ApiError::not_found(format!("operation {id} not found"))),
    }
}

pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let w = visible(&st, &caller, &id).await?;
    Ok(ok(format!("operation {id}: {}", w.status), w))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub all: bool,
}

/// `GET /operations?all=&limit=&after=`: operations, newest first (see `page`).
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let me = caller.active()?;
    if q.all && !caller.is_admin() {
        return Err(ApiError::forbidden(
            "listing everyone's operations needs an admin",
        ));
    }
    let owner = (!q.all).then(|| me.username.to_string());
    let limit = PageQuery {
        limit: Some(p.limit.unwrap_or(50)),
        after: None,
    }
    .limit()?;
    let w = st
        .store
        .workflows_page(owner.as_deref(), p.after.as_deref(), limit + 1)
        .await?;
    Ok(page(
        |n| format!("{n} operation(s)"),
        w,
        limit,
        |w| w.id.clone(),
    ))
}

/// `GET /operations/{id}/events`: Server-Sent Events, one per step transition, replayed from
/// the start, ending after the operation's final event.
pub async fn events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    visible(&st, &caller, &id).await?;
    let mut live = st.engine.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let send = |ev: &basphere_store::WorkflowEvent| {
            Event::default()
                .id(ev.seq.to_string())
                .event(ev.kind.clone())
                .json_data(ev)
                .unwrap_or_default()
        };
        let terminal = |k: &str| matches!(k, "succeeded" | "failed" | "cancelled");
        let mut last = 0;
        let Ok(past) = st.store.events(&id, 0).await else {
            return;
        };
        // A retried operation's log holds its earlier ending: replay from the last retry on.
        let from = past.iter().rposition(|e| e.kind == "retried").unwrap_or(0);
        for ev in &past[from..] {
            last = ev.seq;
            if tx.send(Ok(send(ev))).await.is_err() || terminal(&ev.kind) {
                return;
            }
        }
        last = last.max(past.last().map_or(0, |e| e.seq));
        loop {
            match live.recv().await {
                Ok(ev) if ev.operation_id == id && ev.seq > last => {
                    last = ev.seq;
                    if tx.send(Ok(send(&ev))).await.is_err() || terminal(&ev.kind) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let Ok(missed) = st.store.events(&id, last).await else {
                        return;
                    };
                    for ev in &missed {
                        last = ev.seq;
                        if tx.send(Ok(send(ev))).await.is_err() || terminal(&ev.kind) {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()))
}
