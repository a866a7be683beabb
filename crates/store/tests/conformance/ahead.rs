//! Batch nodes leased ahead of their slots: held at admission (or by a hand-off), passed over
//! by every fill and claim while the lease lasts, run on the slot a finishing node passes
//! them, and given back.
use crate::batches::{batch_req, node};
use crate::vms::{actor, pool, user, vm_hooks};
use crate::{Case, Fut};
use basphere_store::{
    BatchAdmitted, BatchVm, ClaimLimits, Completion, Handoff, LeaseTo, StepCommit, StepStatus,
    Store, WorkflowStatus,
};

pub fn cases() -> Vec<Case> {
    vec![
        ("batch_nodes_held_ahead_take_passed_slots", |s| {
            Box::pin(held_ahead(s)) as Fut
        }),
        ("batch_pass_and_ending_in_one_group_free_one_slot", |s| {
            Box::pin(pass_in_one_group(s)) as Fut
        }),
        ("batch_hand_off_leases_ahead_and_cancels_wait", |s| {
            Box::pin(hand_off_ahead(s)) as Fut
        }),
        (
            "batch_nodes_held_by_a_node_gone_are_free_when_the_lease_ends",
            |s| Box::pin(holder_gone(s)) as Fut,
        ),
    ]
}

const RUNS: &[&str] = &["create_vm"];

/// A batch of `n` independent nodes `{prefix}0…` of `alice`'s (registered here, with the VM
/// hooks) at parallelism `par`, leasing a slot for each to n1 for a minute; and the nodes'
/// operations, in order.
async fn admit(store: &Store, prefix: &str, n: usize, par: u32) -> (BatchAdmitted, Vec<String>) {
    admit_for(store, prefix, n, par, 60_000).await
}

/// [`admit`], the leases for `lease_ms`.
async fn admit_for(
    store: &Store,
    prefix: &str,
    n: usize,
    par: u32,
    lease_ms: i64,
) -> (BatchAdmitted, Vec<String>) {
    vm_hooks(store);
    let alice = user(store, "alice", 10).await;
    let creates: Vec<BatchVm> = (0..n)
        .map(|i| node(&format!("{prefix}{i}"), &[], &[]))
        .collect();
    let req = batch_req(&alice, par, creates, &[]);
    let lease = LeaseTo {
        node: "n1".into(),
        lease_ms,
        max: par as usize,
    };
    let b = store
        .admit_batch_leased(&req, &pool(), &actor(), Some(lease))
        .await
        .unwrap();
    let ops = b.nodes.iter().map(|n| n.operation_id.clone()).collect();
    (b, ops)
}

/// The ids n2 claims now (any definition the VM batches run).
async fn n2_claims(store: &Store) -> Vec<String> {
    let runs: Vec<String> = RUNS.iter().map(|s| s.to_string()).collect();
    let mut ids: Vec<String> = store
        .claim_many("n2", 60_000, &ClaimLimits::default(), 8, &runs)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.0.id)
        .collect();
    ids.sort();
    ids
}

/// Both steps of a create done by n1 at once (`clone` unrecorded after the start, or both
/// unrecorded for a node held ahead).
fn done<'a>(wf: &'a str, commit: &'a StepCommit) -> Completion<'a> {
    Completion {
        ran: &[(0, "clone")],
        finish: true,
        ..Completion::of(wf, "n1", 1, "boot", commit)
    }
}

/// [`done`], passing the slot to `to`, held ahead.
fn passing<'a>(wf: &'a str, to: &'a str, commit: &'a StepCommit) -> Completion<'a> {
    Completion {
        pass_to: Some(to),
        ..done(wf, commit)
    }
}

/// A finishing node's hand-off, leasing `ahead` more nodes ahead of their slots.
fn handing_off(ahead: u32) -> Option<Handoff> {
    Some(Handoff {
        lease_ms: 60_000,
        ahead,
    })
}

/// Both steps of node `wf`, held ahead, done by n1 on the slot `from` passed it (none of
/// them recorded running before).
fn held<'a>(wf: &'a str, from: &'a str, commit: &'a StepCommit) -> Completion<'a> {
    Completion {
        took_slot_of: Some(from),
        unstarted: true,
        ..done(wf, commit)
    }
}

async fn held_ahead(store: Store) {
    let (b, ops) = admit(&store, "h", 5, 2).await;
    // Two given their slots and leased; the other three held ahead, in queue order, as
    // stored, their VMs read ahead.
    assert_eq!(b.leased.len(), 2);
    let ids: Vec<&str> = b.held.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ops[2..].iter().map(String::as_str).collect::<Vec<_>>());
    for w in &b.held {
        let stored = store.workflow(&w.id).await.unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(w).unwrap(),
            serde_json::to_value(&stored).unwrap()
        );
        assert_eq!(stored.status, WorkflowStatus::Pending);
        let vm = &w.resource.as_ref().unwrap().id;
        let (read, _) = store.vm_and_key(vm).await.unwrap().unwrap();
        assert_eq!(&read.id, vm);
    }
    // Nothing for another node: both slots run, the rest are held.
    assert!(n2_claims(&store).await.is_empty());

    // h0 finishes and passes its slot to h2, already running in memory.
    let commit = StepCommit::default();
    let (_, cancel, handed) = store
        .complete(Completion {
            handoff: handing_off(0),
            ..passing(&ops[0], &ops[2], &commit)
        })
        .await
        .unwrap();
    assert!(!cancel);
    assert!(handed.is_none(), "its slot went to h2: none to hand off");
    let h2 = store.workflow(&ops[2]).await.unwrap().unwrap();
    assert_eq!(
        h2.status,
        WorkflowStatus::Running,
        "the pass counts h2 running"
    );
    assert!(n2_claims(&store).await.is_empty());

    // h2's completion records every step, none of which was recorded running.
    store
        .complete(held(&ops[2], &ops[0], &commit))
        .await
        .unwrap();
    let h2 = store.workflow(&ops[2]).await.unwrap().unwrap();
    assert_eq!(h2.status, WorkflowStatus::Succeeded);
    for s in &h2.steps {
        assert_eq!((s.status, s.attempts), (StepStatus::Done, 1), "{s:?}");
        assert!(s.started_at.is_some());
    }
    let kinds: Vec<String> = store
        .events(&ops[2], 0)
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{}:{}", e.kind, e.step.unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        [
            "queued:",
            "step_started:clone",
            "step_done:clone",
            "step_started:boot",
            "step_done:boot",
            "succeeded:"
        ]
    );
    // Its slot is free, and no fill gives it to a node held ahead (h3, h4).
    assert!(n2_claims(&store).await.is_empty());

    // Given back, they are any node's: the free slot goes to h3.
    store
        .release_ahead(&b.batch_id, &ops[3..], "n1")
        .await
        .unwrap();
    assert_eq!(n2_claims(&store).await, [ops[3].clone()]);

    // A pass to a node n1 no longer holds (h4, given back) finds nobody: the slot is
    // given as a counted fill would, to h4 — still one running per slot.
    store
        .complete(passing(&ops[1], &ops[4], &commit))
        .await
        .unwrap();
    assert_eq!(n2_claims(&store).await, [ops[4].clone()]);
}

/// A node held ahead that ends in the group of the pass to it is never counted running: the
/// one slot both used is freed once, and goes to the next ready node.
async fn pass_in_one_group(store: Store) {
    let (b, ops) = admit(&store, "g", 4, 1).await;
    assert_eq!((b.leased.len(), b.held.len()), (1, 3));
    let commit = StepCommit::default();
    // g0 passes to g1, g1 to g2, queued back to back (one group or two: the same outcome).
    let first = store
        .send_completion(passing(&ops[0], &ops[1], &commit))
        .unwrap();
    let second = store
        .send_completion(Completion {
            pass_to: Some(&ops[2]),
            ..held(&ops[1], &ops[0], &commit)
        })
        .unwrap();
    let (a, c) = futures_util::future::join(first, second).await;
    a.unwrap();
    c.unwrap();
    for op in &ops[..2] {
        let w = store.workflow(op).await.unwrap().unwrap();
        assert_eq!(w.status, WorkflowStatus::Succeeded);
    }
    // g2 holds the batch's one slot: nothing for n2, g3 still held.
    let g2 = store.workflow(&ops[2]).await.unwrap().unwrap();
    assert_eq!(g2.status, WorkflowStatus::Running);
    assert!(n2_claims(&store).await.is_empty());
    // g2 ends without a pass: the slot is free; g3 (held) is passed over until given back.
    store
        .complete(held(&ops[2], &ops[1], &commit))
        .await
        .unwrap();
    assert!(n2_claims(&store).await.is_empty());
    store
        .release_ahead(&b.batch_id, &ops[3..], "n1")
        .await
        .unwrap();
    assert_eq!(n2_claims(&store).await, [ops[3].clone()]);
}

/// A finishing node's hand-off leases ready nodes ahead (as where nodes wait on others and
/// none is held at admission). A cancel asked for on one held is left to its holder (no
/// claim takes it), whose completion finds it and undoes.
async fn hand_off_ahead(store: Store) {
    // Those held at admission given back: the queue is the hand-off's.
    let (mut b, ops) = admit(&store, "k", 4, 1).await;
    assert_eq!(b.held.len(), 3, "independent nodes are held");
    store
        .release_ahead(
            &b.batch_id,
            &b.held.drain(..).map(|w| w.id).collect::<Vec<_>>(),
            "n1",
        )
        .await
        .unwrap();
    let commit = StepCommit::default();
    // k0 ends, hands its slot to k1 and leases two more ahead (k2, k3), none started.
    let d = store
        .complete_with(Completion {
            handoff: handing_off(2),
            ..done(&ops[0], &commit)
        })
        .await
        .unwrap();
    let handed = d.handed.expect("k1 handed off with the slot");
    assert_eq!(handed.0.id, ops[1]);
    assert!(handed.2, "its first step started");
    let ahead: Vec<&str> = d.ahead.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ahead, [ops[2].as_str(), ops[3].as_str()]);
    for w in &d.ahead {
        let stored = store.workflow(&w.id).await.unwrap().unwrap();
        // Leased as stored: every step, none started.
        assert_eq!(
            serde_json::to_value(w).unwrap(),
            serde_json::to_value(&stored).unwrap()
        );
        assert_eq!(stored.status, WorkflowStatus::Pending);
        assert!(stored.steps.iter().all(|s| s.status == StepStatus::Pending));
        let vm = &w.resource.as_ref().unwrap().id;
        assert!(store.vm_and_key(vm).await.unwrap().is_some());
    }
    // A cancel on k3 while n1 holds it: no claim takes it.
    store.request_cancel(&ops[3], &actor()).await.unwrap();
    assert!(n2_claims(&store).await.is_empty());
    // k1 passes to k3; k3's completion finds the cancel: not ended, its steps recorded
    // done for the undo.
    store
        .complete(passing(&ops[1], &ops[3], &commit))
        .await
        .unwrap();
    let (_, cancel, _) = store
        .complete(held(&ops[3], &ops[1], &commit))
        .await
        .unwrap();
    assert!(cancel);
    let k3 = store.workflow(&ops[3]).await.unwrap().unwrap();
    assert!(k3.cancel_requested);
    assert_eq!(k3.status, WorkflowStatus::Running);
    assert!(k3.steps.iter().all(|s| s.status == StepStatus::Done));
    // k3 still holds the one slot: k2 (given back) waits for it.
    store
        .release_ahead(&b.batch_id, &ops[2..3], "n1")
        .await
        .unwrap();
    assert!(n2_claims(&store).await.is_empty());
}

/// The node holding a batch's nodes ahead is gone (its leases run out, by the database's
/// clock): another node takes the running ones over, and the slot each frees goes to a
/// node that was held.
async fn holder_gone(store: Store) {
    let (b, ops) = admit_for(&store, "z", 3, 1, 300).await;
    assert_eq!((b.leased.len(), b.held.len()), (1, 2));
    assert!(n2_claims(&store).await.is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // z0's lease ran out: n2 takes it over (its step restarts) and finishes it.
    assert_eq!(n2_claims(&store).await, [ops[0].clone()]);
    let commit = StepCommit::default();
    store
        .complete(Completion {
            ran: &[(0, "clone")],
            finish: true,
            ..Completion::of(&ops[0], "n2", 1, "boot", &commit)
        })
        .await
        .unwrap();
    // Its slot goes to z1, held by n1 no more.
    assert_eq!(n2_claims(&store).await, [ops[1].clone()]);
}
