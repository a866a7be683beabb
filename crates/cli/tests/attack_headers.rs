//! L4: a cross-site form (or any non-JSON body) posted at a JSON route is refused with 415
//! and changes nothing; a request naming a foreign `Host` (DNS rebinding) is refused with 421,
//! on the API and on the portal. The CLI client and the portal keep working.

mod common;
mod raw;

use common::{KEY, registration, server};

#[tokio::test]
async fn non_json_bodies_on_json_routes_are_refused() {
    let s = server(&[("BASPHERE_LIMITS__ANON_BURST", "0")]);
    let form = format!(
        "username=formuser&email=f%40example.org&team=qa&public_key={}",
        KEY.replace(' ', "+")
    );
    let json_text = registration("textuser").to_string();
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "application/x-www-form-urlencoded",
            form.as_bytes(),
            "formuser",
        ),
        ("text/plain", json_text.as_bytes(), "textuser"),
        ("multipart/form-data; boundary=x", b"--x--", "formuser"),
        ("", json_text.as_bytes(), "textuser"),
    ];
    for (ct, body, user) in cases {
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", ct)]
        };
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "POST",
            "/api/v1/register",
            &headers,
            body,
        )
        .await;
        assert_eq!(r.status, 415, "{ct}: {}", r.body);
        let m = r.refusal_message();
        assert!(m.contains("application/json"), "{m}");
        assert!(!s.user_exists(user).await, "{user} stored through {ct:?}");
    }
    // With a token too: an authenticated form post is refused just the same.
    let token = s.user("victim").await;
    let auth = format!("Bearer {token}");
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/api/v1/vms",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        br#"{"name":"csrf"}"#,
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.body);
    let vms = s.with_token(&token).get("/api/v1/vms").await.unwrap();
    assert_eq!(vms.body.data["vms"].as_array().unwrap().len(), 0);
    // JSON, with parameters, is fine; so is a body-less POST and the CLI client.
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/api/v1/register",
        &[("Content-Type", "application/json; charset=utf-8")],
        registration("jsonuser").to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/api/v1/users/jsonuser/approve",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(
        r.status, 403,
        "reaches the handler (not an admin): {}",
        r.body
    );
    s.cli_ok(&["admin", "user", "approve", "jsonuser"]);
    s.cli_ok(&["admin", "user", "list"]);
}

#[tokio::test]
async fn foreign_host_names_are_refused() {
    let s = server(&[
        ("BASPHERE_LIMITS__ANON_BURST", "0"),
        ("BASPHERE_SERVER__ALLOWED_HOSTS", r#"["bsp.example.org"]"#),
    ]);
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    let evil = format!("rebind.attacker.example:{port}");
    for (method, path, ct, body) in [
        ("GET", "/health", "", String::new()),
        ("GET", "/api/v1/catalog", "", String::new()),
        (
            "POST",
            "/api/v1/register",
            "application/json",
            registration("rebound").to_string(),
        ),
        ("GET", "/signin", "", String::new()),
        (
            "POST",
            "/register",
            "application/x-www-form-urlencoded",
            "username=rebound2".to_string(),
        ),
    ] {
        let mut h = vec![("Host", evil.as_str())];
        if !ct.is_empty() {
            h.push(("Content-Type", ct));
        }
        let r = raw::send("127.0.0.1", &s.addr, method, path, &h, body.as_bytes()).await;
        assert_eq!(r.status, 421, "{method} {path}: {}", r.body);
        let m = r.refusal_message();
        assert!(
            m.contains("rebind.attacker.example") && m.contains("allowed_hosts"),
            "{m}"
        );
    }
    assert!(!s.user_exists("rebound").await);
    // Our own names (any port), IP literals, and the CLI's name pass.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("BSP.example.org:{port}"),
        "bsp.example.org".to_string(),
        "basphere".to_string(),
    ] {
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "GET",
            "/health",
            &[("Host", &host)],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "GET",
            "/signin",
            &[("Host", &host)],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{host}");
    }
    // The CLI client over TCP (it sends `Host: basphere`) still works.
    let r = s
        .anon()
        .post("/api/v1/register", &registration("viacli"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}
