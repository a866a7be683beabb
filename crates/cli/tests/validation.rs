//! Bad input gets a clear 4xx with every bad field, and nothing is stored.
mod common;
use common::*;
use serde_json::{Value, json};

async fn count_rows(s: &Server) -> (usize, usize, usize) {
    let root = s.root();
    let users = get_data(&root, "/api/v1/users")
        .await
        .as_array()
        .unwrap()
        .len();
    let vms = get_data(&root, "/api/v1/vms?all=true").await["vms"]
        .as_array()
        .unwrap()
        .len();
    let regs = get_data(&root, "/api/v1/pending")
        .await
        .as_array()
        .unwrap()
        .len();
    (users, vms, regs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_store_nothing() {
    let s = server(&[]);
    let before = count_rows(&s).await;
    let long = "a".repeat(21);
    let bad_names = [
        "Alice",
        long.as_str(),
        "-abc",
        "abc-",
        "../x",
        "ünï",
        "",
        "ab",
    ];
    for name in bad_names {
        let r = s
            .anon()
            .post(
                "/api/v1/register",
                &json!({"username": name, "email": "a@b.org", "team": "t", "public_key": KEY}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{name}: {:?}", r.body);
        assert!(
            r.body.errors.iter().any(|e| e.starts_with("username:")),
            "{name}: {:?}",
            r.body.errors
        );
    }
    let truncated = &KEY[..50];
    for key in [
        "",
        "ssh-ed25519",
        truncated,
        "ssh-rsa AAAAB3NzaC1yc2E",
        "not a key at all",
        "ssh-ed25519 %%%%",
    ] {
        let r = s
            .anon()
            .post(
                "/api/v1/register",
                &json!({"username": "good", "email": "a@b.org", "team": "t", "public_key": key}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{key}: {:?}", r.body);
        assert!(
            r.body.errors.iter().any(|e| e.starts_with("public_key:")),
            "{:?}",
            r.body.errors
        );
    }
    // every bad field is listed at once
    let r = s
        .anon()
        .post(
            "/api/v1/register",
            &json!({"username": "X", "email": "nope", "team": "\u{7}", "public_key": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.body.errors.len(), 4, "{:?}", r.body.errors);
    // malformed and oversized bodies
    let r = s
        .anon()
        .call_raw(
            basphere_client::Method::POST,
            "/api/v1/register",
            Some(b"{".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let big = json!({"username": "big", "email": "a@b.org", "team": "t", "public_key": KEY, "pad": "x".repeat(70 * 1024)});
    let r = s.anon().post("/api/v1/register", &big).await.unwrap();
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(count_rows(&s).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_vm_requests_store_nothing() {
    let s = server(&[]);
    let token = s.user("bob").await;
    let c = s.with_token(&token);
    let long = "a".repeat(31);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "Web"}), "name:"),
        (json!({"name": long}), "name:"),
        (json!({"name": "-web"}), "name:"),
        (json!({"name": "web-"}), "name:"),
        (json!({"name": "../x"}), "name:"),
        (json!({"name": "wéb"}), "name:"),
        (json!({"name": ""}), "name:"),
        (json!({}), "name:"),
        (json!({"name": "web", "spec": "gigantic"}), "spec:"),
        (json!({"name": "web", "os": "windows-95"}), "os:"),
        (json!({"name": "web", "count": -1}), "count:"),
        (json!({"name": "web", "count": 11}), "count:"),
        (json!({"name": "web", "count": "many"}), "count:"),
        (json!({"name": 5}), "name:"),
    ];
    for (body, field) in cases {
        let r = c.post("/api/v1/vms", &body).await.unwrap();
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(
            r.body.errors.iter().any(|e| e.starts_with(field)),
            "{body}: {:?}",
            r.body.errors
        );
    }
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "Bad", "spec": "nope", "os": "nope", "count": 99}),
        )
        .await
        .unwrap();
    assert_eq!(r.body.errors.len(), 4, "{:?}", r.body.errors);
    let r = c
        .call_raw(
            basphere_client::Method::POST,
            "/api/v1/vms",
            Some(b"{\"name\":".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.body.message, "Invalid JSON");
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "x", "pad": "y".repeat(65 * 1024)}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    let q = get_data(&c, "/api/v1/quota").await;
    assert_eq!(q["usage"]["vms"], 0);
    assert_eq!(
        get_data(&s.root(), "/api/v1/vms?all=true").await["vms"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let ops = get_data(&c, "/api/v1/operations").await;
    assert_eq!(ops.as_array().unwrap().len(), 0);
}

#[test]
fn bad_config_fails_at_start_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path());
    let out = std::process::Command::new(BIN)
        .arg("serve")
        .env("BASPHERE_DATA_DIR", "/tmp/bsp-never-created")
        .env("BASPHERE_NETWORK__GATEWAY", "192.0.2.1")
        .env("BASPHERE_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("network") && err.contains("192.0.2.1"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .arg("serve")
        .env("BASPHERE_QUOTA__MAX_IPS", "64")
        .env("BASPHERE_CONFIG", &config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("quota.max_ips"), "{err}");
}
