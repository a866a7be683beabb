use basphere_accounts::AccountError;
use basphere_core::{FieldErrors, QuotaExceeded};
use basphere_store::{OpError, StoreError, UserError};
use serde_json::Value;

/// Why a service refused or failed. Each variant's message says what went wrong and what to
/// do; the API maps each variant to one status code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad input fields, all of them.
    #[error("invalid input")]
    Invalid(FieldErrors),
    /// Well-formed input that cannot be acted on (a manifest's problems), each listed.
    #[error("{message}")]
    Unprocessable {
        message: String,
        errors: Vec<String>,
        data: Option<Value>,
    },
    /// A malformed query (a page size out of range, an unknown status).
    #[error("{0}")]
    BadRequest(String),
    /// The credentials presented are wrong, used or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing (or not the caller's to see).
    #[error("{0}")]
    NotFound(String),
    /// The thing is in a state that does not allow this now.
    #[error("{0}")]
    Conflict(String),
    /// The request would exceed the owner's quota.
    #[error(transparent)]
    Quota(QuotaExceeded),
    /// The server cannot take this now; try again later (after `retry_after` seconds).
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Option<u64>,
    },
    /// Something failed on the server; the message says what.
    #[error("{0}")]
    Internal(String),
}

pub(crate) type Result<T> = std::result::Result<T, ServiceError>;

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        ServiceError::Internal(e.to_string())
    }
}

impl From<FieldErrors> for ServiceError {
    fn from(e: FieldErrors) -> Self {
        ServiceError::Invalid(e)
    }
}

impl From<UserError> for ServiceError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Taken(_) | UserError::State(_) => ServiceError::Conflict(e.to_string()),
            UserError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            UserError::PoolFull => ServiceError::Unavailable {
                message: e.to_string(),
                retry_after: None,
            },
            UserError::Store(e) => e.into(),
        }
    }
}

impl From<OpError> for ServiceError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            OpError::Store(e) => e.into(),
            e => ServiceError::Conflict(e.to_string()),
        }
    }
}

impl From<AccountError> for ServiceError {
    fn from(e: AccountError) -> Self {
        let msg = e.to_string();
        ServiceError::account(&e, msg)
    }
}

impl ServiceError {
    /// `msg` (which explains `e`) as a conflict when the host refused, a failure when it failed.
    pub(crate) fn account(e: &AccountError, msg: String) -> Self {
        match e {
            AccountError::Refused(_) => ServiceError::Conflict(msg),
            AccountError::Failed(_) => ServiceError::Internal(msg),
        }
    }
}
