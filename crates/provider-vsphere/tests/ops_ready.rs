//! The vSphere provider's readiness against the real simulator: a live session that sees the
//! VM folder, the credentials file's mode, and a vCenter that went away.

mod common;

use basphere_provider::{CheckStatus, Provider};
use basphere_vsphere::VsphereProvider;
use common::Vcsim;
use std::os::unix::fs::PermissionsExt;

fn status(checks: &[basphere_provider::Check], name: &str) -> CheckStatus {
    checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} in {checks:?}"))
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_session_and_the_credentials_mode() {
    let sim = Vcsim::start(&[]);
    let creds = sim.credentials_file("user", "pass", 0o600);
    let config = sim.config(creds.clone());
    let p = VsphereProvider::connect(config.clone()).await.unwrap();
    let checks = p.readiness().await;
    assert_eq!(
        status(&checks, "vsphere.session"),
        CheckStatus::Ok,
        "{checks:?}"
    );
    assert_eq!(status(&checks, "vsphere.credentials"), CheckStatus::Ok);
    assert!(
        checks.iter().all(|c| !c.detail.contains("pass\"")),
        "no password in {checks:?}"
    );

    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let checks = p.readiness().await;
    assert_eq!(status(&checks, "vsphere.credentials"), CheckStatus::Fail);
    let static_checks = basphere_vsphere::config_checks(&config);
    assert_eq!(
        status(&static_checks, "vsphere.credentials"),
        CheckStatus::Fail
    );
    assert_eq!(status(&static_checks, "vsphere.config"), CheckStatus::Ok);

    drop(sim);
    let checks = p.readiness().await;
    let session = checks.iter().find(|c| c.name == "vsphere.session").unwrap();
    assert_eq!(session.status, CheckStatus::Fail, "{session:?}");
    assert!(session.fix.is_some());
}
