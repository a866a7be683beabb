//! mTLS (`[server] tls.client_ca`): a TCP client without a certificate from the configured CA
//! is refused in the TLS handshake, before any HTTP; a certificate mapped by
//! `[server.tls.client_users]` is that user; an unmapped one gets 401; with `tls.tokens =
//! false` a bearer token on TCP gets 401 while the Unix socket still works; a bad client CA or
//! map stops the server at start with the key named; SIGHUP re-reads the client CA.

mod common;

use basphere_testkit::{poll_until, signal_child};
use common::{BIN, Server, server};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA that signs certificates into `dir`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// A leaf for TLS clients (or, with `server`, for the server) with subject CN `cn`.
    fn leaf(&self, dir: &Path, file: &str, cn: &str, sans: Vec<SanType>, server: bool) -> Pair {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }
}

struct Pair {
    cert: PathBuf,
    key: PathBuf,
}

/// The certificates of a test: a CA, the server's, clients of that CA and one of another.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    other_ca: Ca,
    server: Pair,
    alice: Pair,
    admin: Pair,
    mallory: Pair,
    bob: Pair,
    alice_elsewhere: Pair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::new(d, "ca");
        let other_ca = Ca::new(d, "other-ca");
        let dns = |n: &str| SanType::DnsName(n.try_into().unwrap());
        let email = |n: &str| SanType::Rfc822Name(n.try_into().unwrap());
        Pki {
            server: ca.leaf(d, "server", "localhost", vec![dns("localhost")], true),
            alice: ca.leaf(
                d,
                "alice",
                "Alice Example",
                vec![email("Alice@Example.org")],
                false,
            ),
            admin: ca.leaf(d, "admin", "ops-admin", vec![], false),
            mallory: ca.leaf(d, "mallory", "mallory", vec![email("m@example.org")], false),
            bob: ca.leaf(d, "bob", "bob", vec![], false),
            alice_elsewhere: other_ca.leaf(d, "alice2", "Alice Example", vec![], false),
            dir,
            ca,
            other_ca,
        }
    }

    /// The `BASPHERE_SERVER__TLS` value: client CA `ca`, alice by her email SAN, the admin and
    /// bob (who never registers) by CN.
    fn tls_env(&self, ca: &Path, tokens: bool) -> String {
        format!(
            "{{ cert = {:?}, key = {:?}, client_ca = {:?}, tokens = {tokens}, client_users = \
             {{ \"email:alice@example.org\" = \"alice\", \"cn:ops-admin\" = \"admin\", \
             \"cn:bob\" = \"bob\" }} }}",
            self.server.cert.display().to_string(),
            self.server.key.display().to_string(),
            ca.display().to_string(),
        )
    }

    /// A TLS client trusting the CA, presenting `identity` (TLS 1.2 only with `tls12`).
    fn client(&self, identity: Option<&Pair>, tls12: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.ca.pem).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider);
        let b = if tls12 {
            b.with_protocol_versions(&[&rustls::version::TLS12])
        } else {
            b.with_safe_default_protocol_versions()
        }
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(match identity {
            Some(p) => b
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(&p.cert)
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(&p.key).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

/// How a request over TLS ended.
#[derive(Debug)]
enum Outcome {
    /// The handshake itself failed (the client saw it in `connect`).
    Handshake(String),
    /// The handshake completed on the client's side (TLS 1.3 sends the client's certificate
    /// last), then the server's alert came before any byte of HTTP.
    AlertBeforeHttp(String),
    /// An HTTP answer: status and envelope.
    Http(u16, Value),
}

async fn call(addr: &str, cfg: Arc<rustls::ClientConfig>, request: &str) -> Outcome {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut s = match tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        Ok(s) => s,
        Err(e) => return Outcome::Handshake(e.to_string()),
    };
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out).await {
        assert!(out.is_empty(), "HTTP bytes before the alert: {out:?}");
        return Outcome::AlertBeforeHttp(e.to_string());
    }
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null)).into()
}

impl From<(u16, Value)> for Outcome {
    fn from((s, v): (u16, Value)) -> Self {
        Outcome::Http(s, v)
    }
}

fn request(method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

fn get(path: &str, headers: &[&str]) -> String {
    request("GET", path, headers, "")
}

/// The status and envelope of an HTTP answer; panics on a TLS failure.
fn http(o: Outcome) -> (u16, Value) {
    match o {
        Outcome::Http(s, v) => (s, v),
        other => panic!("expected an HTTP answer, got {other:?}"),
    }
}

/// Asserts the connection was refused by TLS, never answered in HTTP; returns the error.
fn refused_by_tls(o: Outcome, tls12: bool) -> String {
    match o {
        Outcome::Handshake(e) => e,
        Outcome::AlertBeforeHttp(e) if !tls12 => e,
        other => panic!("expected a TLS refusal (TLS 1.2: in the handshake), got {other:?}"),
    }
}

/// Registers, approves and enrolls `user` over mTLS with `cert` (whose certificate maps to no
/// active user yet, so it reaches the anonymous routes); returns the user's token.
async fn registered(s: &Server, cert: Arc<rustls::ClientConfig>, user: &str) -> String {
    let body = common::registration(user).to_string();
    let reg = request("POST", "/api/v1/register", &[], &body);
    let (st, v) = http(call(&s.addr, cert.clone(), &reg).await);
    assert_eq!(st, 200, "{v}");
    let code = s.approve(user).await["enrollment_code"]
        .as_str()
        .unwrap()
        .to_string();
    let body = serde_json::json!({"username": user, "code": code}).to_string();
    let enroll = request("POST", "/api/v1/enroll", &[], &body);
    let (st, v) = http(call(&s.addr, cert, &enroll).await);
    assert_eq!(st, 201, "{v}");
    v["data"]["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_checked_in_the_handshake_and_mapped_to_users() {
    let pki = Pki::new();
    // A copy of the CA file, so SIGHUP can be shown to re-read it.
    let ca_file = pki.dir.path().join("client-ca.pem");
    std::fs::copy(&pki.ca.pem, &ca_file).unwrap();
    let mut s = server(&[("BASPHERE_SERVER__TLS", &pki.tls_env(&ca_file, true))]);
    let alice_token = registered(&s, pki.client(Some(&pki.alice), false), "alice").await;
    let me = get("/api/v1/me", &[]);

    // No certificate, or one from another CA: refused by TLS, on both protocol versions.
    for tls12 in [true, false] {
        let e = refused_by_tls(call(&s.addr, pki.client(None, tls12), &me).await, tls12);
        assert!(e.contains("alert"), "{e}");
        if !tls12 {
            assert!(e.contains("CertificateRequired"), "{e}");
        }
        let e = refused_by_tls(
            call(&s.addr, pki.client(Some(&pki.alice_elsewhere), tls12), &me).await,
            tls12,
        );
        assert!(e.contains("alert"), "{e}");
    }
    // A token does not open the door without a certificate either.
    let auth = format!("Authorization: Bearer {alice_token}");
    refused_by_tls(
        call(
            &s.addr,
            pki.client(None, false),
            &get("/api/v1/me", &[&auth]),
        )
        .await,
        false,
    );

    // A mapped certificate is its user, for reads and for changes (audited as a certificate).
    let alice = pki.client(Some(&pki.alice), false);
    let (st, v) = http(call(&s.addr, alice.clone(), &me).await);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["user"]["username"], "alice", "{v}");
    let (st, v) = http(
        call(
            &s.addr,
            alice.clone(),
            &request("POST", "/api/v1/tokens", &[], r#"{"name":"by-cert"}"#),
        )
        .await,
    );
    assert_eq!(st, 201, "{v}");
    let audit = common::get_data(&s.root(), "/api/v1/audit?actor=alice&action=token.create").await;
    let source = audit[0]["source"].as_str().unwrap_or_default().to_string();
    assert!(
        source.starts_with("tcp:127.0.0.1:") && source.ends_with(",cert=email:alice@example.org"),
        "{audit}"
    );
    // …and is not an admin; the admin's certificate is.
    let (st, _) = http(call(&s.addr, alice.clone(), &get("/api/v1/users", &[])).await);
    assert_eq!(st, 403);
    let admin = pki.client(Some(&pki.admin), false);
    let (st, v) = http(call(&s.addr, admin.clone(), &get("/api/v1/users", &[])).await);
    assert_eq!(st, 200, "{v}");
    let (st, v) = http(
        call(
            &s.addr,
            admin.clone(),
            &request("POST", "/api/v1/users/alice/disable", &[], "{}"),
        )
        .await,
    );
    assert_eq!(st, 200, "{v}");

    // A mapped user who is not active, one who does not exist, an unmapped certificate: 401,
    // saying why and what to do.
    for (who, needles) in [
        (&pki.alice, &["alice", "disabled"][..]),
        (&pki.bob, &["bob", "not registered", "client_users"][..]),
        (
            &pki.mallory,
            &["\"cn:mallory\"", "\"email:m@example.org\"", "client_users"][..],
        ),
    ] {
        let (st, v) = http(call(&s.addr, pki.client(Some(who), false), &me).await);
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["success"], false, "{v}");
        let msg = v["message"].as_str().unwrap();
        for n in needles {
            assert!(msg.contains(n), "{n}: {msg}");
        }
    }
    s.admin_ok("/api/v1/users/alice/enable").await;
    // An unmapped certificate may still reach the anonymous routes (and use a token).
    let mallory = pki.client(Some(&pki.mallory), false);
    let (st, _) = http(call(&s.addr, mallory.clone(), &get("/health", &[])).await);
    assert_eq!(st, 200);
    let (st, v) = http(call(&s.addr, mallory, &get("/api/v1/me", &[&auth])).await);
    assert_eq!(
        (st, v["data"]["user"]["username"].as_str()),
        (200, Some("alice"))
    );

    // A certificate and a token: the same user's token is fine, another's is refused.
    let (st, _) = http(call(&s.addr, alice.clone(), &get("/api/v1/me", &[&auth])).await);
    assert_eq!(st, 200);
    let (st, v) = http(call(&s.addr, admin.clone(), &get("/api/v1/me", &[&auth])).await);
    assert_eq!(st, 401, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("alice") && msg.contains("admin"), "{msg}");

    // SIGHUP re-reads the client CA: the other CA's certificates get in, the first's no more.
    std::fs::copy(&pki.other_ca.pem, &ca_file).unwrap();
    assert!(signal_child(
        s.child.as_ref().unwrap(),
        nix::sys::signal::Signal::SIGHUP
    ));
    let log = s.log_path();
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let n = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            n.contains("TLS certificate reloaded")
                .then_some(())
                .ok_or(())
        }
    })
    .await
    .expect("no reload logged");
    let (st, v) = http(call(&s.addr, pki.client(Some(&pki.alice_elsewhere), false), &me).await);
    assert_eq!(
        (st, v["data"]["user"]["username"].as_str()),
        (401, None),
        "{v}"
    );
    refused_by_tls(call(&s.addr, alice, &me).await, false);
    assert!(s.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_off_a_token_on_tcp_is_refused_and_the_socket_still_works() {
    let pki = Pki::new();
    let s = server(&[("BASPHERE_SERVER__TLS", &pki.tls_env(&pki.ca.pem, false))]);
    let token = registered(&s, pki.client(Some(&pki.alice), false), "alice").await;
    let auth = format!("Authorization: Bearer {token}");
    let alice = pki.client(Some(&pki.alice), false);
    for who in [alice.clone(), pki.client(Some(&pki.mallory), false)] {
        let (st, v) = http(call(&s.addr, who, &get("/api/v1/me", &[&auth])).await);
        assert_eq!(st, 401, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("server.tls.tokens = false"),
            "{v}"
        );
    }
    // A portal session cookie is a token too.
    let cookie = format!("Cookie: bsp_session={token}");
    let (st, _) = http(
        call(
            &s.addr,
            pki.client(Some(&pki.mallory), false),
            &get("/api/v1/me", &[&cookie]),
        )
        .await,
    );
    assert_eq!(st, 401);
    let (st, v) = http(call(&s.addr, alice, &get("/api/v1/me", &[])).await);
    assert_eq!(
        (st, v["data"]["user"]["username"].as_str()),
        (200, Some("alice"))
    );
    // The Unix socket is unaffected.
    let me = common::get_data(&s.root(), "/api/v1/me").await;
    assert_eq!(me["user"]["username"], "admin");

    // The CLI presents a certificate with --cert/--key (or BASPHERE_CERT/BASPHERE_KEY) and
    // then reads no token file.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".config/basphere")).unwrap();
    std::fs::write(home.path().join(".config/basphere/token"), &token).unwrap();
    let url = format!("https://localhost:{}", s.addr.rsplit_once(':').unwrap().1);
    let cli = |flags: bool| {
        let mut c = Command::new(BIN);
        c.args([
            "--url",
            &url,
            "--ca",
            pki.ca.pem.to_str().unwrap(),
            "--output",
            "json",
        ])
        .env("HOME", home.path())
        .env_remove("BASPHERE_TOKEN")
        .env_remove("BASPHERE_CONFIG")
        .stdin(Stdio::null());
        if flags {
            c.args(["--cert", pki.alice.cert.to_str().unwrap()])
                .args(["--key", pki.alice.key.to_str().unwrap()]);
        } else {
            c.env("BASPHERE_CERT", &pki.alice.cert)
                .env("BASPHERE_KEY", &pki.alice.key);
        }
        c.arg("me");
        c
    };
    for flags in [true, false] {
        let out = common::run_ok(&mut cli(flags));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("\"alice\""), "{stdout}");
    }
    // Without a certificate the CLI fails in TLS and says so.
    let out = Command::new(BIN)
        .args([
            "--url",
            &url,
            "--ca",
            pki.ca.pem.to_str().unwrap(),
            "--token",
            &token,
            "me",
        ])
        .env_remove("BASPHERE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("ended TLS"), "{err}");
    assert!(err.contains("CertificateRequired"), "{err}");
    assert!(err.contains("--cert"), "{err}");
}

/// Runs `basphere serve` with `tls` as `[server] tls`; returns its stderr once it has exited
/// (it must exit: the config is bad).
fn refused_start(tls: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("BASPHERE_CONFIG", common::default_config(dir.path()))
        .env("BASPHERE_DATA_DIR", dir.path().join("data"))
        .env(
            "BASPHERE_SERVER__SOCKET",
            format!("{:?}", dir.path().join("s.sock").display().to_string()),
        )
        .env(
            "BASPHERE_SERVER__LISTEN",
            format!("\"127.0.0.1:{}\"", basphere_testkit::server::free_port()),
        )
        .env("BASPHERE_PROVIDER__KIND", "null")
        .env("BASPHERE_SERVER__TLS", tls)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            basphere_testkit::kill_child(&mut child);
            panic!("the server started with a bad [server] tls: {tls}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_bad_client_ca_or_map_stops_the_server_at_start() {
    let pki = Pki::new();
    let (cert, key) = (
        pki.server.cert.display().to_string(),
        pki.server.key.display().to_string(),
    );
    let missing = pki.dir.path().join("missing.pem").display().to_string();
    let not_pem = pki.server.key.display().to_string();
    let ca = pki.ca.pem.display().to_string();
    for (tls, needles) in [
        (
            format!("{{ cert = {cert:?}, key = {key:?}, client_ca = {missing:?} }}"),
            &["server.tls.client_ca", "missing.pem"][..],
        ),
        (
            format!("{{ cert = {cert:?}, key = {key:?}, client_ca = {not_pem:?} }}"),
            &["server.tls.client_ca", "no CERTIFICATE"][..],
        ),
        (
            format!(
                "{{ cert = {cert:?}, key = {key:?}, client_ca = {ca:?}, \
                 client_users = {{ \"cn:alice\" = \"Alice Smith\" }} }}"
            ),
            &["server.tls.client_users"][..],
        ),
        (
            format!(
                "{{ cert = {cert:?}, key = {key:?}, client_ca = {ca:?}, \
                 client_users = {{ \"subject:alice\" = \"alice\" }} }}"
            ),
            &["server.tls.client_users", "cn:NAME"][..],
        ),
        (
            format!("{{ cert = {cert:?}, key = {key:?}, tokens = false }}"),
            &["server.tls.tokens", "client_ca"][..],
        ),
    ] {
        let err = refused_start(&tls);
        for n in needles {
            assert!(err.contains(n), "{tls}: {n} not in {err}");
        }
    }
}
