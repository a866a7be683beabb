//! M6: anonymous registration and enrollment floods. A burst from one address is cut to the
//! bucket's depth with 429 + Retry-After and nothing stored; another address is not affected;
//! registrations beyond `max_pending` are refused; refused enrollments do not flood the audit
//! trail.

mod common;
mod raw;

use common::{Server, registration, server};
use serde_json::json;

fn limits(burst: &str, extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("BASPHERE_LIMITS__ANON_PER_SECOND", "1.0".to_string()),
        ("BASPHERE_LIMITS__ANON_BURST", burst.to_string()),
    ];
    v.extend(extra.iter().map(|(k, x)| (*k, x.to_string())));
    v
}

fn start(env: &[(&'static str, String)]) -> Server {
    let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    server(&e)
}

#[tokio::test]
async fn register_burst_from_one_address_is_cut_to_the_bucket() {
    let s = start(&limits("5", &[]));
    let mut ok = vec![];
    let mut throttled = vec![];
    for i in 0..50 {
        let name = format!("flood{i}");
        let r = raw::register("127.0.0.1", &s.addr, &name).await;
        match r.status {
            200 => ok.push(name),
            429 => {
                let wait: u64 = r
                    .header("retry-after")
                    .expect("429 carries Retry-After")
                    .parse()
                    .expect("Retry-After is whole seconds");
                assert!((1..=5).contains(&wait), "Retry-After {wait}");
                let m = r.refusal_message();
                assert!(m.contains("too many requests"), "{m}");
                throttled.push(name);
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(
        (5..=6).contains(&ok.len()),
        "{} of 50 got through: {ok:?}",
        ok.len()
    );
    // Nothing was stored for the refused ones.
    let pending = s.root().get("/api/v1/users?status=pending").await.unwrap();
    assert_eq!(pending.body.data.as_array().unwrap().len(), ok.len());
    for n in throttled.iter().take(10) {
        assert!(!s.user_exists(n).await, "{n} stored although refused");
    }
    // The portal's form draws from the same bucket: refused before its CSRF check.
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/register",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"username=viaform&email=f%40example.org&team=qa&public_key=x",
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    // Another client is not throttled.
    let r = raw::register("127.0.0.2", &s.addr, "neighbour").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = raw::send(
        "127.0.0.3",
        &s.addr,
        "POST",
        "/register",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"username=viaform&email=f%40example.org&team=qa&public_key=x",
    )
    .await;
    assert_eq!(r.status, 403, "not throttled, refused by CSRF: {}", r.body);
    // After the refill, the first address may register again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = raw::register("127.0.0.1", &s.addr, "later").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn enroll_guessing_is_throttled_too() {
    let s = start(&limits("5", &[]));
    let mut statuses = vec![];
    for i in 0..30 {
        let r = raw::post_json(
            "127.0.0.1",
            &s.addr,
            "/api/v1/enroll",
            &json!({"username": "victim", "code": format!("guess{i}")}),
        )
        .await;
        statuses.push(r.status);
    }
    let tried = statuses.iter().filter(|&&c| c == 401).count();
    let refused = statuses.iter().filter(|&&c| c == 429).count();
    assert!(tried <= 6 && tried + refused == 30, "{statuses:?}");
    // Throttled attempts write nothing; the tried ones share one audit record.
    let a = s
        .root()
        .get("/api/v1/audit?action=token.enroll&limit=1000")
        .await
        .unwrap();
    assert_eq!(
        a.body.data.as_array().unwrap().len(),
        1,
        "{:?}",
        a.body.data
    );
}

#[tokio::test]
async fn registrations_beyond_max_pending_are_refused() {
    let s = start(&limits("0", &[("BASPHERE_LIMITS__MAX_PENDING", "3")]));
    for i in 0..3 {
        let r = raw::register("127.0.0.1", &s.addr, &format!("wait{i}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for i in 3..6 {
        let name = format!("wait{i}");
        let r = raw::register("127.0.0.1", &s.addr, &name).await;
        assert_eq!(r.status, 503, "{}", r.body);
        let m = r.json()["message"].as_str().unwrap().to_string();
        assert!(
            m.contains("registrations are closed") && m.contains("max_pending"),
            "{m}"
        );
        assert!(r.header("retry-after").is_some());
        assert!(!s.user_exists(&name).await);
    }
    // An admin's decision makes room again.
    let r = s
        .root()
        .post("/api/v1/users/wait0/reject", &json!({"reason": "test"}))
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    let r = raw::register("127.0.0.1", &s.addr, "wait9").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn refused_enrollments_share_one_audit_record_per_client() {
    // Rate limit off: every one of the 200 attempts reaches the store.
    let s = start(&limits("0", &[]));
    for i in 0..200 {
        let r = raw::post_json(
            "127.0.0.1",
            &s.addr,
            "/api/v1/enroll",
            &json!({"username": format!("nobody{}", i % 3), "code": format!("guess{i}")}),
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = raw::post_json(
        "127.0.0.2",
        &s.addr,
        "/api/v1/enroll",
        &json!({"username": "other", "code": "guess"}),
    )
    .await;
    assert_eq!(r.status, 401);
    let a = s
        .root()
        .get("/api/v1/audit?action=token.enroll&limit=1000")
        .await
        .unwrap();
    let recs = a.body.data.as_array().unwrap();
    assert_eq!(recs.len(), 2, "one record per client: {recs:#?}");
    let first = recs
        .iter()
        .find(|r| r["source"] == "refusals:127.0.0.1")
        .expect("record of 127.0.0.1");
    assert_eq!(first["result"], "refused");
    let detail = first["detail"].as_str().unwrap();
    assert!(detail.starts_with("attempts=200;"), "{detail}");
    assert!(
        detail.contains("nobody0") && detail.contains("nobody2"),
        "{detail}"
    );
    // A good code still works, and is recorded as the token it made.
    let token = s.user("real").await;
    assert!(token.starts_with("bsp_"));
}

#[tokio::test]
async fn socket_callers_are_counted_by_uid() {
    let s = start(&limits("5", &[]));
    let mut codes = vec![];
    for i in 0..8 {
        let r = s
            .root()
            .post("/api/v1/register", &registration(&format!("local{i}")))
            .await
            .unwrap();
        codes.push(r.status.as_u16());
    }
    assert_eq!(&codes[..5], &[200; 5], "{codes:?}");
    assert!(codes[6..].iter().all(|&c| c == 429), "{codes:?}");
    // The TCP clients' buckets are separate from uid 0's.
    let r = raw::register("127.0.0.1", &s.addr, "remote").await;
    assert_eq!(r.status, 200, "{}", r.body);
}
