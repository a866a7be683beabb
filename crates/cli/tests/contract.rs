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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_requests_answer_as_the_prototype() {
    let s = server(&[]);

    // TestAPIRegister_Success: 200, the request as data.
    let r = anon_post(&s, "/api/v1/register", &registration("testuser")).await;
    let v = envelope(&r, 200);
    let d = &v["data"];
    assert_eq!(
        keys(d),
        REQUEST_FIELDS.iter().map(|s| s.to_string()).collect(),
        "exactly the prototype's fields while pending: {d}"
    );
    assert!(is_request_id(&d["id"], "req-"), "{d}");
    assert_eq!(d["username"], "testuser");
    assert_eq!(d["email"], "testuser@example.org");
    assert_eq!(d["team"], "platform");
    assert_eq!(d["public_key"], KEY);
    assert_eq!(d["status"], "pending");
    assert!(
        is_rfc3339(&d["created_at"]) && is_rfc3339(&d["updated_at"]),
        "{d}"
    );
    assert_eq!(d["updated_at"], d["created_at"]);
    let first_id = d["id"].clone();

    // Team is optional (omitted from the answer, as the prototype's `omitempty`), and a key
    // pasted with Windows line endings is accepted with the CR dropped.
    let crlf = format!("{KEY}\r\n");
    let r = anon_post(
        &s,
        "/api/v1/register",
        &json!({"username": "noteam", "email": "noteam@example.org", "public_key": crlf}),
    )
    .await;
    let d = envelope(&r, 200)["data"].clone();
    assert!(!keys(&d).contains("team"), "{d}");
    assert_eq!(d["public_key"], KEY, "CR stripped");
    assert_ne!(d["id"], first_id, "ids are distinct");

    // TestAPIRegister_ValidationError: 400 "Validation failed", each entry names its field.
    let cases = [
        (
            json!({"username": "", "email": "a@example.org", "public_key": KEY}),
            "username",
        ),
        (
            json!({"username": "Invalid_User", "email": "a@example.org", "public_key": KEY}),
            "username",
        ),
        (
            json!({"username": "gooduser", "email": "invalid-email", "public_key": KEY}),
            "email",
        ),
        (
            json!({"username": "gooduser", "email": "a@example.org", "public_key": "not-a-valid-key"}),
            "public_key",
        ),
        (
            json!({"username": "gooduser", "email": "a@example.org"}),
            "public_key",
        ),
    ];
    for (body, field) in cases {
        let v = envelope(&anon_post(&s, "/api/v1/register", &body).await, 400);
        assert_eq!(v["message"], "Validation failed", "{body}");
        let errs = v["errors"].as_array().unwrap();
        assert_eq!(errs.len(), 1, "{body}: {errs:?}");
        assert!(errs[0].as_str().unwrap().starts_with(field), "{errs:?}");
    }
    let v = envelope(
        &anon_post(
            &s,
            "/api/v1/register",
            &json!({"username": "X", "email": "nope", "public_key": "x"}),
        )
        .await,
        400,
    );
    assert_eq!(
        v["errors"].as_array().unwrap().len(),
        3,
        "one per bad field: {v}"
    );
    // TestAPIRegister_InvalidJSON.
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/api/v1/register",
        &[("Content-Type", "application/json")],
        b"invalid json",
    )
    .await;
    assert_eq!(envelope(&r, 400)["message"], "Invalid JSON");

    // TestAPIRegister_DuplicateUsername: 409; a second pending request with the same email
    // under another name: 409; nothing more stored.
    let mut dup = registration("testuser");
    dup["email"] = json!("new@example.org");
    envelope(&anon_post(&s, "/api/v1/register", &dup).await, 409);
    let mut same_email = registration("otheruser");
    same_email["email"] = json!("TestUser@Example.org");
    envelope(&anon_post(&s, "/api/v1/register", &same_email).await, 409);
    assert!(!registered(&s, "otheruser").await);

    // TestAPIListPending: a list of requests, pending only.
    anon_post(&s, "/api/v1/register", &registration("user3")).await;
    let r = call(&s, "127.0.0.1", "GET", "/api/v1/pending", None, None).await;
    envelope(&r, 401);
    let token = &s.admin_token("contract").await;
    let adm = Some(token.as_str());
    let v = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/pending", adm, None).await,
        200,
    );
    let list = v["data"].as_array().expect("data is a list");
    let names: BTreeSet<&str> = list
        .iter()
        .map(|r| r["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["noteam", "testuser", "user3"].into_iter().collect());
    for item in list {
        has_all(
            item,
            &[
                "id",
                "username",
                "email",
                "public_key",
                "status",
                "created_at",
                "updated_at",
            ],
        );
        assert_eq!(item["status"], "pending");
    }

    // TestAPIGetPending_Found / _NotFound.
    let v = envelope(
        &call(
            &s,
            "127.0.0.1",
            "GET",
            "/api/v1/pending/testuser",
            adm,
            None,
        )
        .await,
        200,
    );
    assert_eq!(v["data"]["id"], first_id);
    assert_eq!(v["data"]["username"], "testuser");
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "GET",
            "/api/v1/pending/nonexistent",
            adm,
            None,
        )
        .await,
        404,
    );

    // TestAPIApprove_Success: 200, the updated request with processed_by and processed_at
    // (plus the account it made, ours).
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/users/testuser/approve",
        adm,
        Some(&json!({"processed_by": "admin"})),
    )
    .await;
    let d = envelope(&r, 200)["data"].clone();
    has_all(&d, REQUEST_FIELDS);
    has_all(
        &d,
        &[
            "processed_by",
            "processed_at",
            "user",
            "ip_block",
            "enrollment_code",
        ],
    );
    assert_eq!(d["id"], first_id);
    assert_eq!(d["status"], "approved");
    assert!(
        d["processed_by"].as_str().is_some_and(|p| !p.is_empty()),
        "{d}"
    );
    assert!(is_rfc3339(&d["processed_at"]), "{d}");
    assert_eq!(d["updated_at"], d["processed_at"]);
    assert_eq!(d["user"]["status"], "active");
    // TestAPIApprove_AlreadyProcessed: 400. TestAPIApprove_NotFound: 404.
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/users/testuser/approve",
            adm,
            None,
        )
        .await,
        400,
    );
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/users/nonexistent/approve",
            adm,
            None,
        )
        .await,
        404,
    );

    // TestAPIReject_Success: 200, the request rejected with its reason, stored.
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/users/user3/reject",
        adm,
        Some(&json!({"processed_by": "admin", "reason": "Invalid request"})),
    )
    .await;
    let d = envelope(&r, 200)["data"].clone();
    has_all(&d, REQUEST_FIELDS);
    assert_eq!(d["status"], "rejected");
    assert_eq!(d["reject_reason"], "Invalid request");
    assert!(is_rfc3339(&d["processed_at"]), "{d}");
    let stored = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/pending/user3", adm, None).await,
        200,
    )["data"]
        .clone();
    assert_eq!(stored["status"], "rejected");
    assert_eq!(stored["reject_reason"], "Invalid request");
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/users/user3/reject",
            adm,
            None,
        )
        .await,
        400,
    );

    // Decided requests leave the pending list; the approved one's email is free again.
    let v = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/pending", adm, None).await,
        200,
    );
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["noteam"]);
    // Paging by the request ids the list shows.
    let page = call(&s, "127.0.0.1", "GET", "/api/v1/pending?limit=1", adm, None).await;
    let next = page.header("x-next-after").map(str::to_string);
    assert!(
        next.is_none(),
        "one pending request fits one page: {next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_of_an_existing_system_account_is_a_conflict() {
    // Basphere manages Unix accounts here; `daemon` is a system account on every Debian.
    // Registering only looks the name up: nothing is created.
    let s = server(&[("BASPHERE_BASTION__MANAGE_ACCOUNTS", "true")]);
    let v = envelope(
        &anon_post(&s, "/api/v1/register", &registration("daemon")).await,
        409,
    );
    assert!(v["message"].as_str().unwrap().contains("daemon"), "{v}");
    assert!(!registered(&s, "daemon").await);
}

// ---- VMs and quota ------------------------------------------------------------------------

/// The prototype's `VM` fields (`extra_disks`, `extra_networks` are `omitempty` there).
const VM_FIELDS: &[&str] = &[
    "name",
    "vsphere_vm_name",
    "owner",
    "os",
    "login_user",
    "spec",
    "ip_address",
    "status",
    "created_at",
];

fn check_vm(vm: &Value, owner: &str) {
    has_all(vm, VM_FIELDS);
    has_all(vm, &["id", "vcpus", "memory_mib", "disk_gib", "provider"]);
    assert_eq!(vm["owner"], owner);
    assert!(vm["vsphere_vm_name"].is_string(), "{vm}");
    assert!(
        vm["ip_address"].is_string(),
        "a string, \"\" until known: {vm}"
    );
    assert!(is_rfc3339(&vm["created_at"]), "{vm}");
    for k in ["extra_disks", "extra_networks"] {
        assert!(vm.get(k).is_none_or(|d| d.is_array()), "{vm}");
    }
}

fn check_quota(q: &Value) {
    has_all(q, &["max_vms", "used_vms", "max_ips", "used_ips"]);
    for k in ["max_vms", "used_vms", "max_ips", "used_ips"] {
        assert!(q[k].is_u64(), "{k}: {q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_and_quota_answer_as_the_prototype() {
    let s = server(&[]);
    let token = s.user("vmuser").await;
    let t = Some(token.as_str());

    // GET /vms before any: {vms: [], total: 0, quota}.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms", t, None).await,
        200,
    )["data"]
        .clone();
    has_all(&d, &["vms", "total", "quota"]);
    assert_eq!(d["vms"], json!([]));
    assert_eq!(d["total"], 0);
    check_quota(&d["quota"]);
    assert_eq!(d["quota"]["used_vms"], 0);

    // POST /vms: 202 (creation runs on), {vms, created, failed, errors?} plus operations;
    // an omitted count is 1, and so is 0.
    let mut ops = vec![];
    for (name, count) in [("myvm", None), ("zero", Some(0))] {
        let mut body = json!({"name": name, "os": "debian-12", "spec": "tiny"});
        if let Some(c) = count {
            body["count"] = json!(c);
        }
        let r = call(&s, "127.0.0.1", "POST", "/api/v1/vms", t, Some(&body)).await;
        let d = envelope(&r, 202)["data"].clone();
        has_all(&d, &["vms", "created", "failed", "operations"]);
        assert_eq!(d["created"], 1, "{d}");
        assert_eq!(d["failed"], 0, "{d}");
        assert!(d.get("errors").is_none_or(|e| e == &json!([])), "{d}");
        let vms = d["vms"].as_array().unwrap();
        assert_eq!(vms.len(), 1);
        check_vm(&vms[0], "vmuser");
        assert_eq!(vms[0]["name"], name);
        assert_eq!(vms[0]["os"], "debian-12");
        assert_eq!(vms[0]["spec"], "tiny");
        assert_eq!(vms[0]["status"], "creating");
        assert_eq!(vms[0]["operation_id"], d["operations"][0]);
        ops.push(d["operations"][0].as_str().unwrap().to_string());
    }
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/vms",
        t,
        Some(&json!({"name": "pair", "spec": "tiny", "count": 2})),
    )
    .await;
    let d = envelope(&r, 202)["data"].clone();
    assert_eq!(d["created"], 2);
    assert_eq!(d["operations"].as_array().unwrap().len(), 2);

    let c = s.with_token(&token);
    let running = wait_vm(&c, "myvm", 30, "running").await;
    assert!(
        running["ip_address"]
            .as_str()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .is_ok(),
        "{running}"
    );

    // GET /vms: every VM, total, the quota in use.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms", t, None).await,
        200,
    )["data"]
        .clone();
    let vms = d["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 4);
    assert_eq!(d["total"], 4);
    for vm in vms {
        check_vm(vm, "vmuser");
    }
    check_quota(&d["quota"]);
    assert_eq!(d["quota"]["used_vms"], 4);
    assert_eq!(d["quota"]["used_ips"], 4);

    // GET /vms/{name}: the VM; unknown: 404.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms/myvm", t, None).await,
        200,
    )["data"]
        .clone();
    check_vm(&d, "vmuser");
    assert_eq!(d["name"], "myvm");
    assert_eq!(d["status"], "running");
    assert_eq!(d["login_user"], running["login_user"]);
    envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/vms/nothere", t, None).await,
        404,
    );

    // GET /quota: the prototype's four figures, plus ours.
    let d = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/quota", t, None).await,
        200,
    )["data"]
        .clone();
    check_quota(&d);
    assert_eq!(d["used_vms"], 4);
    assert_eq!(d["used_ips"], 4);
    has_all(
        &d,
        &[
            "max_clusters",
            "used_vcpus",
            "used_memory_mib",
            "username",
            "quota",
            "usage",
        ],
    );
    assert_eq!(d["max_vms"], d["quota"]["max_vms"]);

    // DELETE /vms/{name}: 202, the VM (deleting) with its operation; then it is gone.
    let r = call(&s, "127.0.0.1", "DELETE", "/api/v1/vms/myvm", t, None).await;
    let d = envelope(&r, 202)["data"].clone();
    check_vm(&d, "vmuser");
    assert_eq!(d["name"], "myvm");
    assert_eq!(d["status"], "deleting");
    assert!(
        d["operation_id"].as_str().is_some_and(|o| !o.is_empty()),
        "{d}"
    );
    wait_vm(&c, "myvm", 30, "gone").await;

    // Over the quota: 403, said plainly, with the figures as data.
    let r = call(
        &s,
        "127.0.0.1",
        "POST",
        "/api/v1/vms",
        t,
        Some(&json!({"name": "many", "spec": "tiny", "count": 10})),
    )
    .await;
    let v = envelope(&r, 403);
    assert_eq!(
        v["message"],
        "quota exceeded: you use 3 VMs and asked for 10 more, but your limit is 10 VMs; delete \
         some or ask an admin to raise the limit"
    );
    assert_eq!(v["data"]["limit"], "vms");
    envelope(
        &call(&s, "127.0.0.1", "DELETE", "/api/v1/vms/myvm", t, None).await,
        404,
    );
}

// ---- key change without a key -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_without_a_key_waits_for_an_admin() {
    let s = server(&[]);
    let bob_token = s.user("bob").await;
    let carol_token = s.user("carol").await;
    let admin = &s.admin_token("contract").await;
    let adm = Some(admin.as_str());
    let new_key = fresh_key("contract-new");

    // Someone holding no credential asks with username, registered email, new key, reason.
    let body = json!({"username": "bob", "email": "BOB@example.org", "new_public_key": new_key, "reason": "lost laptop"});
    let d = envelope(&anon_post(&s, "/api/v1/key-change", &body).await, 200)["data"].clone();
    has_all(
        &d,
        &[
            "id",
            "username",
            "email",
            "new_public_key",
            "reason",
            "status",
            "created_at",
            "updated_at",
        ],
    );
    assert!(is_request_id(&d["id"], "keychange-"), "{d}");
    assert_eq!(d["username"], "bob");
    assert_eq!(d["email"], "bob@example.org", "the registered email");
    assert_eq!(d["new_public_key"], new_key.as_str());
    assert_eq!(d["reason"], "lost laptop");
    assert_eq!(d["status"], "pending");
    assert!(is_rfc3339(&d["created_at"]), "{d}");
    // One waits at a time.
    envelope(&anon_post(&s, "/api/v1/key-change", &body).await, 409);

    // A wrong email and an unknown user get the very same refusal: no enumeration.
    let wrong = anon_post(
        &s,
        "/api/v1/key-change",
        &json!({"username": "carol", "email": "someone@example.org", "new_public_key": new_key}),
    )
    .await;
    let unknown = anon_post(
        &s,
        "/api/v1/key-change",
        &json!({"username": "nobody", "email": "nobody@example.org", "new_public_key": new_key}),
    )
    .await;
    let (w, u) = (wrong.json(), unknown.json());
    assert_eq!(wrong.status, unknown.status);
    assert_eq!(w["message"], u["message"]);
    assert_eq!(w["errors"], u["errors"]);
    envelope(&wrong, wrong.status);
    assert!(wrong.status >= 400);
    // Missing fields: 400 "Validation failed", one per field.
    let v = envelope(
        &anon_post(&s, "/api/v1/key-change", &json!({"username": "carol"})).await,
        400,
    );
    assert_eq!(v["message"], "Validation failed");
    assert_eq!(v["errors"].as_array().unwrap().len(), 2, "{v}");

    // The admin sees and decides it; the key is bob's.
    let v = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/key-changes", adm, None).await,
        200,
    );
    let list = v["data"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["id"], d["id"]);
    let v = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/key-changes/bob", adm, None).await,
        200,
    );
    assert_eq!(
        v["data"]["id"], d["id"],
        "one request, as the prototype answers"
    );
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "GET",
            "/api/v1/key-changes/carol",
            adm,
            None,
        )
        .await,
        404,
    );
    let v = envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/key-changes/bob/approve",
            adm,
            None,
        )
        .await,
        200,
    );
    assert_eq!(v["data"]["status"], "approved");
    assert!(is_rfc3339(&v["data"]["processed_at"]), "{v}");
    envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/key-changes/bob/approve",
            adm,
            None,
        )
        .await,
        400,
    );
    let me = envelope(
        &call(&s, "127.0.0.1", "GET", "/api/v1/me", Some(&bob_token), None).await,
        200,
    );
    assert_eq!(me["data"]["user"]["public_key"], new_key.as_str());

    // A signed-in user's request keeps working as before.
    let k3 = fresh_key("contract-carol");
    let d = envelope(
        &call(
            &s,
            "127.0.0.1",
            "POST",
            "/api/v1/key-change",
            Some(&carol_token),
            Some(&json!({"public_key": k3})),
        )
        .await,
        200,
    )["data"]
        .clone();
    assert_eq!(d["public_key"], k3.as_str());
    assert_eq!(d["new_public_key"], k3.as_str());
    assert_eq!(d["email"], "carol@example.org");

    // The portal's form, for a visitor who is not signed in.
    let page = raw::send("127.0.0.1", &s.addr, "GET", "/key-change", &[], b"").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(r#"name="new_public_key""#),
        "{}",
        page.body
    );
    let _dave = s.user("dave").await;
    let k4 = fresh_key("contract-dave");
    let r = post_form(
        &s,
        "/key-change",
        &[
            ("username", "dave"),
            ("email", "dave@example.org"),
            ("new_public_key", k4.trim()),
            ("reason", "rotation"),
        ],
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/key-change-success?u=dave"));
    let ok = raw::send(
        "127.0.0.1",
        &s.addr,
        "GET",
        "/key-change-success?u=dave",
        &[],
        b"",
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(ok.body.contains("key-change-received"), "{}", ok.body);
    let v = envelope(
        &call(
            &s,
            "127.0.0.1",
            "GET",
            "/api/v1/key-changes/dave",
            adm,
            None,
        )
        .await,
        200,
    );
    assert_eq!(v["data"]["reason"], "rotation");
    assert_eq!(v["data"]["status"], "pending");
    // A wrong email on the form: refused, nothing filed.
    let r = post_form(
        &s,
        "/key-change",
        &[
            ("username", "carol"),
            ("email", "wrong@example.org"),
            ("new_public_key", k4.trim()),
        ],
    )
    .await;
    assert!(r.status >= 400, "{}", r.status);
}

// ---- guards: email domains and reCAPTCHA --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_guards_hold_on_the_api_and_the_web_form() {
    let captcha = VerifyStandIn::start().await;
    let url = format!("\"{}\"", captcha.url);
    let secret = format!("\"{STAND_IN_SECRET}\"");
    let site = format!("\"{STAND_IN_SITE_KEY}\"");
    let s = server(&[
        (
            "BASPHERE_REGISTRATION__ALLOWED_EMAIL_DOMAINS",
            r#"["Example.ORG", "corp.example"]"#,
        ),
        ("BASPHERE_RECAPTCHA__SITE_KEY", &site),
        ("BASPHERE_RECAPTCHA__SECRET_KEY", &secret),
        ("BASPHERE_RECAPTCHA__VERIFY_URL", &url),
    ]);
    let with = |mut body: Value, answer: Option<&str>| {
        if let Some(a) = answer {
            body["g-recaptcha-response"] = json!(a);
        }
        body
    };

    // JSON: no answer → 400 naming the field, the endpoint not even asked, nothing stored.
    let v = envelope(
        &anon_post(&s, "/api/v1/register", &registration("nocap")).await,
        400,
    );
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("g-recaptcha-response"),
        "{v}"
    );
    assert_eq!(captcha.calls(), 0);
    assert!(!registered(&s, "nocap").await);
    // A wrong answer → refused after asking the endpoint with our secret.
    envelope(
        &anon_post(
            &s,
            "/api/v1/register",
            &with(registration("badcap"), Some("robot")),
        )
        .await,
        400,
    );
    assert_eq!(captcha.calls(), 1);
    assert_eq!(
        captcha.last(),
        (STAND_IN_SECRET.to_string(), "robot".to_string())
    );
    assert!(!registered(&s, "badcap").await);
    // A verified answer with a disallowed domain → 400 with the reason, nothing stored.
    let mut other = registration("outsider");
    other["email"] = json!("outsider@elsewhere.example");
    let v = envelope(
        &anon_post(&s, "/api/v1/register", &with(other, Some(PASS))).await,
        400,
    );
    assert_eq!(v["message"], "Validation failed");
    let why = v["errors"][0].as_str().unwrap();
    assert!(
        why.starts_with("email") && why.contains("elsewhere.example"),
        "{why}"
    );
    assert!(!registered(&s, "outsider").await);
    // A subdomain is not the domain (exact match).
    let mut sub = registration("subby");
    sub["email"] = json!("subby@mail.example.org");
    envelope(
        &anon_post(&s, "/api/v1/register", &with(sub, Some(PASS))).await,
        400,
    );
    assert!(!registered(&s, "subby").await);
    // Verified, allowed domain (any case) → 200, stored.
    let mut fine = registration("insider");
    fine["email"] = json!("insider@EXAMPLE.org");
    let d = envelope(
        &anon_post(&s, "/api/v1/register", &with(fine, Some(PASS))).await,
        200,
    )["data"]
        .clone();
    assert_eq!(d["status"], "pending");
    assert!(registered(&s, "insider").await);
    assert_eq!(captcha.last().1, PASS);
    // A local caller (the kernel names it) needs no reCAPTCHA; the domain rule still holds.
    let r = s
        .root()
        .post(
            "/api/v1/register",
            &json!({"username": "root", "email": "root@elsewhere.example", "public_key": KEY}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.body);

    // The web form: the widget and its script are on the page, the CSP lets them in.
    let page = raw::send("127.0.0.1", &s.addr, "GET", "/register", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(r#"class="g-recaptcha""#),
        "{}",
        page.body
    );
    assert!(page.body.contains(STAND_IN_SITE_KEY), "{}", page.body);
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("https://www.google.com/recaptcha/"), "{csp}");
    let form = |u: &'static str, email: &'static str| {
        vec![
            ("username", u),
            ("email", email),
            ("team", "qa"),
            ("public_key", KEY),
        ]
    };
    // No answer: refused on the page, nothing stored.
    let r = post_form(&s, "/register", &form("webnocap", "webnocap@example.org")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("reCAPTCHA"), "{}", r.body);
    assert!(!registered(&s, "webnocap").await);
    // A failed answer: refused.
    let mut f = form("webbad", "webbad@example.org");
    f.push(("g-recaptcha-response", "robot"));
    let r = post_form(&s, "/register", &f).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!registered(&s, "webbad").await);
    // Verified, but a disallowed domain: refused with the reason, nothing stored.
    let mut f = form("webout", "webout@elsewhere.example");
    f.push(("g-recaptcha-response", PASS));
    let r = post_form(&s, "/register", &f).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("elsewhere.example"), "{}", r.body);
    assert!(!registered(&s, "webout").await);
    // Verified and allowed: accepted.
    let mut f = form("webok", "webok@corp.example");
    f.push(("g-recaptcha-response", PASS));
    let r = post_form(&s, "/register", &f).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert!(registered(&s, "webok").await);

    // Key change without a key: reCAPTCHA on the JSON route and the form alike.
    let _ = s
        .root()
        .post("/api/v1/users/insider/approve", &json!({}))
        .await
        .unwrap();
    let k = fresh_key("contract-guard");
    let body =
        json!({"username": "insider", "email": "insider@example.org", "new_public_key": k.trim()});
    let v = envelope(&anon_post(&s, "/api/v1/key-change", &body).await, 400);
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("g-recaptcha-response"),
        "{v}"
    );
    envelope(
        &anon_post(&s, "/api/v1/key-change", &with(body.clone(), Some("robot"))).await,
        400,
    );
    let r = post_form(
        &s,
        "/key-change",
        &[
            ("username", "insider"),
            ("email", "insider@example.org"),
            ("new_public_key", k.trim()),
        ],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let root_list = s.root().get("/api/v1/key-changes").await.unwrap();
    assert_eq!(root_list.body.data, json!([]), "nothing filed yet");
    envelope(
        &anon_post(&s, "/api/v1/key-change", &with(body, Some(PASS))).await,
        200,
    );
}
