//! A batch node that runs after a workflow outside its batch does not wait forever for one
//! that ended while the batch was being queued (PostgreSQL: another replica's ending, which
//! found no edges to release, commits after the batch counted its live dependencies).
use basphere_store::{BatchWork, NewStep, NewWorkflow, Store};
use basphere_testkit::postgres::Postgres;
use std::time::Duration;

fn one_step(owner: &str) -> NewWorkflow {
    NewWorkflow::new(
        "ledger",
        owner,
        vec![NewStep {
            name: "s0".into(),
            timeout_ms: 5_000,
        }],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_ending_while_its_dependent_is_queued_leaves_nothing_waiting() {
    let pg = Postgres::start();
    let url = pg.create_database("after_edges");
    let store = Store::open_postgres(&url).await.unwrap();
    let x = store.enqueue_workflow(&one_step("alice")).await.unwrap();
    // Another replica ends X: its ending is written (no dependents to release yet), not
    // committed.
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "BEGIN; UPDATE workflows SET status = 'succeeded', finished_at = 1 WHERE id = '{x}'"
    ))
    .await
    .unwrap();
    // Meanwhile a batch queues a node to run after X.
    let mut node = BatchWork::new("after-x", "ledger", one_step("alice"));
    node.after = vec![x.clone()];
    let s = store.clone();
    let queued = tokio::spawn(async move { s.enqueue_batch("alice", 1, vec![node]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.batch_execute("COMMIT").await.unwrap();
    let b = queued.await.unwrap().unwrap();
    let w = store
        .workflow(&b.nodes[0].operation_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w.waiting_on, 0, "X has ended: nothing to wait for: {w:?}");
    store.close().await;
}
