//! Readiness of the vSphere provider: a working vCenter session that still sees Basphere's VM
//! folder, and a private credentials file. [`config_checks`] needs no session, so `basphere
//! doctor` can name the problem also when the provider cannot connect.

use crate::config::VsphereConfig;
use crate::provider::VsphereProvider;
use basphere_provider::Check;
use std::path::Path;
use std::time::Duration;

/// How long the session check waits for vCenter.
const SESSION_DEADLINE: Duration = Duration::from_secs(10);

/// The checks of a connected provider: the credentials file's mode and one round trip that
/// needs the session (a lost session is logged in again by the client on the way).
pub(crate) async fn provider_checks(p: &VsphereProvider) -> Vec<Check> {
    let cfg = p.config();
    let mut checks = vec![credentials_mode(&cfg.credentials_file)];
    let folder = folder_path(cfg);
    let found =
        tokio::time::timeout(SESSION_DEADLINE, p.client().find_by_inventory_path(&folder)).await;
    checks.push(match found {
        Ok(Ok(Some(_))) => Check::ok(
            "vsphere.session",
            format!("session on {} sees folder {folder}", cfg.server),
        ),
        Ok(Ok(None)) => Check::fail(
            "vsphere.session",
            format!("the VM folder {folder} is gone from {}", cfg.server),
            "restart basphere (it creates the folder) or fix [vsphere] folder",
        ),
        Ok(Err(e)) => Check::fail(
            "vsphere.session",
            format!("vCenter {}: {e}", cfg.server),
            "check that vCenter answers from this host, the credentials file and [vsphere] tls",
        ),
        Err(_) => Check::fail(
            "vsphere.session",
            format!(
                "vCenter {} did not answer within {} s",
                cfg.server,
                SESSION_DEADLINE.as_secs()
            ),
            "check that vCenter answers from this host (network, firewall, its load)",
        ),
    });
    checks
}

/// What can be checked of `[vsphere]` without vCenter: the section itself and the credentials
/// file's mode.
pub fn config_checks(cfg: &VsphereConfig) -> Vec<Check> {
    let section = match cfg.validate() {
        Ok(()) => Check::ok("vsphere.config", format!("server {}", cfg.server)),
        Err(e) => Check::fail("vsphere.config", e.to_string(), "fix the [vsphere] section"),
    };
    vec![section, credentials_mode(&cfg.credentials_file)]
}

fn folder_path(cfg: &VsphereConfig) -> String {
    let mut path = format!("{}/vm", cfg.datacenter.trim_matches('/'));
    for part in cfg.folder.split('/').filter(|p| !p.is_empty()) {
        path = format!("{path}/{part}");
    }
    path
}

/// The credentials file must be readable by its owner only.
fn credentials_mode(path: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 == 0 => Check::ok(
            "vsphere.credentials",
            format!(
                "{} mode {:04o}",
                path.display(),
                m.permissions().mode() & 0o777
            ),
        ),
        Ok(m) => Check::fail(
            "vsphere.credentials",
            format!(
                "{} has mode {:04o}: group or others can read the vCenter password",
                path.display(),
                m.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Err(e) => Check::fail(
            "vsphere.credentials",
            format!("cannot read {}: {e}", path.display()),
            "write it with `username = \"…\"` and `password = \"…\"`, mode 0600, and point \
             [vsphere] credentials_file at it",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basphere_provider::CheckStatus;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_readable_credentials_file_fails_with_chmod() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = credentials_mode(f.path());
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.detail.contains("0644"), "{c:?}");
        assert_eq!(c.fix.unwrap(), format!("chmod 600 {}", f.path().display()));
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(credentials_mode(f.path()).status, CheckStatus::Ok);
    }
}
