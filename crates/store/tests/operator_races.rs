//! An operator's action on a workflow (a retry, a cancel) reads its state and then changes it.
//! On PostgreSQL another transaction may change that state in between: a second retry of the
//! same failed workflow (a double click), the workflow's own ending. Each case holds that
//! other transaction open on a second connection while the action runs, then commits it: the
//! action must see what it committed and refuse, not act on what it read before.
use basphere_core::NetworkPool;
use basphere_store::{
    Actor, AuditFilter, ClaimLimits, NewStep, NewWorkflow, OpError, RetryCtx, Store,
    WorkflowOutcome, WorkflowStatus,
};
use basphere_testkit::postgres::Postgres;
use std::time::Duration;

const NONE: ClaimLimits = ClaimLimits {
    per_user: None,
    per_provider: None,
    per_host: None,
};

fn one_step() -> NewWorkflow {
    NewWorkflow::new(
        "ledger",
        "alice",
        vec![NewStep {
            name: "s0".into(),
            timeout_ms: 5_000,
        }],
    )
}

/// A queued one-step workflow, claimed by `n1`.
async fn running(store: &Store) -> String {
    let id = store.enqueue_workflow(&one_step()).await.unwrap();
    let c = store
        .claim_many("n1", 10_000, &NONE, 1, &["ledger".to_string()])
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    id
}

/// Opens a transaction on `c` that runs `sql` (holding the rows it changes), for `act` to
/// race; commits it 300 ms after `act` started; `act`'s outcome.
async fn racing<T: Send + 'static>(
    c: &tokio_postgres::Client,
    sql: &str,
    act: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    c.batch_execute(&format!("BEGIN; {sql}")).await.unwrap();
    let act = tokio::spawn(act);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.batch_execute("COMMIT").await.unwrap();
    act.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_or_a_cancel_sees_what_a_racing_transaction_committed() {
    let pg = Postgres::start();
    let url = pg.create_database("operator_races");
    let store = Store::open_postgres(&url).await.unwrap();
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let actor = Actor::new("alice", "test");
    let audits = |store: Store, action: &'static str| async move {
        let f = AuditFilter {
            action: Some(action.into()),
            ..AuditFilter::default()
        };
        store.audit_list(&f).await.unwrap().len()
    };

    // A failed workflow, retried twice at once: the first retry (held open) queues it again;
    // the second must find it pending and refuse.
    let id = running(&store).await;
    let failed = WorkflowOutcome::Failed("s0 failed".into());
    store.finish_workflow(&id, "n1", &failed).await.unwrap();
    let (s, wf, a) = (store.clone(), id.clone(), actor.clone());
    let second = racing(
        &c,
        &format!("UPDATE workflows SET status = 'pending', error = NULL WHERE id = '{id}'"),
        async move {
            let pool: NetworkPool = NetworkPool {
                cidr: "10.254.0.0/24".parse().unwrap(),
                gateway: "10.254.0.1".parse().unwrap(),
                dns: vec![],
                mtu: 1500,
                block_size: 32,
                reserved: vec![],
            };
            s.retry_workflow(&wf, &RetryCtx { pool: &pool }, &a)
                .await
                .map(drop)
        },
    )
    .await;
    assert!(
        matches!(&second, Err(OpError::State(x, WorkflowStatus::Pending, _)) if *x == id),
        "the second retry must see the first: {second:?}"
    );
    assert_eq!(audits(store.clone(), "operation.retry").await, 0);

    // A running workflow cancelled while its ending commits: nothing left to cancel.
    let id = running(&store).await;
    let (s, wf, a) = (store.clone(), id.clone(), actor.clone());
    let cancel = racing(
        &c,
        &format!(
            "UPDATE workflows SET status = 'succeeded', finished_at = 1, lease_owner = NULL,
                 lease_until = NULL WHERE id = '{id}'"
        ),
        async move { s.request_cancel(&wf, &a).await.map(drop) },
    )
    .await;
    assert!(
        matches!(&cancel, Err(OpError::State(x, WorkflowStatus::Succeeded, _)) if *x == id),
        "the cancel must see the ending: {cancel:?}"
    );
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert!(!w.cancel_requested, "{w:?}");
    assert_eq!(audits(store.clone(), "operation.cancel").await, 0);
    store.close().await;
}
