//! M7: event streams as a resource. A user cannot hold more streams than the cap, a stream
//! whose client went away ends (its slot and task are freed), and `after=0` on a long log
//! replays at most the bound, saying so first.

mod common;
mod raw;

use basphere_testkit::poll_until;
use common::{Server, server, wait_vm};
use serde_json::json;
use std::time::{Duration, Instant};

async fn open_streams(s: &Server) -> u64 {
    let r = s.anon().get("/health").await.unwrap();
    r.body.data["streams"]
        .as_u64()
        .expect("health counts streams")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_user_and_freed_when_the_client_goes() {
    let s = server(&[
        ("BASPHERE_LIMITS__ANON_BURST", "0"),
        ("BASPHERE_LIMITS__STREAMS_PER_USER", "3"),
        // Operations stay in their first step: a stream of one never ends by itself.
        ("BASPHERE_NULL_DELAY_MS", "120000"),
    ]);
    let t = s.user("watcher").await;
    let other = s.user("bystander").await;
    let r = s
        .with_token(&t)
        .post("/api/v1/vms", &json!({"name": "slow"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    let auth = format!("Bearer {t}");
    let h = [("Authorization", auth.as_str())];
    assert_eq!(open_streams(&s).await, 0);
    let mut held = vec![
        raw::open_sse(&s.addr, &format!("/api/v1/operations/{op}/events"), &h).await,
        raw::open_sse(&s.addr, "/api/v1/events", &h).await,
        raw::open_sse(&s.addr, "/api/v1/events?after=0", &h).await,
    ];
    for st in &held {
        assert_eq!(st.status, 200, "{}", st.head);
    }
    assert_eq!(open_streams(&s).await, 3);
    // The fourth of the same user is refused, on either route.
    for path in ["/api/v1/events", &format!("/api/v1/operations/{op}/events")] {
        let r = raw::send("127.0.0.1", &s.addr, "GET", path, &h, b"").await;
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(r.header("retry-after").is_some());
        let m = r.json()["message"].as_str().unwrap().to_string();
        assert!(m.contains("streams_per_user"), "{m}");
    }
    // Another user is not affected.
    let oauth = format!("Bearer {other}");
    let mut theirs = raw::open_sse(
        &s.addr,
        "/api/v1/events",
        &[("Authorization", oauth.as_str())],
    )
    .await;
    assert_eq!(theirs.status, 200, "{}", theirs.head);
    assert_eq!(open_streams(&s).await, 4);
    // The per-operation stream replayed the operation's start and now waits.
    let kinds = held[0].events_for(Duration::from_millis(500)).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("queued"),
        "{kinds:?}"
    );
    let _ = theirs.events_for(Duration::from_millis(10)).await;
    // Every client goes away (no FIN handshake games: the sockets are just dropped).
    held.clear();
    drop(theirs);
    let t0 = Instant::now();
    poll_until(
        Duration::from_secs(25),
        Duration::from_millis(200),
        || async {
            match open_streams(&s).await {
                0 => Ok(()),
                n => Err(n),
            }
        },
    )
    .await
    .unwrap_or_else(|n| {
        panic!(
            "{n} stream task(s) still alive {:?} after their clients left",
            t0.elapsed()
        )
    });
    eprintln!(
        "all stream tasks ended {:?} after the clients left",
        t0.elapsed()
    );
    // The slots are free again.
    let again = raw::open_sse(&s.addr, "/api/v1/events", &h).await;
    assert_eq!(again.status, 200, "{}", again.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_zero_is_bounded_and_says_so() {
    let s = server(&[
        ("BASPHERE_LIMITS__ANON_BURST", "0"),
        ("BASPHERE_LIMITS__STREAM_REPLAY", "10"),
    ]);
    let t = s.user("historian").await;
    let c = s.with_token(&t);
    for i in 0..4 {
        let r = c
            .post("/api/v1/vms", &json!({"name": format!("h{i}")}))
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    for i in 0..4 {
        wait_vm(&c, &format!("h{i}"), 30, "running").await;
    }
    let auth = format!("Bearer {t}");
    let h = [("Authorization", auth.as_str())];
    let mut st = raw::open_sse(&s.addr, "/api/v1/events?after=0", &h).await;
    assert_eq!(st.status, 200, "{}", st.head);
    let kinds = st.events_for(Duration::from_secs(2)).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("truncated"),
        "{kinds:?}"
    );
    let replayed = kinds.len() - 1;
    assert!(
        (1..=10).contains(&replayed),
        "replayed {replayed}: {kinds:?}"
    );
    // The whole log is longer than the bound (so the cut was real).
    let ops = c.get("/api/v1/operations").await.unwrap();
    assert_eq!(ops.body.data.as_array().unwrap().len(), 4);
    // The browser's reconnect header is honoured the same way.
    let mut st = raw::open_sse(
        &s.addr,
        "/api/v1/events",
        &[("Authorization", auth.as_str()), ("Last-Event-ID", "0")],
    )
    .await;
    let kinds = st.events_for(Duration::from_secs(1)).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("truncated"),
        "{kinds:?}"
    );
    assert!(kinds.len() <= 11, "{kinds:?}");
}
