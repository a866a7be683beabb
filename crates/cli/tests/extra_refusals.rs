//! Extra disks and networks at the API edge (do-nothing provider): what is accepted is stored
//! and shown; too many disks, sizes out of range, unknown modes or networks are 400
//! "Validation failed" naming the bad entry; over the user's `max_disk_gib` quota is 403; a
//! refusal stores nothing. Manifests take the same extras, checked the same way.
mod common;
mod raw;

use common::*;
use raw::{FORM, csrf_of, enc};
use serde_json::{Value, json};

fn srv() -> Server {
    server(&[
        (
            "BASPHERE_NETWORKS__STORAGE",
            r#"{ cidr = "10.77.0.0/24", gateway = "10.77.0.1", bridge = "bspst0" }"#,
        ),
        (
            "BASPHERE_NETWORKS__BACKUP",
            r#"{ cidr = "10.78.0.0/24", dhcp = true, port_group = "Backup" }"#,
        ),
        ("BASPHERE_VMS__EXTRA_NETWORKS__MAX_COUNT", "2"),
        // New users' disk quota (tiny: a 50 GiB boot disk).
        ("BASPHERE_QUOTA__MAX_DISK_GIB", "200"),
    ])
}

async fn vms(c: &basphere_client::Client) -> Vec<Value> {
    get_data(c, "/api/v1/vms").await["vms"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extras_are_stored_and_shown() {
    let s = srv();
    let c = s.with_token(&s.user("xok").await);
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "db", "spec": "tiny", "extra_disks": [{"size_gb": 20},
                {"size_gb": 30, "mode": "raw"}], "extra_networks": ["storage", "backup"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    let vm = &r.body.data["vms"][0];
    assert_eq!(
        vm["extra_disks"],
        json!([{"size_gb": 20, "mode": "auto"}, {"size_gb": 30, "mode": "raw"}])
    );
    assert_eq!(vm["extra_networks"], json!(["storage", "backup"]));
    assert_eq!(
        vm["extra_nics"],
        json!([{"network": "storage", "ip_address": "10.77.0.2"},
               {"network": "backup", "ip_address": ""}])
    );
    let shown = get_data(&c, "/api/v1/vms/db").await;
    assert_eq!(shown["extra_disks"], vm["extra_disks"]);
    assert_eq!(shown["extra_nics"], vm["extra_nics"]);
    // The CLI's --disk/--net reach the same request.
    let tok = s.user("xcli").await;
    let out = std::process::Command::new(BIN)
        .args(["--url", &s.addr, "--token", &tok])
        .args([
            "vm",
            "create",
            "-n",
            "web",
            "-s",
            "tiny",
            "--disk",
            "10G:raw",
            "--net",
            "storage",
            "--no-wait",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web = get_data(&s.with_token(&tok), "/api/v1/vms/web").await;
    assert_eq!(web["extra_disks"], json!([{"size_gb": 10, "mode": "raw"}]));
    assert_eq!(web["extra_nics"][0]["ip_address"], "10.77.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_extras_are_refused_by_entry_and_nothing_is_stored() {
    let s = srv();
    let c = s.with_token(&s.user("xbad").await);
    let cases: &[(Value, &[&str])] = &[
        (
            json!({"extra_disks": [{"size_gb": 10}, {"size_gb": 10}, {"size_gb": 10},
                {"size_gb": 10}]}),
            &["extra_disks: at most 3 extra disks per VM (got 4)"],
        ),
        (
            json!({"extra_disks": [{"size_gb": 10}, {"size_gb": 9}, {"size_gb": 501}]}),
            &[
                "extra_disks[1].size_gb: must be between 10 and 500 GiB (got 9)",
                "extra_disks[2].size_gb: must be between 10 and 500 GiB (got 501)",
            ],
        ),
        (
            json!({"extra_disks": [{"size_gb": 10, "mode": "xfs"}]}),
            &["extra_disks[0].mode: unknown"],
        ),
        (
            json!({"extra_disks": [{"size_gb": "ten"}]}),
            &["extra_disks[0].size_gb: must be a whole number"],
        ),
        (
            json!({"extra_networks": ["nope"]}),
            &["extra_networks[0]: unknown network \"nope\"; choose one of: backup, storage"],
        ),
        (
            json!({"extra_networks": ["storage", "storage"]}),
            &["extra_networks[1]: network \"storage\" is listed twice"],
        ),
        (
            json!({"extra_networks": ["storage", "backup", "storage"]}),
            &["extra_networks: at most 2 extra networks per VM (got 3)"],
        ),
    ];
    for (extra, want) in cases {
        let mut body = json!({"name": "x", "spec": "tiny"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = c.post("/api/v1/vms", &body).await.unwrap();
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.body.message, "Validation failed");
        for w in *want {
            assert!(
                r.body.errors.iter().any(|e| e.starts_with(w)),
                "{body}: want {w:?} in {:?}",
                r.body.errors
            );
        }
    }
    assert!(vms(&c).await.is_empty(), "nothing stored");

    // Over max_disk_gib (200): 3 × (50 + 20) = 210 → 403, nothing stored.
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "big", "spec": "tiny", "count": 3,
                "extra_disks": [{"size_gb": 20}], "extra_networks": ["storage"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.body.message.contains("GiB of disk") && r.body.message.contains("200"),
        "{}",
        r.body.message
    );
    assert!(vms(&c).await.is_empty(), "nothing stored");
    // The refused admission leased no address: the next VM gets the network's first.
    let r = c
        .post(
            "/api/v1/vms",
            &json!({"name": "ok", "spec": "tiny", "count": 2,
                "extra_disks": [{"size_gb": 50}], "extra_networks": ["storage"]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(
        r.body.data["vms"][0]["extra_nics"][0]["ip_address"],
        "10.77.0.2"
    );
    let q = get_data(&c, "/api/v1/quota").await;
    assert_eq!(
        (q["used_disk_gib"].as_u64(), q["max_disk_gib"].as_u64()),
        (Some(200), Some(200))
    );
    // 200 GiB held now: one GiB more is over.
    let r = c
        .post("/api/v1/vms", &json!({"name": "more", "spec": "tiny"}))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(vms(&c).await.len(), 2);
    // The limit is the user's own: an admin raises it, and the same create is admitted.
    let out = s.cli_ok(&["admin", "user", "quota", "xbad", "--max-disk-gib", "250"]);
    assert!(out.status.success());
    let q = get_data(&c, "/api/v1/quota").await;
    assert_eq!(q["max_disk_gib"].as_u64(), Some(250));
    let r = c
        .post("/api/v1/vms", &json!({"name": "more", "spec": "tiny"}))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
}

/// A manifest's nodes take extra disks and networks (both disk forms, `[defaults]` too); a bad
/// entry refuses the whole apply naming the node and the field; over the disk quota, nothing
/// is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_take_extras() {
    let s = srv();
    let c = s.with_token(&s.user("xbatch").await);
    let apply = |manifest: &str| {
        let c = &c;
        let body = json!({"manifest": manifest});
        async move { c.post("/api/v1/batches", &body).await.unwrap() }
    };
    let r = apply(
        "[defaults]\nspec = \"tiny\"\nextra_networks = [\"storage\"]\n\
         [vms.db]\nextra_disks = [\"20G\", { size_gb = 10, mode = \"raw\" }]\n\
         [vms.web]\nextra_disks = [\"5G\", \"30G:nope\"]\nextra_networks = [\"nosuch\"]\n",
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    for want in [
        "web: extra_disks[0].size_gb: must be between 10 and 500",
        "web: extra_disks[1].mode",
        "web: extra_networks[0]: unknown network \"nosuch\"",
    ] {
        assert!(
            r.body.errors.iter().any(|e| e.starts_with(want)),
            "want {want:?} in {:?}",
            r.body.errors
        );
    }
    assert!(vms(&c).await.is_empty(), "nothing admitted");
    // 4 × 50 boot + 20 + 10 = 230 > 200.
    let over = "[defaults]\nspec = \"tiny\"\n[vms.a]\nextra_disks = [\"20G\", \"10G:raw\"]\n\
                [vms.b]\n[vms.c]\n[vms.d]\n";
    let r = apply(over).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(r.body.message.contains("GiB of disk"), "{}", r.body.message);
    assert!(vms(&c).await.is_empty(), "nothing admitted");
    let r = apply(
        "[defaults]\nspec = \"tiny\"\nextra_networks = [\"storage\"]\n\
         [vms.db]\nextra_disks = [\"20G\", { size_gb = 10, mode = \"raw\" }]\n[vms.web]\n",
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let db = get_data(&c, "/api/v1/vms/db").await;
    assert_eq!(
        db["extra_disks"],
        json!([{"size_gb": 20, "mode": "auto"}, {"size_gb": 10, "mode": "raw"}])
    );
    assert_eq!(db["extra_networks"], json!(["storage"]));
    let web = get_data(&c, "/api/v1/vms/web").await;
    assert_eq!(web["extra_networks"], json!(["storage"]), "from [defaults]");
    assert_ne!(
        db["extra_nics"][0]["ip_address"], web["extra_nics"][0]["ip_address"],
        "each node leased its own address"
    );
    let q = get_data(&c, "/api/v1/quota").await;
    assert_eq!(q["used_disk_gib"].as_u64(), Some(130));
    // `basphere plan` shows what each node adds.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("infra.yaml");
    std::fs::write(
        &file,
        "vms:\n  store:\n    spec: tiny\n    extra_disks: [{size_gb: 40, mode: raw}]\n    \
         extra_networks: [backup]\n",
    )
    .unwrap();
    let out = s.cli_ok(&["plan", "-f", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[disk 40G:raw, net backup]"), "{text}");
}

/// The portal's create form carries the extras into the same service: a bad size is shown at
/// the form's field (nothing stored), a good one creates the VM with its disks and every
/// network ticked (up to `[vms.extra_networks] max_count`, here 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_form_takes_extra_disks_and_a_network() {
    let s = srv();
    let token = s.user("xweb").await;
    let page = raw::send("127.0.0.1", &s.addr, "GET", "/signin", &[], b"").await;
    let cookie = format!("bsp_pre={}", page.cookie("bsp_pre").unwrap());
    let body = format!("token={}&csrf={}", enc(&token), csrf_of(&page.body));
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/signin",
        &[("Content-Type", FORM), ("Cookie", &cookie)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let session = format!("bsp_session={}", r.cookie("bsp_session").unwrap());
    let dash = raw::send(
        "127.0.0.1",
        &s.addr,
        "GET",
        "/dashboard",
        &[("Cookie", &session)],
        b"",
    )
    .await;
    assert!(
        dash.body.contains(r#"name="extra_disks""#),
        "the form asks for disks"
    );
    for net in ["storage", "backup"] {
        assert!(
            dash.body
                .contains(&format!(r#"name="extra_networks.{net}" value="on""#)),
            "and offers every network to tick"
        );
    }
    let csrf = csrf_of(&dash.body);
    let post = |form: String| {
        let session = session.clone();
        let addr = s.addr.clone();
        async move {
            raw::send(
                "127.0.0.1",
                &addr,
                "POST",
                "/vms",
                &[("Content-Type", FORM), ("Cookie", &session)],
                form.as_bytes(),
            )
            .await
        }
    };
    let r = post(format!(
        "csrf={csrf}&name=web&spec=tiny&count=1&extra_disks={}&extra_networks.storage=on",
        enc("20G, 5G")
    ))
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body
            .contains("extra_disks[1].size_gb: must be between 10 and 500 GiB (got 5)"),
        "shown at the field"
    );
    let c = s.with_token(&token);
    assert!(
        r.body
            .contains(r#"name="extra_networks.storage" value="on" checked"#),
        "the ticked network stays ticked"
    );
    assert!(vms(&c).await.is_empty(), "nothing stored");
    let r = post(format!(
        "csrf={csrf}&name=web&spec=tiny&count=1&extra_disks={}&extra_networks.storage=on\
         &extra_networks.backup=on",
        enc("20G, 30G:raw")
    ))
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let vm = get_data(&c, "/api/v1/vms/web").await;
    assert_eq!(
        vm["extra_disks"],
        json!([{"size_gb": 20, "mode": "auto"}, {"size_gb": 30, "mode": "raw"}])
    );
    assert_eq!(vm["extra_networks"], json!(["backup", "storage"]));
}
