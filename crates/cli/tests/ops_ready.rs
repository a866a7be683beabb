//! `/ready` and `basphere doctor`: the same checks, 200 or 503 naming the failing one; details
//! only on the Unix socket; doctor prints each problem with its fix and exits 1. `basphere
//! ready` (the container image's health check) asks a running server's `/ready`, on the socket
//! or over TCP, and exits 1 unless it is ready.
mod common;
use common::*;
use serde_json::Value;

fn names(data: &Value) -> Vec<String> {
    data["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_server_is_ready_and_tcp_callers_see_no_details() {
    let s = server(&[]);
    let local = s.root().get("/ready").await.unwrap();
    assert_eq!(local.status, 200, "{:?}", local.body);
    assert_eq!(local.body.message, "ready");
    assert_eq!(local.body.data["ready"], true);
    assert_eq!(names(&local.body.data), ["database", "engine", "provider"]);
    for c in local.body.data["checks"].as_array().unwrap() {
        assert_eq!(c["status"], "ok", "{c}");
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
    }
    // Also under /api/v1, and over TCP without a token: names and status only.
    let remote = s.anon().get("/api/v1/ready").await.unwrap();
    assert_eq!(remote.status, 200, "{:?}", remote.body);
    for c in remote.body.data["checks"].as_array().unwrap() {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "status"], "{c}");
    }
    // /health stays the prototype's answer.
    let h = s.anon().get("/health").await.unwrap();
    assert_eq!((h.status.as_u16(), h.body.message.as_str()), (200, "OK"));

    let out = s
        .cli_command(&["doctor"])
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok    server",
        "ok    database",
        "ok    engine",
        "ok    provider",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }

    for via in [vec![], vec!["--url", s.addr.as_str()]] {
        let out = s.cli(&[&["ready"], &via[..]].concat());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ready {via:?}: {text}");
        assert!(text.contains("ok    database"), "{text}");
        assert!(text.contains("ready: 0 failed"), "{text}");
    }
}

/// The qemu provider over a host bridge that does not exist: the server starts (the bridge is
/// needed only by a VM's start) but is not ready, and doctor says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bridge_makes_the_server_unready_and_doctor_names_the_fix() {
    if basphere_testkit::server::test_backend_is_postgres() {
        eprintln!(
            "the provider's check does not depend on the backend; it runs in the SQLite pass"
        );
        return;
    }
    let tools = basphere_qemu::host_checks(&basphere_qemu::QemuConfig::default()).await;
    if tools.iter().any(|c| c.name == "qemu.tools" && c.failed()) {
        eprintln!(
            "SKIPPED: QEMU's tools are missing (crates/provider-qemu/install-deps.sh): {tools:?}"
        );
        return;
    }
    let s = server(&[
        ("BASPHERE_PROVIDER__KIND", "qemu"),
        (
            "BASPHERE_QEMU__NETWORK",
            "{ mode = \"bridge\", name = \"bspopsnobr0\" }",
        ),
        ("BASPHERE_QEMU__RUN_AS", "\"\""),
    ]);
    let local = s.root().get("/ready").await.unwrap();
    assert_eq!(local.status, 503, "{:?}", local.body);
    assert_eq!(local.body.message, "not ready: qemu.network");
    assert_eq!(local.body.data["ready"], false);
    assert!(
        local.body.errors[0].starts_with("qemu.network: host bridge bspopsnobr0"),
        "{:?}",
        local.body.errors
    );
    let remote = s.anon().get("/ready").await.unwrap();
    assert_eq!(remote.status, 503);
    assert_eq!(
        remote.body.errors,
        ["qemu.network: failed"],
        "no host names over TCP"
    );

    let out = s.cli(&["ready", "--url", &s.addr]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ready fails with a failing check"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("fail  qemu.network"), "{text}");

    let out = s
        .cli_command(&["doctor", "--output", "json"])
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "doctor fails with a failing check"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], false);
    let net = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qemu.network")
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(net["status"], "fail");
    assert!(
        net["fix"]
            .as_str()
            .unwrap()
            .contains("ip link add bspopsnobr0 type bridge"),
        "{net}"
    );
    let run_as = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qemu.run_as")
        .unwrap();
    assert_eq!(run_as["status"], "warn", "QEMU kept root: {run_as}");
}

/// With no server, doctor runs the checks itself and names the server as the first problem.
#[test]
fn doctor_without_a_server_checks_the_install_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = basphere_testkit::server::default_config(dir.path());
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .args(args)
            .env("BASPHERE_DATA_DIR", &data)
            .env(
                "BASPHERE_SERVER__SOCKET",
                format!("\"{}\"", dir.path().join("none.sock").display()),
            )
            .env("BASPHERE_PROVIDER__KIND", "null")
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("fail  server"), "{text}");
    assert!(text.contains("fail  database"), "{text}");
    assert!(text.contains("fix: basphere init"), "{text}");
    run_ok(&mut {
        let mut c = std::process::Command::new(BIN);
        c.args(["--config", config.to_str().unwrap(), "init"])
            .env("BASPHERE_DATA_DIR", &data)
            .env("HOME", dir.path());
        c
    });
    let text = String::from_utf8_lossy(&run(&["doctor"]).stdout).into_owned();
    assert!(text.contains("ok    database"), "{text}");
    assert!(text.contains("ok    files.admin_token"), "{text}");
}

/// The database going away turns `/ready` into a 503 naming it; `/health` stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_makes_the_server_unready() {
    if skip_unless_root("PostgreSQL runs as the postgres account") {
        return;
    }
    if basphere_testkit::postgres::bin_dir().is_err() {
        eprintln!("SKIPPED: PostgreSQL 15 is not installed (scripts/install-deps)");
        return;
    }
    let pg = basphere_testkit::Postgres::start();
    let url = pg.create_database("opsready");
    let s = server(&[("BASPHERE_DATABASE__URL", &url)]);
    let r = s.root().get("/ready").await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body.data["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("postgres"),
        "{:?}",
        r.body
    );
    drop(pg);
    let body = basphere_testkit::poll_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        || async {
            let r = s.root().get("/ready").await.unwrap();
            if r.status == 503 {
                Ok(r.body)
            } else {
                Err(r.body)
            }
        },
    )
    .await
    .unwrap_or_else(|b| panic!("still ready without its database: {b:?}"));
    assert!(body.message.starts_with("not ready: database"), "{body:?}");
    assert!(
        body.errors[0].starts_with("database: postgres does not answer"),
        "{body:?}"
    );
    let h = s.anon().get("/health").await.unwrap();
    assert_eq!(h.status, 200, "alive, if not ready");
}
