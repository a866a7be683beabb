//! Readiness of the qemu provider: the host tools, KVM, the guests' network and the base
//! images, as `/ready` and `basphere doctor` show them. [`host_checks`] needs no provider, so
//! `doctor` can say what is wrong also when the provider cannot start.

use crate::config::{Accel, NetworkMode, QemuConfig};
use crate::machine::{AccelChoice, VmPaths};
use crate::{QEMU_INSTALL_HINT, QemuProvider, host, image, net, seed};
use basphere_provider::Check;
use std::path::Path;
use std::time::Duration;

/// The checks of a running provider: what it needs now to start a VM. KVM is not probed again
/// (that creates a VM in the kernel); the accelerator chosen at start is reported.
pub(crate) async fn provider_checks(p: &QemuProvider) -> Vec<Check> {
    let mut checks = vec![tools(&p.config), accel_in_use(p), run_as(&p.config)];
    if !p.console_helper.exists() {
        checks.push(Check::fail(
            "qemu.helper",
            format!(
                "the console ring writer {} is gone",
                p.console_helper.display()
            ),
            "reinstall basphere and restart the server",
        ));
    }
    checks.push(network(&p.config).await);
    checks.push(images(&p.config.images_dir));
    checks
}

/// What this host offers the qemu provider under `config`: tools, KVM (probed), the network and
/// the base images.
pub async fn host_checks(config: &QemuConfig) -> Vec<Check> {
    vec![
        tools(config),
        kvm(config),
        run_as(config),
        network(config).await,
        images(&config.images_dir),
    ]
}

fn tools(config: &QemuConfig) -> Check {
    let mut missing = vec![];
    if host::find_in_path(&config.qemu_binary).is_none() {
        missing.push(config.qemu_binary.clone());
    }
    for t in ["qemu-img", "ip", "nft"] {
        if host::find_in_path(t).is_none() {
            missing.push(t.to_string());
        }
    }
    if seed::iso_tool().is_none() {
        missing.push("genisoimage".into());
    }
    if !Path::new("/usr/share/qemu/qboot.rom").is_file() {
        missing.push("/usr/share/qemu/qboot.rom".into());
    }
    if missing.is_empty() {
        Check::ok(
            "qemu.tools",
            format!(
                "{}, qemu-img, ip, nft, genisoimage found",
                config.qemu_binary
            ),
        )
    } else {
        Check::fail(
            "qemu.tools",
            format!("missing: {}", missing.join(", ")),
            format!(
                "run crates/provider-qemu/install-deps.sh (or {QEMU_INSTALL_HINT}; \
                 apt-get install -y iproute2 nftables genisoimage)"
            ),
        )
    }
}

const KVM_FIX: &str = "enable virtualization (VT-x/AMD-V) in the firmware and load the module \
     (modprobe kvm_intel or kvm_amd) so /dev/kvm works, then restart basphere; or set \
     [qemu] accel = \"tcg\" to accept emulation";

/// Probes `/dev/kvm` (open, API version, a VM created and dropped).
fn kvm(config: &QemuConfig) -> Check {
    let probe = host::probe_kvm(Duration::from_secs(2));
    let usable = probe.usable && !probe.pvm;
    let why = if probe.pvm {
        "KVM is the software-only kvm_pvm, under which guests crawl"
    } else {
        "/dev/kvm is missing or does not work"
    };
    match (config.accel, usable) {
        (Accel::Tcg, _) => Check::ok(
            "qemu.kvm",
            "[qemu] accel = \"tcg\": VMs run under TCG emulation",
        ),
        (_, true) => Check::ok("qemu.kvm", "KVM works: VMs run accelerated"),
        (Accel::Kvm, false) => Check::fail(
            "qemu.kvm",
            format!("[qemu] accel = \"kvm\" but {why}: the provider will not start"),
            KVM_FIX,
        ),
        (Accel::Auto, false) => Check::warn(
            "qemu.kvm",
            format!(
                "{why}: VMs run under TCG emulation (slow: ~1 minute to SSH, 1 vCPU and \
                 512 MiB per VM unless [qemu] max_vcpus/max_memory_mib say otherwise)"
            ),
            KVM_FIX,
        ),
    }
}

/// The accelerator a running provider chose, and whether KVM is still there.
fn accel_in_use(p: &QemuProvider) -> Check {
    match (p.accel, p.config.accel) {
        (AccelChoice::Kvm, _) if Path::new("/dev/kvm").exists() => {
            Check::ok("qemu.kvm", "VMs run accelerated by KVM")
        }
        (AccelChoice::Kvm, _) => Check::fail(
            "qemu.kvm",
            "the provider started with KVM but /dev/kvm is gone: new VMs cannot start",
            KVM_FIX,
        ),
        (AccelChoice::Tcg, Accel::Tcg) => Check::ok(
            "qemu.kvm",
            "[qemu] accel = \"tcg\": VMs run under TCG emulation",
        ),
        (AccelChoice::Tcg, _) => Check::warn(
            "qemu.kvm",
            "KVM was not usable at start: VMs run under TCG emulation (slow)",
            KVM_FIX,
        ),
    }
}

fn run_as(config: &QemuConfig) -> Check {
    let user = config.run_as.as_str();
    if user.is_empty() {
        return Check::warn(
            "qemu.run_as",
            "[qemu] run_as = \"\": QEMU keeps root (its seccomp sandbox still applies)",
            format!("set [qemu] run_as = \"{}\"", crate::DEFAULT_RUN_AS),
        );
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(_)) => Check::ok("qemu.run_as", format!("QEMU drops root to {user}")),
        _ => Check::fail(
            "qemu.run_as",
            format!("the account {user} QEMU runs as does not exist"),
            format!(
                "restart basphere (it creates it) or: useradd --system --user-group \
                 --no-create-home --shell /usr/sbin/nologin {user}"
            ),
        ),
    }
}

/// The guests' network as it is now: the lab namespace and its bridge (made with the first VM,
/// so missing is a failure only while VMs run), or the host bridge (never made by Basphere).
async fn network(config: &QemuConfig) -> Check {
    match &config.network {
        NetworkMode::Lab { namespace, bridge } => {
            let running = running_vms(&config.state_dir);
            let present = net::netns_path(namespace).exists();
            let bridge_up = present
                && host::ip(&["-n", namespace, "link", "show", "dev", bridge])
                    .await
                    .is_ok();
            match (present && bridge_up, running) {
                (true, _) => Check::ok(
                    "qemu.network",
                    format!(
                        "lab namespace {namespace} with bridge {bridge}; {running} VM(s) running"
                    ),
                ),
                (false, 0) => Check::warn(
                    "qemu.network",
                    format!(
                        "lab namespace {namespace} (bridge {bridge}) does not exist yet; \
                         the first VM makes it"
                    ),
                    format!(
                        "nothing to do before the first VM; to make it now: ip netns add {namespace}"
                    ),
                ),
                (false, n) => Check::fail(
                    "qemu.network",
                    format!(
                        "{n} VM(s) run but the lab namespace {namespace} or its bridge {bridge} \
                         is gone: their network is cut"
                    ),
                    "restart the server (the next VM start rebuilds the namespace), then \
                     stop and start the affected VMs",
                ),
            }
        }
        NetworkMode::Bridge { name } => {
            if Path::new(&format!("/sys/class/net/{name}/bridge")).exists() {
                Check::ok("qemu.network", format!("host bridge {name}"))
            } else {
                Check::fail(
                    "qemu.network",
                    format!("host bridge {name} does not exist"),
                    format!(
                        "create it in the host's network configuration (e.g. ip link add \
                         {name} type bridge); Basphere only adds its taps to it"
                    ),
                )
            }
        }
    }
}

/// VMs whose QEMU runs now (pidfile verified against the process's command line).
fn running_vms(state_dir: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(state_dir) else {
        return 0;
    };
    dirs.filter_map(|d| d.ok())
        .filter(|d| {
            let paths = VmPaths::new(state_dir, &d.file_name().to_string_lossy());
            host::read_pidfile(&paths.pidfile)
                .is_some_and(|pid| host::pid_is_ours(pid, &paths.marker()))
        })
        .count()
}

fn images(images_dir: &Path) -> Check {
    let mut built: Vec<String> = std::fs::read_dir(images_dir)
        .map(|r| {
            r.filter_map(|d| d.ok())
                .filter(|d| image::is_complete(&d.path()))
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    built.sort();
    if built.is_empty() {
        Check::warn(
            "qemu.images",
            format!("no base image built in {}", images_dir.display()),
            "basphere image build debian-12",
        )
    } else {
        Check::ok("qemu.images", format!("built: {}", built.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basphere_provider::CheckStatus;

    #[test]
    fn no_image_is_a_warning_naming_the_build_command() {
        let dir = tempfile::tempdir().unwrap();
        let c = images(dir.path());
        assert_eq!(c.status, CheckStatus::Warn);
        assert!(c.fix.unwrap().contains("basphere image build"));
        let img = dir.path().join("debian-12");
        std::fs::create_dir(&img).unwrap();
        for f in image::IMAGE_FILES {
            std::fs::write(img.join(f), b"x").unwrap();
        }
        let c = images(dir.path());
        assert_eq!(
            (c.status, c.detail.as_str()),
            (CheckStatus::Ok, "built: debian-12")
        );
    }

    #[tokio::test]
    async fn a_missing_host_bridge_fails_and_a_missing_lab_waits_for_the_first_vm() {
        let dir = tempfile::tempdir().unwrap();
        let bridge = QemuConfig {
            network: NetworkMode::Bridge {
                name: "bspnobr0".into(),
            },
            state_dir: dir.path().into(),
            ..QemuConfig::default()
        };
        let c = network(&bridge).await;
        assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
        assert!(c.detail.contains("bspnobr0"), "{c:?}");
        let lab = QemuConfig {
            network: NetworkMode::Lab {
                namespace: "bsp-ops-none".into(),
                bridge: "br0".into(),
            },
            state_dir: dir.path().into(),
            ..QemuConfig::default()
        };
        let c = network(&lab).await;
        assert_eq!(c.status, CheckStatus::Warn, "{c:?}");
        assert!(c.fix.unwrap().contains("ip netns add bsp-ops-none"));
    }
}
