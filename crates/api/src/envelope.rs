use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
pub use basphere_wire::Envelope;
use serde::Serialize;
use serde_json::Value;

/// A successful response: its status and its body, the envelope with the data serialized
/// straight from the route's wire type into it (no `Value` tree, no second copy).
pub struct Ok200(pub StatusCode, Vec<u8>);

impl Ok200 {
    fn new(status: StatusCode, message: &str, data: impl Serialize) -> Self {
        Ok200(status, body(message, &data))
    }
}

impl IntoResponse for Ok200 {
    fn into_response(self) -> Response {
        (
            self.0,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.1,
        )
            .into_response()
    }
}

/// `{"success":true,"message":…,"data":…,"errors":[]}`, as [`Envelope`] writes it; data that
/// cannot be serialized is `null`.
fn body(message: &str, data: &impl Serialize) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    b.extend_from_slice(br#"{"success":true,"message":"#);
    serde_json::to_writer(&mut b, message).expect("a string serializes");
    b.extend_from_slice(br#","data":"#);
    let at = b.len();
    if serde_json::to_writer(&mut b, data).is_err() {
        b.truncate(at);
        b.extend_from_slice(b"null");
    }
    b.extend_from_slice(br#","errors":[]}"#);
    b
}

/// Builds a 200 response with `data` serialized.
pub fn ok(message: impl AsRef<str>, data: impl Serialize) -> Ok200 {
    Ok200::new(StatusCode::OK, message.as_ref(), data)
}

/// Builds a 201 Created response.
pub fn created(message: impl AsRef<str>, data: impl Serialize) -> Ok200 {
    Ok200::new(StatusCode::CREATED, message.as_ref(), data)
}

/// Builds a 202 Accepted response (work continues in the background).
pub fn accepted(message: impl AsRef<str>, data: impl Serialize) -> Ok200 {
    Ok200::new(StatusCode::ACCEPTED, message.as_ref(), data)
}

/// The prototype's message of a 400 whose `errors` name each bad field.
pub const VALIDATION_FAILED: &str = "Validation failed";

/// The prototype's message of a 400 whose body is not a JSON object.
pub const INVALID_JSON: &str = "Invalid JSON";

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub errors: Vec<String>,
    pub data: Value,
    /// The bad input fields of a validation failure, one by one (for forms that show errors
    /// inline).
    pub fields: Vec<basphere_core::FieldError>,
    /// Seconds the client should wait before trying again (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            errors: vec![],
            data: Value::Null,
            fields: vec![],
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    }
    pub fn with_errors(mut self, errors: Vec<String>) -> Self {
        self.errors = errors;
        self
    }
    /// Adds `Retry-After: secs` (at least 1) to the response.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(u32::try_from(secs).unwrap_or(u32::MAX).max(1));
        self
    }
    pub fn with_data(mut self, data: impl Serialize) -> Self {
        self.data = serde_json::to_value(data).unwrap_or(Value::Null);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let errors = if self.errors.is_empty() {
            vec![self.message.clone()]
        } else {
            self.errors
        };
        let mut r = (
            self.status,
            Json(Envelope {
                success: false,
                message: self.message,
                data: self.data,
                errors,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<basphere_store::StoreError> for ApiError {
    fn from(e: basphere_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl From<basphere_core::FieldErrors> for ApiError {
    fn from(e: basphere_core::FieldErrors) -> Self {
        let mut err = ApiError::bad_request(VALIDATION_FAILED).with_errors(e.lines());
        err.fields = e.0;
        err
    }
}

/// The one place a service's refusal becomes a status code and an envelope.
impl From<basphere_service::ServiceError> for ApiError {
    fn from(e: basphere_service::ServiceError) -> Self {
        use basphere_service::ServiceError as E;
        match e {
            E::Invalid(fields) => fields.into(),
            E::Unprocessable {
                message,
                errors,
                data,
            } => {
                let err =
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message).with_errors(errors);
                match data {
                    Some(d) => err.with_data(d),
                    None => err,
                }
            }
            E::BadRequest(m) => ApiError::bad_request(m),
            E::Unauthorized(m) => ApiError::unauthorized(m),
            E::Forbidden(m) => ApiError::forbidden(m),
            E::NotFound(m) => ApiError::not_found(m),
            E::Conflict(m) => ApiError::conflict(m),
            E::Quota(q) => ApiError::new(StatusCode::FORBIDDEN, q.to_string()).with_data(q),
            E::Unavailable {
                message,
                retry_after,
            } => {
                let err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message);
                match retry_after {
                    Some(s) => err.with_retry_after(s),
                    None => err,
                }
            }
            E::Internal(m) => ApiError::internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_success_body_is_the_envelope_byte_for_byte() {
        let message = "2 VM(s) \"web\"\n\u{1}é";
        let data = json!({"vms": [{"name": "a"}, {"name": "b"}], "total": 2});
        let b = body(message, &data);
        let e: Envelope = serde_json::from_slice(&b).expect("the body is an envelope");
        assert!(e.success);
        assert_eq!(e.message, message);
        assert_eq!(e.data, data);
        assert!(e.errors.is_empty());
        assert_eq!(serde_json::to_vec(&e).unwrap(), b, "as Envelope writes it");
    }

    #[test]
    fn data_that_cannot_be_serialized_is_null() {
        // JSON object keys must be strings: a map keyed by pairs fails part way through.
        let data: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let e: Envelope = serde_json::from_slice(&body("m", &data)).expect("still JSON");
        assert_eq!(e.data, Value::Null);
        assert_eq!(e.message, "m");
    }
}
