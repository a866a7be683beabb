//! The engine's own step failure, independent of any provider.

use std::fmt;

/// How a step failed, which decides what the engine does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepErrorKind {
    /// Trying the same step again may succeed (timeouts, busy hosts, lost connections); the
    /// engine retries it under the step's [`RetryPolicy`](crate::RetryPolicy).
    Retryable,
    /// Trying again will not help; the engine undoes the done steps and fails the workflow.
    Permanent,
    /// The step stopped because its work was called off; like a permanent failure it is not
    /// retried, and the done steps are undone.
    Cancelled,
}

/// A step's failure: its [`StepErrorKind`] and one line saying what failed and, where known,
/// what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    kind: StepErrorKind,
    message: String,
}

impl StepError {
    pub fn new(kind: StepErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::Retryable, message)
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::Permanent, message)
    }

    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::Cancelled, message)
    }

    pub fn kind(&self) -> StepErrorKind {
        self.kind
    }

    pub fn is_retryable(&self) -> bool {
        self.kind == StepErrorKind::Retryable
    }

    /// The one-line description, as shown to users and stored with the step.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// Keeps the provider's classification and its message text unchanged.
impl From<basphere_provider::ProviderError> for StepError {
    fn from(e: basphere_provider::ProviderError) -> Self {
        let kind = if e.retryable {
            StepErrorKind::Retryable
        } else {
            StepErrorKind::Permanent
        };
        Self::new(kind, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basphere_provider::ProviderError;

    #[test]
    fn provider_errors_keep_their_class_and_text() {
        let r = StepError::from(ProviderError::retryable("host busy: try again"));
        assert_eq!(r, StepError::retryable("host busy: try again"));
        assert!(r.is_retryable());
        assert_eq!(r.to_string(), "host busy: try again");

        let p = StepError::from(ProviderError::permanent("no such image"));
        assert_eq!(p.kind(), StepErrorKind::Permanent);
        assert!(!p.is_retryable());
        assert_eq!(p.message(), "no such image");
    }

    #[test]
    fn only_retryable_is_retried() {
        assert!(StepError::retryable("x").is_retryable());
        assert!(!StepError::permanent("x").is_retryable());
        let c = StepError::cancelled("called off");
        assert!(!c.is_retryable());
        assert_eq!(c.kind(), StepErrorKind::Cancelled);
        assert_eq!(c.to_string(), "called off");
    }
}
