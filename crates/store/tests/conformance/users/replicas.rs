//! Two servers (replicas) on one database, deciding at once.
use super::{active, admin, msg, pending, pool, reg};
use basphere_core::{Quota, UserStatus};
use basphere_store::Store;
use futures_util::future::join_all;

pub(super) async fn concurrent_approvals(a: Store, b: Store) {
    let names: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    for n in &names {
        pending(&a, n).await;
    }
    let p = pool(64);
    let results = join_all(names.iter().enumerate().map(|(i, n)| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (n, p) = (n.parse().unwrap(), p.clone());
        async move { s.approve(&n, &p, false, None, &admin()).await }
    }))
    .await;
    let mut blocks: Vec<u32> = results
        .into_iter()
        .map(|r| r.expect("no approval is refused").user.ip_block.unwrap())
        .collect();
    blocks.sort();
    assert_eq!(
        blocks,
        (0..20).collect::<Vec<_>>(),
        "20 distinct blocks, the lowest ones"
    );
}

pub(super) async fn concurrent_registrations(a: Store, b: Store) {
    let results = join_all((0..10).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            s.register(
                &reg("popular", &format!("p{i}@example.org")),
                &Quota::default(),
                &admin(),
            )
            .await
        }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one registration of the name: {results:?}");
    for r in results.into_iter().filter(Result::is_err) {
        assert_eq!(msg(r), "username popular is already taken");
    }
    assert_eq!(b.registrations(Some("popular")).await.unwrap().len(), 1);
}

/// Ten names registering one email at once (in either case) on two replicas: one waits for
/// review, the others are told so, and nothing else is stored.
pub(super) async fn concurrent_same_email(a: Store, b: Store) {
    let results = join_all((0..10).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let email = if i % 2 == 0 {
            "Shared@Example.org"
        } else {
            "shared@example.org"
        };
        async move {
            s.register(
                &reg(&format!("sharer{i}"), email),
                &Quota::default(),
                &admin(),
            )
            .await
        }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        ok, 1,
        "exactly one pending registration of the email: {results:?}"
    );
    for r in results.into_iter().filter(Result::is_err) {
        assert!(msg(r).contains("already waits for review"));
    }
    let pending = b.registrations(None).await.unwrap();
    let sharers = pending
        .iter()
        .filter(|r| r.username.as_str().starts_with("sharer"))
        .count();
    assert_eq!(sharers, 1, "nothing stored for the refused ones");
}

pub(super) async fn concurrent_ensure_admin(a: Store, b: Store) {
    let results = join_all((0..6).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            s.ensure_admin(
                &format!("root{i}").parse().unwrap(),
                &Quota::default(),
                &pool(4),
            )
            .await
        }
    }))
    .await;
    let made = results.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    assert_eq!(made, 1);
    assert_eq!(a.users(Some(UserStatus::Active)).await.unwrap().len(), 1);
}

pub(super) async fn token_across(a: Store, b: Store) {
    active(&a, "alice").await;
    let (info, secret) = a
        .create_token(&"alice".parse().unwrap(), "ci", None, &admin())
        .await
        .unwrap();
    let owner = b.authenticate(&secret).await.unwrap().unwrap();
    assert_eq!(
        (owner.user.username.as_str(), owner.token_id),
        ("alice", info.id.clone())
    );
    assert!(b.revoke_token("alice", &info.id, &admin()).await.unwrap());
    assert!(a.authenticate(&secret).await.unwrap().is_none());
}
