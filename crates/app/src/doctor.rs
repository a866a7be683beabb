//! The checks `basphere doctor` runs on the host itself: the install's files, and — when no
//! server answers — the database and the provider the way a starting server would meet them.
//! They are the same functions `/ready` uses ([`basphere_service::database_check`], the
//! providers' checks); a running server's own answer covers the engine.

use basphere_config::{Config, ProviderKind};
use basphere_provider::Check;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// How long `doctor` waits to connect to vCenter.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// Modes of the data dir and the admin token: private to root.
pub fn file_checks(cfg: &Config) -> Vec<Check> {
    let token = cfg.admin_token_path();
    let token_check = if token.exists() {
        private("files.admin_token", &token, 0o077, "chmod 600")
    } else {
        Check::warn(
            "files.admin_token",
            format!("no admin token at {}", token.display()),
            "none is needed on this host (root on the socket is the admin); for remote admin \
             use, basphere init writes one, or: basphere token create",
        )
    };
    vec![
        private("files.data_dir", &cfg.data_dir, 0o077, "chmod 700"),
        token_check,
    ]
}

fn private(name: &str, path: &Path, forbidden: u32, chmod: &str) -> Check {
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & forbidden == 0 => Check::ok(
            name,
            format!(
                "{} mode {:04o}",
                path.display(),
                m.permissions().mode() & 0o7777
            ),
        ),
        Ok(m) => Check::fail(
            name,
            format!(
                "{} has mode {:04o}: group or others can read it",
                path.display(),
                m.permissions().mode() & 0o7777
            ),
            format!(
                "{chmod} {} (basphere serve also repairs it at start)",
                path.display()
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::fail(
            name,
            format!("{} does not exist", path.display()),
            "basphere init",
        ),
        Err(e) => Check::fail(
            name,
            format!("{}: {e}", path.display()),
            "run basphere doctor as root",
        ),
    }
}

/// The database as a starting server would open it. An embedded database that does not exist
/// yet is reported, not made.
pub async fn database(cfg: &Config) -> Check {
    if cfg.database.url.is_none() && !cfg.db_path().exists() {
        return Check::fail(
            "database",
            format!("no database at {}", cfg.db_path().display()),
            "basphere init",
        );
    }
    match crate::open_store(cfg).await {
        Ok(store) => {
            let c = basphere_service::database_check(&store, None).await;
            store.close().await;
            c
        }
        Err(e) => Check::fail(
            "database",
            format!("{e:#}"),
            match cfg.database.url {
                Some(_) => "check that PostgreSQL runs and accepts [database] url from this host",
                None => "check the data dir (disk space, permissions)",
            },
        ),
    }
}

/// The provider `provider.kind` names, checked as far as this host can without a server: for
/// qemu the host (tools, KVM probed, network, images), for vSphere its section and a session.
pub async fn provider(cfg: &Config) -> Vec<Check> {
    match cfg.provider.kind {
        ProviderKind::Null => vec![Check::ok(
            "provider",
            "null: the do-nothing test provider makes no machines",
        )],
        ProviderKind::Qemu => match crate::providers::qemu_config(cfg) {
            Ok(q) => basphere_qemu::host_checks(&q).await,
            Err(e) => vec![Check::fail(
                "qemu.config",
                format!("{e:#}"),
                "fix the [qemu] section",
            )],
        },
        ProviderKind::Vsphere => {
            let section = cfg
                .vsphere
                .clone()
                .map(basphere_vsphere::VsphereConfig::from_toml);
            let vc = match section {
                Some(Ok(vc)) => vc,
                Some(Err(e)) => {
                    return vec![Check::fail(
                        "vsphere.config",
                        e.to_string(),
                        "fix the [vsphere] section",
                    )];
                }
                None => {
                    return vec![Check::fail(
                        "vsphere.config",
                        "provider.kind = \"vsphere\" but there is no [vsphere] section",
                        "add [vsphere] (see crates/provider-vsphere/README.md)",
                    )];
                }
            };
            let mut checks = basphere_vsphere::config_checks(&vc);
            if checks.iter().any(Check::failed) {
                return checks;
            }
            basphere_vsphere::install_crypto_provider();
            let connected = tokio::time::timeout(
                CONNECT_DEADLINE,
                basphere_vsphere::VsphereProvider::connect(vc),
            )
            .await;
            match connected {
                Ok(Ok(p)) => {
                    let p: &dyn basphere_provider::Provider = &p;
                    checks.retain(|c| c.name != "vsphere.credentials");
                    checks.extend(basphere_service::provider_checks(p).await);
                }
                Ok(Err(e)) => checks.push(Check::fail(
                    "vsphere.session",
                    e.to_string(),
                    "check that vCenter answers from this host, the credentials and [vsphere] tls",
                )),
                Err(_) => checks.push(Check::fail(
                    "vsphere.session",
                    format!(
                        "vCenter did not answer within {} s",
                        CONNECT_DEADLINE.as_secs()
                    ),
                    "check that vCenter answers from this host (network, firewall)",
                )),
            }
            checks
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basphere_provider::CheckStatus;

    #[test]
    fn a_readable_data_dir_fails_with_its_chmod() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = private("files.data_dir", dir.path(), 0o077, "chmod 700");
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(c.fix.unwrap().starts_with("chmod 700 "));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            private("files.data_dir", dir.path(), 0o077, "chmod 700").status,
            CheckStatus::Ok
        );
    }
}
