//! Every HTTP request: a request id (a valid incoming `X-Request-Id`, else a new UUIDv7)
//! echoed in `X-Request-Id` and held by the request's tracing span (with the method, the route
//! template and, once authenticated, the user), one log line when it is answered, and the HTTP
//! metrics: `basphere_http_requests_total{method,route,status}` and
//! `basphere_http_request_duration_seconds{method,route}`.
//!
//! The route is the template (`/api/v1/vms/{name}`), never the raw path, so the metrics stay a
//! fixed set of series whatever clients send; requests that match no route count as
//! `unmatched`. An event stream's request is answered (and timed) when its headers go out.

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;
use tracing::Instrument;

/// The request id header, read and echoed.
pub const REQUEST_ID: &str = "x-request-id";

/// `app` with every route observed (ids, spans, metrics). Apply last, so it sees every answer
/// (the `Host` check's and the body limit's too).
pub fn observe(app: Router) -> Router {
    app.layer(axum::middleware::from_fn(middleware))
}

/// An incoming id is kept when it is 1-64 characters of `[A-Za-z0-9._:-]` (it reaches logs).
fn valid(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

async fn middleware(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = req.method().as_str().to_string();
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = %route,
        user = tracing::field::Empty,
    );
    let mut resp = next.run(req).instrument(span.clone()).await;
    let secs = start.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    span.in_scope(|| tracing::info!(status, duration_ms = (secs * 1000.0) as u64, "answered"));
    metrics::counter!(
        "basphere_http_requests_total",
        "method" => method.clone(),
        "route" => route.clone(),
        "status" => status.to_string(),
    )
    .increment(1);
    metrics::histogram!(
        "basphere_http_request_duration_seconds",
        "method" => method,
        "route" => route,
    )
    .record(secs);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_short_plain_ids_are_kept() {
        assert!(super::valid("0192f0c4-7d2a-7b1e-9a1f-6e2f3c4d5e6f"));
        assert!(super::valid("lb:abc.123_x"));
        assert!(!super::valid(""));
        assert!(!super::valid(&"a".repeat(65)));
        assert!(!super::valid("a b"));
        assert!(!super::valid("a\"}{"));
    }
}
