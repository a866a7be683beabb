//! Operations and their event streams. The SSE streams read the store's event log and the
//! engine's broadcast directly: a service wrapper would only pass them through.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, ok};
use crate::limits::StreamSlot;
use crate::openapi::{self as doc, Answer};
use crate::routes::page::{PageQuery, page};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use basphere_service::convert;
use basphere_store::WorkflowEvent;
use basphere_wire as wire;
use futures_util::Stream;
use serde::Deserialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

#[utoipa::path(
    get, path = "/operations/{id}", tag = "operations", operation_id = "show_operation",
    summary = "An operation with its steps",
    params(("id" = String, Path, description = "The operation's id")),
    responses(
        (status = 200, description = "The operation", body = Answer<wire::Operation>),
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
    let w = st.services.operation(&me, &id).await?;
    Ok(ok(format!("operation {id}: {}", w.status), w))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Everyone's operations (admin).
    #[serde(default)]
    pub all: bool,
}

/// `GET /operations?all=&limit=&after=`: operations, newest first (see `page`).
#[utoipa::path(
    get, path = "/operations", tag = "operations", operation_id = "list_operations",
    summary = "Operations, newest first (everyone's: admin)",
    params(ListQuery, PageQuery),
    responses(
        (status = 200, description = "One page of operations", body = Answer<Vec<wire::Operation>>, headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow"))),
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
    let me = caller.principal()?;
    if q.all && !me.admin {
        return Err(ApiError::forbidden(
            "listing everyone's operations needs an admin",
        ));
    }
    let owner = (!q.all).then(|| me.name());
    let w = st.services.operations(owner, &p.paging()).await?;
    Ok(page(|n| format!("{n} operation(s)"), w))
}

/// The first event of a stream whose replay was cut short: events up to `skipped_through`
/// are not sent. The client should reload current state (`GET /operations`, `GET /vms`) and
/// go on with the events that follow; the events' ids still allow `after=` / `Last-Event-ID`.
fn truncated(asked_after: i64, skipped_through: i64, bound: u32) -> Event {
    Event::default()
        .event("truncated")
        .json_data(serde_json::json!({
            "after": asked_after,
            "skipped_through": skipped_through,
            "message": format!(
                "this stream replays at most the last {bound} events (limits.stream_replay); \
                 events up to {skipped_through} are left out: reload the current state with \
                 GET /api/v1/operations and go on from here"
            ),
        }))
        .unwrap_or_default()
}

fn event_of(ev: &WorkflowEvent) -> Event {
    Event::default()
        .id(ev.seq.to_string())
        .event(ev.kind.clone())
        .json_data(convert::event(ev))
        .unwrap_or_default()
}

fn terminal(kind: &str) -> bool {
    matches!(kind, "succeeded" | "failed" | "cancelled")
}

/// How often an idle stream sends a comment; a write to a closed connection ends the stream.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// `GET /operations/{id}/events`: Server-Sent Events, one per step transition, replayed from
/// the start (at most `limits.stream_replay` of them), ending after the operation's final
/// event or when the client goes away.
#[utoipa::path(
    get, path = "/operations/{id}/events", tag = "operations", operation_id = "operation_events",
    summary = "An operation's events as Server-Sent Events, until it ends",
    params(("id" = String, Path, description = "The operation's id")),
    responses(
        (status = 200, description = "`text/event-stream`: one event per transition (its `data` an `Event`), replayed from the start; the stream ends after the final one", content_type = "text/event-stream", body = doc::StreamEvent),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 429, response = doc::TooManyRequests),
    ),
)]
pub async fn events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    st.services.operation(&caller.principal()?, &id).await?;
    let slot = StreamSlot::open(&st.config, &caller.name)?;
    let bound = st.config.limits.stream_replay;
    let mut live = st.engine.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = 0;
        let Ok(past) = st.store.events(&id, 0).await else {
            return;
        };
        // A retried operation's log holds its earlier ending: replay from the last retry on.
        let mut from = past.iter().rposition(|e| e.kind == "retried").unwrap_or(0);
        if past.len() - from > bound as usize {
            let cut = past.len() - bound as usize;
            if tx
                .send(Ok(truncated(0, past[cut - 1].seq, bound)))
                .await
                .is_err()
            {
                return;
            }
            from = cut;
        }
        for ev in &past[from..] {
            last = ev.seq;
            if tx.send(Ok(event_of(ev))).await.is_err() || terminal(&ev.kind) {
                return;
            }
        }
        last = last.max(past.last().map_or(0, |e| e.seq));
        loop {
            let r = tokio::select! {
                r = live.recv() => r,
                _ = tx.closed() => return,
            };
            match r {
                Ok(ev) if ev.operation_id == id && ev.seq > last => {
                    last = ev.seq;
                    if tx.send(Ok(event_of(&ev))).await.is_err() || terminal(&ev.kind) {
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
                        if tx.send(Ok(event_of(ev))).await.is_err() || terminal(&ev.kind) {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this batch's operations.
    batch: Option<String>,
    /// Replay events after this sequence number first (else `Last-Event-ID`).
    after: Option<i64>,
}

/// `GET /events`: Server-Sent Events for every operation the caller may see (admins: all),
/// or one batch's. Each event's id is its sequence number, for `?after=` (or the browser's
/// `Last-Event-ID`) on reconnect. Replays at most `limits.stream_replay` events; an older
/// `after` starts the stream with a `truncated` event. Ends when the client goes away.
#[utoipa::path(
    get, path = "/events", tag = "operations", operation_id = "events",
    summary = "Events of every operation the caller may see, as Server-Sent Events",
    params(EventsQuery),
    responses(
        (status = 200, description = "`text/event-stream`: one event per transition (its `data` an `Event`, its id the sequence number); open until the client goes away", content_type = "text/event-stream", body = doc::StreamEvent),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 429, response = doc::TooManyRequests),
    ),
)]
pub async fn events_all(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let principal = caller.principal()?;
    let (me, admin) = (principal.name().to_string(), principal.admin);
    if let Some(b) = &q.batch {
        st.services.check_batch(&principal, b).await?;
    }
    let after = q.after.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    });
    let slot = StreamSlot::open(&st.config, &caller.name)?;
    let bound = st.config.limits.stream_replay;
    let mut live = st.engine.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        let _slot = slot;
        // Workflow id → whether this stream shows it.
        let mut shown: HashMap<String, bool> = HashMap::new();
        if let Some(b) = &q.batch
            && let Ok(ws) = st.store.batch_workflows(b).await
        {
            for w in ws {
                shown.insert(w.id, true);
            }
        }
        let batch = q.batch.clone();
        let show = async |ev: &WorkflowEvent, shown: &mut HashMap<String, bool>| -> bool {
            if let Some(s) = shown.get(&ev.operation_id) {
                return *s;
            }
            let ok = batch.is_none()
                && match st.store.workflow(&ev.operation_id).await {
                    Ok(Some(w)) => admin || w.owner == me,
                    _ => false,
                };
            shown.insert(ev.operation_id.clone(), ok);
            ok
        };
        // The store's event log is the source of truth (it also holds what admission and
        // other server processes wrote); the engine's broadcast only says "look again".
        // SQLite commits one writer at a time, so seq order is commit order. (PostgreSQL:
        // sequence values can commit out of order; read with a short settle delay there.)
        let Ok(newest) = st.store.last_event_seq().await else {
            return;
        };
        let oldest_kept = newest - i64::from(bound);
        let mut last = match (after, &q.batch) {
            (Some(a), _) => a,
            (None, Some(_)) => 0,
            (None, None) => newest,
        };
        if last < oldest_kept {
            // Only say so when something was really left out (a fresh log starts at 1).
            let skipped = st
                .store
                .events_since(last, 1)
                .await
                .ok()
                .and_then(|p| p.first().map(|e| e.seq <= oldest_kept))
                .unwrap_or(false);
            if skipped
                && tx
                    .send(Ok(truncated(last, oldest_kept, bound)))
                    .await
                    .is_err()
            {
                return;
            }
            last = oldest_kept;
        }
        // PostgreSQL: sequence values can commit out of order (concurrent transactions,
        // replicas), so each read looks back a little and skips what was sent already.
        let lookback = if st.store.backend() == "postgres" {
            256
        } else {
            0
        };
        let mut sent: std::collections::BTreeSet<i64> = Default::default();
        let start = last;
        loop {
            let Ok(page) = st.store.events_since((last - lookback).max(0), 1000).await else {
                return;
            };
            for ev in &page {
                let seen = if lookback == 0 {
                    ev.seq <= last
                } else {
                    ev.seq <= start || sent.contains(&ev.seq)
                };
                if seen {
                    continue;
                }
                last = last.max(ev.seq);
                if lookback > 0 {
                    sent.insert(ev.seq);
                }
                if show(ev, &mut shown).await && tx.send(Ok(event_of(ev))).await.is_err() {
                    return;
                }
            }
            // Forget what fell out of the window.
            sent = sent.split_off(&(last - lookback));
            if page.len() == 1000 {
                continue;
            }
            tokio::select! {
                r = live.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                        return;
                    }
                    // Coalesce a burst of transitions into one read.
                    while live.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
