//! Extra disks and NICs keep the provider's guarantees: an extra disk is a private file (0600
//! in the 0700 VM dir, whatever the umask) that `remove` deletes; an extra tap joins its own
//! bridge in the lab namespace and is pinned to its NIC's MAC and address like the first one,
//! and both pins go with the VM; a NIC that could not be pinned (DHCP) or has no bridge is
//! refused before anything is made.
//!
//! `prepare` runs for real on a stand-in image; `start` runs QEMU for real in a private lab
//! namespace (prefix `disksq`) with a kernel that does not boot, after making and pinning the
//! taps. Needs root and the packages of `install-deps.sh`; skips only when not root.
//!
//!     cargo nextest run -p basphere-qemu --test attack_extra_devices

use basphere_core::DiskMode;
use basphere_provider::{
    DiskRequest, GuestNetwork, Machines, NicAddress, NicRequest, VmRequest, mac_for,
};
use basphere_qemu::{NetworkMode, QemuConfig, QemuProvider};
use basphere_testkit::{Netns, run_ok, skip_unless_root};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const HELPER: &str = env!("CARGO_BIN_EXE_basphere-console-ring");

fn in_ns(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_disks_are_private_and_extra_taps_are_pinned_then_all_removed() {
    if skip_unless_root("needs root (namespaces, taps)") {
        return;
    }
    // SAFETY: changes only this process's file creation mask.
    unsafe { libc::umask(0o022) };
    let work = tempfile::Builder::new()
        .prefix("bsp-extra-")
        .tempdir_in("/tmp")
        .unwrap();
    let data = work.path().join("data");
    let image = data.join("images").join("debian-12");
    std::fs::create_dir_all(&image).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image.join("base.qcow2"))
            .arg("64M"),
    );
    std::fs::write(image.join("vmlinuz"), vec![0u8; 4096]).unwrap();
    std::fs::write(image.join("initrd-tiny.img"), vec![0u8; 4096]).unwrap();

    let ns = format!("disksq{}", std::process::id());
    let _netns = Netns(ns.clone());
    let provider = QemuProvider::new(QemuConfig {
        images_dir: data.join("images"),
        state_dir: data.join("vms"),
        accel: basphere_qemu::Accel::Tcg,
        network: NetworkMode::Lab {
            namespace: ns.clone(),
            bridge: "br0".into(),
        },
        ..QemuConfig::default()
    })
    .expect("qemu provider")
    .with_console_helper(HELPER);

    let instance = uuid::Uuid::new_v4().to_string();
    let serial = basphere_core::disk_serial(&instance, 0);
    let nic_mac = mac_for(&format!("{instance}#nic1"));
    let vm = VmRequest {
        instance: instance.clone(),
        name: "x".parse().unwrap(),
        owner: "victim".parse().unwrap(),
        image: "debian-12".parse().unwrap(),
        image_ref: "debian-12".into(),
        login_user: "victim".into(),
        spec: basphere_core::Spec {
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
        },
        network: GuestNetwork {
            ip: "10.254.0.10".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.254.0.1".parse().unwrap(),
            dns: vec![],
            mtu: 1500,
            mac: mac_for(&instance),
        },
        ssh_keys: vec![],
        extra_disks: vec![DiskRequest {
            serial: serial.clone(),
            size_gib: 10,
            mode: DiskMode::Auto,
            mount: Some("/data".into()),
        }],
        extra_nics: vec![NicRequest {
            network: "storage".into(),
            mac: nic_mac.clone(),
            address: Some(NicAddress {
                ip: "10.77.0.2".parse().unwrap(),
                prefix_len: 24,
            }),
            gateway: Some("10.77.0.1".parse().unwrap()),
            bridge: Some("bspst0".into()),
            port_group: None,
        }],
    };

    // Refusals first: nothing of these VMs may be made.
    let mut dhcp = vm.clone();
    dhcp.instance = uuid::Uuid::new_v4().to_string();
    dhcp.extra_nics[0].address = None;
    dhcp.extra_disks.clear();
    provider.prepare(&dhcp).await.unwrap();
    let e = provider.start(&dhcp).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("DHCP"), "{e}");
    let mut bridgeless = dhcp.clone();
    bridgeless.extra_nics[0].address = vm.extra_nics[0].address;
    bridgeless.extra_nics[0].bridge = None;
    let e = provider.start(&bridgeless).await.unwrap_err();
    assert!(
        !e.retryable && e.message.contains("[networks.storage] bridge"),
        "{e}"
    );
    let mut hostile = vm.clone();
    hostile.extra_disks[0].serial = "../../etc/x".into();
    let e = provider.prepare(&hostile).await.unwrap_err();
    assert!(!e.retryable && e.message.contains("serial"), "{e}");
    provider.remove(&dhcp).await.unwrap();

    provider.prepare(&vm).await.expect("prepare");
    let disk = provider
        .vm_dir(&instance)
        .join(format!("disk-{serial}.qcow2"));
    let mode = std::fs::metadata(&disk).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "extra disk is {mode:o}");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 10u64 << 30);
    let e = provider.start(&vm).await.expect_err("a kernel of zeros");
    eprintln!("start failed as intended: {e}");

    // The extra tap sits on its own bridge, which holds the network's gateway.
    let links = in_ns(&ns, &["ip", "-o", "link", "show", "master", "bspst0"]);
    assert_eq!(links.lines().count(), 1, "one tap on bspst0: {links}");
    let addrs = in_ns(&ns, &["ip", "-o", "-4", "addr", "show", "dev", "bspst0"]);
    assert!(addrs.contains("10.77.0.1/24"), "{addrs}");
    // …and is pinned: its MAC and address are in the bridge table beside the first tap's.
    let rules = in_ns(&ns, &["nft", "list", "table", "bridge", "basphere"]);
    assert!(rules.contains("10.77.0.2"), "{rules}");
    assert!(rules.contains(&nic_mac.to_ascii_lowercase()), "{rules}");
    assert!(rules.contains("10.254.0.10"), "{rules}");

    provider.remove(&vm).await.unwrap();
    assert!(!disk.exists(), "the extra disk is removed");
    assert!(!provider.vm_dir(&instance).exists());
    let links = in_ns(&ns, &["ip", "-o", "link", "show", "master", "bspst0"]);
    assert_eq!(links.trim(), "", "no tap left on bspst0");
    let rules = in_ns(&ns, &["nft", "list", "table", "bridge", "basphere"]);
    assert!(
        !rules.contains("10.77.0.2"),
        "the pin went with the tap: {rules}"
    );
}
