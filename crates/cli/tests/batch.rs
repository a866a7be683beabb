//! `basphere plan -f` / `apply -f`, `ops cancel|retry`, and the global event stream, through
//! the real binary and server with the do-nothing test provider.
mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

fn run(s: &Server, token: &str, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(BIN)
        .args(["--url", &s.addr, "--token", token])
        .args(args)
        .env_remove("BASPHERE_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_apply_replan_and_refusals() {
    let s = server(&[("BASPHERE_NULL_DELAY_MS", "20")]);
    let token = s.user("planner").await;
    let c = s.with_token(&token);
    let dir = s.dir.path();
    let m = dir.join("stack.toml");
    std::fs::write(
        &m,
        r#"
[defaults]
spec = "tiny"
[vms.db]
[vms.app]
requires = ["db"]
optional = ["cache"]
[vms.web]
requires = ["app"]
[vms.lone]
"#,
    )
    .unwrap();
    let mf = m.display().to_string();
    let (ok, out, err) = run(&s, &token, &["plan", "-f", &mf]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("+ db") && out.contains("after db"), "{out}");
    assert!(
        out.contains("Plan: 4 to create, 0 to keep, 0 to delete"),
        "{out}"
    );

    let (ok, out, err) = run(&s, &token, &["apply", "-f", &mf]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("4 of 4 node(s) succeeded"), "{out}{err}");
    for n in ["db", "app", "web", "lone"] {
        wait_vm(&c, n, 5, "running").await;
    }

    // Re-plan: everything kept; dropping a node deletes it (it was made by a batch).
    std::fs::write(
        &m,
        "[defaults]\nspec = \"tiny\"\n[vms.db]\n[vms.app]\nrequires = [\"db\"]\n[vms.web]\nrequires = [\"app\"]\n",
    )
    .unwrap();
    let (ok, out, _) = run(&s, &token, &["plan", "-f", &mf]);
    assert!(ok);
    assert!(
        out.contains("Plan: 0 to create, 3 to keep, 1 to delete"),
        "{out}"
    );
    assert!(out.contains("- lone"), "{out}");
    let (ok, out, err) = run(&s, &token, &["apply", "-f", &mf]);
    assert!(!ok, "deleting needs --yes without a terminal: {out}");
    assert!(err.contains("--yes"), "{err}");
    let (ok, out, err) = run(&s, &token, &["apply", "-f", &mf, "--yes"]);
    assert!(ok, "{out}{err}");
    wait_vm(&c, "lone", 10, "gone").await;

    // A cycle is refused and named; so are conflicts and unknown requirements.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "defaults: {spec: tiny}\nvms:\n  a: {requires: [b]}\n  b: {optional: [c]}\n  c: {requires: [a]}\n  d: {conflicts: [db]}\n  e: {requires: [nowhere]}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&s, &token, &["plan", "-f", &bad.display().to_string()]);
    assert!(!ok);
    assert!(err.contains("dependency cycle: a → b → c → a"), "{err}");
    assert!(err.contains("d conflicts with db"), "{err}");
    assert!(err.contains("e requires nowhere"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_through_the_cli_and_the_global_stream() {
    let s = server(&[("BASPHERE_NULL_DELAY_MS", "700")]);
    let token = s.user("canceller").await;
    let c = s.with_token(&token);
    // Watch the global stream from the start.
    let c2 = c.clone();
    let stream = tokio::spawn(async move {
        let mut kinds = vec![];
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            c2.follow("/api/v1/events", |k, _| {
                kinds.push(k.to_string());
                k != "succeeded"
            }),
        )
        .await;
        kinds
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c
        .post("/api/v1/vms", &json!({"name": "victim", "spec": "tiny"}))
        .await
        .unwrap();
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out, err) = run(&s, &token, &["ops", "cancel", &op]);
    assert!(ok, "{out}{err}");
    let vm = wait_vm(&c, "victim", 10, "failed").await;
    assert!(vm["error"].as_str().unwrap().contains("cancel"), "{vm}");
    assert_eq!(
        vm["ip_address"], "",
        "address released (the prototype's empty string)"
    );
    let w = get_data(&c, &format!("/api/v1/operations/{op}")).await;
    assert_eq!(w["status"], "cancelled", "{w}");
    let (ok, out, err) = run(&s, &token, &["ops", "retry", &op, "--wait"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    wait_vm(&c, "victim", 10, "running").await;
    let kinds = stream.await.unwrap();
    for k in [
        "queued",
        "step_started",
        "cancel_requested",
        "undo_started",
        "cancelled",
        "retried",
        "succeeded",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
}
