//! The workflow ledger: queueing, claims, leases, step transitions, endings, children.
use crate::{Case, Fut, ReplicaCase};
use basphere_store::{
    Actor, ClaimLimits, Completion, NewStep, NewWorkflow, NextStep, OpError, StepCommit,
    StepStatus, Store, StoreError, WorkflowOutcome, WorkflowStatus,
};
use serde_json::json;
use std::collections::HashSet;

pub fn cases() -> Vec<Case> {
    vec![
        ("ledger_runs_a_workflow_step_by_step", |s| {
            Box::pin(step_by_step(s)) as Fut
        }),
        ("ledger_guards_every_transition_by_the_lease", |s| {
            Box::pin(lease_guard(s)) as Fut
        }),
        ("ledger_undo_and_cancel", |s| {
            Box::pin(undo_and_cancel(s)) as Fut
        }),
        ("ledger_records_steps_that_ran_together", |s| {
            Box::pin(ran_together(s)) as Fut
        }),
        ("ledger_children_block_the_parent", |s| {
            Box::pin(children(s)) as Fut
        }),
        ("ledger_batch_edges_release_and_skip", |s| {
            Box::pin(edges(s)) as Fut
        }),
        ("ledger_claims_respect_the_per_user_limit", |s| {
            Box::pin(per_user(s)) as Fut
        }),
        ("ledger_claims_what_a_node_runs_with_stored_timeouts", |s| {
            Box::pin(stored_timeouts(s)) as Fut
        }),
        ("the_statement_profile_times_writes_while_started", |s| {
            Box::pin(profile(s)) as Fut
        }),
    ]
}

/// While started, the statement profile times a write's statements and its commit (on
/// PostgreSQL each round trip, as the process waited for it); stopped, nothing.
async fn profile(store: Store) {
    use basphere_store::statement_profile;
    statement_profile::start();
    store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    let times = statement_profile::stop();
    let names: Vec<&str> = times.iter().map(|t| t.sql.as_str()).collect();
    let (commit, other) = match store.backend() {
        "postgres" => (
            "round trip: COMMIT",
            "round trip: BEGIN + INSERT INTO workflows",
        ),
        _ => ("COMMIT", "INSERT INTO workflows"),
    };
    assert!(names.iter().any(|n| n.starts_with(commit)), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with(other)), "{names:?}");
    assert!(times.iter().all(|t| t.calls >= 1), "{times:?}");
    store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    assert!(statement_profile::stop().is_empty(), "nothing after stop");
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![
        (
            "ledger_two_replicas_never_claim_one_workflow_twice",
            |a, b| Box::pin(two_claimers(a, b)) as Fut,
        ),
        (
            "ledger_each_commit_names_its_events_to_the_other_replicas",
            |a, b| Box::pin(changes_name_their_events(a, b)) as Fut,
        ),
    ]
}

/// A replica hears of every commit another makes with the exact events it appended (so it
/// reads those, not a window of the log), and never of its own.
async fn changes_name_their_events(a: Store, b: Store) {
    let (Some(mut mine), Some(mut theirs)) = (a.changes(), b.changes()) else {
        assert!(
            a.changes().is_none() && b.changes().is_none(),
            "SQLite has no feed"
        );
        return;
    };
    let next = async |rx: &mut tokio::sync::broadcast::Receiver<basphere_store::Change>| {
        loop {
            let c = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
                .await
                .expect("a change within 20 s (a loaded machine delays, it does not lose)")
                .unwrap();
            // Connecting says "read again" once; commits carry their range.
            if c.events.is_some() {
                return c;
            }
        }
    };
    // b's feed starts listening in the background after it opens; a commit before that is
    // not news to it (the engine re-reads the log on the "read again" it gets on connecting).
    // Commit probes (of a definition nobody claims here) until b hears one.
    let mut hears = false;
    for _ in 0..100 {
        let probe = NewWorkflow::new("probe", "alice", vec!["p".into()]);
        a.enqueue_workflow(&probe).await.unwrap();
        let wait = std::time::Duration::from_millis(500);
        if let Ok(Ok(c)) = tokio::time::timeout(wait, theirs.recv()).await
            && c.events.is_some()
        {
            hears = true;
            break;
        }
    }
    assert!(hears, "the other replica never heard a commit");
    // A later probe's notice may still be on its way: let it land, then forget them all.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while theirs.try_recv().is_ok() {}
    let id = a.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    let c = next(&mut theirs).await;
    let queued = a.events(&id, 0).await.unwrap();
    assert_eq!(c.events, Some((queued[0].seq, queued[0].seq)));

    // A group completion: the step's end and the next one's start, one commit, one range.
    let claimed = a.claim_many("n1", 10_000, &NONE, 1, &runs()).await.unwrap();
    let c = next(&mut theirs).await;
    let (lo, hi) = c.events.unwrap();
    assert_eq!(
        b.events_between(lo, hi).await.unwrap().len() as i64,
        hi - lo + 1
    );
    assert_eq!(claimed.len(), 1);
    let step1 = NextStep {
        idx: 1,
        name: "s1",
        deadline_ms: 5_000,
    };
    let (evs, _, _) = a
        .complete(Completion {
            next: Some(step1),
            finish: true,
            ..Completion::of(&id, "n1", 0, "s0", &StepCommit::default())
        })
        .await
        .unwrap();
    let c = next(&mut theirs).await;
    assert_eq!(c.events, Some((evs[0].seq, evs[1].seq)));
    let key = |e: &basphere_store::WorkflowEvent| (e.seq, e.kind.clone(), e.message.clone());
    let read = b.events_between(evs[0].seq, evs[1].seq).await.unwrap();
    assert_eq!(
        read.iter().map(key).collect::<Vec<_>>(),
        evs.iter().map(key).collect::<Vec<_>>(),
        "the other replica reads exactly what was committed"
    );
    // Its own commits are not news to a replica.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), async {
            loop {
                if mine.recv().await.unwrap().events.is_some() {
                    return;
                }
            }
        })
        .await
        .is_err(),
        "a replica was told of its own commit"
    );
}

/// A workflow of `steps` steps of 5 s each.
pub(crate) fn wf(owner: &str, steps: usize) -> NewWorkflow {
    NewWorkflow::new(
        "ledger",
        owner,
        (0..steps)
            .map(|i| NewStep {
                name: format!("s{i}"),
                timeout_ms: 5_000,
            })
            .collect(),
    )
}

/// The definitions the tests' nodes run.
pub(crate) fn runs() -> Vec<String> {
    vec!["ledger".to_string()]
}

pub(crate) const NONE: ClaimLimits = ClaimLimits {
    per_user: None,
    per_provider: None,
    per_host: None,
};

async fn step_by_step(store: Store) {
    let id = store.enqueue_workflow(&wf("alice", 3)).await.unwrap();
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        (w.status, w.step, w.steps.len()),
        (WorkflowStatus::Pending, 0, 3)
    );
    assert_eq!(w.steps[1].idem_key, format!("{id}/1/s1"));
    assert!(store.next_due_in().await.unwrap().is_some());

    let claimed = store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let (w, evs, started) = &claimed[0];
    assert!(started);
    assert_eq!(w.status, WorkflowStatus::Running);
    assert_eq!(w.steps[0].status, StepStatus::Running);
    assert_eq!(evs[0].kind, "step_started");
    assert!(
        store
            .claim_many("n2", 10_000, &NONE, 8, &runs())
            .await
            .unwrap()
            .is_empty(),
        "a leased workflow is not claimed again"
    );

    // Step 0 done with an effect and output, step 1 started in the same commit.
    let commit = StepCommit {
        output: Some(json!({"made": 1})),
        effects: vec![(format!("{id}/0/s0"), json!({"x": 1}))],
        ..StepCommit::default()
    };
    let next = NextStep {
        idx: 1,
        name: "s1",
        deadline_ms: 5_000,
    };
    let (evs, cancel, _) = store
        .complete(Completion {
            next: Some(next),
            finish: true,
            ..Completion::of(&id, "n1", 0, "s0", &commit)
        })
        .await
        .unwrap();
    assert!(!cancel);
    assert_eq!(
        evs.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["step_done", "step_started"]
    );
    assert!(evs[0].seq < evs[1].seq, "{evs:?}");
    store.renew_lease(&id, "n1", 10_000).await.unwrap();
    // A retryable failure of step 1 gives the workflow back.
    store
        .step_retry(&id, 1, "s1", "n1", "flaky", 0)
        .await
        .unwrap();
    let c = store
        .claim_many("n2", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    assert_eq!(c.len(), 1, "any node takes it after a retry");
    assert_eq!(c[0].0.steps[1].attempts, 2);
    let (evs, _, _) = store
        .complete(Completion {
            next: Some(NextStep {
                idx: 2,
                name: "s2",
                deadline_ms: 5_000,
            }),
            finish: true,
            ..Completion::of(&id, "n2", 1, "s1", &StepCommit::default())
        })
        .await
        .unwrap();
    assert_eq!(evs.len(), 2);
    let (evs, _, _) = store
        .complete(Completion {
            finish: true,
            ..Completion::of(&id, "n2", 2, "s2", &StepCommit::default())
        })
        .await
        .unwrap();
    assert_eq!(evs.last().unwrap().kind, "succeeded");
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(w.status, WorkflowStatus::Succeeded);
    assert!(w.steps.iter().all(|s| s.status == StepStatus::Done));
    assert_eq!(w.steps[0].output, Some(json!({"made": 1})));
    let eff = store.step_effects(&id).await.unwrap();
    assert_eq!((eff.len(), eff[0].payload.clone()), (1, json!({"x": 1})));
    let all = store.events(&id, 0).await.unwrap();
    assert_eq!(all.first().unwrap().kind, "queued");
    assert_eq!(all.last().unwrap().kind, "succeeded");
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        store.last_event_seq().await.unwrap(),
        all.last().unwrap().seq
    );
    let since = store.events_since(all[2].seq, 100).await.unwrap();
    assert_eq!(since.len(), all.len() - 3);
    assert_eq!(
        store.next_due_in().await.unwrap(),
        None,
        "nothing left to run"
    );
    let page = store.workflows_page(Some("alice"), None, 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert!(
        store
            .workflows_page(Some("bob"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn lease_guard(store: Store) {
    let id = store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    let lost = |r: Result<_, StoreError>| matches!(r, Err(StoreError::LeaseLost(w)) if w == id);
    assert!(lost(store.renew_lease(&id, "n2", 1000).await));
    assert!(lost(
        store.step_started(&id, 0, "s0", "n2", 1000).await.map(drop)
    ));
    assert!(lost(
        store.step_retry(&id, 0, "s0", "n2", "x", 0).await.map(drop)
    ));
    assert!(lost(
        store.begin_undo(&id, 0, "s0", "n2", "x").await.map(drop)
    ));
    assert!(lost(
        store
            .finish_workflow(&id, "n2", &WorkflowOutcome::Succeeded)
            .await
            .map(drop)
    ));
    assert!(lost(
        store
            .complete(Completion {
                finish: true,
                ..Completion::of(&id, "n2", 0, "s0", &StepCommit::default())
            })
            .await
            .map(drop)
    ));
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        (w.status, w.step),
        (WorkflowStatus::Running, 0),
        "nothing changed"
    );
    // An expired lease is taken over by another node; the old holder is fenced out.
    store.renew_lease(&id, "n1", -1).await.unwrap();
    let c = store
        .claim_many("n2", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert!(lost(store.renew_lease(&id, "n1", 1000).await));
    assert_eq!(store.release_leases("n2").await.unwrap(), 1);
}

async fn undo_and_cancel(store: Store) {
    let actor = Actor::new("alice", "test");
    let id = store.enqueue_workflow(&wf("alice", 3)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    store
        .complete(Completion {
            next: Some(NextStep {
                idx: 1,
                name: "s1",
                deadline_ms: 5_000,
            }),
            finish: true,
            ..Completion::of(&id, "n1", 0, "s0", &StepCommit::default())
        })
        .await
        .unwrap();
    store.begin_undo(&id, 1, "s1", "n1", "boom").await.unwrap();
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!((w.status, w.step), (WorkflowStatus::Undoing, 0));
    assert_eq!(w.error.as_deref(), Some("s1: boom"));
    store.step_undone(&id, 0, "s0", "n1").await.unwrap();
    let evs = store
        .finish_workflow(&id, "n1", &WorkflowOutcome::Failed("s1: boom".into()))
        .await
        .unwrap();
    assert_eq!(evs[0].kind, "failed");
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(w.status, WorkflowStatus::Failed);
    assert_eq!(w.steps[0].status, StepStatus::Undone);
    assert!(matches!(
        store.request_cancel(&id, &actor).await,
        Err(OpError::State(_, WorkflowStatus::Failed, _))
    ));

    // A cancel request on a running workflow: the next completion reports it.
    let id = store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    let ev = store.request_cancel(&id, &actor).await.unwrap();
    assert_eq!(ev.kind, "cancel_requested");
    assert!(matches!(
        store.request_cancel(&id, &actor).await,
        Err(OpError::Refused(_))
    ));
    let (_, cancel, _) = store
        .complete(Completion {
            next: Some(NextStep {
                idx: 1,
                name: "s1",
                deadline_ms: 5_000,
            }),
            finish: true,
            ..Completion::of(&id, "n1", 0, "s0", &StepCommit::default())
        })
        .await
        .unwrap();
    assert!(cancel, "the completion sees the cancel");
    store
        .begin_cancel(&id, "n1", 0, "cancelled on request")
        .await
        .unwrap();
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        w.steps[1].status,
        StepStatus::Skipped,
        "the next step never started"
    );
    store.step_undone(&id, 0, "s0", "n1").await.unwrap();
    store
        .finish_workflow(
            &id,
            "n1",
            &WorkflowOutcome::Cancelled("cancelled on request".into()),
        )
        .await
        .unwrap();
    assert_eq!(
        store.workflow(&id).await.unwrap().unwrap().status,
        WorkflowStatus::Cancelled
    );
}

async fn children(store: Store) {
    let parent = store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 1, &runs())
        .await
        .unwrap();
    let commit = StepCommit {
        children: (0..3).map(|_| wf("alice", 1)).collect(),
        ..StepCommit::default()
    };
    let (evs, _, _) = store
        .complete(Completion::of(&parent, "n1", 0, "s0", &commit))
        .await
        .unwrap();
    assert_eq!(evs.last().unwrap().kind, "spawned");
    let p = store.workflow(&parent).await.unwrap().unwrap();
    assert_eq!(
        (p.waiting_on, p.step),
        (3, 1),
        "waits for its three children"
    );
    let kids = store.children(&parent).await.unwrap();
    assert_eq!(kids.len(), 3);
    assert!(
        kids.iter()
            .all(|k| k.parent_id.as_deref() == Some(parent.as_str()))
    );
    // Only the children are claimable while the parent waits.
    let c = store
        .claim_many("n2", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    let ids: HashSet<String> = c.iter().map(|c| c.0.id.clone()).collect();
    assert_eq!(ids, kids.iter().map(|k| k.id.clone()).collect());
    for k in &kids {
        store
            .complete(Completion {
                finish: true,
                ..Completion::of(&k.id, "n2", 0, "s0", &StepCommit::default())
            })
            .await
            .unwrap();
    }
    let p = store.workflow(&parent).await.unwrap().unwrap();
    assert_eq!(p.waiting_on, 0, "every child ended");
    let c = store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    assert_eq!((c.len(), c[0].0.id.as_str()), (1, parent.as_str()));
    // A parent takes a succeeded child back to undo it.
    let back = store
        .reopen_for_undo(&kids[0].id, "n1", 10_000, "the cluster failed")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.status, WorkflowStatus::Undoing);
    assert!(back.cancel_requested);
}

async fn edges(store: Store) {
    // c requires a (hard), b optionally (soft).
    let ids = store
        .enqueue_workflows(
            &[wf("alice", 1), wf("alice", 1), wf("alice", 1)],
            &[(2, 0, true), (2, 1, false)],
        )
        .await
        .unwrap();
    let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
    assert_eq!(store.workflow(c).await.unwrap().unwrap().waiting_on, 2);
    let claimed = store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2, "c waits");
    store
        .complete(Completion {
            finish: true,
            ..Completion::of(b, "n1", 0, "s0", &StepCommit::default())
        })
        .await
        .unwrap();
    assert_eq!(store.workflow(c).await.unwrap().unwrap().waiting_on, 1);
    store.begin_undo(a, 0, "s0", "n1", "boom").await.unwrap();
    let evs = store
        .finish_workflow(a, "n1", &WorkflowOutcome::Failed("boom".into()))
        .await
        .unwrap();
    assert!(
        evs.iter()
            .any(|e| e.kind == "skipped" && &e.operation_id == c),
        "{evs:?}"
    );
    let cw = store.workflow(c).await.unwrap().unwrap();
    assert_eq!(cw.status, WorkflowStatus::Cancelled);
    assert!(cw.error.unwrap().starts_with("skipped: requires"));
}

async fn per_user(store: Store) {
    let ws: Vec<_> = (0..4)
        .map(|_| wf("alice", 1))
        .chain([wf("bob", 1)])
        .collect();
    store.enqueue_workflows(&ws, &[]).await.unwrap();
    let lim = ClaimLimits {
        per_user: Some(2),
        ..NONE
    };
    let mut owners = vec![];
    for _ in 0..5 {
        for c in store
            .claim_many("n1", 10_000, &lim, 8, &runs())
            .await
            .unwrap()
        {
            owners.push(c.0.owner);
        }
    }
    owners.sort();
    assert_eq!(
        owners,
        ["alice", "alice", "bob"],
        "at most 2 of alice's at once"
    );
}

async fn two_claimers(a: Store, b: Store) {
    let ws: Vec<_> = (0..60).map(|_| wf("alice", 1)).collect();
    a.enqueue_workflows(&ws, &[]).await.unwrap();
    let claim = |s: Store, node: &'static str| async move {
        let mut got = vec![];
        for _ in 0..20 {
            for c in s.claim_many(node, 60_000, &NONE, 4, &runs()).await.unwrap() {
                got.push(c.0.id);
            }
        }
        got
    };
    let (x, y, z) = tokio::join!(
        claim(a.clone(), "n1"),
        claim(b.clone(), "n2"),
        claim(b.clone(), "n3")
    );
    let all: Vec<String> = x.into_iter().chain(y).chain(z).collect();
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 60, "every workflow claimed");
    assert_eq!(distinct.len(), 60, "none claimed twice");
}

/// A node claims only the definitions it runs, and a claim starts the step with the timeout
/// stored when the workflow was queued (whatever the node would give it today).
async fn stored_timeouts(store: Store) {
    let ledger = store.enqueue_workflow(&wf("alice", 2)).await.unwrap();
    let mut other = NewWorkflow::new(
        "other",
        "alice",
        vec![NewStep {
            name: "only".into(),
            timeout_ms: 7_000,
        }],
    );
    other.priority = 9;
    let other = store.enqueue_workflow(&other).await.unwrap();
    let claimed = store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.0.id.as_str()).collect();
    assert_eq!(
        ids,
        [ledger.as_str()],
        "not the other definition, though it ranks first"
    );
    let s0 = &claimed[0].0.steps[0];
    assert_eq!(s0.timeout_ms, 5_000);
    assert_eq!(s0.deadline_at, s0.started_at.map(|t| t + 5_000));
    assert!(claimed[0].2, "the claim started the step");
    let claimed = store
        .claim_many("n2", 10_000, &NONE, 8, &["other".to_string()])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].0.id, other);
    let only = &claimed[0].0.steps[0];
    assert_eq!(only.deadline_at, only.started_at.map(|t| t + 7_000));
    // Read back: the stored timeout and the deadline it gave.
    let w = store.workflow(&other).await.unwrap().unwrap();
    assert_eq!(
        (w.steps[0].timeout_ms, w.steps[0].status),
        (7_000, StepStatus::Running)
    );
    assert!(
        store
            .claim_many("n3", 10_000, &NONE, 8, &[])
            .await
            .unwrap()
            .is_empty(),
        "a node that runs nothing claims nothing"
    );
}

/// Steps that ran one after another unrecorded are recorded in one completion: each started
/// (one attempt) and done, with its events in order; a cancel pending still records them all
/// done (so their undo runs), and a wrong node records none.
async fn ran_together(store: Store) {
    let id = store.enqueue_workflow(&wf("alice", 4)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    let next = |idx, name| NextStep {
        idx,
        name,
        deadline_ms: 5_000,
    };
    let commit = StepCommit {
        output: Some(json!({"made": 2})),
        effects: vec![(format!("{id}/2/s2"), json!({"x": 2}))],
        ..StepCommit::default()
    };
    let ran = [(0, "s0"), (1, "s1")];
    assert!(
        store
            .complete(Completion {
                ran: &ran,
                next: Some(next(3, "s3")),
                ..Completion::of(&id, "n2", 2, "s2", &commit)
            })
            .await
            .unwrap_err()
            .is_lease_lost(),
        "another node's completion is refused"
    );
    let before = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(before.step, 0);
    assert_eq!(before.steps[1].status, StepStatus::Pending);
    let (evs, cancel, _) = store
        .complete(Completion {
            ran: &ran,
            next: Some(next(3, "s3")),
            ..Completion::of(&id, "n1", 2, "s2", &commit)
        })
        .await
        .unwrap();
    assert!(!cancel);
    let seen: Vec<(&str, &str)> = evs
        .iter()
        .map(|e| (e.kind.as_str(), e.step.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        seen,
        [
            ("step_done", "s0"),
            ("step_started", "s1"),
            ("step_done", "s1"),
            ("step_started", "s2"),
            ("step_done", "s2"),
            ("step_started", "s3"),
        ]
    );
    assert!(evs.windows(2).all(|w| w[0].seq < w[1].seq), "{evs:?}");
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!((w.status, w.step), (WorkflowStatus::Running, 3));
    for s in &w.steps[..3] {
        assert_eq!((s.status, s.attempts), (StepStatus::Done, 1), "{s:?}");
        assert!(s.started_at.is_some() && s.finished_at.is_some(), "{s:?}");
    }
    assert_eq!(w.steps[3].status, StepStatus::Running);
    assert_eq!(w.steps[0].output, None);
    assert_eq!(w.steps[2].output, Some(json!({"made": 2})));
    let eff = store.step_effects(&id).await.unwrap();
    assert_eq!((eff.len(), eff[0].idx), (1, 2));
    let (evs, _, _) = store
        .complete(Completion {
            finish: true,
            ..Completion::of(&id, "n1", 3, "s3", &StepCommit::default())
        })
        .await
        .unwrap();
    assert_eq!(evs.last().unwrap().kind, "succeeded");

    // A cancel asked for meanwhile: every step that ran is recorded done, the next not started.
    let actor = Actor::new("alice", "test");
    let id = store.enqueue_workflow(&wf("alice", 3)).await.unwrap();
    store
        .claim_many("n1", 10_000, &NONE, 8, &runs())
        .await
        .unwrap();
    store.request_cancel(&id, &actor).await.unwrap();
    let (evs, cancel, _) = store
        .complete(Completion {
            ran: &[(0, "s0")],
            next: Some(next(2, "s2")),
            ..Completion::of(&id, "n1", 1, "s1", &StepCommit::default())
        })
        .await
        .unwrap();
    assert!(cancel, "the completion sees the cancel");
    assert_eq!(
        evs.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["step_done", "step_started", "step_done"]
    );
    store
        .begin_cancel(&id, "n1", 1, "cancelled on request")
        .await
        .unwrap();
    let w = store.workflow(&id).await.unwrap().unwrap();
    assert_eq!(
        w.steps.iter().map(|s| s.status).collect::<Vec<_>>(),
        [StepStatus::Done, StepStatus::Done, StepStatus::Skipped]
    );
    assert_eq!(w.status, WorkflowStatus::Undoing);
}
