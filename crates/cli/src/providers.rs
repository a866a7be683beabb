//! The commands that use the qemu provider outside the server: image builds and ssh.

use anyhow::Context;
pub use basphere_app::providers::qemu_config;
use basphere_config::ProviderKind;
use basphere_qemu::QemuProvider;
use std::path::Path;

/// `basphere image build NAME`.
pub async fn build_image(config: Option<&Path>, name: &str, force: bool) -> anyhow::Result<()> {
    let cfg = crate::serve::load_config(config)?;
    let name: basphere_core::ImageName = name
        .parse()
        .map_err(|e| anyhow::anyhow!("image name {name:?}: {e}"))?;
    let qc = qemu_config(&cfg)?;
    std::fs::create_dir_all(&qc.images_dir)
        .with_context(|| format!("creating {}", qc.images_dir.display()))?;
    let started = std::time::Instant::now();
    let path = basphere_qemu::build_image(&name, &qc.images_dir, force, |line| {
        eprintln!("{:>6.1}s  {line}", started.elapsed().as_secs_f64())
    })
    .await?;
    println!(
        "image {name} ready at {} ({:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The ssh command to reach VMs: inside the lab network namespace when qemu uses one.
pub fn ssh_command(config: Option<&Path>) -> std::process::Command {
    let qemu = crate::serve::load_config(config)
        .ok()
        .filter(|c| c.provider.kind == ProviderKind::Qemu)
        .and_then(|c| qemu_config(&c).ok())
        .and_then(|qc| QemuProvider::new(qc).ok());
    match qemu {
        Some(p) => p.network_command("ssh"),
        None => std::process::Command::new("ssh"),
    }
}
