//! Admission is one transaction: concurrent creates never overrun a quota or share an address.
mod common;
use common::*;
use serde_json::json;
use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_creates_admit_exactly_the_quota() {
    let s = server(&[]);
    let token = s.user("racer").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let c = s.with_token(&token);
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
                ips.insert(
                    r.body.data["vms"][0]["ip_address"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
            403 => {
                refused += 1;
                assert!(r.body.message.contains("quota exceeded"), "{:?}", r.body);
                assert_eq!(r.body.data["limit"], "vms");
                assert_eq!(r.body.data["max"], 10);
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert_eq!((ok, refused, ips.len()), (10, 40, 10));
    let c = s.with_token(&token);
    let list = get_data(&c, "/api/v1/vms").await;
    assert_eq!(list["vms"].as_array().unwrap().len(), 10);
    assert_eq!(quota_usage(&c).await, (10, 10));
    // every admitted VM is reachable in the user's block and the audit trail has each decision
    let audit = get_data(&s.root(), "/api/v1/audit?action=vm.create&limit=1000").await;
    let accepted = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["result"] == "accepted")
        .count();
    assert_eq!(accepted, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_run_delete_returns_quota_and_address() {
    let s = server(&[]);
    let token = s.user("alice").await;
    let c = s.with_token(&token);
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "web", "spec": "small", "count": 3}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let vms = r.body.data["vms"].as_array().unwrap().clone();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web-1", "web-2", "web-3"]);
    for v in &vms {
        assert_eq!(v["status"], "creating");
        assert!(v["operation_id"].is_string());
    }
    let vm = wait_vm(&c, "web-1", 20, "running").await;
    assert_eq!(
        vm["ssh"],
        format!("ssh debian@{}", vm["ip_address"].as_str().unwrap())
    );
    let op = vms[0]["operation_id"].as_str().unwrap();
    let w = get_data(&c, &format!("/api/v1/operations/{op}")).await;
    assert_eq!(w["status"], "succeeded");
    let steps: Vec<&str> = w["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["done", "done", "done"]);
    // name conflict
    let r = c
        .post("/api/v1/vms", &json!({"name": "web-1"}))
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    for n in &names {
        wait_vm(&c, n, 20, "running").await;
        let r = c.delete(&format!("/api/v1/vms/{n}")).await.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    for n in &names {
        wait_vm(&c, n, 20, "gone").await;
    }
    assert_eq!(quota_usage(&c).await, (0, 0));
    // the freed address is handed out again
    let r = c
        .post("/api/v1/vms", &json!({"name": "again"}))
        .await
        .unwrap();
    assert_eq!(r.body.data["vms"][0]["ip_address"], vms[0]["ip_address"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_every_step_and_ends() {
    let s = server(&[]);
    let token = s.user("watcher").await;
    let c = s.with_token(&token);
    let r = c.post("/api/v1/vms", &json!({"name": "w"})).await.unwrap();
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    let mut kinds = vec![];
    c.follow(&format!("/api/v1/operations/{op}/events"), |k, _| {
        kinds.push(k.to_string());
        true
    })
    .await
    .unwrap();
    assert_eq!(kinds.first().map(String::as_str), Some("queued"));
    assert_eq!(kinds.last().map(String::as_str), Some("succeeded"));
    assert_eq!(kinds.iter().filter(|k| *k == "step_done").count(), 3);
}
