//! The `/api/v1` contract of the prototype (`garlicKim21/project-basphere`, its
//! `basphere-api/internal/{handler,model}`), checked against a real server process: status
//! codes, the envelope `{success, message, data, errors}` on every answer, and each field of
//! each route's `data` (ours may sit beside the prototype's, never instead of them). Written
//! from the prototype's handler tests (`TestAPIRegister_*`, `TestAPIListPending`,
//! `TestAPIGetPending_*`, `TestAPIApprove_*`, `TestAPIReject_Success`,
//! `TestValidateEmailDomain`, the VM handlers) and models (`RegistrationRequest`,
//! `KeyChangeRequest`, `VM`, `VMListResponse`, `Quota`, `CreateVMResponse`).
//!
//! Also the registration guards: allowed email domains and reCAPTCHA v2, on the JSON routes
//! and the web forms alike, with a stand-in for Google's verify endpoint on 127.0.0.1.

mod common;
mod contract_areas;
mod raw;

use raw::{FORM, csrf_of, enc};

use common::{KEY, Server, server, wait_vm};
use raw::Resp;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- helpers -----------------------------------------------------------------------------

/// A JSON request from 127.0.0.1 (or `from`), with a bearer token when given.
async fn call(
    s: &Server,
    from: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    raw::send(from, &s.addr, method, path, &headers, &bytes).await
}

async fn anon_post(s: &Server, path: &str, body: &Value) -> Resp {
    call(s, "127.0.0.1", "POST", path, None, Some(body)).await
}

/// The envelope of an answer, checked for its shape: `success` as expected for the status,
/// a message, `errors` an array (with at least one entry on a refusal).
fn envelope(r: &Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json();
    assert_eq!(v["success"], status < 400, "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert!(v["errors"].is_array(), "{v}");
    if status >= 400 {
        assert!(!v["errors"].as_array().unwrap().is_empty(), "{v}");
    }
    v
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Asserts `v` has every key of `want`.
fn has_all(v: &Value, want: &[&str]) {
    let k = keys(v);
    for w in want {
        assert!(k.contains(*w), "{w} missing from {v}");
    }
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

fn is_request_id(v: &Value, prefix: &str) -> bool {
    v.as_str().is_some_and(|s| {
        s.strip_prefix(prefix).is_some_and(|h| {
            h.len() >= 8
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
    })
}

/// The prototype's `RegistrationRequest` fields of a pending request (team given).
const REQUEST_FIELDS: &[&str] = &[
    "id",
    "username",
    "email",
    "team",
    "public_key",
    "status",
    "created_at",
    "updated_at",
];

/// A fresh ed25519 public key (one line).
fn fresh_key(name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    basphere_testkit::keys::keygen(dir.path(), name).1
}

fn registration(user: &str) -> Value {
    json!({"username": user, "email": format!("{user}@example.org"), "team": "platform", "public_key": KEY})
}

/// Opens the portal form at `path` as a new visitor and posts `fields` to it; the answer.
async fn post_form(s: &Server, path: &str, fields: &[(&str, &str)]) -> Resp {
    let page = raw::send("127.0.0.1", &s.addr, "GET", path, &[], b"").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let pre = page.cookie("bsp_pre").expect("pre-session cookie");
    let mut body = format!("csrf={}", csrf_of(&page.body));
    for (k, v) in fields {
        body.push_str(&format!("&{}={}", enc(k), enc(v)));
    }
    let cookie = format!("bsp_pre={pre}");
    raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        path,
        &[("Content-Type", FORM), ("Cookie", &cookie)],
        body.as_bytes(),
    )
    .await
}

/// Whether the admin finds a registration of `u`.
async fn registered(s: &Server, u: &str) -> bool {
    let r = s.root().get(&format!("/api/v1/pending/{u}")).await.unwrap();
    r.status == 200
}

// ---- the stand-in for reCAPTCHA's verify endpoint -----------------------------------------

/// A stand-in for Google's reCAPTCHA `siteverify`, on 127.0.0.1 (never the real one): it
/// answers `{"success": true}` only to the answer [`PASS`] sent with the secret
/// [`STAND_IN_SECRET`], `{"success": false}` to anything else, and records every form it got.
struct VerifyStandIn {
    url: String,
    forms: Forms,
    task: tokio::task::JoinHandle<()>,
}

/// Every form the stand-in got, as `(name, value)` pairs.
type Forms = Arc<Mutex<Vec<Vec<(String, String)>>>>;

const STAND_IN_SECRET: &str = "stand-in secret/+=";
const STAND_IN_SITE_KEY: &str = "stand-in-site-key";
const PASS: &str = "stand-in-pass";

fn form_decode(s: &str) -> String {
    let b = s.replace('+', " ").into_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

impl VerifyStandIn {
    async fn start() -> VerifyStandIn {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/recaptcha/api/siteverify",
            l.local_addr().unwrap()
        );
        let forms: Forms = Arc::default();
        let seen = forms.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = l.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![];
                    let mut chunk = [0u8; 4096];
                    let (head_end, len) = loop {
                        let n = c.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (at + 4, len);
                        }
                    };
                    while buf.len() < head_end + len {
                        let n = c.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
                    let form: Vec<(String, String)> = body
                        .split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (form_decode(k), form_decode(v)))
                        .collect();
                    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                    let ok =
                        get("secret") == Some(STAND_IN_SECRET) && get("response") == Some(PASS);
                    let answer = if ok {
                        r#"{"success": true, "hostname": "stand-in"}"#.to_string()
                    } else {
                        r#"{"success": false, "error-codes": ["invalid-input-response"]}"#
                            .to_string()
                    };
                    seen.lock().unwrap().push(form);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = c.write_all(resp.as_bytes()).await;
                    let _ = c.shutdown().await;
                });
            }
        });
        VerifyStandIn { url, forms, task }
    }

    fn calls(&self) -> usize {
        self.forms.lock().unwrap().len()
    }

    /// The `(secret, response)` of the last call.
    fn last(&self) -> (String, String) {
        let f = self.forms.lock().unwrap();
        let last = f.last().expect("the stand-in was called");
        let get = |k: &str| {
            last.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        (get("secret"), get("response"))
    }
}

impl Drop for VerifyStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- the envelope on every answer ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_and_every_error_carries_the_envelope() {
    let s = server(&[("BASPHERE_LIMITS__ANON_BURST", "2")]);
    let token = s.user("envy").await;
    let t = Some(token.as_str());

    // TestHealthCheck: 200, success.
    let v = envelope(
        &call(&s, "127.0.0.1", "GET", "/health", None, None).await,
        200,
    );
    assert_eq!(v["message"], "OK");

    // 404: an unknown route, inside and outside /api/v1.
    for path in ["/api/v1/nothing-here", "/no/such/page"] {
        let v = envelope(&call(&s, "127.0.0.1", "GET", path, t, None).await, 404);
        assert_eq!(v["success"], false, "{path}");
    }
    // 405: a method the route does not take, with Allow.
    let r = call(&s, "127.0.0.1", "PUT", "/api/v1/vms", t, Some(&json!({}))).await;
    envelope(&r, 405);
    assert!(r.header("allow").is_some(), "{:?}", r.headers);
    // 413: a body over the limit.
    let big = json!({"name": "x", "pad": "y".repeat(70 * 1024)});
    envelope(
        &call(&s, "127.0.0.1", "POST", "/api/v1/vms", t, Some(&big)).await,
        413,
    );
    // 400 "Invalid JSON" (TestAPIRegister_InvalidJSON), and a body that is no object.
    for body in [&b"invalid json"[..], b"[1, 2]"] {
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "POST",
            "/api/v1/vms",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &format!("Bearer {token}")),
            ],
            body,
        )
        .await;
        let v = envelope(&r, 400);
        assert_eq!(v["message"], "Invalid JSON", "{v}");
    }
    // 400 "Validation failed": one entry per bad field, each naming its field.
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/vms",
        t,
        Some(&json!({"name": "Bad_Name", "spec": "nope", "os": "nope", "count": 99})),
    )
    .await;
    let v = envelope(&r, 400);
    assert_eq!(v["message"], "Validation failed");
    let errs: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errs.len(), 4, "{errs:?}");
    for f in ["name", "spec", "os", "count"] {
        assert!(errs.iter().any(|e| e.starts_with(f)), "{f}: {errs:?}");
    }
    // axum's own rejections: a query that does not parse, a path with a bad percent-escape.
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms?all=maybe", t, None).await,
        400,
    );
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms?limit=many", t, None).await,
        400,
    );
    // 401, 403, 415.
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms", None, None).await,
        401,
    );
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/pending", t, None).await,
        403,
    );
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/api/v1/vms",
        &[
            ("Content-Type", "text/plain"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        b"{}",
    )
    .await;
    envelope(&r, 415);

    // 429: registration and key change without a key share the per-client budget (2 here).
    for (from, path, body) in [
        ("127.0.0.21", "/api/v1/register", registration("ratey")),
        (
            "127.0.0.22",
            "/api/v1/key-change",
            json!({"username": "envy", "email": "x@example.org", "new_public_key": KEY}),
        ),
    ] {
        let mut codes = vec![];
        for _ in 0..3 {
            let r = call(&s, from, "POST", path, None, Some(&body)).await;
            codes.push(r.status);
            if r.status == 429 {
                envelope(&r, 429);
                assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
            }
        }
        assert_eq!(codes[2], 429, "{path}: {codes:?}");
    }
}

// ---- registration -------------------------------------------------------------------------
