//! The portal: a planted notice cookie cannot inject markup (L2), the enrollment code of an
//! approval never travels in a cookie and is never cached (L3), a megabyte form is refused
//! before it is read (L7), and the admin's VM list, users and audit trail come in pages with
//! a link to the next (its `after` shown inert, the filters kept, a bad `limit` or `after` a
//! 400 page).

mod common;
mod raw;

use raw::{FORM, csrf_of, enc};

use common::{KEY, Server, server};
use serde_json::json;

/// Signs in to the portal with an admin token; returns the session cookie and a CSRF token.
async fn admin_session(s: &Server) -> (String, String) {
    let token = s.admin_token("portal").await;
    let page = raw::send("127.0.0.1", &s.addr, "GET", "/signin", &[], b"").await;
    let pre = page.cookie("bsp_pre").expect("pre-session cookie");
    let csrf = csrf_of(&page.body);
    let cookie = format!("bsp_pre={pre}");
    let body = format!("token={}&csrf={csrf}", enc(&token));
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/signin",
        &[("Content-Type", FORM), ("Cookie", &cookie)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let session = format!(
        "bsp_session={}",
        r.cookie("bsp_session").expect("session cookie")
    );
    let admin = raw::send(
        "127.0.0.1",
        &s.addr,
        "GET",
        "/admin",
        &[("Cookie", &session)],
        b"",
    )
    .await;
    assert_eq!(admin.status, 200, "{}", admin.body);
    (session, csrf_of(&admin.body))
}

#[tokio::test]
async fn planted_notice_cookie_is_rendered_inert() {
    let s = server(&[]);
    for (cookie, shown) in [
        // A made-up kind that breaks out of the class attribute.
        (
            format!(
                "bsp_flash={}",
                enc(r#"x"><script>alert(1)</script><b class=":hello"#)
            ),
            false,
        ),
        // A legitimate kind with markup in the text.
        (
            format!("bsp_flash={}", enc("ok:<script>alert(2)</script>")),
            true,
        ),
    ] {
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "GET",
            "/signin",
            &[("Cookie", &cookie)],
            b"",
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(
            !r.body.contains("<script>alert"),
            "markup injected: {}",
            r.body
        );
        assert!(
            !r.body.contains(r#"x"><"#),
            "attribute broken out of: {}",
            r.body
        );
        assert_eq!(
            r.body.contains(r#"id="flash""#),
            shown,
            "{cookie}: {}",
            r.body
        );
        if shown {
            assert!(r.body.contains("&lt;script&gt;alert(2)&lt;/script&gt;"));
        }
        // The notice is one-shot: the cookie is cleared whatever it held.
        assert!(
            r.all("set-cookie")
                .iter()
                .any(|c| c.starts_with("bsp_flash=;")),
            "{:?}",
            r.headers
        );
    }
}

#[tokio::test]
async fn approval_code_is_in_the_page_only_and_not_cached() {
    let s = server(&[]);
    let r = raw::register("127.0.0.1", &s.addr, "newbie").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (session, csrf) = admin_session(&s).await;
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/admin/registrations/newbie/approve",
        &[("Content-Type", FORM), ("Cookie", &session)],
        format!("csrf={csrf}").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let at = r
        .body
        .find(r#"id="enrollment-code">"#)
        .expect("code shown in the page")
        + 21;
    let code = r.body[at..].split('<').next().unwrap().to_string();
    assert!(code.len() >= 16, "{code}");
    for c in r.all("set-cookie") {
        assert!(!c.contains(&code), "code in a cookie: {c}");
    }
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // The page's code is the real one.
    let r = raw::post_json(
        "127.0.0.1",
        &s.addr,
        "/api/v1/enroll",
        &json!({"username": "newbie", "code": code}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test]
async fn megabyte_forms_are_refused() {
    let s = server(&[("BASPHERE_LIMITS__ANON_BURST", "0")]);
    let page = raw::send("127.0.0.1", &s.addr, "GET", "/register", &[], b"").await;
    let cookie = format!("bsp_pre={}", page.cookie("bsp_pre").unwrap());
    let csrf = csrf_of(&page.body);
    let pad = "a".repeat(1024 * 1024);
    let body = format!(
        "csrf={csrf}&username=bigform&email=b%40example.org&team=qa&public_key={}&pad={pad}",
        enc(KEY)
    );
    for path in ["/register", "/signin", "/enroll"] {
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "POST",
            path,
            &[("Content-Type", FORM), ("Cookie", &cookie)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 413, "{path}: {}", r.body);
    }
    let r = s.root().get("/api/v1/users/bigform").await.unwrap();
    assert_eq!(r.status, 404, "stored: {:?}", r.body);
    // The same form at a sane size goes through.
    let body = format!(
        "csrf={csrf}&username=smallform&email=b%40example.org&team=qa&public_key={}",
        enc(KEY)
    );
    let r = raw::send(
        "127.0.0.1",
        &s.addr,
        "POST",
        "/register",
        &[("Content-Type", FORM), ("Cookie", &cookie)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(
        s.root()
            .get("/api/v1/users/smallform")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn the_admin_lists_come_in_pages() {
    let s = server(&[]);
    let pia = s.with_token(&s.user("pia").await);
    for n in ["c", "a", "b"] {
        let r = pia
            .post("/api/v1/vms", &json!({"name": n, "spec": "tiny"}))
            .await
            .unwrap();
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let (session, csrf) = admin_session(&s).await;
    let get = |path: String| {
        let (addr, session) = (s.addr.clone(), session.clone());
        async move {
            raw::send(
                "127.0.0.1",
                &addr,
                "GET",
                &path,
                &[("Cookie", &session)],
                b"",
            )
            .await
        }
    };
    let rows = |body: &str| -> Vec<String> {
        body.split(r#"<tr data-vm=""#)
            .skip(1)
            .map(|r| r.split('"').next().unwrap().to_string())
            .collect()
    };
    let first = get("/admin/vms?limit=2".into()).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(rows(&first.body), ["a", "b"]);
    assert!(
        first.body.contains("2 VM(s), by owner and name"),
        "{}",
        first.body
    );
    let at = first
        .body
        .find(r#"id="next-page" href=""#)
        .expect("a next page")
        + 21;
    let next = first.body[at..]
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");
    assert_eq!(next, "/admin/vms?after=pia%2Fb&limit=2");
    let second = get(next).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(rows(&second.body), ["c"]);
    assert!(!second.body.contains("next-page"), "{}", second.body);
    let all = get("/admin/vms".into()).await;
    assert_eq!(rows(&all.body), ["a", "b", "c"]);
    assert!(!all.body.contains("next-page"), "{}", all.body);

    for bad in ["limit=x", "limit=0", "limit=5000", "after=nosep"] {
        let r = get(format!("/admin/vms?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(
            r.body.contains(r#"id="error-message""#),
            "{bad}: {}",
            r.body
        );
    }
    // The key it continues after is shown, never as markup.
    let r = get("/admin/vms?after=%3Cscript%3Ealert(1)%3C%2Fscript%3E%2Fx".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("<script>alert(1)"), "{}", r.body);
    assert!(
        r.body.contains("after &lt;script&gt;alert(1)"),
        "{}",
        r.body
    );

    // Users by name, each with what they hold.
    let cards = |body: &str| -> Vec<String> {
        body.split(r#"<article class="card user" data-user=""#)
            .skip(1)
            .map(|r| r.split('"').next().unwrap().to_string())
            .collect()
    };
    let users = get("/admin/users".into()).await;
    let names = cards(&users.body);
    assert!(
        names.len() >= 2 && names.contains(&"pia".to_string()),
        "{}",
        users.body
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "by name");
    let pia = users.body.split(r#"data-user="pia""#).nth(1).unwrap();
    assert!(pia.contains("Using 3 VM(s), 3 IP(s)"), "{pia}");
    let mut walked = vec![];
    let mut path = "/admin/users?limit=1".to_string();
    loop {
        let r = get(path).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page = cards(&r.body);
        assert_eq!(page.len(), 1, "{}", r.body);
        walked.extend(page);
        match r.body.find(r#"id="next-page" href=""#) {
            Some(at) => {
                path = r.body[at + 21..]
                    .split('"')
                    .next()
                    .unwrap()
                    .replace("&amp;", "&")
            }
            None => break,
        }
    }
    assert_eq!(walked, names, "every user once, a page at a time");
    // A quota saved on a page comes back to that page, and only ever to the users page.
    let at = names.iter().position(|n| n == "pia").unwrap();
    let after = if at == 0 {
        String::new()
    } else {
        format!("after={}&", names[at - 1])
    };
    let page = get(format!("/admin/users?{after}limit=1")).await;
    let action = format!(
        r#"action="/admin/users/pia/quota?{}limit=1""#,
        after.replace('&', "&amp;")
    );
    assert!(page.body.contains(&action), "{action} in {}", page.body);
    for (query, back) in [
        (
            format!("{after}limit=1"),
            format!("/admin/users?{after}limit=1"),
        ),
        (
            "after=//evil.example/x".to_string(),
            "/admin/users?after=%2F%2Fevil.example%2Fx".to_string(),
        ),
    ] {
        let r = raw::send(
            "127.0.0.1",
            &s.addr,
            "POST",
            &format!("/admin/users/pia/quota?{query}"),
            &[("Content-Type", FORM), ("Cookie", &session)],
            format!("csrf={csrf}&max_vms=7").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 303, "{}", r.body);
        assert_eq!(r.header("location"), Some(back.as_str()));
    }
    let r = get("/admin/users?limit=-1".into()).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // The audit trail: newest first, a page at a time, the filter kept in the link.
    let records = |body: &str| body.matches(r#"data-label="When""#).count();
    let href = |body: &str| {
        let at = body.find(r#"id="next-page" href=""#).expect("a next page") + 21;
        body[at..].split('"').next().unwrap().replace("&amp;", "&")
    };
    // (Registration records: none is written while the test pages through them.)
    let all = get("/admin/audit?action=user.".into()).await;
    let n = records(&all.body);
    assert!(n >= 2, "{}", all.body);
    assert!(!all.body.contains("next-page"), "{}", all.body);
    let first = get(format!("/admin/audit?action=user.&limit={}", n - 1)).await;
    assert_eq!(records(&first.body), n - 1, "{}", first.body);
    let next = href(&first.body);
    assert!(
        next.starts_with("/admin/audit?action=user.&after=")
            && next.ends_with(&format!("&limit={}", n - 1)),
        "{next}"
    );
    let second = get(next).await;
    assert_eq!(records(&second.body), 1, "{}", second.body);
    assert!(second.body.contains("older than record"), "{}", second.body);
    assert!(!second.body.contains("next-page"), "{}", second.body);
    for bad in ["limit=x", "after=yesterday"] {
        let r = get(format!("/admin/audit?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}
