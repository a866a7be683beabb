//! A real Prometheus (Debian's `prometheus`) on 127.0.0.1 scrapes a server's `/metrics` with
//! the shipped rules loaded: the scrape is healthy, every rule evaluates without error, and
//! PromQL queries return the server's request counts and, scraped while a batch runs, its
//! workflow counts.
mod common;
use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Prometheus as a child process, stopped by PID when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        basphere_testkit::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

impl Prometheus {
    fn start(target: &str) -> Option<Prometheus> {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let rules = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../contrib/prometheus/rules.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{:?}]\n\
                 scrape_configs:\n  - job_name: basphere\n    static_configs:\n      \
                 - targets: [{target:?}]\n",
                rules.canonicalize().unwrap().display().to_string()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", basphere_testkit::server::free_port());
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Some(Prometheus {
            child,
            addr,
            _dir: dir,
        })
    }

    /// `GET path` on Prometheus's HTTP API, as JSON (`None` while it does not answer).
    async fn get(&self, path: &str) -> Option<Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let (head, body) = buf.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        // Prometheus may answer chunked; the JSON object lies between the outer braces.
        let body = &body[body.find('{')?..=body.rfind('}')?];
        serde_json::from_str(body).ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_server_and_evaluates_the_rules() {
    let metrics = format!("127.0.0.1:{}", basphere_testkit::server::free_port());
    let s = server(&[
        ("BASPHERE_METRICS__LISTEN", &format!("\"{metrics}\"")),
        // Each provider phase takes 150 ms: the batch below runs for a few scrapes.
        ("BASPHERE_NULL_DELAY_MS", "150"),
    ]);
    let Some(prom) = Prometheus::start(&metrics) else {
        eprintln!("SKIPPED: prometheus is not installed (scripts/install-deps installs it)");
        return;
    };
    for _ in 0..3 {
        assert_eq!(s.anon().get("/api/v1/vms/x").await.unwrap().status, 401);
    }
    let query = "/api/v1/query?query=basphere_http_requests_total%7Broute%3D%22%2Fapi%2Fv1%2Fvms%2F%7Bname%7D%22%2Cstatus%3D%22401%22%7D";
    let found = basphere_testkit::poll_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let v = prom.get(query).await;
            let value = v.as_ref().and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_string)
            });
            match value {
                Some(n) if n == "3" => Ok(v.unwrap()),
                _ => Err(v),
            }
        },
    )
    .await
    .unwrap_or_else(|v| panic!("Prometheus never saw the 3 requests: {v:?}"));
    assert_eq!(found["data"]["result"][0]["metric"]["method"], "GET");

    // A batch of 8 VMs, 2 at a time: Prometheus sees it running, then all 8 succeeded.
    let manifest: String = std::iter::once("[defaults]\nspec = \"tiny\"\n".to_string())
        .chain((0..8).map(|i| format!("[vms.prom{i}]\n")))
        .collect();
    let r = s
        .root()
        .post(
            "/api/v1/batches",
            &serde_json::json!({"manifest": manifest, "parallelism": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let value = |v: &Option<Value>| {
        v.as_ref().and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_string)
        })
    };
    let done = "/api/v1/query?query=basphere_workflows%7Bdefinition%3D%22create_vm%22%2Cstatus%3D%22succeeded%22%7D";
    basphere_testkit::poll_until(
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async {
            let v = prom.get(done).await;
            if value(&v).as_deref() == Some("8") {
                Ok(())
            } else {
                Err(v)
            }
        },
    )
    .await
    .unwrap_or_else(|v| panic!("Prometheus never saw 8 succeeded creates: {v:?}"));
    // Scraped while it ran: some scrape saw creates running, none saw more than the
    // batch's parallelism.
    let peak = "/api/v1/query?query=max_over_time(basphere_workflows%7Bdefinition%3D%22create_vm%22%2Cstatus%3D%22running%22%7D%5B5m%5D)";
    let peak = value(&prom.get(peak).await).expect("a running series");
    assert!(
        ["1", "2"].contains(&peak.as_str()),
        "peak of running creates: {peak}"
    );
    let steps = "/api/v1/query?query=sum(basphere_step_duration_seconds_count%7Bdefinition%3D%22create_vm%22%2Coutcome%3D%22ok%22%7D)";
    let steps: f64 = value(&prom.get(steps).await)
        .expect("step durations")
        .parse()
        .unwrap();
    assert!(
        steps >= 8.0 * 3.0,
        "every create's steps were timed: {steps}"
    );

    let targets = prom.get("/api/v1/targets").await.unwrap();
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets}"
    );
    // Every rule has evaluated at least once without an error.
    let rules = basphere_testkit::poll_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let v = prom.get("/api/v1/rules").await.ok_or(Value::Null)?;
            let all: Vec<Value> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = !all.is_empty()
                && all.iter().all(|r| {
                    r["lastEvaluation"]
                        .as_str()
                        .is_some_and(|t| !t.starts_with("0001"))
                });
            if evaluated { Ok(all) } else { Err(v) }
        },
    )
    .await
    .unwrap_or_else(|v| panic!("rules did not evaluate: {v}"));
    assert!(rules.len() >= 17, "{rules:?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "rule {} fails: {r}", r["name"]);
    }
    // The server is up and exports its build info: the absence alert (pending from the first
    // evaluation, before the first scrape) turns inactive.
    basphere_testkit::poll_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let v = prom.get("/api/v1/rules").await.ok_or(Value::Null)?;
            let state = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .find(|r| r["name"] == "BasphereMetricsAbsent")
                .map(|r| r["state"].clone());
            if state == Some(Value::from("inactive")) {
                Ok(())
            } else {
                Err(v)
            }
        },
    )
    .await
    .unwrap_or_else(|v| panic!("the absence alert stays active: {v}"));
}
