//! Readiness as the composition root wires it: the engine counts as running only once
//! `serve` started it, and a taken `[metrics] listen` port stops the build.

use basphere_api::{Listeners, ServeOptions};
use basphere_app::{App, Overrides};
use basphere_config::Config;
use basphere_provider::{CheckStatus, NullProvider};
use std::sync::Arc;
use std::time::Duration;

fn config(dir: &std::path::Path, extra: &[(&str, &str)]) -> Arc<Config> {
    let mut env = vec![
        ("BASPHERE_DATA_DIR".to_string(), dir.display().to_string()),
        ("BASPHERE_SERVER__SOCKET".into(), "\"\"".into()),
        ("BASPHERE_SERVER__LISTEN".into(), "\"\"".into()),
        ("BASPHERE_PROVIDER__KIND".into(), "null".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Arc::new(Config::load(None, env).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_is_ready_only_once_served() {
    let tmp = tempfile::tempdir().unwrap();
    let provider = Arc::new(NullProvider::new(Duration::ZERO));
    let app = App::build(config(tmp.path(), &[]), Overrides::with_provider(provider))
        .await
        .unwrap();
    let checks = app.services().readiness().await;
    let engine = checks.iter().find(|c| c.name == "engine").unwrap();
    assert_eq!(
        engine.status,
        CheckStatus::Fail,
        "built, not serving: {engine:?}"
    );
    let database = checks.iter().find(|c| c.name == "database").unwrap();
    assert_eq!(database.status, CheckStatus::Ok, "{database:?}");
    let listeners = Listeners {
        unix: None,
        tcp: None,
    };
    let running = app.serve(listeners, ServeOptions::default());
    // Answers are reused for 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let checks = running.app().services().readiness().await;
    assert!(
        checks.iter().all(|c| c.status == CheckStatus::Ok),
        "{checks:?}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("\"{}\"", taken.local_addr().unwrap());
    let cfg = config(tmp.path(), &[("BASPHERE_METRICS__LISTEN", &addr)]);
    let provider = Arc::new(NullProvider::new(Duration::ZERO));
    let err = App::build(cfg, Overrides::with_provider(provider))
        .await
        .err()
        .expect("the port is taken");
    assert!(
        err.to_string().contains("[metrics] listen"),
        "names the key: {err}"
    );
}
