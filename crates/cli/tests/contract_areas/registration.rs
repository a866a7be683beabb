//! Registration: the requests, their decisions, and the guards (email domains, reCAPTCHA).

use crate::*;

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
