//! Builds the configured provider.

use anyhow::{Context, bail};
use basphere_config::{Config, ProviderKind};
use basphere_provider::{NullProvider, Provider};
use std::sync::Arc;
use std::time::Duration;

pub fn build(cfg: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    match cfg.provider.kind {
        ProviderKind::Null => {
            let delay_ms: u64 = std::env::var("BASPHERE_NULL_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut p = NullProvider::new(Duration::from_millis(delay_ms));
            if let Ok(phase) = std::env::var("BASPHERE_NULL_FAIL_PHASE") {
                p.fail_phase = match phase.as_str() {
                    "prepare" => Some("prepare"),
                    "start" => Some("start"),
                    "wait_ready" => Some("wait_ready"),
                    _ => None,
                };
            }
            Ok(Arc::new(p))
        }
        ProviderKind::Qemu => qemu(cfg),
        ProviderKind::Vsphere => {
            bail!("provider.kind = \"vsphere\" is not wired into this build yet; use qemu or null")
        }
    }
}

fn qemu(cfg: &Config) -> anyhow::Result<Arc<dyn Provider>> {
    let _ = cfg;
    Err(anyhow::anyhow!("the qemu provider is not wired in yet"))
        .context("provider.kind = \"qemu\"")
}

/// `basphere image build NAME`.
pub async fn build_image(
    config: Option<&std::path::Path>,
    name: &str,
    force: bool,
) -> anyhow::Result<()> {
    let _ = (config, name, force);
    bail!("image building comes with the qemu provider, which is not wired in yet")
}

/// The ssh command to reach VMs (inside the lab namespace when the qemu provider uses one).
pub fn ssh_command(config: Option<&std::path::Path>) -> std::process::Command {
    let _ = config;
    std::process::Command::new("ssh")
}
