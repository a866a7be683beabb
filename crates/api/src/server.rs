use crate::auth::PeerInfo;
use crate::client_cert::ClientCert;
use crate::input::MAX_BODY;
use crate::routes;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::{HeaderValue, Request, header::STRICT_TRANSPORT_SECURITY};
use basphere_config::{Config, ServerConfig};
use basphere_engine::Engine;
use basphere_service::{Services, UnixAccounts};
use basphere_store::Store;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower_service::Service;

pub use crate::tls::{TlsCerts, TlsError};

/// What every handler can reach. Handlers act only through `services`; `store` is read to
/// authenticate callers and to stream events, `engine` to subscribe to its broadcast.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub store: Store,
    pub engine: Engine,
    pub config: Arc<Config>,
}

impl AppState {
    /// The state of a server over `store` and `engine`, with services that manage Unix
    /// accounts when `accounts` is given.
    pub fn new(
        store: Store,
        engine: Engine,
        provider: Arc<dyn basphere_provider::Provider>,
        config: Arc<Config>,
        accounts: Option<UnixAccounts>,
    ) -> Self {
        Self {
            services: Services::new(
                store.clone(),
                engine.clone(),
                provider,
                config.clone(),
                accounts,
            ),
            store,
            engine,
            config,
        }
    }
}

/// The sockets the server answers on.
pub struct Listeners {
    /// The local API socket, with the file this server made and removes at shutdown (`None`
    /// when systemd passed the socket: its file is the socket unit's).
    pub unix: Option<(UnixListener, Option<PathBuf>)>,
    pub tcp: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured Unix socket (mode 0666: the kernel authenticates callers) and TCP
    /// address. A stale socket file left by a crash is replaced. A Unix socket systemd passed
    /// (socket activation, `contrib/basphere.socket`) is used instead of binding one. A non-loopback TCP address
    /// without TLS is refused before anything is bound (see [`ServerConfig::check_plaintext`]).
    pub async fn bind(cfg: &Config) -> std::io::Result<Self> {
        cfg.server
            .check_plaintext()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
        let unix = if let Some(l) = crate::activation::inherited_unix_listener()? {
            let l = UnixListener::from_std(l)?;
            let passed = l.local_addr()?.as_pathname().map(Path::to_path_buf);
            if passed.as_deref() != Some(cfg.server.socket.as_path()) {
                tracing::warn!(
                    passed = ?passed,
                    configured = %cfg.server.socket.display(),
                    "systemd passed a socket at another path than [server] socket; clients \
                     find the server through the configured one"
                );
            }
            Some((l, None))
        } else if cfg.server.socket.as_os_str().is_empty() {
            None
        } else {
            let path = cfg.server.socket.clone();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("another basphere server answers on {}", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
            let l = UnixListener::bind(&path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            Some((l, Some(path)))
        };
        let tcp = if cfg.server.listen.is_empty() {
            None
        } else {
            Some(TcpListener::bind(&cfg.server.listen).await?)
        };
        Ok(Self { unix, tcp })
    }
}

/// All routes with their limits.
pub fn router(state: AppState) -> Router {
    routes::all()
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// How connections are served: slow-client timeouts, connection caps and TLS.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time to send a request's headers; also the keep-alive wait for the next request.
    pub header_read_timeout: Duration,
    /// Time a connection may move no byte in either direction.
    pub idle_timeout: Duration,
    /// Connections at once over all listeners.
    pub max_connections: usize,
    /// Connections at once from one peer: an IP address (IPv6: its /64) or a Unix uid.
    pub max_connections_per_peer: usize,
    /// Peers exempt from the per-peer cap (the trusted proxies, which carry many clients).
    pub uncapped: Vec<ipnet::IpNet>,
    /// TLS on the TCP listener.
    pub tls: Option<TlsCerts>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self::without_tls(&ServerConfig::default())
    }
}

impl ServeOptions {
    /// The `[server]` settings, with the TLS certificate loaded when one is configured.
    pub fn from_config(cfg: &ServerConfig) -> Result<Self, TlsError> {
        let tls = cfg.tls.as_ref().map(TlsCerts::load).transpose()?;
        Ok(Self {
            tls,
            ..Self::without_tls(cfg)
        })
    }

    fn without_tls(cfg: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(cfg.header_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_secs.max(1)),
            max_connections: cfg.max_connections.max(1),
            max_connections_per_peer: cfg.max_connections_per_ip.max(1),
            uncapped: cfg.trusted_proxies.clone(),
            tls: None,
        }
    }
}

/// Serves `app` (the API router, plus whatever is merged beside it) until `shutdown` turns
/// true, with the default [`ServeOptions`] (no TLS).
pub async fn serve(
    app: Router,
    listeners: Listeners,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(app, listeners, ServeOptions::default(), shutdown).await
}

/// Serves `app` on `listeners` until `shutdown` turns true, each connection under `opts`'
/// timeouts and caps. On shutdown the listeners close at once and open connections finish
/// their current request.
pub async fn serve_with(
    app: Router,
    listeners: Listeners,
    opts: ServeOptions,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let caps = Arc::new(Caps {
        global: Arc::new(Semaphore::new(opts.max_connections)),
        per_peer: Mutex::new(HashMap::new()),
        max_per_peer: opts.max_connections_per_peer,
    });
    let ctx = Arc::new(Ctx {
        app,
        opts,
        caps: caps.clone(),
        shutdown: shutdown.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    if let Some((l, path)) = listeners.unix {
        let ctx = ctx.clone();
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = sd.wait_for(|s| *s) => break,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let cred = stream.peer_cred().ok();
                        let uid = cred.map(|c| c.uid());
                        let peer = PeerInfo::Unix {
                            uid,
                            pid: cred.and_then(|c| c.pid()),
                        };
                        ctx.admit(stream, PeerKey::Uid(uid.unwrap_or(u32::MAX)), peer, false);
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
            drop(l);
            if let Some(path) = path {
                let _ = std::fs::remove_file(&path);
            }
        });
    }
    if let Some(l) = listeners.tcp {
        let ctx = ctx.clone();
        let mut sd = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = sd.wait_for(|s| *s) => break,
                };
                match accepted {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        let ip = addr.ip().to_canonical();
                        let key = if ctx.opts.uncapped.iter().any(|n| n.contains(&ip)) {
                            PeerKey::Uncapped
                        } else {
                            PeerKey::ip(ip)
                        };
                        let peer = PeerInfo::Tcp(addr);
                        match ctx.opts.tls.clone() {
                            Some(tls) => ctx.admit_tls(stream, tls, key, peer),
                            None => ctx.admit(stream, key, peer, false),
                        }
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(std::io::Error::other)?;
    }
    // Wait for open connections to finish (the caller bounds how long).
    let all = u32::try_from(ctx.opts.max_connections).unwrap_or(u32::MAX);
    let _ = caps.global.acquire_many(all).await;
    Ok(())
}

/// A failed `accept`: the peer's own failures are skipped; running out of descriptors (EMFILE)
/// backs off briefly instead of spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed; retrying in 50 ms");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Whom a connection counts against for the per-peer cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    V4(std::net::Ipv4Addr),
    /// The /64 of an IPv6 address: one subscriber usually holds a whole /64.
    V6Net(u64),
    Uid(u32),
    /// A trusted proxy: only the global cap applies.
    Uncapped,
}

impl PeerKey {
    fn ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => PeerKey::V4(a),
            IpAddr::V6(a) => PeerKey::V6Net((u128::from(a) >> 64) as u64),
        }
    }
}

struct Caps {
    global: Arc<Semaphore>,
    per_peer: Mutex<HashMap<PeerKey, usize>>,
    max_per_peer: usize,
}

/// One admitted connection's place under the caps; freed on drop.
struct Slot {
    caps: Arc<Caps>,
    key: PeerKey,
    _permit: OwnedSemaphorePermit,
}

impl Caps {
    fn admit(self: &Arc<Self>, key: PeerKey) -> Option<Slot> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        if key == PeerKey::Uncapped {
            return Some(Slot {
                caps: self.clone(),
                key,
                _permit: permit,
            });
        }
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= self.max_per_peer {
            return None;
        }
        *n += 1;
        Some(Slot {
            caps: self.clone(),
            key,
            _permit: permit,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.caps.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

struct Ctx {
    app: Router,
    opts: ServeOptions,
    caps: Arc<Caps>,
    shutdown: watch::Receiver<bool>,
}

impl Ctx {
    /// Serves `io` if the caps allow, else closes it at once.
    fn admit<IO>(self: &Arc<Self>, io: IO, key: PeerKey, peer: PeerInfo, tls: bool)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(slot) = self.caps.admit(key) else {
            tracing::debug!(?peer, "connection cap reached; closing");
            return;
        };
        let ctx = self.clone();
        tokio::spawn(async move {
            ctx.serve_conn(io, peer, tls, None).await;
            drop(slot);
        });
    }

    /// Like [`Ctx::admit`], with a TLS handshake first (bounded by the header read timeout);
    /// the client certificate it verified, if any, goes with every request.
    fn admit_tls(
        self: &Arc<Self>,
        io: tokio::net::TcpStream,
        tls: TlsCerts,
        key: PeerKey,
        peer: PeerInfo,
    ) {
        let Some(slot) = self.caps.admit(key) else {
            tracing::debug!(?peer, "connection cap reached; closing");
            return;
        };
        let ctx = self.clone();
        tokio::spawn(async move {
            let hs = tokio::time::timeout(
                ctx.opts.header_read_timeout,
                tls.acceptor().accept(io).into_fallible(),
            );
            match hs.await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|der| Arc::new(ClientCert::from_der(der)));
                    ctx.serve_conn(stream, peer, true, cert).await
                }
                Ok(Err((e, io))) => {
                    tracing::debug!(?peer, error = %e, "TLS handshake failed");
                    linger(io).await;
                }
                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
            }
            drop(slot);
        });
    }

    async fn serve_conn<IO>(&self, io: IO, peer: PeerInfo, tls: bool, cert: Option<Arc<ClientCert>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Watched {
            inner: io,
            activity: activity.clone(),
        };
        let app = self.app.clone();
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
            if let Some(c) = &cert {
                req.extensions_mut().insert(c.clone());
            }
            let mut app = app.clone();
            async move {
                let mut resp = match app.call(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if tls {
                    resp.headers_mut().insert(
                        STRICT_TRANSPORT_SECURITY,
                        HeaderValue::from_static("max-age=31536000"),
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.opts.header_read_timeout)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let mut sd = self.shutdown.clone();
        let mut closing = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    break;
                }
                _ = sd.wait_for(|s| *s), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = activity.idle_for(self.opts.idle_timeout) => {
                    tracing::debug!("closing a connection idle for {:?}", self.opts.idle_timeout);
                    break;
                }
            }
        }
    }
}

/// Closes a connection whose TLS handshake failed so that the client reads the alert sent: the
/// write side first, then what the client still sends (a TLS 1.3 client writes its request
/// before it learns its certificate was refused) is read and dropped for up to a second —
/// closing with unread data would reset the connection, and a reset can discard the alert.
async fn linger(mut io: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async { while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// An IO that records each byte moved in [`Activity`].
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_cap_counts_and_frees() {
        let caps = Arc::new(Caps {
            global: Arc::new(Semaphore::new(3)),
            per_peer: Mutex::new(HashMap::new()),
            max_per_peer: 2,
        });
        let a = PeerKey::ip("10.0.0.1".parse().unwrap());
        let b = PeerKey::ip("2001:db8::1".parse().unwrap());
        let b2 = PeerKey::ip("2001:db8::ffff".parse().unwrap());
        let s1 = caps.admit(a).unwrap();
        let _s2 = caps.admit(a).unwrap();
        assert!(caps.admit(a).is_none(), "third from one IP");
        let _s3 = caps.admit(b).unwrap();
        assert!(caps.admit(b2).is_none(), "global cap");
        drop(s1);
        assert!(caps.admit(b2).is_some(), "freed slot reused");
        assert_eq!(b, b2, "one IPv6 /64 is one peer");
    }

    #[test]
    fn a_trusted_proxy_meets_only_the_global_cap() {
        let caps = Arc::new(Caps {
            global: Arc::new(Semaphore::new(3)),
            per_peer: Mutex::new(HashMap::new()),
            max_per_peer: 1,
        });
        let held: Vec<_> = (0..3)
            .map(|_| caps.admit(PeerKey::Uncapped).unwrap())
            .collect();
        assert!(caps.admit(PeerKey::Uncapped).is_none());
        drop(held);
        assert!(caps.per_peer.lock().unwrap().is_empty());
    }
}
