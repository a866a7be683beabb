//! Operations (cancel, retry, listings) and batches (plan and apply of manifests).

use crate::check::Check;
use crate::error::Result;
use crate::lease::admit_leased;
use crate::{Done, Paged, Paging, Principal, ServiceError, Services, convert};
use basphere_core::{FieldErrors, ResourceRef, VmOperation};
use basphere_plan::{self as plan, DiskEntry, Existing, Format, Manifest};
use basphere_store::{AdmitError, AdmitExtras, BatchError, BatchVm, Workflow};
use basphere_wire as wire;
use std::collections::HashSet;

/// Largest `parallelism` accepted.
const MAX_PARALLELISM: i64 = 256;

/// A manifest planned against the principal's VMs.
pub struct PlanOutcome {
    plan: plan::Plan,
    creates: Vec<BatchVm>,
    parallelism: u32,
}

impl PlanOutcome {
    /// `N to create, N to keep, N to delete`.
    pub fn summary(&self) -> String {
        format!(
            "{} to create, {} to keep, {} to delete",
            self.plan.create.len(),
            self.plan.keep.len(),
            self.plan.delete.len()
        )
    }

    pub fn wire(&self) -> wire::Planned {
        wire::Planned {
            plan: convert::plan(&self.plan),
            parallelism: self.parallelism,
        }
    }
}

/// What applying a manifest did: a batch admitted, or nothing to do.
pub enum BatchOutcome {
    Admitted(Done<wire::BatchApplied>),
    NothingToDo(Done<wire::BatchApplied>),
}

impl From<BatchError> for ServiceError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Admit(
                e @ (AdmitError::Quota(_) | AdmitError::Store(_) | AdmitError::NotActive(..)),
            ) => e.into(),
            e => ServiceError::Conflict(e.to_string()),
        }
    }
}

impl Services {
    /// The workflow `id` when `me` may see it (their own, or any for an admin).
    async fn visible(&self, me: &Principal, id: &str) -> Result<Workflow> {
        match self.store.workflow(id).await? {
            Some(w) if me.sees(&w.owner) => Ok(w),
            _ => Err(ServiceError::NotFound(format!("operation {id} not found"))),
        }
    }

    /// One operation `me` may see.
    pub async fn operation(&self, me: &Principal, id: &str) -> Result<wire::Operation> {
        Ok(convert::operation(&self.visible(me, id).await?))
    }

    /// Operations of `owner` (`None`: everyone's), newest first; 50 a page by default.
    pub async fn operations(
        &self,
        owner: Option<&str>,
        p: &Paging,
    ) -> Result<Paged<wire::Operation>> {
        let limit = p.limit_or(50)?;
        let w = self
            .store
            .workflows_page(owner, p.after.as_deref(), limit + 1)
            .await?;
        Ok(Paged::of(w, limit, |w| w.id.clone()).map(|w| convert::operation(&w)))
    }

    /// The latest `n` operations on `owner`'s VM `vm_id`, newest first (from their 100 latest).
    pub async fn vm_operations(
        &self,
        owner: &str,
        vm_id: &str,
        n: usize,
    ) -> Result<Vec<wire::Operation>> {
        Ok(self
            .store
            .workflows(Some(owner), 100)
            .await?
            .iter()
            .filter(|w| w.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)) == Some(vm_id))
            .take(n)
            .map(convert::operation)
            .collect())
    }

    /// Asks operation `id` to stop at the next step boundary and undo.
    pub async fn cancel(&self, me: &Principal, id: &str) -> Result<Done<Option<wire::Operation>>> {
        self.visible(me, id).await?;
        let ev = self.store.request_cancel(id, &me.actor).await?;
        self.engine.publish([ev]);
        let w = self.store.workflow(id).await?;
        Ok(Done {
            message: format!(
                "cancelling {id}: a running step finishes (or reaches its deadline), then done steps are undone"
            ),
            data: w.as_ref().map(convert::operation),
        })
    }

    /// Queues a failed or cancelled operation again (and the dependents it had skipped).
    pub async fn retry(&self, me: &Principal, id: &str) -> Result<Done<Option<wire::Operation>>> {
        self.visible(me, id).await?;
        let evs = self
            .store
            .retry_workflow(
                id,
                &basphere_store::RetryCtx {
                    pool: &self.config.network,
                },
                &me.actor,
            )
            .await?;
        let n = evs.len();
        self.engine.publish(evs);
        let w = self.store.workflow(id).await?;
        Ok(Done {
            message: if n > 1 {
                format!("retrying {id} and {} skipped dependent(s)", n - 1)
            } else {
                format!("retrying {id}")
            },
            data: w.as_ref().map(convert::operation),
        })
    }

    /// Whether `me` may see batch `id`.
    pub async fn check_batch(&self, me: &Principal, id: &str) -> Result<()> {
        match self.store.batch_owner(id).await? {
            Some(o) if me.sees(&o) => Ok(()),
            _ => Err(ServiceError::NotFound(format!("batch {id} not found"))),
        }
    }

    /// Every node of batch `id`, and how many have ended.
    pub async fn batch(&self, me: &Principal, id: &str) -> Result<(wire::Batch, usize)> {
        self.check_batch(me, id).await?;
        let ws = self.store.batch_workflows(id).await?;
        let done = ws.iter().filter(|w| w.status.is_terminal()).count();
        Ok((
            wire::Batch {
                batch_id: id.to_string(),
                nodes: ws
                    .iter()
                    .map(|w| convert::batch_node(&convert::operation(w)))
                    .collect(),
            },
            done,
        ))
    }

    /// Parses the manifest and plans it against the principal's VMs, resolving the images
    /// and sizes of what is to be created (every bad one reported).
    pub async fn plan(&self, me: &Principal, req: &wire::BatchRequest) -> Result<PlanOutcome> {
        let cfg = &self.config;
        let mut c = Check::new(&req.unreadable);
        let text = c.req("manifest", req.manifest.clone());
        let format = match c.opt("format", req.format.as_deref()) {
            None | Some("toml") => Format::Toml,
            Some("yaml") | Some("yml") => Format::Yaml,
            Some(f) => {
                c.errs
                    .push("format", format!("must be toml or yaml (got {f})"));
                Format::Toml
            }
        };
        let par = c.opt("parallelism", req.parallelism);
        if let Some(p) = par
            && !(1..=MAX_PARALLELISM).contains(&p)
        {
            c.errs.push(
                "parallelism",
                format!("must be between 1 and {MAX_PARALLELISM}"),
            );
        }
        c.finish()?;
        let m = Manifest::parse(&text.unwrap_or_default(), format).map_err(|e| {
            ServiceError::Unprocessable {
                message: e.clone(),
                errors: vec![e],
                data: None,
            }
        })?;
        let owner = me.name();
        let managed: HashSet<String> = self
            .store
            .managed_vm_names(owner)
            .await?
            .into_iter()
            .collect();
        let existing: Vec<Existing> = self
            .store
            .vms(Some(owner))
            .await?
            .into_iter()
            .map(|v| Existing {
                managed: managed.contains(v.name.as_str()),
                name: v.name.to_string(),
                status: v.status,
                os: v.os,
                spec: v.spec,
            })
            .collect();
        let p = plan::plan(&m, &existing).map_err(|es| {
            let list: Vec<String> = es.iter().map(|e| e.to_string()).collect();
            ServiceError::Unprocessable {
                message: format!("the plan is refused: {}", list.join("; ")),
                errors: list,
                data: Some(serde_json::json!({ "problems": es })),
            }
        })?;
        let known = |keys: Vec<&str>| keys.join(", ");
        let mut bad = vec![];
        let mut creates = Vec::with_capacity(p.create.len());
        for c in &p.create {
            let name = c.name.parse();
            let os_name =
                c.os.clone()
                    .unwrap_or_else(|| cfg.default_image().to_string());
            let os = os_name.parse().ok().filter(|o| cfg.images.contains_key(o));
            let spec = c
                .spec
                .as_ref()
                .and_then(|s| s.parse().ok())
                .and_then(|s| cfg.specs.get_key_value(&s));
            let (extras, extra_errs) = self.manifest_extras(c);
            bad.extend(extra_errs);
            match (&name, &os, spec) {
                (Ok(name), Some(os), Some((spec_name, spec))) => creates.push(BatchVm {
                    name: Clone::clone(name),
                    os: Clone::clone(os),
                    login_user: cfg.images[os].login_user.clone(),
                    spec_name: spec_name.clone(),
                    spec: *spec,
                    requires: c.requires.clone(),
                    optional: c.optional.clone(),
                    extras,
                }),
                _ => {
                    if let Err(e) = &name {
                        bad.push(format!("{}: {e}", c.name));
                    }
                    if os.is_none() {
                        bad.push(format!(
                            "{}: unknown os {os_name} (known: {})",
                            c.name,
                            known(cfg.images.keys().map(|k| k.as_str()).collect())
                        ));
                    }
                    if spec.is_none() {
                        bad.push(format!(
                            "{}: {} (known: {})",
                            c.name,
                            match &c.spec {
                                Some(s) => format!("unknown spec {s}"),
                                None => "no spec (set it on the node or in [defaults])".into(),
                            },
                            known(cfg.specs.keys().map(|k| k.as_str()).collect())
                        ));
                    }
                }
            }
        }
        if !bad.is_empty() {
            return Err(ServiceError::Unprocessable {
                message: format!("the manifest has {} problem(s)", bad.len()),
                errors: bad,
                data: None,
            });
        }
        let parallelism = par
            .map(|p| p as u32)
            .or(m.parallelism)
            .unwrap_or(10)
            .clamp(1, MAX_PARALLELISM as u32);
        Ok(PlanOutcome {
            plan: p,
            creates,
            parallelism,
        })
    }

    /// A manifest node's extra disks and networks, checked as `create-vm`'s are; the
    /// problems as `node: field: message`.
    fn manifest_extras(&self, node: &plan::Create) -> (AdmitExtras, Vec<String>) {
        let mut c = Check::new(&FieldErrors::new());
        let disks = node
            .extra_disks
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                DiskEntry::Short(s) => wire::DiskRequest::parse(s)
                    .map_err(|e| c.errs.push(&format!("extra_disks[{i}]"), e))
                    .ok(),
                DiskEntry::Full { size_gb, mode } => Some(wire::DiskRequest {
                    size_gb: *size_gb,
                    mode: mode.clone(),
                }),
            })
            .collect();
        let extras = self.extras(&mut c, Some(disks), Some(node.extra_networks.clone()));
        let errs = c
            .errs
            .0
            .iter()
            .map(|e| format!("{}: {}: {}", node.name, e.field, e.message))
            .collect();
        (extras, errs)
    }

    /// Plans the manifest and admits it as one batch (quota for every create at once).
    pub async fn apply(&self, me: &Principal, req: &wire::BatchRequest) -> Result<BatchOutcome> {
        let p = self.plan(me, req).await?;
        let summary = p.summary();
        if p.creates.is_empty() && p.plan.delete.is_empty() {
            return Ok(BatchOutcome::NothingToDo(Done {
                message: "nothing to do: everything in the manifest exists".into(),
                data: wire::BatchApplied {
                    batch_id: None,
                    nodes: vec![],
                    plan: convert::plan(&p.plan),
                    parallelism: None,
                },
            }));
        }
        let req = basphere_store::BatchRequest {
            owner: me.user.username.clone(),
            provider: self.provider.kind().to_string(),
            parallelism: p.parallelism,
            creates: p.creates,
            deletes: p
                .plan
                .delete
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            create_steps: basphere_vm_workflows::steps(&self.engine, VmOperation::Create),
            delete_steps: basphere_vm_workflows::steps(&self.engine, VmOperation::Delete),
        };
        // As for creates: this node's free slots take the first nodes in the admitting
        // transaction.
        let (store, pool, actor) = (
            self.store.clone(),
            self.config.network.clone(),
            me.actor.clone(),
        );
        let n = (req.parallelism as usize).min(req.creates.len() + req.deletes.len());
        let b = admit_leased(&self.engine, n, move |lease| async move {
            let mut b = store.admit_batch_leased(&req, &pool, &actor, lease).await?;
            let adopt = basphere_engine::Adopt {
                claimed: std::mem::take(&mut b.leased),
                ahead: std::mem::take(&mut b.held),
            };
            Ok::<_, basphere_store::BatchError>((b, adopt))
        })
        .await??;
        Ok(BatchOutcome::Admitted(Done {
            message: format!(
                "batch {} accepted: {summary}; follow with: basphere ops watch --batch {}",
                b.batch_id, b.batch_id
            ),
            data: wire::BatchApplied {
                batch_id: Some(b.batch_id),
                nodes: b.nodes.iter().map(convert::batch_node_ref).collect(),
                plan: convert::plan(&p.plan),
                parallelism: Some(p.parallelism),
            },
        }))
    }
}
