//! Users, registrations, key changes, tokens and enrollment.
use crate::{Case, Fut, ReplicaCase};
use basphere_core::{NetworkPool, Quota, RegistrationStatus, Role, UserStatus};
use basphere_store::{Actor, AuditFilter, NewRegistration, Store, UserError};

mod credentials;
mod replicas;

use credentials::{enroll, enroll_folding, key_changes, tokens};
use replicas::{
    concurrent_approvals, concurrent_ensure_admin, concurrent_registrations, concurrent_same_email,
    token_across,
};

pub fn cases() -> Vec<Case> {
    vec![
        ("users_ensure_admin_once", |s| {
            Box::pin(ensure_admin_once(s)) as Fut
        }),
        ("users_register_and_list", |s| {
            Box::pin(register_and_list(s)) as Fut
        }),
        ("users_register_refusals", |s| {
            Box::pin(register_refusals(s)) as Fut
        }),
        ("users_approve_blocks_and_undo", |s| {
            Box::pin(approve_blocks_and_undo(s)) as Fut
        }),
        ("users_approve_refusals", |s| {
            Box::pin(approve_refusals(s)) as Fut
        }),
        ("users_reject", |s| Box::pin(reject(s)) as Fut),
        ("users_disable_quota_uid", |s| {
            Box::pin(disable_quota_uid(s)) as Fut
        }),
        ("users_delete_and_purge", |s| {
            Box::pin(delete_and_purge(s)) as Fut
        }),
        ("users_delete_leaves_no_workflow_rows", |s| {
            Box::pin(delete_leaves_no_workflow_rows(s)) as Fut
        }),
        ("users_key_changes", |s| Box::pin(key_changes(s)) as Fut),
        ("users_tokens", |s| Box::pin(tokens(s)) as Fut),
        ("users_enroll", |s| Box::pin(enroll(s)) as Fut),
        ("users_enroll_folding_refusals", |s| {
            Box::pin(enroll_folding(s)) as Fut
        }),
    ]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![
        ("users_concurrent_approvals_distinct_blocks", |a, b| {
            Box::pin(concurrent_approvals(a, b)) as Fut
        }),
        ("users_concurrent_registrations_one_wins", |a, b| {
            Box::pin(concurrent_registrations(a, b)) as Fut
        }),
        (
            "users_concurrent_registrations_one_per_pending_email",
            |a, b| Box::pin(concurrent_same_email(a, b)) as Fut,
        ),
        ("users_concurrent_ensure_admin_one_admin", |a, b| {
            Box::pin(concurrent_ensure_admin(a, b)) as Fut
        }),
        ("users_token_across_replicas", |a, b| {
            Box::pin(token_across(a, b)) as Fut
        }),
    ]
}

const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop";
const KEY_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILKtw/tZItwmjgEmEIc/ymtUEk9ORXHX7+gZ8e0PFosh bob@host";

/// A pool of `blocks` blocks of 32 addresses.
fn pool(blocks: u32) -> NetworkPool {
    let prefix = 32 - (32 * blocks).trailing_zeros();
    serde_json::from_value(serde_json::json!({
        "cidr": format!("10.254.0.0/{prefix}"),
        "gateway": "10.254.0.1",
    }))
    .unwrap()
}

fn reg(name: &str, email: &str) -> NewRegistration {
    NewRegistration {
        username: name.parse().unwrap(),
        email: email.parse().unwrap(),
        team: "lab".parse().unwrap(),
        public_key: KEY_A.parse().unwrap(),
    }
}

fn admin() -> Actor {
    Actor::new("admin", "tcp:127.0.0.1:4000")
}

fn msg<T: std::fmt::Debug>(r: Result<T, UserError>) -> String {
    r.unwrap_err().to_string()
}

async fn audits(s: &Store, action: &str) -> Vec<basphere_store::AuditRecord> {
    let f = AuditFilter {
        action: Some(action.into()),
        ..Default::default()
    };
    s.audit_list(&f).await.unwrap()
}

async fn pending(s: &Store, name: &str) {
    s.register(
        &reg(name, &format!("{name}@example.org")),
        &Quota::default(),
        &admin(),
    )
    .await
    .unwrap();
}

async fn active(s: &Store, name: &str) {
    pending(s, name).await;
    s.approve(&name.parse().unwrap(), &pool(64), false, None, &admin())
        .await
        .unwrap();
}

async fn ensure_admin_once(s: Store) {
    let root = "root".parse().unwrap();
    assert!(
        s.ensure_admin(&root, &Quota::default(), &pool(4))
            .await
            .unwrap()
    );
    assert!(
        !s.ensure_admin(&"other".parse().unwrap(), &Quota::default(), &pool(4))
            .await
            .unwrap()
    );
    let u = s.user("root").await.unwrap().unwrap();
    assert_eq!(
        (u.role, u.status, u.ip_block),
        (Role::Admin, UserStatus::Active, Some(0))
    );
    assert!(s.user("other").await.unwrap().is_none());
    let a = audits(&s, "user.create_admin").await;
    assert_eq!(
        (a.len(), a[0].target.as_str(), a[0].source.as_str()),
        (1, "root", "init")
    );
}

async fn register_and_list(s: Store) {
    let q = Quota {
        max_vcpus: Some(8),
        max_memory_mib: Some(8192),
        ..Quota::default()
    };
    let r = s
        .register(&reg("alice", "alice@example.org"), &q, &admin())
        .await
        .unwrap();
    assert_eq!(
        (r.username.as_str(), r.status),
        ("alice", RegistrationStatus::Pending)
    );
    assert_eq!(
        (r.email.as_str(), r.team.as_str(), r.public_key.as_str()),
        ("alice@example.org", "lab", KEY_A)
    );
    assert!(r.processed_by.is_none() && r.processed_at.is_none() && r.reject_reason.is_none());
    let u = s.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (u.status, u.role, u.quota, u.ip_block, u.unix_account),
        (UserStatus::Pending, Role::User, q, None, false)
    );
    for n in ["bob", "carol", "dave"] {
        pending(&s, n).await;
    }
    assert_eq!(s.pending_count().await.unwrap(), 4);
    assert_eq!(s.users(Some(UserStatus::Pending)).await.unwrap().len(), 4);
    assert!(s.users(Some(UserStatus::Active)).await.unwrap().is_empty());
    let names: Vec<_> = s
        .users(None)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.username.to_string())
        .collect();
    assert_eq!(names, ["alice", "bob", "carol", "dave"]);
    let page = s.users_page(None, Some("bob"), 1).await.unwrap();
    assert_eq!(page[0].username.as_str(), "carol");
    assert_eq!(page.len(), 1);

    let all = s.registrations(None).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(s.registrations(Some("bob")).await.unwrap().len(), 1);
    assert!(s.registrations(Some("nobody")).await.unwrap().is_empty());
    let p1 = s.pending_page(None, 3).await.unwrap();
    let p2 = s.pending_page(p1.last().map(|r| r.id), 3).await.unwrap();
    assert_eq!((p1.len(), p2.len()), (3, 1));
    assert_eq!(p2[0].username, "alice");
    assert_eq!(audits(&s, "user.register").await.len(), 4);
}

async fn register_refusals(s: Store) {
    pending(&s, "alice").await;
    let again = s
        .register(
            &reg("alice", "alice@example.org"),
            &Quota::default(),
            &admin(),
        )
        .await;
    assert_eq!(msg(again), "username alice is already taken");
    s.approve(&"alice".parse().unwrap(), &pool(4), false, None, &admin())
        .await
        .unwrap();
    let active = s
        .register(&reg("alice", "x@example.org"), &Quota::default(), &admin())
        .await;
    assert!(matches!(active, Err(UserError::Taken(ref n)) if n == "alice"));

    // A rejected name may come back, only with its first email.
    pending(&s, "bob").await;
    s.reject(&"bob".parse().unwrap(), "unknown", &admin())
        .await
        .unwrap();
    let other = s
        .register(&reg("bob", "eve@example.org"), &Quota::default(), &admin())
        .await;
    assert_eq!(
        msg(other),
        "username bob was registered with another email and rejected; only that email may \
         register it again. Choose another username, or ask an admin to purge it"
    );
    assert_eq!(
        s.user("bob").await.unwrap().unwrap().status,
        UserStatus::Rejected
    );
    let mut back = reg("bob", "BOB@example.org");
    back.public_key = KEY_B.parse().unwrap();
    s.register(&back, &Quota::default(), &admin())
        .await
        .unwrap();
    let u = s.user("bob").await.unwrap().unwrap();
    assert_eq!(
        (u.status, u.email.as_str(), u.public_key.as_str()),
        (UserStatus::Pending, "BOB@example.org", KEY_B)
    );
    let regs = s.registrations(Some("bob")).await.unwrap();
    assert_eq!(
        regs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [RegistrationStatus::Pending, RegistrationStatus::Rejected]
    );
}

async fn approve_blocks_and_undo(s: Store) {
    for n in ["alice", "bob", "carol"] {
        pending(&s, n).await;
    }
    let p = pool(4);
    let a = s
        .approve(&"alice".parse().unwrap(), &p, true, None, &admin())
        .await
        .unwrap();
    assert_eq!(
        (a.user.status, a.user.ip_block, a.user.unix_account),
        (UserStatus::Active, Some(0), true)
    );
    assert!(a.enrollment_code.is_none());
    let b = s
        .approve(&"bob".parse().unwrap(), &p, false, Some(60_000), &admin())
        .await
        .unwrap();
    assert_eq!(b.user.ip_block, Some(1));
    assert!(
        b.enrollment_code
            .as_deref()
            .is_some_and(|c| c.starts_with("bspe_"))
    );
    let r = s.registrations(Some("bob")).await.unwrap();
    assert_eq!(
        (r[0].status, r[0].processed_by.as_deref()),
        (RegistrationStatus::Approved, Some("admin"))
    );
    assert!(r[0].processed_at.is_some());
    let approved = audits(&s, "user.approve").await;
    assert_eq!(approved[0].detail.as_deref(), Some("ip_block=1"));

    // Taking back alice's approval frees block 0 for the next approval.
    s.set_unix_uid(&"alice".parse().unwrap(), 1234)
        .await
        .unwrap();
    s.undo_approval(&"alice".parse().unwrap(), "useradd failed", &admin())
        .await
        .unwrap();
    let u = s.user("alice").await.unwrap().unwrap();
    assert_eq!(
        (u.status, u.ip_block, u.unix_account, u.unix_uid),
        (UserStatus::Pending, None, false, None)
    );
    let r = s.registrations(Some("alice")).await.unwrap();
    assert_eq!(
        (r[0].status, r[0].processed_by.as_deref()),
        (RegistrationStatus::Pending, None)
    );
    let undone = audits(&s, "user.approve").await;
    assert_eq!(
        (undone[0].result.as_str(), undone[0].detail.as_deref()),
        ("failed", Some("useradd failed"))
    );
    let c = s
        .approve(&"carol".parse().unwrap(), &p, false, None, &admin())
        .await
        .unwrap();
    assert_eq!(c.user.ip_block, Some(0));
    let again = s
        .undo_approval(&"alice".parse().unwrap(), "x", &admin())
        .await;
    assert_eq!(
        msg(again),
        "user alice is not active; no approval to take back"
    );

    // Undoing bob's approval drops his unused enrollment code.
    let code = b.enrollment_code.unwrap();
    s.undo_approval(&"bob".parse().unwrap(), "useradd failed", &admin())
        .await
        .unwrap();
    let bob = "bob".parse().unwrap();
    assert!(s.enroll(&bob, &code, &admin()).await.unwrap().is_none());
}

async fn approve_refusals(s: Store) {
    let nobody = s
        .approve(&"nobody".parse().unwrap(), &pool(2), false, None, &admin())
        .await;
    assert_eq!(msg(nobody), "user nobody not found");
    active(&s, "alice").await;
    let twice = s
        .approve(&"alice".parse().unwrap(), &pool(2), false, None, &admin())
        .await;
    assert_eq!(
        msg(twice),
        "user alice is active, not pending; nothing to approve"
    );
    active(&s, "bob").await;
    pending(&s, "carol").await;
    let full = s
        .approve(&"carol".parse().unwrap(), &pool(2), false, None, &admin())
        .await;
    assert!(matches!(full, Err(UserError::PoolFull)));
    assert_eq!(
        msg(s
            .approve(&"carol".parse().unwrap(), &pool(2), false, None, &admin())
            .await),
        "the network pool has no free block of addresses left; enlarge network.cidr"
    );
    assert_eq!(
        s.user("carol").await.unwrap().unwrap().status,
        UserStatus::Pending
    );
}

async fn reject(s: Store) {
    pending(&s, "alice").await;
    s.reject(&"alice".parse().unwrap(), "not a member", &admin())
        .await
        .unwrap();
    assert_eq!(
        s.user("alice").await.unwrap().unwrap().status,
        UserStatus::Rejected
    );
    let r = &s.registrations(Some("alice")).await.unwrap()[0];
    assert_eq!(
        (
            r.status,
            r.reject_reason.as_deref(),
            r.processed_by.as_deref()
        ),
        (
            RegistrationStatus::Rejected,
            Some("not a member"),
            Some("admin")
        )
    );
    assert_eq!(s.pending_count().await.unwrap(), 0);
    let rec = &audits(&s, "user.reject").await[0];
    assert_eq!(
        (rec.target.as_str(), rec.detail.as_deref()),
        ("alice", Some("not a member"))
    );

    let nobody = s.reject(&"nobody".parse().unwrap(), "x", &admin()).await;
    assert_eq!(msg(nobody), "user nobody not found");
    active(&s, "bob").await;
    let act = s.reject(&"bob".parse().unwrap(), "x", &admin()).await;
    assert_eq!(
        msg(act),
        "user bob is active, not pending; nothing to reject"
    );
    let twice = s.reject(&"alice".parse().unwrap(), "x", &admin()).await;
    assert_eq!(
        msg(twice),
        "user alice is rejected, not pending; nothing to reject"
    );
}

async fn disable_quota_uid(s: Store) {
    active(&s, "alice").await;
    let alice = "alice".parse().unwrap();
    s.set_disabled(&alice, true, &admin()).await.unwrap();
    assert_eq!(
        s.user("alice").await.unwrap().unwrap().status,
        UserStatus::Disabled
    );
    assert_eq!(
        msg(s.set_disabled(&alice, true, &admin()).await),
        "user alice is not active; nothing changed"
    );
    s.set_disabled(&alice, false, &admin()).await.unwrap();
    assert_eq!(
        s.user("alice").await.unwrap().unwrap().status,
        UserStatus::Active
    );
    assert_eq!(
        msg(s.set_disabled(&alice, false, &admin()).await),
        "user alice is not disabled; nothing changed"
    );
    assert_eq!(
        (
            audits(&s, "user.disable").await.len(),
            audits(&s, "user.enable").await.len()
        ),
        (1, 1)
    );

    let q = Quota {
        max_vms: 2,
        max_clusters: 1,
        max_ips: 4,
        max_vcpus: Some(4),
        max_memory_mib: Some(1 << 33),
        max_disk_gib: Some(500),
    };
    s.set_quota(&alice, &q, &admin()).await.unwrap();
    assert_eq!(s.user("alice").await.unwrap().unwrap().quota, q);
    assert_eq!(
        audits(&s, "user.quota").await[0].detail,
        Some(serde_json::to_string(&q).unwrap())
    );
    assert_eq!(
        msg(s.set_quota(&"nobody".parse().unwrap(), &q, &admin()).await),
        "user nobody not found"
    );

    s.set_unix_uid(&alice, 4_000_000_000).await.unwrap();
    let u = s.user("alice").await.unwrap().unwrap();
    assert_eq!((u.unix_account, u.unix_uid), (true, Some(4_000_000_000)));
}

/// A deleted user's workflows go with every row that hangs off them (steps, batch edges,
/// events), though on PostgreSQL no foreign key cascades to those.
async fn delete_leaves_no_workflow_rows(s: Store) {
    use basphere_store::{BatchWork, NewWorkflow};
    active(&s, "dave").await;
    let wf = || NewWorkflow::new("ledger", "dave", vec!["a".into(), "b".into()]);
    let first = BatchWork::new("first", "ledger", wf());
    let mut second = BatchWork::new("second", "ledger", wf());
    second.requires.push("first".into());
    s.enqueue_batch("dave", 1, vec![first, second])
        .await
        .unwrap();
    let tables = [
        "workflows",
        "workflow_steps",
        "workflow_deps",
        "workflow_events",
    ];
    let rows = |s: basphere_store::Summary| tables.map(|t| (t, s.rows(t)));
    let before = rows(s.summary().await.unwrap());
    assert!(
        before.iter().all(|&(_, n)| n > 0),
        "a table got no row: {before:?}"
    );
    s.delete_user(&"dave".parse().unwrap(), false, &admin())
        .await
        .unwrap();
    let after = rows(s.summary().await.unwrap());
    assert!(
        after.iter().all(|&(_, n)| n == 0),
        "rows left behind: {after:?}"
    );
}

async fn delete_and_purge(s: Store) {
    s.ensure_admin(&"root".parse().unwrap(), &Quota::default(), &pool(4))
        .await
        .unwrap();
    active(&s, "alice").await;
    active(&s, "bob").await;
    s.create_token(&"alice".parse().unwrap(), "ci", None, &admin())
        .await
        .unwrap();
    s.request_key_change(&"alice".parse().unwrap(), &KEY_B.parse().unwrap(), &admin())
        .await
        .unwrap();
    s.delete_user(&"alice".parse().unwrap(), false, &admin())
        .await
        .unwrap();
    assert!(s.user("alice").await.unwrap().is_none());
    assert!(s.tokens("alice").await.unwrap().is_empty());
    assert!(s.key_changes(Some("alice")).await.unwrap().is_empty());
    assert_eq!(
        s.registrations(Some("alice")).await.unwrap().len(),
        1,
        "kept without purge"
    );
    assert_eq!(
        msg(s
            .delete_user(&"alice".parse().unwrap(), false, &admin())
            .await),
        "user alice not found"
    );
    assert_eq!(
        msg(s
            .delete_user(&"root".parse().unwrap(), true, &admin())
            .await),
        "user root not found"
    );
    assert!(
        s.user("root").await.unwrap().is_some(),
        "admins are not deleted"
    );

    s.delete_user(&"bob".parse().unwrap(), true, &admin())
        .await
        .unwrap();
    assert!(s.registrations(Some("bob")).await.unwrap().is_empty());
    assert_eq!(
        (
            audits(&s, "user.delete").await.len(),
            audits(&s, "user.purge").await.len()
        ),
        (1, 1)
    );
    // A purged name is free again, with any email.
    s.register(&reg("bob", "new@example.org"), &Quota::default(), &admin())
        .await
        .unwrap();
}
