//! Request bodies: size-limited, JSON-checked, and read field by field so that every bad
//! field is reported at once.

use crate::envelope::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use basphere_core::FieldErrors;
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
            Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
        }
    }
}

impl Body {
    /// A string field; records an error if present with another type, or absent when `required`.
    pub fn str(&self, key: &str, required: bool, errs: &mut FieldErrors) -> Option<String> {
        match self.0.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => {
                if required {
                    errs.push(key, "is required");
                }
                None
            }
            Some(_) => {
                errs.push(key, "must be a string");
                None
            }
        }
    }

    /// A whole-number field.
    pub fn int(&self, key: &str, errs: &mut FieldErrors) -> Option<i64> {
        match self.0.get(key) {
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => Some(v),
                None => {
                    errs.push(key, "must be a whole number");
                    None
                }
            },
            Some(Value::String(s)) => match s.parse() {
                Ok(v) => Some(v),
                Err(_) => {
                    errs.push(key, "must be a whole number");
                    None
                }
            },
            None | Some(Value::Null) => None,
            Some(_) => {
                errs.push(key, "must be a whole number");
                None
            }
        }
    }
}
