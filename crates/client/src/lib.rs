//! A small HTTP/1 client for the Basphere API, over the server's Unix socket (identity from
//! the kernel, no token) or TCP (plain or TLS) with a bearer token.

use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the server is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port` and the token to present.
    Tcp {
        addr: String,
        token: Option<String>,
    },
}

pub use basphere_wire as wire;
/// The prototype's response envelope; its `data` is one of the `basphere_wire` types.
pub use basphere_wire::Envelope;

/// A response: HTTP status and envelope.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Envelope,
}

impl Response {
    /// The envelope's `data` as the route's wire type.
    pub fn data<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.body.data)
    }
}

/// Could not talk to the server at all.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the basphere server at {0}: {1} (is `basphere serve` running? set BASPHERE_SOCKET or BASPHERE_URL)"
    )]
    Connect(String, std::io::Error),
    #[error(
        "TLS with {0} failed: {1} (if the server's certificate is self-signed or from a private CA, pass that certificate with --ca FILE or BASPHERE_CA)"
    )]
    Tls(String, String),
    #[error("cannot use CA file {0}: {1}")]
    Ca(PathBuf, String),
    #[error(
        "the server at {0} ended TLS: {1} (a server that requires client certificates needs --cert FILE and --key FILE, or BASPHERE_CERT and BASPHERE_KEY, from a CA it trusts)"
    )]
    TlsRefused(String, String),
    #[error("cannot use client certificate {0}: {1} (--cert FILE and --key FILE: PEM files)")]
    ClientCert(PathBuf, String),
    #[error("HTTP error talking to {0}: {1}")]
    Http(String, String),
    #[error("the server sent a response that is not Basphere's JSON envelope (status {0}): {1}")]
    Body(StatusCode, String),
}

/// A client for one endpoint; each request uses a fresh connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    tls: Option<TlsClient>,
}

/// How a TCP endpoint's TLS certificate is checked: the name it must carry and the roots
/// it must chain to.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish()
    }
}

impl TlsClient {
    /// Verifies `host` against the PEM certificates in `ca` (a private CA, or the server's
    /// self-signed certificate), or against the system's roots when `ca` is `None`; presents
    /// the client certificate `identity` (PEM chain and key files) when the server asks.
    pub fn new(
        host: &str,
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                let bad = |e: String| ClientError::Ca(path.to_path_buf(), e);
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(e.to_string()))?;
                if certs.is_empty() {
                    return Err(bad("no PEM CERTIFICATE in it".into()));
                }
                for c in certs {
                    roots.add(c).map_err(|e| bad(e.to_string()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
            ClientError::Tls(
                host.to_string(),
                format!("{host:?} is not a host name: {e}"),
            )
        })?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => {
                let (chain, key) = read_identity(cert, key)?;
                config
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::ClientCert(cert.to_path_buf(), e.to_string()))?
            }
            None => config.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            name,
        })
    }
}

/// A client certificate chain and its private key, from PEM files.
fn read_identity(
    cert: &Path,
    key: &Path,
) -> Result<
    (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    ClientError,
> {
    use rustls_pki_types::pem::PemObject;
    let bad = |p: &Path, e: String| ClientError::ClientCert(p.to_path_buf(), e);
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no PEM CERTIFICATE in it".into()));
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(key, format!("key: {e}")))?;
    Ok((chain, key))
}

/// An answer whose body is read piece by piece as it arrives ([`Client::open`]).
pub struct Streamed {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    shown: String,
}

impl Streamed {
    /// The next piece of the body; `None` at its end. A connection that closed before the
    /// body's end is an error, not an end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Http(self.shown.clone(), e.to_string())),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The rest of the body, whole.
    pub async fn bytes(self) -> Result<Bytes, ClientError> {
        let shown = self.shown;
        Ok(self
            .body
            .collect()
            .await
            .map_err(|e| ClientError::Http(shown, e.to_string()))?
            .to_bytes())
    }
}

/// One connection: where requests go, and the task driving it (whose error says why the
/// connection ended, e.g. a TLS alert).
struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    /// The TLS error a read met (hyper closes an idle connection quietly on one, so a
    /// server's alert would otherwise be lost).
    tls_error: Arc<std::sync::Mutex<Option<String>>>,
    shown: String,
}

/// An IO that keeps the TLS error a read meets.
struct NoteTls<IO> {
    inner: IO,
    seen: Arc<std::sync::Mutex<Option<String>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for NoteTls<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &r
            && let Some(tls) = tls_cause(e)
        {
            *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(tls.to_string());
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for NoteTls<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Conn {
    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        match self.send.send_request(req).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.driver).await;
                let seen = self
                    .tls_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(tls) = seen {
                    return Err(ClientError::TlsRefused(self.shown.clone(), tls));
                }
                Err(ClientError::Http(self.shown.clone(), e.to_string()))
            }
        }
    }
}

/// The TLS error somewhere in `e`'s causes (an alert the server sent, …).
fn tls_cause(e: &std::io::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(t) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            tls: None,
        }
    }

    /// The same endpoint without a bearer token, for anonymous routes (a stale saved token
    /// must not make them fail, nor travel where it is not needed).
    pub fn without_token(&self) -> Self {
        let mut c = self.clone();
        if let Endpoint::Tcp { token, .. } = &mut c.endpoint {
            *token = None;
        }
        c
    }

    /// Talks TLS to the TCP endpoint, checking its certificate as `tls` says.
    pub fn with_tls(mut self, tls: TlsClient) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn shown(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { addr, .. } if self.tls.is_some() => format!("https://{addr}"),
            Endpoint::Tcp { addr, .. } => addr.clone(),
        }
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let shown = self.shown();
        macro_rules! handshake {
            ($stream:expr) => {{
                let tls_error = Arc::new(std::sync::Mutex::new(None));
                let io = NoteTls {
                    inner: $stream,
                    seen: tls_error.clone(),
                };
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| ClientError::Http(shown.clone(), e.to_string()))?;
                Ok(Conn {
                    send,
                    driver: tokio::spawn(conn),
                    tls_error,
                    shown: shown.clone(),
                })
            }};
        }
        match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| ClientError::Connect(shown.clone(), e))?;
                handshake!(s)
            }
            Endpoint::Tcp { addr, .. } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| ClientError::Connect(shown.clone(), e))?;
                match &self.tls {
                    Some(tls) => {
                        let s = tokio_rustls::TlsConnector::from(tls.config.clone())
                            .connect(tls.name.clone(), s)
                            .await
                            .map_err(|e| ClientError::Tls(shown.clone(), e.to_string()))?;
                        handshake!(s)
                    }
                    None => handshake!(s),
                }
            }
        }
    }

    fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Request<Full<Bytes>> {
        self.request_raw(method, path, body.map(|v| Bytes::from(v.to_string())))
    }

    fn request_raw(&self, method: Method, path: &str, body: Option<Bytes>) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "basphere")
            .header("accept", "application/json");
        if let Endpoint::Tcp { token: Some(t), .. } = &self.endpoint {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                v
            }
            None => Bytes::new(),
        };
        b.body(Full::new(bytes)).expect("valid request")
    }

    /// Sends one request; any HTTP status comes back as a `Response`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, ClientError> {
        self.call_raw(method, path, body.map(|v| v.to_string().into_bytes()))
            .await
    }

    /// Sends one request and returns the answer unparsed: status, headers and body bytes
    /// (for callers that pass large answers through without building a JSON tree).
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ClientError> {
        let r = self
            .start(self.request_raw(method, path, body.map(Bytes::from)))
            .await?;
        let (status, headers) = (r.status, r.headers.clone());
        Ok((status, headers, r.bytes().await?))
    }

    /// Sends a GET that accepts `accept` and returns the answer with its body unread, to be
    /// taken as it comes ([`Streamed::chunk`]).
    pub async fn open(&self, path: &str, accept: &'static str) -> Result<Streamed, ClientError> {
        let mut req = self.request_raw(Method::GET, path, None);
        req.headers_mut().insert(
            hyper::header::ACCEPT,
            hyper::header::HeaderValue::from_static(accept),
        );
        self.start(req).await
    }

    /// Sends `req` on a connection of its own; the answer with its body unread.
    async fn start(&self, req: Request<Full<Bytes>>) -> Result<Streamed, ClientError> {
        let mut conn = self.connect().await?;
        let (parts, body) = conn.send(req).await?.into_parts();
        Ok(Streamed {
            status: parts.status,
            headers: parts.headers,
            body,
            shown: self.shown(),
        })
    }

    /// Sends one request with a body of raw bytes (sent as `application/json`).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let (status, _, bytes) = self.send_raw(method, path, body).await?;
        Self::response(status, &bytes)
    }

    /// An answer's envelope, from its status and body bytes (of [`Client::send_raw`]).
    pub fn response(status: StatusCode, bytes: &[u8]) -> Result<Response, ClientError> {
        let body: Envelope = serde_json::from_slice(bytes).map_err(|_| {
            ClientError::Body(
                status,
                String::from_utf8_lossy(bytes).chars().take(200).collect(),
            )
        })?;
        Ok(Response { status, body })
    }

    pub async fn get(&self, path: &str) -> Result<Response, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// POSTs `body` (a `basphere_wire` request type, or any JSON).
    pub async fn post(
        &self,
        path: &str,
        body: &(impl serde::Serialize + ?Sized),
    ) -> Result<Response, ClientError> {
        let body = serde_json::to_value(body)
            .map_err(|e| ClientError::Http(self.shown(), format!("cannot encode the body: {e}")))?;
        self.call(Method::POST, path, Some(&body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Response, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    /// Follows a Server-Sent Events stream, calling `on_event(kind, data)` for each event,
    /// until the server ends it or `on_event` returns false.
    pub async fn follow(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &Value) -> bool,
    ) -> Result<(), ClientError> {
        let mut conn = self.connect().await?;
        let mut req = self.request(Method::GET, path, None);
        req.headers_mut()
            .insert("accept", "text/event-stream".parse().expect("valid"));
        let resp = conn.send(req).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let env: Option<Envelope> = serde_json::from_slice(&bytes).ok();
            return Err(ClientError::Http(
                self.shown(),
                env.map(|e| e.message).unwrap_or_else(|| status.to_string()),
            ));
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        let (mut kind, mut data) = (String::new(), String::new());
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(self.shown(), e.to_string()))?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(chunk));
            while let Some(pos) = buf.find('\n') {
                let line: String = buf.drain(..=pos).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !data.is_empty() {
                        let v: Value =
                            serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                        if !on_event(&kind, &v) {
                            return Ok(());
                        }
                    }
                    kind.clear();
                    data.clear();
                } else if let Some(k) = line.strip_prefix("event:") {
                    kind = k.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
        }
        Ok(())
    }
}
