//! A crash at any point resumes or rolls back on restart, leaking nothing.
mod common;
use common::*;
use serde_json::json;

/// Waits until step `step` of operation `op` has status `kind`.
async fn wait_event(c: &basphere_client::Client, op: &str, kind: &str, step: &str) {
    wait_op(c, op, 20, |w| {
        w["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == step && s["status"] == kind)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_create_resumes_to_running_without_leaks() {
    let mut s = server(&[("BASPHERE_NULL_DELAY_MS", "1500")]);
    let token = s.user("crashy").await;
    let c = s.with_token(&token);
    let r = c
        .post("/api/v1/vms", &json!({"name": "phoenix", "spec": "tiny"}))
        .await
        .unwrap();
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    let ip = r.body.data["vms"][0]["ip_address"].clone();
    wait_event(&c, &op, "running", "start").await;
    s.kill9();
    s.spawn();
    let vm = wait_vm(&c, "phoenix", 30, "running").await;
    assert_eq!(vm["ip_address"], ip, "same address after resume");
    let w = get_data(&c, &format!("/api/v1/operations/{op}")).await;
    assert_eq!(w["status"], "succeeded");
    let start = &w["steps"][1];
    assert_eq!(start["attempts"], 2, "the interrupted step ran again: {w}");
    let all = get_data(&s.root(), "/api/v1/vms?all=true").await;
    assert_eq!(all["vms"].as_array().unwrap().len(), 1);
    assert_eq!(quota_usage(&c).await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_undoes_in_reverse_and_releases_everything() {
    let mut s = server(&[
        ("BASPHERE_NULL_FAIL_PHASE", "wait_ready"),
        ("BASPHERE_NULL_DELAY_MS", "300"),
    ]);
    let token = s.user("unlucky").await;
    let c = s.with_token(&token);
    let r = c
        .post("/api/v1/vms", &json!({"name": "fail-one"}))
        .await
        .unwrap();
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    // crash while the undo is under way, too
    wait_event(&c, &op, "failed", "wait_ready").await;
    s.kill9();
    s.spawn();
    let vm = wait_vm(&c, "fail-one", 30, "failed").await;
    assert!(
        vm["error"].as_str().unwrap().contains("wait_ready fails"),
        "{vm}"
    );
    assert_eq!(vm["ip_address"], "", "address released");
    assert_eq!(quota_usage(&c).await, (0, 0));
    let mut kinds = vec![];
    c.follow(&format!("/api/v1/operations/{op}/events"), |k, e| {
        kinds.push(format!("{k}:{}", e["step"].as_str().unwrap_or("")));
        true
    })
    .await
    .unwrap();
    let undone: Vec<&String> = kinds
        .iter()
        .filter(|k| k.starts_with("step_undone"))
        .collect();
    assert_eq!(
        undone,
        ["step_undone:start", "step_undone:prepare"],
        "{kinds:?}"
    );
    assert_eq!(kinds.last().unwrap(), "failed:");
    // a failed VM can be deleted, and its name reused
    assert_eq!(c.delete("/api/v1/vms/fail-one").await.unwrap().status, 202);
    wait_vm(&c, "fail-one", 20, "gone").await;
    let audit = get_data(&s.root(), "/api/v1/audit?target=unlucky/fail-one").await;
    let results: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{}",
                a["action"].as_str().unwrap(),
                a["result"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            "vm.delete:ok",
            "vm.delete:accepted",
            "vm.create:failed",
            "vm.create:accepted"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_operation_streams_from_its_retry() {
    let s = server(&[("BASPHERE_NULL_FAIL_PHASE", "start")]);
    let token = s.user("retrier").await;
    let c = s.with_token(&token);
    let r = c
        .post("/api/v1/vms", &json!({"name": "fail-again"}))
        .await
        .unwrap();
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    wait_vm(&c, "fail-again", 20, "failed").await;
    let r = c
        .post(&format!("/api/v1/operations/{op}/retry"), &json!({}))
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    let mut kinds = vec![];
    c.follow(&format!("/api/v1/operations/{op}/events"), |k, _| {
        kinds.push(k.to_string());
        true
    })
    .await
    .unwrap();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("retried"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "step_started"),
        "the retry ran again: {kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("failed"));
    let vm = wait_vm(&c, "fail-again", 20, "failed").await;
    assert_eq!(vm["ip_address"], "", "address released");
    let q = get_data(&c, "/api/v1/quota").await;
    assert_eq!(q["usage"]["vms"], 0);
}
