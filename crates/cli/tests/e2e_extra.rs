//! End to end with a real VM and extras: `create-vm --disk 10G --net storage` → inside the guest
//! `/data` is a mounted ext4 of 10 GiB (found by its stable virtio serial) and `eth1` holds the
//! address leased from the storage network's own pool, reachable over the second lab bridge;
//! `delete-vm` removes every disk file. Network: only the lab namespace this test creates.
mod common;
use basphere_testkit::process::{kill_marked, pids_with};
use basphere_testkit::{Netns, SSH_BATCH_OPTS, test_images_dir};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kills any QEMU left from this test's state dir (by PID, checked against its command line);
/// the namespace goes with `Netns`.
struct LabGuard {
    _ns: Netns,
    state_dir: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let marker = self.state_dir.display().to_string();
        for pid in pids_with(&marker) {
            kill_marked(pid, &marker);
        }
    }
}

fn files_under(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p, suffix));
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_an_auto_disk_and_an_extra_network_boots_mounts_and_is_removed_whole() {
    if skip_unless_root("the qemu provider's lab network needs root") {
        return;
    }
    let images = test_images_dir();
    assert!(
        images.join("debian-12/base.qcow2").exists(),
        "no debian-12 test image in {}: run the e2e_qemu test once (it builds it)",
        images.display()
    );
    let ns = format!("disksx{}", std::process::id());
    let network = format!("{{ mode = \"lab\", namespace = \"{ns}\", bridge = \"br0\" }}");
    let s = server(&[
        ("BASPHERE_PROVIDER__KIND", "qemu"),
        (
            "BASPHERE_QEMU__IMAGES_DIR",
            &format!("\"{}\"", images.display()),
        ),
        ("BASPHERE_QEMU__NETWORK", &network),
        ("BASPHERE_ENGINE__READY_TIMEOUT_SECS", "400"),
        (
            "BASPHERE_NETWORKS__STORAGE",
            r#"{ cidr = "10.77.0.0/24", gateway = "10.77.0.1", bridge = "bspst0" }"#,
        ),
    ]);
    let state_dir = s.data_dir().join("vms");
    let _guard = LabGuard {
        _ns: Netns(ns.clone()),
        state_dir: state_dir.clone(),
    };

    let (key, pubkey) = keygen(s.dir.path(), "x_key");
    s.register_key("xuser", &pubkey).await;
    let code = s.approve("xuser").await["enrollment_code"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .anon()
        .post(
            "/api/v1/enroll",
            &serde_json::json!({"username": "xuser", "code": code}),
        )
        .await
        .unwrap();
    let token = r.body.data["token"].as_str().unwrap().to_string();
    let as_user = |args: &[&str]| {
        Command::new(BIN)
            .args(["--url", &s.addr, "--token", &token])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };

    let out = as_user(&[
        "vm", "create", "-n", "x", "-s", "tiny", "--disk", "10G", "--net", "storage",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "create-vm failed: {stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(s.log_path()).unwrap_or_default()
    );
    let c = s.with_token(&token);
    let vm = get_data(&c, "/api/v1/vms/x").await;
    assert_eq!(vm["status"], "running", "{vm}");
    assert_eq!(
        vm["extra_disks"],
        serde_json::json!([{"size_gb": 10, "mode": "auto"}])
    );
    assert_eq!(vm["extra_networks"], serde_json::json!(["storage"]));
    assert_eq!(vm["extra_nics"][0]["ip_address"], "10.77.0.2", "{vm}");
    let ip = vm["ip_address"].as_str().unwrap().to_string();
    let instance = vm["id"].as_str().unwrap().to_string();
    let disks = files_under(&state_dir.join(&instance), ".qcow2");
    assert_eq!(disks.len(), 2, "boot disk and one extra disk: {disks:?}");

    // The extra tap is pinned like the first: the bridge table names its address.
    let rules = Command::new("ip")
        .args([
            "netns", "exec", &ns, "nft", "list", "table", "bridge", "basphere",
        ])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("10.77.0.2") && rules.contains(&ip),
        "both taps pinned: {rules}"
    );

    let ssh = |to: &str, cmd: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns, "ssh", "-i"])
            .arg(&key)
            .args(SSH_BATCH_OPTS)
            .args(["-o", "ConnectTimeout=10"])
            .arg(format!("debian@{to}"))
            .arg(cmd)
            .output()
            .unwrap()
    };
    // runcmd runs at the end of the first boot: wait for cloud-init to finish.
    let out = ssh(
        &ip,
        "sudo cloud-init status --wait >/dev/null; findmnt -n -o FSTYPE,SOURCE /data; \
         df -B1 --output=size /data | tail -1; ip -4 -o addr show dev eth1",
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let mount = lines.next().unwrap_or_default();
    assert!(mount.starts_with("ext4 "), "/data is ext4: {text}");
    let size: u64 = lines.next().unwrap_or_default().trim().parse().unwrap();
    // ext4 on 10 GiB: a little less than 10 GiB of filesystem.
    assert!(
        size > 9 * (1 << 30) && size <= 10 * (1 << 30),
        "/data is about 10 GiB: {size}"
    );
    let fstab = ssh(&ip, "cat /etc/fstab");
    assert!(
        String::from_utf8_lossy(&fstab.stdout).contains("/dev/disk/by-id/virtio-bsp"),
        "mounted by its stable id: {}",
        String::from_utf8_lossy(&fstab.stdout)
    );
    assert!(
        lines.next().unwrap_or_default().contains("10.77.0.2/24"),
        "eth1 has its address: {text}"
    );
    // Reached through the second bridge: the storage network's gateway lives there.
    let out = ssh("10.77.0.2", "hostname");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "x",
        "ssh over the storage network: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = as_user(&["vm", "delete", "x", "-f"]);
    assert!(
        out.status.success(),
        "delete-vm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pids_with(&state_dir.display().to_string()).is_empty());
    assert!(!state_dir.join(&instance).exists(), "the VM dir is gone");
    assert!(
        files_under(&state_dir, ".qcow2").is_empty(),
        "every disk file removed"
    );
    assert_eq!(c.get("/api/v1/vms/x").await.unwrap().status, 404);
}
