//! Extra disks and networks of VMs: stored, leased, released, refused, exact on two replicas.
use crate::vms::{actor, admit, end, pool, refused_until_freed, req, small, user, vm_hooks};
use crate::{Case, Fut, ReplicaCase};
use basphere_core::{DiskMode, ExtraDisk, QuotaLimit, Username, VmOperation, VmStatus};
use basphere_store::{
    AdmitError, AdmitExtras, ExtraNetwork, Hooks, RetryCtx, Store, WorkflowOutcome,
};
use std::collections::HashSet;

pub fn cases() -> Vec<Case> {
    vec![
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
    ]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![(
        "vms_disk_quota_and_nic_leases_exact_on_two_replicas",
        |a, b| Box::pin(extras_at_once(a, b)) as Fut,
    )]
}

/// Sets `owner`'s disk quota to `gib`.
pub(crate) async fn disk_limit(store: &Store, owner: &Username, gib: u64) {
    let mut q = store.user(owner.as_str()).await.unwrap().unwrap().quota;
    q.max_disk_gib = Some(gib);
    store.set_quota(owner, &q, &actor()).await.unwrap();
}

pub(crate) fn extras(disks: &[u32], nets: &[(&str, &[&str])]) -> AdmitExtras {
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

pub(crate) const STORAGE: &[&str] = &["10.77.0.2", "10.77.0.3", "10.77.0.4"];

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
