//! Batches of VMs: admission with edges and slots, refusals, extras and the disk quota.
use crate::extras::{STORAGE, disk_limit, extras};
use crate::vms::{actor, admit, names, pool, pool_of, small, user, user_in, vm_hooks};
use crate::{Case, Fut};
use basphere_core::{Username, VmStatus};
use basphere_store::{
    AdmitError, BatchError, BatchRequest, BatchVm, ClaimLimits, Completion, LeaseTo, StepCommit,
    StepStatus, Store, WorkflowOutcome, WorkflowStatus,
};
use std::collections::HashSet;

pub fn cases() -> Vec<Case> {
    vec![
        ("batch_admitted_with_edges_and_slots", |s| {
            Box::pin(batch(s)) as Fut
        }),
        ("batch_refusals_change_nothing", |s| {
            Box::pin(batch_refusals(s)) as Fut
        }),
        ("batch_nodes_take_extras_and_the_disk_quota", |s| {
            Box::pin(batch_extras(s)) as Fut
        }),
        ("batch_admission_leases_nodes_given_a_slot", |s| {
            Box::pin(batch_leases(s)) as Fut
        }),
        (
            "batch_dependencies_ending_together_release_each_edge",
            |s| Box::pin(ending_together(s)) as Fut,
        ),
    ]
}

pub(crate) fn node(name: &str, requires: &[&str], optional: &[&str]) -> BatchVm {
    BatchVm {
        name: name.parse().unwrap(),
        os: "ubuntu-24.04".parse().unwrap(),
        login_user: "ubuntu".into(),
        spec_name: "small".parse().unwrap(),
        spec: small(),
        requires: requires.iter().map(|s| s.to_string()).collect(),
        optional: optional.iter().map(|s| s.to_string()).collect(),
        extras: Default::default(),
    }
}

/// The operation of node `n` of batch `b`.
fn op_of(b: &basphere_store::BatchAdmitted, n: &str) -> String {
    let node = b.nodes.iter().find(|x| x.node == n);
    node.unwrap_or_else(|| panic!("no node {n}"))
        .operation_id
        .clone()
}

pub(crate) fn batch_req(
    owner: &Username,
    parallelism: u32,
    creates: Vec<BatchVm>,
    deletes: &[&str],
) -> BatchRequest {
    BatchRequest {
        owner: owner.clone(),
        provider: "mock".into(),
        parallelism,
        creates,
        deletes: names(deletes),
        create_steps: vec!["clone".into(), "boot".into()],
        delete_steps: vec!["destroy".into()],
    }
}

async fn batch(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 10).await;
    // A VM still being made, which a node requires: the node waits for its operation.
    let old = admit(&store, &alice, &["old"]).await.unwrap();
    let creates = vec![
        node("a", &[], &[]),
        node("b", &["a", "a", "old"], &["a"]),
        node("c", &["nosuch"], &["b"]),
        node("d", &[], &[]),
    ];
    let got = store
        .admit_batch(&batch_req(&alice, 2, creates, &["gone"]), &pool(), &actor())
        .await
        .unwrap();
    assert_eq!(got.nodes.len(), 4, "an unknown VM to delete is no node");
    assert!(got.nodes.iter().all(|n| n.action == "create"));
    assert_eq!(
        store.batch_owner(&got.batch_id).await.unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(store.batch_owner("no-such-batch").await.unwrap(), None);
    let mut managed = store.managed_vm_names("alice").await.unwrap();
    managed.sort();
    assert_eq!(managed, ["a", "b", "c", "d"]);
    let vms = store.vms(Some("alice")).await.unwrap();
    let ips: HashSet<_> = vms.iter().map(|v| v.ip_address.unwrap()).collect();
    assert_eq!((vms.len(), ips.len()), (5, 5));
    assert!(vms.iter().all(|v| v.status == VmStatus::Creating));
    assert_eq!(store.usage("alice").await.unwrap().vcpus, 10);
    // Several owners' usage in one read: each as read alone, in the order asked.
    let held = store.usage("alice").await.unwrap();
    let many = ["alice", "nobody", "alice"].map(String::from).to_vec();
    assert_eq!(
        store.usages(many).await.unwrap(),
        [held, basphere_core::Usage::default(), held]
    );
    assert!(store.usages(vec![]).await.unwrap().is_empty());

    let op = |n: &str| op_of(&got, n);
    let waits = |w: &basphere_store::Workflow| w.waiting_on;
    let wb = store.workflow(&op("b")).await.unwrap().unwrap();
    assert_eq!(
        waits(&wb),
        2,
        "one edge per pair: a (hard) and old's create"
    );
    assert_eq!(wb.batch_id.as_deref(), Some(got.batch_id.as_str()));
    assert_eq!((wb.node.as_deref(), wb.steps.len()), (Some("b"), 2));
    assert_eq!(waits(&store.workflow(&op("c")).await.unwrap().unwrap()), 1);
    let audit = store
        .audit_list(&basphere_store::AuditFilter {
            target: Some("alice/c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        audit[0]
            .detail
            .as_deref()
            .unwrap()
            .ends_with(&format!("batch={}", got.batch_id))
    );

    // Two slots: the ready nodes a and d have them, b and c wait; old's create is not in it.
    let mut claimed = HashSet::new();
    while let Some(w) = store
        .claim_workflow("n1", 60_000, &ClaimLimits::default())
        .await
        .unwrap()
    {
        claimed.insert(w.id);
    }
    let want: HashSet<_> = [op("a"), op("d"), old[0].operation_id.clone()].into();
    assert_eq!(claimed, want);

    // A batch deleting a VM that is still creating is refused whole.
    let e = store
        .admit_batch(
            &batch_req(&alice, 1, vec![node("e", &[], &[])], &["old"]),
            &pool(),
            &actor(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, BatchError::Busy(..)), "{e}");
    assert_eq!(
        e.to_string(),
        "VM old is creating; wait for its operation to finish, then apply again"
    );
    assert!(store.vm("alice", "e").await.unwrap().is_none());

    // Once it runs, a batch deletes it (and the delete is the batch's node).
    store
        .finish_workflow(&old[0].operation_id, "n1", &WorkflowOutcome::Succeeded)
        .await
        .unwrap();
    let del = store
        .admit_batch(&batch_req(&alice, 1, vec![], &["old"]), &pool(), &actor())
        .await
        .unwrap();
    assert_eq!(del.nodes.len(), 1);
    assert_eq!(del.nodes[0].action, "delete");
    assert_eq!(
        store.vm("alice", "old").await.unwrap().unwrap().status,
        VmStatus::Deleting
    );
    let w = store
        .workflow(&del.nodes[0].operation_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (w.definition.as_str(), w.priority, w.node.as_deref()),
        ("delete_vm", 10, Some("old"))
    );
    let next = store
        .claim_workflow("n1", 60_000, &ClaimLimits::default())
        .await
        .unwrap();
    assert_eq!(
        next.map(|w| w.id),
        Some(del.nodes[0].operation_id.clone()),
        "its one slot"
    );
}

async fn batch_refusals(store: Store) {
    let alice = user(&store, "alice", 3).await;
    admit(&store, &alice, &["taken"]).await.unwrap();
    let try_batch = |creates: Vec<BatchVm>| {
        let r = batch_req(&alice, 2, creates, &[]);
        let store = store.clone();
        async move { store.admit_batch(&r, &pool(), &actor()).await.unwrap_err() }
    };
    let e = try_batch(vec![
        node("a", &[], &[]),
        node("b", &[], &[]),
        node("c", &[], &[]),
    ])
    .await;
    assert!(matches!(e, BatchError::Admit(AdmitError::Quota(_))), "{e}");
    let e = try_batch(vec![node("a", &[], &[]), node("a", &[], &[])]).await;
    assert_eq!(
        e.to_string(),
        "the same name a appears twice in the request"
    );
    let e = try_batch(vec![node("a", &[], &[]), node("taken", &[], &[])]).await;
    assert_eq!(e.to_string(), "a VM named taken already exists");
    let tiny = pool_of("10.254.0.0/24", 4);
    // Bob's block is the second of four addresses (alice holds the first): five do not fit.
    let bob = user_in(&store, "bob", 10, &tiny).await;
    let five = ["a", "b", "c", "d", "e"]
        .map(|n| node(n, &[], &[]))
        .to_vec();
    let r = batch_req(&bob, 2, five, &[]);
    let e = store.admit_batch(&r, &tiny, &actor()).await.unwrap_err();
    assert!(
        matches!(e, BatchError::Admit(AdmitError::BlockFull(..))),
        "{e}"
    );
    // Nothing of a refused batch was written.
    assert_eq!(store.vms(None).await.unwrap().len(), 1);
    assert!(store.managed_vm_names("alice").await.unwrap().is_empty());
    assert_eq!(store.usage("alice").await.unwrap().vms, 1);
}

/// Batch nodes carry extra disks and networks like single creates, and the disk quota counts
/// every node's boot and extra disks: over it, nothing is admitted.
async fn batch_extras(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 10).await;
    disk_limit(&store, &alice, 200).await;
    let with = |name: &str, disks: &[u32]| BatchVm {
        extras: extras(disks, &[("storage", STORAGE)]),
        ..node(name, &[], &[])
    };
    // 3 × 50 boot + 30 + 30 = 210 > 200.
    let e = store
        .admit_batch(
            &batch_req(
                &alice,
                2,
                vec![with("a", &[30]), with("b", &[30]), with("c", &[])],
                &[],
            ),
            &pool(),
            &actor(),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("GiB of disk"), "{e}");
    assert!(store.vms(Some("alice")).await.unwrap().is_empty());
    // Leased to a node at admission: the first steps read their VMs (with the owner's key)
    // from what the admission wrote, exactly as stored.
    let lease = LeaseTo {
        node: "n1".into(),
        lease_ms: 60_000,
        max: 2,
    };
    let got = store
        .admit_batch_leased(
            &batch_req(&alice, 2, vec![with("a", &[30]), with("b", &[20])], &[]),
            &pool(),
            &actor(),
            Some(lease),
        )
        .await
        .unwrap();
    assert_eq!(got.leased.len(), 2);
    for (wf, _, _) in &got.leased {
        let id = &wf.resource.as_ref().unwrap().id;
        let (read, key) = store.vm_and_key(id).await.unwrap().unwrap();
        let stored = store.vm_by_id(id).await.unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&stored).unwrap()
        );
        let user = store.user(alice.as_str()).await.unwrap().unwrap();
        assert_eq!(key.as_deref(), Some(user.public_key.as_str()));
    }
    let vms = store.vms(Some("alice")).await.unwrap();
    let a = vms.iter().find(|v| v.name.as_str() == "a").unwrap();
    assert_eq!(a.extra_disks, extras(&[30], &[]).disks);
    let nics: HashSet<_> = vms.iter().map(|v| v.extra_nics[0].ip.unwrap()).collect();
    assert_eq!(nics.len(), 2, "each node leased its own address");
    assert_eq!(store.usage("alice").await.unwrap().disk_gib, 150);
}

/// A batch admission that leases to a node with slots: only nodes given a batch slot are
/// leased (at most as many as the node offers), running with their first step started; the
/// other slotted nodes are left for any node to claim, and nodes with no slot for none.
async fn batch_leases(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 10).await;
    // `alice`'s batch of `nodes` at parallelism 2, leasing up to `max` to node n1.
    let apply = |nodes: Vec<BatchVm>, max: usize| {
        let (store, r) = (store.clone(), batch_req(&alice, 2, nodes, &[]));
        let lease = LeaseTo {
            node: "n1".into(),
            lease_ms: 60_000,
            max,
        };
        async move {
            store
                .admit_batch_leased(&r, &pool(), &actor(), Some(lease))
                .await
        }
    };
    let creates = vec![
        node("a", &[], &[]),
        node("b", &[], &[]),
        node("c", &[], &[]),
        node("d", &["a"], &[]),
    ];
    // Parallelism 2, a node offering 1 slot: `a` leased; `b` slotted; `c` and `d` wait.
    let got = apply(creates, 1).await.unwrap();
    let op = |n: &str| op_of(&got, n);
    let [(wf, evs, started)] = &got.leased[..] else {
        panic!("one node leased, got {}", got.leased.len());
    };
    assert_eq!(wf.id, op("a"));
    assert!(*started);
    assert_eq!((wf.status, wf.step), (WorkflowStatus::Running, 0));
    assert_eq!(
        (wf.steps[0].status, wf.steps[0].attempts),
        (StepStatus::Running, 1)
    );
    assert_eq!(
        (evs[0].kind.as_str(), evs[0].step.as_deref()),
        ("step_started", Some("clone"))
    );
    let stored = store.workflow(&wf.id).await.unwrap().unwrap();
    assert_eq!(stored.steps[0].status, StepStatus::Running);
    let runs = vec!["create_vm".to_string()];
    let none = ClaimLimits::default();
    let other = store
        .claim_many("n2", 60_000, &none, 8, &runs)
        .await
        .unwrap();
    assert_eq!(
        other.iter().map(|c| c.0.id.clone()).collect::<Vec<_>>(),
        [op("b")],
        "the batch's other slot, and nothing beyond its parallelism"
    );
    // Offered more slots than the batch has: only its parallelism's worth is leased.
    let more = vec![
        node("e", &[], &[]),
        node("f", &[], &[]),
        node("g", &[], &[]),
    ];
    let got = apply(more, 8).await.unwrap();
    assert_eq!(got.leased.len(), 2);
    assert!(
        got.leased
            .iter()
            .all(|(w, _, s)| *s && w.status == WorkflowStatus::Running)
    );
    assert!(
        store
            .claim_many("n2", 60_000, &none, 8, &runs)
            .await
            .unwrap()
            .is_empty()
    );
    // A refused batch leases nothing.
    let over: Vec<BatchVm> = (0..5).map(|i| node(&format!("x{i}"), &[], &[])).collect();
    let e = apply(over, 2).await.unwrap_err();
    assert!(matches!(e, BatchError::Admit(AdmitError::Quota(_))), "{e}");
}

/// Nodes whose two dependencies end at the same moment (their completions sent together, so
/// that they share group commits): each dependent waits for no edge any more, exactly once
/// each, and only then is it claimed.
async fn ending_together(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 12).await;
    let mut creates = vec![];
    for i in 0..3 {
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        creates.push(node(&a, &[], &[]));
        creates.push(node(&b, &[], &[]));
        creates.push(node(&format!("c{i}"), &[&a, &b], &[]));
    }
    let got = store
        .admit_batch(&batch_req(&alice, 9, creates, &[]), &pool(), &actor())
        .await
        .unwrap();
    let op = |n: &str| op_of(&got, n);
    let runs = vec!["create_vm".to_string()];
    let none = ClaimLimits::default();
    let claimed = store
        .claim_many("n1", 60_000, &none, 9, &runs)
        .await
        .unwrap();
    let mut ids: Vec<String> = claimed.iter().map(|c| c.0.id.clone()).collect();
    ids.sort();
    let mut parents: Vec<String> = (0..3)
        .flat_map(|i| [op(&format!("a{i}")), op(&format!("b{i}"))])
        .collect();
    parents.sort();
    assert_eq!(ids, parents, "only the nodes with no edge are claimed");
    let child = |i: usize| {
        let (store, id) = (store.clone(), op(&format!("c{i}")));
        async move { store.workflow(&id).await.unwrap().unwrap() }
    };
    for i in 0..3 {
        assert_eq!(child(i).await.waiting_on, 2);
    }
    let done = StepCommit::default();
    let ends = parents.iter().map(|id| {
        let (store, done) = (store.clone(), done.clone());
        let id = id.clone();
        async move {
            store
                .complete(Completion {
                    ran: &[(0, "clone")],
                    finish: true,
                    ..Completion::of(&id, "n1", 1, "boot", &done)
                })
                .await
        }
    });
    for r in futures_util::future::join_all(ends).await {
        r.unwrap();
    }
    for id in &parents {
        let w = store.workflow(id).await.unwrap().unwrap();
        assert_eq!(w.status, WorkflowStatus::Succeeded);
    }
    for i in 0..3 {
        let c = child(i).await;
        assert_eq!(
            (c.status, c.waiting_on),
            (WorkflowStatus::Pending, 0),
            "c{i}"
        );
    }
    let mut next: Vec<String> = store
        .claim_many("n1", 60_000, &none, 9, &runs)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.0.id)
        .collect();
    next.sort();
    let mut want: Vec<String> = (0..3).map(|i| op(&format!("c{i}"))).collect();
    want.sort();
    assert_eq!(next, want);
}
