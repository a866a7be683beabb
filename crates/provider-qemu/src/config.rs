//! `[qemu]` configuration.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The account QEMU runs as by default.
pub const DEFAULT_RUN_AS: &str = "basphere-qemu";

/// Settings of the qemu provider. Every key has a default, so an empty table is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// Base images, one directory per image name (`debian-12/{base.qcow2,vmlinuz,initrd-tiny.img}`).
    pub images_dir: PathBuf,
    /// Per-VM directories (`<instance>/`: disk, seed, logs, QMP socket, pidfile).
    pub state_dir: PathBuf,
    /// Hardware acceleration: `auto` uses KVM only where it really works, else TCG emulation.
    pub accel: Accel,
    /// Upper bound on vCPUs per VM. Unset: 1 under TCG, the host's CPU count under KVM.
    /// A VM never gets more vCPUs than its spec asks for or than the host has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Upper bound on memory per VM in MiB. Unset: 512 under TCG (enough for the Debian guest,
    /// and each TCG VM also costs ~256 MiB of translation cache), host memory minus 512 MiB under
    /// KVM. A VM never gets more than its spec asks for or than the host has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Upper bound on the disk size per VM in GiB (the clone grows to the spec's size, sparsely).
    /// Unset: the spec's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_disk_gib: Option<u64>,
    /// Where guests' taps are attached.
    pub network: NetworkMode,
    /// Bridge port isolation for guests' taps (`isolated on`): guests then reach only the
    /// gateway and other non-isolated ports, never each other, even within one user. Off by
    /// default. Spoofing protection (each tap pinned to its VM's MAC and IP) is always on.
    pub isolate_ports: bool,
    /// Default for how long `wait_ready` callers should allow a guest to answer SSH.
    pub ssh_ready_timeout_secs: u64,
    /// The QEMU system emulator to run (a name looked up in PATH, or a path).
    pub qemu_binary: String,
    /// Unprivileged account QEMU switches to once it has opened its disks, tap and sockets as
    /// root (`-run-with user=`). Created as a system account when missing. `""` keeps QEMU root
    /// (the seccomp sandbox then also denies set*uid calls).
    pub run_as: String,
    /// Upper bound on `serial.log` in KiB (at least 64): the console is written through a pipe
    /// by a small ring writer that keeps the newest half when the file reaches this size.
    pub console_log_max_kib: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            images_dir: PathBuf::from("/var/lib/basphere/images"),
            state_dir: PathBuf::from("/var/lib/basphere/vms"),
            accel: Accel::Auto,
            max_vcpus: None,
            max_memory_mib: None,
            max_disk_gib: None,
            network: NetworkMode::default(),
            isolate_ports: false,
            ssh_ready_timeout_secs: 300,
            qemu_binary: "qemu-system-x86_64".to_string(),
            run_as: DEFAULT_RUN_AS.to_string(),
            console_log_max_kib: 1024,
        }
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` answers and is not the software-only `kvm_pvm`; otherwise TCG.
    #[default]
    Auto,
    /// Always KVM (`-accel kvm -cpu host`); startup fails if `/dev/kvm` does not work.
    Kvm,
    /// Always TCG emulation (slow: ~1 minute to SSH for a Debian guest).
    Tcg,
}

/// How guests are connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum NetworkMode {
    /// A network namespace owned by Basphere, holding a bridge with the guests' gateway
    /// addresses. Guests are reachable only from inside it (`ip netns exec NAMESPACE ssh …`); it is
    /// never bridged or routed to the host. For development, tests and demos.
    Lab {
        #[serde(default = "default_lab_namespace")]
        namespace: String,
        #[serde(default = "default_lab_bridge")]
        bridge: String,
    },
    /// An existing bridge in the host's namespace (production). Basphere only adds and removes
    /// its own taps on it; addresses and routing of the bridge are the operator's.
    Bridge { name: String },
}

impl Default for NetworkMode {
    fn default() -> Self {
        NetworkMode::Lab {
            namespace: default_lab_namespace(),
            bridge: default_lab_bridge(),
        }
    }
}

fn default_lab_namespace() -> String {
    "bsp-lab".to_string()
}

fn default_lab_bridge() -> String {
    "br0".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c: QemuConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, QemuConfig::default());
        assert_eq!(c.images_dir, PathBuf::from("/var/lib/basphere/images"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/basphere/vms"));
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(
            c.network,
            NetworkMode::Lab {
                namespace: "bsp-lab".into(),
                bridge: "br0".into()
            }
        );
        assert_eq!(c.qemu_binary, "qemu-system-x86_64");
        assert!(!c.isolate_ports);
        let c: QemuConfig = serde_json::from_str(r#"{"isolate_ports": true}"#).unwrap();
        assert!(c.isolate_ports);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_str::<QemuConfig>(r#"{"acel": "kvm"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `acel`"), "{e}");
        let e = serde_json::from_str::<QemuConfig>(
            r#"{"network": {"mode": "lab", "namespace": "x", "bridgee": "y"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bridgee"), "{e}");
        assert!(serde_json::from_str::<QemuConfig>(r#"{"accel": "xen"}"#).is_err());
    }

    #[test]
    fn network_modes_parse() {
        let c: QemuConfig = serde_json::from_str(
            r#"{"accel": "tcg", "network": {"mode": "bridge", "name": "br-vm"}}"#,
        )
        .unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(
            c.network,
            NetworkMode::Bridge {
                name: "br-vm".into()
            }
        );
        let c: QemuConfig =
            serde_json::from_str(r#"{"network": {"mode": "lab", "namespace": "t1"}}"#).unwrap();
        assert_eq!(
            c.network,
            NetworkMode::Lab {
                namespace: "t1".into(),
                bridge: "br0".into()
            }
        );
        // Round trip.
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<QemuConfig>(&s).unwrap(), c);
    }
}
