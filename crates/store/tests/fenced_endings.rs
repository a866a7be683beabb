//! A lease-guarded transition (a step completion that ends its workflow, a failed ending, a
//! retry) is fenced by the lease even while another node's claim of that workflow is committing (PostgreSQL, where claims and completions run on
//! separate connections at once). The other node's claim holds the row when the completion
//! arrives and commits a moment later: the completion must see the new owner and write
//! nothing — not read the old owner and end a workflow the other node now runs.
use basphere_store::{
    ClaimLimits, Completion, NewStep, NewWorkflow, StepCommit, StepStatus, Store, StoreError,
    WorkflowOutcome, WorkflowStatus,
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
    Guessed,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_loses_to_a_claim_that_commits_while_it_runs() {
    let pg = Postgres::start();
    let url = pg.create_database("fenced_endings");
    let store = Store::open_postgres(&url).await.unwrap();
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Both ways a group of completions is sent: with the workflow as n1 claimed it (the
    // guards' rows read beside the writes), and without (read first); then the transitions
    // guarded one by one: a failed ending and a step's retry.
    for way in [Way::Guessed, Way::Read, Way::Failed, Way::Retry] {
        let id = store.enqueue_workflow(&one_step()).await.unwrap();
        let claimed = store
            .claim_many("n1", 10_000, &NONE, 1, &["ledger".to_string()])
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        let w = claimed[0].0.clone();
        // n1's lease ran out; n2 claims the workflow and has not committed yet.
        c.batch_execute(&format!(
            "BEGIN; UPDATE workflows SET lease_owner = 'n2', lease_until = lease_until + 60000
             WHERE id = '{id}'"
        ))
        .await
        .unwrap();
        // Meanwhile n1 ends the step it ran.
        let (s, wf) = (store.clone(), id.clone());
        let ending = tokio::spawn(async move {
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
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.batch_execute("COMMIT").await.unwrap();
        let out = ending.await.unwrap();
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
