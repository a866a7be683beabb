//! Helpers for the network attack tests: raw HTTP over TCP and TLS, certificates from
//! `basphere init --tls-cert`, and the descriptor limit.
#![allow(dead_code)]

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BIN: &str = env!("CARGO_BIN_EXE_basphere");

/// Raises this process's soft descriptor limit to the hard one (children inherit it).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A certificate pair written by `basphere init --tls-cert HOST` into `dir`.
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The fingerprint `init` printed.
    pub fingerprint: String,
    pub init_stdout: String,
}

impl Cert {
    /// The `BASPHERE_SERVER__TLS` value for this pair.
    pub fn env(&self) -> String {
        format!(
            "{{ cert = {:?}, key = {:?} }}",
            self.cert.display().to_string(),
            self.key.display().to_string()
        )
    }
}

/// Runs `basphere init --tls-cert host [--force]` with its config, data dir and HOME in `dir`.
pub fn init_cert(dir: &Path, host: &str, force: bool) -> Cert {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(dir.join("basphere.toml"))
        .args(["init", "--tls-cert", host])
        .env("HOME", dir)
        .env("BASPHERE_DATA_DIR", dir.join("data"))
        .env("BASPHERE_PROVIDER__KIND", "null")
        .env_remove("BASPHERE_CONFIG");
    if force {
        cmd.arg("--force");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "init failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fingerprint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("certificate SHA-256 fingerprint: "))
        .unwrap_or_else(|| panic!("init printed no fingerprint: {stdout}"))
        .trim()
        .to_string();
    Cert {
        cert: dir.join("tls/cert.pem"),
        key: dir.join("tls/key.pem"),
        fingerprint,
        init_stdout: stdout,
    }
}

/// A TLS client config trusting exactly the PEM certificates in `roots`.
pub fn tls_client(roots: &[&Path]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for p in roots {
        for c in CertificateDer::pem_file_iter(p).unwrap() {
            store.add(c.unwrap()).unwrap();
        }
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth(),
    )
}

/// One request over TLS to `addr` checked as `host`; returns the raw response and the SHA-256
/// fingerprint of the certificate the server presented.
pub async fn tls_request(
    addr: &str,
    host: &str,
    cfg: Arc<rustls::ClientConfig>,
    request: &str,
) -> Result<(String, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let fp = basphere_api::fingerprint(s.get_ref().1.peer_certificates().unwrap()[0].as_ref());
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    Ok((String::from_utf8_lossy(&out).to_string(), fp))
}

/// One plain-HTTP request to `addr`; returns the raw response.
pub async fn http_request(addr: &str, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).to_string()
}

/// `GET path` with `Connection: close` and extra header lines.
pub fn get(path: &str, headers: &[&str]) -> String {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// The `Set-Cookie` header lines of a raw response whose cookie is `name`.
pub fn set_cookies<'a>(resp: &'a str, name: &str) -> Vec<&'a str> {
    resp.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("set-cookie").then_some(v.trim())
        })
        .filter(|v| v.starts_with(&format!("{name}=")))
        .collect()
}
