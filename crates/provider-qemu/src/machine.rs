//! How one VM is laid out on disk and how QEMU is invoked for it. No IO here.

use crate::config::{Accel, QemuConfig};
use crate::host::KvmProbe;
use basphere_core::Spec;
use std::path::{Path, PathBuf};

/// The accelerator actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Kvm,
    Tcg,
}

impl AccelChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator. `auto` takes KVM only when it works and is not `kvm_pvm`;
/// an explicit `kvm` fails when `/dev/kvm` does not work.
pub fn decide_accel(wanted: Accel, probe: KvmProbe) -> Result<AccelChoice, String> {
    match wanted {
        Accel::Tcg => Ok(AccelChoice::Tcg),
        Accel::Auto if probe.usable && !probe.pvm => Ok(AccelChoice::Kvm),
        Accel::Auto => Ok(AccelChoice::Tcg),
        Accel::Kvm if probe.usable => Ok(AccelChoice::Kvm),
        Accel::Kvm => Err(
            "accel = \"kvm\" but /dev/kvm does not work here (missing, no permission, or no \
             VM could be created): set accel = \"auto\" or \"tcg\", or load the kvm module"
                .to_string(),
        ),
    }
}

/// CPUs and memory one VM gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Default caps under TCG: one emulated CPU is all a small host can afford per VM.
pub const TCG_DEFAULT_MAX_VCPUS: u32 = 1;
/// Default memory cap under TCG, MiB.
pub const TCG_DEFAULT_MAX_MEMORY_MIB: u64 = 512;
/// Memory left to the host under KVM when no cap is configured, MiB.
const HOST_RESERVE_MIB: u64 = 512;
/// Below this the Debian guest does not boot reliably, MiB.
const MIN_MEMORY_MIB: u64 = 256;

/// The spec, bounded by the configured caps (or the accelerator's defaults) and the host.
pub fn resources(
    spec: &Spec,
    accel: AccelChoice,
    config: &QemuConfig,
    host_cpus: u32,
    host_memory_mib: Option<u64>,
) -> Resources {
    let (cap_cpus, cap_mem) = match accel {
        AccelChoice::Tcg => (
            config.max_vcpus.unwrap_or(TCG_DEFAULT_MAX_VCPUS),
            config.max_memory_mib.unwrap_or(TCG_DEFAULT_MAX_MEMORY_MIB),
        ),
        AccelChoice::Kvm => (
            config.max_vcpus.unwrap_or(u32::MAX),
            config.max_memory_mib.unwrap_or(u64::MAX),
        ),
    };
    let host_mem = host_memory_mib.map_or(u64::MAX, |m| m.saturating_sub(HOST_RESERVE_MIB));
    Resources {
        vcpus: spec.vcpus.min(cap_cpus).min(host_cpus).max(1),
        memory_mib: spec
            .memory_mib
            .min(cap_mem)
            .min(host_mem)
            .max(MIN_MEMORY_MIB),
    }
}

/// The files of one VM under `state_dir/<instance>/`.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub seed: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub pidfile: PathBuf,
    pub qmp: PathBuf,
    pub serial: PathBuf,
    pub qemu_log: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, instance: &str) -> Self {
        let dir = state_dir.join(instance);
        Self {
            disk: dir.join("disk.qcow2"),
            seed: dir.join("seed.iso"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            pidfile: dir.join("qemu.pid"),
            qmp: dir.join("qmp.sock"),
            serial: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
            dir,
        }
    }

    /// A string present in the command line of this VM's QEMU and of no other process: the VM
    /// directory with a trailing slash.
    pub fn marker(&self) -> String {
        format!("{}/", self.dir.display())
    }
}

/// Instance ids become directory and file names: allow only a safe alphabet.
pub fn check_instance(instance: &str) -> Result<(), String> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && !instance.starts_with('.')
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance id {instance:?} is not usable as a directory name (1-64 of [A-Za-z0-9._-], \
             not starting with '.')"
        ))
    }
}

/// The tap device of an instance: `bsp` + 12 hex digits of a stable hash (15 characters, the
/// kernel's limit for interface names).
pub fn tap_name(instance: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in instance.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("bsp{:012x}", h >> 16)
}

/// Kernel command line of the guest (root fs on the first virtio disk, console on the serial port).
pub const KERNEL_CMDLINE: &str =
    "root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet mitigations=off";

/// How QEMU leaves root once it has opened its disks, tap, console and sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropPrivileges {
    /// QEMU stays root (`run_as = ""`).
    None,
    /// `-run-with user=NAME` (QEMU 9.1 and later).
    RunWith(String),
    /// `-runas NAME` (older QEMU).
    RunAs(String),
}

/// The seccomp filter QEMU runs under. `elevateprivileges=deny` would also block the
/// setgid/setuid calls QEMU makes to drop root, killing it (SIGSYS), so it is denied only when
/// QEMU stays root; once QEMU has switched to an unprivileged account those calls cannot regain
/// anything, and `spawn=deny` keeps it from executing set-uid programs.
pub fn sandbox(drop: &DropPrivileges) -> String {
    let elevate = match drop {
        DropPrivileges::None => "deny",
        DropPrivileges::RunWith(_) | DropPrivileges::RunAs(_) => "allow",
    };
    format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
}

/// Everything that varies in a QEMU invocation.
pub struct Launch<'a> {
    pub name: &'a str,
    pub paths: &'a VmPaths,
    pub accel: AccelChoice,
    pub resources: Resources,
    pub tap: &'a str,
    pub mac: &'a str,
    pub drop: &'a DropPrivileges,
    /// Extra disks: (qcow2 file, virtio serial), in order.
    pub extra_disks: &'a [(PathBuf, String)],
    /// Extra NICs: (tap, MAC), in order.
    pub extra_nics: &'a [(String, String)],
}

/// The qcow2 file of the extra disk with `serial` in `dir`.
pub fn extra_disk_path(dir: &Path, serial: &str) -> PathBuf {
    dir.join(format!("disk-{serial}.qcow2"))
}

/// Checks a disk serial: it becomes a file name and a QEMU option value (1-20 of [a-z0-9]).
pub fn check_serial(serial: &str) -> Result<(), String> {
    let ok = !serial.is_empty()
        && serial.len() <= 20
        && serial
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!("disk serial {serial:?} must be 1-20 of [a-z0-9]"))
    }
}

/// The tap of the `index`-th (from 0) extra NIC of an instance.
pub fn extra_tap_name(instance: &str, index: usize) -> String {
    tap_name(&format!("{instance}#nic{}", index + 1))
}

/// The QEMU arguments (after the binary) for `l`: direct kernel boot with qboot, two virtio
/// disks (root, seed), one virtio NIC on a tap, serial console to the pipe on descriptor 3,
/// QMP on a socket, the seccomp sandbox, and the switch to an unprivileged account. QEMU runs in
/// the foreground of its own session (`-daemonize` forks, which the sandbox forbids).
pub fn qemu_args(l: &Launch<'_>) -> Vec<String> {
    let p = l.paths;
    let d = |p: &Path| p.display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    match l.accel {
        AccelChoice::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        AccelChoice::Tcg => push(&["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]),
    }
    push(&["-name", &format!("{},process=bsp-{}", l.name, l.name)]);
    push(&["-M", "q35", "-nodefaults", "-no-user-config"]);
    push(&["-bios", "/usr/share/qemu/qboot.rom"]);
    push(&["-m", &l.resources.memory_mib.to_string()]);
    push(&["-smp", &l.resources.vcpus.to_string()]);
    push(&["-display", "none", "-no-reboot"]);
    push(&[
        "-serial",
        &format!("file:/proc/self/fd/{}", crate::console::CONSOLE_FD),
    ]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", d(&p.qmp))]);
    push(&["-pidfile", &d(&p.pidfile)]);
    push(&["-sandbox", &sandbox(l.drop)]);
    match l.drop {
        DropPrivileges::None => {}
        DropPrivileges::RunWith(user) => push(&["-run-with", &format!("user={user}")]),
        DropPrivileges::RunAs(user) => push(&["-runas", user]),
    }
    push(&["-kernel", &d(&p.kernel), "-initrd", &d(&p.initrd)]);
    push(&["-append", KERNEL_CMDLINE]);
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=d0,format=qcow2,discard=unmap",
            d(&p.disk)
        ),
        "-device",
        "virtio-blk-pci,drive=d0",
    ]);
    push(&[
        "-drive",
        &format!("file={},if=none,id=d1,format=raw,readonly=on", d(&p.seed)),
        "-device",
        "virtio-blk-pci,drive=d1",
    ]);
    push(&[
        "-netdev",
        &format!("tap,id=n0,ifname={},script=no,downscript=no", l.tap),
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={}", l.mac),
    ]);
    for (i, (file, serial)) in l.extra_disks.iter().enumerate() {
        let id = format!("x{}", i + 1);
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id={id},format=qcow2,discard=unmap",
                d(file)
            ),
            "-device",
            &format!("virtio-blk-pci,drive={id},serial={serial}"),
        ]);
    }
    for (i, (tap, mac)) in l.extra_nics.iter().enumerate() {
        let id = format!("n{}", i + 1);
        push(&[
            "-netdev",
            &format!("tap,id={id},ifname={tap},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev={id},mac={mac}"),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_KVM: KvmProbe = KvmProbe {
        usable: false,
        pvm: false,
    };
    const PVM: KvmProbe = KvmProbe {
        usable: true,
        pvm: true,
    };
    const KVM: KvmProbe = KvmProbe {
        usable: true,
        pvm: false,
    };

    #[test]
    fn auto_uses_kvm_only_when_it_works_and_is_not_pvm() {
        assert_eq!(decide_accel(Accel::Auto, KVM), Ok(AccelChoice::Kvm));
        assert_eq!(decide_accel(Accel::Auto, PVM), Ok(AccelChoice::Tcg));
        assert_eq!(decide_accel(Accel::Auto, NO_KVM), Ok(AccelChoice::Tcg));
        assert_eq!(decide_accel(Accel::Tcg, KVM), Ok(AccelChoice::Tcg));
        assert_eq!(decide_accel(Accel::Kvm, PVM), Ok(AccelChoice::Kvm));
        let e = decide_accel(Accel::Kvm, NO_KVM).unwrap_err();
        assert!(e.contains("/dev/kvm"), "{e}");
    }

    #[test]
    fn resources_are_capped() {
        let spec = Spec {
            vcpus: 4,
            memory_mib: 16384,
            disk_gib: 100,
        };
        let c = QemuConfig::default();
        let tcg = resources(&spec, AccelChoice::Tcg, &c, 2, Some(24000));
        assert_eq!(
            tcg,
            Resources {
                vcpus: 1,
                memory_mib: 512
            }
        );
        let kvm = resources(&spec, AccelChoice::Kvm, &c, 2, Some(8192));
        assert_eq!(
            kvm,
            Resources {
                vcpus: 2,
                memory_mib: 7680
            }
        );
        let c = QemuConfig {
            max_vcpus: Some(3),
            max_memory_mib: Some(1024),
            ..QemuConfig::default()
        };
        assert_eq!(
            resources(&spec, AccelChoice::Tcg, &c, 8, None),
            Resources {
                vcpus: 3,
                memory_mib: 1024
            }
        );
    }

    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a = tap_name("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("bsp"));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, tap_name("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33"));
        assert_ne!(a, tap_name("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a34"));
        assert_eq!(tap_name("").len(), 15);
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(check_instance("6f1c2a9e-0c3b-4d2e-9a51-7d0e5c1b2a33").is_ok());
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_instance(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_line_carries_the_vm_dir_and_mac() {
        let paths = VmPaths::new(Path::new("/var/lib/basphere/vms"), "abc");
        let args = qemu_args(&Launch {
            name: "web",
            paths: &paths,
            accel: AccelChoice::Tcg,
            resources: Resources {
                vcpus: 1,
                memory_mib: 512,
            },
            tap: "bsp0123",
            mac: "52:54:00:00:00:01",
            drop: &DropPrivileges::RunWith("basphere-qemu".into()),
            extra_disks: &[(paths.dir.join("disk-bspd1.qcow2"), "bspd1".into())],
            extra_nics: &[("bsp4567".into(), "52:54:00:00:00:02".into())],
        });
        let line = args.join(" ");
        assert!(line.contains("virtio-blk-pci,drive=x1,serial=bspd1"));
        assert!(line.contains("tap,id=n1,ifname=bsp4567,"));
        assert!(line.contains("virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02"));
        // The first NIC's MAC comes first: the anti-spoofing re-pin reads it from here.
        assert!(
            line.split(",mac=")
                .nth(1)
                .unwrap()
                .starts_with("52:54:00:00:00:01"),
            "{line}"
        );
        assert!(line.contains(&paths.marker()));
        assert!(line.contains("-accel tcg,thread=multi,tb-size=256 -cpu max"));
        assert!(line.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01"));
        assert!(line.contains("ifname=bsp0123,"));
        assert!(line.contains("-pidfile /var/lib/basphere/vms/abc/qemu.pid"));
        assert!(!line.contains("-daemonize"), "the sandbox forbids fork");
    }

    #[test]
    fn qemu_runs_sandboxed_and_unprivileged() {
        let paths = VmPaths::new(Path::new("/var/lib/basphere/vms"), "abc");
        let launch = |drop: &DropPrivileges| {
            qemu_args(&Launch {
                name: "web",
                paths: &paths,
                accel: AccelChoice::Kvm,
                resources: Resources {
                    vcpus: 1,
                    memory_mib: 512,
                },
                tap: "bsp0123",
                mac: "52:54:00:00:00:01",
                drop,
                extra_disks: &[],
                extra_nics: &[],
            })
        };
        let pair = |args: &[String], flag: &str| -> Option<String> {
            let i = args.iter().position(|a| a == flag)?;
            args.get(i + 1).cloned()
        };
        let args = launch(&DropPrivileges::RunWith("basphere-qemu".into()));
        assert_eq!(
            pair(&args, "-sandbox").as_deref(),
            Some("on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny")
        );
        assert_eq!(
            pair(&args, "-run-with").as_deref(),
            Some("user=basphere-qemu")
        );
        assert_eq!(
            pair(&args, "-serial").as_deref(),
            Some("file:/proc/self/fd/3")
        );
        let args = launch(&DropPrivileges::RunAs("qemu".into()));
        assert_eq!(pair(&args, "-runas").as_deref(), Some("qemu"));
        let args = launch(&DropPrivileges::None);
        assert_eq!(
            pair(&args, "-sandbox").as_deref(),
            Some("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
        );
        assert!(pair(&args, "-run-with").is_none() && pair(&args, "-runas").is_none());
    }
}
