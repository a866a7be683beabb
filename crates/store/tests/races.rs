//! Transactions that read a workflow's state and then change it, raced on PostgreSQL by
//! another transaction that changes that state in between. Each case holds the other
//! transaction open on a second connection while the store's runs, then commits it: the
//! store's must see what it committed and refuse, not act on what it read before. (SQLite's
//! one writer serializes these transactions; the races exist only across connections.)
//!
//! - A lease-guarded transition (a step completion that ends its workflow, a failed ending, a
//!   retry) against another node's claim of the workflow (the lease had run out): it must find
//!   the new owner and write nothing — not end a workflow the other node now runs.
//! - An operator's action (a retry, a cancel) against a second retry of the same failed
//!   workflow (a double click), or against the workflow's own ending.
use basphere_core::NetworkPool;
use basphere_store::{
    Actor, AuditFilter, ClaimLimits, Completion, NewStep, NewWorkflow, OpError, RetryCtx,
    StepCommit, StepStatus, Store, StoreError, Workflow, WorkflowOutcome, WorkflowStatus,
};
use basphere_testkit::postgres::Postgres;
use std::time::Duration;

const NONE: ClaimLimits = ClaimLimits {
    per_user: None,
    per_provider: None,
    per_host: None,
};

/// How n1 tries to write after n2 claimed its workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// A group of completions with the workflow as n1 claimed it (the guards' rows read
    /// beside the writes).
    Guessed,
    /// A group of completions read first.
    Read,
    Failed,
    Retry,
}

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

/// A queued one-step workflow, claimed by `n1`: its id and record as claimed.
async fn running(store: &Store) -> (String, Workflow) {
    let id = store.enqueue_workflow(&one_step()).await.unwrap();
    let c = store
        .claim_many("n1", 10_000, &NONE, 1, &["ledger".to_string()])
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    (id, c[0].0.clone())
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

/// A store on a fresh database and a second connection to it.
async fn store_and_client(db: &str) -> (Postgres, Store, tokio_postgres::Client) {
    let pg = Postgres::start();
    let url = pg.create_database(db);
    let store = Store::open_postgres(&url).await.unwrap();
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    (pg, store, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_guarded_transition_loses_to_a_claim_that_commits_while_it_runs() {
    let (_pg, store, c) = store_and_client("fenced_transitions").await;
    // Both ways a group of completions is sent: with the workflow as n1 claimed it (the
    // guards' rows read beside the writes), and without (read first); then the transitions
    // guarded one by one: a failed ending and a step's retry.
    for way in [Way::Guessed, Way::Read, Way::Failed, Way::Retry] {
        let (id, w) = running(&store).await;
        // n1's lease ran out; n2 claims the workflow and has not committed yet. Meanwhile n1
        // ends the step it ran.
        let (s, wf) = (store.clone(), id.clone());
        let claim = format!(
            "UPDATE workflows SET lease_owner = 'n2', lease_until = lease_until + 60000
             WHERE id = '{id}'"
        );
        let out = racing(&c, &claim, async move {
            let commit = StepCommit::default();
            let done = Completion {
                finish: true,
                claimed: (way == Way::Guessed).then_some(&w),
                ..Completion::of(&wf, "n1", 0, "s0", &commit)
            };
            match way {
                Way::Guessed | Way::Read => s.complete(done).await.map(drop),
                Way::Failed => {
                    let failed = WorkflowOutcome::Failed("s0 failed".into());
                    s.finish_workflow(&wf, "n1", &failed).await.map(drop)
                }
                Way::Retry => s.step_retry(&wf, 0, "s0", "n1", "boom", 0).await.map(drop),
            }
        })
        .await;
        assert!(
            matches!(&out, Err(StoreError::LeaseLost(x)) if *x == id),
            "{way:?}: n1's transition must find n2's lease: {out:?}"
        );
        let rec = store.workflow(&id).await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.steps[0].status),
            (WorkflowStatus::Running, StepStatus::Running),
            "{way:?}: nothing of n1's transition written"
        );
        let events = store.events(&id, 0).await.unwrap();
        assert!(
            events
                .iter()
                .all(|e| e.kind == "queued" || e.kind == "step_started"),
            "{way:?}: {events:?}"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_or_a_cancel_sees_what_a_racing_transaction_committed() {
    let (_pg, store, c) = store_and_client("operator_races").await;
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
    let (id, _) = running(&store).await;
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
    let (id, _) = running(&store).await;
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
