//! Property tests of batch planning on random DAGs.
use basphere_core::VmStatus;
use basphere_plan::{Existing, Manifest, PlanError, VmNode, plan};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// A random manifest: node i may require / optionally follow nodes j < i (acyclic), and
/// optionally follow names that are absent.
/// Node count, edges (dependent, dependency, hard), soft edges to absent names (node, k).
type Dag = (usize, Vec<(usize, usize, bool)>, Vec<(usize, usize)>);

fn dag() -> impl Strategy<Value = Dag> {
    (2usize..40).prop_flat_map(|n| {
        let edges =
            proptest::collection::vec((1..n, 0..n, any::<bool>()), 0..n * 2).prop_map(move |es| {
                es.into_iter()
                    .map(|(a, b, hard)| (a, b % a, hard))
                    .collect::<Vec<_>>()
            });
        let absent = proptest::collection::vec((0..n, 0..5usize), 0..5);
        (Just(n), edges, absent)
    })
}

fn name(i: usize) -> String {
    format!("n{i}")
}

fn manifest(n: usize, edges: &[(usize, usize, bool)], absent: &[(usize, usize)]) -> Manifest {
    let mut vms: BTreeMap<String, VmNode> = (0..n).map(|i| (name(i), VmNode::default())).collect();
    for &(a, b, hard) in edges {
        let v = vms.get_mut(&name(a)).unwrap();
        let list = if hard {
            &mut v.requires
        } else {
            &mut v.optional
        };
        if !list.contains(&name(b)) {
            list.push(name(b));
        }
    }
    for &(a, k) in absent {
        vms.get_mut(&name(a))
            .unwrap()
            .optional
            .push(format!("absent{k}"));
    }
    Manifest {
        vms,
        ..Manifest::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every node comes after all its hard requirements and its present soft ones; absent soft
    /// ones change nothing.
    #[test]
    fn order_respects_hard_and_present_soft_edges((n, edges, absent) in dag()) {
        let m = manifest(n, &edges, &absent);
        let p = plan(&m, &[]).expect("acyclic, no conflicts");
        prop_assert_eq!(p.create.len(), n);
        let pos: HashMap<&str, usize> =
            p.create.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
        for &(a, b, _) in &edges {
            prop_assert!(pos[name(b).as_str()] < pos[name(a).as_str()], "{} before {}", name(b), name(a));
        }
        for c in &p.create {
            prop_assert!(c.optional.iter().all(|o| !o.starts_with("absent")));
            for r in c.requires.iter().chain(&c.optional) {
                prop_assert!(p.create[pos[r.as_str()]].layer < c.layer);
            }
        }
        // The same manifest with the absent soft edges removed plans the same order.
        let p2 = plan(&manifest(n, &edges, &[]), &[]).unwrap();
        prop_assert_eq!(
            p.create.iter().map(|c| &c.name).collect::<Vec<_>>(),
            p2.create.iter().map(|c| &c.name).collect::<Vec<_>>()
        );
    }

    /// A back edge closes a cycle; the error names a real cycle of the graph.
    #[test]
    fn any_cycle_is_detected_and_named(
        (n, mut edges, absent) in dag(),
        back in any::<(usize, usize, bool)>(),
    ) {
        // Force a path a → … → b exists: add b requires-chain to a directly, then a back edge.
        let a = back.0 % n;
        let b = back.1 % n;
        let (lo, hi) = if a < b { (a, b) } else if b < a { (b, a) } else { (a, (a + 1) % n) };
        let (lo, hi) = if lo < hi { (lo, hi) } else { (hi, lo) };
        edges.push((hi, lo, true));   // hi after lo
        edges.push((lo, hi, back.2)); // lo after hi: a cycle
        let m = manifest(n, &edges, &absent);
        let errs = plan(&m, &[]).expect_err("cyclic");
        let cycle = errs.iter().find_map(|e| match e {
            PlanError::Cycle { cycle } => Some(cycle.clone()),
            _ => None,
        });
        let cycle = cycle.expect("the error names a cycle");
        prop_assert!(cycle.len() >= 3 && cycle.first() == cycle.last(), "{:?}", cycle);
        for w in cycle.windows(2) {
            let v = &m.vms[&w[0]];
            prop_assert!(
                v.requires.contains(&w[1]) || v.optional.contains(&w[1]),
                "{} → {} is an edge of {:?}", w[0], w[1], cycle
            );
        }
    }

    /// Conflicts with a declared or existing VM refuse the plan.
    #[test]
    fn conflicts_refuse_the_plan(
        (n, edges, absent) in dag(),
        c in any::<(usize, usize)>(),
        existing in any::<bool>(),
    ) {
        let mut m = manifest(n, &edges, &absent);
        let a = c.0 % n;
        let other = if existing { "legacy".to_string() } else { name((a + 1 + c.1 % (n - 1)) % n) };
        m.vms.get_mut(&name(a)).unwrap().conflicts.push(other.clone());
        let ex = vec![Existing {
            name: "legacy".into(),
            status: VmStatus::Running,
            os: "debian-12".into(),
            spec: "small".into(),
            managed: false,
        }];
        let errs = plan(&m, &ex).expect_err("a conflict");
        let conflict = matches!(
            &errs[..],
            [PlanError::Conflict { node, other: o, .. }] if *node == name(a) && *o == other
        );
        prop_assert!(conflict, "{:?}", errs);
        // Without the other side, no conflict.
        if existing {
            prop_assert!(plan(&m, &[]).is_ok());
        }
    }

    /// A hard requirement must be declared or exist; a soft one need not.
    #[test]
    fn hard_requirements_must_exist((n, edges, absent) in dag(), k in 0usize..40) {
        let mut m = manifest(n, &edges, &absent);
        m.vms.get_mut(&name(k % n)).unwrap().requires.push("elsewhere".into());
        let errs = plan(&m, &[]).expect_err("missing");
        let missing = matches!(&errs[..], [PlanError::MissingRequirement { missing, .. }] if missing == "elsewhere");
        prop_assert!(missing, "{:?}", errs);
        let ex = vec![Existing {
            name: "elsewhere".into(),
            status: VmStatus::Running,
            os: "debian-12".into(),
            spec: "small".into(),
            managed: false,
        }];
        let p = plan(&m, &ex).expect("satisfied by an existing VM");
        prop_assert!(p.delete.is_empty(), "unmanaged VMs are never deleted");
    }
}
