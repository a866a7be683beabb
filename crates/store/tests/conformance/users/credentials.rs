//! Key changes, tokens and enrollment codes.
use super::{KEY_A, KEY_B, active, admin, audits, msg, pending, pool};
use basphere_core::{RegistrationStatus, SshPublicKey, UserStatus};
use basphere_store::{Actor, Store};

pub(super) async fn key_changes(s: Store) {
    active(&s, "alice").await;
    let alice = "alice".parse().unwrap();
    let new: SshPublicKey = KEY_B.parse().unwrap();
    let kc = s.request_key_change(&alice, &new, &admin()).await.unwrap();
    assert_eq!(
        (kc.username.as_str(), kc.public_key.as_str(), kc.status),
        ("alice", KEY_B, RegistrationStatus::Pending)
    );
    assert_eq!(
        msg(s.request_key_change(&alice, &new, &admin()).await),
        "user alice already has a key change waiting for an admin"
    );
    assert_eq!(s.key_changes(None).await.unwrap().len(), 1);
    assert_eq!(s.key_changes_page(None, 10).await.unwrap()[0].id, kc.id);
    assert!(
        s.key_changes_page(Some(kc.id), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let done = s
        .decide_key_change(&alice, true, None, &admin())
        .await
        .unwrap();
    assert_eq!(
        (done.id, done.status, done.processed_by.as_deref()),
        (kc.id, RegistrationStatus::Approved, Some("admin"))
    );
    assert_eq!(s.user("alice").await.unwrap().unwrap().public_key, KEY_B);
    assert!(s.key_changes(None).await.unwrap().is_empty());
    assert_eq!(
        msg(s.decide_key_change(&alice, true, None, &admin()).await),
        "user alice has no pending key change"
    );

    // The key could not be installed: the change is pending again, the old key back.
    s.undo_key_approval(
        &alice,
        kc.id,
        KEY_A,
        "authorized_keys not writable",
        &admin(),
    )
    .await
    .unwrap();
    assert_eq!(s.user("alice").await.unwrap().unwrap().public_key, KEY_A);
    let back = &s.key_changes(None).await.unwrap()[0];
    assert_eq!(
        (back.id, back.status, back.processed_by.as_deref()),
        (kc.id, RegistrationStatus::Pending, None)
    );
    let rec = &audits(&s, "key.approve").await[0];
    assert_eq!(
        (rec.result.as_str(), rec.detail.as_deref()),
        ("failed", Some("authorized_keys not writable"))
    );

    let no = s
        .decide_key_change(&alice, false, Some("not yours"), &admin())
        .await
        .unwrap();
    assert_eq!(
        (no.status, no.reject_reason.as_deref()),
        (RegistrationStatus::Rejected, Some("not yours"))
    );
    assert_eq!(s.user("alice").await.unwrap().unwrap().public_key, KEY_A);
    assert_eq!(s.key_changes(Some("alice")).await.unwrap().len(), 1);
    assert_eq!(audits(&s, "key.reject").await.len(), 1);
    assert_eq!(audits(&s, "key.request").await.len(), 1);
}

pub(super) async fn tokens(s: Store) {
    active(&s, "alice").await;
    let alice = "alice".parse().unwrap();
    let (t1, secret) = s
        .create_token(&alice, "laptop", None, &admin())
        .await
        .unwrap();
    assert!(secret.starts_with("bsp_"));
    assert_eq!(
        (t1.name.as_str(), t1.last_used_at, t1.expires_at),
        ("laptop", None, None)
    );
    let (t2, _) = s
        .create_token(&alice, "ci", Some(3_600_000), &admin())
        .await
        .unwrap();
    assert_eq!(t2.expires_at, Some(t2.created_at + 3_600_000));
    assert_eq!(s.tokens("alice").await.unwrap().len(), 2);
    let mut ids = vec![t1.id.clone(), t2.id.clone()];
    ids.sort();
    let p1 = s.tokens_page("alice", None, 1).await.unwrap();
    let p2 = s.tokens_page("alice", Some(&p1[0].id), 5).await.unwrap();
    assert_eq!(vec![p1[0].id.clone(), p2[0].id.clone()], ids);
    assert_eq!(p2.len(), 1);

    let owner = s.authenticate(&secret).await.unwrap().unwrap();
    assert_eq!(
        (owner.user.username.as_str(), owner.token_id.as_str()),
        ("alice", t1.id.as_str())
    );
    assert_eq!(owner.user.status, UserStatus::Active);
    let used = s
        .tokens("alice")
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == t1.id)
        .unwrap();
    assert!(used.last_used_at.is_some(), "authenticate records the use");
    assert!(s.authenticate(&secret).await.unwrap().is_some());
    assert!(s.authenticate("bsp_nothing").await.unwrap().is_none());

    let (_, expired) = s
        .create_token(&alice, "old", Some(-1), &admin())
        .await
        .unwrap();
    assert!(s.authenticate(&expired).await.unwrap().is_none());

    assert!(
        !s.revoke_token("bob", &t1.id, &admin()).await.unwrap(),
        "not bob's"
    );
    assert!(s.revoke_token("alice", &t1.id, &admin()).await.unwrap());
    assert!(!s.revoke_token("alice", &t1.id, &admin()).await.unwrap());
    assert!(s.authenticate(&secret).await.unwrap().is_none());
    assert_eq!(audits(&s, "token.revoke").await.len(), 1);
    assert_eq!(audits(&s, "token.create").await.len(), 3);
}

pub(super) async fn enroll(s: Store) {
    pending(&s, "alice").await;
    let alice = "alice".parse().unwrap();
    let out = s
        .approve(&alice, &pool(4), false, Some(60_000), &admin())
        .await
        .unwrap();
    let code = out.enrollment_code.unwrap();
    assert!(
        s.enroll(&alice, "bspe_wrong", &admin())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.enroll(&"bob".parse().unwrap(), &code, &admin())
            .await
            .unwrap()
            .is_none(),
        "another user's code"
    );
    let refused = audits(&s, "token.enroll").await;
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0].result, "refused");

    let (info, secret) = s.enroll(&alice, &code, &admin()).await.unwrap().unwrap();
    assert_eq!(info.name, "enrollment");
    assert_eq!(
        s.authenticate(&secret).await.unwrap().unwrap().token_id,
        info.id
    );
    assert!(
        s.enroll(&alice, &code, &admin()).await.unwrap().is_none(),
        "a code works once"
    );

    pending(&s, "bob").await;
    let bob = "bob".parse().unwrap();
    let late = s
        .approve(&bob, &pool(4), false, Some(-1), &admin())
        .await
        .unwrap();
    assert!(
        s.enroll(&bob, &late.enrollment_code.unwrap(), &admin())
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
}

pub(super) async fn enroll_folding(s: Store) {
    pending(&s, "alice").await;
    let alice = "alice".parse().unwrap();
    let code = s
        .approve(&alice, &pool(4), false, Some(60_000), &admin())
        .await
        .unwrap()
        .enrollment_code
        .unwrap();
    let anon = Actor::new("anonymous", "tcp:127.0.0.1:5555");
    for name in ["alice", "bob", "alice"] {
        let got = s
            .enroll_folding_refusals(
                &name.parse().unwrap(),
                "bspe_bad",
                &anon,
                "127.0.0.1",
                60_000,
            )
            .await
            .unwrap();
        assert!(got.is_none());
    }
    s.enroll_folding_refusals(&alice, "bspe_bad", &anon, "127.0.0.2", 60_000)
        .await
        .unwrap();
    let recs = audits(&s, "token.enroll").await;
    assert_eq!(recs.len(), 2, "one record per client and window");
    let one = recs
        .iter()
        .find(|r| r.source == "refusals:127.0.0.1")
        .unwrap();
    assert_eq!(
        (one.actor.as_str(), one.result.as_str()),
        ("anonymous", "refused")
    );
    assert_eq!(
        one.detail.as_deref(),
        Some("attempts=3; usernames=alice,bob")
    );

    let (info, secret) = s
        .enroll_folding_refusals(&alice, &code, &anon, "127.0.0.1", 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        s.authenticate(&secret).await.unwrap().unwrap().token_id,
        info.id
    );
}
