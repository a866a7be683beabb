//! H2/L1: no other account on the host reads the server's data — the database and its -wal and
//! -shm, the admin token, VM directories — and an install made with the old 0755/0644 modes is
//! repaired when the server starts.
//!
//! A real unprivileged Unix account (prefix `bspmod`, removed afterwards) tries to read every
//! file under the data dir of a running server that has created VMs (null provider; the qemu
//! provider's own files: `crates/provider-qemu/tests/attack_file_modes.rs`).
//!
//!     cargo nextest run -p basphere --test attack_modes
mod common;
use basphere_testkit::{UnixAccount as Account, every_path};
use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Asserts that `attacker` can read nothing under `root` and that nothing there is open to
/// group or others by its own mode.
fn assert_nothing_readable(attacker: &Account, root: &Path) -> Vec<PathBuf> {
    let paths = every_path(root);
    for p in &paths {
        // A console log may rotate or a VM go away while we look.
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        assert_eq!(mode(p) & 0o077, 0, "{} is {:o}", p.display(), mode(p));
        let (ok, err) = attacker.read(p);
        assert!(!ok, "{} could read {}", attacker.name, p.display());
        assert!(err.contains("Permission denied"), "{}: {err}", p.display());
    }
    paths
}

async fn create_vms(s: &Server) {
    let user = s.with_token(&s.user("modsuser").await);
    for (c, name) in [(&s.root(), "adminvm"), (&user, "uservm")] {
        let r = c.post("/api/v1/vms", &json!({"name": name})).await.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
        wait_vm(c, name, 20, "running").await;
    }
}

/// `basphere init` against the server's data dir writes the admin token (HOME is a scratch dir,
/// where init makes the admin's SSH key).
fn init(s: &Server) {
    let home = s.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    run_ok(
        Command::new(BIN)
            .arg("init")
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HOME", &home),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_reads_nothing_under_the_data_dir() {
    if basphere_testkit::server::test_backend_is_postgres() {
        eprintln!("this test is about the embedded SQLite file; it runs in the SQLite pass");
        return;
    }
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let s = server(&[]);
    create_vms(&s).await;
    init(&s);
    let data = s.data_dir();
    let attacker = Account::create("bspmodr");
    let paths = assert_nothing_readable(&attacker, &data);
    let names: Vec<String> = paths
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    for f in [
        "basphere.db",
        "basphere.db-wal",
        "basphere.db-shm",
        "admin.token",
        "node-id",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} not found in {names:?}");
    }
    assert_eq!(mode(&data), 0o700);
    // The socket stays usable by everyone: its directory is reachable and the socket 0666.
    assert_eq!(mode(&s.socket) & 0o666, 0o666);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_with_old_loose_modes_is_repaired_at_start() {
    if basphere_testkit::server::test_backend_is_postgres() {
        eprintln!("this test is about the embedded SQLite file; it runs in the SQLite pass");
        return;
    }
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let mut s = server(&[]);
    create_vms(&s).await;
    s.kill9();
    // What an install made before the fix looks like: umask 022 everywhere, and the qemu
    // provider's VM and image files beside the database.
    let data = s.data_dir();
    let vm = data.join("vms/0190a3f2-0000-7000-8000-000000000001");
    let image = data.join("images/debian-12.1700000000");
    for d in [&vm, &image] {
        std::fs::create_dir_all(d).unwrap();
    }
    for f in ["disk.qcow2", "seed.iso", "serial.log", "qemu.log"] {
        std::fs::write(vm.join(f), format!("secret {f}")).unwrap();
    }
    std::fs::write(image.join("base.qcow2"), "base").unwrap();
    std::os::unix::fs::symlink("debian-12.1700000000", data.join("images/debian-12")).unwrap();
    let outside = s.dir.path().join("not-ours");
    std::fs::write(&outside, "x").unwrap();
    std::os::unix::fs::symlink(&outside, data.join("link-out")).unwrap();
    for p in every_path(&data) {
        let loose = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(loose)).unwrap();
    }
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();

    // The attack works on the old install: this test can fail.
    let attacker = Account::create("bspmodo");
    let (ok, err) = attacker.read(&vm.join("disk.qcow2"));
    assert!(
        ok,
        "the loose install should be readable before the repair: {err}"
    );
    let (ok, _) = attacker.read(&data.join("basphere.db"));
    assert!(ok);

    s.spawn();
    let paths = assert_nothing_readable(&attacker, &data);
    assert!(paths.len() >= 12, "{paths:?}");
    assert_eq!(
        mode(&outside),
        0o644,
        "a symlink's target outside the data dir is not ours"
    );
    let log = std::fs::read_to_string(s.log_path()).unwrap();
    assert!(
        log.contains("private to root"),
        "the repair is reported: {log}"
    );
    // The repaired server still works.
    wait_vm(&s.root(), "adminvm", 20, "running").await;
}
