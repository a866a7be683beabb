//! Builds the configured provider from its config section.

use anyhow::{Context, bail};
use basphere_config::{Config, ProviderKind};
use basphere_provider::{NullProvider, Provider};
use basphere_qemu::{QemuConfig, QemuProvider};
use std::sync::Arc;
use std::time::Duration;

/// The provider `provider.kind` names, ready to use.
pub async fn build(cfg: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    match cfg.provider.kind {
        ProviderKind::Null => Ok(Arc::new(null_provider())),
        ProviderKind::Qemu => Ok(Arc::new(qemu(cfg)?)),
        ProviderKind::Vsphere => Ok(Arc::new(vsphere(cfg).await?)),
    }
}

/// Connects to vCenter with the `[vsphere]` section; credentials come from its 0600 file.
async fn vsphere(cfg: &Config) -> anyhow::Result<basphere_vsphere::VsphereProvider> {
    basphere_vsphere::install_crypto_provider();
    let Some(t) = cfg.vsphere.clone() else {
        bail!("provider.kind = \"vsphere\" needs a [vsphere] section");
    };
    let vc = basphere_vsphere::VsphereConfig::from_toml(t)
        .map_err(|e| anyhow::anyhow!("config section [vsphere]: {e}"))?;
    basphere_vsphere::VsphereProvider::connect(vc)
        .await
        .context("connecting to vCenter")
}

/// The do-nothing test provider; `BASPHERE_NULL_DELAY_MS` makes each phase slow and
/// `BASPHERE_NULL_FAIL_PHASE` makes that phase fail for VMs named `fail-*` (test aids).
fn null_provider() -> NullProvider {
    let delay_ms: u64 = std::env::var("BASPHERE_NULL_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut p = NullProvider::new(Duration::from_millis(delay_ms));
    p.fail_phase = match std::env::var("BASPHERE_NULL_FAIL_PHASE").as_deref() {
        Ok("prepare") => Some("prepare"),
        Ok("start") => Some("start"),
        Ok("wait_ready") => Some("wait_ready"),
        _ => None,
    };
    p
}

/// The `[qemu]` section, with disks and images under `data_dir` unless it says otherwise.
pub fn qemu_config(cfg: &Config) -> anyhow::Result<QemuConfig> {
    let mut t = cfg.qemu.clone().unwrap_or_default();
    for (key, sub) in [("images_dir", "images"), ("state_dir", "vms")] {
        t.entry(key)
            .or_insert_with(|| toml::Value::String(cfg.data_dir.join(sub).display().to_string()));
    }
    t.try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("config section [qemu]: {e}"))
}

fn qemu(cfg: &Config) -> anyhow::Result<QemuProvider> {
    QemuProvider::new(qemu_config(cfg)?).context("starting the qemu provider")
}
