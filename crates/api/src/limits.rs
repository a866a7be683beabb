//! Request-level limits: a per-client token bucket on the anonymous-facing routes, the cap on
//! pending registrations, refused enrollments folded into one audit record per client and
//! window, caps on open event streams, `Content-Type` on JSON routes, the `Host` check and one
//! body limit for the whole router (API and portal).
//!
//! The buckets and stream counts live in this process (one server per data dir: `serve.lock`),
//! shared by the API and the portal so that both faces of a route draw from one budget.

use crate::auth::{Caller, PeerInfo};
use crate::envelope::{ApiError, Ok200};
use crate::input::{Body, MAX_BODY};
use crate::routes::users;
use crate::server::AppState;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use basphere_config::Config;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Who a rate limit counts: an IPv4 address, an IPv6 /64 (one host usually holds a whole
/// /64), or a uid on the Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Ip(IpAddr),
    Uid(u32),
    /// A Unix peer the kernel did not name (never happens on Linux); all share one bucket.
    Unknown,
}

impl ClientKey {
    pub fn of(peer: &PeerInfo) -> Self {
        match peer {
            PeerInfo::Tcp(a) => match a.ip() {
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => ClientKey::Ip(IpAddr::V4(v4)),
                    None => {
                        let mut s = v6.segments();
                        s[4..].fill(0);
                        ClientKey::Ip(IpAddr::V6(s.into()))
                    }
                },
                ip => ClientKey::Ip(ip),
            },
            PeerInfo::Unix { uid: Some(u), .. } => ClientKey::Uid(*u),
            PeerInfo::Unix { uid: None, .. } => ClientKey::Unknown,
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Ip(IpAddr::V6(a)) => write!(f, "{a}/64"),
            ClientKey::Ip(a) => write!(f, "{a}"),
            ClientKey::Uid(u) => write!(f, "uid={u}"),
            ClientKey::Unknown => f.write_str("unix:unknown"),
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per client. Idle (refilled) buckets are pruned once the map grows; when even
/// then more than `MAX_CLIENTS` clients are tracked, new ones share one overflow bucket, so
/// memory stays bounded however many addresses an attacker has.
pub struct Throttle {
    inner: Mutex<Buckets>,
}

struct Buckets {
    map: HashMap<ClientKey, Bucket>,
    overflow: Option<Bucket>,
    pruned: Instant,
}

const PRUNE_ABOVE: usize = 1024;
const MAX_CLIENTS: usize = 65_536;

impl Default for Throttle {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Buckets {
                map: HashMap::new(),
                overflow: None,
                pruned: Instant::now(),
            }),
        }
    }
}

impl Throttle {
    /// Takes one token of `key`'s bucket (`burst` deep, refilled at `per_sec`), or says how
    /// many whole seconds until one is there.
    pub fn take(&self, key: ClientKey, per_sec: f64, burst: u32, now: Instant) -> Result<(), u64> {
        let burst = f64::from(burst.max(1));
        let mut b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let full = |bk: &Bucket| {
            bk.tokens + now.saturating_duration_since(bk.at).as_secs_f64() * per_sec >= burst
        };
        if b.map.len() >= PRUNE_ABOVE
            && now.saturating_duration_since(b.pruned) >= Duration::from_secs(1)
        {
            b.map.retain(|_, bk| !full(bk));
            b.pruned = now;
        }
        let fresh = || Bucket {
            tokens: burst,
            at: now,
        };
        let bucket = if b.map.contains_key(&key) || b.map.len() < MAX_CLIENTS {
            b.map.entry(key).or_insert_with(fresh)
        } else {
            b.overflow.get_or_insert_with(fresh)
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / per_sec).ceil().max(1.0) as u64)
        }
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.inner.lock().map(|b| b.map.len()).unwrap_or(0)
    }
}

static THROTTLE: LazyLock<Throttle> = LazyLock::new(Throttle::default);

/// Counts one anonymous-facing request of `peer` against `[limits]`; 429 with `Retry-After`
/// when its budget is spent.
pub fn throttle(cfg: &Config, peer: &PeerInfo) -> Result<(), ApiError> {
    let l = &cfg.limits;
    if l.anon_burst == 0 {
        return Ok(());
    }
    let key = ClientKey::of(peer);
    THROTTLE
        .take(key, l.anon_per_second, l.anon_burst, Instant::now())
        .map_err(|wait| {
            tracing::debug!(client = %key, wait, "throttled");
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many requests from {key}: at most {} at once, then {} per second; \
                     try again in {wait} s",
                    l.anon_burst, l.anon_per_second
                ),
            )
            .with_retry_after(wait)
        })
}

/// Extractor that admits the request through [`throttle`] (list it first, so a refused
/// request is not even read).
pub struct Throttled;

impl FromRequestParts<AppState> for Throttled {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerInfo>>()
            .ok_or_else(|| ApiError::internal("connection has no peer information"))?;
        throttle(&st.config, &peer.0)?;
        Ok(Throttled)
    }
}

/// Refuses (503) a new registration while `limits.max_pending` wait for review.
///
/// Checked just before the store's registration transaction, not inside it: concurrent
/// registrations can pass together, so the cap can be exceeded by the requests in flight
/// at that moment (bounded by the rate limit).
pub async fn admit_registration(st: &AppState) -> Result<(), ApiError> {
    let max = i64::from(st.config.limits.max_pending);
    let n = st.store.pending_count().await?;
    if n >= max {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "registrations are closed for now: {n} already wait for an admin's review \
                 (limit limits.max_pending = {max}); try again later or ask an admin"
            ),
        )
        .with_retry_after(600));
    }
    Ok(())
}

/// `POST /register`, throttled and capped (see `routes::users::register`).
#[utoipa::path(
    post, path = "/register", tag = "users", operation_id = "register",
    summary = "Ask for an account (anyone; an admin reviews it)",
    security((), ("bearer" = [])),
    request_body = basphere_wire::RegisterRequest,
    responses(
        (status = 200, description = "The registration, waiting for an admin", body = crate::openapi::Answer<basphere_wire::Registration>, links(
            ("registration" = (operation_id = "show_registration", parameters(("username" = "$response.body#/data/username")))),
            ("approve" = (operation_id = "approve_user", parameters(("username" = "$response.body#/data/username")))),
            ("reject" = (operation_id = "reject_user", parameters(("username" = "$response.body#/data/username")))),
        )),
        (status = 403, response = crate::openapi::Forbidden),
        (status = 409, response = crate::openapi::Conflict),
        (status = 429, response = crate::openapi::TooManyRequests),
        (status = 503, response = crate::openapi::Unavailable),
    ),
)]
pub async fn register(
    _t: Throttled,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    admit_registration(&st).await?;
    users::register(State(st), ConnectInfo(peer), caller, body).await
}

/// The address of a TCP peer (what reCAPTCHA's `remoteip` names).
pub fn peer_ip(peer: &PeerInfo) -> Option<IpAddr> {
    match peer {
        PeerInfo::Tcp(a) => Some(a.ip()),
        PeerInfo::Unix { .. } => None,
    }
}

/// Whether a caller is anonymous: on TCP with no account (the kernel names every local one).
pub fn anonymous(caller: &Caller) -> bool {
    !caller.local && caller.user.is_none()
}

/// `POST /enroll`, throttled; refusals are folded per client (see [`enroll_as`]).
#[utoipa::path(
    post, path = "/enroll", tag = "tokens", operation_id = "enroll",
    summary = "Exchange a one-time enrollment code for a token",
    security((), ("bearer" = [])),
    request_body = basphere_wire::EnrollRequest,
    responses(
        (status = 201, description = "The token and its secret", body = crate::openapi::Answer<basphere_wire::TokenCreated>),
        (status = 429, response = crate::openapi::TooManyRequests),
    ),
)]
pub async fn enroll(
    _t: Throttled,
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    enroll_as(&st, &caller, ClientKey::of(&peer), body).await
}

/// Exchanges an enrollment code for a token. Refusals from `client` within
/// `limits.enroll_audit_window_secs` share one audit record that counts them.
pub async fn enroll_as(
    st: &AppState,
    caller: &Caller,
    client: ClientKey,
    body: Body,
) -> Result<Ok200, ApiError> {
    let req = basphere_wire::EnrollRequest::read(&body.0);
    let d = st
        .services
        .enroll(&caller.actor(), &client.to_string(), &req)
        .await?;
    Ok(crate::envelope::created(d.message, d.data))
}

/// Open event streams: in total and per user.
#[derive(Default)]
struct Streams {
    total: usize,
    per_user: HashMap<String, u32>,
}

static STREAMS: LazyLock<Mutex<Streams>> = LazyLock::new(Default::default);

/// One open event stream; dropping it (when the stream's task ends) frees the slot.
pub struct StreamSlot {
    user: String,
}

impl StreamSlot {
    /// Takes a stream slot for `user`, or 429 when they (or the server) hold the most allowed.
    pub fn open(cfg: &Config, user: &str) -> Result<StreamSlot, ApiError> {
        let l = &cfg.limits;
        let mut s = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        let mine = s.per_user.get(user).copied().unwrap_or(0);
        if mine >= l.streams_per_user {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{user} already has {mine} event streams open (limit limits.streams_per_user \
                     = {}); close one (stop a `--follow`, close a browser tab) and try again",
                    l.streams_per_user
                ),
            )
            .with_retry_after(5));
        }
        if s.total >= l.streams_total as usize {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server has {} event streams open (limit limits.streams_total); try \
                     again shortly",
                    s.total
                ),
            )
            .with_retry_after(5));
        }
        s.total += 1;
        *s.per_user.entry(user.to_string()).or_default() += 1;
        Ok(StreamSlot {
            user: user.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut s = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                s.per_user.remove(&self.user);
            }
        }
    }
}

/// Event streams open now (their tasks are alive).
pub fn open_streams() -> usize {
    STREAMS.lock().map(|s| s.total).unwrap_or(0)
}

fn is_json(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
}

fn has_body(h: &HeaderMap) -> bool {
    if h.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    h.get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0))
}

/// Middleware of the JSON routes: a request with a body (or any `Content-Type`) must say
/// `application/json`, else 415. A browser's cross-site form can send only form or text
/// types, so this also shuts out cross-site form posts.
pub async fn require_json(req: Request, next: Next) -> Response {
    let h = req.headers();
    let ct = h
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?"));
    let refused = match ct {
        Some(ct) if is_json(ct) => None,
        Some(ct) => Some(format!(
            "Content-Type must be application/json, not {ct:?}; send the body as JSON"
        )),
        None if has_body(h) => {
            Some("a request body needs Content-Type: application/json; send it as JSON".into())
        }
        None => None,
    };
    match refused {
        Some(m) => ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, m).into_response(),
        None => next.run(req).await,
    }
}

/// The host names a TCP request may name in `Host` (see `[server] allowed_hosts`).
#[derive(Debug, Clone)]
pub struct HostPolicy {
    any: bool,
    names: Vec<String>,
}

fn normalize(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The host part of a `Host` header value (`name`, `name:port`, `[v6]:port`).
fn host_part(v: &str) -> &str {
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match v.split_once(':') {
        Some((h, port)) if !port.contains(':') => h,
        _ => v,
    }
}

fn machine_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&buf[..end]).ok().map(str::to_string)
}

impl HostPolicy {
    pub fn from_config(cfg: &Config) -> Self {
        let mut names: Vec<String> = cfg
            .server
            .allowed_hosts
            .iter()
            .map(|h| normalize(h))
            .collect();
        let any = names.iter().any(|n| n == "*");
        names.extend(["localhost".to_string(), "basphere".to_string()]);
        names.push(normalize(&cfg.bastion.host));
        names.push(normalize(host_part(&cfg.server.listen)));
        if let Some(n) = machine_name() {
            names.push(normalize(&n));
        }
        names.retain(|n| !n.is_empty());
        Self { any, names }
    }

    /// Whether `Host: value` is one of ours. IP literals always are: a DNS-rebinding page
    /// names its own domain, never an address.
    pub fn allows(&self, value: &str) -> bool {
        let h = normalize(host_part(value));
        self.any || h.parse::<IpAddr>().is_ok() || self.names.contains(&h)
    }
}

/// Middleware: a TCP request whose `Host` names none of ours gets 421 (the Unix socket has no
/// host names, and a request without `Host` cannot come from a browser).
pub async fn check_host(State(p): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    let tcp = matches!(
        req.extensions().get::<ConnectInfo<PeerInfo>>(),
        Some(ConnectInfo(PeerInfo::Tcp(_)))
    );
    if tcp && let Some(v) = req.headers().get(header::HOST) {
        let v = v.to_str().unwrap_or("");
        if !p.allows(v) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this server does not answer to host {:?}; use one of its names, or add \
                     the name to [server] allowed_hosts",
                    host_part(v)
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Middleware: a URL whose path or query holds an encoded NUL character (`%00`) gets 400: no
/// name, id or filter holds one, and no database stores it in text.
pub async fn refuse_nul(req: Request, next: Next) -> Response {
    if req
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().contains("%00"))
    {
        return ApiError::bad_request(
            "the URL holds a NUL character (%00); no path or query value may contain one",
        )
        .into_response();
    }
    next.run(req).await
}

/// The limits for a whole router, API and portal merged: the `Host` check, no NUL in the URL,
/// and request bodies of at most [`MAX_BODY`]. `basphere serve` applies it to the merged router.
pub fn harden(app: Router, cfg: &Config) -> Router {
    app.layer(axum::middleware::from_fn(refuse_nul))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(HostPolicy::from_config(cfg)),
            check_host,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t = Throttle::default();
        let k = ClientKey::Ip("127.0.0.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(t.take(k, 1.0, 5, t0).is_ok());
        }
        assert_eq!(t.take(k, 1.0, 5, t0), Err(1));
        assert!(t.take(k, 1.0, 5, t0 + Duration::from_millis(1000)).is_ok());
        let other = ClientKey::Ip("127.0.0.2".parse().unwrap());
        assert!(t.take(other, 1.0, 5, t0).is_ok());
    }

    #[test]
    fn many_clients_stay_bounded() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 500) {
            let _ = t.take(ClientKey::Uid(i), 1.0, 5, t0);
        }
        assert!(t.tracked() <= MAX_CLIENTS);
        // Later, idle buckets are pruned.
        let _ = t.take(
            ClientKey::Uid(u32::MAX),
            1.0,
            5,
            t0 + Duration::from_secs(60),
        );
        assert!(t.tracked() < PRUNE_ABOVE);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let p = |a: &str| PeerInfo::Tcp(std::net::SocketAddr::new(a.parse().unwrap(), 1));
        assert_eq!(
            ClientKey::of(&p("2001:db8:1:2:aaaa::1")),
            ClientKey::of(&p("2001:db8:1:2:bbbb::9"))
        );
        assert_eq!(
            ClientKey::of(&p("::ffff:10.0.0.1")),
            ClientKey::Ip("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn host_names() {
        let p = HostPolicy {
            any: false,
            names: vec!["localhost".into(), "bsp.example.org".into()],
        };
        assert!(p.allows("localhost:8080"));
        assert!(p.allows("BSP.example.org."));
        assert!(p.allows("127.0.0.1:8080"));
        assert!(p.allows("[::1]:8080"));
        assert!(!p.allows("evil.example.com"));
        assert!(!p.allows("evil.example.com:8080"));
    }

    #[test]
    fn json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json("text/plain"));
    }
}
