//! L11: a token file that already existed with a wide mode (0644, e.g. made by hand or by an
//! old version) must not keep it when a new token is written there: other local users would
//! read the token. Also: a symlink planted at the token path is not followed.

mod common;

use common::{BIN, Server, run_ok, server};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o777
}

/// An approved user's enrollment code.
async fn code(s: &Server, user: &str) -> String {
    s.register(user).await;
    s.approve(user).await["enrollment_code"]
        .as_str()
        .unwrap()
        .to_string()
}

fn enroll_save(s: &Server, home: &Path, user: &str, code: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["--url", &s.addr, "enroll", "-u", user, "-c", code, "--save"])
        .env("HOME", home)
        .env_remove("BASPHERE_TOKEN")
        .env_remove("BASPHERE_CONFIG")
        .stdin(Stdio::null());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_save_over_a_world_readable_token_file_makes_it_0600() {
    let s = server(&[]);
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join(".config/basphere/token");
    std::fs::create_dir_all(token.parent().unwrap()).unwrap();
    std::fs::write(&token, "old-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();

    let c = code(&s, "modeuser").await;
    run_ok(&mut enroll_save(&s, home.path(), "modeuser", &c));
    assert_eq!(mode(&token), 0o600, "the old 0644 mode survived the write");
    let saved = std::fs::read_to_string(&token).unwrap();
    assert_ne!(saved.trim(), "old-token");
    assert!(!saved.trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_save_does_not_follow_a_planted_symlink() {
    let s = server(&[]);
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join(".config/basphere/token");
    std::fs::create_dir_all(token.parent().unwrap()).unwrap();
    let canary = home.path().join("canary");
    std::fs::write(&canary, "canary\n").unwrap();
    std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&canary, &token).unwrap();

    let c = code(&s, "linkuser").await;
    let out = enroll_save(&s, home.path(), "linkuser", &c)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&token.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "canary\n");
    assert_eq!(mode(&canary), 0o644);
}

#[test]
fn init_repairs_the_mode_of_an_existing_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, "old-admin-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    run_ok(
        Command::new(BIN)
            .arg("--config")
            .arg(dir.path().join("basphere.toml"))
            .arg("init")
            .env("HOME", dir.path())
            .env("BASPHERE_DATA_DIR", &data)
            .env_remove("BASPHERE_CONFIG")
            .stdin(Stdio::null()),
    );
    assert_eq!(mode(&token), 0o600);
}
