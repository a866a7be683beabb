//! Three `basphere serve` replicas on one PostgreSQL 15: any replica serves the API with one
//! state — 50 concurrent creates spread over the three at quota 10 admit exactly 10, with 10
//! distinct addresses — and an event stream on one replica shows the events the others commit.
mod common;
use basphere_testkit::postgres::Postgres;
use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

fn replicas(url: &str, extra: &[(&str, &str)]) -> Vec<Server> {
    (0..3)
        .map(|_| {
            let mut env = vec![("BASPHERE_DATABASE__URL", url)];
            env.extend_from_slice(extra);
            server(&env)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_creates_over_three_replicas_admit_exactly_the_quota() {
    let pg = Postgres::start();
    let url = pg.create_database("replicas");
    let rs = replicas(&url, &[]);
    let token = rs[0].user("racer").await;
    for s in &rs {
        let r = s.with_token(&token).get("/api/v1/me").await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{:?} {}",
            r.body,
            std::fs::read_to_string(s.log_path()).unwrap_or_default()
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let c = rs[i % 3].with_token(&token);
        tasks.spawn(async move {
            c.post(
                "/api/v1/vms",
                &json!({"name": format!("r{i}"), "spec": "tiny"}),
            )
            .await
            .unwrap()
        });
    }
    let (mut ok, mut refused, mut ips) = (0, 0, HashSet::new());
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        match r.status.as_u16() {
            202 => {
                ok += 1;
                ips.insert(r.body.data["vms"][0]["ip_address"].to_string());
            }
            403 => {
                refused += 1;
                assert!(r.body.message.contains("quota exceeded"), "{:?}", r.body);
            }
            s => panic!("unexpected {s}: {:?}", r.body),
        }
    }
    assert_eq!((ok, refused), (10, 40));
    assert_eq!(ips.len(), 10, "ten distinct addresses");
    // Every replica sees the same ten.
    for s in &rs {
        let list = get_data(&s.with_token(&token), "/api/v1/vms").await;
        assert_eq!(list["vms"].as_array().unwrap().len(), 10);
    }
    drop(rs);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_on_one_replica_shows_what_the_others_commit() {
    let pg = Postgres::start();
    let url = pg.create_database("streams");
    // Each step takes 300 ms, so the stream below follows the operation live.
    let rs = replicas(&url, &[("BASPHERE_NULL_DELAY_MS", "300")]);
    let token = rs[0].user("watcher").await;
    // Replica 0 admits; any replica's engine may run it; replica 2's stream follows it.
    let r = rs[0]
        .with_token(&token)
        .post("/api/v1/vms", &json!({"name": "web", "spec": "tiny"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let op = r.body.data["vms"][0]["operation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let watcher = rs[2].with_token(&token);
    let mut kinds = vec![];
    tokio::time::timeout(
        Duration::from_secs(30),
        watcher.follow(&format!("/api/v1/operations/{op}/events"), |kind, _| {
            kinds.push(kind.to_string());
            kind != "succeeded" && kind != "failed"
        }),
    )
    .await
    .expect("the stream ended")
    .unwrap();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("queued"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("succeeded"),
        "{kinds:?}"
    );
    let started = kinds.iter().filter(|k| *k == "step_started").count();
    assert_eq!(started, 3, "every step's start, once: {kinds:?}");
    drop(rs);
    drop(pg);
}
