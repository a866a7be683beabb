//! What an admission reads and decides on (the owner's limits and usage, the addresses taken,
//! the locks that make them exact across replicas) and the admission itself.

use super::*;
use crate::workflows::sets::{id_in, ids_arg};

/// The key of the PostgreSQL transaction-level advisory lock that serializes address picking on
/// the extra networks over every replica ("bsp-nic").
pub(super) const NIC_LOCK: i64 = 0x0062_7370_2d6e_6963;

/// Takes [`NIC_LOCK`] on PostgreSQL, once per transaction (`locked` remembers it).
pub(super) async fn nic_lock(tx: &mut dyn Tx, locked: &mut bool) -> Result<()> {
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
    let d = tx.dialect();
    let held = |ips: Vec<String>| {
        let sql = format!(
            "SELECT ip FROM vm_nic_leases WHERE network = $2 AND {}",
            id_in(d, "ip", 1)
        );
        Stmt::new(sql, vec![ids_arg(d, &ips), net.name.as_str().into()])
    };
    let ip = first_free(tx, net.pool.iter().copied(), 1, held)
        .await?
        .pop()
        .ok_or_else(|| AdmitError::NetworkFull(net.name.clone()))?;
    tx.exec(&stmt!(
        "INSERT INTO vm_nic_leases (network, ip, vm_id) VALUES ($1, $2, $3)",
        net.name.as_str(),
        ip.to_string(),
        vm_id,
    ))
    .await?;
    Ok(Some(ip))
}

/// What `owner` holds now: every VM that holds an address or may hold a machine. Only a failed
/// create whose rollback was confirmed gives its address up, so only those are not counted (a
/// failed delete, or a rollback that could not clean up, keeps its address and counts).
pub(crate) async fn usage(tx: &mut dyn Tx, owner: &str) -> Result<Usage> {
    usage_from(&tx.query_one(&usage_stmt(owner)).await?)
}

pub(super) fn usage_stmt(owner: &str) -> Stmt {
    stmt!(
        "SELECT COUNT(*) AS vms, COUNT(ip) AS ips,
                CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus,
                CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS mem,
                CAST(COALESCE(SUM(disk_gib + extra_disk_gib), 0) AS BIGINT) AS disk
         FROM vms WHERE owner = $1 AND (status <> 'failed' OR ip IS NOT NULL)",
        owner
    )
}

/// The usage [`usage_stmt`] answered with.
pub(super) fn usage_of(rows: &[Row]) -> Result<Usage> {
    rows.first()
        .map(usage_from)
        .unwrap_or_else(|| Err(StoreError::Corrupt("vms", "no usage row".into())))
}

pub(super) fn usage_from(row: &Row) -> Result<Usage> {
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

pub(super) fn owner_limits_stmt(d: Dialect, owner: &str) -> Stmt {
    let sql = match d {
        Dialect::Sqlite => OWNER_LIMITS,
        Dialect::Postgres => OWNER_LIMITS_LOCKED,
    };
    stmt!(sql, owner)
}

pub(super) fn limits_from(
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

pub(super) const OWNER_LIMITS: &str = "SELECT status, role, max_vms, max_clusters, max_ips, max_vcpus, \
     max_memory_mib, max_disk_gib, ip_block, public_key FROM users WHERE username = $1";
pub(super) const OWNER_LIMITS_LOCKED: &str = "SELECT status, role, max_vms, max_clusters, max_ips, \
     max_vcpus, max_memory_mib, max_disk_gib, ip_block, public_key FROM users \
     WHERE username = $1 FOR UPDATE";

/// The key of the PostgreSQL transaction-level advisory lock that serializes address picking
/// over every replica ("bsph-ip").
pub(super) const ADDRESS_LOCK: i64 = 0x0062_7370_682d_6970;

/// The statements that take the address lock before free addresses are read ([`free_ips`]).
///
/// Addresses are unique over all users (a block may still hold a previous owner's VM, and a
/// retried create picks again), so picking is a global decision: on PostgreSQL it first takes
/// the transaction-level advisory lock [`ADDRESS_LOCK`], held until commit, so two replicas
/// never read the same free address. It is taken after the owner's row lock
/// ([`owner_limits`]) by every caller, so the two locks are always taken in one order. SQLite's
/// one write thread needs no lock.
pub(super) fn address_lock_stmts(d: Dialect) -> Vec<Stmt> {
    match d {
        Dialect::Postgres => vec![stmt!("SELECT pg_advisory_xact_lock($1)", ADDRESS_LOCK)],
        Dialect::Sqlite => vec![],
    }
}

/// The first `n` assignable addresses of `block` that no VM holds, in the pool's order (fewer
/// when the block is full), so the cost follows the owner's block, not how many VMs the
/// installation has. Take the address lock first ([`address_lock_stmts`]).
pub(crate) async fn free_ips(
    tx: &mut dyn Tx,
    pool: &NetworkPool,
    block: &basphere_core::IpBlock,
    n: usize,
) -> Result<Vec<Ipv4Addr>> {
    let d = tx.dialect();
    let held = |ips: Vec<String>| {
        let sql = format!("SELECT ip FROM vms WHERE {}", id_in(d, "ip", 1));
        Stmt::new(sql, vec![ids_arg(d, &ips)])
    };
    first_free(tx, pool.assignable_in(block), n, held).await
}

/// The first `n` of `candidates` (in order) that `held` does not return: the candidates are
/// looked up by key, a growing window at a time (`held` gets a window's addresses as
/// parameter `$1` and returns those of them taken, as `ip`), never a whole table.
async fn first_free(
    tx: &mut dyn Tx,
    mut candidates: impl Iterator<Item = Ipv4Addr>,
    n: usize,
    held: impl Fn(Vec<String>) -> Stmt,
) -> Result<Vec<Ipv4Addr>> {
    let mut window = (n + 32).max(64);
    let mut free = Vec::with_capacity(n);
    while free.len() < n {
        let chunk: Vec<(Ipv4Addr, String)> = candidates
            .by_ref()
            .take(window)
            .map(|a| (a, a.to_string()))
            .collect();
        if chunk.is_empty() {
            break;
        }
        let ips: Vec<String> = chunk.iter().map(|(_, s)| s.clone()).collect();
        let taken = ips_from(&tx.query(&held(ips)).await?)?;
        free.extend(
            chunk
                .into_iter()
                .filter(|(_, s)| !taken.contains(s))
                .map(|(a, _)| a)
                .take(n - free.len()),
        );
        window = (window * 4).min(4096);
    }
    Ok(free)
}

pub(super) fn ips_from(rows: &[Row]) -> Result<HashSet<String>> {
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
    /// The owner's SSH public key.
    pub key: Option<String>,
}

/// [`owner_limits`], [`usage`], the rows of `rows` and the address lock
/// ([`address_lock_stmts`]) in one round trip. The server runs the statements in the order
/// sent, so the owner's row lock and then the address lock are taken before the reads they
/// guard (and before [`free_ips`]), as when they went one at a time.
pub(crate) async fn holdings(
    tx: &mut dyn Tx,
    owner: &str,
    pool: &NetworkPool,
    rows: Stmt,
) -> std::result::Result<Holdings, AdmitError> {
    let d = tx.dialect();
    let mut stmts = vec![owner_limits_stmt(d, owner), usage_stmt(owner), rows];
    stmts.extend(address_lock_stmts(d));
    let mut res = tx.query_many(&stmts).await?.into_iter();
    let mut next = || res.next().unwrap_or_default();
    let user = next();
    let (quota, block, admin) = limits_from(user.first(), owner, pool)?;
    let key = user
        .first()
        .map(|u| u.opt_text("public_key"))
        .transpose()?
        .flatten();
    let used = usage_of(&next())?;
    let rows = next();
    Ok(Holdings {
        quota,
        block,
        admin,
        used,
        rows,
        key,
    })
}

/// Leases a rolled-back VM's addresses on its extra networks again, the same ones it was
/// admitted with (its record and its machine's configuration name them); refused when one
/// was leased to another VM meanwhile.
pub(super) async fn lease_nics_again(
    tx: &mut dyn Tx,
    vm: &Vm,
) -> std::result::Result<(), AdmitError> {
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
            tx.run(&address_lock_stmts(tx.dialect())).await?;
            free_ips(tx, pool, &block, 1)
                .await?
                .pop()
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

/// Admits the VMs of `req` (see [`Store::admit_vms`]).
pub(super) async fn admit(
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
    let mut free = free_ips(tx, pool, &block, req.names.len())
        .await?
        .into_iter();

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
    let ops: Vec<String> = admitted.iter().map(|(_, op)| op.clone()).collect();
    let leased = LeaseNew::first(tx, &ops, &req.steps, lease)
        .await?
        .map(|l| {
            let at = writes.len();
            writes.extend_from_slice(l.stmts());
            (at, l)
        });
    let mut rows = tx.query_many(&writes).await?;
    let claimed = match &leased {
        Some((at, l)) => l.leased(&rows[*at..])?,
        None => vec![],
    };
    let admitted = admitted
        .into_iter()
        .map(|(i, operation_id)| {
            let row = std::mem::take(&mut rows[i])
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Corrupt("vms", "the insert returned no row".into()))?;
            Ok(Admitted {
                vm: vm_from(row)?,
                operation_id,
            })
        })
        .collect::<std::result::Result<Vec<_>, AdmitError>>()?;
    Ok((admitted, claimed, key))
}
