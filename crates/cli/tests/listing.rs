//! VM listings in owner/name order: `GET /vms?sort=name` pages on the `(owner, name)` key
//! (`after` is `OWNER/NAME`, named by `X-Next-After`), and `list-vms -j` passes those pages
//! through as one JSON array, every VM once, in that order; a bad `sort` or `after` is a 400.
mod common;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_list_by_owner_and_name_across_pages() {
    let s = server(&[]);
    for (user, names) in [("lzoe", ["b", "a", "c"]), ("lamy", ["y", "x", "z"])] {
        let c = s.with_token(&s.user(user).await);
        for n in names {
            let r = c
                .post("/api/v1/vms", &json!({"name": n, "spec": "tiny"}))
                .await
                .unwrap();
            assert_eq!(r.status, 202, "{:?}", r.body);
        }
    }
    let want = ["lamy/x", "lamy/y", "lamy/z", "lzoe/a", "lzoe/b", "lzoe/c"];
    // Pages of 4 by the API: the second page starts after the first's last VM.
    let admin = s.root();
    let (status, headers, body) = admin
        .send_raw(
            basphere_client::Method::GET,
            "/api/v1/vms?all=true&sort=name&limit=4",
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    let next = headers["x-next-after"].to_str().unwrap().to_string();
    assert_eq!(next, "lzoe/a");
    let first: Value = serde_json::from_slice(&body).unwrap();
    let second = get_data(
        &admin,
        &format!("/api/v1/vms?all=true&sort=name&limit=4&after={next}"),
    )
    .await;
    let key = |v: &Value| {
        format!(
            "{}/{}",
            v["owner"].as_str().unwrap(),
            v["name"].as_str().unwrap()
        )
    };
    let got: Vec<String> = first["data"]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["vms"].as_array().unwrap())
        .map(key)
        .collect();
    assert_eq!(got, want);

    // The CLI: one JSON array, in that order, whatever the page size.
    let out = s.cli_ok(&["vm", "list", "-a", "-j"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<String> = all.as_array().unwrap().iter().map(key).collect();
    assert_eq!(got, want);
    assert_eq!(all[0]["spec"], "tiny", "whole VMs, as the API shows them");
    let out = s.cli_ok(&["--output", "json", "vm", "list"]);
    let mine: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(mine, json!([]), "root's own VMs: none");

    for bad in [
        "/api/v1/vms?all=true&sort=size",
        "/api/v1/vms?all=true&sort=name&after=nosep",
    ] {
        let r = admin.get(bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert!(!r.body.success);
    }
}
