//! The OpenAPI document as served (anyone may read it), the portal's API page built from it,
//! and the server fixes the fuzzing (`schemathesis.rs`) led to.
mod common;
mod raw;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_served_to_anyone_and_the_portal_lists_it() {
    let s = server(&[]);
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "GET",
        "/api/v1/openapi.json",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    let create = &doc["paths"]["/vms"]["post"];
    assert_eq!(create["operationId"], "create_vms");
    assert!(create["responses"]["202"].is_object(), "{create}");

    let page = raw::send("127.0.0.1", &s.addr, "GET", "/api-docs", &[], b"").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("<code>POST /api/v1/vms</code>"));
    assert!(page.body.contains(r#"href="/api/v1/openapi.json""#));
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
    let home = raw::send("127.0.0.1", &s.addr, "GET", "/register", &[], b"").await;
    assert!(home.body.contains(r#"<a href="/api-docs">API</a>"#));
}

/// Found by fuzzing: the admin could disable the admin account, after which nobody (not even
/// root on the socket, who acts as that account) could enable it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_account_cannot_be_disabled() {
    let s = server(&[]);
    let r = s
        .root()
        .post("/api/v1/users/admin/disable", &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains("cannot be disabled"),
        "{:?}",
        r.body
    );
    let me = get_data(&s.root(), "/api/v1/me").await;
    assert_eq!(me["user"]["status"], "active");
    // Other users still can be.
    s.user("dora").await;
    s.admin_ok("/api/v1/users/dora/disable").await;
}

/// Found by fuzzing: the cluster routes answered 501 to anyone; now, like every user route,
/// they ask for a token first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_routes_ask_for_a_token_before_saying_not_yet() {
    let s = server(&[]);
    let anon = s.anon().get("/api/v1/clusters").await.unwrap();
    assert_eq!(anon.status, 401, "{:?}", anon.body);
    let user = s.with_token(&s.user("cleo").await);
    let r = user.get("/api/v1/clusters/x/status").await.unwrap();
    assert_eq!(r.status, 501, "{:?}", r.body);
}

/// A `max_vcpus` beyond what the quota holds is kept at the most it can hold, not wrapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_vcpu_quota_saturates() {
    let s = server(&[]);
    s.user("vera").await;
    let admin = s.admin_token("t").await;
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "PUT",
        "/api/v1/users/vera/quota",
        &[
            ("Authorization", &format!("Bearer {admin}")),
            ("Content-Type", "application/json"),
        ],
        br#"{"max_vcpus": 5000000000}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data"]["max_vcpus"], u32::MAX);
}

/// Found by fuzzing on PostgreSQL (which stores no NUL in text): a `%00` in a query or path,
/// or a `\u0000` in a body's text, was a 500. Now each is a 400, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_refused_as_bad_input() {
    let s = server(&[]);
    for path in [
        "/api/v1/users?after=a%00b",
        "/api/v1/pending/a%00b",
        "/api/v1/audit?actor=%00",
    ] {
        let r = s.root().get(path).await.unwrap();
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert!(r.body.message.contains("NUL"), "{path}: {:?}", r.body);
    }
    s.register("nadia").await;
    let r = s
        .root()
        .post("/api/v1/users/nadia/reject", &json!({"reason": "a\u{0}b"}))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(
        r.body.errors,
        ["reason: must not contain a NUL character (\\u0000)"]
    );
    let pending = get_data(&s.root(), "/api/v1/pending/nadia").await;
    assert_eq!(pending["status"], "pending");
}
