//! Attacks on the bastion's Unix accounts through registration, approval, key changes and
//! disabling (issue 9: C1, H1, M4, L6, L12, L13). The account tests need root: they make real
//! Unix accounts (`bspacc…`, removed on drop) on a server with `bastion.manage_accounts` on.
mod common;
use common::*;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A unique `bspacc…` account name.
fn name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "bspacc{:x}{}",
        (t ^ std::process::id()) & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the managed group when the test ends (after its accounts, declared later).
struct Group(String);
impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.0).output();
    }
}

/// A server managing accounts in a group of its own.
fn managed_server(extra: &[(&str, &str)]) -> (Group, Server) {
    let group = Group(format!("{}-g", name()));
    let mut env = vec![
        ("BASPHERE_BASTION__MANAGE_ACCOUNTS", "true"),
        ("BASPHERE_BASTION__GROUP", group.0.as_str()),
    ];
    env.extend_from_slice(extra);
    let s = server(&env);
    (group, s)
}

fn passwd(name: &str) -> Option<nix::unistd::User> {
    nix::unistd::User::from_name(name).unwrap()
}

/// Runs `sh -c script` as the account, as the attacker would in their shell.
fn as_user(pw: &nix::unistd::User, script: &str) {
    run_ok(
        Command::new("sh")
            .args(["-c", script])
            .current_dir(&pw.dir)
            .uid(pw.uid.as_raw())
            .gid(pw.gid.as_raw())
            .env("HOME", &pw.dir),
    );
}

/// Registers `user` over TCP and approves them; returns their passwd entry.
async fn approved(s: &Server, user: &str) -> nix::unistd::User {
    s.register(user).await;
    s.approve(user).await;
    passwd(user).expect("approval created the Unix account")
}

/// The account files a key change for a fresh key with the CLI over the socket; returns the key.
fn request_key_change(s: &Server, pw: &nix::unistd::User) -> String {
    let (_k, newkey) = keygen(s.dir.path(), "new_key");
    let kf = s.dir.path().join("new_key.pub");
    let out = s.cli_as(pw, &["key", "change", "-k", kf.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    newkey
}

/// A root-owned file and directory the attacker aims at, and their state to compare later.
struct Canary {
    file: PathBuf,
    dir: PathBuf,
}
impl Canary {
    fn new(at: &Path) -> Canary {
        let dir = at.join("canary-dir");
        std::fs::create_dir(&dir).unwrap();
        let file = at.join("canary");
        std::fs::write(&file, "root:$6$secret:19000:0:99999:7:::\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Canary { file, dir }
    }
    fn state(&self) -> (Vec<u8>, u32, u32, u32, u32, usize) {
        let f = std::fs::metadata(&self.file).unwrap();
        let d = std::fs::metadata(&self.dir).unwrap();
        (
            std::fs::read(&self.file).unwrap(),
            f.uid(),
            f.mode(),
            d.uid(),
            d.mode(),
            std::fs::read_dir(&self.dir).unwrap().count(),
        )
    }
}

/// C1: a user plants a symlink, a FIFO or a symlinked `~/.ssh` where the key approval writes;
/// every approval fails naming the path, the root-owned targets stay as they were, nothing
/// hangs, and once the plant is gone the same key change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_approval_never_follows_planted_links_or_fifos() {
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let (_group, s) = managed_server(&[]);
    let user = name();
    let _acc = AccountGuard(user.clone());
    let pw = approved(&s, &user).await;
    let canary = Canary::new(s.dir.path());
    let before = canary.state();
    let home = pw.dir.display().to_string();

    let newkey = request_key_change(&s, &pw);

    let c = canary.file.display().to_string();
    let d = canary.dir.display().to_string();
    let plants: &[(&str, String, String)] = &[
        (
            "temp file is a symlink to a root file",
            format!("ln -s {c} .ssh/authorized_keys.tmp"),
            format!("{home}/.ssh/authorized_keys.tmp"),
        ),
        (
            "temp file is a FIFO",
            "mkfifo .ssh/authorized_keys.tmp".into(),
            format!("{home}/.ssh/authorized_keys.tmp"),
        ),
        (
            "key file is a symlink to a root file",
            format!("ln -s {c} .ssh/authorized_keys"),
            format!("{home}/.ssh/authorized_keys"),
        ),
        (
            "~/.ssh is a symlink to a root directory",
            format!("mv .ssh .ssh-real && ln -s {d} .ssh"),
            format!("{home}/.ssh"),
        ),
        (
            "~/.ssh is a symlink to a root file",
            format!("rmdir .ssh && ln -s {c} .ssh"),
            format!("{home}/.ssh"),
        ),
    ];
    for (what, plant, path) in plants {
        as_user(&pw, "rm -rf .ssh .ssh-real && mkdir -m 700 .ssh");
        as_user(&pw, plant);
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            s.root()
                .post(&format!("/api/v1/key-changes/{user}/approve"), &json!({})),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: the approval hung"))
        .unwrap();
        assert_eq!(r.status, 409, "{what}: {:?}", r.body);
        assert!(
            r.body.message.contains(&format!("{path}:")),
            "{what}: message should name {path}: {}",
            r.body.message
        );
        assert_eq!(
            canary.state(),
            before,
            "{what}: the root-owned canary changed"
        );
        let kc = get_data(&s.root(), &format!("/api/v1/key-changes/{user}")).await;
        assert_eq!(kc["status"], "pending", "{what}: the change stays pending");
        let u = s
            .root()
            .get(&format!("/api/v1/users/{user}"))
            .await
            .unwrap();
        assert_eq!(
            u.body.data["user"]["public_key"], KEY,
            "{what}: old key kept"
        );
    }
    // with the plant gone, the same change is approved and installed safely
    as_user(&pw, "rm -rf .ssh .ssh-real");
    s.admin_ok(&format!("/api/v1/key-changes/{user}/approve"))
        .await;
    let keys = pw.dir.join(".ssh/authorized_keys");
    assert_eq!(std::fs::read_to_string(&keys).unwrap().trim(), newkey);
    let m = std::fs::symlink_metadata(&keys).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (pw.uid.as_raw(), 0o600));
    let m = std::fs::symlink_metadata(pw.dir.join(".ssh")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (pw.uid.as_raw(), 0o700));
    assert_eq!(canary.state(), before);
}

/// H1: names of existing Unix accounts (root, a system account, someone's ordinary login)
/// cannot be registered, nor approved if the account appears after registration; an account
/// replaced behind Basphere's back is never removed by deleting the Basphere user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_unix_accounts_cannot_be_taken_over() {
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let (_group, s) = managed_server(&[]);
    let colleague = name();
    let _c = AccountGuard(colleague.clone());
    let st = Command::new("useradd")
        .args(["--create-home", &colleague])
        .status()
        .unwrap();
    assert!(st.success());
    let colleague_home = passwd(&colleague).unwrap().dir;
    std::fs::write(colleague_home.join("notes"), "mine").unwrap();

    for (victim, says) in [
        ("root", "system account"),
        ("daemon", "system account"),
        (colleague.as_str(), "Basphere did not create"),
    ] {
        let r = s
            .anon()
            .post("/api/v1/register", &registration(victim))
            .await
            .unwrap();
        assert_eq!(r.status, 409, "{victim}: {:?}", r.body);
        assert!(
            r.body.message.contains(says),
            "{victim}: {}",
            r.body.message
        );
        assert_eq!(
            s.root()
                .get(&format!("/api/v1/pending/{victim}"))
                .await
                .unwrap()
                .status,
            404,
            "{victim}: nothing was recorded"
        );
        // the admin's one-step add is refused the same way
        let r = s
            .root()
            .post("/api/v1/users", &registration(victim))
            .await
            .unwrap();
        assert_eq!(r.status, 409, "{victim}: {:?}", r.body);
    }

    // the account appears between registration and approval
    let late = name();
    let _l = AccountGuard(late.clone());
    s.register(&late).await;
    assert!(
        Command::new("useradd")
            .args(["--create-home", &late])
            .status()
            .unwrap()
            .success()
    );
    let r = s
        .root()
        .post(&format!("/api/v1/users/{late}/approve"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains("Basphere did not create"),
        "{}",
        r.body.message
    );
    let late_pw = passwd(&late).unwrap();
    assert!(!late_pw.dir.join(".ssh").exists(), "no key was installed");
    let u = s
        .root()
        .get(&format!("/api/v1/users/{late}"))
        .await
        .unwrap();
    assert_eq!(u.body.data["user"]["status"], "pending");

    // a managed account replaced by someone else's (same name, new uid): delete leaves it
    let gone = name();
    let _g = AccountGuard(gone.clone());
    let pw = approved(&s, &gone).await;
    assert!(
        Command::new("userdel")
            .args(["--remove", &gone])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("useradd")
            .args(["--create-home", "--uid"])
            .arg((pw.uid.as_raw() + 7).to_string())
            .arg(&gone)
            .status()
            .unwrap()
            .success()
    );
    let r = s
        .root()
        .delete(&format!("/api/v1/users/{gone}"))
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    assert!(
        r.body.message.contains("not created by Basphere"),
        "{}",
        r.body.message
    );
    assert!(
        passwd(&gone).is_some(),
        "the other account must not be removed"
    );
    // and a real Basphere account is still removed on delete
    let mine = name();
    let _m = AccountGuard(mine.clone());
    approved(&s, &mine).await;
    let r = s
        .root()
        .delete(&format!("/api/v1/users/{mine}"))
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    assert!(passwd(&mine).is_none());
    assert_eq!(
        std::fs::read_to_string(colleague_home.join("notes")).unwrap(),
        "mine"
    );
}

/// The password and expiry fields of `user` in /etc/shadow.
fn shadow(user: &str) -> (String, String) {
    let all = std::fs::read_to_string("/etc/shadow").unwrap();
    let line = all
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap();
    let f: Vec<&str> = line.split(':').collect();
    (f[1].to_string(), f[7].to_string())
}

/// M4: a disabled user's bastion login is locked (expired account, key moved aside); enable
/// restores it exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_user_locks_their_bastion_login() {
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let (_group, s) = managed_server(&[]);
    let user = name();
    let _a = AccountGuard(user.clone());
    let pw = approved(&s, &user).await;
    let keys = pw.dir.join(".ssh/authorized_keys");
    let (pass, expire) = shadow(&user);
    assert_eq!(expire, "");
    let newkey = request_key_change(&s, &pw);

    s.admin_ok(&format!("/api/v1/users/{user}/disable")).await;
    let (locked, exp) = shadow(&user);
    assert_eq!(
        exp, "1",
        "account expired on 1970-01-02: sshd and PAM refuse it"
    );
    assert!(locked.starts_with('!'), "password login locked: {locked}");
    assert!(!keys.exists(), "no key left for sshd");
    let aside = pw.dir.join(".ssh/authorized_keys.basphere-disabled");
    assert_eq!(std::fs::read_to_string(&aside).unwrap().trim(), KEY);
    let st = Command::new("passwd").args(["-S", &user]).output().unwrap();
    assert!(String::from_utf8_lossy(&st.stdout).contains(" L "));
    // a key change filed before the disable, approved while disabled, stays aside too
    s.admin_ok(&format!("/api/v1/key-changes/{user}/approve"))
        .await;
    assert!(!keys.exists(), "approving a key does not reopen the login");
    assert_eq!(std::fs::read_to_string(&aside).unwrap().trim(), newkey);

    s.admin_ok(&format!("/api/v1/users/{user}/enable")).await;
    assert_eq!(shadow(&user), (pass, String::new()));
    assert_eq!(std::fs::read_to_string(&keys).unwrap().trim(), newkey);
    assert!(!aside.exists());

    // disabling while the user planted a symlink where the key goes aside fails cleanly: the
    // user stays active and nothing is followed
    let canary = Canary::new(s.dir.path());
    let before = canary.state();
    as_user(
        &pw,
        &format!(
            "ln -s {} .ssh/authorized_keys.basphere-disabled",
            canary.file.display()
        ),
    );
    let r = s
        .root()
        .post(&format!("/api/v1/users/{user}/disable"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body
            .message
            .contains(".ssh/authorized_keys.basphere-disabled")
    );
    assert_eq!(canary.state(), before);
    let u = s
        .root()
        .get(&format!("/api/v1/users/{user}"))
        .await
        .unwrap();
    assert_eq!(u.body.data["user"]["status"], "active");
    assert_eq!(shadow(&user).1, "");
}

/// L6: the store decides before the host is touched: an approval the store refuses (no free
/// address block) makes no account, and an account that cannot be made safely leaves the user
/// pending with the reason, and no account behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_decides_first_and_compensates() {
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    // one block only, and the admin holds it
    let (_group, s) = managed_server(&[("BASPHERE_NETWORK__CIDR", "\"10.254.0.0/27\"")]);
    let user = name();
    let _a = AccountGuard(user.clone());
    s.register(&user).await;
    let r = s
        .root()
        .post(&format!("/api/v1/users/{user}/approve"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(
        passwd(&user).is_none(),
        "a refused approval leaves no account"
    );
    drop(s);

    // the home is already a directory of someone else's: creation cannot be made safe
    let (_group2, s) = managed_server(&[]);
    let user = name();
    let _a = AccountGuard(user.clone());
    let home = PathBuf::from(format!("/home/{user}"));
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("keep"), "root's").unwrap();
    s.register(&user).await;
    let r = s
        .root()
        .post(&format!("/api/v1/users/{user}/approve"), &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains(&format!("{}:", home.display())),
        "{}",
        r.body.message
    );
    assert!(
        r.body.message.contains("stays pending"),
        "{}",
        r.body.message
    );
    assert!(passwd(&user).is_none(), "the half-made account was removed");
    assert_eq!(
        std::fs::read_to_string(home.join("keep")).unwrap(),
        "root's"
    );
    let u = s
        .root()
        .get(&format!("/api/v1/users/{user}"))
        .await
        .unwrap();
    assert_eq!(u.body.data["user"]["status"], "pending");
    assert!(u.body.data["user"]["ip_block"].is_null());
    let reg = s
        .root()
        .get(&format!("/api/v1/pending/{user}"))
        .await
        .unwrap();
    assert_eq!(reg.body.data["status"], "pending");
    let audit = get_data(
        &s.root(),
        &format!("/api/v1/audit?target={user}&action=user.approve"),
    )
    .await;
    assert_eq!(audit[0]["result"], "failed", "{audit}");
    // fixed, the approval goes through
    std::fs::remove_dir_all(&home).unwrap();
    s.approve(&user).await;
    assert!(passwd(&user).is_some());
}

/// L12: a rejected username cannot be re-registered by someone else (another email) to replace
/// the email and key; the original registrant may register again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_name_cannot_be_reregistered_by_someone_else() {
    let s = server(&[]);
    let r = s
        .anon()
        .post("/api/v1/register", &registration("carol"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = s
        .root()
        .post(
            "/api/v1/users/carol/reject",
            &json!({"reason": "which team?"}),
        )
        .await
        .unwrap();
    assert!(r.body.success);
    let (_k, other_key) = keygen(s.dir.path(), "mallory");
    let r = s
        .anon()
        .post(
            "/api/v1/register",
            &json!({"username": "carol", "email": "mallory@evil.example", "team": "qa", "public_key": other_key}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(
        r.body.message.contains("another email"),
        "{}",
        r.body.message
    );
    let u = get_data(&s.root(), "/api/v1/users/carol").await;
    assert_eq!(u["user"]["email"], "carol@example.org");
    assert_eq!(u["user"]["public_key"], KEY);
    assert_eq!(u["user"]["status"], "rejected");
    // the same person (any case of their email) may try again
    let r = s
        .anon()
        .post(
            "/api/v1/register",
            &json!({"username": "carol", "email": "Carol@Example.org", "team": "payments", "public_key": KEY}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// L13: key comments with control or non-ASCII characters are refused at registration and at
/// key change, before they can reach authorized_keys or cloud-init.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_control_characters_are_refused() {
    let s = server(&[]);
    for evil in [
        "\u{1b}[2J",
        "x\u{0}y",
        "a\u{b}runcmd",
        "\u{2028}runcmd: [reboot]",
    ] {
        let key = format!("{KEY} {evil}");
        let r = s
            .anon()
            .post(
                "/api/v1/register",
                &json!({"username": "dave", "email": "d@example.org", "team": "qa", "public_key": key}),
            )
            .await
            .unwrap();
        assert!(
            r.status == 400 || r.status == 422,
            "{evil:?}: {} {:?}",
            r.status,
            r.body
        );
        let text = format!("{} {:?}", r.body.message, r.body.errors);
        // A NUL is refused as the body is read, before the key is looked at.
        let why = if evil.contains('\0') {
            "NUL"
        } else {
            "printable ASCII"
        };
        assert!(text.contains(why), "{text}");
        assert_eq!(
            s.root().get("/api/v1/pending/dave").await.unwrap().status,
            404
        );
    }
    let t = s.user("erin").await;
    let r = s
        .with_token(&t)
        .post(
            "/api/v1/key-change",
            &json!({"public_key": format!("{KEY} \u{7}bell")}),
        )
        .await
        .unwrap();
    assert!(r.status == 400 || r.status == 422, "{:?}", r.body);
    let r = s.root().get("/api/v1/key-changes/erin").await.unwrap();
    assert_eq!(r.status, 404, "nothing filed: {:?}", r.body);
}

/// A real sshd on 127.0.0.1 (killed by PID on drop), configured like a bastion's.
struct Sshd {
    child: std::process::Child,
    port: u16,
}
impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "this test needs a real sshd: apt-get install openssh-server"
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let hostkey = dir.join("ssh_host_ed25519_key");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&hostkey),
        );
        let port = basphere_testkit::server::free_port();
        let conf = dir.join("sshd_config");
        std::fs::write(
            &conf,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {}\nPidFile none\n\
                 AuthorizedKeysFile .ssh/authorized_keys\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM yes\n\
                 StrictModes yes\n",
                hostkey.display()
            ),
        )
        .unwrap();
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&conf)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .spawn()
            .unwrap();
        basphere_testkit::poll_until_blocking(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || std::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .expect("sshd did not start");
        Sshd { child, port }
    }

    /// Whether `user` logs in with private key `key` and runs a command.
    fn login(&self, user: &str, key: &Path) -> bool {
        Command::new("ssh")
            .args(["-F", "/dev/null"])
            .args(basphere_testkit::SSH_BATCH_OPTS)
            .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-i"])
            .arg(key)
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{user}@127.0.0.1"))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
    }
}
impl Drop for Sshd {
    fn drop(&mut self) {
        basphere_testkit::kill_child(&mut self.child);
    }
}

/// M4 against a real sshd: the user logs in, is disabled and cannot, is enabled and can again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_user_cannot_log_in_over_ssh() {
    if skip_unless_root("creating Unix accounts and running sshd needs root") {
        return;
    }
    let (_group, s) = managed_server(&[]);
    let sshd = Sshd::start(s.dir.path());
    let user = name();
    let _a = AccountGuard(user.clone());
    let (key, pubkey) = keygen(s.dir.path(), "login_key");
    s.register_key(&user, &pubkey).await;
    s.approve(&user).await;
    let log = || std::fs::read_to_string(s.dir.path().join("sshd.log")).unwrap_or_default();
    assert!(sshd.login(&user, &key), "approved user logs in: {}", log());
    s.admin_ok(&format!("/api/v1/users/{user}/disable")).await;
    assert!(!sshd.login(&user, &key), "disabled user is refused");
    s.admin_ok(&format!("/api/v1/users/{user}/enable")).await;
    assert!(
        sshd.login(&user, &key),
        "enabled user logs in again: {}",
        log()
    );
}
