//! VMs and quota.

use crate::*;

/// The prototype's `VM` fields (`extra_disks`, `extra_networks` are `omitempty` there).
const VM_FIELDS: &[&str] = &[
    "name",
    "vsphere_vm_name",
    "owner",
    "os",
    "login_user",
    "spec",
    "ip_address",
    "status",
    "created_at",
];

fn check_vm(vm: &Value, owner: &str) {
    has_all(vm, VM_FIELDS);
    has_all(vm, &["id", "vcpus", "memory_mib", "disk_gib", "provider"]);
    assert_eq!(vm["owner"], owner);
    assert!(vm["vsphere_vm_name"].is_string(), "{vm}");
    assert!(
        vm["ip_address"].is_string(),
        "a string, \"\" until known: {vm}"
    );
    assert!(is_rfc3339(&vm["created_at"]), "{vm}");
    for k in ["extra_disks", "extra_networks"] {
        assert!(vm.get(k).is_none_or(|d| d.is_array()), "{vm}");
    }
}

fn check_quota(q: &Value) {
    has_all(q, &["max_vms", "used_vms", "max_ips", "used_ips"]);
    for k in ["max_vms", "used_vms", "max_ips", "used_ips"] {
        assert!(q[k].is_u64(), "{k}: {q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_and_quota_answer_as_the_prototype() {
    let s = server(&[]);
    let token = s.user("vmuser").await;
    let t = Some(token.as_str());

    // GET /vms before any: {vms: [], total: 0, quota}.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms", t, None).await,
        200,
    )["data"]
        .clone();
    has_all(&d, &["vms", "total", "quota"]);
    assert_eq!(d["vms"], json!([]));
    assert_eq!(d["total"], 0);
    check_quota(&d["quota"]);
    assert_eq!(d["quota"]["used_vms"], 0);

    // POST /vms: 202 (creation runs on), {vms, created, failed, errors?} plus operations;
    // an omitted count is 1, and so is 0.
    let mut ops = vec![];
    for (name, count) in [("myvm", None), ("zero", Some(0))] {
        let mut body = json!({"name": name, "os": "debian-12", "spec": "tiny"});
        if let Some(c) = count {
            body["count"] = json!(c);
        }
        let r = call(&s, "127.0.0.1", "POST", "/api/v1/vms", t, Some(&body)).await;
        let d = envelope(&r, 202)["data"].clone();
        has_all(&d, &["vms", "created", "failed", "operations"]);
        assert_eq!(d["created"], 1, "{d}");
        assert_eq!(d["failed"], 0, "{d}");
        assert!(d.get("errors").is_none_or(|e| e == &json!([])), "{d}");
        let vms = d["vms"].as_array().unwrap();
        assert_eq!(vms.len(), 1);
        check_vm(&vms[0], "vmuser");
        assert_eq!(vms[0]["name"], name);
        assert_eq!(vms[0]["os"], "debian-12");
        assert_eq!(vms[0]["spec"], "tiny");
        assert_eq!(vms[0]["status"], "creating");
        assert_eq!(vms[0]["operation_id"], d["operations"][0]);
        ops.push(d["operations"][0].as_str().unwrap().to_string());
    }
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/vms",
        t,
        Some(&json!({"name": "pair", "spec": "tiny", "count": 2})),
    )
    .await;
    let d = envelope(&r, 202)["data"].clone();
    assert_eq!(d["created"], 2);
    assert_eq!(d["operations"].as_array().unwrap().len(), 2);

    let c = s.with_token(&token);
    let running = wait_vm(&c, "myvm", 30, "running").await;
    assert!(
        running["ip_address"]
            .as_str()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .is_ok(),
        "{running}"
    );

    // GET /vms: every VM, total, the quota in use.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms", t, None).await,
        200,
    )["data"]
        .clone();
    let vms = d["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    assert_eq!(d["total"], 4);
    for vm in vms {
        check_vm(vm, "vmuser");
    }
    check_quota(&d["quota"]);
    assert_eq!(d["quota"]["used_vms"], 4);
    assert_eq!(d["quota"]["used_ips"], 4);

    // GET /vms/{name}: the VM; unknown: 404.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms/myvm", t, None).await,
        200,
    )["data"]
        .clone();
    check_vm(&d, "vmuser");
    assert_eq!(d["name"], "myvm");
    assert_eq!(d["status"], "running");
    assert_eq!(d["login_user"], running["login_user"]);
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms/nothere", t, None).await,
        404,
    );

    // GET /quota: the prototype's four figures, plus ours.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/quota", t, None).await,
        200,
    )["data"]
        .clone();
    check_quota(&d);
    assert_eq!(d["used_vms"], 4);
    assert_eq!(d["used_ips"], 4);
    has_all(
        &d,
        &[
            "max_clusters",
            "used_vcpus",
            "used_memory_mib",
            "username",
            "quota",
            "usage",
        ],
    );
    assert_eq!(d["max_vms"], d["quota"]["max_vms"]);

    // DELETE /vms/{name}: 202, the VM (deleting) with its operation; then it is gone.
    let r = call(&s, "127.0.0.1", "DELETE", "/api/v1/vms/myvm", t, None).await;
    let d = envelope(&r, 202)["data"].clone();
    check_vm(&d, "vmuser");
    assert_eq!(d["name"], "myvm");
    assert_eq!(d["status"], "deleting");
    assert!(
        d["operation_id"].as_str().is_some_and(|o| !o.is_empty()),
        "{d}"
    );
    wait_vm(&c, "myvm", 30, "gone").await;

    // Over the quota: 403, said plainly, with the figures as data.
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/vms",
        t,
        Some(&json!({"name": "many", "spec": "tiny", "count": 10})),
    )
    .await;
    let v = envelope(&r, 403);
    assert_eq!(
        v["message"],
        "quota exceeded: you use 3 VMs and asked for 10 more, but your limit is 10 VMs; delete \
         some or ask an admin to raise the limit"
    );
    assert_eq!(v["data"]["limit"], "vms");
    envelope(
        &call(&s, "127.0.0.1", "DELETE", "/api/v1/vms/myvm", t, None).await,
        404,
    );
}

// ---- key change without a key -------------------------------------------------------------
