//! `scripts/smoke-test` against a test server with the null provider: every step passes (health,
//! ready, a VM created and deleted, the metrics scrape); a create that fails and a server that
//! is down each stop it with a non-zero exit and a message naming the step.
mod common;
use basphere_testkit::server::free_port;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn smoke(s: &Server, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/smoke-test");
    Command::new(script)
        .arg("--socket")
        .arg(&s.socket)
        .args(args)
        .env("BASPHERE_BIN", BIN)
        .env_remove("BASPHERE_SOCKET")
        .env_remove("BASPHERE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_test_passes_on_a_live_install_and_fails_on_the_first_broken_step() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut s = server(&[
        ("BASPHERE_METRICS__LISTEN", &format!("\"{metrics}\"")),
        ("BASPHERE_NULL_FAIL_PHASE", "start"),
    ]);
    let url = format!("http://{metrics}/metrics");
    let out = smoke(&s, &["--metrics", &url]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for step in [
        "ok: health",
        "ok: ready",
        "ok: create VM",
        "ok: delete VM",
        "ok: metrics",
    ] {
        assert!(said.contains(step), "{step}: {said}");
    }
    let vms = get_data(&s.root(), "/api/v1/vms?all=true").await;
    assert_eq!(vms["vms"], serde_json::json!([]), "the smoke VM is gone");

    // The null provider fails `start` for VMs named fail-*.
    let out = smoke(&s, &["--name", "fail-smoke"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("FAIL: create"), "{said}");
    assert!(
        !said.contains("ok: delete"),
        "stopped at the first failure: {said}"
    );

    s.kill9();
    let out = smoke(&s, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("FAIL: health"), "{said}");
    assert!(!said.contains("ok: "), "{said}");
}
