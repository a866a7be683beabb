//! L8: the portal's cookies get `Secure` from configuration, never from what a client says.
//! An attacker (or any client) sending `X-Forwarded-Proto: https` from a peer that is not a
//! trusted proxy changes nothing; TLS on the listener, an https `public_url`, or a trusted
//! proxy's header make the cookies Secure.

mod attack_net;
mod common;

use attack_net::*;
use common::{Server, server};

fn secure(cookie: &str) -> bool {
    cookie
        .split(';')
        .any(|a| a.trim().eq_ignore_ascii_case("secure"))
}

/// Signs in with `token` through the portal's form, sending `extra` headers on both requests;
/// returns the `bsp_pre` and `bsp_session` Set-Cookie lines.
async fn sign_in(s: &Server, token: &str, extra: &[&str]) -> (String, String) {
    let page = http_request(&s.addr, &get("/signin", extra)).await;
    let pre = set_cookies(&page, "bsp_pre");
    assert_eq!(pre.len(), 1, "{page}");
    let pre_line = pre[0].to_string();
    let pre_value = pre_line
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("bsp_pre=")
        .to_string();
    let csrf = page
        .split(r#"name="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("csrf field")
        .to_string();
    let body = format!("csrf={csrf}&token={token}");
    let mut req = format!(
        "POST /signin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Cookie: bsp_pre={pre_value}\r\n",
        body.len()
    );
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let resp = http_request(&s.addr, &req).await;
    let session = set_cookies(&resp, "bsp_session");
    assert_eq!(session.len(), 1, "sign-in failed: {resp}");
    (pre_line, session[0].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_proto_from_an_untrusted_peer_does_not_make_cookies_secure() {
    let s = server(&[]);
    let token = s.user("cookieuser").await;
    let (pre, session) = sign_in(&s, &token, &["X-Forwarded-Proto: https"]).await;
    assert!(!secure(&pre), "{pre}");
    assert!(!secure(&session), "{session}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_believed_and_only_it() {
    // The test client is the proxy at 127.0.0.1; a header from it counts.
    let s = server(&[("BASPHERE_SERVER__TRUSTED_PROXIES", r#"["127.0.0.1/32"]"#)]);
    let token = s.user("proxyuser").await;
    let (pre, session) = sign_in(&s, &token, &["X-Forwarded-Proto: https"]).await;
    assert!(secure(&pre) && secure(&session), "{pre} / {session}");
    let (pre, session) = sign_in(&s, &token, &[]).await;
    assert!(!secure(&pre) && !secure(&session), "{pre} / {session}");

    // A proxy list that does not hold the peer: the header is ignored again.
    let s = server(&[("BASPHERE_SERVER__TRUSTED_PROXIES", r#"["10.9.9.0/24"]"#)]);
    let token = s.user("proxyuser").await;
    let (pre, session) = sign_in(&s, &token, &["X-Forwarded-Proto: https"]).await;
    assert!(!secure(&pre) && !secure(&session), "{pre} / {session}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_public_url_makes_cookies_secure() {
    let s = server(&[(
        "BASPHERE_SERVER__PUBLIC_URL",
        r#""https://portal.example.org""#,
    )]);
    let token = s.user("urluser").await;
    let (pre, session) = sign_in(&s, &token, &[]).await;
    assert!(secure(&pre) && secure(&session), "{pre} / {session}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_makes_cookies_secure() {
    let dir = tempfile::tempdir().unwrap();
    let cert = init_cert(dir.path(), "localhost", false);
    let s = server(&[("BASPHERE_SERVER__TLS", &cert.env())]);
    let (resp, _) = tls_request(
        &s.addr,
        "localhost",
        tls_client(&[&cert.cert]),
        &get("/signin", &[]),
    )
    .await
    .unwrap();
    let pre = set_cookies(&resp, "bsp_pre");
    assert_eq!(pre.len(), 1, "{resp}");
    assert!(secure(pre[0]), "{}", pre[0]);
}
