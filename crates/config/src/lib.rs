//! `basphere.toml`: what the platform is told by its operator.
//!
//! Loading is three steps: parse the file, apply `BASPHERE_*` environment overrides
//! (`BASPHERE_NETWORK__CIDR=10.9.0.0/21` sets `network.cidr`: `__` separates levels), then
//! check every rule. Secrets may be read from files (`database.url_file`,
//! `recaptcha.secret_key_file`: [`SECRET_FILE_KEYS`]). A bad config fails with the key at fault and why. Provider sections
//! (`[qemu]`, `[vsphere]`) are kept as TOML here and parsed by the provider that owns them.

use basphere_core::{ImageName, NetworkPool, Quota, Spec, SpecName, Username};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod secret_files;
pub use secret_files::SECRET_FILE_KEYS;
mod server;
pub use server::{LimitsConfig, RecaptchaConfig, RegistrationConfig, ServerConfig};
mod tls;
pub use tls::{CertField, CertIdentity, TlsFiles, Unmapped};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the database, tokens, VM disks and images live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub bastion: BastionConfig,
    pub network: NetworkPool,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default = "default_specs")]
    pub specs: BTreeMap<SpecName, Spec>,
    #[serde(default = "default_images")]
    pub images: BTreeMap<ImageName, ImageConfig>,
    #[serde(default)]
    pub provider: ProviderConfig,
    #[serde(default)]
    pub engine: EngineSettings,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub registration: RegistrationConfig,
    #[serde(default)]
    pub recaptcha: RecaptchaConfig,
    /// Limits on what one create may add to a VM (`[vms.extra_disks]`, `[vms.extra_networks]`).
    #[serde(default)]
    pub vms: VmsConfig,
    /// The extra networks VMs may join, by name (`[networks.NAME]`).
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkDef>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The `[qemu]` section, parsed by the qemu provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<toml::Table>,
    /// The `[vsphere]` section, parsed by the vsphere provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsphere: Option<toml::Table>,
}

/// Which database holds the state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`: a PostgreSQL database that several servers (replicas)
    /// may share. Unset: the embedded SQLite file `<data_dir>/basphere.db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The Prometheus endpoint: `/metrics` on a listener of its own, never on the API's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` serving `GET /metrics` (e.g. `127.0.0.1:9464`); `""` (the default) = off.
    pub listen: String,
}

/// Whether Basphere manages Unix accounts on this bastion host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BastionConfig {
    /// Approval creates the user's Unix account; key approval replaces its key; delete removes it.
    pub manage_accounts: bool,
    /// Group every managed account joins.
    pub group: String,
    /// Host name users SSH to (shown in guides and hints).
    pub host: String,
    /// Hours an enrollment code stays valid (when accounts are not managed).
    pub enrollment_ttl_hours: u32,
}

impl Default for BastionConfig {
    fn default() -> Self {
        Self {
            manage_accounts: false,
            group: "basphere-users".into(),
            host: "localhost".into(),
            enrollment_ttl_hours: 72,
        }
    }
}

/// One OS image users may pick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The account cloud-init creates in the guest.
    pub login_user: String,
    /// What the provider calls it: a base image name (qemu) or a template name (vsphere).
    #[serde(default)]
    pub provider_ref: Option<String>,
    /// The image used when a create request names none.
    #[serde(default)]
    pub default: bool,
}

/// `[vms]`: what a create may add beside the spec (the disk space a user may hold is their
/// quota's `max_disk_gib`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VmsConfig {
    pub extra_disks: ExtraDiskLimits,
    pub extra_networks: ExtraNetworkLimits,
}

/// `[vms.extra_disks]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtraDiskLimits {
    /// Extra disks per VM (0: none may be asked for).
    pub max_count: u32,
    pub min_gb: u32,
    pub max_gb: u32,
}

impl Default for ExtraDiskLimits {
    fn default() -> Self {
        Self {
            max_count: 3,
            min_gb: 10,
            max_gb: 500,
        }
    }
}

/// `[vms.extra_networks]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtraNetworkLimits {
    /// Extra networks per VM.
    pub max_count: u32,
}

impl Default for ExtraNetworkLimits {
    fn default() -> Self {
        Self { max_count: 1 }
    }
}

/// `[networks.NAME]`: an extra network VMs may join beside their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    /// The network's own address range; static addresses are leased from it (lowest free).
    pub cidr: ipnet::Ipv4Net,
    /// The network's gateway, kept out of the pool (in qemu lab mode the bridge holds it).
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// `true`: the guest asks DHCP for its address and none is leased here.
    #[serde(default)]
    pub dhcp: bool,
    /// qemu: the bridge its taps join (lab mode: made inside the lab namespace).
    #[serde(default)]
    pub bridge: Option<String>,
    /// vSphere: the port group its NICs join.
    #[serde(default)]
    pub port_group: Option<String>,
}

impl NetworkDef {
    /// The addresses a guest may get, lowest first: the range without its network and
    /// broadcast addresses and the gateway.
    pub fn assignable(&self) -> impl Iterator<Item = std::net::Ipv4Addr> + '_ {
        self.cidr.hosts().filter(move |a| Some(*a) != self.gateway)
    }
}

/// Which provider builds VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Qemu,
    Vsphere,
    /// The do-nothing test provider: records VMs, makes no machines. For tests and benchmarks.
    Null,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
}

/// Engine tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    pub max_parallel: usize,
    pub max_attempts: u32,
    pub ready_timeout_secs: u64,
    pub lease_secs: u64,
    /// Steps of one workflow finishing within this many milliseconds of the first of them
    /// are recorded in one commit (0: every step in its own).
    pub fuse_window_ms: u64,
    /// Workflows of one user running at once, over every server (unset: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_user: Option<u32>,
    /// Workflows of one provider running at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_provider: Option<u32>,
    /// Workflows on one hypervisor host running at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_host: Option<u32>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_parallel: 16,
            max_attempts: 5,
            ready_timeout_secs: 300,
            lease_secs: 15,
            fuse_window_ms: 20,
            max_per_user: None,
            max_per_provider: None,
            max_per_host: None,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/basphere")
}

fn default_specs() -> BTreeMap<SpecName, Spec> {
    Spec::defaults().into_iter().collect()
}

fn default_images() -> BTreeMap<ImageName, ImageConfig> {
    BTreeMap::from([(
        "debian-12".parse().expect("valid"),
        ImageConfig {
            login_user: "debian".into(),
            provider_ref: None,
            default: true,
        },
    )])
}

/// A config that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// Environment variables that configure the client, never config keys.
const CLIENT_VARS: &[&str] = &[
    "CONFIG", "SOCKET", "URL", "TOKEN", "CA", "CERT", "KEY", "OUTPUT", "LOG",
];

impl Config {
    /// Reads `path` (or the embedded defaults when `None`), applies `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, shown) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.to_path_buf(), e))?,
                p.to_path_buf(),
            ),
            None => (DEFAULT_TOML.to_string(), PathBuf::from("<defaults>")),
        };
        Self::from_toml(&text, &shown, env)
    }

    /// Parses TOML text, applies `env`, validates.
    pub fn from_toml(
        text: &str,
        shown: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(shown.to_path_buf(), e.to_string()))?;
        apply_env(&mut table, env)?;
        secret_files::resolve(&mut table)?;
        let cfg: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(shown.to_path_buf(), e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                key: "database.url".into(),
                reason: "must be a PostgreSQL URL (postgres://user@host:port/db); leave it \
                         unset for the embedded SQLite database"
                    .into(),
            });
        }
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: key.into(),
            reason,
        };
        self.network
            .validate()
            .map_err(|e| bad("network", e.to_string()))?;
        if self.quota.max_ips > self.network.block_size {
            return Err(bad(
                "quota.max_ips",
                format!(
                    "{} is more than a user's block holds (network.block_size = {})",
                    self.quota.max_ips, self.network.block_size
                ),
            ));
        }
        if self.specs.is_empty() {
            return Err(bad("specs", "at least one VM size is needed".into()));
        }
        let d = &self.vms.extra_disks;
        if d.min_gb == 0 || d.min_gb > d.max_gb {
            return Err(bad(
                "vms.extra_disks",
                format!(
                    "min_gb ({}) must be at least 1 and at most max_gb ({})",
                    d.min_gb, d.max_gb
                ),
            ));
        }
        for (name, n) in &self.networks {
            let key = format!("networks.{name}");
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok_name {
                return Err(bad(&key, "a network name is 1-64 of [A-Za-z0-9._-]".into()));
            }
            if let Some(g) = n.gateway
                && !n.cidr.contains(&g)
            {
                return Err(bad(&key, format!("gateway {g} is outside cidr {}", n.cidr)));
            }
            if n.cidr.trunc() != n.cidr {
                return Err(bad(&key, format!("cidr {} has host bits set", n.cidr)));
            }
            if n.cidr.contains(&self.network.cidr.network())
                || self.network.cidr.contains(&n.cidr.network())
            {
                return Err(bad(
                    &key,
                    format!(
                        "cidr {} overlaps the VM network {}",
                        n.cidr, self.network.cidr
                    ),
                ));
            }
            if !n.dhcp && n.assignable().next().is_none() {
                return Err(bad(&key, format!("cidr {} holds no guest address", n.cidr)));
            }
        }
        let rc = &self.recaptcha;
        if rc.site_key.is_empty() != rc.secret_key.is_empty() {
            return Err(bad(
                "recaptcha",
                "set both site_key and secret_key (reCAPTCHA on), or neither (off)".into(),
            ));
        }
        if !(rc.verify_url.starts_with("https://") || rc.verify_url.starts_with("http://")) {
            return Err(bad(
                "recaptcha.verify_url",
                format!("{:?} is not an http(s) URL", rc.verify_url),
            ));
        }
        if let Some(d) = self
            .registration
            .allowed_email_domains
            .iter()
            .find(|d| d.trim().is_empty() || d.contains('@'))
        {
            return Err(bad(
                "registration.allowed_email_domains",
                format!("{d:?} is not a domain (write example.org, without @)"),
            ));
        }
        for (name, s) in &self.specs {
            if s.vcpus == 0 || s.memory_mib < 128 || s.disk_gib == 0 {
                return Err(bad(
                    &format!("specs.{name}"),
                    "vcpus must be ≥ 1, memory_mib ≥ 128 and disk_gib ≥ 1".into(),
                ));
            }
        }
        if self.images.is_empty() {
            return Err(bad("images", "at least one OS image is needed".into()));
        }
        let defaults = self.images.values().filter(|i| i.default).count();
        if defaults > 1 {
            return Err(bad(
                "images",
                "only one image may be `default = true`".into(),
            ));
        }
        for (name, i) in &self.images {
            if i.login_user.parse::<Username>().is_err() && i.login_user != "root" {
                return Err(bad(
                    &format!("images.{name}.login_user"),
                    "must be a valid account name (3-20 of a-z, 0-9, -)".into(),
                ));
            }
        }
        if !self.data_dir.is_absolute() {
            return Err(bad("data_dir", "must be an absolute path".into()));
        }
        if self.engine.max_parallel == 0 || self.engine.max_attempts == 0 {
            return Err(bad(
                "engine",
                "max_parallel and max_attempts must be at least 1".into(),
            ));
        }
        if !(self.limits.anon_per_second > 0.0 && self.limits.anon_per_second.is_finite()) {
            return Err(bad(
                "limits.anon_per_second",
                "must be a positive number (set limits.anon_burst = 0 to turn the limit off)"
                    .into(),
            ));
        }
        if self.limits.streams_per_user == 0 || self.limits.streams_total == 0 {
            return Err(bad(
                "limits",
                "streams_per_user and streams_total must be at least 1".into(),
            ));
        }
        let srv = &self.server;
        if srv.header_read_timeout_secs == 0 || srv.idle_timeout_secs == 0 {
            return Err(bad(
                "server",
                "header_read_timeout_secs and idle_timeout_secs must be at least 1".into(),
            ));
        }
        if srv.max_connections == 0
            || srv.max_connections_per_ip == 0
            || srv.max_connections_per_ip > srv.max_connections
        {
            return Err(bad(
                "server.max_connections_per_ip",
                "need 1 ≤ max_connections_per_ip ≤ max_connections".into(),
            ));
        }
        if !srv.public_url.is_empty()
            && !srv.public_url.starts_with("https://")
            && !srv.public_url.starts_with("http://")
        {
            return Err(bad(
                "server.public_url",
                format!("{:?} must start with https:// or http://", srv.public_url),
            ));
        }
        if let Some(t) = &srv.tls {
            t.validate().map_err(|(key, reason)| bad(key, reason))?;
        }
        if self.provider.kind == ProviderKind::Vsphere && self.vsphere.is_none() {
            return Err(bad(
                "vsphere",
                "provider.kind = \"vsphere\" needs a [vsphere] section".into(),
            ));
        }
        Ok(())
    }

    /// The image used when a request names none.
    pub fn default_image(&self) -> &ImageName {
        self.images
            .iter()
            .find(|(_, i)| i.default)
            .or_else(|| self.images.iter().next())
            .map(|(n, _)| n)
            .expect("validated: images not empty")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("basphere.db")
    }

    /// File holding the first admin's token (mode 0600).
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    const TOP: &[&str] = &[
        "data_dir",
        "server",
        "bastion",
        "network",
        "quota",
        "specs",
        "images",
        "provider",
        "engine",
        "qemu",
        "vsphere",
        "limits",
        "database",
        "registration",
        "recaptcha",
        "vms",
        "networks",
        "metrics",
    ];
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("BASPHERE_") else {
            continue;
        };
        if CLIENT_VARS.contains(&rest) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if !TOP.contains(&path[0].as_str()) {
            continue;
        }
        let parsed: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").expect("present"),
            Err(_) => toml::Value::String(value.clone()),
        };
        let mut cur = &mut *table;
        for (i, key) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cur.insert(key.clone(), parsed.clone());
                break;
            }
            let next = cur
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = next.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                reason: format!("{key} is not a section"),
            })?;
        }
    }
    Ok(())
}

/// The commented default config `basphere init` writes.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("t.toml"),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn the_database_url_comes_from_the_environment_and_must_be_postgres() {
        let c = load(
            DEFAULT_TOML,
            &[("BASPHERE_DATABASE__URL", "postgres://b@127.0.0.1:5432/b")],
        )
        .unwrap();
        assert_eq!(
            c.database.url.as_deref(),
            Some("postgres://b@127.0.0.1:5432/b")
        );
        assert_eq!(load(DEFAULT_TOML, &[]).unwrap().database.url, None);
        let e = load(DEFAULT_TOML, &[("BASPHERE_DATABASE__URL", "mysql://x/y")]).unwrap_err();
        assert!(e.to_string().contains("database.url"), "{e}");
    }

    #[test]
    fn defaults_parse() {
        let c = load(DEFAULT_TOML, &[]).unwrap();
        assert_eq!(c.specs.len(), 5);
        assert_eq!(c.quota.max_vms, 10);
        assert_eq!(c.network.block_size, 32);
        assert_eq!(c.default_image().as_str(), "debian-12");
    }

    #[test]
    fn env_overrides() {
        let c = load(
            DEFAULT_TOML,
            &[
                ("BASPHERE_NETWORK__CIDR", "10.9.0.0/21"),
                ("BASPHERE_NETWORK__GATEWAY", "10.9.0.1"),
                ("BASPHERE_QUOTA__MAX_VMS", "3"),
                ("BASPHERE_DATA_DIR", "/tmp/x"),
                ("BASPHERE_TOKEN", "not-a-key"),
            ],
        )
        .unwrap();
        assert_eq!(c.network.cidr.to_string(), "10.9.0.0/21");
        assert_eq!(c.quota.max_vms, 3);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn plaintext_needs_loopback_tls_or_consent() {
        let srv = |listen: &str, extra: &[(&str, &str)]| {
            let mut env = vec![("BASPHERE_SERVER__LISTEN", listen)];
            env.extend_from_slice(extra);
            load(DEFAULT_TOML, &env).unwrap().server
        };
        assert!(
            srv("\"127.0.0.1:8080\"", &[])
                .check_plaintext()
                .unwrap()
                .is_none()
        );
        assert!(
            srv("\"[::1]:8080\"", &[])
                .check_plaintext()
                .unwrap()
                .is_none()
        );
        assert!(srv("\"\"", &[]).check_plaintext().unwrap().is_none());
        let e = srv("\"0.0.0.0:8080\"", &[]).check_plaintext().unwrap_err();
        assert!(e.to_string().contains("allow_plaintext"), "{e}");
        let w = srv(
            "\"0.0.0.0:8080\"",
            &[("BASPHERE_SERVER__ALLOW_PLAINTEXT", "true")],
        )
        .check_plaintext()
        .unwrap();
        assert!(w.unwrap().contains("TLS is off"));
        let tls = srv(
            "\"0.0.0.0:8080\"",
            &[(
                "BASPHERE_SERVER__TLS",
                "{ cert = \"/c.pem\", key = \"/k.pem\" }",
            )],
        );
        assert!(tls.check_plaintext().unwrap().is_none());
    }

    #[test]
    fn client_certificate_settings_errors_name_the_key() {
        let tls = |v: &str| load(DEFAULT_TOML, &[("BASPHERE_SERVER__TLS", v)]);
        let ok = tls(
            "{ cert = \"/c\", key = \"/k\", client_ca = \"/ca\", tokens = false, \
                      client_users = { \"cn:Alice\" = \"alice\" } }",
        )
        .unwrap();
        let t = ok.server.tls.as_ref().unwrap();
        assert!(!t.tokens && !ok.server.tcp_tokens());
        assert_eq!(t.client_users.len(), 1);
        for (value, needle) in [
            (
                "{ cert = \"/c\", key = \"/k\", client_ca = \"/ca\", \
                 client_users = { \"cn:alice\" = \"Not A User\" } }",
                "client_users",
            ),
            (
                "{ cert = \"/c\", key = \"/k\", client_ca = \"/ca\", \
                 client_users = { \"alice\" = \"alice\" } }",
                "server.tls.client_users",
            ),
            (
                "{ cert = \"/c\", key = \"/k\", tokens = false }",
                "server.tls.tokens",
            ),
            (
                "{ cert = \"/c\", key = \"/k\", client_users = { \"cn:a\" = \"alice\" } }",
                "server.tls.client_ca",
            ),
        ] {
            let e = tls(value).unwrap_err().to_string();
            assert!(e.contains(needle), "{value}: {e}");
        }
        assert!(load(DEFAULT_TOML, &[]).unwrap().server.tcp_tokens());
    }

    #[test]
    fn cookies_secure_only_from_config() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        let plain = load(DEFAULT_TOML, &[]).unwrap().server;
        assert!(!plain.cookies_secure(ip("127.0.0.1"), Some("https")));
        let proxied = load(
            DEFAULT_TOML,
            &[("BASPHERE_SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]")],
        )
        .unwrap()
        .server;
        assert!(proxied.cookies_secure(ip("10.1.2.3"), Some("HTTPS")));
        assert!(!proxied.cookies_secure(ip("192.0.2.1"), Some("https")));
        assert!(!proxied.cookies_secure(ip("10.1.2.3"), None));
        let public = load(
            DEFAULT_TOML,
            &[("BASPHERE_SERVER__PUBLIC_URL", "\"https://x.example\"")],
        )
        .unwrap()
        .server;
        assert!(public.cookies_secure(None, None));
        let e = load(
            DEFAULT_TOML,
            &[("BASPHERE_SERVER__PUBLIC_URL", "\"x.example\"")],
        );
        assert!(e.unwrap_err().to_string().contains("server.public_url"));
    }

    #[test]
    fn bad_config_names_the_key() {
        let e = load(DEFAULT_TOML, &[("BASPHERE_NETWORK__GATEWAY", "192.0.2.1")]).unwrap_err();
        assert!(e.to_string().contains("network"), "{e}");
        let e = load(DEFAULT_TOML, &[("BASPHERE_QUOTA__MAX_IPS", "64")]).unwrap_err();
        assert!(e.to_string().contains("quota.max_ips"), "{e}");
        let e = load(&format!("{DEFAULT_TOML}\nbogus = 1\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = load(DEFAULT_TOML, &[("BASPHERE_SPECS__TINY__VCPUS", "0")]).unwrap_err();
        assert!(e.to_string().contains("specs.tiny"), "{e}");
    }

    #[test]
    fn extra_networks_and_disk_limits_load_and_are_checked() {
        let c = load(
            DEFAULT_TOML,
            &[
                (
                    "BASPHERE_NETWORKS__STORAGE",
                    r#"{ cidr = "10.77.0.0/29", gateway = "10.77.0.1", bridge = "bspst0" }"#,
                ),
                ("BASPHERE_QUOTA__MAX_DISK_GIB", "100"),
            ],
        )
        .unwrap();
        assert_eq!(c.vms.extra_disks, ExtraDiskLimits::default());
        assert_eq!(c.vms.extra_networks.max_count, 1);
        assert_eq!(c.quota.max_disk_gib, Some(100), "the default for new users");
        let n = &c.networks["storage"];
        let pool: Vec<String> = n.assignable().map(|a| a.to_string()).collect();
        assert_eq!(pool[0], "10.77.0.2", "the gateway is not leased");
        assert_eq!(pool.len(), 5);
        let e = load(
            DEFAULT_TOML,
            &[("BASPHERE_NETWORKS__X", r#"{ cidr = "10.254.1.0/24" }"#)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("networks.x"), "{e}");
        assert!(e.to_string().contains("overlaps"), "{e}");
        let e = load(
            DEFAULT_TOML,
            &[("BASPHERE_VMS__EXTRA_DISKS__MIN_GB", "900")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("vms.extra_disks"), "{e}");
    }
}
