//! VM listings in owner/name order: `GET /vms?sort=name` pages on the `(owner, name)` key
//! (`after` is `OWNER/NAME`, named by `X-Next-After`), and `list-vms -j` passes those pages
//! through as one JSON array, every VM once, in that order (read from the same listing as an
//! NDJSON stream); a bad `sort` or `after` is a 400.
mod common;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_list_by_owner_and_name_across_pages() {
    let s = server(&[]);
    let mut clients = std::collections::HashMap::new();
    for (user, names) in [("lzoe", ["b", "a", "c"]), ("lamy", ["y", "x", "z"])] {
        let c = s.with_token(&s.user(user).await);
        clients.insert(user, c.clone());
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
    // The table: the same order, a row per VM under its header.
    let out = s.cli_ok(&["vm", "list", "-a"]);
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<String> = table
        .lines()
        .filter(|l| l.starts_with('│') && !l.contains("NAME"))
        .map(|l| {
            let cols: Vec<&str> = l.split(['│', '┆']).map(str::trim).collect();
            format!("{}/{}", cols[2], cols[1])
        })
        .collect();
    assert_eq!(rows, want, "{table}");
    let out = s.cli_ok(&["--output", "json", "vm", "list"]);
    let mine: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(mine, json!([]), "root's own VMs: none");

    // The NDJSON stream the CLI reads: every VM, one per line, as the pages show them.
    let ndjson = |c: basphere_client::Client, path: &'static str| async move {
        let mut r = c.open(path, "application/x-ndjson").await.unwrap();
        let status = r.status.as_u16();
        let kind = r.headers["content-type"].to_str().unwrap().to_string();
        let mut body = vec![];
        while let Some(chunk) = r.chunk().await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        (status, kind, String::from_utf8(body).unwrap())
    };
    let (status, kind, body) = ndjson(admin.clone(), "/api/v1/vms?all=true&sort=name").await;
    assert_eq!((status, kind.as_str()), (200, "application/x-ndjson"));
    assert!(body.ends_with('\n'), "{body}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().map(key).collect::<Vec<_>>(), want);
    // The objects a page shows (the status aside: the engine may have moved on meanwhile).
    let (mut streamed, mut paged) = (lines[0].clone(), first["data"]["vms"][0].clone());
    for v in [&mut streamed, &mut paged] {
        v.as_object_mut().unwrap().remove("status");
    }
    assert_eq!(streamed, paged, "the VMs a page shows");
    let (_, _, rest) = ndjson(admin.clone(), "/api/v1/vms?all=true&sort=name&after=lzoe/a").await;
    let rest: Vec<String> = rest
        .lines()
        .map(|l| key(&serde_json::from_str(l).unwrap()))
        .collect();
    assert_eq!(rest, ["lzoe/b", "lzoe/c"]);
    // Its own VMs for a user; everyone's only for an admin; no limit on a stream.
    let zoe = clients["lzoe"].clone();
    let (_, _, own) = ndjson(zoe.clone(), "/api/v1/vms?sort=name").await;
    assert_eq!(own.lines().count(), 3, "{own}");
    assert!(
        own.lines().all(|l| l.contains(r#""owner":"lzoe""#)),
        "{own}"
    );
    let (status, _, body) = ndjson(zoe, "/api/v1/vms?all=true").await;
    assert_eq!(status, 403, "{body}");
    let (status, kind, body) = ndjson(admin.clone(), "/api/v1/vms?all=true&limit=2").await;
    assert_eq!((status, kind.as_str()), (400, "application/json"), "{body}");
    assert!(body.contains("drop limit"), "{body}");
    let (status, _, body) = ndjson(admin.clone(), "/api/v1/vms?all=true&sort=name&after=x").await;
    assert_eq!(status, 400, "{body}");

    for bad in [
        "/api/v1/vms?all=true&sort=size",
        "/api/v1/vms?all=true&sort=name&after=nosep",
    ] {
        let r = admin.get(bad).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert!(!r.body.success);
    }
}
