//! Completions that carry the workflow as its node claimed it (`Completion::claimed`): on
//! PostgreSQL their writes go with the lease guards on that guess, and the guards' answers
//! check it. Whatever was guessed, the outcome is what the store's rows say.
use crate::workflows::{NONE, runs, wf};
use crate::{Case, Fut};
use basphere_store::{
    Actor, Completion, StepCommit, StepStatus, Store, StoreError, Workflow, WorkflowStatus,
};

pub fn cases() -> Vec<Case> {
    vec![(
        "ledger_a_completion_with_its_claimed_workflow_is_guarded_as_any",
        |s| Box::pin(claimed(s)) as Fut,
    )]
}

/// Queues a one-step workflow and claims it for `n1`: its id and record as claimed.
async fn claim_one(store: &Store) -> (String, Workflow) {
    let id = store.enqueue_workflow(&wf("alice", 1)).await.unwrap();
    let c = store
        .claim_many("n1", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0.id, id);
    (id, c[0].0.clone())
}

/// `node` ends `w`'s only step, telling the store the workflow as `claimed`.
async fn end(
    store: &Store,
    w: &str,
    node: &str,
    claimed: &Workflow,
) -> basphere_store::Result<(Vec<String>, bool)> {
    let commit = StepCommit::default();
    let (evs, cancel, _) = store
        .complete(Completion {
            finish: true,
            claimed: Some(claimed),
            ..Completion::of(w, node, 0, "s0", &commit)
        })
        .await?;
    Ok((evs.into_iter().map(|e| e.message).collect(), cancel))
}

async fn claimed(store: Store) {
    // As claimed: it ends, with every event.
    let (id, w) = claim_one(&store).await;
    let (msgs, cancel) = end(&store, &id, "n1", &w).await.unwrap();
    assert!(!cancel);
    assert_eq!(msgs, ["s0 done", "ledger succeeded"]);
    let rec = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(rec.status, WorkflowStatus::Succeeded);
    assert_eq!(rec.steps[0].status, StepStatus::Done);
    // On PostgreSQL in two round trips (the writes with the guards, the commit), not three.
    if store.backend() == "postgres" {
        use basphere_store::statement_profile;
        let (id, w) = claim_one(&store).await;
        statement_profile::start();
        end(&store, &id, "n1", &w).await.unwrap();
        let trips: Vec<String> = statement_profile::stop()
            .into_iter()
            .flat_map(|t| std::iter::repeat_n(t.sql, t.calls as usize))
            .collect();
        assert_eq!(trips.len(), 2, "{trips:?}");
        for first in ["round trip: BEGIN + ", "round trip: COMMIT"] {
            assert!(trips.iter().any(|t| t.starts_with(first)), "{trips:?}");
        }
    }

    // Sent by a node that does not hold the lease: refused, nothing written.
    let (id, w) = claim_one(&store).await;
    let events = store.events(&id, 0).await.unwrap().len();
    assert!(matches!(
        end(&store, &id, "n2", &w).await,
        Err(StoreError::LeaseLost(x)) if x == id
    ));
    let rec = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.steps[0].status),
        (WorkflowStatus::Running, StepStatus::Running)
    );
    assert_eq!(
        store.events(&id, 0).await.unwrap().len(),
        events,
        "no event written"
    );

    // A cancel asked for meanwhile: the step is recorded done, the workflow does not end.
    let actor = Actor::new("alice", "test");
    store.request_cancel(&id, &actor).await.unwrap();
    let (msgs, cancel) = end(&store, &id, "n1", &w).await.unwrap();
    assert!(cancel, "the completion sees the cancel");
    assert_eq!(msgs, ["s0 done"]);
    let rec = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        (rec.status, rec.steps[0].status),
        (WorkflowStatus::Running, StepStatus::Done)
    );

    // A record that is not what the store holds: the store's rows decide the ending.
    let (id, mut w) = claim_one(&store).await;
    w.definition = "not-ledger".into();
    let (msgs, _) = end(&store, &id, "n1", &w).await.unwrap();
    assert_eq!(msgs, ["s0 done", "ledger succeeded"]);
    assert_eq!(
        store.workflow(&id).await.unwrap().unwrap().status,
        WorkflowStatus::Succeeded
    );
}
