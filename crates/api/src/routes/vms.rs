use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::routes::page::{MAX_LIMIT, PageQuery, first, page};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use basphere_core::VmOperation;
use basphere_core::{FieldErrors, ImageName, SpecName, VM_COUNT_RANGE, VmName};
use basphere_store::{AdmitError, AdmitRequest, DeleteError, Vm, format_ms};
use serde::Deserialize;
use serde_json::{Value, json};

/// The JSON shape of a VM: the prototype's fields plus what the async model adds.
pub(crate) fn vm_view(vm: &Vm, operation_id: Option<&str>) -> Value {
    let ssh = vm
        .ip_address
        .map(|ip| format!("ssh {}@{}", vm.login_user, ip));
    json!({
        "id": vm.id,
        "name": vm.name,
        "owner": vm.owner,
        "os": vm.os,
        "login_user": vm.login_user,
        "spec": vm.spec,
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "disk_gib": vm.disk_gib,
        "ip_address": vm.ip_address,
        "status": vm.status,
        "error": vm.error,
        "provider": vm.provider,
        "created_at": format_ms(vm.created_at),
        "ssh": ssh,
        "operation_id": operation_id,
    })
}

pub async fn catalog(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    caller.known()?;
    let c = &st.config;
    Ok(ok(
        "catalog",
        json!({
            "specs": c.specs,
            "images": c.images.iter().map(|(n, i)| json!({"name": n, "login_user": i.login_user, "default": i.default})).collect::<Vec<_>>(),
            "default_image": c.default_image(),
            "count": {"min": VM_COUNT_RANGE.start(), "max": VM_COUNT_RANGE.end()},
            "provider": st.provider.kind(),
        }),
    ))
}

/// `POST /vms`: admits the VMs in one transaction and answers 202 with an operation per VM.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.active()?.clone();
    let cfg = &st.config;
    let mut errs = FieldErrors::new();
    let name = body
        .str("name", true, &mut errs)
        .and_then(|s| errs.check("name", s.parse::<VmName>()));
    let spec_name = body
        .str("spec", false, &mut errs)
        .unwrap_or_else(|| "small".into());
    let spec = match spec_name.parse::<SpecName>() {
        Ok(n) => match cfg.specs.get(&n) {
            Some(s) => Some((n, *s)),
            None => {
                errs.push(
                    "spec",
                    format!(
                        "unknown spec {spec_name:?}; choose one of: {}",
                        cfg.specs
                            .keys()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                None
            }
        },
        Err(e) => {
            errs.push("spec", e.to_string());
            None
        }
    };
    let os_name = body
        .str("os", false, &mut errs)
        .unwrap_or_else(|| cfg.default_image().to_string());
    let os = match os_name.parse::<ImageName>() {
        Ok(n) if cfg.images.contains_key(&n) => Some(n),
        _ => {
            errs.push(
                "os",
                format!(
                    "unknown OS {os_name:?}; choose one of: {}",
                    cfg.images
                        .keys()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            None
        }
    };
    let count = body.int("count", &mut errs).unwrap_or(1);
    if !(i64::from(*VM_COUNT_RANGE.start())..=i64::from(*VM_COUNT_RANGE.end())).contains(&count) {
        errs.push(
            "count",
            format!(
                "must be between {} and {} (got {count})",
                VM_COUNT_RANGE.start(),
                VM_COUNT_RANGE.end()
            ),
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
                        errs.push(
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
    errs.into_result()?;
    let (spec_name, spec) = spec.expect("checked");
    let os = os.expect("checked");
    let image = &cfg.images[&os];
    let req = AdmitRequest {
        owner: me.username.clone(),
        names,
        login_user: image.login_user.clone(),
        os,
        spec_name,
        spec,
        provider: st.provider.kind().to_string(),
        steps: basphere_vm_workflows::step_names(VmOperation::Create),
    };
    let admitted = st
        .store
        .admit_vms(&req, &cfg.network, &caller.actor())
        .await
        .map_err(|e| match e {
            AdmitError::Quota(q) => {
                ApiError::new(StatusCode::FORBIDDEN, q.to_string()).with_data(q)
            }
            AdmitError::NameTaken(_) | AdmitError::DuplicateInRequest(_) => {
                ApiError::conflict(e.to_string())
            }
            AdmitError::NotActive(..) => ApiError::forbidden(e.to_string()),
            AdmitError::NoUser(_) | AdmitError::NoBlock(_) | AdmitError::BlockFull(..) => {
                ApiError::conflict(e.to_string())
            }
            AdmitError::Store(e) => ApiError::internal(e),
        })?;
    st.engine.wake();
    let views: Vec<Value> = admitted
        .iter()
        .map(|a| vm_view(&a.vm, Some(&a.operation_id)))
        .collect();
    let names: Vec<&str> = admitted.iter().map(|a| a.vm.name.as_str()).collect();
    Ok(accepted(
        format!(
            "creating {}; follow with: basphere ops watch <operation_id>",
            names.join(", ")
        ),
        json!({"vms": views, "operations": admitted.iter().map(|a| &a.operation_id).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub all: bool,
    pub owner: Option<String>,
}

/// The first page of [`list_page`] (of the most VMs a page holds) by owner and name, for the
/// portal.
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Ok200, ApiError> {
    let mut vms = vms_of(&st, &caller, &q, None, MAX_LIMIT).await?;
    vms.sort_by(|a, b| {
        (a["owner"].as_str(), a["name"].as_str()).cmp(&(b["owner"].as_str(), b["name"].as_str()))
    });
    Ok(first(|n| format!("{n} VM(s)"), vms, MAX_LIMIT))
}

/// `GET /vms?all=&owner=&limit=&after=`: VMs in creation order (see `page`).
pub async fn list_page(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let limit = p.limit()?;
    let vms = vms_of(&st, &caller, &q, p.after.as_deref(), limit + 1).await?;
    Ok(page(
        |n| format!("{n} VM(s)"),
        vms,
        limit,
        |v| v["id"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn vms_of(
    st: &AppState,
    caller: &Caller,
    q: &ListQuery,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Value>, ApiError> {
    let me = caller.active()?;
    let owner = target_owner(caller, me.username.as_str(), q.owner.as_deref(), q.all)?;
    let vms = st.store.vms_page(owner.as_deref(), after, limit).await?;
    Ok(vms.iter().map(|v| vm_view(v, None)).collect())
}

/// Whose VMs a request addresses: the caller's, unless an admin names another owner or all.
fn target_owner(
    caller: &Caller,
    me: &str,
    owner: Option<&str>,
    all: bool,
) -> Result<Option<String>, ApiError> {
    if (all || owner.is_some()) && !caller.is_admin() {
        return Err(ApiError::forbidden(
            "listing other users' VMs needs an admin",
        ));
    }
    if all {
        return Ok(None);
    }
    Ok(Some(owner.unwrap_or(me).to_string()))
}

#[derive(Deserialize)]
pub struct OwnerQuery {
    pub owner: Option<String>,
}

pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Result<Ok200, ApiError> {
    let owner = caller.owner_for(q.owner)?;
    let vm = st
        .store
        .vm(&owner, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("VM {name} not found")))?;
    Ok(ok(format!("VM {name}: {}", vm.status), vm_view(&vm, None)))
}

pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Result<Ok200, ApiError> {
    let owner = caller.owner_for(q.owner)?;
    let steps = basphere_vm_workflows::step_names(VmOperation::Delete);
    let a = st
        .store
        .begin_delete_vm(&owner, &name, &steps, &caller.actor())
        .await
        .map_err(|e| match e {
            DeleteError::NotFound(_) => ApiError::not_found(e.to_string()),
            DeleteError::Busy(..) => ApiError::conflict(e.to_string()),
            DeleteError::Store(e) => ApiError::internal(e),
        })?;
    st.engine.wake();
    Ok(accepted(
        format!("deleting {name}"),
        json!({"vm": vm_view(&a.vm, Some(&a.operation_id)), "operation_id": a.operation_id}),
    ))
}

pub async fn quota(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.active()?;
    let usage = st.store.usage(me.username.as_str()).await?;
    Ok(ok(
        format!("quota of {}", me.username),
        json!({"username": me.username, "quota": me.quota, "usage": usage}),
    ))
}

pub async fn resources(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.active()?;
    let usage = st.store.usage(me.username.as_str()).await?;
    let vms = st.store.vms(Some(me.username.as_str())).await?;
    let block = me.ip_block.and_then(|b| st.config.network.block(b));
    Ok(ok(
        format!("resources of {}", me.username),
        json!({
            "username": me.username,
            "ip_block": block.map(|b| b.net.to_string()),
            "gateway": st.config.network.gateway,
            "quota": me.quota,
            "usage": usage,
            "vms": vms.iter().map(|v| vm_view(v, None)).collect::<Vec<_>>(),
            "clusters": [],
        }),
    ))
}
