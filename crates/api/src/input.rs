//! Request bodies: size-limited and JSON-checked. Their fields are read into the wire request
//! types (`basphere_wire::*Request::read`), which report every field of the wrong type at once.

use crate::envelope::{ApiError, INVALID_JSON};
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::{Map, Value};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A JSON object body.
pub struct Body(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {} KiB", MAX_BODY / 1024),
                )
            } else {
                ApiError::bad_request(format!("cannot read request body: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Ok(Body(Map::new()));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::bad_request(INVALID_JSON)
                .with_errors(vec!["the request body must be a JSON object".into()])),
            Err(e) => Err(ApiError::bad_request(INVALID_JSON)
                .with_errors(vec![format!("the request body is not valid JSON: {e}")])),
        }
    }
}
