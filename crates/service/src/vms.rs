//! VMs: the catalog, create (admission in one store transaction, then the engine is woken),
//! delete, listings, quota and resources.

use crate::check::Check;
use crate::error::Result;
use crate::lease::admit_leased;
use crate::{Done, MAX_LIMIT, Paged, Paging, Principal, ServiceError, Services, convert};
use basphere_core::VmOperation;
use basphere_core::{DiskMode, ExtraDisk};
use basphere_core::{ImageName, SpecName, Usage, VM_COUNT_RANGE, VmName};
use basphere_store::{AdmitError, AdmitExtras, AdmitRequest, DeleteError, ExtraNetwork, User};
use basphere_wire as wire;

/// The order of a VM listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmOrder {
    /// Oldest first (the prototype's order).
    #[default]
    Created,
    /// By owner, then name (what `list-vms` shows).
    Name,
}

/// What a user's dashboard shows: their VMs, usage and latest operations.
#[derive(Debug, Clone)]
pub struct Dashboard {
    pub vms: Vec<wire::Vm>,
    pub usage: Usage,
    pub operations: Vec<wire::Operation>,
}

/// Counts a refused admission by its reason (`basphere_admissions_refused_total`): which
/// quota limit, or what else stood in the way. Every refusal of an admission (create, batch,
/// retry) passes here.
fn refused(e: &AdmitError) {
    let reason = match e {
        AdmitError::Quota(q) => match q.limit {
            basphere_core::QuotaLimit::Vms => "quota_vms",
            basphere_core::QuotaLimit::Ips => "quota_ips",
            basphere_core::QuotaLimit::Vcpus => "quota_vcpus",
            basphere_core::QuotaLimit::MemoryMib => "quota_memory",
            basphere_core::QuotaLimit::Clusters => "quota_clusters",
            basphere_core::QuotaLimit::DiskGib => "quota_disk",
        },
        AdmitError::NotActive(..) => "not_active",
        AdmitError::NameTaken(_) | AdmitError::DuplicateInRequest(_) => "name_taken",
        AdmitError::NoUser(_) | AdmitError::NoBlock(_) => "no_user",
        AdmitError::BlockFull(..) => "block_full",
        AdmitError::NetworkFull(_) | AdmitError::NicTaken(..) => "network_full",
        AdmitError::Store(_) => return,
    };
    metrics::counter!("basphere_admissions_refused_total", "reason" => reason).increment(1);
}

/// The `(owner, name)` a `sort=name` listing continues after (`after` is `OWNER/NAME`).
fn name_key(after: Option<&str>) -> Result<Option<(&str, &str)>> {
    after
        .map(|a| {
            a.split_once('/').ok_or_else(|| {
                ServiceError::BadRequest(format!(
                    "after={a:?}: with sort=name, after is OWNER/NAME (the X-Next-After of the \
                     previous page)"
                ))
            })
        })
        .transpose()
}

impl From<AdmitError> for ServiceError {
    fn from(e: AdmitError) -> Self {
        refused(&e);
        match e {
            AdmitError::Quota(q) => ServiceError::Quota(q),
            AdmitError::NotActive(..) => ServiceError::Forbidden(e.to_string()),
            AdmitError::NameTaken(_)
            | AdmitError::DuplicateInRequest(_)
            | AdmitError::NoUser(_)
            | AdmitError::NoBlock(_)
            | AdmitError::BlockFull(..)
            | AdmitError::NetworkFull(_)
            | AdmitError::NicTaken(..) => ServiceError::Conflict(e.to_string()),
            AdmitError::Store(e) => e.into(),
        }
    }
}

impl From<DeleteError> for ServiceError {
    fn from(e: DeleteError) -> Self {
        match e {
            DeleteError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            DeleteError::Busy(..) => ServiceError::Conflict(e.to_string()),
            DeleteError::Store(e) => e.into(),
        }
    }
}

fn known(keys: impl Iterator<Item = impl AsRef<str>>) -> String {
    keys.map(|k| k.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Services {
    /// Sizes, images and the VM count range one create may ask for.
    pub fn catalog(&self) -> wire::Catalog {
        let c = &self.config;
        wire::Catalog {
            specs: c.specs.clone(),
            images: c
                .images
                .iter()
                .map(|(n, i)| wire::CatalogImage {
                    name: n.to_string(),
                    login_user: i.login_user.clone(),
                    default: i.default,
                })
                .collect(),
            default_image: c.default_image().to_string(),
            count: wire::CountRange {
                min: *VM_COUNT_RANGE.start(),
                max: *VM_COUNT_RANGE.end(),
            },
            provider: self.provider.kind().to_string(),
            extra_disks: Some(wire::ExtraDiskRange {
                max_count: c.vms.extra_disks.max_count,
                min_gb: c.vms.extra_disks.min_gb,
                max_gb: c.vms.extra_disks.max_gb,
            }),
            networks: c.networks.keys().cloned().collect(),
            max_extra_networks: c.vms.extra_networks.max_count,
        }
    }

    /// Checks a create's extra disks and networks against `[vms]` and `[networks]`, naming
    /// each bad entry by its position.
    pub(crate) fn extras(
        &self,
        c: &mut Check,
        disks: Option<Vec<wire::DiskRequest>>,
        networks: Option<Vec<String>>,
    ) -> AdmitExtras {
        let cfg = &self.config;
        let lim = cfg.vms.extra_disks;
        let asked = c.opt_list("extra_disks", disks);
        if asked.len() > lim.max_count as usize {
            c.errs.push(
                "extra_disks",
                format!(
                    "at most {} extra disks per VM (got {})",
                    lim.max_count,
                    asked.len()
                ),
            );
        }
        let mut disks = vec![];
        for (i, d) in asked.iter().enumerate() {
            let at = format!("extra_disks[{i}]");
            let range = i64::from(lim.min_gb)..=i64::from(lim.max_gb);
            let size = if range.contains(&d.size_gb) {
                Some(d.size_gb as u32)
            } else {
                c.errs.push(
                    &format!("{at}.size_gb"),
                    format!(
                        "must be between {} and {} GiB (got {})",
                        lim.min_gb, lim.max_gb, d.size_gb
                    ),
                );
                None
            };
            let mode = match d.mode.as_deref() {
                None | Some("") => Some(DiskMode::Auto),
                Some(m) => c.errs.check(&format!("{at}.mode"), m.parse::<DiskMode>()),
            };
            if let (Some(size_gib), Some(mode)) = (size, mode) {
                disks.push(ExtraDisk { size_gib, mode });
            }
        }
        let names = c.opt_list("extra_networks", networks);
        let max_nets = cfg.vms.extra_networks.max_count as usize;
        if names.len() > max_nets {
            c.errs.push(
                "extra_networks",
                format!(
                    "at most {max_nets} extra networks per VM (got {})",
                    names.len()
                ),
            );
        }
        let mut networks: Vec<ExtraNetwork> = vec![];
        for (i, n) in names.iter().enumerate() {
            let at = format!("extra_networks[{i}]");
            match cfg.networks.get(n) {
                None if cfg.networks.is_empty() => c.errs.push(
                    &at,
                    format!("unknown network {n:?}; this server offers no extra networks"),
                ),
                None => c.errs.push(
                    &at,
                    format!(
                        "unknown network {n:?}; choose one of: {}",
                        known(cfg.networks.keys())
                    ),
                ),
                Some(_) if networks.iter().any(|x| &x.name == n) => {
                    c.errs.push(&at, format!("network {n:?} is listed twice"))
                }
                Some(def) => networks.push(ExtraNetwork {
                    name: n.clone(),
                    pool: if def.dhcp {
                        vec![]
                    } else {
                        def.assignable().collect()
                    },
                }),
            }
        }
        AdmitExtras { disks, networks }
    }

    /// Checks a create request against the catalog: the VMs' names, image and size.
    fn admit_request(
        &self,
        me: &Principal,
        req: &wire::CreateVmsRequest,
    ) -> Result<(AdmitRequest, AdmitExtras)> {
        let cfg = &self.config;
        let mut c = Check::new(&req.unreadable);
        let name = c
            .req("name", req.name.as_deref())
            .and_then(|s| c.errs.check("name", s.parse::<VmName>()));
        let spec_name = c
            .opt("spec", req.spec.clone())
            .unwrap_or_else(|| "small".into());
        let spec = match spec_name.parse::<SpecName>() {
            Ok(n) => match cfg.specs.get(&n) {
                Some(s) => Some((n, *s)),
                None => {
                    c.errs.push(
                        "spec",
                        format!(
                            "unknown spec {spec_name:?}; choose one of: {}",
                            known(cfg.specs.keys().map(|k| k.as_str()))
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                c.errs.push("spec", e.to_string());
                None
            }
        };
        let os_name = c
            .opt("os", req.os.clone())
            .unwrap_or_else(|| cfg.default_image().to_string());
        let os = match os_name.parse::<ImageName>() {
            Ok(n) if cfg.images.contains_key(&n) => Some(n),
            _ => {
                c.errs.push(
                    "os",
                    format!(
                        "unknown OS {os_name:?}; choose one of: {}",
                        known(cfg.images.keys().map(|k| k.as_str()))
                    ),
                );
                None
            }
        };
        // The prototype's rule: an omitted or 0 count means one VM.
        let count = match c.opt("count", req.count) {
            None | Some(0) => 1,
            Some(n) => n,
        };
        let (lo, hi) = (*VM_COUNT_RANGE.start(), *VM_COUNT_RANGE.end());
        if !(i64::from(lo)..=i64::from(hi)).contains(&count) {
            c.errs.push(
                "count",
                format!("must be between {lo} and {hi} (got {count})"),
            );
        }
        let names: Vec<VmName> = match &name {
            Some(n) if count == 1 => vec![n.clone()],
            Some(n) if (2..=10).contains(&count) => {
                let mut v = vec![];
                for i in 1..=count {
                    match format!("{n}-{i}").parse() {
                        Ok(x) => v.push(x),
                        Err(_) => {
                            c.errs.push(
                                "name",
                                format!(
                                    "{n}-{i} (name with count suffix) is longer than 30 characters"
                                ),
                            );
                            break;
                        }
                    }
                }
                v
            }
            _ => vec![],
        };
        let extras = self.extras(&mut c, req.extra_disks.clone(), req.extra_networks.clone());
        c.finish()?;
        let (spec_name, spec) = spec.expect("checked");
        let os = os.expect("checked");
        let admit = AdmitRequest {
            owner: me.user.username.clone(),
            names,
            login_user: cfg.images[&os].login_user.clone(),
            os,
            spec_name,
            spec,
            provider: self.provider.kind().to_string(),
            steps: basphere_vm_workflows::steps(&self.engine, VmOperation::Create),
        };
        Ok((admit, extras))
    }

    /// Admits the VMs in one transaction and wakes the engine; an operation per VM.
    pub async fn create_vms(
        &self,
        me: &Principal,
        req: &wire::CreateVmsRequest,
    ) -> Result<Done<wire::VmsCreated>> {
        let (req, extras) = self.admit_request(me, req).inspect_err(|_| {
            metrics::counter!("basphere_admissions_refused_total", "reason" => "invalid")
                .increment(1);
        })?;
        // This node's free engine slots take the new workflows in the admitting transaction
        // (no claim after it).
        let (store, pool, actor) = (
            self.store.clone(),
            self.config.network.clone(),
            me.actor.clone(),
        );
        let admitted = admit_leased(&self.engine, req.names.len(), move |lease| async move {
            store
                .admit_vms_leased(&req, &extras, &pool, &actor, lease)
                .await
        })
        .await??;
        let names: Vec<&str> = admitted.iter().map(|a| a.vm.name.as_str()).collect();
        Ok(Done {
            message: format!(
                "creating {}; follow with: basphere ops watch <operation_id>",
                names.join(", ")
            ),
            data: wire::VmsCreated {
                vms: admitted
                    .iter()
                    .map(|a| convert::vm(a.vm.clone(), Some(&a.operation_id)))
                    .collect(),
                created: admitted.len(),
                failed: 0,
                errors: vec![],
                operations: admitted.iter().map(|a| a.operation_id.clone()).collect(),
            },
        })
    }

    /// VMs of `owner` (`None`: everyone's) in `order`: by creation (`after` an id), or by owner
    /// and name (`after` is `owner/name`).
    pub async fn vms_in(
        &self,
        owner: Option<&str>,
        order: VmOrder,
        p: &Paging,
    ) -> Result<Paged<wire::Vm>> {
        let limit = p.limit()?;
        self.vm_page(owner, order, p.after.as_deref(), limit).await
    }

    /// VMs of `owner` (`None`: everyone's) in creation order.
    pub async fn vms(&self, owner: Option<&str>, p: &Paging) -> Result<Paged<wire::Vm>> {
        self.vms_in(owner, VmOrder::Created, p).await
    }

    /// Every VM of `owner` (`None`: everyone's) in `order` after the key `after` (as in
    /// [`Services::vms_in`]), in chunks of at most [`MAX_LIMIT`]: a task reads the next chunk
    /// while the receiver writes the last one out (the channel holds one), so a long listing
    /// keeps two cores busy and never more than three chunks in memory. Each chunk is read as
    /// a page is (its own snapshot); a failed read is the last item. A bad `after` is refused
    /// before anything is read.
    pub fn vm_stream(
        &self,
        owner: Option<String>,
        order: VmOrder,
        after: Option<String>,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Vec<wire::Vm>>>> {
        if order == VmOrder::Name {
            name_key(after.as_deref())?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let me = self.clone();
        tokio::spawn(async move {
            let mut after = after;
            loop {
                let page = me
                    .vm_page(owner.as_deref(), order, after.as_deref(), MAX_LIMIT)
                    .await;
                let (items, next) = match page {
                    Ok(p) => (Ok(p.items), p.next_after),
                    Err(e) => (Err(e), None),
                };
                // The receiver gone (the client hung up) ends the reads too.
                if tx.send(items).await.is_err() || next.is_none() {
                    return;
                }
                after = next;
            }
        });
        Ok(rx)
    }

    /// One page of at most `limit` VMs in `order` after the key `after`, and the next page's key.
    async fn vm_page(
        &self,
        owner: Option<&str>,
        order: VmOrder,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Paged<wire::Vm>> {
        let page = match order {
            VmOrder::Created => {
                let vms = self.store.vms_page(owner, after, limit + 1).await?;
                Paged::of(vms, limit, |v| v.id.clone())
            }
            VmOrder::Name => {
                let after = name_key(after)?;
                let vms = self.store.vms_page_by_name(owner, after, limit + 1).await?;
                Paged::of(vms, limit, |v| format!("{}/{}", v.owner, v.name))
            }
        };
        Ok(page.map(|v| convert::vm(v, None)))
    }

    /// One VM of `owner`.
    pub async fn vm(&self, owner: &str, name: &str) -> Result<wire::Vm> {
        let vm = self
            .store
            .vm(owner, name)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("VM {name} not found")))?;
        Ok(convert::vm(vm, None))
    }

    /// Starts deleting `owner`'s VM `name` and wakes the engine.
    pub async fn delete_vm(
        &self,
        me: &Principal,
        owner: &str,
        name: &str,
    ) -> Result<Done<wire::Vm>> {
        let steps = basphere_vm_workflows::steps(&self.engine, VmOperation::Delete);
        // As for creates: a free slot of this node's takes the workflow in the same
        // transaction.
        let (store, actor) = (self.store.clone(), me.actor.clone());
        let (whose, which) = (owner.to_string(), name.to_string());
        let a = admit_leased(&self.engine, 1, move |lease| async move {
            store
                .begin_delete_vm_leased(&whose, &which, &steps, &actor, lease)
                .await
        })
        .await??;
        Ok(Done {
            message: format!("deleting {name}"),
            data: convert::vm(a.vm, Some(&a.operation_id)),
        })
    }

    /// VMs of `owner` (`None`: everyone's) in creation order, and the quota of `owner` (of
    /// `me` when listing everyone's): the prototype's list answer, one page of it.
    pub async fn vm_list(
        &self,
        me: &User,
        owner: Option<&str>,
        order: VmOrder,
        p: &Paging,
    ) -> Result<(Paged<wire::Vm>, wire::QuotaSummary)> {
        // The page, the owner's quota and their usage: three reads at once.
        let other = owner.filter(|o| *o != me.username.as_str());
        let (page, holder, usage) = tokio::try_join!(
            self.vms_in(owner, order, p),
            async {
                match other {
                    Some(o) => Ok(self.store.user(o).await?),
                    None => Ok(None),
                }
            },
            async {
                Ok(self
                    .store
                    .usage(owner.unwrap_or(me.username.as_str()))
                    .await?)
            },
        )?;
        // An owner who is gone (an admin looking after a delete) holds nothing: no quota.
        let quota = match other {
            Some(_) => holder.map_or(
                basphere_core::Quota {
                    max_vms: 0,
                    max_clusters: 0,
                    max_ips: 0,
                    max_vcpus: None,
                    max_memory_mib: None,
                    max_disk_gib: None,
                },
                |u| u.quota,
            ),
            None => me.quota,
        };
        Ok((page, wire::QuotaSummary::of(&quota, &usage)))
    }

    /// The principal's quota and usage.
    pub async fn quota(&self, me: &Principal) -> Result<wire::QuotaView> {
        let usage = self.store.usage(me.name()).await?;
        Ok(wire::QuotaView {
            summary: wire::QuotaSummary::of(&me.user.quota, &usage),
            username: me.user.username.clone(),
            quota: me.user.quota,
            max_disk_gib: me.user.quota.max_disk_gib,
            used_disk_gib: usage.disk_gib,
            usage,
        })
    }

    /// Everything the principal holds: address block, quota, usage, VMs.
    pub async fn resources(&self, me: &Principal) -> Result<wire::Resources> {
        let usage = self.store.usage(me.name()).await?;
        let vms = self.store.vms(Some(me.name())).await?;
        Ok(wire::Resources {
            username: me.user.username.clone(),
            ip_block: self.block(me.user.ip_block),
            gateway: self.config.network.gateway,
            quota: me.user.quota,
            usage,
            vms: vms.into_iter().map(|v| convert::vm(v, None)).collect(),
            clusters: vec![],
        })
    }

    /// The principal's VMs, usage and 30 latest operations.
    pub async fn dashboard(&self, me: &Principal) -> Result<Dashboard> {
        let owner = me.name();
        let vms = self.store.vms(Some(owner)).await?;
        let usage = self.store.usage(owner).await?;
        let wfs = self.store.workflows(Some(owner), 30).await?;
        Ok(Dashboard {
            vms: vms.into_iter().map(|v| convert::vm(v, None)).collect(),
            usage,
            operations: wfs.iter().map(convert::operation).collect(),
        })
    }
}
