//! A rollback that cannot clean up keeps the VM's address and quota; nothing else may start on
//! a VM while one of its workflows lives; a delete cannot be cancelled (issue 9, M1–M3), with
//! the engine in this process and the do-nothing provider told to fail.
mod common;
use basphere_core::VmStatus;
use basphere_provider::NullProvider;
use basphere_store::{Actor, OpError, Store, WorkflowStatus};
use common::*;
use std::sync::Arc;

fn admin() -> Actor {
    Actor::new("test", "test")
}

async fn admit(store: &Store, owner: &basphere_core::Username, name: &str) -> (String, String) {
    let a = store
        .admit_vms(&create_req(owner, &[name]), &pool(), &admin())
        .await
        .unwrap();
    (
        a[0].operation_id.clone(),
        a[0].vm.ip_address.unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_cleanup_keeps_the_address_and_blocks_a_second_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _pg) = open(dir.path()).await;
    let u = user(&store, "eve", 3).await;
    let fails = dir.path().join("fails");
    std::fs::write(&fails, "wait_ready\nremove\n").unwrap();
    let mut provider = NullProvider::default();
    provider.fail_file = Some(fails.clone());
    let provider = Arc::new(provider);
    let e = engine(&store, provider.clone(), engine_cfg("n1"));
    let stop = start(&e);
    let (op, ip) = admit(&store, &u, "fail-a").await;
    e.wake();
    let w = wait_done(&store, &op, 10).await;
    assert_eq!(w.status, WorkflowStatus::Failed);
    let vm = store.vm(u.as_str(), "fail-a").await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Failed);
    assert_eq!(vm.ip_address.map(|i| i.to_string()), Some(ip.clone()));
    assert!(vm.error.unwrap().contains("run delete-vm"));
    let used = store.usage(u.as_str()).await.unwrap();
    assert_eq!((used.vms, used.ips), (1, 1));
    let (_, ip_b) = admit(&store, &u, "b").await;
    assert_ne!(
        ip_b, ip,
        "the leftover machine's address was handed out again"
    );

    // With the engine stopped, a delete is queued: neither a retry of the create nor a
    // cancel of the delete may act on the VM now.
    stop.send(true).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let steps = vm_steps(basphere_core::VmOperation::Delete);
    let d = store
        .begin_delete_vm(u.as_str(), "fail-a", &steps, &admin())
        .await
        .unwrap();
    let r = store
        .retry_workflow(&op, &basphere_store::RetryCtx { pool: &pool() }, &admin())
        .await;
    assert!(
        matches!(&r, Err(OpError::Refused(m)) if m.contains(&d.operation_id)),
        "{r:?}"
    );
    assert_eq!(
        store.workflow(&op).await.unwrap().unwrap().status,
        WorkflowStatus::Failed
    );
    let r = store.request_cancel(&d.operation_id, &admin()).await;
    assert!(
        matches!(&r, Err(OpError::Refused(m)) if m.contains("cannot be cancelled")),
        "{r:?}"
    );

    // The delete retries the cleanup; then the address is free.
    std::fs::write(&fails, "").unwrap();
    let _stop = start(&e);
    e.wake();
    let w = wait_done(&store, &d.operation_id, 10).await;
    assert_eq!(w.status, WorkflowStatus::Succeeded);
    assert!(store.vm(u.as_str(), "fail-a").await.unwrap().is_none());
    let (_, ip_c) = admit(&store, &u, "c").await;
    assert_eq!(ip_c, ip);
}
