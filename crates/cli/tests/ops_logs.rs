//! Structured logs and request ids: `BASPHERE_LOG_FORMAT=json` makes every log line one JSON
//! object carrying the request's id, route and user; every answer echoes `X-Request-Id`.
mod common;
use common::*;
use serde_json::Value;

async fn get_with_id(addr: &str, path: &str, id: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra = id.map_or(String::new(), |i| format!("X-Request-Id: {i}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let echoed = buf
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-request-id")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no X-Request-Id in {buf}"));
    (status, echoed)
}

fn json_lines(s: &Server) -> Vec<Value> {
    std::fs::read_to_string(s.log_path())
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_request_id_route_and_user() {
    let s = server(&[("BASPHERE_LOG_FORMAT", "json")]);
    s.register("opslog").await;
    let (status, echoed) = get_with_id(&s.addr, "/api/v1/vms/web", Some("ops-req-1")).await;
    assert_eq!((status, echoed.as_str()), (401, "ops-req-1"));
    // An id that could forge log content is replaced by a new one.
    let (_, fresh) = get_with_id(&s.addr, "/health", Some("x\"y")).await;
    assert_ne!(fresh, "x\"y");
    assert_eq!(uuid_version(&fresh), Some(7), "{fresh}");
    let (_, none) = get_with_id(&s.addr, "/health", None).await;
    assert_eq!(uuid_version(&none), Some(7));
    // On the socket the kernel names the user: the span records it.
    let me = s.root().get("/api/v1/me").await.unwrap();
    assert_eq!(me.status, 200);

    let lines = basphere_testkit::poll_until(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(50),
        || async {
            let l = json_lines(&s);
            let ok = l.iter().any(|v| v["request_id"] == "ops-req-1")
                && l.iter()
                    .any(|v| v["route"] == "/api/v1/me" && v["user"] == "admin");
            if ok { Ok(l) } else { Err(l) }
        },
    )
    .await
    .unwrap_or_else(|l| panic!("request lines missing: {l:#?}"));
    for v in &lines {
        for key in ["ts", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} in {v}");
        }
    }
    let req = lines
        .iter()
        .find(|v| v["request_id"] == "ops-req-1")
        .unwrap();
    assert_eq!(
        req["route"], "/api/v1/vms/{name}",
        "the template, not the path: {req}"
    );
    assert_eq!(req["status"], 401);
    assert_eq!(req["user"], "anonymous");
    assert!(
        lines.iter().any(|v| v["message"] == "basphere serving"),
        "the server's own lines too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_the_default() {
    let s = server(&[]);
    let (status, id) = get_with_id(&s.addr, "/health", Some("ops-text-1")).await;
    assert_eq!((status, id.as_str()), (200, "ops-text-1"));
    let log = basphere_testkit::poll_until(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(50),
        || async {
            let t = std::fs::read_to_string(s.log_path()).unwrap();
            if t.contains("ops-text-1") {
                Ok(t)
            } else {
                Err(t)
            }
        },
    )
    .await
    .unwrap();
    assert!(json_lines(&s).is_empty(), "{log}");
    assert!(log.contains("request_id=ops-text-1"), "{log}");
}

fn uuid_version(s: &str) -> Option<u32> {
    let parts: Vec<&str> = s.split('-').collect();
    (parts.len() == 5 && parts[2].len() == 4).then(|| parts[2][..1].parse().ok())?
}
