//! Attacks on quota and address accounting through the API (issue 9, M1–M3), with the real
//! server and the do-nothing test provider told to fail (`BASPHERE_NULL_FAIL_FILE`: phases
//! listed in the file fail for VMs named `fail-*`, read at every call).
mod common;
use common::*;
use serde_json::{Value, json};

async fn create(c: &basphere_client::Client, name: &str) -> basphere_client::Response {
    c.post("/api/v1/vms", &json!({"name": name, "spec": "tiny"}))
        .await
        .unwrap()
}

async fn names(c: &basphere_client::Client) -> Vec<String> {
    let d = get_data(c, "/api/v1/vms").await;
    let mut v: Vec<String> = d["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Waits until operation `op` has ended, returning it.
async fn wait_ended(c: &basphere_client::Client, op: &str, secs: u64) -> Value {
    wait_op(c, op, secs, |w| {
        matches!(
            w["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_ones_own_delete_is_refused_and_the_vm_keeps_counting() {
    let s = server(&[
        ("BASPHERE_QUOTA__MAX_VMS", "1"),
        ("BASPHERE_NULL_DELAY_MS", "400"),
    ]);
    let token = s.user("mallory1").await;
    let c = s.with_token(&token);
    assert_eq!(create(&c, "web").await.status, 202);
    wait_vm(&c, "web", 20, "running").await;

    // The attack: delete, then cancel the delete before it runs, then create past the quota.
    let r = c.delete("/api/v1/vms/web").await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let op = r.body.data["operation_id"].as_str().unwrap().to_string();
    let r = c
        .post(&format!("/api/v1/operations/{op}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains("cannot be cancelled"),
        "{:?}",
        r.body
    );
    assert_eq!(
        quota_usage(&c).await,
        (1, 1),
        "the VM being deleted still counts"
    );
    let r = create(&c, "extra").await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(r.body.message.contains("quota"), "{:?}", r.body);
    assert_eq!(names(&c).await, ["web"], "nothing was created");

    // The delete runs to its end; then the quota is free again.
    assert_eq!(wait_ended(&c, &op, 20).await["status"], "succeeded");
    wait_vm(&c, "web", 5, "gone").await;
    assert_eq!(quota_usage(&c).await, (0, 0));
    assert_eq!(create(&c, "extra").await.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_delete_failed_still_counts_against_the_quota() {
    let fails = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fails.path(), "remove\n").unwrap();
    let s = server(&[
        ("BASPHERE_QUOTA__MAX_VMS", "1"),
        ("BASPHERE_NULL_FAIL_FILE", fails.path().to_str().unwrap()),
    ]);
    let token = s.user("mallory2").await;
    let c = s.with_token(&token);
    assert_eq!(create(&c, "fail-a").await.status, 202);
    wait_vm(&c, "fail-a", 20, "running").await;
    assert_eq!(c.delete("/api/v1/vms/fail-a").await.unwrap().status, 202);
    let vm = wait_vm(&c, "fail-a", 20, "failed").await;
    assert!(
        vm["ip_address"]
            .as_str()
            .is_some_and(|a| a.parse::<std::net::Ipv4Addr>().is_ok()),
        "it keeps its address: {vm}"
    );

    // The attack: a failed VM used to stop counting — create past the quota.
    assert_eq!(quota_usage(&c).await, (1, 1));
    let r = create(&c, "b").await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(names(&c).await, ["fail-a"]);

    // Once the cleanup succeeds the slot is free.
    std::fs::write(fails.path(), "").unwrap();
    assert_eq!(c.delete("/api/v1/vms/fail-a").await.unwrap().status, 202);
    wait_vm(&c, "fail-a", 20, "gone").await;
    assert_eq!(quota_usage(&c).await, (0, 0));
    assert_eq!(create(&c, "b").await.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_cannot_clean_up_keeps_its_address_until_a_delete_does() {
    let fails = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fails.path(), "wait_ready\nremove\n").unwrap();
    let s = server(&[
        ("BASPHERE_ENGINE__MAX_ATTEMPTS", "1"),
        ("BASPHERE_NULL_FAIL_FILE", fails.path().to_str().unwrap()),
    ]);
    let token = s.user("mallory3").await;
    let c = s.with_token(&token);
    let r = create(&c, "fail-a").await;
    let ip = r.body.data["vms"][0]["ip_address"]
        .as_str()
        .unwrap()
        .to_string();
    let vm = wait_vm(&c, "fail-a", 20, "failed").await;
    assert_eq!(vm["ip_address"], ip.as_str(), "the address stays: {vm}");
    let err = vm["error"].as_str().unwrap();
    assert!(
        err.contains("wait_ready fails") && err.contains("undoing prepare failed"),
        "{err}"
    );
    assert!(err.contains("delete-vm"), "says what to do: {err}");
    assert_eq!(quota_usage(&c).await, (1, 1));

    // A second create in the same block must not get the address the leftover machine holds.
    assert_eq!(create(&c, "b").await.status, 202);
    let b = wait_vm(&c, "b", 20, "running").await;
    assert_ne!(b["ip_address"], ip.as_str(), "duplicate address handed out");

    // Delete retries the cleanup; only then is the address free (the next create gets it).
    std::fs::write(fails.path(), "").unwrap();
    assert_eq!(c.delete("/api/v1/vms/fail-a").await.unwrap().status, 202);
    wait_vm(&c, "fail-a", 20, "gone").await;
    assert_eq!(quota_usage(&c).await, (1, 1));
    let r = create(&c, "c").await;
    assert_eq!(r.body.data["vms"][0]["ip_address"], ip.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_failed_create_while_its_delete_runs_is_refused() {
    let s = server(&[
        ("BASPHERE_NULL_FAIL_PHASE", "start"),
        ("BASPHERE_NULL_DELAY_MS", "500"),
    ]);
    let token = s.user("mallory4").await;
    let c = s.with_token(&token);
    let r = create(&c, "fail-x").await;
    let create_op = r.body.data["operations"][0].as_str().unwrap().to_string();
    wait_vm(&c, "fail-x", 20, "failed").await;
    let r = c.delete("/api/v1/vms/fail-x").await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let delete_op = r.body.data["operation_id"].as_str().unwrap().to_string();

    // The attack: a second workflow on the same VM while the delete runs.
    let r = c
        .post(&format!("/api/v1/operations/{create_op}/retry"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains(&delete_op) && r.body.message.contains("in progress"),
        "{:?}",
        r.body
    );
    let w = get_data(&c, &format!("/api/v1/operations/{create_op}")).await;
    assert_eq!(w["status"], "failed", "the create was not queued again");
    let ops = get_data(&c, "/api/v1/operations").await;
    let live = ops
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            matches!(
                o["status"].as_str(),
                Some("pending" | "running" | "undoing")
            )
        })
        .count();
    assert!(live <= 1, "two live workflows: {ops}");

    assert_eq!(wait_ended(&c, &delete_op, 20).await["status"], "succeeded");
    wait_vm(&c, "fail-x", 5, "gone").await;
    let r = c
        .post(&format!("/api/v1/operations/{create_op}/retry"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(quota_usage(&c).await, (0, 0));
}
