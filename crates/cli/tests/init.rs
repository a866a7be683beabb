//! `basphere init` writes a commented config, the database and the first admin's token (0600).
mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_makes_the_first_admin_whose_token_works() {
    if basphere_testkit::server::test_backend_is_postgres() {
        eprintln!("this test is about the embedded SQLite file; it runs in the SQLite pass");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/basphere.toml");
    let data = dir.path().join("data");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let init = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["--config", config.to_str().unwrap(), "init"])
            .env("BASPHERE_DATA_DIR", &data)
            .env("HOME", &home);
        cmd
    };
    run_ok(&mut init());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("[network]") && text.contains("# "),
        "a commented default config"
    );
    let token_file = data.join("admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("bsp_"));
    // running init again changes nothing
    let out = run_ok(&mut init());
    assert!(String::from_utf8_lossy(&out.stdout).contains("keeping existing"));
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);

    // the server on that data dir accepts the token as the admin
    let mut s = server(&[]);
    s.kill9();
    s.env.retain(|(k, _)| k != "BASPHERE_DATA_DIR");
    s.env
        .push(("BASPHERE_DATA_DIR".into(), data.display().to_string()));
    s.spawn();
    let me = s.with_token(&token).get("/api/v1/me").await.unwrap();
    assert_eq!(me.status, 200, "{:?}", me.body);
    assert_eq!(me.body.data["user"]["role"], "admin");
    assert!(
        me.body.data["ip_block"].is_string(),
        "the admin can make VMs too"
    );
    let pending = s.with_token(&token).get("/api/v1/pending").await.unwrap();
    assert_eq!(pending.status, 200);
}

#[test]
fn the_prototype_names_answer_help() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("install-aliases")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    for (name, expect) in [
        ("create-vm", "-n, --name"),
        ("list-vms", "-a, --all"),
        ("delete-vm", "-f, --force"),
        ("show-quota", "quota"),
        ("list-resources", "IP block"),
        ("basphere-admin", "user"),
    ] {
        let out = Command::new(dir.path().join(name))
            .arg("--help")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(expect),
            "{name} --help: {text}"
        );
    }
    // errors are one clear line plus a hint, with a non-zero exit
    let out = Command::new(dir.path().join("list-vms"))
        .args(["--socket", "/nonexistent/basphere.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: cannot connect") && err.contains("basphere serve"),
        "{err}"
    );
}
