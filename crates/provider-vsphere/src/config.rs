//! Configuration of the vSphere provider and the credentials file it reads.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `[vsphere]` section of the server config. Inventory names are paths as vCenter shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsphereConfig {
    /// vCenter URL, e.g. `https://vcenter.example.com` (`/sdk` is added when no path is given).
    pub server: String,
    /// Datacenter inventory path, e.g. `DC0` or `Europe/DC1`.
    pub datacenter: String,
    /// Cluster name under the datacenter's host folder.
    pub cluster: String,
    /// Resource pool path below the cluster's root pool (`Resources`); the root pool when absent.
    #[serde(default)]
    pub resource_pool: Option<String>,
    /// Datastore name under the datacenter's datastore folder.
    pub datastore: String,
    /// Port group name (standard or distributed) under the datacenter's network folder.
    pub network: String,
    /// VM folder path below the datacenter's VM folder; created when missing.
    pub folder: String,
    /// Per OS image name: the template to clone and how to log into it. Optional when the
    /// request carries the template name (`image_ref`) and the guest NIC is `default_nic`.
    #[serde(default)]
    pub templates: BTreeMap<String, TemplateConfig>,
    /// Guest NIC name for images without a `templates` entry.
    #[serde(default = "default_nic")]
    pub default_nic: String,
    #[serde(default)]
    pub tls: TlsConfig,
    /// TOML file with `username` and `password`; must be mode 0600.
    pub credentials_file: PathBuf,
    /// Clone one template at a time (vcsim 0.24 crashes on parallel clones of one source).
    #[serde(default = "default_true")]
    pub serialize_clones: bool,
    /// Longest wait for one vCenter task (clone, reconfigure, power, destroy), in seconds.
    #[serde(default = "default_task_deadline")]
    pub task_deadline_secs: f64,
    /// Test aid for the vcsim simulator only: tell it the guest's IP through the extraConfig key
    /// `SET.guest.ipAddress`, standing in for VMware Tools. Never set this against a real vCenter.
    #[serde(default)]
    pub simulator_guest_ip: bool,
    /// Accept an `http://` server URL. Plain HTTP carries the vCenter password and the session
    /// cookie unencrypted, so this exists only for the vcsim simulator on a test machine.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// One OS image on vSphere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Template path below the datacenter's VM folder, e.g. `templates/ubuntu-24.04`.
    pub template: String,
    /// Account cloud-init creates in the guest.
    pub login_user: String,
    /// Name of the guest's network interface the static address goes on.
    #[serde(default = "default_nic")]
    pub nic: String,
}

/// How the server certificate is checked. Default: the system's trust roots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) to trust instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. Only for labs and the simulator; must be spelled out.
    #[serde(default)]
    pub insecure: bool,
}

fn default_true() -> bool {
    true
}
fn default_task_deadline() -> f64 {
    600.0
}
fn default_nic() -> String {
    "ens192".into()
}

impl VsphereConfig {
    /// The SOAP endpoint: the server URL with `/sdk` when it has no path.
    pub fn sdk_url(&self) -> String {
        let s = self.server.trim_end_matches('/');
        let after_scheme = s.split_once("://").map_or(s, |(_, rest)| rest);
        if after_scheme.contains('/') {
            s.to_string()
        } else {
            format!("{s}/sdk")
        }
    }

    /// Parses the `[vsphere]` section of the server config.
    pub fn from_toml(table: toml::Table) -> Result<VsphereConfig> {
        let c: VsphereConfig = table
            .try_into()
            .map_err(|e| Error::Config(format!("[vsphere] section: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The task deadline as a duration.
    pub fn task_deadline(&self) -> Duration {
        Duration::from_secs_f64(self.task_deadline_secs)
    }

    /// The template entry for an image: by image name, else by template name.
    pub fn template_for(&self, image: &str) -> Option<&TemplateConfig> {
        self.templates
            .get(image)
            .or_else(|| self.templates.values().find(|t| t.template == image))
    }

    /// Checks what can be checked without talking to vCenter.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[vsphere] {m}")));
        if self.server.starts_with("http://") {
            if !self.allow_insecure_http {
                return bad(format!(
                    "server = {:?}: plain HTTP would send the vCenter password and session cookie unencrypted; use the https:// URL of vCenter (with tls.ca_file for a private CA), or, only for the vcsim simulator on a test machine, set allow_insecure_http = true",
                    self.server
                ));
            }
        } else if !self.server.starts_with("https://") {
            return bad(format!(
                "server = {:?}: must be an https:// URL",
                self.server
            ));
        }
        for (key, v) in [
            ("datacenter", &self.datacenter),
            ("cluster", &self.cluster),
            ("datastore", &self.datastore),
            ("network", &self.network),
            ("folder", &self.folder),
        ] {
            if v.trim().is_empty() {
                return bad(format!("{key} must not be empty"));
            }
        }
        if !(self.task_deadline_secs.is_finite() && self.task_deadline_secs > 0.0) {
            return bad("task_deadline_secs must be a positive number of seconds".into());
        }
        if self.tls.insecure && self.tls.ca_file.is_some() {
            return bad("tls: set either ca_file or insecure = true, not both".into());
        }
        Ok(())
    }
}

/// A string that never shows in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself: only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// vCenter login, read from the credentials file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// Reads a TOML credentials file (`username`, `password`). Refuses files that group or others
    /// can read or write: the file must be mode 0600 (or stricter).
    pub fn load(path: &Path) -> Result<Credentials> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            Error::Config(format!(
                "cannot read vSphere credentials file {}: {e}",
                path.display()
            ))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::Config(format!(
                "vSphere credentials file {} has mode {mode:04o}; it must not be readable by group or others: run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read vSphere credentials file {}: {e}",
                path.display()
            ))
        })?;
        // toml's error text quotes the offending line, which may hold the password: leave it out.
        toml::from_str(&text).map_err(|_| {
            Error::Config(format!(
                "vSphere credentials file {} is not valid: it needs exactly `username = \"...\"` and `password = \"...\"`",
                path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_hidden_in_debug() {
        let c = Credentials {
            username: "admin".into(),
            password: Secret::new("hunter2"),
        };
        let s = format!("{c:?}");
        assert!(s.contains("admin") && !s.contains("hunter2"), "{s}");
    }

    #[test]
    fn sdk_url_adds_sdk_only_without_path() {
        let mut c: VsphereConfig = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(c.sdk_url(), "https://vcenter.example.com/sdk");
        c.server = "https://127.0.0.1:8989/sdk".into();
        assert_eq!(c.sdk_url(), "https://127.0.0.1:8989/sdk");
    }

    pub(crate) const EXAMPLE: &str = r#"
server = "https://vcenter.example.com"
datacenter = "DC0"
cluster = "DC0_C0"
datastore = "LocalDS_0"
network = "VM Network"
folder = "basphere"
credentials_file = "/etc/basphere/vsphere-credentials.toml"
tls = { ca_file = "/etc/basphere/vcenter-ca.pem" }

[templates.ubuntu-24-04]
template = "templates/ubuntu-24.04"
login_user = "ubuntu"
nic = "ens192"
"#;

    #[test]
    fn example_parses_and_unknown_keys_are_refused() {
        let c: VsphereConfig = toml::from_str(EXAMPLE).unwrap();
        c.validate().unwrap();
        assert!(c.serialize_clones);
        assert_eq!(c.task_deadline(), Duration::from_secs(600));
        assert_eq!(c.template_for("ubuntu-24-04").unwrap().login_user, "ubuntu");
        assert!(c.template_for("templates/ubuntu-24.04").is_some());
        let bad = format!("{EXAMPLE}\nbogus = 1\n");
        assert!(toml::from_str::<VsphereConfig>(&bad).is_err());
        let table: toml::Table = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(VsphereConfig::from_toml(table).unwrap(), c);
    }

    #[test]
    fn plain_http_is_refused_unless_explicitly_allowed() {
        let mut c: VsphereConfig = toml::from_str(EXAMPLE).unwrap();
        c.server = "http://vcenter.example.com".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("http://vcenter.example.com")
                && e.contains("unencrypted")
                && e.contains("https://")
                && e.contains("allow_insecure_http = true"),
            "{e}"
        );
        let mut table: toml::Table = toml::from_str(EXAMPLE).unwrap();
        table.insert("server".into(), "http://127.0.0.1:8989/sdk".into());
        let e = VsphereConfig::from_toml(table.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("allow_insecure_http = true"), "{e}");

        table.insert("allow_insecure_http".into(), true.into());
        let c = VsphereConfig::from_toml(table).unwrap();
        assert!(c.allow_insecure_http);
        assert_eq!(c.sdk_url(), "http://127.0.0.1:8989/sdk");

        for server in [
            "ftp://vcenter.example.com",
            "vcenter.example.com",
            "HTTP://x",
        ] {
            let mut c = c.clone();
            c.server = server.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("must be an https:// URL"), "{server}: {e}");
        }
    }

    #[test]
    fn credentials_mode_is_enforced_and_parse_errors_hide_content() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "username = \"u\"\npassword = \"s3cr3t\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credentials::load(&p).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Credentials::load(&p).unwrap().password.expose(), "s3cr3t");
        std::fs::write(&p, "username = \"u\"\npassword = s3cr3t\n").unwrap();
        let e = Credentials::load(&p).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
