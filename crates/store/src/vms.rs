use crate::audit::record;
use crate::db::Cols;
use crate::db::{Stmt, stmt};
use crate::hooks::{Hooks, ResourceHooks, RetryCtx};
use crate::workflows::{Ending, NewWorkflow, OpError, Workflow, WorkflowOutcome, insert_new};
use crate::{Actor, Result, Store, StoreError, now_ms, parse};
use basphere_core::{
    ImageName, NetworkPool, QuotaExceeded, ResourceRef, Role, Spec, SpecName, Usage, UserStatus,
    Username, VmName, VmOperation, VmStatus,
};
use serde::Serialize;
use sqlx::{Row, SqliteConnection};
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
    pub steps: Vec<String>,
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

    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AdmitError {
    fn from(e: sqlx::Error) -> Self {
        AdmitError::Store(e.into())
    }
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

impl From<sqlx::Error> for DeleteError {
    fn from(e: sqlx::Error) -> Self {
        DeleteError::Store(e.into())
    }
}

pub(crate) const VM_COLS: &str = "id, name, owner, os, login_user, spec, vcpus, memory_mib, disk_gib, ip, \
     status, error, provider, created_at, updated_at";

/// A VM with its owner's public key (the provider request's inputs).
pub(crate) const VM_AND_KEY: &str = "SELECT v.*, u.public_key AS owner_key FROM vms v
     LEFT JOIN users u ON u.username = v.owner WHERE v.id = $1";

/// VM records the write thread read while leasing their workflows, for the engine's first
/// step to take instead of reading them again (each is taken once, and only while fresh).
#[derive(Debug, Default)]
pub(crate) struct Prefetched(std::sync::Mutex<std::collections::HashMap<String, Fetched>>);

/// When a VM record was read, the record, and its owner's key.
type Fetched = (std::time::Instant, (Vm, Option<String>));

impl Prefetched {
    const FRESH: std::time::Duration = std::time::Duration::from_secs(2);

    pub(crate) fn put(&self, vm: Vm, key: Option<String>) {
        let mut m = self.0.lock().expect("prefetch lock");
        if m.len() >= 4096 {
            m.retain(|_, (at, _)| at.elapsed() < Self::FRESH);
        }
        m.insert(vm.id.clone(), (std::time::Instant::now(), (vm, key)));
    }

    pub(crate) fn take(&self, id: &str) -> Option<(Vm, Option<String>)> {
        let (at, hit) = self.0.lock().expect("prefetch lock").remove(id)?;
        (at.elapsed() < Self::FRESH).then_some(hit)
    }
}

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
    })
}

/// What `owner` holds now: every VM that holds an address or may hold a machine. Only a failed
/// create whose rollback was confirmed gives its address up, so only those are not counted (a
/// failed delete, or a rollback that could not clean up, keeps its address and counts).
pub(crate) async fn usage(conn: &mut SqliteConnection, owner: &str) -> Result<Usage> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS vms, COUNT(ip) AS ips, COALESCE(SUM(vcpus), 0) AS vcpus,
                COALESCE(SUM(memory_mib), 0) AS mem
         FROM vms WHERE owner = $1 AND (status <> 'failed' OR ip IS NOT NULL)",
    )
    .bind(owner)
    .fetch_one(conn)
    .await?;
    Ok(Usage {
        vms: row.try_get::<i64, _>("vms")? as u32,
        clusters: 0,
        ips: row.try_get::<i64, _>("ips")? as u32,
        vcpus: row.try_get::<i64, _>("vcpus")? as u32,
        memory_mib: row.try_get::<i64, _>("mem")? as u64,
    })
}

/// The owner's quota and IP block, checking the owner may create; and whether they are admin.
pub(crate) async fn owner_limits(
    conn: &mut SqliteConnection,
    owner: &str,
    pool: &NetworkPool,
) -> std::result::Result<(basphere_core::Quota, basphere_core::IpBlock, bool), AdmitError> {
    let user = sqlx::query("SELECT status, role, max_vms, max_clusters, max_ips, max_vcpus, max_memory_mib, ip_block FROM users WHERE username = $1")
        .bind(owner)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| AdmitError::NoUser(owner.to_string()))?;
    let status: UserStatus = parse("users.status", user.try_get("status")?)?;
    if status != UserStatus::Active {
        return Err(AdmitError::NotActive(owner.to_string(), status));
    }
    let quota = basphere_core::Quota {
        max_vms: user.try_get::<i64, _>("max_vms")? as u32,
        max_clusters: user.try_get::<i64, _>("max_clusters")? as u32,
        max_ips: user.try_get::<i64, _>("max_ips")? as u32,
        max_vcpus: user
            .try_get::<Option<i64>, _>("max_vcpus")?
            .map(|v| v as u32),
        max_memory_mib: user
            .try_get::<Option<i64>, _>("max_memory_mib")?
            .map(|v| v as u64),
    };
    let block = user
        .try_get::<Option<i64>, _>("ip_block")?
        .and_then(|b| pool.block(b as u32))
        .ok_or_else(|| AdmitError::NoBlock(owner.to_string()))?;
    let admin = user.try_get::<String, _>("role")? == Role::Admin.as_str();
    Ok((quota, block, admin))
}

/// Every address leased to a VM now.
pub(crate) async fn taken_ips(conn: &mut SqliteConnection) -> Result<HashSet<String>> {
    Ok(
        sqlx::query_scalar("SELECT ip FROM vms WHERE ip IS NOT NULL")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect(),
    )
}

/// Gives a rolled-back (failed) VM its quota and an address again, for a retried create.
pub(crate) async fn readmit(
    conn: &mut SqliteConnection,
    vm_id: &str,
    pool: &NetworkPool,
) -> std::result::Result<(), AdmitError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {VM_COLS} FROM vms WHERE id = $1"
    )))
    .bind(vm_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| AdmitError::NoUser(format!("of VM {vm_id} (the VM is gone)")))?;
    let vm = vm_from(&row)?;
    if vm.status != VmStatus::Failed {
        return Ok(());
    }
    let owner = vm.owner.as_str();
    let (quota, block, _) = owner_limits(conn, owner, pool).await?;
    if vm.ip_address.is_none() {
        // A VM that kept its address is counted already (see `usage`).
        let used = usage(conn, owner).await?;
        quota.admit(&used, 1, vm.vcpus, vm.memory_mib)?;
    }
    let ip = match vm.ip_address {
        Some(ip) => ip,
        None => {
            let taken = taken_ips(conn).await?;
            pool.assignable_in(&block)
                .find(|a| !taken.contains(&a.to_string()))
                .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?
        }
    };
    sqlx::query(
        "UPDATE vms SET status = 'creating', error = NULL, ip = $2, updated_at = $3 WHERE id = $1",
    )
    .bind(vm_id)
    .bind(ip.to_string())
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Store {
    /// Admits VMs in one transaction: checks the owner's state and quota, allocates addresses
    /// from the owner's block, inserts the VM rows (creating), their create workflows and the
    /// audit record. Either all requested VMs are admitted or none.
    pub async fn admit_vms(
        &self,
        req: &AdmitRequest,
        pool: &NetworkPool,
        actor: &Actor,
    ) -> std::result::Result<Vec<Admitted>, AdmitError> {
        let mut tx = self.write().await?;
        let owner = req.owner.as_str();
        let (quota, block, admin) = owner_limits(&mut tx, owner, pool).await?;
        let mut seen = HashSet::new();
        for n in &req.names {
            if !seen.insert(n) {
                return Err(AdmitError::DuplicateInRequest(n.clone()));
            }
        }
        let used = usage(&mut tx, owner).await?;
        quota.admit(
            &used,
            req.names.len() as u32,
            req.spec.vcpus,
            req.spec.memory_mib,
        )?;
        let existing: Vec<String> = sqlx::query_scalar("SELECT name FROM vms WHERE owner = $1")
            .bind(owner)
            .fetch_all(&mut *tx)
            .await?;
        if let Some(taken) = req
            .names
            .iter()
            .find(|n| existing.iter().any(|e| e == n.as_str()))
        {
            return Err(AdmitError::NameTaken(taken.clone()));
        }
        let taken_ips = taken_ips(&mut tx).await?;
        let mut free = pool
            .assignable_in(&block)
            .filter(|a| !taken_ips.contains(&a.to_string()));

        let now = now_ms();
        let mut out = Vec::with_capacity(req.names.len());
        for name in &req.names {
            let ip = free
                .next()
                .ok_or_else(|| AdmitError::BlockFull(owner.to_string(), block.net.to_string()))?;
            let id = uuid::Uuid::now_v7().to_string();
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO vms (id, owner, name, os, login_user, spec, vcpus, memory_mib,
                    disk_gib, ip, status, provider, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'creating', $11, $12, $12)
                 RETURNING {VM_COLS}"
            )))
            .bind(&id)
            .bind(owner)
            .bind(name.as_str())
            .bind(req.os.as_str())
            .bind(&req.login_user)
            .bind(req.spec_name.as_str())
            .bind(i64::from(req.spec.vcpus))
            .bind(req.spec.memory_mib as i64)
            .bind(req.spec.disk_gib as i64)
            .bind(ip.to_string())
            .bind(&req.provider)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let vm = vm_from(&row)?;
            let mut w = NewWorkflow::new(VmOperation::Create.as_str(), owner, req.steps.clone());
            w.resource = Some(ResourceRef::vm(&id));
            w.priority = if admin { 5 } else { 0 };
            let operation_id = insert_new(&mut tx, &w).await?;
            let detail = format!(
                "ip={ip} spec={} os={} operation={operation_id}",
                req.spec_name, req.os
            );
            record(
                &mut tx,
                actor,
                "vm.create",
                &format!("{owner}/{name}"),
                "accepted",
                Some(&detail),
            )
            .await?;
            out.push(Admitted { vm, operation_id });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Marks a VM deleting and queues its delete workflow; returns the VM and operation id.
    pub async fn begin_delete_vm(
        &self,
        owner: &str,
        name: &str,
        steps: &[String],
        actor: &Actor,
    ) -> std::result::Result<Admitted, DeleteError> {
        let mut tx = self.write().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VM_COLS} FROM vms WHERE owner = $1 AND name = $2"
        )))
        .bind(owner)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| DeleteError::NotFound(name.to_string()))?;
        let vm = vm_from(&row)?;
        if matches!(vm.status, VmStatus::Creating | VmStatus::Deleting) {
            let op: String = sqlx::query_scalar(
                "SELECT id FROM workflows WHERE resource_id = $1
                   AND status IN ('pending','running','undoing')
                 ORDER BY created_at DESC LIMIT 1",
            )
            .bind(&vm.id)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or_default();
            return Err(DeleteError::Busy(name.to_string(), vm.status, op));
        }
        sqlx::query("UPDATE vms SET status = 'deleting', updated_at = $2 WHERE id = $1")
            .bind(&vm.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let mut w = NewWorkflow::new(VmOperation::Delete.as_str(), owner, steps.to_vec());
        w.resource = Some(ResourceRef::vm(&vm.id));
        w.priority = 10;
        let operation_id = insert_new(&mut tx, &w).await?;
        record(
            &mut tx,
            actor,
            "vm.delete",
            &format!("{owner}/{name}"),
            "accepted",
            Some(&format!("operation={operation_id}")),
        )
        .await?;
        tx.commit().await?;
        Ok(Admitted {
            vm: Vm {
                status: VmStatus::Deleting,
                ..vm
            },
            operation_id,
        })
    }

    /// One VM by owner and name.
    pub async fn vm(&self, owner: &str, name: &str) -> Result<Option<Vm>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VM_COLS} FROM vms WHERE owner = $1 AND name = $2"
        )))
        .bind(owner)
        .bind(name)
        .fetch_optional(&self.lg()?.pool)
        .await?;
        row.as_ref().map(vm_from).transpose()
    }

    /// One VM by id with its owner's SSH public key (one query, for the engine).
    pub async fn vm_and_key(&self, id: &str) -> Result<Option<(Vm, Option<String>)>> {
        if let Some(hit) = self.prefetched.take(id) {
            return Ok(Some(hit));
        }
        let row = sqlx::query(VM_AND_KEY)
            .bind(id)
            .fetch_optional(&self.lg()?.pool)
            .await?;
        row.as_ref()
            .map(|r| Ok((vm_from(r)?, r.try_get("owner_key")?)))
            .transpose()
    }

    /// One VM by id.
    pub async fn vm_by_id(&self, id: &str) -> Result<Option<Vm>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VM_COLS} FROM vms WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.lg()?.pool)
        .await?;
        row.as_ref().map(vm_from).transpose()
    }

    /// VMs of `owner`, or of everyone when `None`, by owner then name.
    pub async fn vms(&self, owner: Option<&str>) -> Result<Vec<Vm>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VM_COLS} FROM vms WHERE ($1 IS NULL OR owner = $1) ORDER BY owner, name"
        )))
        .bind(owner)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(vm_from).collect()
    }

    /// One page of the VMs of `owner` (or everyone), in creation order (ids are UUIDv7): at
    /// most `limit` after the VM with id `after`.
    pub async fn vms_page(
        &self,
        owner: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Vm>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VM_COLS} FROM vms WHERE ($1 IS NULL OR owner = $1) AND ($2 IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        )))
        .bind(owner)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.lg()?.pool)
        .await?;
        rows.iter().map(vm_from).collect()
    }

    /// What `owner` holds now.
    pub async fn usage(&self, owner: &str) -> Result<Usage> {
        let mut c = self.lg()?.pool.acquire().await?;
        usage(&mut c, owner).await
    }
}

/// What a VM's workflows do to it when they end or are retried (registered by the VM
/// definitions as [`Hooks::vm`]):
/// create ok → running; create failed → failed with the reason, address and quota released
/// once every done step was undone (else both stay until a delete confirms the cleanup);
/// delete ok → the record is gone (address and quota free); delete failed → failed.
/// Each ending writes its audit record; a retry gives a failed create its address and quota
/// back (refused if they are gone) and marks a failed delete deleting again.
struct VmHooks(VmOperation);

impl Hooks {
    /// The hooks of the VM operation `op` on its VM record.
    pub fn vm(op: VmOperation) -> Self {
        Hooks(std::sync::Arc::new(VmHooks(op)))
    }
}

/// The engine's audit record about VM `$1`, named `owner/name` (none if the VM is gone).
const VM_AUDIT: &str = "INSERT INTO audit (at, actor, source, action, target, result, detail)
     SELECT $2, $3, $4, $5, owner || '/' || name, $6, $7 FROM vms WHERE id = $1";

fn vm_audit(vm: &str, now: i64, action: &str, result: &str, detail: Option<&str>) -> Stmt {
    let actor = Actor::engine();
    stmt!(
        VM_AUDIT,
        vm,
        now,
        actor.name,
        actor.source,
        action,
        result,
        detail
    )
}

#[async_trait::async_trait]
impl ResourceHooks for VmHooks {
    fn ended(&self, w: &Ending, outcome: &WorkflowOutcome, now: i64) -> Vec<Stmt> {
        let Some(vm) = w.resource.as_ref().and_then(|r| r.id_of(ResourceRef::VM)) else {
            return vec![];
        };
        let result = outcome.status().as_str();
        match (self.0, outcome) {
            (VmOperation::Create, WorkflowOutcome::Succeeded) => vec![
                stmt!(
                    "UPDATE vms SET status = 'running', error = NULL, updated_at = $2 WHERE id = $1",
                    vm,
                    now
                ),
                stmt!(
                    "INSERT INTO audit (at, actor, source, action, target, result, detail)
                     SELECT $2, $3, $4, 'vm.create', owner || '/' || name, 'ok', ip
                     FROM vms WHERE id = $1",
                    vm,
                    now,
                    Actor::engine().name,
                    Actor::engine().source,
                ),
            ],
            // A step still done was not undone: the machine may exist and use the address,
            // so the VM keeps it (and counts) until a delete confirms the cleanup.
            (VmOperation::Create, WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e)) => {
                vec![
                    stmt!(
                        "UPDATE vms SET status = 'failed', updated_at = $3,
                             error = $2 || CASE WHEN EXISTS (SELECT 1 FROM workflow_steps
                                 WHERE workflow_id = $4 AND status = 'done')
                               THEN ' — the VM keeps its address until it is cleaned up: \
run delete-vm to retry the cleanup' ELSE '' END,
                             ip = CASE WHEN EXISTS (SELECT 1 FROM workflow_steps
                                 WHERE workflow_id = $4 AND status = 'done') THEN ip END
                         WHERE id = $1",
                        vm,
                        e.as_str(),
                        now,
                        w.id.as_str(),
                    ),
                    vm_audit(vm, now, "vm.create", result, Some(e)),
                ]
            }
            (VmOperation::Delete, WorkflowOutcome::Succeeded) => vec![
                vm_audit(vm, now, "vm.delete", "ok", None),
                stmt!(
                    "UPDATE workflows SET resource_kind = NULL, resource_id = NULL
                     WHERE resource_id = $1",
                    vm
                ),
                stmt!("DELETE FROM vms WHERE id = $1", vm),
            ],
            (VmOperation::Delete, WorkflowOutcome::Failed(e) | WorkflowOutcome::Cancelled(e)) => {
                vec![
                    stmt!(
                        "UPDATE vms SET status = 'failed', error = $2, updated_at = $3 WHERE id = $1",
                        vm,
                        format!("delete failed: {e}; run delete-vm again"),
                        now,
                    ),
                    vm_audit(vm, now, "vm.delete", "failed", Some(e)),
                ]
            }
        }
    }

    fn cancellable(&self, w: &Workflow) -> std::result::Result<(), String> {
        match (self.0, &w.resource) {
            // Its steps have no undo: a cancelled delete would leave a VM half taken apart.
            (VmOperation::Delete, Some(_)) => Err(format!(
                "operation {0} deletes a VM; a delete cannot be cancelled once accepted. \
                 Wait for it to end (basphere ops watch {0})",
                w.id
            )),
            _ => Ok(()),
        }
    }

    async fn retrying(
        &self,
        conn: &mut SqliteConnection,
        w: &Workflow,
        ctx: &RetryCtx<'_>,
    ) -> std::result::Result<(), OpError> {
        let gone = || {
            OpError::Refused(format!(
                "operation {}'s VM is gone; create it again instead",
                w.id
            ))
        };
        let vm_id = w
            .resource
            .as_ref()
            .and_then(|r| r.id_of(ResourceRef::VM))
            .ok_or_else(gone)?;
        vm_idle_and_failed(conn, vm_id, &w.id).await?;
        match self.0 {
            VmOperation::Create => readmit(conn, vm_id, ctx.pool)
                .await
                .map_err(|e| OpError::Refused(e.to_string()))?,
            VmOperation::Delete => {
                sqlx::query(
                    "UPDATE vms SET status = 'deleting', error = NULL, updated_at = $2 WHERE id = $1",
                )
                .bind(vm_id)
                .bind(now_ms())
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}

/// Refuses a retry of `wf` unless its VM is failed and no other live workflow touches it
/// (inside the retry's transaction, so nothing can start on the VM in between).
async fn vm_idle_and_failed(
    conn: &mut SqliteConnection,
    vm_id: &str,
    wf: &str,
) -> std::result::Result<(), OpError> {
    let live: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, definition FROM workflows WHERE resource_id = $1 AND id <> $2
           AND status IN ('pending', 'running', 'undoing') LIMIT 1",
    )
    .bind(vm_id)
    .bind(wf)
    .fetch_optional(&mut *conn)
    .await?;
    let vm: Option<(String, String, String)> =
        sqlx::query_as("SELECT owner, name, status FROM vms WHERE id = $1")
            .bind(vm_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((owner, name, status)) = vm else {
        return Err(OpError::Refused(format!(
            "operation {wf}'s VM is gone; create it again instead"
        )));
    };
    if let Some((op, def)) = live {
        return Err(OpError::Refused(format!(
            "VM {owner}/{name} has operation {op} ({}) in progress; wait for it to end \
             (basphere ops watch {op}) before retrying {wf}",
            def.unwrap_or_default()
        )));
    }
    if status != "failed" {
        return Err(OpError::Refused(format!(
            "VM {owner}/{name} is {status}; only an operation of a failed VM can be retried"
        )));
    }
    Ok(())
}
