//! VM records: admission (quota, names, addresses) and deletes in one transaction each,
//! listings, usage; on SQLite and PostgreSQL alike.

pub(crate) mod batch;
mod hooks;

use crate::audit::audit_stmt;
use crate::db::{Cols, Dialect, Filter, Row, Stmt, Tx, stmt};
use crate::workflows::{Claimed, LeaseNew, LeaseTo, NewStep, NewWorkflow, clock, insert_stmts};
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
pub(crate) const VM_AND_KEY: &str = "SELECT v.*, u.public_key AS owner_key FROM vms v
     LEFT JOIN users u ON u.username = v.owner WHERE v.id = $1";

pub(crate) fn vm_from(r: &impl Cols) -> Result<Vm> {
    Ok(Vm {
        id: r.text("id")?,
        name: parse("vms.name", &r.text("name")?)?,
        owner: parse("vms.owner", &r.text("owner")?)?,
        os: r.text("os")?,
        login_user: r.text("login_user")?,
        spec: r.text("spec")?,
        vcpus: r.int("vcpus")? as u32,
        memory_mib: r.int("memory_mib")? as u64,
        disk_gib: r.int("disk_gib")? as u64,
        ip_address: r
            .opt_text("ip")?
            .as_deref()
            .map(|s| parse("vms.ip", s))
            .transpose()?,
        status: parse("vms.status", &r.text("status")?)?,
        error: r.opt_text("error")?,
        provider: r.text("provider")?,
        created_at: r.int("created_at")?,
        updated_at: r.int("updated_at")?,
        extra_disks: json_col(r, "extra_disks")?,
        extra_nics: json_col(r, "extra_nics")?,
    })
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

/// The key of the PostgreSQL transaction-level advisory lock that serializes address picking on
/// the extra networks over every replica ("bsp-nic").
const NIC_LOCK: i64 = 0x0062_7370_2d6e_6963;

/// Takes [`NIC_LOCK`] on PostgreSQL, once per transaction (`locked` remembers it).
async fn nic_lock(tx: &mut dyn Tx, locked: &mut bool) -> Result<()> {
    if tx.dialect() == Dialect::Postgres && !*locked {
        tx.query(&stmt!("SELECT pg_advisory_xact_lock($1)", NIC_LOCK))
            .await?;
        *locked = true;
    }
    Ok(())
}

/// Leases the lowest free address of `net` to VM `vm_id` (`None` on a DHCP network).
///
/// Picking is global (any user's VM may hold an address of a network), so on PostgreSQL it
/// first takes the advisory lock [`NIC_LOCK`] until commit (after the owner's row lock and
/// [`ADDRESS_LOCK`], always in that order); the primary key `(network, ip)` is the lease
/// itself, so a bug here fails the transaction rather than sharing an address.
pub(crate) async fn lease_nic(
    tx: &mut dyn Tx,
    net: &ExtraNetwork,
    vm_id: &str,
    locked: &mut bool,
) -> std::result::Result<Option<Ipv4Addr>, AdmitError> {
    if net.pool.is_empty() {
        return Ok(None);
    }
    nic_lock(tx, locked).await?;
    let taken = tx
        .query(&stmt!(
            "SELECT ip FROM vm_nic_leases WHERE network = $1",
            net.name.as_str()
        ))
        .await?
        .iter()
        .map(|r| r.text("ip"))
        .collect::<Result<HashSet<String>>>()?;
    let ip = net
        .pool
        .iter()
        .find(|a| !taken.contains(&a.to_string()))
        .ok_or_else(|| AdmitError::NetworkFull(net.name.clone()))?;
    tx.exec(&stmt!(
        "INSERT INTO vm_nic_leases (network, ip, vm_id) VALUES ($1, $2, $3)",
        net.name.as_str(),
        ip.to_string(),
        vm_id,
    ))
    .await?;
    Ok(Some(*ip))
}

/// What `owner` holds now: every VM that holds an address or may hold a machine. Only a failed
/// create whose rollback was confirmed gives its address up, so only those are not counted (a
/// failed delete, or a rollback that could not clean up, keeps its address and counts).
pub(crate) async fn usage(tx: &mut dyn Tx, owner: &str) -> Result<Usage> {
    usage_from(&tx.query_one(&usage_stmt(owner)).await?)
}

fn usage_stmt(owner: &str) -> Stmt {
    stmt!(
        "SELECT COUNT(*) AS vms, COUNT(ip) AS ips,
                CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus,
                CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS mem,
                CAST(COALESCE(SUM(disk_gib + extra_disk_gib), 0) AS BIGINT) AS disk
         FROM vms WHERE owner = $1 AND (status <> 'failed' OR ip IS NOT NULL)",
        owner
    )
}

fn usage_from(row: &Row) -> Result<Usage> {
    Ok(Usage {
        vms: row.int("vms")? as u32,
        clusters: 0,
        ips: row.int("ips")? as u32,
        vcpus: row.int("vcpus")? as u32,
        memory_mib: row.int("mem")? as u64,
        disk_gib: row.int("disk")? as u64,
    })
}

/// The owner's quota and IP block, checking the owner may create; and whether they are admin.
///
/// On PostgreSQL this takes the owner's row lock (`FOR UPDATE`) until the transaction ends:
/// every per-user decision that follows (quota, "name taken") reads what the owner's other
/// admissions committed before it, on any replica, and none can commit in between. (SQLite's
/// one write thread already runs every write transaction alone.)
pub(crate) async fn owner_limits(
    tx: &mut dyn Tx,
    owner: &str,
    pool: &NetworkPool,
) -> std::result::Result<(basphere_core::Quota, basphere_core::IpBlock, bool), AdmitError> {
    let user = tx
        .query_opt(&owner_limits_stmt(tx.dialect(), owner))
        .await?;
    limits_from(user.as_ref(), owner, pool)
}

fn owner_limits_stmt(d: Dialect, owner: &str) -> Stmt {
    let sql = match d {
        Dialect::Sqlite => OWNER_LIMITS,
        Dialect::Postgres => OWNER_LIMITS_LOCKED,
    };
    stmt!(sql, owner)
}

fn limits_from(
    user: Option<&Row>,
    owner: &str,
    pool: &NetworkPool,
) -> std::result::Result<(basphere_core::Quota, basphere_core::IpBlock, bool), AdmitError> {
    let user = user.ok_or_else(|| AdmitError::NoUser(owner.to_string()))?;
    let status: UserStatus = parse("users.status", &user.text("status")?)?;
    if status != UserStatus::Active {
        return Err(AdmitError::NotActive(owner.to_string(), status));
    }
    let quota = crate::users::quota_from(user)?;
    let block = user
        .opt_int("ip_block")?
        .and_then(|b| pool.block(b as u32))
        .ok_or_else(|| AdmitError::NoBlock(owner.to_string()))?;
    let admin = user.text("role")? == Role::Admin.as_str();
    Ok((quota, block, admin))
}

const OWNER_LIMITS: &str = "SELECT status, role, max_vms, max_clusters, max_ips, max_vcpus, \
     max_memory_mib, max_disk_gib, ip_block, public_key FROM users WHERE username = $1";
const OWNER_LIMITS_LOCKED: &str = "SELECT status, role, max_vms, max_clusters, max_ips, \
     max_vcpus, max_memory_mib, max_disk_gib, ip_block, public_key FROM users \
     WHERE username = $1 FOR UPDATE";

/// The key of the PostgreSQL transaction-level advisory lock that serializes address picking
/// over every replica ("bsph-ip").
const ADDRESS_LOCK: i64 = 0x0062_7370_682d_6970;

/// Every address leased to a VM now, for the caller to pick free ones from.
///
/// Addresses are unique over all users (a block may still hold a previous owner's VM, and a
/// retried create picks again), so picking is a global decision: on PostgreSQL this first
/// takes the transaction-level advisory lock [`ADDRESS_LOCK`], held until commit, so two
/// replicas never read the same free address. It is taken after the owner's row lock
/// ([`owner_limits`]) by every caller, so the two locks are always taken in one order. SQLite's
/// one write thread needs no lock.
pub(crate) async fn taken_ips(tx: &mut dyn Tx) -> Result<HashSet<String>> {
    let taken = tx.query_many(&taken_ips_stmts(tx.dialect())).await?;
    ips_from(taken.last().map_or(&[][..], Vec::as_slice))
}

/// [`taken_ips`]' statements: the address lock (PostgreSQL), then the addresses.
fn taken_ips_stmts(d: Dialect) -> Vec<Stmt> {
    let mut stmts = vec![];
    if d == Dialect::Postgres {
        stmts.push(stmt!("SELECT pg_advisory_xact_lock($1)", ADDRESS_LOCK));
    }
    stmts.push(stmt!("SELECT ip FROM vms WHERE ip IS NOT NULL"));
    stmts
}

fn ips_from(rows: &[Row]) -> Result<HashSet<String>> {
    rows.iter().map(|r| r.text("ip")).collect()
}

/// What an admission of `owner`'s VMs decides on.
pub(crate) struct Holdings {
    pub quota: basphere_core::Quota,
    pub block: basphere_core::IpBlock,
    pub admin: bool,
    /// What the owner holds now ([`usage`]).
    pub used: Usage,
    /// The rows of the caller's own statement (e.g. the owner's VMs).
    pub rows: Vec<Row>,
    /// Every address leased to a VM ([`taken_ips`]).
    pub taken: HashSet<String>,
    /// The owner's SSH public key.
    pub key: Option<String>,
}

/// [`owner_limits`], [`usage`], the rows of `rows` and [`taken_ips`] in one round trip. The
/// server runs the statements in the order sent, so the owner's row lock and then the address
/// lock are taken before the reads they guard, as when they went one at a time.
pub(crate) async fn holdings(
    tx: &mut dyn Tx,
    owner: &str,
    pool: &NetworkPool,
    rows: Stmt,
) -> std::result::Result<Holdings, AdmitError> {
    let d = tx.dialect();
    let mut stmts = vec![owner_limits_stmt(d, owner), usage_stmt(owner), rows];
    stmts.extend(taken_ips_stmts(d));
    let mut res = tx.query_many(&stmts).await?.into_iter();
    let mut next = || res.next().unwrap_or_default();
    let user = next();
    let (quota, block, admin) = limits_from(user.first(), owner, pool)?;
    let key = user
        .first()
        .map(|u| u.opt_text("public_key"))
        .transpose()?
        .flatten();
    let used = next()
        .first()
        .map(usage_from)
        .transpose()?
        .ok_or_else(|| StoreError::Corrupt("vms", "no usage row".into()))?;
    let rows = next();
    let taken = ips_from(&res.last().unwrap_or_default())?;
    Ok(Holdings {
        quota,
        block,
        admin,
        used,
        rows,
        taken,
        key,
    })
}

/// Leases a rolled-back VM's addresses on its extra networks again, the same ones it was
/// admitted with (its record and its machine's configuration name them); refused when one
/// was leased to another VM meanwhile.
async fn lease_nics_again(tx: &mut dyn Tx, vm: &Vm) -> std::result::Result<(), AdmitError> {
    let mut locked = false;
    for nic in &vm.extra_nics {
        let Some(ip) = nic.ip else { continue };
        nic_lock(tx, &mut locked).await?;
        let leased = tx
            .exec(&stmt!(
                "INSERT INTO vm_nic_leases (network, ip, vm_id) VALUES ($1, $2, $3)
                 ON CONFLICT (network, ip) DO NOTHING",
                nic.network.as_str(),
                ip.to_string(),
                vm.id.as_str(),
            ))
            .await?;
        if leased == 0 {
            let holder = tx
                .query_opt(&stmt!(
                    "SELECT vm_id FROM vm_nic_leases WHERE network = $1 AND ip = $2",
                    nic.network.as_str(),
                    ip.to_string()
                ))
                .await?;
            if holder.map(|r| r.text("vm_id")).transpose()?.as_deref() != Some(vm.id.as_str()) {
                return Err(AdmitError::NicTaken(nic.network.clone(), ip));
            }
        }
    }
    Ok(())
}

/// Gives a rolled-back (failed) VM its quota and an address again, for a retried create.
pub(crate) async fn readmit(
    tx: &mut dyn Tx,
    vm_id: &str,
    pool: &NetworkPool,
) -> std::result::Result<(), AdmitError> {
    let vm = vm_where_id(tx, vm_id)
        .await?
        .ok_or_else(|| AdmitError::NoUser(format!("of VM {vm_id} (the VM is gone)")))?;
    if vm.status != VmStatus::Failed {
        return Ok(());
    }
    let owner = vm.owner.as_str();
    let (quota, block, _) = owner_limits(tx, owner, pool).await?;
    if vm.ip_address.is_none() {
        // A VM that kept its address is counted already (see `usage`).
        let used = usage(tx, owner).await?;
        let extra: u64 = vm.extra_disks.iter().map(|d| u64::from(d.size_gib)).sum();
        let each = basphere_core::Spec {
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_gib: vm.disk_gib + extra,
        };
        quota.admit(&used, 1, &each)?;
        lease_nics_again(tx, &vm).await?;
    }
    let ip = match vm.ip_address {
        Some(ip) => ip,
        None => {
            let taken = taken_ips(tx).await?;
            pool.assignable_in(&block)
                .find(|a| !taken.contains(&a.to_string()))
                .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?
        }
    };
    tx.exec(&stmt!(
        "UPDATE vms SET status = 'creating', error = NULL, ip = $2, updated_at = $3 WHERE id = $1",
        vm_id,
        ip.to_string(),
        now_ms(),
    ))
    .await?;
    Ok(())
}

async fn vm_where_id(tx: &mut dyn Tx, id: &str) -> Result<Option<Vm>> {
    tx.query_opt(&stmt!(SELECT_BY_ID, id))
        .await?
        .as_ref()
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

/// Admits the VMs of `req` (see [`Store::admit_vms`]).
async fn admit(
    tx: &mut dyn Tx,
    req: &AdmitRequest,
    extras: &AdmitExtras,
    pool: &NetworkPool,
    actor: &Actor,
    lease: Option<&LeaseTo>,
) -> std::result::Result<(Vec<Admitted>, Vec<Claimed>, Option<String>), AdmitError> {
    let owner = req.owner.as_str();
    let names = stmt!("SELECT name FROM vms WHERE owner = $1", owner);
    let Holdings {
        quota,
        block,
        admin,
        used,
        rows,
        taken: taken_ips,
        key,
    } = holdings(tx, owner, pool, names).await?;
    let mut seen = HashSet::new();
    for n in &req.names {
        if !seen.insert(n) {
            return Err(AdmitError::DuplicateInRequest(n.clone()));
        }
    }
    let each = basphere_core::Spec {
        disk_gib: req.spec.disk_gib + extras.disk_gib(),
        ..req.spec
    };
    quota.admit(&used, req.names.len() as u32, &each)?;
    let disks_json = serde_json::to_string(&extras.disks)
        .map_err(|e| StoreError::Corrupt("vms", format!("extra_disks: {e}")))?;
    let mut nic_locked = false;
    let existing = rows
        .iter()
        .map(|r| r.text("name"))
        .collect::<Result<HashSet<String>>>()?;
    if let Some(taken) = req.names.iter().find(|n| existing.contains(n.as_str())) {
        return Err(AdmitError::NameTaken(taken.clone()));
    }
    let mut free = pool
        .assignable_in(&block)
        .filter(|a| !taken_ips.contains(&a.to_string()));

    let now = now_ms();
    // Every VM's rows go in one batch (PostgreSQL pipelines it): its row, its workflow, audit.
    let (mut writes, mut admitted) = (vec![], vec![]);
    for name in &req.names {
        let ip = free
            .next()
            .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?;
        let id = uuid::Uuid::now_v7().to_string();
        let mut nics = Vec::with_capacity(extras.networks.len());
        for net in &extras.networks {
            let ip = lease_nic(tx, net, &id, &mut nic_locked).await?;
            nics.push(ExtraNic {
                network: net.name.clone(),
                ip,
            });
        }
        let nics_json = serde_json::to_string(&nics)
            .map_err(|e| StoreError::Corrupt("vms", format!("extra_nics: {e}")))?;
        let at = writes.len();
        writes.push(stmt!(
            "INSERT INTO vms (id, owner, name, os, login_user, spec, vcpus, memory_mib,
                    disk_gib, ip, status, provider, created_at, updated_at, extra_disks,
                    extra_nics, extra_disk_gib)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'creating', $11, $12, $12,
                    $13, $14, $15)
                 RETURNING id, name, owner, os, login_user, spec, vcpus, memory_mib, disk_gib,
                    ip, status, error, provider, created_at, updated_at, extra_disks, extra_nics",
            id.as_str(),
            owner,
            name.as_str(),
            req.os.as_str(),
            req.login_user.as_str(),
            req.spec_name.as_str(),
            req.spec.vcpus,
            req.spec.memory_mib as i64,
            req.spec.disk_gib as i64,
            ip.to_string(),
            req.provider.as_str(),
            now,
            disks_json.as_str(),
            nics_json,
            extras.disk_gib() as i64,
        ));
        let mut w = NewWorkflow::new(VmOperation::Create.as_str(), owner, req.steps.clone());
        w.resource = Some(ResourceRef::vm(&id));
        w.priority = if admin { 5 } else { 0 };
        let operation_id = uuid::Uuid::now_v7().to_string();
        writes.extend(insert_stmts(&w, &operation_id, None, now));
        let detail = format!(
            "ip={ip} spec={} os={} operation={operation_id}",
            req.spec_name, req.os
        );
        writes.push(audit_stmt(
            actor,
            "vm.create",
            &format!("{owner}/{name}"),
            "accepted",
            Some(&detail),
        ));
        admitted.push((at, operation_id));
    }
    // The first `lease.max` workflows leased to the caller's node, their first step started.
    let leased = match (lease, req.steps.first()) {
        (Some(l), Some(first)) if l.max > 0 => {
            let now = clock(tx).await?;
            let new: Vec<(String, String, i64)> = admitted
                .iter()
                .take(l.max)
                .map(|(_, op)| (op.clone(), first.name.clone(), first.timeout_ms))
                .collect();
            let at = writes.len();
            let l = LeaseNew::new(tx.dialect(), &new, &l.node, now + l.lease_ms, now);
            writes.extend_from_slice(l.stmts());
            Some((at, l, now))
        }
        _ => None,
    };
    let rows = tx.query_many(&writes).await?;
    let claimed = match &leased {
        Some((at, l, now)) => l.leased(&rows[*at..], *now)?,
        None => vec![],
    };
    let admitted = admitted
        .into_iter()
        .map(|(i, operation_id)| {
            let row = rows[i]
                .first()
                .ok_or_else(|| StoreError::Corrupt("vms", "the insert returned no row".into()))?;
            Ok(Admitted {
                vm: vm_from(row)?,
                operation_id,
            })
        })
        .collect::<std::result::Result<Vec<_>, AdmitError>>()?;
    Ok((admitted, claimed, key))
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
) -> std::result::Result<Admitted, DeleteError> {
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
        .as_ref()
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
    tx.run(&stmts).await?;
    Ok(Admitted {
        vm: Vm {
            status: VmStatus::Deleting,
            ..vm
        },
        operation_id,
    })
}

impl Store {
    /// Admits VMs in one transaction: checks the owner's state and quota, allocates addresses
    /// from the owner's block, inserts the VM rows (creating), their create workflows and the
    /// audit record. Either all requested VMs are admitted or none. Exact across replicas
    /// sharing a PostgreSQL database: see [`owner_limits`] and [`taken_ips`] for the locks.
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
                self.prefetched
                    .put(a.vm.id.clone(), (a.vm.clone(), key.clone()));
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
        let (owner, name, steps, actor) = (
            owner.to_string(),
            name.to_string(),
            steps.to_vec(),
            actor.clone(),
        );
        self.db
            .write(move |tx| {
                Box::pin(async move { begin_delete(tx, &owner, &name, &steps, &actor).await })
            })
            .await
    }

    /// One VM by owner and name.
    pub async fn vm(&self, owner: &str, name: &str) -> Result<Option<Vm>> {
        let s = stmt!(SELECT_BY_NAME, owner, name);
        self.db
            .read(move |tx| {
                Box::pin(async move { tx.query_opt(&s).await?.as_ref().map(vm_from).transpose() })
            })
            .await
    }

    /// One VM by id with its owner's SSH public key (one query, for the engine).
    pub async fn vm_and_key(&self, id: &str) -> Result<Option<(Vm, Option<String>)>> {
        if let Some(hit) = self.prefetched.take::<(Vm, Option<String>)>(id) {
            return Ok(Some(hit));
        }
        let s = stmt!(VM_AND_KEY, id);
        self.db
            .read(move |tx| {
                Box::pin(async move {
                    tx.query_opt(&s)
                        .await?
                        .as_ref()
                        .map(|r| Ok((vm_from(r)?, r.opt_text("owner_key")?)))
                        .transpose()
                })
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
                    tx.query(&f.stmt(sql)).await?.iter().map(vm_from).collect()
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
                    rows.iter().map(vm_from).collect()
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
}
