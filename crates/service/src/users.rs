//! Users: registration, approval (with the Unix account made on the bastion, or the approval
//! taken back), disable/enable, quota, deletion, audit. Key changes and tokens: `credentials`.

use crate::check::Check;
use crate::error::Result;
use crate::lease::admit_leased;
use crate::{Done, Paged, Paging, ServiceError, Services, convert};
use basphere_accounts::AccountError;
use basphere_core::VmOperation;
use basphere_core::{Email, Quota, Role, SshPublicKey, Team, UserStatus, Username, VmStatus};
use basphere_store::{Actor, AuditFilter, DeleteError, NewRegistration, User, UserError};
use basphere_wire as wire;

/// Runs host account work off the async workers.
pub(crate) async fn on_host<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, AccountError> + Send + 'static,
) -> std::result::Result<T, AccountError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(AccountError::Failed(format!("account task failed: {e}"))))
}

/// A username from a route's path; a bad one is a user that does not exist.
pub fn username(s: &str) -> Result<Username> {
    s.parse()
        .map_err(|e| ServiceError::NotFound(format!("user {s:?} not found ({e})")))
}

fn registration(req: &wire::RegisterRequest) -> Result<NewRegistration> {
    let mut c = Check::new(&req.unreadable);
    let u = c
        .req("username", req.username.as_deref())
        .and_then(|s| c.errs.check("username", s.parse::<Username>()));
    let e = c
        .req("email", req.email.as_deref())
        .and_then(|s| c.errs.check("email", s.parse::<Email>()));
    let t = match c.opt("team", req.team.as_deref()) {
        Some(s) if !s.trim().is_empty() => c.errs.check("team", s.parse::<Team>()),
        _ => Some(Team::none()),
    };
    let k = c
        .req("public_key", req.public_key.as_deref())
        .and_then(|s| c.errs.check("public_key", ssh_key(s)));
    c.finish()?;
    Ok(NewRegistration {
        username: u.expect("checked"),
        email: e.expect("checked"),
        team: t.expect("checked"),
        public_key: k.expect("checked"),
    })
}

/// An SSH public key as pasted: Windows line endings are accepted (every CR is dropped).
pub(crate) fn ssh_key(s: &str) -> std::result::Result<SshPublicKey, basphere_core::SshKeyError> {
    s.replace('\r', "").parse()
}

/// Refuses an email whose domain `[registration] allowed_email_domains` does not list.
fn check_email_domain(email: &Email, cfg: &basphere_config::RegistrationConfig) -> Result<()> {
    if cfg.allows_email(email.as_str()) {
        return Ok(());
    }
    let domain = email.as_str().rsplit_once('@').map_or("", |(_, d)| d);
    let mut errs = basphere_core::FieldErrors::new();
    errs.push(
        "email",
        format!(
            "addresses at {domain} may not register here; use an address at {} \
             (registration.allowed_email_domains)",
            cfg.allowed_email_domains.join(", ")
        ),
    );
    Err(ServiceError::Invalid(errs))
}

/// A decision on a request that is no longer pending is a bad request (the prototype's 400).
pub(crate) fn not_pending(e: UserError) -> ServiceError {
    match e {
        UserError::State(m) => ServiceError::BadRequest(m),
        e => e.into(),
    }
}

/// An approved user, and the one-time enrollment code when there is one.
#[derive(Debug, Clone)]
pub struct Approval(pub wire::Approved);

impl Approval {
    pub fn message(&self) -> String {
        let u = &self.0.user.username;
        match &self.0.enrollment_code {
            Some(_) => format!(
                "user {u} approved; give them the enrollment code (works once): basphere enroll --username {u} --code <code>"
            ),
            None => format!("user {u} approved; Unix account created"),
        }
    }
}

/// What disabling or enabling did.
#[derive(Debug, Clone)]
pub struct DisableOutcome {
    pub message: String,
    pub data: wire::UserRef,
}

/// What deleting a user did.
#[derive(Debug, Clone)]
pub enum UserDeletion {
    /// The user holds VMs: the user is disabled and every VM's delete is under way (or was
    /// refused, listed in `refused`); call again once they are gone.
    VmsDeleting(Done<wire::UserVmsDeleting>),
    /// The user (and, with purge, their registrations) is gone.
    Deleted(Done<wire::UserRef>),
}

impl Services {
    async fn check_name_free(&self, name: &Username) -> Result<()> {
        if let Some(acc) = self.accounts.clone() {
            let name = name.clone();
            on_host(move || acc.check_name_free(&name)).await?;
        }
        Ok(())
    }

    /// Files a registration. `only_name`: the one name the caller may register (a local
    /// caller registers only their own Unix account name).
    pub async fn register(
        &self,
        actor: &Actor,
        only_name: Option<&str>,
        req: &wire::RegisterRequest,
    ) -> Result<Done<wire::Registration>> {
        let reg = registration(req)?;
        if let Some(me) = only_name.filter(|me| *me != reg.username.as_str()) {
            return Err(ServiceError::Forbidden(format!(
                "on this host you can register only your own account name {me:?}"
            )));
        }
        check_email_domain(&reg.email, &self.config.registration)?;
        self.check_name_free(&reg.username).await?;
        let r = self.store.register(&reg, &self.config.quota, actor).await?;
        Ok(Done {
            message: format!(
                "registration of {} received; an admin will review it",
                r.username
            ),
            data: convert::registration(&r),
        })
    }

    /// The newest registration request of `u`, as stored now.
    async fn request_of(&self, u: &Username) -> Result<wire::Registration> {
        self.registration_of(u.as_str()).await
    }

    /// Registers and approves a user in one go (an admin adding someone).
    pub async fn add_user(&self, actor: &Actor, req: &wire::RegisterRequest) -> Result<Approval> {
        let reg = registration(req)?;
        self.check_name_free(&reg.username).await?;
        self.store.register(&reg, &self.config.quota, actor).await?;
        self.approve(actor, &reg.username).await
    }

    /// Approves a pending registration: the store decides (active, an address block), then
    /// the Unix account is made; if that fails the approval is taken back.
    pub async fn approve(&self, actor: &Actor, u: &Username) -> Result<Approval> {
        let user = self
            .store
            .user(u.as_str())
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("user {u} not found")))?;
        if user.status != UserStatus::Pending {
            return Err(ServiceError::BadRequest(format!(
                "the registration of {u} is not pending (the user is {}); nothing to approve",
                user.status
            )));
        }
        let key: SshPublicKey = user
            .public_key
            .parse()
            .map_err(|e| ServiceError::Internal(format!("stored key of {u} is invalid: {e}")))?;
        // The name may have become a Unix account since registration.
        self.check_name_free(u).await?;
        let ttl = if self.accounts.is_none() {
            Some(i64::from(self.config.bastion.enrollment_ttl_hours) * 3_600_000)
        } else {
            None
        };
        let out = self
            .store
            .approve(u, &self.config.network, self.accounts.is_some(), ttl, actor)
            .await
            .map_err(not_pending)?;
        if let Some(acc) = self.accounts.clone() {
            let name = u.clone();
            match on_host(move || acc.create(&name, &key)).await {
                Ok(uid) => self.store.set_unix_uid(u, uid).await?,
                Err(e) => {
                    let reason = format!("creating the Unix account {u} failed: {e}");
                    self.store.undo_approval(u, &reason, actor).await?;
                    let msg =
                        format!("{reason}; {u} stays pending, approve again once it is fixed");
                    return Err(ServiceError::account(&e, msg));
                }
            }
        }
        Ok(Approval(wire::Approved {
            request: self.request_of(u).await?,
            user: convert::user(&out.user),
            ip_block: self.block(out.user.ip_block),
            enrollment_code: out.enrollment_code,
        }))
    }

    /// Rejects a pending registration with an optional reason.
    pub async fn reject(
        &self,
        actor: &Actor,
        u: &Username,
        req: &wire::ReasonRequest,
    ) -> Result<Done<wire::Rejected>> {
        let mut c = Check::new(&req.unreadable);
        let reason = c.opt("reason", req.reason.clone()).unwrap_or_default();
        c.finish()?;
        self.store
            .reject(u, &reason, actor)
            .await
            .map_err(not_pending)?;
        Ok(Done {
            message: format!("registration of {u} rejected"),
            data: wire::Rejected {
                request: self.request_of(u).await?,
                reason,
            },
        })
    }

    /// The caller's own account, address block and newest registration.
    pub async fn me(&self, user: &User) -> Result<wire::Me> {
        let regs = self
            .store
            .registrations(Some(user.username.as_str()))
            .await?;
        Ok(wire::Me {
            user: convert::user(user),
            ip_block: self.block(user.ip_block),
            registration: regs.first().map(convert::registration),
        })
    }

    /// Pending registrations, newest first.
    pub async fn pending(&self, p: &Paging) -> Result<Paged<wire::Registration>> {
        let limit = p.limit()?;
        let r = self.store.pending_page(p.after_num()?, limit + 1).await?;
        Ok(
            Paged::of(r, limit, |r| wire::request_id(wire::REGISTRATION_ID, r.id))
                .map(|r| convert::registration(&r)),
        )
    }

    /// Every pending registration, newest first, for the review page.
    pub async fn registrations(&self) -> Result<Vec<wire::Registration>> {
        let r = self.store.registrations(None).await?;
        Ok(r.iter().map(convert::registration).collect())
    }

    /// The newest registration of `u`.
    pub async fn registration_of(&self, u: &str) -> Result<wire::Registration> {
        let r = self.store.registrations(Some(u)).await?;
        r.first()
            .map(convert::registration)
            .ok_or_else(|| ServiceError::NotFound(format!("no registration for {u}")))
    }

    /// Users by username, optionally of one status (given as text, as a query has it).
    pub async fn users(&self, status: Option<&str>, p: &Paging) -> Result<Paged<wire::User>> {
        let status = status
            .map(|s| {
                s.parse::<UserStatus>()
                    .map_err(|e| ServiceError::BadRequest(e.into()))
            })
            .transpose()?;
        let limit = p.limit()?;
        let users = self
            .store
            .users_page(status, p.after.as_deref(), limit + 1)
            .await?;
        Ok(Paged::of(users, limit, |u| u.username.to_string()).map(|u| convert::user(&u)))
    }

    /// A page of users (by username, as [`Services::users`]) with what each holds, for the
    /// admin's user page: two reads, whatever the page's size.
    pub async fn users_with_usage(
        &self,
        p: &Paging,
    ) -> Result<Paged<(wire::User, basphere_core::Usage)>> {
        let page = self.users(None, p).await?;
        let owners = page.items.iter().map(|u| u.username.to_string()).collect();
        let usages = self.store.usages(owners).await?;
        Ok(Paged {
            items: page.items.into_iter().zip(usages).collect(),
            next_after: page.next_after,
        })
    }

    /// One user with usage, VMs and address block.
    pub async fn user(&self, u: &str) -> Result<wire::UserDetail> {
        let user = self
            .store
            .user(u)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("user {u} not found")))?;
        let usage = self.store.usage(u).await?;
        let vms = self.store.vms(Some(u)).await?;
        Ok(wire::UserDetail {
            ip_block: self.block(user.ip_block),
            user: convert::user(&user),
            usage,
            vms: vms.iter().map(convert::vm_record).collect(),
        })
    }

    /// Disables (or enables) a user, then locks (or unlocks) their Unix account; if that
    /// fails the status is set back.
    pub async fn set_disabled(
        &self,
        actor: &Actor,
        u: &Username,
        disabled: bool,
    ) -> Result<DisableOutcome> {
        if disabled
            && let Some(user) = self.store.user(u.as_str()).await?
            && user.role == Role::Admin
        {
            // The server's admin is also who root is on the socket: disabled, nobody could
            // enable it again.
            return Err(ServiceError::Conflict(format!(
                "{u} is an admin account; admin accounts cannot be disabled (it would lock the \
                 admin out of the API and the socket)"
            )));
        }
        self.store.set_disabled(u, disabled, actor).await?;
        let done = if disabled { "disabled" } else { "enabled" };
        let data = wire::UserRef {
            username: u.clone(),
            unix_account: None,
        };
        let user = self.store.user(u.as_str()).await?;
        if let Some((acc, user)) = self.accounts.clone().zip(user.filter(|u| u.unix_account)) {
            let name = u.clone();
            let r = on_host(move || match acc.managed(&name, user.unix_uid) {
                Ok(pw) if disabled => acc.lock(&pw).map(|()| None),
                Ok(pw) => acc.unlock(&pw).map(|()| None),
                Err(AccountError::Refused(m)) => Ok(Some(m)),
                Err(e) => Err(e),
            })
            .await;
            match r {
                Ok(None) => {}
                Ok(Some(left_alone)) => {
                    return Ok(DisableOutcome {
                        message: format!("user {u} {done}; {left_alone}"),
                        data,
                    });
                }
                Err(e) => {
                    self.store.set_disabled(u, !disabled, actor).await?;
                    let what = if disabled { "locking" } else { "unlocking" };
                    let msg =
                        format!("{what} the Unix account {u} failed, so {u} was not {done}: {e}");
                    return Err(ServiceError::account(&e, msg));
                }
            }
        }
        Ok(DisableOutcome {
            message: format!("user {u} {done}"),
            data,
        })
    }

    /// Replaces the fields of `u`'s quota that `req` names.
    pub async fn set_quota(
        &self,
        actor: &Actor,
        u: &Username,
        req: &wire::QuotaRequest,
    ) -> Result<Done<Quota>> {
        let cur = self
            .store
            .user(u.as_str())
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("user {u} not found")))?
            .quota;
        let mut c = Check::new(&req.unreadable);
        let mut bounded = |k: &str, v: Option<i64>, cur: u32, max: u32| -> u32 {
            match c.opt(k, v) {
                Some(v) if v >= 0 && v <= i64::from(max) => v as u32,
                Some(_) => {
                    c.errs.push(k, format!("must be between 0 and {max}"));
                    cur
                }
                None => cur,
            }
        };
        let max_vms = bounded("max_vms", req.max_vms, cur.max_vms, 10_000);
        let max_clusters = bounded("max_clusters", req.max_clusters, cur.max_clusters, 10_000);
        let max_ips = bounded(
            "max_ips",
            req.max_ips,
            cur.max_ips,
            self.config.network.block_size,
        );
        let q = Quota {
            max_vms,
            max_clusters,
            max_ips,
            max_vcpus: c
                .opt("max_vcpus", req.max_vcpus)
                .map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX))
                .or(cur.max_vcpus),
            max_memory_mib: c
                .opt("max_memory_mib", req.max_memory_mib)
                .map(|v| v.max(0) as u64)
                .or(cur.max_memory_mib),
            max_disk_gib: c
                .opt("max_disk_gib", req.max_disk_gib)
                .map(|v| v.max(0) as u64)
                .or(cur.max_disk_gib),
        };
        c.finish()?;
        self.store.set_quota(u, &q, actor).await?;
        Ok(Done {
            message: format!("quota of {u} updated"),
            data: q,
        })
    }

    /// Deletes a user: the account only once it holds no VMs.
    ///
    /// The rule: a user is removed (with their Unix account) only when they hold no VMs. A user
    /// who holds VMs is first checked as a whole: if any VM is being created, nothing changes
    /// and the refusal names every such VM (wait for them, then delete again). Otherwise the
    /// user is disabled (and their Unix account locked), every VM's delete is started (a VM
    /// already being deleted reports its running delete), and the answer lists each operation
    /// and every VM whose delete could not be started, with the reason. The user stays
    /// disabled until a later call finds no VMs left, so nothing is ever half-deleted.
    pub async fn delete_user(
        &self,
        actor: &Actor,
        u: &Username,
        purge: bool,
    ) -> Result<UserDeletion> {
        let user = self
            .store
            .user(u.as_str())
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("user {u} not found")))?;
        if user.role == Role::Admin {
            return Err(ServiceError::Conflict(
                "admin accounts cannot be deleted here".into(),
            ));
        }
        let vms = self.store.vms(Some(u.as_str())).await?;
        if !vms.is_empty() {
            return self.delete_vms_of(actor, &user, &vms).await;
        }
        self.store.delete_user(u, purge, actor).await?;
        let done = if purge { "purged" } else { "deleted" };
        let mut data = wire::UserRef {
            username: u.clone(),
            unix_account: None,
        };
        if let Some(acc) = self.accounts.clone().filter(|_| user.unix_account) {
            let (name, uid) = (u.clone(), user.unix_uid);
            match on_host(move || acc.remove(&name, uid)).await {
                Ok(()) => {}
                Err(AccountError::Refused(m)) => {
                    data.unix_account = Some("left alone".into());
                    return Ok(UserDeletion::Deleted(Done {
                        message: format!("user {u} {done}; {m}"),
                        data,
                    }));
                }
                Err(AccountError::Failed(m)) => {
                    return Err(ServiceError::Internal(format!(
                        "user {u} {done}, but removing the Unix account failed: {m}; remove it with userdel"
                    )));
                }
            }
        }
        Ok(UserDeletion::Deleted(Done {
            message: format!("user {u} {done}"),
            data,
        }))
    }

    async fn delete_vms_of(
        &self,
        actor: &Actor,
        user: &User,
        vms: &[basphere_store::Vm],
    ) -> Result<UserDeletion> {
        let u = &user.username;
        let creating: Vec<String> = vms
            .iter()
            .filter(|v| v.status == VmStatus::Creating)
            .map(|v| v.name.to_string())
            .collect();
        if !creating.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "user {u} has VMs being created: {}; wait for them to finish, then delete the \
                 user again (nothing was changed)",
                creating.join(", ")
            )));
        }
        if user.status == UserStatus::Active {
            self.store.set_disabled(u, true, actor).await?;
            if let Some(acc) = self.accounts.clone().filter(|_| user.unix_account) {
                let (name, uid) = (u.clone(), user.unix_uid);
                on_host(move || acc.lock(&acc.managed(&name, uid)?))
                    .await
                    .map_err(|e| {
                        ServiceError::Internal(format!(
                            "user {u} disabled, but locking the Unix account failed: {e}"
                        ))
                    })?;
            }
        }
        let steps = basphere_vm_workflows::steps(&self.engine, VmOperation::Delete);
        let (mut operations, mut refused) = (vec![], vec![]);
        for vm in vms {
            // Each as `delete_vm`'s: leased in its own transaction to a free slot here.
            let (store, steps, actor) = (self.store.clone(), steps.clone(), actor.clone());
            let (whose, which) = (u.to_string(), vm.name.to_string());
            let admitted = admit_leased(&self.engine, 1, move |lease| async move {
                store
                    .begin_delete_vm_leased(&whose, &which, &steps, &actor, lease)
                    .await
            })
            .await?;
            match admitted {
                Ok(a) => operations.push(wire::VmOperation {
                    vm: a.vm.name,
                    operation_id: a.operation_id,
                }),
                // Already being deleted: follow the delete under way.
                Err(DeleteError::Busy(_, VmStatus::Deleting, op)) if !op.is_empty() => operations
                    .push(wire::VmOperation {
                        vm: vm.name.clone(),
                        operation_id: op,
                    }),
                // Gone in the meantime.
                Err(DeleteError::NotFound(_)) => {}
                Err(e) => refused.push(wire::VmRefusal {
                    vm: vm.name.to_string(),
                    reason: e.to_string(),
                }),
            }
        }
        self.engine.wake();
        let mut message = format!(
            "user {u} disabled; deleting {} VM(s) first — run the delete again when they are gone",
            vms.len()
        );
        if !refused.is_empty() {
            message.push_str(&format!(
                "; {} VM(s) could not be deleted now: {}",
                refused.len(),
                refused
                    .iter()
                    .map(|r| r.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(UserDeletion::VmsDeleting(Done {
            message,
            data: wire::UserVmsDeleting {
                operations,
                remaining_vms: vms.len(),
                refused,
            },
        }))
    }

    /// Audit records matching `f` (its `limit` is the page size), newest first.
    pub async fn audit(
        &self,
        actor: Option<String>,
        action: Option<String>,
        target: Option<String>,
        p: &Paging,
    ) -> Result<Paged<wire::AuditRecord>> {
        let limit = p.limit()?;
        let recs = self
            .store
            .audit_page(
                &AuditFilter {
                    actor,
                    action,
                    target,
                    since_ms: None,
                    limit: Some(limit + 1),
                },
                p.after_num()?,
            )
            .await?;
        Ok(Paged::of(recs, limit, |r| r.id.to_string()).map(|r| convert::audit_record(&r)))
    }
}
