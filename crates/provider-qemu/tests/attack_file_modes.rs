//! H2: another account on the host cannot read a VM's disk, seed, kernel, console or logs,
//! whatever the umask of the process that made them.
//!
//! `prepare` runs for real (qemu-img linked clone, seed ISO) on a stand-in image; `start` runs
//! QEMU for real in a private lab namespace (prefix `qemu-m`), with a kernel that does not boot,
//! so QEMU exits after having created its console and log. A real unprivileged Unix account
//! (prefix `bspmod`, removed afterwards) then tries to read every file.
//!
//! Needs root and the packages of `install-deps.sh`; skips only when not root.
//!
//!     cargo nextest run -p basphere-qemu --test attack_file_modes

use basphere_provider::{GuestNetwork, Machines, VmRequest, mac_for};
use basphere_qemu::{NetworkMode, QemuConfig, QemuProvider};
use basphere_testkit::{Netns, UnixAccount as Account, every_path, run_ok, skip_unless_root};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const HELPER: &str = env!("CARGO_BIN_EXE_basphere-console-ring");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_reads_nothing_of_a_vm() {
    if skip_unless_root("needs root (Unix accounts, namespaces, taps)") {
        return;
    }
    // Run as a root with umask 022, as before the fix: the modes must not depend on the umask.
    // SAFETY: changes only this process's file creation mask.
    unsafe { libc::umask(0o022) };
    let work = tempfile::Builder::new()
        .prefix("bsp-modes-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = work.path().join("data");
    let images = data.join("images");
    let image = images.join("debian-12");
    std::fs::create_dir_all(&image).unwrap();
    // As `build_image` leaves an image: only root reads it (QEMU opens it before dropping root).
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o700)).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image.join("base.qcow2"))
            .arg("64M"),
    );
    // Not a kernel: QEMU refuses it and exits after creating its console and log.
    std::fs::write(image.join("vmlinuz"), vec![0u8; 4096]).unwrap();
    std::fs::write(image.join("initrd-tiny.img"), vec![0u8; 4096]).unwrap();

    let namespace = format!("qemu-m{}", std::process::id());
    let _netns = Netns(namespace.clone());
    let config = QemuConfig {
        images_dir: images.clone(),
        state_dir: data.join("vms"),
        accel: basphere_qemu::Accel::Tcg,
        network: NetworkMode::Lab {
            namespace: namespace.clone(),
            bridge: "br0".into(),
        },
        ..QemuConfig::default()
    };
    let provider = QemuProvider::new(config)
        .expect("qemu provider")
        .with_console_helper(HELPER);
    assert!(
        matches!(
            provider.drop_privileges(),
            basphere_qemu::DropPrivileges::RunWith(u) if u == basphere_qemu::DEFAULT_RUN_AS
        ),
        "{:?}",
        provider.drop_privileges()
    );

    let instance = uuid::Uuid::new_v4().to_string();
    let vm = VmRequest {
        instance: instance.clone(),
        name: "secret".parse().unwrap(),
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
        extra_disks: vec![],
        extra_nics: vec![],
    };
    provider.prepare(&vm).await.expect("prepare");
    let e = provider
        .start(&vm)
        .await
        .expect_err("QEMU cannot boot a kernel of zeros");
    eprintln!("start failed as intended: {e}");
    let vm_dir = provider.vm_dir(&instance);
    for f in [
        "disk.qcow2",
        "seed.iso",
        "vmlinuz",
        "initrd.img",
        "qemu.log",
        "serial.log",
    ] {
        assert!(vm_dir.join(f).is_file(), "{f} missing");
    }
    // Before the fix everything was 0644/0755 and this account read every disk.
    let attacker = Account::create("bspmod");
    let paths = every_path(&data.join("vms"));
    assert!(paths.len() >= 8, "{paths:?}");
    for p in &paths {
        let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        let (ok, err) = attacker.read(p);
        assert!(!ok, "{} read {}", attacker.name, p.display());
        assert!(err.contains("Permission denied"), "{}: {err}", p.display());
    }
    // Even with the directories opened up, each file refuses on its own mode.
    for d in [data.join("vms"), vm_dir.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in [
        "disk.qcow2",
        "serial.log",
        "seed.iso",
        "qemu.log",
        "vmlinuz",
    ] {
        let (ok, err) = attacker.read(&vm_dir.join(f));
        assert!(!ok && err.contains("Permission denied"), "{f}: {err}");
    }

    provider.remove(&vm).await.expect("remove");
    assert!(provider.teardown_lab_network().await.unwrap());
}
