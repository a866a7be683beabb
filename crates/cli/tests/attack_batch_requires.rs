//! A manifest listing a requirement twice used to make `POST /batches` fail with a 500 (a second
//! dependency row for the same pair); the plan now counts it once (issue 9, L5).
mod common;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_requires_are_one_edge_not_a_server_error() {
    let s = server(&[]);
    let token = s.user("dupes").await;
    let c = s.with_token(&token);
    let manifest = r#"
[defaults]
spec = "tiny"
[vms.db]
[vms.app]
requires = ["db", "db", "db"]
optional = ["db"]
[vms.web]
requires = ["app", "db", "app"]
optional = ["app", "app"]
conflicts = ["legacy", "legacy"]
"#;
    let body = json!({"manifest": manifest, "format": "toml"});
    let r = c.post("/api/v1/batches/plan", &body).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let creates = r.body.data["plan"]["create"].as_array().unwrap();
    let app = creates.iter().find(|n| n["name"] == "app").unwrap();
    assert_eq!(app["requires"], json!(["db"]), "{app}");
    assert_eq!(app["optional"], json!([]), "{app}");
    let web = creates.iter().find(|n| n["name"] == "web").unwrap();
    assert_eq!(web["requires"], json!(["app", "db"]), "{web}");

    let r = c.post("/api/v1/batches", &body).await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    for n in ["db", "app", "web"] {
        wait_vm(&c, n, 20, "running").await;
    }

    // Requiring an existing VM twice (and optionally) in a second apply: still one edge.
    let again = r#"
[defaults]
spec = "tiny"
[vms.db]
[vms.app]
[vms.web]
[vms.cache]
requires = ["db", "db"]
optional = ["db"]
"#;
    let r = c
        .post(
            "/api/v1/batches",
            &json!({"manifest": again, "format": "toml"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    wait_vm(&c, "cache", 20, "running").await;
}
