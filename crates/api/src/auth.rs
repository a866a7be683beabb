//! Who is calling: the kernel's peer credentials on the Unix socket; on TCP a client
//! certificate (mTLS, mapped by `[server.tls.client_users]`), a bearer token, or (for the web
//! portal's reads, e.g. EventSource) the portal's session cookie.
//! A request header can never name a user.
//!
//! On TCP a mapped client certificate is the caller. A token sent with it must be that same
//! user's (another user's is refused: 401); a certificate the map does not name, or that names
//! a user who is not active, leaves the caller anonymous, and a route that needs a user answers
//! 401 saying why — unless a token (or session) identifies the caller, which `tls.tokens =
//! false` forbids on TCP.
//!
//! The session cookie carries the secret of a short-lived API token that the portal made at
//! sign-in (stored hashed like every token; sign-out revokes it). It authenticates only safe
//! methods (GET, HEAD) here, so a cross-site form can never change anything through the API;
//! the portal's own forms check a CSRF token and then build their `Caller` with
//! [`Caller::from_session`].

use crate::client_cert::{CertUser, ClientCert};
use crate::envelope::ApiError;
use crate::server::AppState;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use basphere_core::{Role, UserStatus};
use basphere_service::Principal;
use basphere_store::{Actor, User};
use tokio::net::{TcpListener, UnixListener};

/// The transport-level identity of a connection.
#[derive(Debug, Clone)]
pub enum PeerInfo {
    /// A local process; `uid` comes from SO_PEERCRED.
    Unix {
        uid: Option<u32>,
        pid: Option<i32>,
    },
    Tcp(std::net::SocketAddr),
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        PeerInfo::Unix {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TcpListener>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        PeerInfo::Tcp(*stream.remote_addr())
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The Basphere account, if the caller has one.
    pub user: Option<User>,
    /// Account name (Unix account name for unregistered local callers).
    pub name: String,
    /// Where the call came from, for the audit trail.
    pub source: String,
    /// Whether the caller came over the Unix socket.
    pub local: bool,
    /// Why a TCP caller with a client certificate is anonymous (the answer to a route that
    /// needs a user).
    pub unidentified: Option<String>,
}

/// The refusal of a token on TCP when `[server] tls.tokens = false`.
const TOKENS_OFF: &str = "tokens are not accepted on TCP here (server.tls.tokens = false): \
                          your client certificate is the credential; send no token, or use \
                          the Unix socket";

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor::new(&self.name, &self.source)
    }

    pub fn is_admin(&self) -> bool {
        self.user
            .as_ref()
            .is_some_and(|u| u.role == Role::Admin && u.status == UserStatus::Active)
    }

    /// The caller's account, which must exist (any status).
    pub fn known(&self) -> Result<&User, ApiError> {
        self.user.as_ref().ok_or_else(|| {
            if self.local {
                ApiError::forbidden(format!(
                    "Unix account {} is not registered with Basphere; register first (basphere register)",
                    self.name
                ))
            } else if let Some(why) = &self.unidentified {
                ApiError::unauthorized(why.clone())
            } else {
                ApiError::unauthorized(
                    "missing token: send `Authorization: Bearer <token>` (basphere token create)",
                )
            }
        })
    }

    /// The caller's account, which must be active.
    pub fn active(&self) -> Result<&User, ApiError> {
        let u = self.known()?;
        match u.status {
            UserStatus::Active => Ok(u),
            UserStatus::Pending => Err(ApiError::forbidden(
                "your registration is waiting for an admin's approval",
            )),
            UserStatus::Rejected => Err(ApiError::forbidden(
                "your registration was rejected; see basphere me for the reason",
            )),
            UserStatus::Disabled => Err(ApiError::forbidden(
                "your account is disabled; ask an admin",
            )),
        }
    }

    /// The caller, who must be `username` or an admin; others get 404, as if it did not exist.
    pub fn self_or_admin(&self, username: &str) -> Result<&User, ApiError> {
        let me = self.known()?;
        if !self.is_admin() && me.username.as_str() != username {
            return Err(ApiError::not_found(format!("user {username} not found")));
        }
        Ok(me)
    }

    /// Whose resource a request addresses: the caller's own, or `requested` when an admin names it.
    pub fn owner_for(&self, requested: Option<String>) -> Result<String, ApiError> {
        let me = self.active()?.username.to_string();
        Ok(match requested {
            Some(o) if self.is_admin() => o,
            _ => me,
        })
    }

    /// The caller as the services take it: an active account.
    pub fn principal(&self) -> Result<Principal, ApiError> {
        let user = self.active()?.clone();
        Ok(Principal {
            user,
            admin: self.is_admin(),
            actor: self.actor(),
        })
    }

    /// The caller, who must be an active admin.
    pub fn admin(&self) -> Result<&User, ApiError> {
        let u = self.active()?;
        if u.role == Role::Admin {
            Ok(u)
        } else {
            Err(ApiError::forbidden("this needs an admin"))
        }
    }
}

/// Name of the web portal's session cookie.
pub const SESSION_COOKIE: &str = "bsp_session";

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

impl Caller {
    /// The caller a web session stands for; `None` when the session is unknown, revoked or
    /// expired. `source` is the connection (`tcp:ADDR`); on TCP with `tls.tokens = false` no
    /// session is accepted (401).
    pub async fn from_session(
        st: &AppState,
        secret: &str,
        source: &str,
    ) -> Result<Option<Caller>, ApiError> {
        if source.starts_with("tcp:") && !st.config.server.tcp_tokens() {
            return Err(ApiError::unauthorized(TOKENS_OFF));
        }
        Ok(st.store.authenticate(secret).await?.map(|owner| Caller {
            name: owner.user.username.to_string(),
            user: Some(owner.user),
            source: format!("web:{source},session={}", owner.token_id),
            local: false,
            unidentified: None,
        }))
    }
}

fn unix_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let c = Caller::identify(parts, st).await?;
        // The request's span (`observe.rs`) names who called, for its log lines.
        tracing::Span::current().record("user", c.name.as_str());
        Ok(c)
    }
}

impl Caller {
    /// Who calls: the kernel's word on the socket, the token or session cookie on TCP.
    async fn identify(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerInfo>>()
            .map(|c| c.0.clone())
            .ok_or_else(|| ApiError::internal("connection has no peer information"))?;
        match peer {
            PeerInfo::Unix { uid, pid } => {
                let uid = uid.ok_or_else(|| {
                    ApiError::unauthorized("the kernel did not say who is calling on the socket")
                })?;
                let source = match pid {
                    Some(p) => format!("unix:uid={uid},pid={p}"),
                    None => format!("unix:uid={uid}"),
                };
                let name = if uid == 0 {
                    st.config.server.admin.to_string()
                } else {
                    unix_name(uid).ok_or_else(|| {
                        ApiError::unauthorized(format!(
                            "uid {uid} has no account name on this host"
                        ))
                    })?
                };
                let user = st.store.user(&name).await?;
                Ok(Caller {
                    user,
                    name,
                    source,
                    local: true,
                    unidentified: None,
                })
            }
            PeerInfo::Tcp(addr) => {
                let cert = parts
                    .extensions
                    .get::<std::sync::Arc<ClientCert>>()
                    .cloned();
                Caller::over_tcp(parts, st, format!("tcp:{addr}"), cert.as_deref()).await
            }
        }
    }

    /// Who calls on TCP: the client certificate, the token, the session cookie (see the
    /// module's doc for how they combine).
    async fn over_tcp(
        parts: &Parts,
        st: &AppState,
        source: String,
        cert: Option<&ClientCert>,
    ) -> Result<Self, ApiError> {
        let by_cert = match cert {
            Some(c) => Some(c.user(st).await?),
            None => None,
        };
        if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            if !st.config.server.tcp_tokens() {
                return Err(ApiError::unauthorized(TOKENS_OFF));
            }
            let token = h
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
            let owner = st.store.authenticate(token).await?.ok_or_else(|| {
                ApiError::unauthorized(
                    "invalid or expired token; make a new one with basphere token create",
                )
            })?;
            let mut source = format!("{source},token={}", owner.token_id);
            if let Some(CertUser::Active { user, by }) = &by_cert {
                if user.username != owner.user.username {
                    return Err(ApiError::unauthorized(format!(
                        "the token belongs to {} but the client certificate is mapped to {}; \
                         send no token (the certificate is enough) or one of {}'s",
                        owner.user.username, user.username, user.username
                    )));
                }
                source = format!("{source},{by}");
            }
            return Ok(Caller {
                name: owner.user.username.to_string(),
                user: Some(owner.user),
                source,
                local: false,
                unidentified: None,
            });
        }
        let unidentified = match by_cert {
            Some(CertUser::Active { user, by }) => {
                return Ok(Caller {
                    name: user.username.to_string(),
                    user: Some(user),
                    source: format!("{source},{by}"),
                    local: false,
                    unidentified: None,
                });
            }
            Some(CertUser::Refused(why)) => Some(why),
            None => None,
        };
        let safe =
            parts.method == axum::http::Method::GET || parts.method == axum::http::Method::HEAD;
        if st.config.server.tcp_tokens()
            && let Some(secret) = cookie_value(&parts.headers, SESSION_COOKIE).filter(|_| safe)
            && let Some(c) = Caller::from_session(st, secret, &source).await?
        {
            return Ok(c);
        }
        Ok(Caller {
            user: None,
            name: "anonymous".into(),
            source,
            local: false,
            unidentified,
        })
    }
}
