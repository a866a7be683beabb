//! Manifests and DAG planning for batches (`basphere plan -f` / `apply -f`).
//!
//! A manifest (TOML or YAML) declares VMs — later clusters and task services — by name, each
//! with `requires` (hard: must exist or be in the manifest, and finish first), `optional`
//! (soft: orders only when the other node is in the manifest) and `conflicts` (the plan is
//! refused while the other exists or is declared). Planning is pure: given the manifest and
//! what exists, it says what to create, keep and delete — like Terraform, only VMs an earlier
//! apply made ("managed") are deleted when they leave the manifest — and in which order;
//! a cycle is an error that names it.
//!
//! ```toml
//! parallelism = 10            # optional; `apply --parallelism` wins
//! [defaults]
//! os = "debian-12"
//! spec = "small"
//! [vms.db]
//! spec = "medium"
//! extra_disks = ["100G", { size_gb = 20, mode = "raw" }]
//! extra_networks = ["storage"]
//! [vms.web]
//! requires = ["db"]
//! optional = ["cache"]
//! conflicts = ["legacy-web"]
//! ```
//!
//! Architecture invariant: no IO here and no dependency on the store or the engine; the API
//! reads what exists and the store admits the plan.

use basphere_core::VmStatus;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Defaults for every VM of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub os: Option<String>,
    pub spec: Option<String>,
    pub extra_disks: Option<Vec<DiskEntry>>,
    pub extra_networks: Option<Vec<String>>,
}

/// An extra disk as a manifest writes it: `"SIZE[G][:MODE]"` or `{ size_gb, mode }`. The
/// server checks sizes, modes and network names as it does for `create-vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DiskEntry {
    Short(String),
    Full {
        size_gb: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<String>,
    },
}

/// One VM node of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmNode {
    pub os: Option<String>,
    pub spec: Option<String>,
    /// Disks beside the boot disk (replaces `[defaults] extra_disks` when set).
    pub extra_disks: Option<Vec<DiskEntry>>,
    /// Catalog networks to join (replaces `[defaults] extra_networks` when set).
    pub extra_networks: Option<Vec<String>>,
    #[serde(default)]
    pub requires: Vec<String>,
    #[serde(default)]
    pub optional: Vec<String>,
    #[serde(default)]
    pub conflicts: Vec<String>,
}

/// A parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub parallelism: Option<u32>,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub vms: BTreeMap<String, VmNode>,
}

/// The manifest's text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// By file name: `.yaml`/`.yml` are YAML, anything else TOML.
    pub fn from_path(p: &str) -> Self {
        if p.ends_with(".yaml") || p.ends_with(".yml") {
            Self::Yaml
        } else {
            Self::Toml
        }
    }
}

impl Manifest {
    pub fn parse(text: &str, format: Format) -> Result<Self, String> {
        let m: Manifest = match format {
            Format::Toml => toml::from_str(text).map_err(|e| format!("manifest (TOML): {e}"))?,
            Format::Yaml => {
                serde_norway::from_str(text).map_err(|e| format!("manifest (YAML): {e}"))?
            }
        };
        if m.parallelism == Some(0) {
            return Err("manifest: parallelism must be at least 1".into());
        }
        Ok(m)
    }

    /// The OS and spec of `node` after defaults (`None`: the server's default).
    pub fn resolved(&self, node: &VmNode) -> (Option<String>, Option<String>) {
        (
            node.os.clone().or_else(|| self.defaults.os.clone()),
            node.spec.clone().or_else(|| self.defaults.spec.clone()),
        )
    }
}

impl Manifest {
    /// The extra disks and networks of `node` after defaults.
    pub fn extras(&self, node: &VmNode) -> (Vec<DiskEntry>, Vec<String>) {
        let d = &self.defaults;
        (
            node.extra_disks
                .clone()
                .or_else(|| d.extra_disks.clone())
                .unwrap_or_default(),
            node.extra_networks
                .clone()
                .or_else(|| d.extra_networks.clone())
                .unwrap_or_default(),
        )
    }
}

/// A VM that exists now, as planning sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Existing {
    pub name: String,
    pub status: VmStatus,
    pub os: String,
    pub spec: String,
    /// Made by an earlier apply: deleted when it leaves the manifest.
    pub managed: bool,
}

/// Why a plan is refused. Every problem is reported, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlanError {
    #[error("{node} requires {missing}, which is neither in the manifest nor an existing VM")]
    MissingRequirement { node: String, missing: String },
    #[error("{node} requires {other}, which is {status}")]
    RequirementFailed {
        node: String,
        other: String,
        status: String,
    },
    #[error("{node} conflicts with {other}, which {how}")]
    Conflict {
        node: String,
        other: String,
        how: String,
    },
    #[error("dependency cycle: {}", cycle.join(" → "))]
    Cycle { cycle: Vec<String> },
    #[error("{node}: {message}")]
    Invalid { node: String, message: String },
}

/// A node to create, with the nodes of this plan it runs after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Create {
    pub name: String,
    pub os: Option<String>,
    pub spec: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<DiskEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_networks: Vec<String>,
    /// Hard edges (to manifest nodes or existing VMs).
    pub requires: Vec<String>,
    /// Soft edges that apply (to manifest nodes).
    pub optional: Vec<String>,
    /// Depth in the DAG (0: needs nothing from this plan).
    pub layer: usize,
}

/// A declared node that exists already.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Keep {
    pub name: String,
    pub status: VmStatus,
    /// Declared values that differ from the VM's (not changed by apply).
    pub differs: Vec<String>,
}

/// What applying a manifest would do.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Plan {
    /// In a topological order.
    pub create: Vec<Create>,
    pub keep: Vec<Keep>,
    pub delete: Vec<String>,
    pub layers: usize,
}

/// A generic DAG of `n` nodes: `deps[i]` are the nodes `i` runs after. A topological order
/// (dependencies first), or a cycle as node indices `[a, b, …, a]` where each runs after the
/// next. Kahn's algorithm; O(nodes + edges).
pub fn toposort(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut indeg = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            indeg[i] += 1;
            users[d].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| indeg[i] == 0).rev().collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.push(u);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every node left has a dependency left: walk them until a node repeats.
    let left: Vec<bool> = indeg.iter().map(|&d| d > 0).collect();
    let start = (0..n).find(|&i| left[i]).expect("a node is left");
    let mut pos: HashMap<usize, usize> = HashMap::new();
    let mut path = vec![];
    let mut cur = start;
    loop {
        if let Some(&p) = pos.get(&cur) {
            let mut cycle = path[p..].to_vec();
            cycle.push(cur);
            return Err(cycle);
        }
        pos.insert(cur, path.len());
        path.push(cur);
        cur = *deps[cur]
            .iter()
            .find(|&&d| left[d])
            .expect("a node left has a dependency left");
    }
}

/// Plans `m` against what exists.
pub fn plan(m: &Manifest, existing: &[Existing]) -> Result<Plan, Vec<PlanError>> {
    let ex: HashMap<&str, &Existing> = existing.iter().map(|e| (e.name.as_str(), e)).collect();
    let names: Vec<&str> = m.vms.keys().map(String::as_str).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut errs = vec![];
    let mut deps: Vec<Vec<usize>> = vec![vec![]; names.len()];
    let mut hard: Vec<Vec<String>> = vec![vec![]; names.len()];
    let mut soft: Vec<Vec<String>> = vec![vec![]; names.len()];
    let mut conflict_seen = HashSet::new();
    for (i, (name, node)) in m.vms.iter().enumerate() {
        // A name listed twice is one edge (a second one would be a second dependency row).
        let mut listed = HashSet::new();
        for r in node.requires.iter().filter(|r| listed.insert(r.as_str())) {
            if r == name {
                errs.push(PlanError::Cycle {
                    cycle: vec![name.clone(), name.clone()],
                });
            } else if let Some(&j) = index.get(r.as_str()) {
                deps[i].push(j);
                hard[i].push(r.clone());
            } else if let Some(e) = ex.get(r.as_str()) {
                if e.managed {
                    // Made by an earlier apply and gone from this manifest: this plan deletes it.
                    errs.push(PlanError::RequirementFailed {
                        node: name.clone(),
                        other: r.clone(),
                        status: "deleted by this plan (it left the manifest)".into(),
                    });
                } else if matches!(e.status, VmStatus::Failed | VmStatus::Deleting) {
                    errs.push(PlanError::RequirementFailed {
                        node: name.clone(),
                        other: r.clone(),
                        status: e.status.to_string(),
                    });
                } else {
                    hard[i].push(r.clone());
                }
            } else {
                errs.push(PlanError::MissingRequirement {
                    node: name.clone(),
                    missing: r.clone(),
                });
            }
        }
        for o in &node.optional {
            if let Some(&j) = index.get(o.as_str()) {
                if j == i {
                    errs.push(PlanError::Cycle {
                        cycle: vec![name.clone(), name.clone()],
                    });
                } else if !deps[i].contains(&j) {
                    deps[i].push(j);
                    soft[i].push(o.clone());
                }
            }
        }
        for c in &node.conflicts {
            let how = if index.contains_key(c.as_str()) {
                Some("is in the manifest".to_string())
            } else {
                ex.get(c.as_str())
                    .map(|e| format!("exists ({}); delete it first", e.status))
            };
            if let Some(how) = how {
                let key = if name < c {
                    (name.clone(), c.clone())
                } else {
                    (c.clone(), name.clone())
                };
                if conflict_seen.insert(key) {
                    errs.push(PlanError::Conflict {
                        node: name.clone(),
                        other: c.clone(),
                        how,
                    });
                }
            }
        }
    }
    let order = match toposort(&deps) {
        Ok(o) => Some(o),
        Err(cycle) => {
            errs.push(PlanError::Cycle {
                cycle: cycle.iter().map(|&i| names[i].to_string()).collect(),
            });
            None
        }
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let order = order.expect("no cycle");
    let mut layer = vec![0usize; names.len()];
    for &i in &order {
        layer[i] = deps[i].iter().map(|&d| layer[d] + 1).max().unwrap_or(0);
    }
    let mut p = Plan {
        layers: layer.iter().max().map(|l| l + 1).unwrap_or(0),
        ..Plan::default()
    };
    for &i in &order {
        let name = names[i];
        let node = &m.vms[name];
        let (os, spec) = m.resolved(node);
        match ex.get(name) {
            Some(e) => {
                let mut differs = vec![];
                if let Some(s) = &spec
                    && s != &e.spec
                {
                    differs.push(format!("spec {} → {s}", e.spec));
                }
                if let Some(o) = &os
                    && o != &e.os
                {
                    differs.push(format!("os {} → {o}", e.os));
                }
                p.keep.push(Keep {
                    name: name.to_string(),
                    status: e.status,
                    differs,
                });
            }
            None => {
                let (extra_disks, extra_networks) = m.extras(node);
                p.create.push(Create {
                    name: name.to_string(),
                    os,
                    spec,
                    extra_disks,
                    extra_networks,
                    requires: hard[i].clone(),
                    optional: soft[i].clone(),
                    layer: layer[i],
                })
            }
        }
    }
    p.delete = existing
        .iter()
        .filter(|e| e.managed && !m.vms.contains_key(&e.name) && e.status != VmStatus::Deleting)
        .map(|e| e.name.clone())
        .collect();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(name: &str, managed: bool) -> Existing {
        Existing {
            name: name.into(),
            status: VmStatus::Running,
            os: "debian-12".into(),
            spec: "small".into(),
            managed,
        }
    }

    #[test]
    fn parses_toml_and_yaml_alike() {
        let t = Manifest::parse(
            "[defaults]\nspec = \"tiny\"\n[vms.db]\n[vms.web]\nrequires = [\"db\"]\n",
            Format::Toml,
        )
        .unwrap();
        let y = Manifest::parse(
            "defaults:\n  spec: tiny\nvms:\n  db: {}\n  web:\n    requires: [db]\n",
            Format::Yaml,
        )
        .unwrap();
        assert_eq!(t, y);
        assert!(Manifest::parse("[vms.a]\nbogus = 1\n", Format::Toml).is_err());
    }

    #[test]
    fn extra_disks_and_networks_take_both_forms_and_the_defaults() {
        let t = Manifest::parse(
            "[defaults]\nextra_networks = [\"storage\"]\nextra_disks = [\"20G\"]\n\
             [vms.db]\nextra_disks = [\"100G\", { size_gb = 50, mode = \"raw\" }]\n\
             [vms.web]\nextra_networks = []\n",
            Format::Toml,
        )
        .unwrap();
        let y = Manifest::parse(
            "defaults:\n  extra_networks: [storage]\n  extra_disks: [20G]\nvms:\n  db:\n    \
             extra_disks: [100G, {size_gb: 50, mode: raw}]\n  web:\n    extra_networks: []\n",
            Format::Yaml,
        )
        .unwrap();
        assert_eq!(t, y);
        let p = plan(&t, &[]).unwrap();
        let db = p.create.iter().find(|c| c.name == "db").unwrap();
        assert_eq!(
            db.extra_disks,
            [
                DiskEntry::Short("100G".into()),
                DiskEntry::Full {
                    size_gb: 50,
                    mode: Some("raw".into())
                }
            ]
        );
        assert_eq!(db.extra_networks, ["storage"], "from the defaults");
        let web = p.create.iter().find(|c| c.name == "web").unwrap();
        assert_eq!(web.extra_disks, [DiskEntry::Short("20G".into())]);
        assert!(web.extra_networks.is_empty(), "a node's empty list wins");
        assert!(Manifest::parse("[vms.a]\nextra_disks = [{ size = 5 }]\n", Format::Toml).is_err());
    }

    #[test]
    fn create_keep_delete_like_terraform() {
        let m = Manifest::parse(
            "[vms.db]\nspec = \"medium\"\n[vms.web]\nrequires = [\"db\"]\noptional = [\"cache\"]\n",
            Format::Toml,
        )
        .unwrap();
        let p = plan(
            &m,
            &[ex("db", true), ex("old", true), ex("handmade", false)],
        )
        .unwrap();
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].name, "web");
        assert_eq!(p.create[0].requires, vec!["db"]);
        assert!(p.create[0].optional.is_empty(), "cache is absent");
        assert_eq!(p.keep[0].name, "db");
        assert_eq!(p.keep[0].differs, vec!["spec small → medium"]);
        assert_eq!(p.delete, vec!["old"], "unmanaged VMs are left alone");
    }

    #[test]
    fn a_requirement_listed_twice_is_one_edge() {
        let m = Manifest::parse(
            "[vms.db]\n[vms.web]\nrequires = [\"db\", \"db\", \"old\", \"old\"]\noptional = [\"db\"]\n",
            Format::Toml,
        )
        .unwrap();
        let p = plan(&m, &[ex("old", false)]).unwrap();
        assert_eq!(p.create[1].requires, vec!["db", "old"]);
        assert!(p.create[1].optional.is_empty());
        let m = Manifest::parse("[vms.a]\nrequires = [\"x\", \"x\"]\n", Format::Toml).unwrap();
        assert_eq!(
            plan(&m, &[]).unwrap_err().len(),
            1,
            "one error for one missing name"
        );
    }

    #[test]
    fn cycle_is_named() {
        let m = Manifest::parse(
            "[vms.a]\nrequires = [\"b\"]\n[vms.b]\noptional = [\"c\"]\n[vms.c]\nrequires = [\"a\"]\n[vms.d]\n",
            Format::Toml,
        )
        .unwrap();
        let e = plan(&m, &[]).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].to_string(), "dependency cycle: a → b → c → a");
    }

    #[test]
    fn conflicts_and_missing_requirements_refuse() {
        let m = Manifest::parse(
            "[vms.a]\nconflicts = [\"b\", \"legacy\"]\n[vms.b]\nrequires = [\"nowhere\"]\n",
            Format::Toml,
        )
        .unwrap();
        let e = plan(&m, &[ex("legacy", false)]).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
    }
}
