//! `[server]`, `[registration]`, `[recaptcha]` and `[limits]`: where the server listens and
//! what it lets anonymous callers do.

use crate::{ConfigError, TlsFiles};
use basphere_core::Username;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the server listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket for local clients; the kernel tells the server who is calling.
    pub socket: PathBuf,
    /// TCP address for remote clients with tokens (`""` to disable).
    pub listen: String,
    /// Name of the first admin account made by `basphere init`.
    pub admin: Username,
    /// Host names (without port) requests may name in `Host`, besides IP literals, `localhost`,
    /// this machine's name, `bastion.host` and `basphere` (the CLI's name). `["*"]`: any.
    pub allowed_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection waits for its next request).
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may move no byte in either direction before it is closed.
    pub idle_timeout_secs: u64,
    /// Connections served at once over both listeners; more are closed at once.
    pub max_connections: usize,
    /// Connections at once from one IP address (TCP) or one uid (Unix socket).
    pub max_connections_per_ip: usize,
    /// Native TLS on the TCP listener (certificate, key and client CA re-read on SIGHUP),
    /// optionally requiring client certificates (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Serve plain HTTP on a non-loopback `listen` address (warned at every start).
    pub allow_plaintext: bool,
    /// The URL users reach the server at; `https://…` makes the portal's cookies `Secure`.
    pub public_url: String,
    /// Proxies whose `X-Forwarded-Proto` is believed (CIDRs); nobody else's is. They carry many
    /// clients, so only `max_connections` applies to them.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/basphere/basphere.sock"),
            listen: "127.0.0.1:8080".into(),
            admin: "admin".parse().expect("valid"),
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 1024,
            max_connections_per_ip: 64,
            tls: None,
            allow_plaintext: false,
            public_url: String::new(),
            trusted_proxies: Vec::new(),
            allowed_hosts: vec![],
        }
    }
}

/// Who may register.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Email domains a registration may use (exact domain, any case); empty: every domain.
    pub allowed_email_domains: Vec<String>,
}

impl RegistrationConfig {
    /// Whether `email`'s domain may register.
    pub fn allows_email(&self, email: &str) -> bool {
        let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.allowed_email_domains.is_empty()
            || self
                .allowed_email_domains
                .iter()
                .any(|a| a.trim().eq_ignore_ascii_case(domain))
    }
}

/// Google's reCAPTCHA verification endpoint.
pub const RECAPTCHA_VERIFY_URL: &str = "https://www.google.com/recaptcha/api/siteverify";

/// reCAPTCHA v2 on the anonymous forms and JSON routes (register, key change): on when both
/// keys are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecaptchaConfig {
    /// The site key the pages embed.
    pub site_key: String,
    /// The secret the server verifies answers with.
    pub secret_key: String,
    /// Where answers are verified.
    pub verify_url: String,
}

impl Default for RecaptchaConfig {
    fn default() -> Self {
        Self {
            site_key: String::new(),
            secret_key: String::new(),
            verify_url: RECAPTCHA_VERIFY_URL.into(),
        }
    }
}

impl RecaptchaConfig {
    /// Whether answers are required (both keys set).
    pub fn enabled(&self) -> bool {
        !self.site_key.is_empty() && !self.secret_key.is_empty()
    }
}

/// Request-level limits: anonymous request rate, pending registrations, event streams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Anonymous-facing requests (register, enroll, portal sign-in/register/key-change forms)
    /// per second per client IP (per uid on the Unix socket), refilled continuously.
    pub anon_per_second: f64,
    /// How many such requests a client may make at once before the rate applies; 0: no limit.
    pub anon_burst: u32,
    /// Registrations that may wait for review at once; more are refused with 503.
    pub max_pending: u32,
    /// Seconds over which refused enrollments from one client share one audit record.
    pub enroll_audit_window_secs: u64,
    /// Open event streams (SSE) per user.
    pub streams_per_user: u32,
    /// Open event streams (SSE) in total.
    pub streams_total: u32,
    /// Events a stream replays at most when it starts (`after=` further back is cut short).
    pub stream_replay: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            anon_per_second: 1.0,
            anon_burst: 5,
            max_pending: 1000,
            enroll_audit_window_secs: 600,
            streams_per_user: 8,
            streams_total: 512,
            stream_replay: 1000,
        }
    }
}

impl ServerConfig {
    /// Whether `listen` only reaches this host (every address it names is loopback).
    pub fn listen_is_loopback(&self) -> bool {
        use std::net::ToSocketAddrs;
        match self.listen.to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
            }
            Err(_) => false,
        }
    }

    /// Refuses a TCP listener that would carry tokens in clear to other hosts: a non-loopback
    /// `listen` needs `tls` or an explicit `allow_plaintext = true`. Returns a warning to show
    /// when plaintext is allowed that way. Checked before anything is bound.
    pub fn check_plaintext(&self) -> Result<Option<String>, ConfigError> {
        if self.listen.is_empty() || self.tls.is_some() || self.listen_is_loopback() {
            return Ok(None);
        }
        let what = format!(
            "listen = {:?} is reachable from other hosts but TLS is off, so tokens and cookies \
             would cross the network in clear",
            self.listen
        );
        if self.allow_plaintext {
            return Ok(Some(format!(
                "server.{what} (allowed by server.allow_plaintext = true)"
            )));
        }
        Err(ConfigError::Invalid {
            key: "server.listen".into(),
            reason: format!(
                "{what}. Set [server] tls = {{ cert = \"…\", key = \"…\" }} (`basphere init \
                 --tls-cert HOSTNAME` writes a self-signed pair), or listen on 127.0.0.1 behind \
                 a TLS proxy, or set server.allow_plaintext = true on a trusted network"
            ),
        })
    }

    /// Whether bearer tokens and portal sessions authenticate on TCP (`tls.tokens`).
    pub fn tcp_tokens(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| t.tokens)
    }

    /// Whether the portal's cookies get `Secure`: TLS here, an `https://` public URL, or a
    /// trusted proxy (by `peer` address) that says the client used https.
    pub fn cookies_secure(
        &self,
        peer: Option<std::net::IpAddr>,
        forwarded_proto: Option<&str>,
    ) -> bool {
        if self.tls.is_some() || self.public_url.starts_with("https://") {
            return true;
        }
        let trusted = peer.is_some_and(|ip| self.trusted_proxies.iter().any(|n| n.contains(&ip)));
        trusted && forwarded_proto.is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
    }
}
