//! TLS on the TCP listener: an eavesdropper or impostor on the network path.
//! A self-signed certificate from `basphere init --tls-cert`; the CLI trusts it only with
//! `--ca`; a plaintext listener on a non-loopback address refuses to start (before binding);
//! SIGHUP swaps the certificate for new connections.

mod attack_net;
mod common;

use attack_net::*;
use basphere_testkit::{poll_until, signal_child};
use common::{Server, server};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tls_server(cert: &Cert) -> Server {
    server(&[("BASPHERE_SERVER__TLS", &cert.env())])
}

fn port(s: &Server) -> &str {
    s.addr.rsplit_once(':').unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_trusts_the_self_signed_certificate_only_with_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = init_cert(dir.path(), "localhost", false);
    assert_eq!(cert.fingerprint.len(), 95, "{}", cert.init_stdout);
    let key_mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&cert.key).unwrap());
    assert_eq!(key_mode & 0o777, 0o600, "the private key is private");
    let s = tls_server(&cert);

    // The server presents the certificate init printed, and sends HSTS.
    let (resp, fp) = tls_request(
        &s.addr,
        "localhost",
        tls_client(&[&cert.cert]),
        &get("/health", &[]),
    )
    .await
    .unwrap();
    assert_eq!(fp, cert.fingerprint);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("strict-transport-security: max-age="),
        "{resp}"
    );

    // Plain HTTP to the TLS port gets no answer (nothing is served in clear).
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        http_request(&s.addr, &get("/health", &[])),
    )
    .await
    .unwrap();
    assert!(!plain.contains("200 OK"), "{plain}");

    // The admin's token, minted over the Unix socket as root.
    let out = s.cli_ok(&["--output", "json", "token", "create", "--name", "tls"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["token"].as_str().expect("token in output").to_string();

    let url = format!("https://localhost:{}", port(&s));
    let run = |extra: &[&str], env_ca: Option<&std::path::Path>| {
        let mut c = Command::new(BIN);
        c.args(["--url", &url, "--token", &token, "--output", "json"])
            .args(extra)
            .arg("me")
            .env_remove("BASPHERE_CA")
            .env_remove("BASPHERE_CONFIG")
            .stdin(Stdio::null());
        if let Some(p) = env_ca {
            c.env("BASPHERE_CA", p);
        }
        c.output().unwrap()
    };
    // Without --ca: the certificate is refused, and the error says so and what to do.
    let out = run(&[], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains("--ca"), "{err}");
    assert!(out.stdout.is_empty());
    // With --ca (or BASPHERE_CA) the command works over TLS.
    for out in [
        run(&["--ca", cert.cert.to_str().unwrap()], None),
        run(&[], Some(&cert.cert)),
    ] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("\"admin\""), "{stdout}");
    }
    // A certificate for another name is refused even with --ca.
    let other_dir = tempfile::tempdir().unwrap();
    let other = init_cert(other_dir.path(), "other.example", false);
    let out = run(&["--ca", other.cert.to_str().unwrap()], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "{err}"
    );
}

#[test]
fn plaintext_listener_on_a_non_loopback_address_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::default_config(dir.path());
    let socket = dir.path().join("basphere.sock");
    let data = dir.path().join("data");
    let port = basphere_testkit::server::free_port();
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("BASPHERE_CONFIG", &cfg)
        .env("BASPHERE_DATA_DIR", &data)
        .env(
            "BASPHERE_SERVER__SOCKET",
            format!("{:?}", socket.display().to_string()),
        )
        .env("BASPHERE_SERVER__LISTEN", format!("\"0.0.0.0:{port}\""))
        .env("BASPHERE_PROVIDER__KIND", "null")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            basphere_testkit::kill_child(&mut child);
            panic!("the server started on 0.0.0.0 without TLS");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(err.contains("server.listen"), "{err}");
    assert!(err.contains("TLS is off"), "{err}");
    assert!(err.contains("allow_plaintext"), "{err}");
    assert!(err.contains("--tls-cert"), "{err}");
    // Refused before anything was bound or made (a wildcard bind would also hold 127.0.0.1).
    assert!(!socket.exists(), "the Unix socket was bound");
    assert!(!data.exists(), "the data dir was made");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "the port was left bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_presents_the_new_certificate_on_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = init_cert(dir.path(), "localhost", false);
    // Keep a copy of the first certificate to trust both.
    let first_copy = dir.path().join("first.pem");
    std::fs::copy(&first.cert, &first_copy).unwrap();
    let mut s = tls_server(&first);
    let both = tls_client(&[&first_copy]);
    let (_, fp) = tls_request(&s.addr, "localhost", both, &get("/health", &[]))
        .await
        .unwrap();
    assert_eq!(fp, first.fingerprint);

    // A broken file at reload keeps the old certificate.
    let good_key = std::fs::read(&first.key).unwrap();
    std::fs::write(&first.key, b"not a key").unwrap();
    let log_has = |needle: &str| {
        std::fs::read_to_string(s.log_path())
            .unwrap_or_default()
            .matches(needle)
            .count()
    };
    let hup =
        |s: &Server| signal_child(s.child.as_ref().unwrap(), nix::sys::signal::Signal::SIGHUP);
    assert!(hup(&s));
    let logged = |needle: &'static str| {
        poll_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            move || {
                let n = log_has(needle);
                async move { if n > 0 { Ok(()) } else { Err(()) } }
            },
        )
    };
    logged("TLS reload failed")
        .await
        .expect("no reload attempt logged");
    let (_, fp) = tls_request(
        &s.addr,
        "localhost",
        tls_client(&[&first_copy]),
        &get("/health", &[]),
    )
    .await
    .unwrap();
    assert_eq!(
        fp, first.fingerprint,
        "a bad file must not replace the certificate"
    );
    std::fs::write(&first.key, good_key).unwrap();

    // New pair in place (init --force writes a fresh one over the same files).
    let second = init_cert(dir.path(), "localhost", true);
    assert_ne!(second.fingerprint, first.fingerprint);
    assert!(hup(&s));
    logged("TLS certificate reloaded")
        .await
        .expect("no reload logged");
    let trust = tls_client(&[&first_copy, &second.cert]);
    let (resp, fp) = tls_request(&s.addr, "localhost", trust, &get("/health", &[]))
        .await
        .unwrap();
    assert_eq!(
        fp, second.fingerprint,
        "new connections see the new certificate"
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The old certificate is no longer trusted by a client that only knows it.
    let e = tls_request(
        &s.addr,
        "localhost",
        tls_client(&[&first_copy]),
        &get("/health", &[]),
    )
    .await
    .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    // The same process kept serving through both signals (the listener was never dropped).
    assert!(s.child.as_mut().unwrap().try_wait().unwrap().is_none());
}
