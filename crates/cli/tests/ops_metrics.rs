//! `/metrics`: its own listener (never the API's), route templates instead of raw paths, the
//! state's, the engine's and the store's metrics, and every metric the shipped Prometheus rules
//! and the Grafana dashboard use present in a real scrape; `promtool check rules` accepts the
//! rules.
mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn rules_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib/prometheus/rules.yml")
}

fn dashboard_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib/grafana/basphere.json")
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect()
}

async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    assert!(
        buf.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{buf}"
    );
    buf.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the sample `series` (name and labels exactly as exported).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Metric names the rules' expressions use (recording rules' own names have colons).
fn names_in_rules(rules: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = rules;
    while let Some(i) = rest.find("basphere_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let preceded_by_colon = i > 0 && rest.as_bytes()[i - 1] == b':';
        if !preceded_by_colon {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_their_own_listener_and_cover_the_rules() {
    let port = basphere_testkit::server::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let s = server(&[("BASPHERE_METRICS__LISTEN", &format!("\"{metrics}\""))]);
    // Not on the public API.
    let public = s.anon().get("/metrics").await.unwrap();
    assert_eq!(public.status, 404);
    s.register("opsmet").await;
    s.approve("opsmet").await;
    assert_eq!(s.anon().get("/api/v1/vms/web").await.unwrap().status, 401);
    assert_eq!(s.anon().get("/api/v1/vms/db").await.unwrap().status, 401);
    let admin = s.root();
    let r = admin
        .post(
            "/api/v1/vms",
            &serde_json::json!({"name": "opsm", "spec": "tiny"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_vm(&admin, "opsm", 30, "running").await;
    // A refused admission, counted by its reason.
    let r = admin
        .post(
            "/api/v1/vms",
            &serde_json::json!({"name": "opsm2", "spec": "nosuch"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);

    let text = scrape(&metrics).await;
    assert_eq!(
        sample(
            &text,
            r#"basphere_http_requests_total{method="GET",route="/api/v1/vms/{name}",status="401"}"#
        ),
        Some(2.0),
        "two paths, one route template:\n{text}"
    );
    assert!(!text.contains("/api/v1/vms/web"), "no raw path in labels");
    assert!(
        text.contains(r#"basphere_http_request_duration_seconds_bucket{method="POST",route="/api/v1/vms",le="0.1"}"#),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"basphere_vms{state="running"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"basphere_users{status="active"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"basphere_quota_used{resource="vms"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&text, r#"basphere_ips{state="in_use"}"#), Some(1.0));
    assert!(
        text.lines()
            .any(|l| l.starts_with("basphere_build_info{version=\"")
                && l.contains("backend=\"")
                && l.contains("provider=\"null\"")),
        "{text}"
    );
    assert!(!text.contains("opsmet"), "no user names in labels");
    assert_eq!(
        sample(
            &text,
            r#"basphere_provider_calls_total{provider="null",phase="prepare",outcome="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains(r#"basphere_provider_call_duration_seconds_count{provider="null",phase="wait_ready",outcome="ok"} 1"#),
        "{text}"
    );

    // The engine's and the store's.
    assert_eq!(
        sample(
            &text,
            r#"basphere_workflows{definition="create_vm",status="succeeded"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"basphere_workflows{definition="create_vm",status="pending"}"#
        ),
        Some(0.0),
        "every status of a definition is exported: {text}"
    );
    assert_eq!(sample(&text, "basphere_workflows_ready"), Some(0.0));
    assert!(
        text.contains(r#"basphere_step_duration_seconds_count{definition="create_vm",step="wait_ready",outcome="ok"} 1"#),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"basphere_lease_takeovers_total{definition="create_vm"}"#
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("basphere_store_group_commit_size_bucket{backend=\""),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"basphere_admissions_refused_total{reason="invalid"}"#
        ),
        Some(1.0),
        "{text}"
    );

    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let rules = std::fs::read_to_string(rules_file()).unwrap();
    let used = names_in_rules(&rules);
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "rules use metrics the server does not export: {missing:?}"
    );
    // Every expression of the Grafana dashboard names only exported metrics.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 16, "{exprs:?}");
    for e in &exprs {
        let names = names_in_rules(e);
        assert!(
            !names.is_empty(),
            "an expression without a Basphere metric: {e}"
        );
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !exported.contains(n.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "the dashboard's {e:?} uses metrics the server does not export: {missing:?}"
        );
    }
}

/// The dashboard is Grafana's JSON model: a title, a uid, a Prometheus datasource variable
/// every panel uses, and panels that do not overlap.
#[test]
fn the_dashboard_is_well_formed() {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_file()).unwrap()).unwrap();
    assert_eq!(d["uid"], "basphere-overview");
    assert_eq!(d["templating"]["list"][0]["type"], "datasource");
    let panels = d["panels"].as_array().unwrap();
    let mut cells = BTreeSet::new();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{p}");
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{p}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{p}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panels overlap at {cx},{cy}");
            }
        }
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules_file())
        .output()
    else {
        eprintln!("SKIPPED: promtool is not installed (scripts/install-deps installs prometheus)");
        return;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_rule_scanner_skips_recording_rule_names() {
    let names = names_in_rules(
        "expr: sum(rate(basphere_http_requests_total[5m])) > route:basphere_x:p99 + basphere_vms",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["basphere_http_requests_total", "basphere_vms"]
    );
}
