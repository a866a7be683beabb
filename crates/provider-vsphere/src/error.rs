//! Errors of the SOAP client, typed by vSphere fault where the provider needs to tell them apart.

use std::time::Duration;

/// A failed vim25 call.
///
/// Messages say what failed and, where known, what to do; they never contain credentials or the
/// session cookie.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The server refused the username or password.
    #[error(
        "vCenter {server} rejected the login of user '{user}' (InvalidLogin): check username and password in the credentials file"
    )]
    InvalidLogin { server: String, user: String },
    /// The session expired and logging in again did not help.
    #[error("vCenter session is not authenticated (NotAuthenticated) even after logging in again")]
    NotAuthenticated,
    /// The VM is not in a power state that allows the operation (e.g. powering on a running VM).
    #[error("{op}: wrong power state (InvalidPowerState){}", detail(message))]
    InvalidPowerState { op: String, message: String },
    /// The object is not in a state that allows the operation (e.g. powering on a template).
    #[error("{op}: object is in the wrong state (InvalidState){}", detail(message))]
    InvalidState { op: String, message: String },
    /// An object with this name exists already.
    #[error("{op}: name already in use (DuplicateName){}", detail(message))]
    DuplicateName { op: String, message: String },
    /// The object does not exist (NotFound, ManagedObjectNotFound).
    #[error("{op}: object not found ({fault_type}){}", detail(message))]
    NotFound {
        op: String,
        fault_type: String,
        message: String,
    },
    /// Any other fault, from the call itself or from the task it started.
    #[error("{op} failed with {fault_type}{}", detail(message))]
    Fault {
        op: String,
        fault_type: String,
        message: String,
    },
    /// A task (or the call that starts it) did not finish within its deadline.
    #[error("{op} did not finish within {after:?}; vCenter may still be working on it")]
    Timeout { op: String, after: Duration },
    /// The server could not be reached or the connection broke.
    #[error("{op}: cannot reach vCenter at {server}: {message}")]
    Transport {
        op: String,
        server: String,
        message: String,
    },
    /// The server's TLS certificate is not trusted.
    #[error(
        "vCenter at {server} presented a certificate that is not trusted ({message}): set [vsphere.tls] ca_file to the CA that signed it, or insecure = true for a lab"
    )]
    Certificate { server: String, message: String },
    /// The server answered with something that is not a vim25 SOAP response.
    #[error("unexpected answer from vCenter to {op}: {message}")]
    Protocol { op: String, message: String },
    /// Local configuration is wrong (TLS files, credentials file, inventory paths).
    #[error("{0}")]
    Config(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Fault types after which the same call may succeed later.
const RETRYABLE_FAULTS: &[&str] = &[
    "TaskInProgress",
    "ResourceInUse",
    "HostCommunication",
    "HostNotConnected",
    "HostNotReachable",
    "RequestCanceled",
    "Timedout",
    "SystemError",
    "ConcurrentAccess",
    "InvalidHostState",
];

impl Error {
    /// Whether repeating the operation may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Transport { .. } | Error::NotAuthenticated => true,
            Error::Fault { fault_type, .. } => RETRYABLE_FAULTS.contains(&fault_type.as_str()),
            _ => false,
        }
    }

    /// The vSphere fault type name, if this error came from one.
    pub fn fault_type(&self) -> Option<&str> {
        Some(match self {
            Error::InvalidLogin { .. } => "InvalidLogin",
            Error::NotAuthenticated => "NotAuthenticated",
            Error::InvalidPowerState { .. } => "InvalidPowerState",
            Error::InvalidState { .. } => "InvalidState",
            Error::DuplicateName { .. } => "DuplicateName",
            Error::NotFound { fault_type, .. } | Error::Fault { fault_type, .. } => fault_type,
            _ => return None,
        })
    }

    /// Maps a fault type and message to the matching variant.
    pub(crate) fn from_fault(op: &str, fault_type: &str, message: &str) -> Error {
        let op = op.to_string();
        let message = message.to_string();
        match fault_type {
            "InvalidPowerState" => Error::InvalidPowerState { op, message },
            "InvalidState" => Error::InvalidState { op, message },
            "DuplicateName" => Error::DuplicateName { op, message },
            "NotFound" | "ManagedObjectNotFound" => Error::NotFound {
                op,
                fault_type: fault_type.to_string(),
                message,
            },
            "NotAuthenticated" => Error::NotAuthenticated,
            _ => Error::Fault {
                op,
                fault_type: fault_type.to_string(),
                message,
            },
        }
    }
}

impl From<Error> for basphere_provider::ProviderError {
    fn from(e: Error) -> Self {
        if e.is_retryable() {
            basphere_provider::ProviderError::retryable(format!("vsphere: {e}"))
        } else {
            basphere_provider::ProviderError::permanent(format!("vsphere: {e}"))
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
