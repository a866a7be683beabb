//! VM addresses: the lowest free ones of the owner's block, a block filled or gone, and no
//! address held twice when admissions race on two stores.
use crate::vms::{actor, pool, pool_of, req, small, user, user_in};
use crate::{Case, Fut, ReplicaCase};
use basphere_store::{AdmitError, Admitted, Store};
use std::collections::HashSet;

pub fn cases() -> Vec<Case> {
    vec![
        ("vms_block_full_and_no_block", |s| {
            Box::pin(block_full(s)) as Fut
        }),
        ("vms_addresses_past_the_first_candidates", |s| {
            Box::pin(addresses_past_first_candidates(s)) as Fut
        }),
    ]
}

pub fn replica_cases() -> Vec<ReplicaCase> {
    vec![("vms_two_users_at_once_never_share_an_address", |a, b| {
        Box::pin(two_users_at_once(a, b)) as Fut
    })]
}

/// The addresses `got` were admitted with, in order.
fn ips_of(got: &[Admitted]) -> Vec<String> {
    got.iter()
        .map(|a| a.vm.ip_address.unwrap().to_string())
        .collect()
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
    assert_eq!(ips_of(&got), ["10.254.0.2", "10.254.0.3"]);
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

/// An owner whose block's low addresses are all held still gets the lowest free one (the
/// free addresses are looked up a window of candidates at a time, the next window wider),
/// and a block filled to its last address refuses the next create.
async fn addresses_past_first_candidates(store: Store) {
    let wide = pool_of("10.254.0.0/23", 256);
    let alice = user_in(&store, "alice", 300, &wide).await;
    let names: Vec<String> = (0..100).map(|i| format!("v{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let got = store
        .admit_vms(&req(&alice, &refs, small()), &wide, &actor())
        .await
        .unwrap();
    let ips = ips_of(&got);
    let want: Vec<String> = (2..102).map(|i| format!("10.254.0.{i}")).collect();
    assert_eq!(
        ips, want,
        "the block's lowest assignable addresses, in order"
    );
    // One more: the first window of candidates (64) is all held.
    let one = |name: &'static str| {
        let (store, r, wide) = (store.clone(), req(&alice, &[name], small()), wide.clone());
        async move { store.admit_vms(&r, &wide, &actor()).await }
    };
    let next = one("w").await.unwrap();
    assert_eq!(next[0].vm.ip_address.unwrap().to_string(), "10.254.0.102");
    // Block 0 of a /23 in blocks of 256: .0 and the gateway .1 are not assignable, so 254;
    // 101 are held, 153 more fit and the next is refused.
    let rest: Vec<String> = (0..153).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = rest.iter().map(String::as_str).collect();
    store
        .admit_vms(&req(&alice, &refs, small()), &wide, &actor())
        .await
        .unwrap();
    let e = one("y").await.unwrap_err();
    assert!(matches!(e, AdmitError::BlockFull(..)), "{e}");
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
