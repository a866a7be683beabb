//! VM admission, deletes and listings (addresses: `addresses.rs`; batches: `batches.rs`).
use crate::{Case, Fut, ReplicaCase};
use basphere_core::{
    NetworkPool, Quota, QuotaLimit, Spec, Username, VmName, VmOperation, VmStatus,
};
use basphere_store::{
    Actor, AdmitError, AdmitExtras, AdmitRequest, ClaimLimits, DeleteError, Hooks, LeaseTo,
    NewRegistration, RetryCtx, StepStatus, Store, WorkflowOutcome, WorkflowStatus,
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
        ("vms_admission_leases_its_first_workflows", |s| {
            Box::pin(admission_leases(s)) as Fut
        }),
        ("vms_delete_leases_its_workflow", |s| {
            Box::pin(delete_leases(s)) as Fut
        }),
    ]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![("vms_50_creates_on_two_replicas_quota_10", |a, b| {
        Box::pin(fifty_at_quota_ten(a, b)) as Fut
    })]
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test";

pub(crate) fn actor() -> Actor {
    Actor::new("test", "test")
}

/// A /24 of eight 32-address blocks (30 assignable in block 0, 32 in the others).
pub(crate) fn pool() -> NetworkPool {
    pool_of("10.254.0.0/24", 32)
}

pub(crate) fn pool_of(cidr: &str, block_size: u32) -> NetworkPool {
    NetworkPool {
        cidr: cidr.parse().unwrap(),
        gateway: "10.254.0.1".parse().unwrap(),
        dns: vec![],
        mtu: 1500,
        block_size,
        reserved: vec![],
    }
}

pub(crate) fn small() -> Spec {
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
pub(crate) async fn user_in(store: &Store, name: &str, vms: u32, pool: &NetworkPool) -> Username {
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

pub(crate) fn names(ns: &[&str]) -> Vec<VmName> {
    ns.iter().map(|n| n.parse().unwrap()).collect()
}

pub(crate) fn req(owner: &Username, ns: &[&str], spec: Spec) -> AdmitRequest {
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
pub(crate) async fn end(store: &Store, op: &str, outcome: WorkflowOutcome) {
    let w = store
        .claim_workflow("n1", 60_000, &ClaimLimits::default())
        .await
        .unwrap()
        .expect("a workflow to claim");
    assert_eq!(w.id, op);
    store.finish_workflow(op, "n1", &outcome).await.unwrap();
}

pub(crate) fn vm_hooks(store: &Store) {
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
pub(crate) async fn refused_until_freed(store: &Store, op: &str, other: &str, why: &str) {
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

/// A delete that leases its workflow to a node with a slot: running, its first step started,
/// its event in the log, and no other node claims it; a refused delete leases nothing; with
/// no slot it is queued for any node.
async fn delete_leases(store: Store) {
    vm_hooks(&store);
    let alice = user(&store, "alice", 4).await;
    let made = admit(&store, &alice, &["a", "b"]).await.unwrap();
    for m in &made {
        end(&store, &m.operation_id, WorkflowOutcome::Succeeded).await;
    }
    let steps = ["destroy".into(), "forget".into()];
    let lease = |max| LeaseTo {
        node: "n1".into(),
        lease_ms: 60_000,
        max,
    };
    let (a, claimed) = store
        .begin_delete_vm_leased("alice", "a", &steps, &actor(), Some(lease(1)))
        .await
        .unwrap();
    assert_eq!(a.vm.status, VmStatus::Deleting);
    let [(wf, evs, started)] = &claimed[..] else {
        panic!("one workflow leased, got {}", claimed.len());
    };
    assert!(*started);
    assert_eq!(wf.id, a.operation_id);
    assert_eq!(wf.definition, "delete_vm");
    assert_eq!((wf.status, wf.step), (WorkflowStatus::Running, 0));
    assert_eq!(
        (wf.steps[0].status, wf.steps[0].attempts),
        (StepStatus::Running, 1)
    );
    let stored = store.workflow(&wf.id).await.unwrap().unwrap();
    assert_eq!(stored.status, WorkflowStatus::Running);
    assert_eq!(stored.steps[0].status, StepStatus::Running);
    assert_eq!(evs[0].kind, "step_started");
    assert!(
        store
            .events(&wf.id, 0)
            .await
            .unwrap()
            .iter()
            .any(|e| e.seq == evs[0].seq && e.kind == "step_started")
    );
    let runs = vec!["delete_vm".to_string(), "create_vm".to_string()];
    let none = ClaimLimits::default();
    let claim = || store.claim_many("n2", 60_000, &none, 8, &runs);
    assert!(claim().await.unwrap().is_empty(), "leased to n1 alone");
    // Refused (being deleted already; unknown): nothing queued, nothing leased.
    let e = store
        .begin_delete_vm_leased("alice", "a", &steps, &actor(), Some(lease(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, DeleteError::Busy(..)), "{e:?}");
    let e = store
        .begin_delete_vm_leased("alice", "zz", &steps, &actor(), Some(lease(1)))
        .await
        .unwrap_err();
    assert!(matches!(e, DeleteError::NotFound(..)), "{e:?}");
    assert!(claim().await.unwrap().is_empty());
    // No slot: queued, and any node claims it.
    let (b, leased) = store
        .begin_delete_vm_leased("alice", "b", &steps, &actor(), Some(lease(0)))
        .await
        .unwrap();
    assert!(leased.is_empty());
    let got = claim().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.id, b.operation_id);
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
