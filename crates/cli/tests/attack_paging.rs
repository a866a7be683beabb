//! A flood of rows must not make a list route answer with all of them (issue 9, M6 paging):
//! every list route pages with `?limit=&after=` (default 100, at most 1000), `after` being the
//! last id of the previous page and `X-Next-After` naming it while more follow.
mod common;
use common::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A GET over the Unix socket as root (an admin); returns status, headers (lowercased) and body.
fn raw_get(s: &Server, path: &str) -> (u16, String, Value) {
    let mut sock = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![];
    sock.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn next_after(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix("x-next-after: "))
        .map(|v| v.trim().to_string())
}

/// Writes `n` pending users with their registrations, and `n` audit records, straight into the
/// server's database (as a flood that got past any rate limit would have left them).
fn flood(s: &Server, n: usize) {
    let db = rusqlite::Connection::open(s.data_dir().join("basphere.db")).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n})
         INSERT INTO users (username, email, team, public_key, role, status, max_vms,
             max_clusters, max_ips, created_at, updated_at)
         SELECT printf('flood%05d', i), 'f@example.org', 'qa', '{KEY}', 'user', 'pending',
             1, 0, 1, i, i FROM k;
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n})
         INSERT INTO registrations (username, email, team, public_key, status, created_at)
         SELECT printf('flood%05d', i), 'f@example.org', 'qa', '{KEY}', 'pending', i FROM k;
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n})
         INSERT INTO audit (at, actor, source, action, target, result)
         SELECT i, 'anonymous', 'tcp:127.0.0.1', 'user.register', printf('flood%05d', i),
             'accepted' FROM k;
         COMMIT;"
    ))
    .unwrap();
}

/// Walks every page of `path` (its items' key `key`), checking each page's size and header.
fn walk(s: &Server, path: &str, key: &str, limit: usize) -> Vec<String> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut seen = vec![];
    let mut after = String::new();
    loop {
        let (st, head, body) = raw_get(s, &format!("{path}{sep}limit={limit}{after}"));
        assert_eq!(st, 200, "{body}");
        // `GET /vms` answers `{vms, total, quota}`; the other lists an array.
        let items = body["data"]
            .as_array()
            .or_else(|| body["data"]["vms"].as_array())
            .unwrap();
        assert!(items.len() <= limit, "{path}: {} > {limit}", items.len());
        let keys: Vec<String> = items
            .iter()
            .map(|i| match &i[key] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect();
        seen.extend(keys.iter().cloned());
        match next_after(&head) {
            Some(n) => {
                assert_eq!(items.len(), limit, "a short page names no next one");
                assert_eq!(Some(&n), keys.last(), "the cursor is the last id");
                after = format!("&after={n}");
            }
            None => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pending_registrations_is_answered_one_page_at_a_time() {
    if basphere_testkit::server::test_backend_is_postgres() {
        eprintln!("this test is about the embedded SQLite file; it runs in the SQLite pass");
        return;
    }
    let s = server(&[]);
    flood(&s, 5000);

    // The attack's target: an admin listing what is pending.
    let t0 = Instant::now();
    let (st, head, body) = raw_get(&s, "/api/v1/pending");
    let took = t0.elapsed();
    eprintln!("GET /api/v1/pending with 5000 pending: {took:?}");
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 100, "default page");
    assert!(
        took < Duration::from_millis(500),
        "GET /pending took {took:?}"
    );
    assert!(next_after(&head).is_some(), "{head}");
    let (_, _, body) = raw_get(&s, "/api/v1/pending?limit=1000");
    assert_eq!(body["data"].as_array().unwrap().len(), 1000, "the max page");
    for bad in ["limit=0", "limit=1001", "limit=5000", "after=abc"] {
        let (st, _, body) = raw_get(&s, &format!("/api/v1/pending?{bad}"));
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("after"),
            "{body}"
        );
    }

    // Following the cursor yields every row exactly once, newest first.
    let ids = walk(&s, "/api/v1/pending", "id", 1000);
    assert_eq!(ids.len(), 5000);
    let nums: Vec<i64> = ids
        .iter()
        .map(|i| i64::from_str_radix(i.strip_prefix("req-").unwrap(), 16).unwrap())
        .collect();
    assert!(
        nums.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );

    let users = walk(&s, "/api/v1/users?status=pending", "username", 777);
    assert_eq!(users.len(), 5000);
    assert!(users.windows(2).all(|w| w[0] < w[1]), "by username");
    let audit = walk(&s, "/api/v1/audit?action=user.register", "id", 1000);
    assert_eq!(audit.len(), 5000);

    // The CLI follows the pages.
    let o = s.cli_ok(&["--output", "json", "admin", "user", "pending"]);
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d.as_array().map(Vec::len), Some(5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_list_route_pages() {
    let s = server(&[]);
    let token = s.user("pager").await;
    let c = s.with_token(&token);
    for n in ["a", "b", "c"] {
        let r = c
            .post("/api/v1/vms", &json!({"name": n, "spec": "tiny"}))
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    for n in 0..2 {
        let r = c
            .post("/api/v1/tokens", &json!({"name": format!("t{n}")}))
            .await
            .unwrap();
        assert!(r.body.success, "{:?}", r.body);
    }
    let vms = walk(&s, "/api/v1/vms?all=true", "id", 2);
    assert_eq!(vms.len(), 3);
    let ops = walk(&s, "/api/v1/operations?all=true", "id", 2);
    assert_eq!(ops.len(), 3);
    assert!(ops.windows(2).all(|w| w[0] > w[1]), "newest first");
    let users = walk(&s, "/api/v1/users", "username", 1);
    assert!(users.contains(&"pager".to_string()), "{users:?}");
    let kc = walk(&s, "/api/v1/key-changes", "id", 1);
    assert!(kc.is_empty());
    // A user's own lists page the same way (over TCP with their token).
    let mut seen = vec![];
    let mut after = String::new();
    loop {
        let r = c
            .get(&format!("/api/v1/tokens?limit=1{after}"))
            .await
            .unwrap();
        let d = r.body.data.as_array().unwrap().clone();
        assert!(d.len() <= 1);
        let Some(last) = d.last() else { break };
        after = format!("&after={}", last["id"].as_str().unwrap());
        seen.push(last["id"].clone());
    }
    assert!(seen.len() >= 3, "enrollment token and two more: {seen:?}");
    let r = c.get("/api/v1/vms?limit=2").await.unwrap();
    assert_eq!(r.body.data["vms"].as_array().unwrap().len(), 2);
    assert_eq!(r.body.data["total"], 2);
    let r = c.get("/api/v1/vms?limit=100000").await.unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);
}
