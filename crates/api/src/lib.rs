//! Basphere's HTTP server.
//!
//! Architecture invariant: handlers never orchestrate. Each one reads its input into a wire
//! request type, identifies and authorizes the caller (never from a header it could forge: from
//! the kernel's peer credentials on the Unix socket, or from a bearer token), calls one
//! `basphere_service` method and turns its typed result into the envelope; a service's refusal
//! becomes a status code in one place (`envelope.rs`).
//! Every JSON response is the prototype's envelope `{success, message, data, errors}`.
//! API Boundary: routes under `/api/v1` are a compatibility contract with the prototype.

mod activation;
mod auth;
mod client_cert;
mod envelope;
mod input;
pub mod limits;
mod observe;
pub mod openapi;
pub mod routes;
mod server;
mod tls;

pub use auth::{Caller, PeerInfo, SESSION_COOKIE, cookie_value};
pub use basphere_service::{Services, UnixAccounts};
pub use client_cert::ClientCert;
pub use envelope::{ApiError, Envelope, Ok200};
pub use input::{Body, MAX_BODY};
pub use observe::{REQUEST_ID, observe};
pub use routes::page::PageQuery;
pub use server::{AppState, Listeners, ServeOptions, router, serve, serve_with};
pub use tls::{TlsCerts, TlsError, fingerprint};
