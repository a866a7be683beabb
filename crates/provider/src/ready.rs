//! Readiness checks: what a part of the server needs to do its work, checked now. The server's
//! `/ready` and `basphere doctor` show the same [`Check`]s; a provider offers its own through
//! [`crate::Provider::readiness`].

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    /// Works, but worse than it could (e.g. TCG emulation without KVM): an operator should look.
    Warn,
    /// The server cannot do this part of its work: `/ready` answers 503.
    Fail,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

/// One named check: its outcome, what was found, and what to do when it is not ok.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Dotted name, part first: `database`, `engine`, `provider.session`, `qemu.kvm`.
    pub name: String,
    pub status: CheckStatus,
    /// What was found, in one line (never a secret); empty in `/ready` answers over TCP.
    #[serde(default)]
    pub detail: String,
    /// What an operator does about it; absent when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status: CheckStatus::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status: CheckStatus::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn failed(&self) -> bool {
        self.status == CheckStatus::Fail
    }
}

/// The future [`crate::Provider::readiness`] returns.
pub type ReadinessFuture<'a> = Pin<Box<dyn Future<Output = Vec<Check>> + Send + 'a>>;

/// Whether none of `checks` failed.
pub fn all_ready(checks: &[Check]) -> bool {
    !checks.iter().any(Check::failed)
}
