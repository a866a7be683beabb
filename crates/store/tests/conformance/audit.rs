//! The audit trail: records, filters, paging.
use crate::{Case, Fut};
use basphere_store::{Actor, AuditFilter, Store};

pub fn cases() -> Vec<Case> {
    vec![("audit_records_filter_and_page", |s| {
        Box::pin(filter_and_page(s)) as Fut
    })]
}

async fn filter_and_page(store: Store) {
    let alice = Actor::new("alice", "unix:uid=1001");
    let admin = Actor::new("admin", "tcp:127.0.0.1:4000");
    for i in 0..5 {
        let t = format!("alice/vm{i}");
        store
            .audit(&alice, "vm.create", &t, "accepted", Some("ip=10.0.0.5"))
            .await
            .unwrap();
    }
    store
        .audit(&admin, "user.approve", "alice", "ok", None)
        .await
        .unwrap();

    let all = store.audit_list(&AuditFilter::default()).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0].action, "user.approve", "newest first");
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    assert_eq!(all[0].detail, None);
    assert_eq!(all[1].detail.as_deref(), Some("ip=10.0.0.5"));

    let by_actor = AuditFilter {
        actor: Some("alice".into()),
        ..Default::default()
    };
    assert_eq!(store.audit_list(&by_actor).await.unwrap().len(), 5);
    let by_prefix = AuditFilter {
        action: Some("user.".into()),
        ..Default::default()
    };
    let hits = store.audit_list(&by_prefix).await.unwrap();
    assert_eq!((hits.len(), hits[0].target.as_str()), (1, "alice"));
    let by_target = AuditFilter {
        target: Some("alice/vm3".into()),
        ..Default::default()
    };
    assert_eq!(store.audit_list(&by_target).await.unwrap().len(), 1);
    let future = AuditFilter {
        since_ms: Some(basphere_store::now_ms() + 60_000),
        ..Default::default()
    };
    assert!(store.audit_list(&future).await.unwrap().is_empty());

    // Pages of two, each older than the last id seen.
    let two = AuditFilter {
        limit: Some(2),
        ..Default::default()
    };
    let mut seen = vec![];
    let mut after = None;
    loop {
        let page = store.audit_page(&two, after).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|r| r.id);
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, all.iter().map(|r| r.id).collect::<Vec<_>>());
}
