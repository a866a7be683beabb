//! Boots a real Debian guest under QEMU in a private lab namespace and SSHes into it.
//!
//! Needs root (namespaces, taps) and the packages of `install-deps.sh`; skips only when not root.
//! The base image is built on first use and cached in `/var/cache/basphere-test/images`
//! (override with `BASPHERE_TEST_IMAGES`), so reruns take about a minute and a half under TCG.
//!
//!     cargo test -p basphere-qemu --test boot -- --nocapture

use basphere_provider::{GuestNetwork, MachineState, Machines, VmRequest, mac_for};
use basphere_qemu::{NetworkMode, QemuConfig, QemuProvider};
use basphere_testkit::process::{alive, kill_marked};
use basphere_testkit::{
    Netns, SSH_BATCH_OPTS, keygen, poll_until_blocking, skip_unless_root, test_images_dir,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Kills what the test started and deletes its namespace, whatever happened before.
struct Cleanup {
    vm_dir: PathBuf,
    _namespace: Netns,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let marker = format!("{}/", self.vm_dir.display());
        if let Some(pid) = std::fs::read_to_string(self.vm_dir.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            && alive(pid, &marker)
        {
            eprintln!("cleanup: killing qemu pid {pid}");
            kill_marked(pid, &marker);
            let _ = poll_until_blocking(Duration::from_secs(5), Duration::from_millis(100), || {
                if alive(pid, &marker) { Err(()) } else { Ok(()) }
            });
        }
    }
}

/// Watches the serial log and records when its first byte appeared.
fn watch_first_serial_byte(path: PathBuf) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(600);
        while Instant::now() < until {
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
                return Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_debian_and_answers_ssh_in_the_lab_namespace() {
    if skip_unless_root(
        "boots_debian_and_answers_ssh_in_the_lab_namespace needs root (network namespaces, taps); run as root",
    ) {
        return;
    }
    let images = test_images_dir();
    let image: basphere_core::ImageName = "debian-12".parse().unwrap();
    let t = Instant::now();
    basphere_qemu::build_image(&image, &images, false, |step| eprintln!("image: {step}"))
        .await
        .expect("building the debian-12 image");
    eprintln!("image ready after {:.1?}", t.elapsed());

    let pid = std::process::id();
    let namespace = format!("bsp-t{pid}");
    let work = tempfile::Builder::new()
        .prefix("bsp-boot-")
        .tempdir_in("/tmp")
        .unwrap();
    let state_dir = work.path().join("vms");
    let config = QemuConfig {
        images_dir: images.clone(),
        state_dir: state_dir.clone(),
        network: NetworkMode::Lab {
            namespace: namespace.clone(),
            bridge: "br0".into(),
        },
        ..QemuConfig::default()
    };
    let provider = QemuProvider::new(config)
        .expect("qemu provider")
        .with_console_helper(env!("CARGO_BIN_EXE_basphere-console-ring"));
    eprintln!("accelerator: {}", provider.accel().as_str());
    assert_eq!(provider.netns_name(), Some(namespace.as_str()));

    // A fresh login key.
    let (key, public) = keygen(work.path(), "boot-test");

    let instance = uuid::Uuid::new_v4().to_string();
    let vm = VmRequest {
        instance: instance.clone(),
        name: "bsp-boot-test".parse().unwrap(),
        owner: "tester".parse().unwrap(),
        image: image.clone(),
        image_ref: "debian-12".into(),
        login_user: "tester".into(),
        spec: basphere_core::Spec {
            vcpus: 2,
            memory_mib: 4096,
            disk_gib: 10,
        },
        network: GuestNetwork {
            ip: "10.254.0.10".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.254.0.1".parse().unwrap(),
            dns: vec!["10.254.0.1".parse().unwrap()],
            mtu: 1500,
            mac: mac_for(&instance),
        },
        ssh_keys: vec![public.trim().parse().unwrap()],
        extra_disks: vec![],
        extra_nics: vec![],
    };
    let vm_dir = provider.vm_dir(&instance);
    let _cleanup = Cleanup {
        vm_dir: vm_dir.clone(),
        _namespace: Netns(namespace.clone()),
    };

    assert_eq!(provider.inspect(&vm).await.unwrap(), MachineState::Absent);
    let t_prepare = Instant::now();
    provider.prepare(&vm).await.expect("prepare");
    let prepare_took = t_prepare.elapsed();
    provider
        .prepare(&vm)
        .await
        .expect("prepare again is a no-op");
    assert_eq!(provider.inspect(&vm).await.unwrap(), MachineState::Stopped);

    // Not started yet: wait_ready fails at once and permanently.
    let e = provider
        .wait_ready(&vm, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(!e.retryable, "{e}");

    let first_byte = watch_first_serial_byte(vm_dir.join("serial.log"));
    let t_start = Instant::now();
    provider.start(&vm).await.expect("start");
    let start_took = t_start.elapsed();
    let qemu_pid = provider.running_pid(&vm).expect("qemu runs");
    provider.start(&vm).await.expect("start again is a no-op");
    assert_eq!(
        provider.running_pid(&vm),
        Some(qemu_pid),
        "second start made a new process"
    );
    assert_eq!(provider.inspect(&vm).await.unwrap(), MachineState::Running);
    assert!(provider.tap_present(&vm).await);

    // L10: QEMU runs under its seccomp sandbox, as the unprivileged account, with no way back.
    let status = std::fs::read_to_string(format!("/proc/{qemu_pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let account = nix::unistd::User::from_name(basphere_qemu::DEFAULT_RUN_AS)
        .unwrap()
        .expect("the provider created the QEMU account");
    let uid = account.uid.to_string();
    assert_eq!(
        field("Uid:"),
        format!("{uid} {uid} {uid} {uid}"),
        "{status}"
    );
    assert_eq!(field("Seccomp:"), "2", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    let cmdline = std::fs::read(format!("/proc/{qemu_pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
        ),
        "{cmdline}"
    );
    // H2: nothing of the VM is open to group or others.
    for entry in std::fs::read_dir(&vm_dir).unwrap().flatten() {
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.path().display());
    }
    let dir_mode = std::fs::metadata(&vm_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);

    // A deadline that expires before the guest prints anything is explained as such.
    let early = provider
        .wait_ready(&vm, Duration::from_millis(500))
        .await
        .expect_err("no guest answers SSH half a second after power-on");
    assert!(early.retryable, "{early}");
    if std::fs::metadata(vm_dir.join("serial.log")).map_or(0, |m| m.len()) == 0 {
        assert!(early.message.contains("no serial output"), "{early}");
    }
    eprintln!("early wait_ready: {early}");

    let ready = provider.wait_ready(&vm, Duration::from_secs(240)).await;
    let t_ready = Instant::now();
    if let Err(e) = &ready {
        let serial = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
        eprintln!("---- serial log ----\n{serial}\n---- end ----");
        panic!("wait_ready: {e}");
    }
    let first_byte = first_byte.await.unwrap().expect("serial output appeared");

    // Log in with the key from inside the namespace and ask for the hostname.
    let mut hostname = String::new();
    for attempt in 1..=10 {
        let out = provider
            .network_command("ssh")
            .args(["-i"])
            .arg(&key)
            .args(SSH_BATCH_OPTS)
            .args([
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
                "tester@10.254.0.10",
                "hostname",
            ])
            .output()
            .unwrap();
        hostname = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            break;
        }
        eprintln!(
            "ssh attempt {attempt} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let t_ssh = Instant::now();
    assert_eq!(hostname, "bsp-boot-test");

    let t_stop = Instant::now();
    provider.stop(&vm).await.expect("stop");
    let stop_took = t_stop.elapsed();
    provider.stop(&vm).await.expect("stop again is a no-op");
    assert!(
        !alive(qemu_pid, &format!("{}/", vm_dir.display())),
        "qemu still runs"
    );
    assert!(!provider.tap_present(&vm).await, "tap left behind");
    assert_eq!(provider.inspect(&vm).await.unwrap(), MachineState::Stopped);

    // Started again, then killed behind our back: wait_ready fails at once, permanently, and
    // stop cleans up after the dead process.
    provider.start(&vm).await.expect("restart");
    let second = provider.running_pid(&vm).expect("qemu runs again");
    assert_ne!(second, qemu_pid);
    assert!(kill_marked(second, &format!("{}/", vm_dir.display())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t_dead = Instant::now();
    let dead = provider
        .wait_ready(&vm, Duration::from_secs(60))
        .await
        .expect_err("qemu was killed");
    assert!(!dead.retryable, "{dead}");
    assert!(
        t_dead.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t_dead.elapsed()
    );
    assert!(dead.message.contains("not running"), "{dead}");
    eprintln!("wait_ready after kill: {dead}");
    provider
        .stop(&vm)
        .await
        .expect("stop after the process died");
    assert!(!provider.tap_present(&vm).await, "tap left behind");

    if let Ok(keep) = std::env::var("BASPHERE_TEST_KEEP_SERIAL") {
        std::fs::copy(vm_dir.join("serial.log"), &keep).unwrap();
    }
    provider.remove(&vm).await.expect("remove");
    provider.remove(&vm).await.expect("remove again is a no-op");
    assert!(!vm_dir.exists(), "VM dir left behind");
    assert_eq!(provider.inspect(&vm).await.unwrap(), MachineState::Absent);
    assert!(
        images.join("debian-12/base.qcow2").is_file(),
        "base image touched"
    );

    assert!(provider.teardown_lab_network().await.unwrap());
    assert!(!Path::new("/run/netns").join(&namespace).exists());

    eprintln!(
        "TIMINGS accel={} prepare={:.2?} start={:.2?} start->first serial byte={:.2?} \
         first serial byte->SSH banner={:.2?} (guest) start->SSH banner={:.2?} \
         banner->ssh login done={:.2?} stop={:.2?}",
        provider.accel().as_str(),
        prepare_took,
        start_took,
        first_byte.saturating_duration_since(t_start + start_took),
        t_ready.saturating_duration_since(first_byte),
        t_ready.saturating_duration_since(t_start),
        t_ssh.saturating_duration_since(t_ready),
        stop_took,
    );
}
