//! `basphere backup` under load and `basphere restore` into a new install, on the backend the
//! test kit picks (`BASPHERE_TEST_BACKEND`). 100 VM creates are in flight (the null provider,
//! slowed) when the backup is taken; a server started on the restored database resumes every
//! unfinished workflow to its end, and holds what the source held at the snapshot: every VM
//! with its create workflow and the address it had there, quota usage equal to the VMs counted.
//! A restore into a database that is not empty, and a damaged or foreign file, are refused with
//! nothing changed.
mod common;
use basphere_client::Client;
use common::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

const USERS: [&str; 2] = ["alice", "bob"];
const PER_USER: usize = 50;

fn settings() -> Vec<(&'static str, &'static str)> {
    vec![
        ("BASPHERE_NETWORK__CIDR", "10.96.0.0/16"),
        ("BASPHERE_NETWORK__GATEWAY", "10.96.0.1"),
        ("BASPHERE_NETWORK__BLOCK_SIZE", "128"),
        ("BASPHERE_QUOTA__MAX_VMS", "100"),
        ("BASPHERE_QUOTA__MAX_IPS", "100"),
        // Each phase of a create takes this long: the creates are still running at the backup.
        ("BASPHERE_NULL_DELAY_MS", "150"),
    ]
}

fn ok(out: Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    })
}

/// The command failed and its error says `what`.
fn refused(out: Output, what: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted: {err}");
    assert!(
        what.iter().any(|w| err.contains(w)),
        "the error should say one of {what:?}: {err}"
    );
    err
}

/// Every VM as name → (owner, address, status).
async fn vms(admin: &Client) -> BTreeMap<String, (String, String, String)> {
    let v = get_data(admin, "/api/v1/vms?all=true&limit=1000").await;
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vm| {
            let s = |k: &str| vm[k].as_str().unwrap_or_default().to_string();
            (s("name"), (s("owner"), s("ip_address"), s("status")))
        })
        .collect()
}

async fn operations(admin: &Client) -> Vec<Value> {
    let ops = get_data(admin, "/api/v1/operations?all=true&limit=1000").await;
    ops.as_array().unwrap().clone()
}

fn unfinished(ops: &[Value]) -> usize {
    ops.iter()
        .filter(|o| {
            !matches!(
                o["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .count()
}

/// Waits until every VM runs and no operation is unfinished.
async fn settled(s: &Server, secs: u64) {
    let admin = s.root();
    basphere_testkit::process::poll_until(
        Duration::from_secs(secs),
        Duration::from_millis(200),
        || async {
            let vms = vms(&admin).await;
            let ops = operations(&admin).await;
            let running = vms.values().filter(|v| v.2 == "running").count();
            if running == vms.len() && unfinished(&ops) == 0 {
                Ok(())
            } else {
                Err((running, vms.len(), unfinished(&ops)))
            }
        },
    )
    .await
    .unwrap_or_else(|(r, n, u)| panic!("{r} of {n} VMs running, {u} operations unfinished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_server_that_finishes_the_work() {
    let settings = settings();
    let src = server(&settings);
    let mut tokens = vec![];
    for user in USERS {
        tokens.push(src.user(user).await);
    }
    // 100 creates, one VM each, sent while the backup runs.
    let load: Vec<_> = USERS
        .iter()
        .zip(&tokens)
        .map(|(user, token)| {
            let c = src.with_token(token);
            let user = user.to_string();
            tokio::spawn(async move {
                for i in 0..PER_USER {
                    let body = json!({"name": format!("{user}{i}"), "spec": "tiny"});
                    let r = c.post("/api/v1/vms", &body).await.unwrap();
                    assert_eq!(r.status, 202, "{:?}", r.body);
                }
            })
        })
        .collect();
    let admin = src.root();
    basphere_testkit::process::poll_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            let vms = vms(&admin).await;
            let running = vms.values().filter(|v| v.2 == "running").count();
            if vms.len() >= 20 && running > 0 {
                Ok(())
            } else {
                Err(vms.len())
            }
        },
    )
    .await
    .expect("creates admitted, the first ones done");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("basphere.backup");
    let file_arg = file.display().to_string();
    let backup = {
        let args = ["backup", file_arg.as_str(), "--output", "json"];
        ok(src.operator(&args))
    };
    for l in load {
        l.await.unwrap();
    }
    eprintln!("backup: {backup}");
    let at_backup = backup["tables"]["vms"].as_u64().unwrap() as usize;
    assert!(
        (1..=USERS.len() * PER_USER).contains(&at_backup),
        "{backup}"
    );
    assert!(
        backup["unfinished_workflows"].as_u64().unwrap() > 0,
        "the backup was taken while creates ran: {backup}"
    );
    assert_eq!(
        backup["tables"]["workflows"].as_u64().unwrap() as usize,
        at_backup,
        "one create workflow per VM admitted: {backup}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the backup is private: {mode:o}");
    // A second backup never overwrites the first.
    refused(src.operator(&["backup", &file_arg]), &["already exists"]);

    settled(&src, 120).await;
    let source = vms(&src.root()).await;
    assert_eq!(source.len(), USERS.len() * PER_USER);

    // Restore into a new install.
    let mut dst = Server::new(BIN, &settings);
    let restored = ok(dst.operator(&["restore", &file_arg, "--output", "json"]));
    assert_eq!(restored["tables"], backup["tables"], "{restored}");
    assert_eq!(
        restored["unfinished_workflows"], backup["unfinished_workflows"],
        "{restored}"
    );
    dst.spawn_first();
    settled(&dst, 120).await;
    let admin = dst.root();
    let after = vms(&admin).await;
    assert_eq!(after.len(), at_backup, "the VMs admitted at the snapshot");
    let mut ips = BTreeSet::new();
    for (name, (owner, ip, _)) in &after {
        let (src_owner, src_ip, _) = source.get(name).expect("a VM of the source");
        assert_eq!(
            (owner, ip),
            (src_owner, src_ip),
            "{name} as the source had it"
        );
        assert!(ips.insert(ip.clone()), "{ip} leased twice");
    }
    let ops = operations(&admin).await;
    assert_eq!(ops.len(), at_backup, "no workflow without its VM");
    let vm_ids: BTreeSet<String> = get_data(&admin, "/api/v1/vms?all=true&limit=1000").await["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    for o in &ops {
        assert_eq!(o["status"], "succeeded", "{o}");
        assert!(vm_ids.contains(o["vm_id"].as_str().unwrap()), "{o}");
    }
    for (user, token) in USERS.iter().zip(&tokens) {
        let mine = after.values().filter(|v| v.0 == *user).count() as u64;
        let usage = quota_usage(&dst.with_token(token)).await;
        assert_eq!(usage, (mine, mine), "{user}'s usage counts their VMs");
    }

    // A second restore into the now populated install is refused and changes nothing.
    refused(
        dst.operator(&["restore", &file_arg]),
        &["not empty", "exists"],
    );
    assert_eq!(vms(&admin).await, after);
    drop(dst);

    // A truncated backup and a foreign file are refused before anything is written: a good
    // restore into the same target works afterwards.
    let target = Server::new(BIN, &settings);
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = refused(
        target.operator(&["restore", &cut.display().to_string()]),
        &["truncated", "damaged", "not a whole"],
    );
    eprintln!("a truncated backup: {err}");
    let junk = dir.path().join("junk.backup");
    std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
    refused(
        target.operator(&["restore", &junk.display().to_string()]),
        &["not an SQLite database", "not a whole"],
    );
    assert!(
        !target.data_dir().exists() || target.data_dir().read_dir().unwrap().next().is_none(),
        "a refused restore leaves no data dir behind"
    );
    let again = ok(target.operator(&["restore", &file_arg, "--output", "json"]));
    assert_eq!(again["tables"], backup["tables"]);
}
