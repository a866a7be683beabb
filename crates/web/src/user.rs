//! A signed-in user's pages: dashboard (quota, VMs, create, live operations), one VM, delete
//! with confirmation, SSH key change.

use crate::html::{
    Input, badge, checkboxes, esc, fold_checked, form_alert, gib, ip, select, url, when_rfc3339,
};
use crate::session::Visitor;
use crate::{api, body_of};
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use basphere_api::{ApiError, AppState, Caller};
use basphere_core::FieldError;
use basphere_store::now_ms;
use basphere_wire::{CreateVmsRequest, KeyChangeRequest, Operation, Vm};
use std::collections::HashMap;
use std::fmt::Write;

type Fields = HashMap<String, String>;

/// How long a finished operation stays on the dashboard.
const RECENT_MS: i64 = 60_000;

fn meter(
    id: &str,
    label: &str,
    used: u64,
    max: Option<u64>,
    unit: impl Fn(u64) -> String,
) -> String {
    match max {
        Some(max) => {
            let pct = (used * 100).checked_div(max).unwrap_or(100);
            let cls = if pct >= 90 { " full" } else { "" };
            format!(
                r#"<div class="quota{cls}"><label for="q-{id}">{label}</label><meter id="q-{id}" min="0" max="{max}" value="{used}" low="{low}" high="{high}" optimum="0">{used} of {max}</meter><span class="qtext">{u} of {m}</span></div>"#,
                low = max * 7 / 10,
                high = max * 9 / 10,
                u = unit(used),
                m = unit(max),
            )
        }
        None => format!(
            r#"<div class="quota"><span class="qlabel">{label}</span><span class="qtext">{} in use · no limit</span></div>"#,
            unit(used)
        ),
    }
}

/// The steps of an operation, updated live by app.js through the SSE route when `live`.
pub(crate) fn op_block(wf: &Operation, vm_name: &str) -> String {
    let live = !wf.status.is_terminal();
    let verb = match wf.kind.parse() {
        Ok(basphere_core::VmOperation::Create) => "Creating",
        Ok(basphere_core::VmOperation::Delete) => "Deleting",
        Err(_) => "Running",
    };
    let mut steps = String::new();
    for s in &wf.steps {
        let _ = write!(
            steps,
            r#"<li data-step="{n}" class="st-{st}"><span class="sname">{n}</span> <span class="sstat">{st}</span></li>"#,
            n = esc(&s.name),
            st = s.status,
        );
    }
    format!(
        r#"<section class="card op" data-op="{id}" data-live="{live}" aria-label="{verb} {vm}">
<h3>{verb} <strong>{vm}</strong> <span class="opstat" aria-live="polite">{status}</span></h3>
<ol class="wsteps">{steps}</ol>
<p class="opmsg" aria-live="polite">{err}</p>
</section>"#,
        id = esc(&wf.id),
        vm = esc(vm_name),
        status = badge(wf.status.as_str()),
        err = wf.error.as_deref().map(esc).unwrap_or_default(),
    )
}

fn ssh_cell(vm: &Vm, idx: usize) -> String {
    match vm.ip_address {
        Some(ip) if vm.status == basphere_core::VmStatus::Running => format!(
            r#"<span class="copyline"><code id="ssh-{idx}">ssh {}@{ip}</code> <button type="button" class="copy" data-copy="ssh-{idx}" aria-label="Copy the ssh command of {}">Copy</button></span>"#,
            esc(&vm.login_user),
            esc(vm.name.as_str())
        ),
        _ => "—".into(),
    }
}

fn spec_text(vm: &Vm) -> String {
    format!(
        "{} · {} vCPU · {} · {} GiB",
        esc(&vm.spec),
        vm.vcpus,
        gib(vm.memory_mib),
        vm.disk_gib
    )
}

fn create_form(
    st: &AppState,
    v: &Visitor,
    f: &Fields,
    errs: &[FieldError],
    alert: Option<&str>,
) -> String {
    let cfg = &st.config;
    let specs: Vec<(String, String)> = cfg
        .specs
        .iter()
        .map(|(n, s)| {
            (
                n.as_str().to_string(),
                format!(
                    "{n} — {} vCPU, {}, {} GiB disk",
                    s.vcpus,
                    gib(s.memory_mib),
                    s.disk_gib,
                    n = n.as_str()
                ),
            )
        })
        .collect();
    let images: Vec<(String, String)> = cfg
        .images
        .iter()
        .map(|(n, i)| {
            (
                n.as_str().to_string(),
                format!("{} (login {})", n.as_str(), i.login_user),
            )
        })
        .collect();
    let spec_sel = f.get("spec").cloned().unwrap_or_else(|| {
        if cfg.specs.keys().any(|k| k.as_str() == "small") {
            "small".into()
        } else {
            specs.first().map(|s| s.0.clone()).unwrap_or_default()
        }
    });
    let os_sel = f
        .get("os")
        .cloned()
        .unwrap_or_else(|| cfg.default_image().to_string());
    let g = |k: &str, d: &'static str| f.get(k).cloned().unwrap_or_else(|| d.to_string());
    let name = g("name", "");
    let count = g("count", "1");
    let lim = cfg.vms.extra_disks;
    let disks = if lim.max_count == 0 {
        String::new()
    } else {
        Input::text("extra_disks", "Extra disks", &g("extra_disks", ""))
            .hint(&format!(
                "Optional, up to {}: sizes in GiB, {}–{} each, comma-separated; 20G is formatted \
                 and mounted at /data (then /data2, …), 20G:raw is left blank.",
                lim.max_count, lim.min_gb, lim.max_gb
            ))
            .attrs(r#"autocapitalize="none" spellcheck="false" placeholder="20G, 50G:raw""#)
            .render("c-", errs)
    };
    let max_nets = cfg.vms.extra_networks.max_count;
    let nets = if cfg.networks.is_empty() || max_nets == 0 {
        String::new()
    } else if max_nets > 1 && cfg.networks.len() > 1 {
        let names: Vec<String> = cfg.networks.keys().cloned().collect();
        let picked = g("extra_networks", "");
        let picked: Vec<&str> = picked.split(',').map(str::trim).collect();
        checkboxes(
            "c-",
            "extra_networks",
            &format!("Extra networks (up to {max_nets})"),
            &names,
            &picked,
            errs,
        )
    } else {
        let mut opts = vec![(String::new(), "none".to_string())];
        opts.extend(cfg.networks.keys().map(|n| (n.clone(), n.clone())));
        select(
            "c-",
            "extra_networks",
            "Extra network",
            &opts,
            &g("extra_networks", ""),
            errs,
        )
    };
    format!(
        r#"<section class="card" aria-labelledby="create-h"><h2 id="create-h">Create VMs</h2>
{alert}
<form method="post" action="/vms" class="form inline-form" id="create-form" novalidate>
{csrf}
{name}
{spec}
{os}
{count}
{disks}
{nets}
<button type="submit">Create</button>
</form></section>"#,
        alert = form_alert(alert),
        csrf = v.csrf_field(),
        name = Input::text("name", "Name", &name)
            .hint("1–30 of a-z, 0-9, hyphens. With a count above 1: NAME-1 … NAME-N.")
            .attrs(r#"autocapitalize="none" spellcheck="false" required"#)
            .render("c-", errs),
        spec = select("c-", "spec", "Size", &specs, &spec_sel, errs),
        os = select("c-", "os", "Operating system", &images, &os_sel, errs),
        count = Input::text("count", "Count", &count)
            .kind("number")
            .attrs(r#"min="1" max="10" inputmode="numeric" required"#)
            .render("c-", errs),
    )
}

async fn dashboard_page(
    st: &AppState,
    v: &Visitor,
    caller: &Caller,
    status: StatusCode,
    f: &Fields,
    errs: &[FieldError],
    alert: Option<&str>,
) -> Response {
    let principal = match caller.principal() {
        Ok(p) => p,
        Err(e) => {
            return v.page(
                e.status,
                "Dashboard",
                &format!(r#"<p id="not-active">{}</p>"#, esc(&e.message)),
            );
        }
    };
    let me = &principal.user;
    let owner = me.username.as_str();
    let (vms, usage, wfs) = match st.services.dashboard(&principal).await {
        Ok(d) => (d.vms, d.usage, d.operations),
        Err(e) => {
            return v.page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Dashboard",
                &esc(&e.to_string()),
            );
        }
    };
    let q = &me.quota;
    let quota = format!(
        r#"<section class="card" aria-labelledby="quota-h"><h2 id="quota-h">Quota</h2><div class="quotas">{}{}{}{}{}</div></section>"#,
        meter(
            "vms",
            "VMs",
            usage.vms.into(),
            Some(q.max_vms.into()),
            |x| x.to_string()
        ),
        meter(
            "ips",
            "IP addresses",
            usage.ips.into(),
            Some(q.max_ips.into()),
            |x| x.to_string()
        ),
        meter(
            "vcpus",
            "vCPUs",
            usage.vcpus.into(),
            q.max_vcpus.map(u64::from),
            |x| x.to_string()
        ),
        meter("mem", "Memory", usage.memory_mib, q.max_memory_mib, gib),
        meter("disk", "Disk", usage.disk_gib, q.max_disk_gib, |x| format!(
            "{x} GiB"
        )),
    );
    let now = now_ms();
    let names: HashMap<&str, &str> = vms
        .iter()
        .map(|vm| (vm.id.as_str(), vm.name.as_str()))
        .collect();
    let ops: String = wfs
        .iter()
        .filter(|w| !w.status.is_terminal() || w.finished_at.is_some_and(|t| now - t < RECENT_MS))
        .map(|w| {
            let n = w
                .vm_id
                .as_deref()
                .and_then(|id| names.get(id).copied())
                .unwrap_or("a removed VM");
            op_block(w, n)
        })
        .collect();
    let ops = if ops.is_empty() {
        String::new()
    } else {
        format!(
            r#"<section aria-labelledby="ops-h" id="ops"><h2 id="ops-h">Operations</h2>{ops}</section>"#
        )
    };
    let mut rows = String::new();
    for (i, vm) in vms.iter().enumerate() {
        let n = esc(vm.name.as_str());
        let _ = write!(
            rows,
            r#"<tr data-vm="{n}"><th scope="row" data-label="Name"><a href="/vms/{nu}">{n}</a></th><td data-label="Status">{st}</td><td data-label="IP">{ip}</td><td data-label="Spec">{spec}</td><td data-label="OS">{os}</td><td data-label="SSH">{ssh}</td><td data-label="Actions">{act}</td></tr>"#,
            nu = url(vm.name.as_str()),
            st = badge(vm.status.as_str()),
            ip = ip(vm.ip_address),
            spec = spec_text(vm),
            os = esc(&vm.os),
            ssh = ssh_cell(vm, i),
            act = match vm.status {
                basphere_core::VmStatus::Running | basphere_core::VmStatus::Failed => format!(
                    r#"<a class="button danger small" href="/vms/{}/delete" aria-label="Delete {n}">Delete</a>"#,
                    url(vm.name.as_str())
                ),
                _ => String::new(),
            },
        );
    }
    let table = if vms.is_empty() {
        r#"<p id="no-vms">You have no VMs yet. Create one below.</p>"#.to_string()
    } else {
        format!(
            r#"<table class="vms" id="vm-table"><caption class="sr-only">Your VMs</caption><thead><tr><th scope="col">Name</th><th scope="col">Status</th><th scope="col">IP</th><th scope="col">Spec</th><th scope="col">OS</th><th scope="col">SSH</th><th scope="col">Actions</th></tr></thead><tbody>{rows}</tbody></table>"#
        )
    };
    let block = me
        .ip_block
        .and_then(|b| st.config.network.block(b))
        .map(|b| format!(" Your addresses: <code>{}</code>.", b.net))
        .unwrap_or_default();
    let body = format!(
        r#"<p>Signed in as <strong>{who}</strong> (team {team}).{block}</p>
{quota}
{ops}
<section class="card" aria-labelledby="vms-h"><h2 id="vms-h">Your VMs</h2>{table}</section>
{create}"#,
        who = esc(owner),
        team = esc(&me.team),
        create = create_form(st, v, f, errs, alert),
    );
    v.page(status, "Dashboard", &body)
}

pub async fn dashboard(State(st): State<AppState>, v: Visitor) -> Response {
    let caller = match v.signed_in() {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    dashboard_page(&st, &v, &caller, StatusCode::OK, &Fields::new(), &[], None).await
}

pub async fn create(State(st): State<AppState>, v: Visitor, Form(mut f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    fold_checked(&mut f, "extra_networks");
    let caller = match v.signed_in() {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let req = CreateVmsRequest::read(&body_of(&f, &["name"]));
    let created = match caller.principal() {
        Ok(me) => api(st.services.create_vms(&me, &req).await),
        Err(e) => Err(e),
    };
    match created {
        Ok(d) => {
            let names: Vec<&str> = d.data.vms.iter().map(|v| v.name.as_str()).collect();
            v.redirect(
                "/dashboard",
                Some(("ok", &format!("Creating {}.", names.join(", ")))),
            )
        }
        Err(e) => {
            // An entry's error (`extra_disks[1].size_gb`) shows at its form field.
            let mut fields: Vec<FieldError> = e
                .fields
                .iter()
                .map(|f| match f.field.split_once('[') {
                    Some((base, _)) if base.starts_with("extra_") => FieldError {
                        field: base.to_string(),
                        message: format!("{}: {}", f.field, f.message),
                    },
                    _ => f.clone(),
                })
                .collect();
            let mut alert = None;
            if e.status == StatusCode::CONFLICT && fields.is_empty() {
                fields.push(FieldError {
                    field: "name".into(),
                    message: e.message.clone(),
                });
            } else if fields.is_empty() {
                alert = Some(e.message.as_str());
            } else {
                alert = Some("Nothing created: please correct the fields marked below.");
            }
            dashboard_page(&st, &v, &caller, e.status, &f, &fields, alert).await
        }
    }
}

#[derive(serde::Deserialize)]
pub struct OwnerQ {
    owner: Option<String>,
}

/// The VM as the API shows it to this caller (404 for another user's VM).
async fn visible_vm(
    st: &AppState,
    caller: Caller,
    name: &str,
    owner: Option<String>,
) -> Result<Vm, ApiError> {
    let owner = caller.owner_for(owner)?;
    api(st.services.vm(&owner, name).await)
}

fn not_found(v: &Visitor, e: &ApiError) -> Response {
    v.page(
        e.status,
        if e.status == StatusCode::NOT_FOUND {
            "Not found"
        } else {
            "Refused"
        },
        &format!(
            r#"<p id="error-message">{}</p><p><a href="/dashboard">Back to your dashboard</a></p>"#,
            esc(&e.message)
        ),
    )
}

pub async fn vm_page(
    State(st): State<AppState>,
    v: Visitor,
    Path(name): Path<String>,
    Query(q): Query<OwnerQ>,
) -> Response {
    let caller = match v.signed_in() {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let vm = match visible_vm(&st, caller, &name, q.owner).await {
        Ok(vm) => vm,
        Err(e) => return not_found(&v, &e),
    };
    let owner = vm.owner.to_string();
    let ops: String = st
        .services
        .vm_operations(&owner, &vm.id, 3)
        .await
        .unwrap_or_default()
        .iter()
        .map(|w| op_block(w, &name))
        .collect();
    let ssh = match vm.ssh.as_deref() {
        Some(c) if vm.status == basphere_core::VmStatus::Running => format!(
            r#"<span class="copyline"><code id="ssh-0">{}</code> <button type="button" class="copy" data-copy="ssh-0">Copy</button></span>"#,
            esc(c)
        ),
        _ => "—".into(),
    };
    let owner_q = if v.caller.as_ref().is_some_and(|c| c.name != owner) {
        format!("?owner={}", url(&owner))
    } else {
        String::new()
    };
    let body = format!(
        r#"<dl class="card facts">
<dt>Status</dt><dd id="vm-status">{status}</dd>
<dt>Owner</dt><dd>{owner}</dd>
<dt>IP address</dt><dd>{ip}</dd>
<dt>SSH</dt><dd>{ssh}</dd>
<dt>Spec</dt><dd>{spec} · {vcpus} vCPU · {mem} · {disk} GiB disk</dd>
<dt>OS</dt><dd>{os} (login {login})</dd>
<dt>Created</dt><dd>{created}</dd>
<dt>Provider</dt><dd>{provider}</dd>
{error}
</dl>
<h2>Operations</h2>
{ops}
<p><a class="button danger" href="/vms/{nu}/delete{owner_q}">Delete {n}</a> <a href="/dashboard">Back to the dashboard</a></p>"#,
        status = badge(vm.status.as_str()),
        owner = esc(&owner),
        ip = ip(vm.ip_address),
        spec = esc(&vm.spec),
        vcpus = vm.vcpus,
        mem = gib(vm.memory_mib),
        disk = vm.disk_gib,
        os = esc(&vm.os),
        login = esc(&vm.login_user),
        created = esc(&vm.created_at),
        provider = esc(&vm.provider),
        error = vm
            .error
            .as_deref()
            .map(|e| format!("<dt>Error</dt><dd>{}</dd>", esc(e)))
            .unwrap_or_default(),
        nu = url(&name),
        n = esc(&name),
    );
    v.page(StatusCode::OK, &format!("VM {name}"), &body)
}

pub async fn delete_confirm(
    State(st): State<AppState>,
    v: Visitor,
    Path(name): Path<String>,
    Query(q): Query<OwnerQ>,
) -> Response {
    let caller = match v.signed_in() {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let owner = q.owner.clone();
    let vm = match visible_vm(&st, caller, &name, q.owner).await {
        Ok(vm) => vm,
        Err(e) => return not_found(&v, &e),
    };
    let owner_q = owner
        .map(|o| format!("?owner={}", url(&o)))
        .unwrap_or_default();
    let body = format!(
        r#"<div class="card danger-zone">
<p id="confirm-text">Delete the VM <strong>{n}</strong> ({ip}) of {owner}? Its disk is destroyed and its address returns to the pool. This cannot be undone.</p>
<form method="post" action="/vms/{nu}/delete{owner_q}">
{csrf}
<button type="submit" class="danger" id="confirm-delete">Delete {n}</button>
<a href="/vms/{nu}{owner_q}">Cancel</a>
</form></div>"#,
        n = esc(&name),
        nu = url(&name),
        ip = vm
            .ip_address
            .map(|i| esc(&i.to_string()))
            .unwrap_or_else(|| "no address".into()),
        owner = esc(vm.owner.as_str()),
        csrf = v.csrf_field(),
    );
    v.page(StatusCode::OK, &format!("Delete {name}?"), &body)
}

pub async fn delete(
    State(st): State<AppState>,
    v: Visitor,
    Path(name): Path<String>,
    Query(q): Query<OwnerQ>,
    Form(f): Form<Fields>,
) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let caller = match v.signed_in() {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let back = if q.owner.is_some() {
        "/admin/vms"
    } else {
        "/dashboard"
    };
    let deleted = match caller
        .owner_for(q.owner)
        .and_then(|o| Ok((o, caller.principal()?)))
    {
        Ok((owner, me)) => api(st.services.delete_vm(&me, &owner, &name).await),
        Err(e) => Err(e),
    };
    match deleted {
        Ok(_) => v.redirect(back, Some(("ok", &format!("Deleting {name}.")))),
        Err(e) if e.status == StatusCode::NOT_FOUND => not_found(&v, &e),
        Err(e) => v.redirect(back, Some(("error", &e.message))),
    }
}

fn key_body(
    v: &Visitor,
    current: &str,
    history: &[basphere_wire::KeyChange],
    f: &Fields,
    errs: &[FieldError],
) -> String {
    let mut rows = String::new();
    for k in history {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td class=\"key\">{}</td><td>{}</td></tr>",
            when_rfc3339(&k.created_at),
            badge(k.status.to_string().as_str()),
            esc(&short_key(&k.public_key)),
            esc(k.reject_reason.as_deref().unwrap_or(""))
        );
    }
    let hist = if rows.is_empty() {
        String::new()
    } else {
        format!(
            r#"<h2>Your requests</h2><table class="plain"><thead><tr><th scope="col">Asked</th><th scope="col">Status</th><th scope="col">Key</th><th scope="col">Reason</th></tr></thead><tbody>{rows}</tbody></table>"#
        )
    };
    format!(
        r#"<p>Your current key: <code class="key">{cur}</code></p>
<p>Lost your key or made a new one? Ask for a change; an admin approves it and it replaces the key on the bastion and for new VMs. See the <a href="/ssh-guide">SSH guide</a> for making a key.</p>
<form method="post" action="/key-change" class="card form" novalidate>
{csrf}
{k}
<button type="submit">Ask for the change</button>
</form>
{hist}"#,
        cur = esc(&short_key(current)),
        csrf = v.csrf_field(),
        k = Input::text(
            "public_key",
            "New SSH public key",
            f.get("public_key").map(String::as_str).unwrap_or("")
        )
        .kind("textarea")
        .hint("One line, e.g. the content of ~/.ssh/id_ed25519.pub.")
        .attrs(r#"spellcheck="false" required"#)
        .render("k-", errs),
    )
}

/// `ssh-ed25519 AAAA…last8 comment`.
pub(crate) fn short_key(k: &str) -> String {
    let mut parts = k.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    let comment: Vec<&str> = parts.collect();
    let b = if blob.len() > 20 {
        format!("{}…{}", &blob[..8], &blob[blob.len() - 8..])
    } else {
        blob.to_string()
    };
    format!("{kind} {b} {}", comment.join(" "))
        .trim()
        .to_string()
}

async fn key_page(
    st: &AppState,
    v: &Visitor,
    status: StatusCode,
    f: &Fields,
    errs: &[FieldError],
) -> Response {
    let Some(me) = v.caller.as_ref().and_then(|c| c.user.as_ref()) else {
        return v.redirect(
            "/signin",
            Some(("error", "Sign in to change your SSH key.")),
        );
    };
    let history = st
        .services
        .key_changes(Some(me.username.as_str()))
        .await
        .unwrap_or_default();
    let body = key_body(v, &me.public_key, &history, f, errs);
    v.page(status, "Change your SSH key", &body)
}

/// `GET /key-change`: a signed-in user's key page; for anyone else the form that asks with
/// username and registered email (the prototype's, for someone who lost their key).
pub async fn key_change_form(State(st): State<AppState>, v: Visitor) -> Response {
    if v.caller.is_none() {
        return crate::public::key_change_unsigned_page(
            &st,
            &v,
            StatusCode::OK,
            &Fields::new(),
            &[],
            None,
        );
    }
    key_page(&st, &v, StatusCode::OK, &Fields::new(), &[]).await
}

pub async fn key_change(State(st): State<AppState>, v: Visitor, Form(f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let Some(caller) = v.caller.clone() else {
        return crate::public::key_change_unsigned(&st, &v, &f).await;
    };
    let req = KeyChangeRequest::read(&body_of(&f, &["public_key"]));
    let requested = match caller.principal() {
        Ok(me) => api(st.services.request_key_change(&me, &req).await),
        Err(e) => Err(e),
    };
    match requested {
        Ok(_) => v.redirect(
            "/key-change",
            Some(("ok", "Key change requested; an admin will review it.")),
        ),
        Err(e) => {
            let errs = if e.fields.is_empty() {
                vec![FieldError {
                    field: "public_key".into(),
                    message: e.message.clone(),
                }]
            } else {
                e.fields.clone()
            };
            key_page(&st, &v, e.status, &f, &errs).await
        }
    }
}
