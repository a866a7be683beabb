//! Batches (plan/apply of manifests) and operation cancel/retry. The global event stream is
//! `ops::events_all`.
//!
//! `POST /batches/plan` and `POST /batches` take `{"manifest": TEXT, "format": "toml"|"yaml",
//! "parallelism": N}`; planning is `basphere_plan`, admission one store transaction.

use crate::auth::Caller;
use crate::envelope::{ApiError, Ok200, accepted, ok};
use crate::input::Body;
use crate::server::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use basphere_core::FieldErrors;
use basphere_core::VmOperation;
use basphere_plan::{self as plan, Existing, Format, Manifest};
use basphere_store::{BatchError, BatchRequest, BatchVm, OpError, Workflow};
use serde_json::{Value, json};

/// Largest `parallelism` accepted.
const MAX_PARALLELISM: i64 = 256;

struct Planned {
    plan: plan::Plan,
    creates: Vec<BatchVm>,
    parallelism: u32,
}

/// Parses the body's manifest and plans it against the caller's VMs.
async fn planned(st: &AppState, caller: &Caller, body: &Body) -> Result<Planned, ApiError> {
    let me = caller.active()?;
    let cfg = &st.config;
    let mut errs = FieldErrors::new();
    let text = body.str("manifest", true, &mut errs);
    let format = match body.str("format", false, &mut errs).as_deref() {
        None | Some("toml") => Format::Toml,
        Some("yaml") | Some("yml") => Format::Yaml,
        Some(f) => {
            errs.push("format", format!("must be toml or yaml (got {f})"));
            Format::Toml
        }
    };
    let par = body.int("parallelism", &mut errs);
    if let Some(p) = par
        && !(1..=MAX_PARALLELISM).contains(&p)
    {
        errs.push(
            "parallelism",
            format!("must be between 1 and {MAX_PARALLELISM}"),
        );
    }
    errs.into_result()?;
    let m = Manifest::parse(&text.unwrap_or_default(), format).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.clone()).with_errors(vec![e])
    })?;
    let owner = me.username.as_str();
    let managed: std::collections::HashSet<String> = st
        .store
        .managed_vm_names(owner)
        .await?
        .into_iter()
        .collect();
    let existing: Vec<Existing> = st
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
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the plan is refused: {}", list.join("; ")),
        )
        .with_errors(list)
        .with_data(json!({"problems": es}))
    })?;
    // Resolve names, images and sizes of what is to be created, reporting every bad one.
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
        match (&name, &os, spec) {
            (Ok(name), Some(os), Some((spec_name, spec))) => creates.push(BatchVm {
                name: Clone::clone(name),
                os: Clone::clone(os),
                login_user: cfg.images[os].login_user.clone(),
                spec_name: spec_name.clone(),
                spec: *spec,
                requires: c.requires.clone(),
                optional: c.optional.clone(),
            }),
            _ => {
                if let Err(e) = &name {
                    bad.push(format!("{}: {e}", c.name));
                }
                if os.is_none() {
                    bad.push(format!(
                        "{}: unknown os {os_name} (known: {})",
                        c.name,
                        cfg.images
                            .keys()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
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
                        cfg.specs
                            .keys()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the manifest has {} problem(s)", bad.len()),
        )
        .with_errors(bad));
    }
    let parallelism = par
        .map(|p| p as u32)
        .or(m.parallelism)
        .unwrap_or(10)
        .clamp(1, MAX_PARALLELISM as u32);
    Ok(Planned {
        plan: p,
        creates,
        parallelism,
    })
}

fn summary(p: &plan::Plan) -> String {
    format!(
        "{} to create, {} to keep, {} to delete",
        p.create.len(),
        p.keep.len(),
        p.delete.len()
    )
}

/// `POST /batches/plan`: what applying the manifest would do.
pub async fn plan(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let p = planned(&st, &caller, &body).await?;
    Ok(ok(
        format!("plan: {}", summary(&p.plan)),
        json!({"plan": p.plan, "parallelism": p.parallelism}),
    ))
}

/// `POST /batches`: plans the manifest and admits it as one batch (202).
pub async fn apply(
    State(st): State<AppState>,
    caller: Caller,
    body: Body,
) -> Result<Ok200, ApiError> {
    let p = planned(&st, &caller, &body).await?;
    let me = caller.active()?;
    if p.creates.is_empty() && p.plan.delete.is_empty() {
        return Ok(ok(
            "nothing to do: everything in the manifest exists",
            json!({"batch_id": null, "nodes": [], "plan": p.plan}),
        ));
    }
    let req = BatchRequest {
        owner: me.username.clone(),
        provider: st.provider.kind().to_string(),
        parallelism: p.parallelism,
        creates: p.creates,
        deletes: p
            .plan
            .delete
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect(),
        create_steps: basphere_vm_workflows::step_names(VmOperation::Create),
        delete_steps: basphere_vm_workflows::step_names(VmOperation::Delete),
    };
    let b = st
        .store
        .admit_batch(&req, &st.config.network, &caller.actor())
        .await
        .map_err(|e| match e {
            BatchError::Admit(basphere_store::AdmitError::Quota(q)) => {
                ApiError::new(StatusCode::FORBIDDEN, q.to_string()).with_data(q)
            }
            BatchError::Admit(basphere_store::AdmitError::Store(e)) => ApiError::internal(e),
            BatchError::Admit(basphere_store::AdmitError::NotActive(..)) => {
                ApiError::forbidden(e.to_string())
            }
            e => ApiError::conflict(e.to_string()),
        })?;
    st.engine.wake();
    Ok(accepted(
        format!(
            "batch {} accepted: {}; follow with: basphere ops watch --batch {}",
            b.batch_id,
            summary(&p.plan),
            b.batch_id
        ),
        json!({"batch_id": b.batch_id, "nodes": b.nodes, "plan": p.plan, "parallelism": p.parallelism}),
    ))
}

fn node_view(w: &Workflow) -> Value {
    json!({
        "node": w.node,
        "operation_id": w.id,
        "action": match w.definition.parse() { Ok(VmOperation::Create) => "create", Ok(VmOperation::Delete) => "delete", Err(_) => w.definition.as_str() },
        "status": w.status,
        "step": w.step,
        "steps": w.steps.iter().map(|s| json!({"name": s.name, "status": s.status})).collect::<Vec<_>>(),
        "waiting_on": w.waiting_on,
        "error": w.error,
    })
}

/// `GET /batches/{id}`: every node's state.
pub async fn show(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    let me = caller.active()?;
    match st.store.batch_owner(&id).await? {
        Some(o) if caller.is_admin() || o == me.username.as_str() => {}
        _ => return Err(ApiError::not_found(format!("batch {id} not found"))),
    }
    let ws = st.store.batch_workflows(&id).await?;
    let done = ws.iter().filter(|w| w.status.is_terminal()).count();
    Ok(ok(
        format!("batch {id}: {done}/{} ended", ws.len()),
        json!({"batch_id": id, "nodes": ws.iter().map(node_view).collect::<Vec<_>>()}),
    ))
}

async fn visible(st: &AppState, caller: &Caller, id: &str) -> Result<Workflow, ApiError> {
    let me = caller.active()?;
    match st.store.workflow(id).await? {
        Some(w) if caller.is_admin() || w.owner == me.username.as_str() => Ok(w),
        _ => Err(ApiError::not_found(format!("operation {id} not found"))),
    }
}

fn op_error(e: OpError) -> ApiError {
    match e {
        OpError::NotFound(_) => ApiError::not_found(e.to_string()),
        OpError::Store(e) => ApiError::internal(e),
        e => ApiError::conflict(e.to_string()),
    }
}

/// `POST /operations/{id}/cancel`: stops at the next step boundary and undoes (202).
pub async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    visible(&st, &caller, &id).await?;
    let ev = st
        .store
        .request_cancel(&id, &caller.actor())
        .await
        .map_err(op_error)?;
    st.engine.publish([ev]);
    let w = st
        .store
        .workflow(&id)
        .await?
        .as_ref()
        .map(super::ops::operation_view);
    Ok(accepted(
        format!(
            "cancelling {id}: a running step finishes (or reaches its deadline), then done steps are undone"
        ),
        w,
    ))
}

/// `POST /operations/{id}/retry`: queues a failed or cancelled operation again (202).
pub async fn retry(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Ok200, ApiError> {
    visible(&st, &caller, &id).await?;
    let evs = st
        .store
        .retry_workflow(
            &id,
            &basphere_store::RetryCtx {
                pool: &st.config.network,
            },
            &caller.actor(),
        )
        .await
        .map_err(op_error)?;
    let n = evs.len();
    st.engine.publish(evs);
    let w = st
        .store
        .workflow(&id)
        .await?
        .as_ref()
        .map(super::ops::operation_view);
    Ok(accepted(
        if n > 1 {
            format!("retrying {id} and {} skipped dependent(s)", n - 1)
        } else {
            format!("retrying {id}")
        },
        w,
    ))
}
