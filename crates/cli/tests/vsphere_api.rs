//! The vSphere provider behind the HTTP API, against the real vSphere API simulator (vcsim).
mod common;
use basphere_testkit::vcsim::Vcsim;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn vcsim() -> Vcsim {
    Vcsim::start(&[])
}

/// vcsim has no template: power off DC0_C0_RP0_VM1 and mark it as one.
async fn make_template(url: &str) {
    basphere_vsphere::install_crypto_provider();
    let tls = basphere_vsphere::TlsConfig {
        ca_file: None,
        insecure: true,
    };
    let creds = basphere_vsphere::Credentials {
        username: "user".into(),
        password: basphere_vsphere::Secret::new("pass"),
    };
    let c = basphere_vsphere::Client::connect(url, &tls, creds)
        .await
        .unwrap();
    let vm = c
        .find_by_inventory_path("DC0/vm/DC0_C0_RP0_VM1")
        .await
        .unwrap()
        .unwrap();
    c.power_off(&vm, Duration::from_secs(10)).await.unwrap();
    c.mark_as_template(&vm).await.unwrap();
    c.logout().await.unwrap();
}

fn credentials(dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("vsphere-credentials.toml");
    std::fs::write(&p, "username = \"user\"\npassword = \"s3cret-vc-pass\"\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn vsphere_section(url: &str, creds: &Path) -> String {
    format!(
        "{{ server = \"{url}\", datacenter = \"DC0\", cluster = \"DC0_C0\", datastore = \"LocalDS_0\", \
         network = \"VM Network\", folder = \"basphere/vms\", credentials_file = \"{}\", tls = {{ insecure = true }}, \
         simulator_guest_ip = true, templates = {{ debian-12 = {{ template = \"DC0_C0_RP0_VM1\", login_user = \"debian\", nic = \"ens192\" }} }} }}",
        creds.display()
    )
}

async fn start(vc: &Vcsim) -> (Server, tempfile::TempDir) {
    make_template(&vc.url).await;
    let cdir = tempfile::tempdir().unwrap();
    let creds = credentials(cdir.path(), 0o600);
    let section = vsphere_section(&vc.url, &creds);
    let s = server(&[
        ("BASPHERE_PROVIDER__KIND", "vsphere"),
        ("BASPHERE_VSPHERE", &section),
    ]);
    (s, cdir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_creates_through_the_api_then_delete() {
    let vc = vcsim();
    let (s, _cdir) = start(&vc).await;
    let token = s.user("vcuser").await;
    let r = s
        .root()
        .call(
            basphere_client::Method::PUT,
            "/api/v1/users/vcuser/quota",
            Some(&json!({"max_vms": 20, "max_ips": 20})),
        )
        .await
        .unwrap();
    assert!(r.body.success, "{:?}", r.body);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let c = s.with_token(&token);
        tasks.spawn(async move {
            c.post(
                "/api/v1/vms",
                &json!({"name": format!("vc{i}"), "spec": "small"}),
            )
            .await
            .unwrap()
        });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let c = s.with_token(&token);
    for i in 0..20 {
        let vm = wait_vm(&c, &format!("vc{i}"), 120, "running").await;
        assert_eq!(vm["provider"], "vsphere");
    }
    for i in 0..20 {
        assert_eq!(
            c.delete(&format!("/api/v1/vms/vc{i}"))
                .await
                .unwrap()
                .status,
            202
        );
    }
    for i in 0..20 {
        wait_vm(&c, &format!("vc{i}"), 120, "gone").await;
    }
    assert_eq!(quota_usage(&c).await, (0, 0));
    // the password never reaches the server's log or its answers
    let log = std::fs::read_to_string(s.log_path()).unwrap();
    assert!(!log.contains("s3cret-vc-pass"));
}

/// VMs in Basphere's vCenter folder: (name, power state, annotation).
async fn vcenter_vms(url: &str) -> Vec<(String, String, String)> {
    let c = basphere_vsphere::Client::connect(
        url,
        &basphere_vsphere::TlsConfig {
            ca_file: None,
            insecure: true,
        },
        basphere_vsphere::Credentials {
            username: "user".into(),
            password: basphere_vsphere::Secret::new("pass"),
        },
    )
    .await
    .unwrap();
    let folder = c
        .find_by_inventory_path("DC0/vm/basphere/vms")
        .await
        .unwrap()
        .unwrap();
    let q = basphere_vsphere::soap::PropertyQuery {
        props: vec![(
            "VirtualMachine".into(),
            vec![
                "name".into(),
                "runtime.powerState".into(),
                "config.annotation".into(),
            ],
        )],
        root: folder,
        walk_folder: true,
    };
    let mut out: Vec<_> = c
        .retrieve(&q, 100)
        .await
        .unwrap()
        .iter()
        .map(|o| {
            (
                o.text("name").to_string(),
                o.text("runtime.powerState").to_string(),
                o.text("config.annotation").to_string(),
            )
        })
        .collect();
    out.sort();
    c.logout().await.unwrap();
    out
}

/// H3 through the real server: two users' `web`, created in the same second (UUIDv7 ids with the
/// same first 8 hex digits, which the old vCenter names used), are two vCenter VMs, and deleting
/// one leaves the other running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_web_in_the_same_second_are_two_vcenter_vms() {
    let vc = vcsim();
    let (s, _cdir) = start(&vc).await;
    let (alice, bob) = (
        s.with_token(&s.user("vcalice").await),
        s.with_token(&s.user("vcbob").await),
    );
    let body = json!({"name": "web", "spec": "small"});
    let (ra, rb) = tokio::join!(
        alice.post("/api/v1/vms", &body),
        bob.post("/api/v1/vms", &body)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.status, 202, "{:?}", ra.body);
    assert_eq!(rb.status, 202, "{:?}", rb.body);
    let va = wait_vm(&alice, "web", 60, "running").await;
    let vb = wait_vm(&bob, "web", 60, "running").await;
    let (ia, ib) = (va["id"].as_str().unwrap(), vb["id"].as_str().unwrap());
    assert_eq!(
        ia[..8],
        ib[..8],
        "the two ids should share their time prefix (made 65 s apart?)"
    );

    let vms = vcenter_vms(&vc.url).await;
    assert_eq!(vms.len(), 2, "{vms:#?}");
    let mine = |user: &str, id: &str| {
        vms.iter().any(|(name, power, note)| {
            name.starts_with(&format!("web-{user}-"))
                && power == "poweredOn"
                && note.contains(id)
                && note.contains(&format!("owner {user}"))
        })
    };
    assert!(mine("vcalice", ia) && mine("vcbob", ib), "{vms:#?}");

    assert_eq!(bob.delete("/api/v1/vms/web").await.unwrap().status, 202);
    wait_vm(&bob, "web", 60, "gone").await;
    let left = vcenter_vms(&vc.url).await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert!(
        left[0].0.starts_with("web-vcalice-") && left[0].1 == "poweredOn" && left[0].2.contains(ia),
        "{left:#?}"
    );
    assert_eq!(
        wait_vm(&alice, "web", 5, "running").await["id"].as_str(),
        Some(ia)
    );

    assert_eq!(alice.delete("/api/v1/vms/web").await.unwrap().status, 202);
    wait_vm(&alice, "web", 60, "gone").await;
    assert!(vcenter_vms(&vc.url).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_readable_by_others_stop_the_server_at_start() {
    let vc = vcsim();
    let cdir = tempfile::tempdir().unwrap();
    let creds = credentials(cdir.path(), 0o644);
    let data = tempfile::tempdir().unwrap();
    let config = default_config(data.path());
    let out = Command::new(BIN)
        .arg("serve")
        .env("BASPHERE_CONFIG", &config)
        .env("BASPHERE_DATA_DIR", data.path())
        .env(
            "BASPHERE_SERVER__SOCKET",
            format!("\"{}\"", data.path().join("s.sock").display()),
        )
        .env("BASPHERE_SERVER__LISTEN", "\"\"")
        .env("BASPHERE_PROVIDER__KIND", "vsphere")
        .env("BASPHERE_VSPHERE", vsphere_section(&vc.url, &creds))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600") || err.contains("0600"), "{err}");
    assert!(!err.contains("s3cret-vc-pass"));
}

/// `cargo test -p basphere --test vsphere_api -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored"]
async fn bench_100_creates_and_deletes_through_the_api() {
    let vc = vcsim();
    let (s, _cdir) = start(&vc).await;
    let mut tokens = vec![];
    for u in 0..10 {
        tokens.push(s.user(&format!("bench{u}")).await);
    }
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let c = s.with_token(&tokens[i / 10]);
        tasks.spawn(async move {
            let t = Instant::now();
            let r = c
                .post(
                    "/api/v1/vms",
                    &json!({"name": format!("b{i}"), "spec": "tiny"}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 202, "{:?}", r.body);
            let op = r.body.data["operations"][0].as_str().unwrap().to_string();
            wait_vm(&c, &format!("b{i}"), 300, "running").await;
            let total = t.elapsed();
            let w = get_data(&c, &format!("/api/v1/operations/{op}")).await;
            let in_provider: i64 = w["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["finished_at"].as_i64().unwrap() - s["started_at"].as_i64().unwrap())
                .sum();
            (total, Duration::from_millis(in_provider as u64))
        });
    }
    let mut overhead = vec![];
    while let Some(r) = tasks.join_next().await {
        let (total, provider) = r.unwrap();
        overhead.push(total.saturating_sub(provider));
    }
    let create_wall = t0.elapsed();
    let t1 = Instant::now();
    for i in 0..100 {
        let c = s.with_token(&tokens[i / 10]);
        assert_eq!(
            c.delete(&format!("/api/v1/vms/b{i}")).await.unwrap().status,
            202
        );
    }
    for i in 0..100 {
        wait_vm(
            &s.with_token(&tokens[i / 10]),
            &format!("b{i}"),
            300,
            "gone",
        )
        .await;
    }
    let delete_wall = t1.elapsed();
    overhead.sort();
    // Sequential pass: request sent → `succeeded` event, minus the time inside provider steps.
    let c = s.with_token(&tokens[0]);
    let mut own = vec![];
    for i in 0..20 {
        let t = Instant::now();
        let r = c
            .post(
                "/api/v1/vms",
                &json!({"name": format!("seq{i}"), "spec": "tiny"}),
            )
            .await
            .unwrap();
        let op = r.body.data["operations"][0].as_str().unwrap().to_string();
        c.follow(&format!("/api/v1/operations/{op}/events"), |_, _| true)
            .await
            .unwrap();
        let total = t.elapsed();
        let w = get_data(&c, &format!("/api/v1/operations/{op}")).await;
        assert_eq!(w["status"], "succeeded");
        let in_provider: i64 = w["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["finished_at"].as_i64().unwrap() - s["started_at"].as_i64().unwrap())
            .sum();
        own.push(total.saturating_sub(Duration::from_millis(in_provider as u64)));
        assert_eq!(
            c.delete(&format!("/api/v1/vms/seq{i}"))
                .await
                .unwrap()
                .status,
            202
        );
        wait_vm(&c, &format!("seq{i}"), 60, "gone").await;
    }
    own.sort();
    println!(
        "vsphere via API, sequential creates: Basphere's own time per create outside provider steps \
         (admission, queue, step commits, SSE; ±1 ms step-clock granularity): p50 {:?} p90 {:?}",
        own[10], own[18]
    );
    println!(
        "vsphere via API, 100 VMs against one vcsim: creates {:.2} s ({:.1}/s), deletes {:.2} s ({:.1}/s); \
         Basphere overhead per VM outside provider steps (includes queueing and client polling): p50 {:?} p90 {:?}",
        create_wall.as_secs_f64(),
        100.0 / create_wall.as_secs_f64(),
        delete_wall.as_secs_f64(),
        100.0 / delete_wall.as_secs_f64(),
        overhead[50],
        overhead[90]
    );
}
