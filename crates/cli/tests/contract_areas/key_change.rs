//! Key changes asked without a key, decided by an admin.

use crate::*;

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
