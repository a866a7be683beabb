//! VM records: admission (quota, names, addresses) and deletes in one transaction each,
//! listings, usage; on SQLite and PostgreSQL alike.

mod admission;
pub(crate) mod batch;
mod hooks;

pub(crate) use admission::*;

use crate::audit::audit_stmt;
use crate::db::{Cols, Dialect, Filter, Row, Stmt, Tx, stmt};
use crate::hooks::Prefetch;
use crate::workflows::{Claimed, LeaseNew, LeaseTo, NewStep, NewWorkflow, insert_stmts};
use crate::{Actor, Result, Store, StoreError, now_ms, parse};
use basphere_core::{
    ExtraDisk, ExtraNic, ImageName, NetworkPool, QuotaExceeded, ResourceRef, Role, Spec, SpecName,
    Usage, UserStatus, Username, VmName, VmOperation, VmStatus,
};
use serde::Serialize;
use std::collections::HashSet;
use std::net::Ipv4Addr;

/// A VM record.
#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    pub id: String,
    pub name: VmName,
    pub owner: Username,
    pub os: String,
    pub login_user: String,
    pub spec: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub ip_address: Option<Ipv4Addr>,
    pub status: VmStatus,
    pub error: Option<String>,
    pub provider: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Disks beside the boot disk, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    /// Interfaces on catalog networks, in order, with their leased addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_nics: Vec<ExtraNic>,
}

/// What each VM of an admission gets beside its spec.
#[derive(Debug, Clone, Default)]
pub struct AdmitExtras {
    pub disks: Vec<ExtraDisk>,
    pub networks: Vec<ExtraNetwork>,
}

impl AdmitExtras {
    /// GiB the extra disks add to each VM.
    pub fn disk_gib(&self) -> u64 {
        self.disks.iter().map(|d| u64::from(d.size_gib)).sum()
    }
}

/// A catalog network a VM joins, as the admission needs it.
#[derive(Debug, Clone)]
pub struct ExtraNetwork {
    pub name: String,
    /// The addresses to lease from, lowest first; empty: the network uses DHCP.
    pub pool: Vec<Ipv4Addr>,
}

/// A request to create `names.len()` VMs of one kind for `owner`.
#[derive(Debug, Clone)]
pub struct AdmitRequest {
    pub owner: Username,
    pub names: Vec<VmName>,
    pub os: ImageName,
    pub login_user: String,
    pub spec_name: SpecName,
    pub spec: Spec,
    pub provider: String,
    /// Step names of the create workflow, in order.
    pub steps: Vec<NewStep>,
}

/// A VM with its owner's SSH public key: what a VM step reads ([`Store::vm_and_key`]).
pub type VmAndKey = (Vm, Option<String>);

/// Hands `vm` and its owner's `key` to the engine's next read of it ([`Store::vm_and_key`]):
/// what an admission or a hand-off read or wrote in its own transaction.
pub(crate) fn prefetch_vm(cache: &Prefetch, vm: Vm, key: Option<String>) {
    cache.put::<VmAndKey>(vm.id.clone(), (vm, key));
}

/// One admitted VM and the workflow that builds it.
#[derive(Debug, Clone, Serialize)]
pub struct Admitted {
    pub vm: Vm,
    pub operation_id: String,
}

/// Why a create was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("user {0} is {1}; only active users can create VMs")]
    NotActive(String, UserStatus),
    #[error("user {0} not found")]
    NoUser(String),
    #[error("user {0} has no IP block yet (approve the user first)")]
    NoBlock(String),
    #[error("a VM named {0} already exists")]
    NameTaken(VmName),
    #[error("the same name {0} appears twice in the request")]
    DuplicateInRequest(VmName),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error("no free address left in user {0}'s block {1}")]
    BlockFull(String, String),
    #[error("no free address left on network {0}; ask an admin to widen it")]
    NetworkFull(String),
    #[error(
        "address {1} on network {0}, which this VM was created with, was leased to another VM \
         meanwhile; delete the VM and create it again"
    )]
    NicTaken(String, Ipv4Addr),

    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a delete was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("VM {0} not found")]
    NotFound(String),
    #[error("VM {0} is {1}; wait for its operation {2} to finish, then delete it")]
    Busy(String, VmStatus, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) const VM_COLS: &str = "id, name, owner, os, login_user, spec, vcpus, memory_mib, disk_gib, ip, \
     status, error, provider, created_at, updated_at, extra_disks, extra_nics";

/// A VM with its owner's public key (the provider request's inputs).
/// VMs with their owners' SSH public keys (`owner_key`); a `WHERE` on `v` follows.
pub(crate) const VMS_AND_KEYS: &str =
    "SELECT v.*, u.public_key AS owner_key FROM vms v LEFT JOIN users u ON u.username = v.owner";

pub(crate) fn vm_from(mut r: Row) -> Result<Vm> {
    Ok(Vm {
        id: r.take_text("id")?,
        name: parse("vms.name", &r.text("name")?)?,
        owner: parse("vms.owner", &r.text("owner")?)?,
        os: r.take_text("os")?,
        login_user: r.take_text("login_user")?,
        spec: r.take_text("spec")?,
        vcpus: r.int("vcpus")? as u32,
        memory_mib: r.int("memory_mib")? as u64,
        disk_gib: r.int("disk_gib")? as u64,
        ip_address: r
            .opt_text("ip")?
            .as_deref()
            .map(|s| parse("vms.ip", s))
            .transpose()?,
        status: parse("vms.status", &r.text("status")?)?,
        error: r.take_opt_text("error")?,
        provider: r.take_text("provider")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
        extra_disks: json_col(&r, "extra_disks")?,
        extra_nics: json_col(&r, "extra_nics")?,
    })
}

/// A VM and its owner's key, from a row of [`VMS_AND_KEYS`].
pub(crate) fn vm_and_key_from(mut r: Row) -> Result<VmAndKey> {
    let key = r.take_opt_text("owner_key")?;
    Ok((vm_from(r)?, key))
}

/// A JSON list column the store wrote (`[]` when empty).
fn json_col<T: serde::de::DeserializeOwned>(r: &impl Cols, col: &'static str) -> Result<Vec<T>> {
    match r.opt_text(col)? {
        None => Ok(vec![]),
        Some(s) => {
            serde_json::from_str(&s).map_err(|e| StoreError::Corrupt("vms", format!("{col}: {e}")))
        }
    }
}

async fn vm_where_id(tx: &mut dyn Tx, id: &str) -> Result<Option<Vm>> {
    tx.query_opt(&stmt!(SELECT_BY_ID, id))
        .await?
        .map(vm_from)
        .transpose()
}

const SELECT_BY_ID: &str = "SELECT id, name, owner, os, login_user, spec, vcpus, memory_mib, \
     disk_gib, ip, status, error, provider, created_at, updated_at, extra_disks, extra_nics \
     FROM vms WHERE id = $1";
const SELECT_BY_NAME: &str = "SELECT id, name, owner, os, login_user, spec, vcpus, memory_mib, \
     disk_gib, ip, status, error, provider, created_at, updated_at, extra_disks, extra_nics \
     FROM vms WHERE owner = $1 AND name = $2";

/// The newest live operation on resource `id` (none when it has none).
pub(crate) fn live_op_stmt(id: &str) -> Stmt {
    stmt!(
        "SELECT id FROM workflows WHERE resource_id = $1
           AND status IN ('pending', 'running', 'undoing')
         ORDER BY created_at DESC LIMIT 1",
        id
    )
}

/// Marks a VM deleting and queues its delete workflow (see [`Store::begin_delete_vm`]).
///
/// On PostgreSQL it first takes the owner's row lock, as admissions do: two deletes of one VM
/// on two replicas (or a delete and a batch that deletes it) run one after the other, and the
/// second sees the VM deleting.
async fn begin_delete(
    tx: &mut dyn Tx,
    owner: &str,
    name: &str,
    steps: &[NewStep],
    actor: &Actor,
    lease: Option<&LeaseTo>,
) -> std::result::Result<(Admitted, Vec<Claimed>), DeleteError> {
    if tx.dialect() == Dialect::Postgres {
        tx.query(&stmt!(
            "SELECT username FROM users WHERE username = $1 FOR UPDATE",
            owner
        ))
        .await?;
    }
    let vm = tx
        .query_opt(&stmt!(SELECT_BY_NAME, owner, name))
        .await?
        .map(vm_from)
        .transpose()?
        .ok_or_else(|| DeleteError::NotFound(name.to_string()))?;
    if matches!(vm.status, VmStatus::Creating | VmStatus::Deleting) {
        let op = tx
            .query_opt(&live_op_stmt(&vm.id))
            .await?
            .map(|r| r.text("id"))
            .transpose()?
            .unwrap_or_default();
        return Err(DeleteError::Busy(name.to_string(), vm.status, op));
    }
    tx.exec(&stmt!(
        "UPDATE vms SET status = 'deleting', updated_at = $2 WHERE id = $1",
        vm.id.as_str(),
        now_ms()
    ))
    .await?;
    let mut w = NewWorkflow::new(VmOperation::Delete.as_str(), owner, steps.to_vec());
    w.resource = Some(ResourceRef::vm(&vm.id));
    w.priority = 10;
    let operation_id = uuid::Uuid::now_v7().to_string();
    let mut stmts = insert_stmts(&w, &operation_id, None, now_ms());
    stmts.push(audit_stmt(
        actor,
        "vm.delete",
        &format!("{owner}/{name}"),
        "accepted",
        Some(&format!("operation={operation_id}")),
    ));
    // Leased to the caller's node with its first step started, when it holds a slot.
    let leased = LeaseNew::first(tx, std::slice::from_ref(&operation_id), steps, lease).await?;
    let at = stmts.len();
    if let Some(l) = &leased {
        stmts.extend_from_slice(l.stmts());
    }
    let rows = tx.query_many(&stmts).await?;
    let claimed = match &leased {
        Some(l) => l.leased(&rows[at..])?,
        None => vec![],
    };
    let vm = Vm {
        status: VmStatus::Deleting,
        ..vm
    };
    Ok((Admitted { vm, operation_id }, claimed))
}

impl Store {
    /// Admits VMs in one transaction: checks the owner's state and quota, allocates addresses
    /// from the owner's block, inserts the VM rows (creating), their create workflows and the
    /// audit record. Either all requested VMs are admitted or none. Exact across replicas
    /// sharing a PostgreSQL database: see [`owner_limits`] and [`address_lock_stmts`] for the locks.
    pub async fn admit_vms(
        &self,
        req: &AdmitRequest,
        pool: &NetworkPool,
        actor: &Actor,
    ) -> std::result::Result<Vec<Admitted>, AdmitError> {
        self.admit_vms_with(req, &AdmitExtras::default(), pool, actor)
            .await
    }

    /// [`Store::admit_vms`] with extra disks and networks for each VM: the disk limit is
    /// checked in the same transaction as the others (on PostgreSQL under the owner's row
    /// lock), and each static address on an extra network is leased there too (see
    /// [`lease_nic`]), so either every VM gets all of it or nothing is stored.
    pub async fn admit_vms_with(
        &self,
        req: &AdmitRequest,
        extras: &AdmitExtras,
        pool: &NetworkPool,
        actor: &Actor,
    ) -> std::result::Result<Vec<Admitted>, AdmitError> {
        Ok(self
            .admit_vms_leased(req, extras, pool, actor, None)
            .await?
            .0)
    }

    /// [`Store::admit_vms_with`] that also leases the first VMs' workflows to `lease`'s node
    /// and starts their first step, in the same transaction; those workflows as claimed. The
    /// step reads its VM without asking the database again.
    pub async fn admit_vms_leased(
        &self,
        req: &AdmitRequest,
        extras: &AdmitExtras,
        pool: &NetworkPool,
        actor: &Actor,
        lease: Option<LeaseTo>,
    ) -> std::result::Result<(Vec<Admitted>, Vec<Claimed>), AdmitError> {
        let (req, extras, pool, actor) = (req.clone(), extras.clone(), pool.clone(), actor.clone());
        let (admitted, claimed, key) = self
            .db
            .write(move |tx| {
                Box::pin(
                    async move { admit(tx, &req, &extras, &pool, &actor, lease.as_ref()).await },
                )
            })
            .await?;
        for (wf, _, _) in &claimed {
            if let Some(a) = admitted.iter().find(|a| a.operation_id == wf.id) {
                prefetch_vm(&self.prefetched, a.vm.clone(), key.clone());
            }
        }
        Ok((admitted, claimed))
    }

    /// Marks a VM deleting and queues its delete workflow; returns the VM and operation id.
    pub async fn begin_delete_vm(
        &self,
        owner: &str,
        name: &str,
        steps: &[NewStep],
        actor: &Actor,
    ) -> std::result::Result<Admitted, DeleteError> {
        let (a, _) = self
            .begin_delete_vm_leased(owner, name, steps, actor, None)
            .await?;
        Ok(a)
    }

    /// [`Store::begin_delete_vm`], leasing the delete workflow to `lease`'s node with its
    /// first step started (as [`Store::admit_vms_leased`] does for creates).
    pub async fn begin_delete_vm_leased(
        &self,
        owner: &str,
        name: &str,
        steps: &[NewStep],
        actor: &Actor,
        lease: Option<LeaseTo>,
    ) -> std::result::Result<(Admitted, Vec<Claimed>), DeleteError> {
        let (owner, name, steps, actor) = (
            owner.to_string(),
            name.to_string(),
            steps.to_vec(),
            actor.clone(),
        );
        self.db
            .write(move |tx| {
                Box::pin(async move {
                    begin_delete(tx, &owner, &name, &steps, &actor, lease.as_ref()).await
                })
            })
            .await
    }

    /// One VM by owner and name.
    pub async fn vm(&self, owner: &str, name: &str) -> Result<Option<Vm>> {
        let s = stmt!(SELECT_BY_NAME, owner, name);
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query_opt(&s).await?.map(vm_from).transpose() })
            })
            .await
    }

    /// One VM by id with its owner's SSH public key (one query, for the engine).
    pub async fn vm_and_key(&self, id: &str) -> Result<Option<VmAndKey>> {
        if let Some(hit) = self.prefetched.take::<VmAndKey>(id) {
            return Ok(Some(hit));
        }
        let s = stmt!(format!("{VMS_AND_KEYS} WHERE v.id = $1"), id);
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query_opt(&s).await?.map(vm_and_key_from).transpose() })
            })
            .await
    }

    /// One VM by id.
    pub async fn vm_by_id(&self, id: &str) -> Result<Option<Vm>> {
        let id = id.to_string();
        self.db
            .read(move |tx| Box::pin(async move { vm_where_id(tx, &id).await }))
            .await
    }

    /// VMs of `owner`, or of everyone when `None`, by owner then name (byte order on both
    /// backends).
    pub async fn vms(&self, owner: Option<&str>) -> Result<Vec<Vm>> {
        let owner = owner.map(str::to_string);
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let order = match tx.dialect() {
                        Dialect::Sqlite => "owner, name",
                        Dialect::Postgres => "owner COLLATE \"C\", name COLLATE \"C\"",
                    };
                    let mut f = Filter::default();
                    f.given(owner, |p| format!("owner = {p}"));
                    let sql = format!("SELECT {VM_COLS} FROM vms{} ORDER BY {order}", f.clause());
                    tx.query(&f.stmt(sql))
                        .await?
                        .into_iter()
                        .map(vm_from)
                        .collect()
                })
            })
            .await
    }

    /// One page of the VMs of `owner` (or everyone), in creation order (ids are UUIDv7): at
    /// most `limit` after the VM with id `after`.
    pub async fn vms_page(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Vm>> {
        let mut f = Filter::default();
        f.given(owner, |p| format!("owner = {p}"))
            .given(after, |p| format!("id > {p}"));
        let s = f.page(&format!("SELECT {VM_COLS} FROM vms"), "id", limit);
        self.read_vms(move |_| s).await
    }

    /// The page of VMs the statement `select(dialect)` selects (`VM_COLS`), in its order.
    ///
    /// Its order is an index's, so a page is an index range. PostgreSQL is told not to sort
    /// instead: without statistics (a table just filled, before autovacuum's first `ANALYZE`)
    /// it guesses that a third of the table matches and sorts all of it for every page.
    async fn read_vms(
        &self,
        select: impl FnOnce(Dialect) -> Stmt + Send + 'static,
    ) -> Result<Vec<Vm>> {
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let s = select(tx.dialect());
                    let rows = match tx.dialect() {
                        Dialect::Sqlite => tx.query(&s).await?,
                        Dialect::Postgres => {
                            let no_sort = stmt!("SET LOCAL enable_sort = off");
                            tx.query_many(&[no_sort, s])
                                .await?
                                .pop()
                                .unwrap_or_default()
                        }
                    };
                    rows.into_iter().map(vm_from).collect()
                })
            })
            .await
    }

    /// Up to `limit` VMs of `owner` (`None`: everyone's) by owner, then name, after the VM
    /// `after` names (`(owner, name)`). Byte order on both backends (PostgreSQL compares with
    /// `COLLATE "C"`, whatever the database's collation), as [`Store::vms`] sorts.
    pub async fn vms_page_by_name(
        &self,
        owner: Option<&str>,
        after: Option<(&str, &str)>,
        limit: i64,
    ) -> Result<Vec<Vm>> {
        let (owner, after) = (
            owner.map(str::to_string),
            after.map(|(o, n)| (o.to_string(), n.to_string())),
        );
        self.read_vms(move |d| {
            let c = match d {
                Dialect::Sqlite => "",
                Dialect::Postgres => " COLLATE \"C\"",
            };
            let mut f = Filter::default();
            f.given(owner, |p| format!("owner = {p}"));
            if let Some((o, n)) = after {
                let (o, n) = (f.arg(o), f.arg(n));
                f.and(format!("(owner{c}, name{c}) > ({o}, {n})"));
            }
            let order = format!("owner{c}, name{c}");
            f.page(&format!("SELECT {VM_COLS} FROM vms"), &order, limit)
        })
        .await
    }

    /// What `owner` holds now.
    pub async fn usage(&self, owner: &str) -> Result<Usage> {
        let owner = owner.to_string();
        self.db
            .read(move |tx| Box::pin(async move { usage(tx, &owner).await }))
            .await
    }

    /// What each of `owners` holds now, in their order: one read (one round trip on
    /// PostgreSQL), whatever their number.
    pub async fn usages(&self, owners: Vec<String>) -> Result<Vec<Usage>> {
        if owners.is_empty() {
            return Ok(vec![]);
        }
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    let stmts: Vec<Stmt> = owners.iter().map(|o| usage_stmt(o)).collect();
                    tx.query_many(&stmts)
                        .await?
                        .iter()
                        .map(|rows| usage_of(rows))
                        .collect()
                })
            })
            .await
    }
}
