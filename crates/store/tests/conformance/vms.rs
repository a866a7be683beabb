//! VM admission, deletes, listings and batches.
use crate::{Case, Fut, ReplicaCase};
use basphere_core::{
    DiskMode, ExtraDisk, NetworkPool, Quota, QuotaLimit, Spec, Username, VmName, VmOperation,
    VmStatus,
};
use basphere_store::{
    Actor, AdmitError, AdmitExtras, AdmitRequest, BatchError, BatchRequest, BatchVm, ClaimLimits,
    DeleteError, ExtraNetwork, Hooks, LeaseTo, NewRegistration, RetryCtx, StepStatus, Store,
    WorkflowOutcome, WorkflowStatus,
};
use std::collections::HashSet;

pub fn cases() -> Vec<Case> {
    vec![
        ("vms_admit_then_read_back", |s| {
            Box::pin(admit_then_read(s)) as Fut
        }),
        ("vms_admit_refusals_change_nothing", |s| {
            Box::pin(admit_refusals(s)) as Fut
        }),
        ("vms_block_full_and_no_block", |s| {
            Box::pin(block_full(s)) as Fut
        }),
        ("vms_delete_busy_unknown_then_done", |s| {
            Box::pin(delete(s)) as Fut
        }),
        ("vms_retry_readmits_within_quota", |s| {
            Box::pin(retry_readmits(s)) as Fut
        }),
        ("vms_listing_and_paging", |s| Box::pin(listing(s)) as Fut),
        ("vms_usage_sums_and_cpu_quota", |s| {
            Box::pin(usage_sums(s)) as Fut
        }),
        ("batch_admitted_with_edges_and_slots", |s| {
            Box::pin(batch(s)) as Fut
        }),
        ("batch_refusals_change_nothing", |s| {
            Box::pin(batch_refusals(s)) as Fut
        }),
        ("vms_extras_stored_leased_and_released", |s| {
            Box::pin(extras_stored(s)) as Fut
        }),
        ("vms_extras_refusals_change_nothing", |s| {
            Box::pin(extras_refusals(s)) as Fut
        }),
        ("vms_retry_rechecks_the_disk_limit", |s| {
            Box::pin(retry_rechecks_disk(s)) as Fut
        }),
        (
            "vms_rolled_back_create_gives_its_network_address_back",
            |s| Box::pin(rollback_frees_nic(s)) as Fut,
        ),
        ("batch_nodes_take_extras_and_the_disk_quota", |s| {
            Box::pin(batch_extras(s)) as Fut
        }),
        ("vms_admission_leases_its_first_workflows", |s| {
            Box::pin(admission_leases(s)) as Fut
        }),
    ]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![
        ("vms_50_creates_on_two_replicas_quota_10", |a, b| {
            Box::pin(fifty_at_quota_ten(a, b)) as Fut
        }),
        ("vms_two_users_at_once_never_share_an_address", |a, b| {
            Box::pin(two_users_at_once(a, b)) as Fut
        }),
        (
            "vms_disk_quota_and_nic_leases_exact_on_two_replicas",
            |a, b| Box::pin(extras_at_once(a, b)) as Fut,
        ),
    ]
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";

fn actor() -> Actor {
    Actor::new("test", "test")
}

/// A /24 of eight 32-address blocks (30 assignable in block 0, 32 in the others).
fn pool() -> NetworkPool {
    pool_of("10.254.0.0/24", 32)
}

fn pool_of(cidr: &str, block_size: u32) -> NetworkPool {
    NetworkPool {
        cidr: cidr.parse().unwrap(),
        gateway: "10.254.0.1".parse().unwrap(),
        dns: vec![],
        mtu: 1500,
        block_size,
        reserved: vec![],
    }
}

fn small() -> Spec {
    Spec {
        vcpus: 2,
        memory_mib: 4096,
        disk_gib: 50,
    }
}

/// Registers `name` with `quota` (not approved).
async fn register(store: &Store, name: &str, quota: Quota) -> Username {
    let u: Username = name.parse().unwrap();
    let reg = NewRegistration {
        username: u.clone(),
        email: "t@example.org".parse().unwrap(),
        team: "test".parse().unwrap(),
        public_key: KEY.parse().unwrap(),
    };
    store.register(&reg, &quota, &actor()).await.unwrap();
    u
}

/// Registers and approves `name` (an IP block of `pool`) with room for `vms` VMs.
async fn user_in(store: &Store, name: &str, vms: u32, pool: &NetworkPool) -> Username {
    let q = Quota {
        max_vms: vms,
        max_ips: vms,
        ..Quota::default()
    };
    let u = register(store, name, q).await;
    store
        .approve(&u, pool, false, None, &actor())
        .await
        .unwrap();
    u
}

pub(crate) async fn user(store: &Store, name: &str, vms: u32) -> Username {
    user_in(store, name, vms, &pool()).await
}

fn names(ns: &[&str]) -> Vec<VmName> {
    ns.iter().map(|n| n.parse().unwrap()).collect()
}

fn req(owner: &Username, ns: &[&str], spec: Spec) -> AdmitRequest {
    AdmitRequest {
        owner: owner.clone(),
        names: names(ns),
        os: "ubuntu-24.04".parse().unwrap(),
        login_user: "ubuntu".into(),
        spec_name: "small".parse().unwrap(),
        spec,
        provider: "mock".into(),
        steps: vec!["clone".into(), "boot".into()],
    }
}

pub(crate) async fn admit(
    store: &Store,
    owner: &Username,
    ns: &[&str],
) -> Result<Vec<basphere_store::Admitted>, AdmitError> {
    store
        .admit_vms(&req(owner, ns, small()), &pool(), &actor())
        .await
}

/// Claims and ends `op` (the store's only pending workflow) with `outcome`.
async fn end(store: &Store, op: &str, outcome: WorkflowOutcome) {
    let w = store
        .claim_workflow("n1", 60_000, &ClaimLimits::default())
        .await
        .unwrap()
        .expect("a workflow to claim");
    assert_eq!(w.id, op);
    store.finish_workflow(op, "n1", &outcome).await.unwrap();
}

fn vm_hooks(store: &Store) {
    store.set_hooks("create_vm", Hooks::vm(VmOperation::Create));
    store.set_hooks("delete_vm", Hooks::vm(VmOperation::Delete));
}

async fn admit_then_read(store: Store) {
    let alice = user(&store, "alice", 3).await;
    let got = admit(&store, &alice, &["web", "db"]).await.unwrap();
    assert_eq!(got.len(), 2);
    let in_block = |ip: std::net::Ipv4Addr| ip.octets()[..3] == [10, 254, 0] && ip.octets()[3] < 32;
    for a in &got {
        assert_eq!(a.vm.status, VmStatus::Creating);
        assert_eq!((a.vm.vcpus, a.vm.memory_mib, a.vm.disk_gib), (2, 4096, 50));
        assert_eq!(
            (a.vm.os.as_str(), a.vm.login_user.as_str()),
            ("ubuntu-24.04", "ubuntu")
        );
        assert_eq!(
            (a.vm.spec.as_str(), a.vm.provider.as_str()),
            ("small", "mock")
        );
        assert!(in_block(a.vm.ip_address.unwrap()));
        let w = store.workflow(&a.operation_id).await.unwrap().unwrap();
        assert_eq!((w.definition.as_str(), w.priority), ("create_vm", 0));
        assert_eq!(w.resource.as_ref().unwrap().id, a.vm.id);
        assert_eq!(w.steps.len(), 2);
    }
    assert_ne!(got[0].vm.ip_address, got[1].vm.ip_address);
    assert_eq!(got[0].vm.ip_address, Some("10.254.0.2".parse().unwrap()));

    let web = store.vm("alice", "web").await.unwrap().unwrap();
    assert_eq!(
        (web.id.as_str(), web.ip_address),
        (got[0].vm.id.as_str(), got[0].vm.ip_address)
    );
    assert!(store.vm("alice", "nope").await.unwrap().is_none());
    assert!(store.vm("bob", "web").await.unwrap().is_none());
    let db = store.vm_by_id(&got[1].vm.id).await.unwrap().unwrap();
    assert_eq!(db.name.as_str(), "db");
    assert!(store.vm_by_id("no-such-id").await.unwrap().is_none());
    let (vm, key) = store.vm_and_key(&got[1].vm.id).await.unwrap().unwrap();
    assert_eq!((vm.name.as_str(), key.as_deref()), ("db", Some(KEY)));
    assert!(store.vm_and_key("no-such-id").await.unwrap().is_none());

    let u = store.usage("alice").await.unwrap();
    assert_eq!((u.vms, u.ips, u.vcpus, u.memory_mib), (2, 2, 4, 8192));
    let audit = store
        .audit_list(&basphere_store::AuditFilter {
            action: Some("vm.create".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].target, "alice/db");
    assert_eq!(audit[0].result, "accepted");
    let detail = audit[0].detail.as_deref().unwrap();
    assert!(
        detail.starts_with("ip=10.254.0.3 spec=small os=ubuntu-24.04 operation="),
        "{detail}"
    );
}

async fn admit_refusals(store: Store) {
    let alice = user(&store, "alice", 3).await;
    let e = admit(&store, &alice, &["a", "b", "c", "d"])
        .await
        .unwrap_err();
    let AdmitError::Quota(q) = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (q.limit, q.used, q.requested, q.max),
        (QuotaLimit::Vms, 0, 4, 3)
    );
    assert!(
        store.vms(Some("alice")).await.unwrap().is_empty(),
        "all or nothing"
    );

    let e = admit(&store, &alice, &["a", "b", "a"]).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the same name a appears twice in the request"
    );
    admit(&store, &alice, &["a"]).await.unwrap();
    let e = admit(&store, &alice, &["b", "a"]).await.unwrap_err();
    assert_eq!(e.to_string(), "a VM named a already exists");
    assert_eq!(store.vms(Some("alice")).await.unwrap().len(), 1);
    // Names are per owner.
    let bob = user(&store, "bob", 3).await;
    admit(&store, &bob, &["a"]).await.unwrap();

    let ghost: Username = "ghost".parse().unwrap();
    let e = admit(&store, &ghost, &["a"]).await.unwrap_err();
    assert_eq!(e.to_string(), "user ghost not found");
    let carol = register(&store, "carol", Quota::default()).await;
    let e = admit(&store, &carol, &["a"]).await.unwrap_err();
    assert!(matches!(e, AdmitError::NotActive(..)), "{e}");
    assert_eq!(
        e.to_string(),
        "user carol is pending; only active users can create VMs"
    );
    // Quota counts what is held: two more fit, a third does not.
    admit(&store, &alice, &["b", "c"]).await.unwrap();
    let e = admit(&store, &alice, &["d"]).await.unwrap_err();
    assert!(matches!(e, AdmitError::Quota(_)), "{e}");
    assert_eq!(store.usage("alice").await.unwrap().vms, 3);
}

async fn block_full(store: Store) {
    // Blocks of four: block 0 loses the network address and the gateway, two are left.
    let tiny = pool_of("10.254.0.0/24", 4);
    let alice = user_in(&store, "alice", 10, &tiny).await;
    let r = req(&alice, &["a", "b", "c"], small());
    let e = store.admit_vms(&r, &tiny, &actor()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no free address left in user alice's block 10.254.0.0/30"
    );
    assert!(
        store.vms(Some("alice")).await.unwrap().is_empty(),
        "all or nothing"
    );
    let got = store
        .admit_vms(&req(&alice, &["a", "b"], small()), &tiny, &actor())
        .await
        .unwrap();
    let ips: Vec<_> = got
        .iter()
        .map(|a| a.vm.ip_address.unwrap().to_string())
        .collect();
    assert_eq!(ips, ["10.254.0.2", "10.254.0.3"]);
    let e = store
        .admit_vms(&req(&alice, &["c"], small()), &tiny, &actor())
        .await
        .unwrap_err();
    assert!(matches!(e, AdmitError::BlockFull(..)), "{e}");

    // A block the configured pool no longer has.
    let bob = user_in(&store, "bob", 10, &tiny).await;
    let one_block = pool_of("10.254.0.0/30", 4);
    let e = store
        .admit_vms(&req(&bob, &["a"], small()), &one_block, &actor())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "user bob has no IP block yet (approve the user first)"
    );
}

async fn delete(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 3).await;
    let steps = vec!["destroy".into()];
    let e = store
        .begin_delete_vm("alice", "nope", &steps, &actor())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "VM nope not found");
    let got = admit(&store, &alice, &["web"]).await.unwrap();
    let op = &got[0].operation_id;
    let e = store
        .begin_delete_vm("alice", "web", &steps, &actor())
        .await
        .unwrap_err();
    assert!(matches!(e, DeleteError::Busy(..)), "{e}");
    assert_eq!(
        e.to_string(),
        format!("VM web is creating; wait for its operation {op} to finish, then delete it")
    );
    // Another owner's VM of the same name is not theirs to delete.
    let e = store
        .begin_delete_vm("bob", "web", &steps, &actor())
        .await
        .unwrap_err();
    assert!(matches!(e, DeleteError::NotFound(_)), "{e}");

    end(&store, op, WorkflowOutcome::Succeeded).await;
    assert_eq!(
        store.vm("alice", "web").await.unwrap().unwrap().status,
        VmStatus::Running
    );
    let d = store
        .begin_delete_vm("alice", "web", &steps, &actor())
        .await
        .unwrap();
    assert_eq!(d.vm.status, VmStatus::Deleting);
    assert_eq!(
        store.vm("alice", "web").await.unwrap().unwrap().status,
        VmStatus::Deleting
    );
    let w = store.workflow(&d.operation_id).await.unwrap().unwrap();
    assert_eq!((w.definition.as_str(), w.priority), ("delete_vm", 10));
    let e = store
        .begin_delete_vm("alice", "web", &steps, &actor())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "VM web is deleting; wait for its operation {} to finish, then delete it",
            d.operation_id
        )
    );
    end(&store, &d.operation_id, WorkflowOutcome::Succeeded).await;
    assert!(store.vm("alice", "web").await.unwrap().is_none());
    assert_eq!(store.usage("alice").await.unwrap().vms, 0);
}

/// A retry of the failed create `op` (alice's VM `web`) is refused with `why` and leaves the VM
/// failed while `other` holds what it needs; once `other` has failed (and given it back), the
/// retry is accepted.
async fn refused_until_freed(store: &Store, op: &str, other: &str, why: &str) {
    let p = pool();
    let ctx = RetryCtx { pool: &p };
    let e = store.retry_workflow(op, &ctx, &actor()).await.unwrap_err();
    assert!(e.to_string().contains(why), "{e}");
    assert_eq!(
        store.vm("alice", "web").await.unwrap().unwrap().status,
        VmStatus::Failed
    );
    end(store, other, WorkflowOutcome::Failed("boom".into())).await;
    store.retry_workflow(op, &ctx, &actor()).await.unwrap();
}

async fn retry_readmits(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 1).await;
    let got = admit(&store, &alice, &["web"]).await.unwrap();
    let op = got[0].operation_id.clone();
    // No step was done: the rollback is confirmed, the address and the quota are free.
    end(&store, &op, WorkflowOutcome::Failed("boom".into())).await;
    let vm = store.vm("alice", "web").await.unwrap().unwrap();
    assert_eq!((vm.status, vm.ip_address), (VmStatus::Failed, None));
    assert_eq!(store.usage("alice").await.unwrap().vms, 0);

    // The quota went to another VM meanwhile: the retry is refused and changes nothing.
    let other = admit(&store, &alice, &["db"]).await.unwrap();
    refused_until_freed(&store, &op, &other[0].operation_id, "quota exceeded").await;
    let vm = store.vm("alice", "web").await.unwrap().unwrap();
    assert_eq!(vm.status, VmStatus::Creating);
    assert_eq!(vm.ip_address, Some("10.254.0.2".parse().unwrap()));
    assert_eq!(store.usage("alice").await.unwrap().vms, 1);
}

async fn listing(store: Store) {
    let bob = user(&store, "bob", 10).await;
    let alice = user(&store, "alice", 10).await;
    admit(&store, &bob, &["zz", "a-b"]).await.unwrap();
    admit(&store, &alice, &["web", "ab", "a-c", "db", "z9"])
        .await
        .unwrap();

    let all = store.vms(None).await.unwrap();
    let by_name: Vec<_> = all
        .iter()
        .map(|v| format!("{}/{}", v.owner, v.name))
        .collect();
    assert_eq!(
        by_name,
        [
            "alice/a-c",
            "alice/ab",
            "alice/db",
            "alice/web",
            "alice/z9",
            "bob/a-b",
            "bob/zz"
        ]
    );
    assert_eq!(store.vms(Some("bob")).await.unwrap().len(), 2);
    assert!(store.vms(Some("carol")).await.unwrap().is_empty());

    // Pages of two in creation order, for everyone and for one owner.
    let mut created: Vec<_> = all.iter().map(|v| v.id.clone()).collect();
    created.sort();
    for (owner, want) in [
        (None, created.clone()),
        (Some("alice"), created[2..].to_vec()),
    ] {
        let mut seen = vec![];
        let mut after: Option<String> = None;
        loop {
            let page = store.vms_page(owner, after.as_deref(), 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            seen.extend(page.iter().map(|v| v.id.clone()));
        }
        assert_eq!(seen, want, "{owner:?}");
    }
    // Pages of two by owner, then name (byte order: "a-c" before "ab"), each page going on
    // after the last one's (owner, name), across owners and for one owner.
    for (owner, want) in [
        (None, by_name.clone()),
        (Some("alice"), by_name[..5].to_vec()),
    ] {
        let mut seen = vec![];
        let mut after: Option<(String, String)> = None;
        loop {
            let at = after.as_ref().map(|(o, n)| (o.as_str(), n.as_str()));
            let page = store.vms_page_by_name(owner, at, 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some((last.owner.to_string(), last.name.to_string()));
            seen.extend(page.iter().map(|v| format!("{}/{}", v.owner, v.name)));
        }
        assert_eq!(seen, want, "{owner:?}");
    }
    let bobs = store.vms_page(Some("bob"), None, 10).await.unwrap();
    assert_eq!(
        bobs.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["zz", "a-b"]
    );
}

async fn usage_sums(store: Store) {
    let u = register(
        &store,
        "alice",
        Quota {
            max_vms: 10,
            max_ips: 10,
            max_vcpus: Some(7),
            max_memory_mib: Some(24_576),
            ..Quota::default()
        },
    )
    .await;
    store
        .approve(&u, &pool(), false, None, &actor())
        .await
        .unwrap();
    let big = Spec {
        vcpus: 4,
        memory_mib: 16_384,
        disk_gib: 100,
    };
    assert_eq!(store.usage("alice").await.unwrap(), Default::default());
    store
        .admit_vms(&req(&u, &["big"], big), &pool(), &actor())
        .await
        .unwrap();
    store
        .admit_vms(&req(&u, &["s1"], small()), &pool(), &actor())
        .await
        .unwrap();
    let used = store.usage("alice").await.unwrap();
    assert_eq!(
        (used.vms, used.ips, used.vcpus, used.memory_mib),
        (2, 2, 6, 20_480)
    );
    let e = store
        .admit_vms(&req(&u, &["s2"], small()), &pool(), &actor())
        .await
        .unwrap_err();
    let AdmitError::Quota(q) = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (q.limit, q.used, q.requested, q.max),
        (QuotaLimit::Vcpus, 6, 2, 7)
    );
    assert_eq!(store.usage("nobody").await.unwrap(), Default::default());
}

fn node(name: &str, requires: &[&str], optional: &[&str]) -> BatchVm {
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

fn batch_req(
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

    let op = |n: &str| {
        got.nodes
            .iter()
            .find(|x| x.node == n)
            .unwrap()
            .operation_id
            .clone()
    };
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

/// 50 creates (one VM each, distinct names) at once, alternating between the two stores, for
/// a user whose quota is 10: exactly 10 admitted with 10 distinct addresses, 40 refused for
/// the quota.
async fn fifty_at_quota_ten(a: Store, b: Store) {
    let alice = user(&a, "alice", 10).await;
    let tries = (0..50).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let r = req(&alice, &[&format!("vm{i}")], small());
        async move { store.admit_vms(&r, &pool(), &actor()).await }
    });
    let out = futures_util::future::join_all(tries).await;
    let (ok, refused): (Vec<_>, Vec<_>) = out.into_iter().partition(Result::is_ok);
    for e in refused.iter().map(|r| r.as_ref().unwrap_err()) {
        assert!(matches!(e, AdmitError::Quota(_)), "{e}");
    }
    assert_eq!((ok.len(), refused.len()), (10, 40));
    let ips: HashSet<_> = ok
        .iter()
        .map(|r| r.as_ref().unwrap()[0].vm.ip_address.unwrap())
        .collect();
    assert_eq!(ips.len(), 10);
    let held = b.vms(Some("alice")).await.unwrap();
    assert_eq!(held.len(), 10);
    assert_eq!(
        held.iter()
            .map(|v| v.ip_address)
            .collect::<HashSet<_>>()
            .len(),
        10
    );
    assert_eq!(a.usage("alice").await.unwrap().vms, 10);
}

/// Two users admitting many VMs at once on two stores: every address is held once.
async fn two_users_at_once(a: Store, b: Store) {
    let alice = user(&a, "alice", 20).await;
    let bob = user(&b, "bob", 20).await;
    let tries = (0..40).map(|i| {
        let (store, owner) = match i % 4 {
            0 => (a.clone(), &alice),
            1 => (b.clone(), &alice),
            2 => (a.clone(), &bob),
            _ => (b.clone(), &bob),
        };
        let r = req(owner, &[&format!("vm{i}")], small());
        async move { store.admit_vms(&r, &pool(), &actor()).await.unwrap() }
    });
    futures_util::future::join_all(tries).await;
    let all = a.vms(None).await.unwrap();
    assert_eq!(all.len(), 40);
    let ips: HashSet<_> = all.iter().map(|v| v.ip_address.unwrap()).collect();
    assert_eq!(ips.len(), 40);
}

// ---- extra disks and networks ----------------------------------------------------------------

/// Sets `owner`'s disk quota to `gib`.
async fn disk_limit(store: &Store, owner: &Username, gib: u64) {
    let mut q = store.user(owner.as_str()).await.unwrap().unwrap().quota;
    q.max_disk_gib = Some(gib);
    store.set_quota(owner, &q, &actor()).await.unwrap();
}

fn extras(disks: &[u32], nets: &[(&str, &[&str])]) -> AdmitExtras {
    AdmitExtras {
        disks: disks
            .iter()
            .map(|&size_gib| ExtraDisk {
                size_gib,
                mode: DiskMode::Auto,
            })
            .collect(),
        networks: nets
            .iter()
            .map(|(name, pool)| ExtraNetwork {
                name: name.to_string(),
                pool: pool.iter().map(|a| a.parse().unwrap()).collect(),
            })
            .collect(),
    }
}

async fn admit_x(
    store: &Store,
    owner: &Username,
    ns: &[&str],
    x: &AdmitExtras,
) -> Result<Vec<basphere_store::Admitted>, AdmitError> {
    store
        .admit_vms_with(&req(owner, ns, small()), x, &pool(), &actor())
        .await
}

const STORAGE: &[&str] = &["10.77.0.2", "10.77.0.3", "10.77.0.4"];

/// Extras are stored with the VM and read back by every reader; static addresses are leased
/// lowest first, a DHCP network gets none; a finished delete gives the address back.
async fn extras_stored(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 5).await;
    let x = extras(&[20, 30], &[("storage", STORAGE), ("lab", &[])]);
    let got = admit_x(&store, &alice, &["a", "b"], &x).await.unwrap();
    let a = &got[0].vm;
    assert_eq!(a.extra_disks, x.disks);
    let ips: Vec<_> = got
        .iter()
        .map(|g| {
            g.vm.extra_nics
                .iter()
                .map(|n| (n.network.clone(), n.ip))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        ips,
        [
            vec![
                ("storage".to_string(), Some("10.77.0.2".parse().unwrap())),
                ("lab".to_string(), None)
            ],
            vec![
                ("storage".to_string(), Some("10.77.0.3".parse().unwrap())),
                ("lab".to_string(), None)
            ],
        ]
    );
    // Every reader sees them: by name, by id, listings, the engine's read.
    let by_name = store.vm("alice", "a").await.unwrap().unwrap();
    assert_eq!(
        (&by_name.extra_disks, &by_name.extra_nics),
        (&a.extra_disks, &a.extra_nics)
    );
    assert_eq!(
        store.vm_by_id(&a.id).await.unwrap().unwrap().extra_nics,
        a.extra_nics
    );
    assert_eq!(
        store
            .vm_and_key(&a.id)
            .await
            .unwrap()
            .unwrap()
            .0
            .extra_disks,
        a.extra_disks
    );
    let listed = store.vms(Some("alice")).await.unwrap();
    assert_eq!(listed[0].extra_nics, a.extra_nics);
    let page = store.vms_page(Some("alice"), None, 10).await.unwrap();
    assert_eq!(page[1].extra_disks, x.disks);
    // A VM without extras has none.
    let plain = admit(&store, &alice, &["plain"]).await.unwrap();
    assert!(plain[0].vm.extra_disks.is_empty() && plain[0].vm.extra_nics.is_empty());

    // Deleting `a` gives 10.77.0.2 back: the next VM gets it.
    end(&store, &got[0].operation_id, WorkflowOutcome::Succeeded).await;
    let d = store
        .begin_delete_vm("alice", "a", &["destroy".into()], &actor())
        .await
        .unwrap();
    end(&store, &d.operation_id, WorkflowOutcome::Succeeded).await;
    let again = admit_x(
        &store,
        &alice,
        &["c"],
        &extras(&[], &[("storage", STORAGE)]),
    )
    .await
    .unwrap();
    assert_eq!(
        again[0].vm.extra_nics[0].ip,
        Some("10.77.0.2".parse().unwrap())
    );
}

/// Over the disk quota, or a network with no address left: refused, nothing stored (no VM, no
/// lease taken).
async fn extras_refusals(store: Store) {
    let alice = user(&store, "alice", 5).await;
    // 2 × (50 boot + 20 extra) = 140 > 139.
    disk_limit(&store, &alice, 139).await;
    let e = admit_x(&store, &alice, &["a", "b"], &extras(&[20], &[]))
        .await
        .unwrap_err();
    match &e {
        AdmitError::Quota(q) => {
            assert_eq!(
                (q.limit, q.used, q.requested, q.max),
                (QuotaLimit::DiskGib, 0, 140, 139)
            );
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("GiB of disk"), "{e}");
    assert!(store.vms(Some("alice")).await.unwrap().is_empty());
    // Exactly at the limit: admitted; then one GiB more is refused, counting what is held.
    disk_limit(&store, &alice, 140).await;
    admit_x(&store, &alice, &["a", "b"], &extras(&[20], &[]))
        .await
        .unwrap();
    disk_limit(&store, &alice, 189).await;
    let e = admit_x(&store, &alice, &["c"], &extras(&[], &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AdmitError::Quota(q) if q.limit == QuotaLimit::DiskGib && q.used == 140),
        "{e}"
    );
    // Two VMs on a one-address network: the second finds none, and neither is stored nor
    // leased (the first VM's lease is rolled back with it).
    disk_limit(&store, &alice, 1000).await;
    let one = &["10.77.0.9"][..];
    let e = admit_x(
        &store,
        &alice,
        &["d", "e"],
        &extras(&[], &[("storage", one)]),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AdmitError::NetworkFull(n) if n == "storage"),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "no free address left on network storage; ask an admin to widen it"
    );
    assert_eq!(store.vms(Some("alice")).await.unwrap().len(), 2);
    let got = admit_x(&store, &alice, &["d"], &extras(&[], &[("storage", one)]))
        .await
        .unwrap();
    assert_eq!(
        got[0].vm.extra_nics[0].ip,
        Some("10.77.0.9".parse().unwrap())
    );
}

/// 40 admissions at once on two replicas: the disk quota holds exactly and no extra-network
/// address is leased twice.
async fn extras_at_once(a: Store, b: Store) {
    let alice = user(&a, "alice", 30).await;
    let bob = user(&b, "bob", 30).await;
    disk_limit(&a, &alice, 600).await;
    disk_limit(&b, &bob, 600).await;
    let addrs: Vec<String> = (2..=254).map(|i| format!("10.77.0.{i}")).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let tries = (0..40).map(|i| {
        let (store, owner) = match i % 4 {
            0 => (a.clone(), &alice),
            1 => (b.clone(), &alice),
            2 => (a.clone(), &bob),
            _ => (b.clone(), &bob),
        };
        // 50 + 10 = 60 GiB a VM, at most 600 GiB a user: 10 of each user's 20 tries.
        let x = extras(&[10], &[("storage", &addrs)]);
        let r = req(owner, &[&format!("vm{i}")], small());
        async move { store.admit_vms_with(&r, &x, &pool(), &actor()).await }
    });
    let out = futures_util::future::join_all(tries).await;
    let (ok, refused): (Vec<_>, Vec<_>) = out.into_iter().partition(Result::is_ok);
    for e in refused.iter().map(|r| r.as_ref().unwrap_err()) {
        assert!(
            matches!(e, AdmitError::Quota(q) if q.limit == QuotaLimit::DiskGib),
            "{e}"
        );
    }
    assert_eq!((ok.len(), refused.len()), (20, 20));
    let mut held = a.vms(Some("alice")).await.unwrap();
    held.extend(b.vms(Some("bob")).await.unwrap());
    assert_eq!(held.len(), 20);
    let leased: HashSet<_> = held.iter().map(|v| v.extra_nics[0].ip.unwrap()).collect();
    assert_eq!(leased.len(), 20, "no address leased twice");
}

/// A rolled-back create gave its disk space back; retrying it takes the space again, so it is
/// refused when other VMs hold it meanwhile (with the hooks the VM definitions register).
async fn retry_rechecks_disk(store: Store) {
    store.set_hooks("create_vm", Hooks::vm(VmOperation::Create));
    store.set_hooks("delete_vm", Hooks::vm(VmOperation::Delete));
    let alice = user(&store, "alice", 5).await;
    disk_limit(&store, &alice, 100).await;
    let x = extras(&[30], &[]);
    let got = admit_x(&store, &alice, &["web"], &x).await.unwrap();
    let op = got[0].operation_id.clone();
    end(&store, &op, WorkflowOutcome::Failed("boom".into())).await;
    assert_eq!(store.usage("alice").await.unwrap().disk_gib, 0, "released");
    let other = admit_x(&store, &alice, &["db"], &x).await.unwrap();
    refused_until_freed(&store, &op, &other[0].operation_id, "GiB of disk").await;
    assert_eq!(store.usage("alice").await.unwrap().disk_gib, 80);
}

/// A create rolled back with no step done gives its extra-network address back with its own
/// (no lease is left behind); a retry leases the same address again, and is refused while
/// another VM holds it.
async fn rollback_frees_nic(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 5).await;
    let one = &["10.77.0.9"][..];
    let x = extras(&[], &[("storage", one)]);
    let a = admit_x(&store, &alice, &["a"], &x).await.unwrap();
    end(
        &store,
        &a[0].operation_id,
        WorkflowOutcome::Failed("boom".into()),
    )
    .await;
    let b = admit_x(&store, &alice, &["b"], &x)
        .await
        .expect("a's address is free again");
    assert_eq!(b[0].vm.extra_nics[0].ip, Some("10.77.0.9".parse().unwrap()));
    let p = pool();
    let ctx = RetryCtx { pool: &p };
    let e = store
        .retry_workflow(&a[0].operation_id, &ctx, &actor())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("10.77.0.9 on network storage"),
        "{e}"
    );
    let vm = store.vm("alice", "a").await.unwrap().unwrap();
    assert_eq!(
        (vm.status, vm.ip_address),
        (VmStatus::Failed, None),
        "unchanged"
    );
    // Once b is gone, the retry takes the address again.
    end(&store, &b[0].operation_id, WorkflowOutcome::Succeeded).await;
    let d = store
        .begin_delete_vm("alice", "b", &["destroy".into()], &actor())
        .await
        .unwrap();
    end(&store, &d.operation_id, WorkflowOutcome::Succeeded).await;
    store
        .retry_workflow(&a[0].operation_id, &ctx, &actor())
        .await
        .unwrap();
    let e = admit_x(&store, &alice, &["c"], &x).await.unwrap_err();
    assert!(matches!(&e, AdmitError::NetworkFull(_)), "a holds it: {e}");
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
    store
        .admit_batch(
            &batch_req(&alice, 2, vec![with("a", &[30]), with("b", &[20])], &[]),
            &pool(),
            &actor(),
        )
        .await
        .unwrap();
    let vms = store.vms(Some("alice")).await.unwrap();
    let a = vms.iter().find(|v| v.name.as_str() == "a").unwrap();
    assert_eq!(a.extra_disks, extras(&[30], &[]).disks);
    let nics: HashSet<_> = vms.iter().map(|v| v.extra_nics[0].ip.unwrap()).collect();
    assert_eq!(nics.len(), 2, "each node leased its own address");
    assert_eq!(store.usage("alice").await.unwrap().disk_gib, 150);
}

/// An admission that leases its first workflows to a node (whose engine holds a slot for
/// each): they are running with their first step started, exactly as a claim leaves them; the
/// others are left for any node to claim; a refused admission leases nothing.
async fn admission_leases(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 4).await;
    let lease = |max| LeaseTo {
        node: "n1".into(),
        lease_ms: 60_000,
        max,
    };
    let r = req(&alice, &["a", "b", "c"], small());
    let (admitted, claimed) = store
        .admit_vms_leased(
            &r,
            &AdmitExtras::default(),
            &pool(),
            &actor(),
            Some(lease(2)),
        )
        .await
        .unwrap();
    assert_eq!(admitted.len(), 3);
    assert_eq!(claimed.len(), 2);
    let ops: HashSet<&str> = admitted[..2]
        .iter()
        .map(|a| a.operation_id.as_str())
        .collect();
    for (wf, evs, started) in &claimed {
        assert!(
            ops.contains(wf.id.as_str()),
            "leased {} not among the first two",
            wf.id
        );
        assert!(*started);
        assert_eq!((wf.status, wf.step), (WorkflowStatus::Running, 0));
        assert_eq!(wf.steps.len(), 2);
        assert_eq!(
            (wf.steps[0].status, wf.steps[0].attempts),
            (StepStatus::Running, 1)
        );
        assert_eq!(wf.steps[1].status, StepStatus::Pending);
        // What it returned is what is stored, and its event is in the log.
        let stored = store.workflow(&wf.id).await.unwrap().unwrap();
        assert_eq!(stored.status, WorkflowStatus::Running);
        assert_eq!(stored.steps[0].status, StepStatus::Running);
        assert_eq!(stored.steps[0].deadline_at, wf.steps[0].deadline_at);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            (evs[0].kind.as_str(), evs[0].step.as_deref()),
            ("step_started", Some("clone"))
        );
        let log = store.events(&wf.id, 0).await.unwrap();
        assert!(
            log.iter()
                .any(|e| e.seq == evs[0].seq && e.kind == "step_started"),
            "{log:?}"
        );
        // The first step reads its VM (and the owner's key) without asking again.
        let vm = wf.resource.as_ref().unwrap().id.clone();
        let (v, key) = store.vm_and_key(&vm).await.unwrap().unwrap();
        assert_eq!((v.id.as_str(), key.as_deref()), (vm.as_str(), Some(KEY)));
    }
    // Leased to n1: another node claims only the third.
    let runs = vec!["create_vm".to_string()];
    let other = store
        .claim_many("n2", 60_000, &ClaimLimits::default(), 8, &runs)
        .await
        .unwrap();
    assert_eq!(
        other.iter().map(|c| c.0.id.as_str()).collect::<Vec<_>>(),
        vec![admitted[2].operation_id.as_str()]
    );
    // Refused (over the quota of 4): nothing stored, nothing leased.
    let e = admit_leased(&store, &alice, &["d", "e"], 2)
        .await
        .unwrap_err();
    assert!(matches!(e, AdmitError::Quota(..)), "{e:?}");
    assert!(
        store
            .claim_many("n2", 60_000, &ClaimLimits::default(), 8, &runs)
            .await
            .unwrap()
            .is_empty()
    );
    // No slot to give: queued, not leased.
    let (one, none) = admit_leased(&store, &alice, &["d"], 0).await.unwrap();
    assert!(none.is_empty());
    let got = store
        .claim_many("n2", 60_000, &ClaimLimits::default(), 8, &runs)
        .await
        .unwrap();
    assert_eq!(got[0].0.id, one[0].operation_id);
}

/// Admits `ns` of `owner`, leasing up to `max` of their workflows to node `n1`.
async fn admit_leased(
    store: &Store,
    owner: &Username,
    ns: &[&str],
    max: usize,
) -> Result<(Vec<basphere_store::Admitted>, Vec<basphere_store::Claimed>), AdmitError> {
    let lease = LeaseTo {
        node: "n1".into(),
        lease_ms: 60_000,
        max,
    };
    store
        .admit_vms_leased(
            &req(owner, ns, small()),
            &AdmitExtras::default(),
            &pool(),
            &actor(),
            Some(lease),
        )
        .await
}
