//! Secrets never reach log output: every log line of a whole create/delete cycle, a re-login and
//! a failed login is captured at TRACE level and searched for the password.

mod common;

use basphere_provider::Machines;
use basphere_vsphere::VsphereProvider;
use common::{Vcsim, request};
use std::sync::Arc;
use std::time::Duration;

/// A `MakeWriter` collecting every log line in memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    const PASSWORD: &str = "Zebra-Quartz-9931";
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global, and alone in this test binary: tracing caches per-callsite interest process-wide,
    // so a thread-scoped subscriber would miss events first seen by other tests' threads.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let sim = Vcsim::start(&["-username", "basphere", "-password", PASSWORD]);
    sim.make_template("basphere", PASSWORD).await;
    let creds = sim.credentials_file("basphere", PASSWORD, 0o600);
    let config = sim.config(creds.clone());
    let p = VsphereProvider::connect(config.clone()).await.unwrap();
    let vm = request("quiet", 5);
    p.prepare(&vm).await.unwrap();
    p.client().logout().await.unwrap(); // forces a re-login
    p.start(&vm).await.unwrap();
    p.wait_ready(&vm, Duration::from_secs(5)).await.unwrap();
    p.remove(&vm).await.unwrap();
    // Everything a caller might print.
    tracing::info!(provider = ?p, config = ?config, client = ?p.client(), "debug output");
    let creds_loaded = basphere_vsphere::Credentials::load(&creds).unwrap();
    tracing::info!(credentials = ?creds_loaded, "credentials");
    // A failed login's error.
    std::fs::write(
        &creds,
        format!("username = \"basphere\"\npassword = \"{PASSWORD}x\"\n"),
    )
    .unwrap();
    let err = VsphereProvider::connect(config).await.unwrap_err();
    tracing::error!(error = %err, debug = ?err, "login failed");

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("logged in to vCenter"),
        "logs were not captured:\n{text}"
    );
    assert!(text.contains("InvalidLogin"));
    assert!(text.contains("vim25 call"), "TRACE lines missing:\n{text}");
    assert!(!text.contains(PASSWORD), "password in logs:\n{text}");
}
