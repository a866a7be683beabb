//! End to end with a real VM: register → approve → create-vm → ssh → delete-vm, through the
//! prototype's command names, the qemu provider and a guest that really boots (TCG here).
mod common;
use basphere_testkit::process::{kill_marked, pids_with};
use basphere_testkit::{Netns, SSH_BATCH_OPTS, test_images_dir};
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Kills any QEMU left from this test's state dir (by PID, checked against its command line)
/// and deletes its namespace.
struct LabGuard {
    _ns: Netns,
    state_dir: PathBuf,
}

fn qemu_pids_under(dir: &Path) -> Vec<i32> {
    pids_with(&dir.display().to_string())
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let marker = self.state_dir.display().to_string();
        for pid in pids_with(&marker) {
            kill_marked(pid, &marker);
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_approve_create_ssh_delete_with_a_real_vm() {
    if skip_unless_root("the qemu provider's lab network needs root") {
        return;
    }
    assert!(
        have("qemu-system-x86_64"),
        "qemu-system-x86_64 missing: run crates/provider-qemu/install-deps.sh"
    );
    let ns = format!("bspe2e{}", std::process::id());
    let images = test_images_dir();
    let network = format!("{{ mode = \"lab\", namespace = \"{ns}\", bridge = \"br0\" }}");
    let s = server(&[
        ("BASPHERE_PROVIDER__KIND", "qemu"),
        (
            "BASPHERE_QEMU__IMAGES_DIR",
            &format!("\"{}\"", images.display()),
        ),
        ("BASPHERE_QEMU__NETWORK", &network),
        ("BASPHERE_ENGINE__READY_TIMEOUT_SECS", "400"),
    ]);
    let state_dir = s.data_dir().join("vms");
    let _guard = LabGuard {
        _ns: Netns(ns.clone()),
        state_dir: state_dir.clone(),
    };

    // the base image (cached across runs)
    if !images.join("debian-12/base.qcow2").exists() {
        let mut cmd = Command::new(BIN);
        cmd.args(["image", "build", "debian-12"]);
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        run_ok(&mut cmd);
    }

    // aliases, as the prototype's users know them
    let bin = s.dir.path().join("bin");
    run_ok(Command::new(BIN).args(["install-aliases"]).arg(&bin));

    // register with a real key, the admin approves, the user enrolls
    let (key, pubkey) = keygen(s.dir.path(), "e2e_key");
    s.register_key("e2euser", &pubkey).await;
    let out = run_ok(
        Command::new(bin.join("basphere-admin"))
            .args(["--socket"])
            .arg(&s.socket)
            .args(["user", "approve", "e2euser"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let code = stdout
        .split("enrollment code (works once): ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    let r = s
        .anon()
        .post(
            "/api/v1/enroll",
            &json!({"username": "e2euser", "code": code}),
        )
        .await
        .unwrap();
    let token = r.body.data["token"].as_str().unwrap().to_string();
    let as_user = |prog: &str, args: &[&str]| {
        Command::new(bin.join(prog))
            .args(["--url", &s.addr, "--token", &token])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };

    // create-vm: waits with progress, ends with the ssh command
    let t0 = Instant::now();
    let out = as_user("create-vm", &["-n", "e2e", "-s", "tiny"]);
    let create_secs = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "create-vm failed: {stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(s.log_path()).unwrap_or_default()
    );
    let ssh_line = stdout
        .lines()
        .find(|l| l.contains("e2e is running: ssh debian@"))
        .expect("ssh hint printed")
        .to_string();
    let ip = ssh_line.rsplit('@').next().unwrap().trim().to_string();
    let list = as_user("list-vms", &["-j"]);
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(vms[0]["status"], "running");
    assert_eq!(vms[0]["ip_address"], ip.as_str());
    let instance = vms[0]["id"].as_str().unwrap().to_string();
    assert!(state_dir.join(&instance).exists());
    assert_eq!(
        qemu_pids_under(&state_dir.join(&instance)).len(),
        1,
        "one QEMU process"
    );

    // ssh with the user's key to the allocated address, inside the lab namespace
    let out = Command::new("ip")
        .args(["netns", "exec", &ns, "ssh", "-i"])
        .arg(&key)
        .args(SSH_BATCH_OPTS)
        .args(["-o", "ConnectTimeout=10"])
        .arg(format!("debian@{ip}"))
        .arg("hostname")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "e2e");

    // show-quota, list-resources
    let out = as_user("show-quota", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("VMs          1 / 10"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = as_user("list-resources", &["--output", "json"]);
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(res["vms"][0]["name"], "e2e");

    // delete-vm: nothing left
    let out = as_user("delete-vm", &["e2e", "-f"]);
    assert!(
        out.status.success(),
        "delete-vm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        qemu_pids_under(&state_dir).is_empty(),
        "no QEMU process left"
    );
    assert!(!state_dir.join(&instance).exists(), "disk and seed removed");
    let c = s.with_token(&token);
    assert_eq!(c.get("/api/v1/vms/e2e").await.unwrap().status, 404);
    assert_eq!(quota_usage(&c).await, (0, 0));
    eprintln!("TIMINGS e2e: create-vm to running (incl. guest boot under TCG) {create_secs:.1} s");

    // Crash with a real VM: SIGKILL the server while the guest boots, restart, and the create
    // resumes: one QEMU process (not two), VM running, then deleted with nothing left.
    let r = c
        .post("/api/v1/vms", &json!({"name": "next", "spec": "tiny"}))
        .await
        .unwrap();
    assert_eq!(
        r.body.data["vms"][0]["ip_address"],
        ip.as_str(),
        "the freed address is reused"
    );
    let op = r.body.data["operations"][0].as_str().unwrap().to_string();
    let next_id = r.body.data["vms"][0]["id"].as_str().unwrap().to_string();
    let _ = c
        .follow(&format!("/api/v1/operations/{op}/events"), |k, e| {
            !(k == "step_started" && e["step"] == "wait_ready")
        })
        .await;
    let mut s = s;
    s.kill9();
    assert_eq!(
        qemu_pids_under(&state_dir.join(&next_id)).len(),
        1,
        "the guest survives the server"
    );
    s.spawn();
    let vm = wait_vm(&c, "next", 400, "running").await;
    assert_eq!(vm["ip_address"], ip.as_str());
    assert_eq!(
        qemu_pids_under(&state_dir.join(&next_id)).len(),
        1,
        "resume did not start a second QEMU"
    );
    assert_eq!(c.delete("/api/v1/vms/next").await.unwrap().status, 202);
    wait_vm(&c, "next", 120, "gone").await;
    assert!(
        qemu_pids_under(&state_dir).is_empty(),
        "no QEMU process left"
    );
    assert!(!state_dir.join(&next_id).exists(), "disk and seed removed");
    assert_eq!(quota_usage(&c).await, (0, 0));
}
