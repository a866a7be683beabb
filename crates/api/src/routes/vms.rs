//! VMs: catalog, create, list, show, delete, quota, resources.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::routes::page::{PageQuery, with_next};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use basphere_wire::CreateVmsRequest;
use serde::Deserialize;

pub async fn catalog(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    caller.known()?;
    Ok(ok("catalog", st.services.catalog()))
}

/// `POST /vms`: admits the VMs in one transaction and answers 202 with an operation per VM.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let d = st
        .services
        .create_vms(&me, &CreateVmsRequest::read(&body.0))
        .await?;
    Ok(accepted(d.message, d.data))
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub all: bool,
    pub owner: Option<String>,
}

/// `GET /vms?all=&owner=&limit=&after=`: the prototype's `{vms, total, quota}`, VMs in
/// creation order, one page of them (the next page's `after` in `X-Next-After`, see `page`).
pub async fn list_page(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    p.paging().limit()?;
    let owner = target_owner(&caller, q.owner.as_deref(), q.all)?;
    let me = caller.active()?;
    let (vms, quota) = st
        .services
        .vm_list(me, owner.as_deref(), &p.paging())
        .await?;
    let n = vms.items.len();
    let next = vms.next_after.clone();
    let list = basphere_wire::VmList {
        total: n,
        vms: vms.items,
        quota,
    };
    Ok(with_next(
        ok(format!("{n} VM(s)"), list).into_response(),
        next,
    ))
}

/// Whose VMs a request addresses: the caller's, unless an admin names another owner or all
/// (`None`).
pub fn target_owner(
    caller: &Caller,
    owner: Option<&str>,
    all: bool,
) -> Result<Option<String>, ApiError> {
    let me = caller.active()?;
    if (all || owner.is_some()) && !caller.is_admin() {
        return Err(ApiError::forbidden(
            "listing other users' VMs needs an admin",
        ));
    }
    if all {
        return Ok(None);
    }
    Ok(Some(owner.unwrap_or(me.username.as_str()).to_string()))
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
    let vm = st.services.vm(&owner, &name).await?;
    Ok(ok(format!("VM {name}: {}", vm.status), vm))
}

pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Result<Ok200, ApiError> {
    let owner = caller.owner_for(q.owner)?;
    let me = caller.principal()?;
    let d = st.services.delete_vm(&me, &owner, &name).await?;
    Ok(accepted(d.message, d.data))
}

pub async fn quota(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let q = st.services.quota(&me).await?;
    Ok(ok(format!("quota of {}", me.name()), q))
}

pub async fn resources(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let r = st.services.resources(&me).await?;
    Ok(ok(format!("resources of {}", me.name()), r))
}
