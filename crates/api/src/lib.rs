//! Basphere's HTTP server.
//!
//! Architecture invariant: handlers parse and validate raw input into `basphere_core` types,
//! identify the caller (never from a header it could forge: from the kernel's peer credentials on
//! the Unix socket, or from a bearer token), and hand the decision to the store in one call.
//! Every JSON response is the prototype's envelope `{success, message, data, errors}`.
//! API Boundary: routes under `/api/v1` are a compatibility contract with the prototype.

mod auth;
mod envelope;
mod input;
pub mod limits;
pub mod routes;
mod server;

pub use auth::{Caller, PeerInfo, SESSION_COOKIE, cookie_value};
pub use basphere_accounts::UnixAccounts;
pub use envelope::{ApiError, Envelope, Ok200};
pub use input::{Body, MAX_BODY};
pub use server::{
    AppState, Listeners, ServeOptions, TlsCerts, TlsError, fingerprint, router, serve, serve_with,
};
