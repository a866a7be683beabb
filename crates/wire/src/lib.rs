//! The `/api/v1` wire format: every request and response body as a plain serde type.
//!
//! Architecture invariant: these types are the only `/api/v1` format. The server serializes
//! them (store rows are converted into them in one place per type, in `basphere-api`), the
//! client and CLI deserialize them, and the web portal builds the request types from its
//! forms. They hold no behaviour beyond reading a request body field by field.
//!
//! Compatibility: the JSON of each type is the prototype's contract. A field is added as an
//! `Option` with `#[serde(default, skip_serializing_if = "Option::is_none")]` (or a `Vec` with
//! `skip_serializing_if = "Vec::is_empty"`), so older clients and older servers keep working.

pub mod read;
mod requests;
mod responses;

pub use read::Object;
pub use requests::*;
pub use responses::*;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prototype's response body: `{success, message, data, errors}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Envelope {
    pub success: bool,
    pub message: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub errors: Vec<String>,
}
