//! VMs: catalog, create, list, show, delete, quota, resources.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::openapi::{self as doc, Answer};
use crate::routes::page::{PageQuery, with_next};
use crate::server::AppState;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use basphere_service::VmOrder;
use basphere_wire as wire;
use basphere_wire::CreateVmsRequest;
use serde::Deserialize;
use tokio_stream::StreamExt;
use utoipa::IntoParams;

#[utoipa::path(
    get, path = "/catalog", tag = "vms", operation_id = "catalog",
    summary = "What VMs can be made of: specs, images, counts, disks, networks",
    responses((status = 200, description = "The catalog", body = Answer<wire::Catalog>)),
)]
pub async fn catalog(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    caller.known()?;
    Ok(ok("catalog", st.services.catalog()))
}

/// `POST /vms`: admits the VMs in one transaction and answers 202 with an operation per VM.
#[utoipa::path(
    post, path = "/vms", tag = "vms", operation_id = "create_vms",
    summary = "Create VMs (admitted at once; created in the background)",
    request_body = wire::CreateVmsRequest,
    responses(
        (status = 202, description = "Admitted: an operation per VM to follow", body = Answer<wire::VmsCreated>, links(
            ("show" = (operation_id = "show_vm", parameters(("name" = "$response.body#/data/vms/0/name")))),
            ("delete" = (operation_id = "delete_vm", parameters(("name" = "$response.body#/data/vms/0/name")))),
            ("operation" = (operation_id = "show_operation", parameters(("id" = "$response.body#/data/operations/0")))),
            ("events" = (operation_id = "operation_events", parameters(("id" = "$response.body#/data/operations/0")))),
            ("cancel" = (operation_id = "cancel_operation", parameters(("id" = "$response.body#/data/operations/0")))),
        )),
        (status = 403, response = doc::Forbidden),
        (status = 409, response = doc::Conflict),
        (status = 503, response = doc::Unavailable),
    ),
)]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Everyone's VMs (admin).
    #[serde(default)]
    pub all: bool,
    /// This user's VMs (admin).
    pub owner: Option<String>,
    /// `created` (default: oldest first, `after` an id) or `name` (by owner, then name;
    /// `after` is `OWNER/NAME`).
    #[param(value_type = Option<String>, pattern = "^(created|name)$")]
    pub sort: Option<String>,
}

/// `GET /vms?all=&owner=&sort=&limit=&after=`: the prototype's `{vms, total, quota}`, VMs in
/// creation order (or by owner and name), one page of them (the next page's `after` in
/// `X-Next-After`, see `page`). Asked with `Accept: application/x-ndjson`, every VM instead
/// (after `after`), one JSON object per line, streamed as it is read.
#[utoipa::path(
    get, path = "/vms", tag = "vms", operation_id = "list_vms",
    summary = "VMs in creation order (or by owner and name), with the owner's quota",
    description = "One page as JSON; or, with `Accept: application/x-ndjson`, every VM (after `after`; no `limit`), one per line, streamed: a stream cut short (a connection closed before its last chunk) is a failed listing.",
    params(ListQuery, PageQuery),
    responses(
        (status = 200, description = "One page of VMs (or, as NDJSON, every VM)", headers(("X-Next-After" = String, description = "The `after` of the next page, when more follow (JSON pages only)")), content(
            (Answer<wire::VmList> = "application/json"),
            (wire::Vm = "application/x-ndjson"),
        )),
        (status = 400, response = doc::BadRequest),
        (status = 403, response = doc::Forbidden),
    ),
)]
pub async fn list_page(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
    Query(p): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let streamed = wants_ndjson(&headers);
    if streamed && p.paging().limit.is_some() {
        return Err(ApiError::bad_request(
            "a streamed list (Accept: application/x-ndjson) holds every VM: drop limit, or ask \
             for application/json pages",
        ));
    }
    p.paging().limit()?;
    let order = match q.sort.as_deref() {
        None | Some("created") => VmOrder::Created,
        Some("name") => VmOrder::Name,
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "sort={s:?}: choose created (the default) or name"
            )));
        }
    };
    let owner = target_owner(&caller, q.owner.as_deref(), q.all)?;
    let me = caller.active()?;
    if streamed {
        let chunks = st.services.vm_stream(owner, order, p.paging().after)?;
        return Ok(ndjson(chunks));
    }
    let (vms, quota) = st
        .services
        .vm_list(me, owner.as_deref(), order, &p.paging())
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

const NDJSON: &str = "application/x-ndjson";

/// Whether the request's `Accept` names NDJSON.
fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == NDJSON)
}

/// A 200 whose body is each chunk's VMs, one JSON object per line, written as the chunks
/// come. A chunk that failed to be read ends the body with an error, so the connection closes
/// before the last chunk of the answer and the client sees a broken listing, not a short one.
fn ndjson(
    chunks: tokio::sync::mpsc::Receiver<Result<Vec<wire::Vm>, basphere_service::ServiceError>>,
) -> Response {
    let lines = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|chunk| {
        let vms = chunk.map_err(|e| {
            tracing::error!(error = %e, "a streamed VM listing failed part way");
            std::io::Error::other(e.to_string())
        })?;
        let mut b = Vec::with_capacity(vms.len() * 512);
        for vm in &vms {
            serde_json::to_writer(&mut b, vm).map_err(std::io::Error::other)?;
            b.push(b'\n');
        }
        Ok::<_, std::io::Error>(axum::body::Bytes::from(b))
    });
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON))],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OwnerQuery {
    /// The VM's owner, when an admin addresses another user's VM.
    pub owner: Option<String>,
}

#[utoipa::path(
    get, path = "/vms/{name}", tag = "vms", operation_id = "show_vm",
    summary = "A VM of the caller (or, for an admin, of the owner named)",
    params(("name" = String, Path, description = "The VM's name", example = "web"), OwnerQuery),
    responses(
        (status = 200, description = "The VM", body = Answer<wire::Vm>),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
    ),
)]
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

#[utoipa::path(
    delete, path = "/vms/{name}", tag = "vms", operation_id = "delete_vm",
    summary = "Delete a VM (in the background)",
    params(("name" = String, Path, description = "The VM's name", example = "web"), OwnerQuery),
    responses(
        (status = 202, description = "The delete started: the VM with its operation", body = Answer<wire::Vm>, links(
            ("operation" = (operation_id = "show_operation", parameters(("id" = "$response.body#/data/operation_id")))),
            ("retry" = (operation_id = "retry_operation", parameters(("id" = "$response.body#/data/operation_id")))),
        )),
        (status = 403, response = doc::Forbidden),
        (status = 404, response = doc::NotFound),
        (status = 409, response = doc::Conflict),
    ),
)]
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

#[utoipa::path(
    get, path = "/quota", tag = "vms", operation_id = "quota",
    summary = "The caller's quota and usage",
    responses(
        (status = 200, description = "Quota and usage", body = Answer<wire::QuotaView>),
        (status = 403, response = doc::Forbidden),
    ),
)]
pub async fn quota(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let q = st.services.quota(&me).await?;
    Ok(ok(format!("quota of {}", me.name()), q))
}

#[utoipa::path(
    get, path = "/resources", tag = "vms", operation_id = "resources",
    summary = "The caller's addresses, quota, usage and VMs",
    responses(
        (status = 200, description = "The caller's resources", body = Answer<wire::Resources>),
        (status = 403, response = doc::Forbidden),
    ),
)]
pub async fn resources(State(st): State<AppState>, caller: Caller) -> Result<Ok200, ApiError> {
    let me = caller.principal()?;
    let r = st.services.resources(&me).await?;
    Ok(ok(format!("resources of {}", me.name()), r))
}
