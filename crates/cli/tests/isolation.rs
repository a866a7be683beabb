//! Users see and touch only their own resources; identity comes from the kernel or a token.
mod common;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_see_or_touch_each_other() {
    let s = server(&[]);
    let a = s.with_token(&s.user("usera").await);
    let b = s.with_token(&s.user("userb").await);
    assert_eq!(
        a.post("/api/v1/vms", &json!({"name": "secret"}))
            .await
            .unwrap()
            .status,
        202
    );
    wait_vm(&a, "secret", 20, "running").await;
    assert_eq!(b.get("/api/v1/vms/secret").await.unwrap().status, 404);
    assert_eq!(b.delete("/api/v1/vms/secret").await.unwrap().status, 404);
    assert_eq!(
        get_data(&b, "/api/v1/vms").await["vms"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(b.get("/api/v1/vms?all=true").await.unwrap().status, 403);
    assert_eq!(b.get("/api/v1/users/usera").await.unwrap().status, 404);
    let op = get_data(&a, "/api/v1/operations").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        b.get(&format!("/api/v1/operations/{op}"))
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        b.get(&format!("/api/v1/operations/{op}/events"))
            .await
            .unwrap()
            .status,
        404
    );
    // A's VM is untouched
    wait_vm(&a, "secret", 5, "running").await;

    // every admin route refuses a user
    let admin_routes: &[(&str, &str)] = &[
        ("GET", "/api/v1/pending"),
        ("GET", "/api/v1/pending/usera"),
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("POST", "/api/v1/users/usera/approve"),
        ("POST", "/api/v1/users/usera/reject"),
        ("POST", "/api/v1/users/usera/disable"),
        ("POST", "/api/v1/users/usera/enable"),
        ("PUT", "/api/v1/users/usera/quota"),
        ("DELETE", "/api/v1/users/usera"),
        ("GET", "/api/v1/key-changes"),
        ("POST", "/api/v1/key-changes/usera/approve"),
        ("POST", "/api/v1/key-changes/usera/reject"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/operations?all=true"),
    ];
    for (m, path) in admin_routes {
        let r = b
            .call(m.parse().unwrap(), path, Some(&json!({})))
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{m} {path}: {:?}", r.body);
    }
    // wrong token, no token
    assert_eq!(
        s.with_token("bsp_wrong")
            .get("/api/v1/vms")
            .await
            .unwrap()
            .status,
        401
    );
    assert_eq!(s.anon().get("/api/v1/vms").await.unwrap().status, 401);
    assert_eq!(s.anon().get("/api/v1/pending").await.unwrap().status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_rejected_and_disabled_users_can_only_read_their_status() {
    let s = server(&[]);
    // a pending user gets a token only through approval, so test via the admin-made token path:
    s.register("waiting").await;
    // enrollment codes are single-use and tied to the user
    let t = s.user("active1").await;
    let c = s.with_token(&t);
    assert_eq!(
        s.root()
            .post("/api/v1/users/active1/disable", &json!({}))
            .await
            .unwrap()
            .status,
        200
    );
    let r = c.post("/api/v1/vms", &json!({"name": "x"})).await.unwrap();
    assert_eq!(r.status, 403);
    assert!(r.body.message.contains("disabled"));
    let me = c.get("/api/v1/me").await.unwrap();
    assert_eq!(me.status, 200);
    assert_eq!(me.body.data["user"]["status"], "disabled");
    assert_eq!(
        s.root()
            .post("/api/v1/users/active1/enable", &json!({}))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        c.post("/api/v1/vms", &json!({"name": "x"}))
            .await
            .unwrap()
            .status,
        202
    );
    // reject with a reason; the decision is audited
    let r = s
        .root()
        .post(
            "/api/v1/users/waiting/reject",
            &json!({"reason": "unknown team"}),
        )
        .await
        .unwrap();
    assert!(r.body.success);
    let reg = get_data(&s.root(), "/api/v1/pending/waiting").await;
    assert_eq!(reg["status"], "rejected");
    assert_eq!(reg["reject_reason"], "unknown team");
    assert_eq!(reg["processed_by"], "admin");
    let audit = get_data(&s.root(), "/api/v1/audit?target=waiting").await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["user.reject", "user.register"]);
    // a used enrollment code does not work twice
    s.register("twice").await;
    let code = s.approve("twice").await["enrollment_code"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        s.anon()
            .post(
                "/api/v1/enroll",
                &json!({"username": "twice", "code": code})
            )
            .await
            .unwrap()
            .status,
        201
    );
    assert_eq!(
        s.anon()
            .post(
                "/api/v1/enroll",
                &json!({"username": "twice", "code": code})
            )
            .await
            .unwrap()
            .status,
        401
    );
    // tokens: listed without secrets, revocable, revoked ones stop working
    let t2 = s.user("tok").await;
    let c2 = s.with_token(&t2);
    let list = get_data(&c2, "/api/v1/tokens").await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(!list.to_string().contains(&t2));
    assert_eq!(
        c2.delete(&format!("/api/v1/tokens/{id}"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(c2.get("/api/v1/vms").await.unwrap().status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_identifies_the_real_uid() {
    if skip_unless_root("creating Unix accounts needs root") {
        return;
    }
    let s = server(&[
        ("BASPHERE_BASTION__MANAGE_ACCOUNTS", "true"),
        ("BASPHERE_BASTION__GROUP", "bsp-test-users"),
    ]);
    let name = format!("bt{}", std::process::id());
    let _guard = AccountGuard(name.clone());
    let (_k, pubkey) = keygen(s.dir.path(), "user_key");
    s.register_key(&name, &pubkey).await;
    assert!(
        s.approve(&name).await["enrollment_code"].is_null(),
        "managed accounts need no enrollment code"
    );
    let pw = nix::unistd::User::from_name(&name)
        .unwrap()
        .expect("approval created the Unix account");
    let keys = std::fs::read_to_string(pw.dir.join(".ssh/authorized_keys")).unwrap();
    assert_eq!(keys.trim(), pubkey);
    let group = nix::unistd::Group::from_gid(pw.gid).unwrap().unwrap();
    assert_eq!(group.name, "bsp-test-users");

    // a second managed account, whose VM the first must not see
    let other = format!("bu{}", std::process::id());
    let _guard2 = AccountGuard(other.clone());
    s.register_key(&other, &pubkey).await;
    s.approve(&other).await;
    let pw2 = nix::unistd::User::from_name(&other).unwrap().unwrap();

    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(s.cli_as(&pw2, &["vm", "create", "-n", "theirs", "--no-wait"]));
    let as_user = |args: &[&str]| s.cli_as(&pw, args);
    let out = ok(as_user(&["vm", "create", "-n", "mine", "-s", "tiny"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mine is running: ssh debian@"));
    let out = ok(as_user(&["vm", "list", "-j"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine"]);
    assert_eq!(list[0]["owner"], name.as_str());
    // the socket caller cannot act as admin
    let out = as_user(&["admin", "user", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin"));

    // key change approval replaces the key in authorized_keys
    let (_k2, newkey) = keygen(s.dir.path(), "user_key2");
    let kf = s.dir.path().join("user_key2.pub");
    ok(as_user(&["key", "change", "-k", kf.to_str().unwrap()]));
    s.admin_ok(&format!("/api/v1/key-changes/{name}/approve"))
        .await;
    let keys = std::fs::read_to_string(pw.dir.join(".ssh/authorized_keys")).unwrap();
    assert_eq!(keys.trim(), newkey);

    // deleting the user deletes their VMs first, then the account
    s.cli_ok(&["admin", "user", "delete", &name, "-f"]);
    assert!(
        nix::unistd::User::from_name(&name).unwrap().is_none(),
        "account removed"
    );
    s.cli_ok(&["admin", "user", "purge", &other, "-f"]);
    assert!(
        nix::unistd::User::from_name(&other).unwrap().is_none(),
        "account removed"
    );
    assert_eq!(
        get_data(&s.root(), &format!("/api/v1/vms?owner={name}")).await["vms"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let _ = std::process::Command::new("groupdel")
        .arg("bsp-test-users")
        .output();
}
