//! `basphere db copy`: an embedded install with 1,000 VMs, users, tokens and audit is copied
//! into an empty PostgreSQL; a server on PostgreSQL then gives the same answers, and the
//! tokens minted on SQLite keep working. A copy refuses a running server and a non-empty
//! target.
mod common;
use basphere_testkit::postgres::Postgres;
use basphere_testkit::server::test_backend_is_postgres;
use common::*;
use serde_json::{Value, json};

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What the server answers about everything the copy must keep.
async fn answers(s: &Server, tokens: &[(String, String)]) -> Vec<Value> {
    let admin = s.root();
    let mut out = vec![];
    for path in [
        "/api/v1/vms?all=true&limit=1000",
        "/api/v1/users",
        "/api/v1/audit?limit=1000",
        "/api/v1/operations?all=true&limit=20",
    ] {
        let r = admin.get(path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        out.push(r.body.data);
    }
    for (user, token) in tokens {
        let r = s.with_token(token).get("/api/v1/me").await.unwrap();
        assert_eq!(r.status, 200, "{user}'s token: {:?}", r.body);
        out.push(r.body.data);
        out.push(get_data(&s.with_token(token), "/api/v1/quota").await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_install_moves_to_postgres_with_nothing_lost() {
    if test_backend_is_postgres() {
        eprintln!("the source of this copy is SQLite: it runs in the SQLite pass");
        return;
    }
    let settings = [
        ("BASPHERE_NETWORK__CIDR", "10.96.0.0/14"),
        ("BASPHERE_NETWORK__GATEWAY", "10.96.0.1"),
        ("BASPHERE_NETWORK__BLOCK_SIZE", "1024"),
        ("BASPHERE_QUOTA__MAX_VMS", "500"),
        ("BASPHERE_QUOTA__MAX_IPS", "500"),
    ];
    let mut s = server(&settings);
    let mut tokens = vec![];
    for user in ["alice", "bob"] {
        tokens.push((user.to_string(), s.user(user).await));
    }
    s.register("carol").await;
    // 1,000 VMs: 500 each, 10 per request.
    for (user, token) in &tokens {
        let c = s.with_token(token);
        for batch in 0..50 {
            let r = c
                .post(
                    "/api/v1/vms",
                    &json!({"name": format!("{user}{batch}"), "count": 10, "spec": "tiny"}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 202, "{:?}", r.body);
        }
    }
    let admin = s.root();
    basphere_testkit::process::poll_until(
        std::time::Duration::from_secs(120),
        std::time::Duration::from_millis(200),
        || async {
            let vms = get_data(&admin, "/api/v1/vms?all=true&limit=1000").await;
            let n = vms["vms"].as_array().map_or(0, |v| {
                v.iter().filter(|vm| vm["status"] == "running").count()
            });
            if n == 1000 { Ok(()) } else { Err(n) }
        },
    )
    .await
    .unwrap_or_else(|n| panic!("only {n} of 1,000 VMs running"));
    let before = answers(&s, &tokens).await;

    let pg = Postgres::start();
    let url = pg.create_database("moved");
    // Refused while the server runs: its writes would be lost.
    let out = s.operator(&["db", "copy", "--to", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the server is running"), "{err}");

    s.kill9();
    let out = ok(s.operator(&["db", "copy", "--to", &url, "--output", "json"]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["copied"]["vms"], 1000, "{report}");
    assert_eq!(report["copied"]["users"], 4, "{report}");
    // A second copy into the same (now populated) database is refused and changes nothing.
    let again = s.operator(&["db", "copy", "--to", &url]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The same server, now on PostgreSQL.
    s.env.push(("BASPHERE_DATABASE__URL".into(), url.clone()));
    s.spawn();
    let after = answers(&s, &tokens).await;
    assert_eq!(before, after, "the same answers from PostgreSQL");
    // And it goes on: a new VM gets the next free address, a new audit id.
    let c = s.with_token(&tokens[0].1);
    let r = c
        .post("/api/v1/vms", &json!({"name": "after", "spec": "tiny"}))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "alice is at her quota of 500: {:?}", r.body);
    let r = s
        .with_token(&tokens[1].1)
        .delete("/api/v1/vms/bob0-1")
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_gone(&s, &tokens[1].1, "bob0-1").await;
    drop(s);
    drop(pg);
}

async fn wait_gone(s: &Server, token: &str, name: &str) {
    let c = s.with_token(token);
    basphere_testkit::process::poll_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(100),
        || async {
            let r = c.get(&format!("/api/v1/vms/{name}")).await.unwrap();
            if r.status == 404 {
                Ok(())
            } else {
                Err(r.status)
            }
        },
    )
    .await
    .expect("the delete ran on PostgreSQL");
}
