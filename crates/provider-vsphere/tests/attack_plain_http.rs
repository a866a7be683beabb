//! L9: an `http://` vCenter URL would carry the password and session cookie in clear. It is
//! refused before anything is sent unless `allow_insecure_http = true` says it is the simulator.

mod common;

use basphere_provider::{MachineState, Machines};
use basphere_vsphere::{Error, VsphereProvider};
use common::{Vcsim, request};
use std::time::Duration;

const PASSWORD: &str = "Plain-Text-Walrus-7";

#[tokio::test]
async fn plain_http_is_refused_before_the_password_is_sent_unless_allowed() {
    let trace = tempfile::NamedTempFile::new().unwrap();
    let sim = Vcsim::start(&[
        "-tls=false",
        "-username",
        "basphere",
        "-password",
        PASSWORD,
        "-trace",
        "-trace-file",
        trace.path().to_str().unwrap(),
    ]);
    assert!(sim.url.starts_with("http://"), "{}", sim.url);
    let mut config = sim.config(sim.credentials_file("basphere", PASSWORD, 0o600));

    // An operator points Basphere at vCenter over plain HTTP.
    config.allow_insecure_http = false;
    let err = VsphereProvider::connect(config.clone()).await.unwrap_err();
    assert!(
        matches!(err, Error::Config(_)) && !err.is_retryable(),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&sim.url)
            && msg.contains("unencrypted")
            && msg.contains("https://")
            && msg.contains("allow_insecure_http = true"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD) && !format!("{err:?}").contains(PASSWORD));
    let sent = std::fs::read_to_string(trace.path()).unwrap();
    assert!(
        !sent.contains("Login") && !sent.contains(PASSWORD),
        "something was sent over plain HTTP:\n{sent}"
    );

    // The simulator, said so explicitly, still works end to end.
    sim.make_template("basphere", PASSWORD).await;
    config.allow_insecure_http = true;
    let p = VsphereProvider::connect(config).await.unwrap();
    let vm = request("plain", 1);
    p.prepare(&vm).await.unwrap();
    p.start(&vm).await.unwrap();
    p.wait_ready(&vm, Duration::from_secs(10)).await.unwrap();
    p.remove(&vm).await.unwrap();
    assert_eq!(p.inspect(&vm).await.unwrap(), MachineState::Absent);
}
