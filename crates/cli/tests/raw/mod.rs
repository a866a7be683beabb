//! Raw HTTP/1.1 as an attacker writes it: any source address in 127.0.0.0/8, any headers,
//! any body, and streams kept open or dropped at will.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One parsed response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
    /// The envelope of a refusal (`success: false`); returns its message.
    pub fn refusal_message(&self) -> String {
        let env = self.json();
        assert_eq!(env["success"], false, "{env}");
        env["message"].as_str().expect("a message").to_string()
    }
    /// The value `Set-Cookie: name=value` sets, if any.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.all("set-cookie").into_iter().find_map(|c| {
            let kv = c.split(';').next()?.trim();
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.to_string())
        })
    }
}

/// Connects to `addr` from `from` (any port).
pub async fn connect(from: &str, addr: &str) -> TcpStream {
    let from: IpAddr = from.parse().unwrap();
    let to: SocketAddr = addr.parse().unwrap();
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// A request's bytes; `Host` is the server's address unless `headers` names one.
pub fn build(
    method: &str,
    path: &str,
    addr: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        r.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("Connection: close\r\n\r\n");
    let mut b = r.into_bytes();
    b.extend_from_slice(body);
    b
}

/// Sends one request from `from` and reads the whole response.
pub async fn send(
    from: &str,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let s = connect(from, addr).await;
    let (mut rd, mut wr) = s.into_split();
    let req = build(method, path, addr, headers, body);
    // Read while writing: the server may answer (413) before it has read the whole body and
    // close; what it sent must not be lost to a reset.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&req).await;
        wr
    });
    let mut buf = vec![];
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    writer.abort();
    parse(&buf)
}

/// A JSON POST from `from`.
pub async fn post_json(from: &str, addr: &str, path: &str, body: &serde_json::Value) -> Resp {
    send(
        from,
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

/// Registers `user` (with the test key) from `from` with a raw JSON POST.
pub async fn register(from: &str, addr: &str, user: &str) -> Resp {
    post_json(
        from,
        addr,
        "/api/v1/register",
        &basphere_testkit::server::registration(user),
    )
    .await
}

fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    let mut rest = b;
    loop {
        let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_txt = String::from_utf8_lossy(&rest[..pos]);
        let Ok(n) = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
        else {
            return out;
        };
        rest = &rest[pos + 2..];
        if n == 0 || rest.len() < n {
            out.extend_from_slice(&rest[..n.min(rest.len())]);
            return out;
        }
        out.extend_from_slice(&rest[..n]);
        rest = rest.get(n + 2..).unwrap_or(&[]);
    }
}

/// Parses a response (status line, headers, body; chunked bodies decoded).
pub fn parse(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head: {:?}",
                String::from_utf8_lossy(buf)
            )
        });
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// An open Server-Sent Events response: its head, and the stream to read events from.
pub struct Sse {
    pub status: u16,
    pub head: String,
    pub stream: TcpStream,
    pub pending: Vec<u8>,
}

/// Opens `GET path` as an event stream (with `headers`, e.g. Authorization) and reads the head.
pub async fn open_sse(addr: &str, path: &str, headers: &[(&str, &str)]) -> Sse {
    let mut s = connect("127.0.0.1", addr).await;
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    s.write_all(r.as_bytes()).await.unwrap();
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    let split = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Sse {
        status,
        head,
        stream: s,
        pending: buf[split + 4..].to_vec(),
    }
}

impl Sse {
    /// Reads for `dur` (or until the server ends the stream) and returns the `event:` names
    /// seen, in order.
    pub async fn events_for(&mut self, dur: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + dur;
        let mut buf = std::mem::take(&mut self.pending);
        let mut chunk = [0u8; 8192];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(|l| l.strip_prefix("event:"))
            .map(|e| e.trim().to_string())
            .collect()
    }
}

/// The media type of the portal's forms.
pub const FORM: &str = "application/x-www-form-urlencoded";

/// The CSRF token a portal page carries in its form.
pub fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .expect("page has a CSRF field")
        + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// `s` percent-encoded for a form body (all but the unreserved characters).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
