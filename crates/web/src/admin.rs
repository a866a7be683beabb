//! Admin pages: pending registrations and key changes, users and quotas, all VMs, audit trail.

use crate::html::{badge, esc, gib, ip, url, when, when_rfc3339};
use crate::session::Visitor;
use crate::user::short_key;
use crate::{api, body_of};
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use basphere_api::{AppState, Caller};
use basphere_service::{Paging, username};
use basphere_wire::{QuotaRequest, ReasonRequest};
use std::collections::HashMap;
use std::fmt::Write;

type Fields = HashMap<String, String>;

/// The signed-in admin, or the page that says why not.
fn admin(v: &Visitor) -> Result<Caller, Response> {
    let c = v.signed_in()?;
    match c.admin() {
        Ok(_) => Ok(c.clone()),
        Err(e) => Err(error_page(v, e.status, "Admins only", &e.message)),
    }
}

macro_rules! admin_or_return {
    ($v:expr) => {
        match admin(&$v) {
            Ok(c) => c,
            Err(r) => return r,
        }
    };
}

fn decision_forms(v: &Visitor, kind: &str, u: &str) -> String {
    let uu = url(u);
    let eu = esc(u);
    format!(
        r#"<div class="decide">
<form method="post" action="/admin/{kind}/{uu}/approve">{csrf}<button type="submit" id="approve-{kind}-{eu}">Approve {eu}</button></form>
<form method="post" action="/admin/{kind}/{uu}/reject" class="reject">{csrf}<label for="reason-{kind}-{eu}">Reason</label><input id="reason-{kind}-{eu}" name="reason" type="text" placeholder="why not (shown to {eu})"><button type="submit" class="danger" id="reject-{kind}-{eu}">Reject</button></form>
</div>"#,
        csrf = v.csrf_field()
    )
}

pub async fn approvals(State(st): State<AppState>, v: Visitor) -> Response {
    let _ = admin_or_return!(v);
    let regs = st.services.registrations().await.unwrap_or_default();
    let keys: Vec<_> = st
        .services
        .key_changes(None)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.status == basphere_core::RegistrationStatus::Pending)
        .collect();
    let mut r = String::new();
    for g in &regs {
        let _ = write!(
            r,
            r#"<article class="card pending" data-user="{u}"><h3>{u}</h3><dl class="facts"><dt>Email</dt><dd>{e}</dd><dt>Team</dt><dd>{t}</dd><dt>Key</dt><dd><code class="key">{k}</code></dd><dt>Asked</dt><dd>{w}</dd></dl>{forms}</article>"#,
            u = esc(&g.username),
            e = esc(&g.email),
            t = esc(&g.team),
            k = esc(&short_key(&g.public_key)),
            w = when_rfc3339(&g.created_at),
            forms = decision_forms(&v, "registrations", &g.username),
        );
    }
    if regs.is_empty() {
        r = r#"<p id="no-registrations">No registrations wait for review.</p>"#.into();
    }
    let mut k = String::new();
    for c in &keys {
        let _ = write!(
            k,
            r#"<article class="card pending" data-key-user="{u}"><h3>{u}</h3><dl class="facts"><dt>Email</dt><dd>{e}</dd><dt>New key</dt><dd><code class="key">{key}</code></dd><dt>Reason</dt><dd>{why}</dd><dt>Asked</dt><dd>{w}</dd></dl>{forms}</article>"#,
            u = esc(&c.username),
            e = esc(&c.email),
            why = esc(c.reason.as_deref().unwrap_or("-")),
            key = esc(&short_key(&c.new_public_key)),
            w = when_rfc3339(&c.created_at),
            forms = decision_forms(&v, "key-changes", &c.username),
        );
    }
    if keys.is_empty() {
        k = r#"<p id="no-key-changes">No key changes wait for review.</p>"#.into();
    }
    let body = format!(
        r#"<section aria-labelledby="regs-h"><h2 id="regs-h">Registrations ({})</h2>{r}</section>
<section aria-labelledby="keys-h"><h2 id="keys-h">SSH key changes ({})</h2>{k}</section>"#,
        regs.len(),
        keys.len()
    );
    v.page(StatusCode::OK, "Approvals", &body)
}

pub async fn decide_registration(
    State(st): State<AppState>,
    v: Visitor,
    Path((u, decision)): Path<(String, String)>,
    Form(f): Form<Fields>,
) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let caller = admin_or_return!(v);
    let actor = caller.actor();
    let r = match decision.as_str() {
        "approve" => match username(&u) {
            Ok(name) => st
                .services
                .approve(&actor, &name)
                .await
                .map(|a| (a.message(), a.0.enrollment_code)),
            Err(e) => Err(e),
        },
        "reject" => match username(&u) {
            Ok(name) => st
                .services
                .reject(&actor, &name, &ReasonRequest::read(&body_of(&f, &[])))
                .await
                .map(|d| (d.message, None)),
            Err(e) => Err(e),
        },
        _ => return v.redirect("/admin", Some(("error", "unknown decision"))),
    };
    match api(r) {
        // The one-time code is shown in this answer only (never in a cookie, never cached).
        Ok((_, Some(code))) => {
            let body = format!(
                r#"<div class="notice ok" role="status" id="flash">User {eu} approved.</div>
<p>Give {eu} this one-time enrollment code (sign-in page, "First time"). It is shown only here, now:</p>
<div class="copyline"><code id="enrollment-code">{c}</code> <button type="button" class="copy" data-copy="enrollment-code">Copy</button></div>
<p><a class="button" href="/admin">Back to approvals</a></p>"#,
                eu = esc(&u),
                c = esc(&code)
            );
            let mut resp = v.page(StatusCode::OK, "User approved", &body);
            resp.headers_mut().insert(
                axum::http::header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Ok((msg, None)) => v.redirect("/admin", Some(("ok", &msg))),
        Err(e) => v.redirect("/admin", Some(("error", &e.message))),
    }
}

pub async fn decide_key(
    State(st): State<AppState>,
    v: Visitor,
    Path((u, decision)): Path<(String, String)>,
    Form(f): Form<Fields>,
) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let caller = admin_or_return!(v);
    let req = ReasonRequest::read(&body_of(&f, &[]));
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return v.redirect("/admin", Some(("error", "unknown decision"))),
    };
    let r = match username(&u) {
        Ok(name) => {
            st.services
                .decide_key(&caller.actor(), &name, approve, &req)
                .await
        }
        Err(e) => Err(e),
    };
    match api(r) {
        Ok(d) => v.redirect("/admin", Some(("ok", &d.message))),
        Err(e) => v.redirect("/admin", Some(("error", &e.message))),
    }
}

/// Users the admin's user page shows on one page unless `limit` says otherwise.
const USER_PAGE: i64 = 100;

/// `/admin/users?after=USERNAME&limit=N`: users by name with what they hold and their quota
/// forms, a page at a time, with a link to the next page while more follow.
pub async fn users(
    State(st): State<AppState>,
    v: Visitor,
    Query(query): Query<Fields>,
) -> Response {
    let _ = admin_or_return!(v);
    let paging = match paging_of(&v, "Users", &query, USER_PAGE) {
        Ok(p) => p,
        Err(page) => return page,
    };
    let (all, next) = match api(st.services.users_with_usage(&paging).await) {
        Ok(p) => (p.items, p.next_after),
        Err(e) => return error_page(&v, e.status, "Users", &e.message),
    };
    // The forms bring the admin back to this page.
    let here = esc(&back_to("", &query));
    let mut rows = String::new();
    for (u, usage) in &all {
        let name = u.username.as_str();
        let id = esc(name);
        let q = &u.quota;
        let num = |k: &str, label: &str, val: String, max: &str| {
            format!(
                r#"<div class="qf"><label for="q-{id}-{k}">{label}</label><input id="q-{id}-{k}" name="{k}" type="number" min="0" {max} value="{val}" inputmode="numeric"></div>"#
            )
        };
        let toggle = match u.status {
            basphere_core::UserStatus::Active if u.role != basphere_core::Role::Admin => format!(
                r#"<form method="post" action="/admin/users/{uu}/disable{here}">{csrf}<button type="submit" class="danger small">Disable</button></form>"#,
                uu = url(name),
                csrf = v.csrf_field()
            ),
            basphere_core::UserStatus::Disabled => format!(
                r#"<form method="post" action="/admin/users/{uu}/enable{here}">{csrf}<button type="submit" class="small">Enable</button></form>"#,
                uu = url(name),
                csrf = v.csrf_field()
            ),
            _ => String::new(),
        };
        let _ = write!(
            rows,
            r#"<article class="card user" data-user="{id}">
<h3>{id} {status} <span class="muted">{role} · team {team}{email}</span></h3>
<p class="usage">Using {vms} VM(s), {ips} IP(s), {vcpus} vCPU, {mem}, {disk} GiB of disk.</p>
<form method="post" action="/admin/users/{uu}/quota{here}" class="quota-form" aria-label="Quota of {id}">{csrf}
{f1}{f2}{f3}{f4}{f5}
<button type="submit" id="save-{id}">Save quota</button>
</form>
{toggle}
</article>"#,
            status = badge(u.status.to_string().as_str()),
            role = u.role,
            team = esc(&u.team),
            email = if u.email.is_empty() {
                String::new()
            } else {
                format!(" · {}", esc(&u.email))
            },
            vms = usage.vms,
            ips = usage.ips,
            vcpus = usage.vcpus,
            mem = gib(usage.memory_mib),
            disk = usage.disk_gib,
            uu = url(name),
            csrf = v.csrf_field(),
            f1 = num(
                "max_vms",
                "Max VMs",
                q.max_vms.to_string(),
                r#"max="10000""#
            ),
            f2 = num(
                "max_ips",
                "Max IPs",
                q.max_ips.to_string(),
                &format!(r#"max="{}""#, st.config.network.block_size)
            ),
            f3 = num(
                "max_vcpus",
                "Max vCPUs",
                q.max_vcpus.map(|x| x.to_string()).unwrap_or_default(),
                ""
            ),
            f4 = num(
                "max_memory_mib",
                "Max memory (MiB)",
                q.max_memory_mib.map(|x| x.to_string()).unwrap_or_default(),
                ""
            ),
            f5 = num(
                "max_disk_gib",
                "Max disk (GiB)",
                q.max_disk_gib.map(|x| x.to_string()).unwrap_or_default(),
                ""
            ),
        );
    }
    let from = after_note(" after", paging.after.as_deref());
    let more = next_link("/admin/users", &query, next, "Next page →");
    let body = format!(
        r#"<p id="user-count">{} user(s){from}, by name. Blank vCPU, memory and disk limits mean no limit.</p>{rows}{more}"#,
        all.len()
    );
    v.page(StatusCode::OK, "Users", &body)
}

pub async fn set_quota(
    State(st): State<AppState>,
    v: Visitor,
    Path(u): Path<String>,
    Query(page): Query<Fields>,
    Form(f): Form<Fields>,
) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let caller = admin_or_return!(v);
    let back = back_to("/admin/users", &page);
    let req = QuotaRequest::read(&body_of(&f, &[]));
    let r = match username(&u) {
        Ok(name) => st.services.set_quota(&caller.actor(), &name, &req).await,
        Err(e) => Err(e),
    };
    match api(r) {
        Ok(d) => v.redirect(&back, Some(("ok", &d.message))),
        Err(e) => {
            let detail = if e.errors.is_empty() {
                e.message.clone()
            } else {
                e.errors.join("; ")
            };
            v.redirect(
                &back,
                Some(("error", &format!("Quota of {u} not changed: {detail}"))),
            )
        }
    }
}

pub async fn set_state(
    State(st): State<AppState>,
    v: Visitor,
    Path((u, what)): Path<(String, String)>,
    Query(page): Query<Fields>,
    Form(f): Form<Fields>,
) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let caller = admin_or_return!(v);
    let back = back_to("/admin/users", &page);
    let disabled = match what.as_str() {
        "disable" => true,
        "enable" => false,
        _ => return v.redirect(&back, Some(("error", "unknown action"))),
    };
    let r = match username(&u) {
        Ok(name) => {
            st.services
                .set_disabled(&caller.actor(), &name, disabled)
                .await
        }
        Err(e) => Err(e),
    };
    match api(r) {
        Ok(d) => v.redirect(&back, Some(("ok", &d.message))),
        Err(e) => v.redirect(&back, Some(("error", &e.message))),
    }
}

/// `path` with the query `params` (URL-encoded, by key, blank values left out).
fn with_query(path: &str, mut params: Vec<(&str, &str)>) -> String {
    params.retain(|(_, v)| !v.is_empty());
    params.sort_unstable();
    if params.is_empty() {
        return path.to_string();
    }
    let query = params
        .iter()
        .map(|(k, v)| format!("{}={}", url(k), url(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

/// `path` with the paging keys (`after`, `limit`) of the query `q`: the page of a list that an
/// action on it sends the admin back to (never anywhere but `path`).
fn back_to(path: &str, q: &Fields) -> String {
    let keep = ["after", "limit"].iter();
    with_query(
        path,
        keep.filter_map(|k| q.get(*k).map(|v| (*k, v.as_str())))
            .collect(),
    )
}

/// A page titled `title` that says `message` (`id="error-message"`).
fn error_page(v: &Visitor, status: StatusCode, title: &str, message: &str) -> Response {
    let msg = format!(r#"<p id="error-message">{}</p>"#, esc(message));
    v.page(status, title, &msg)
}

/// The `limit` (`default` when absent) and `after` of a paged list, from its page's query;
/// else the 400 page titled `title` that says why.
fn paging_of(v: &Visitor, title: &str, q: &Fields, default: i64) -> Result<Paging, Response> {
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => default,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            let why = "limit must be a number of items per page";
            return Err(error_page(v, StatusCode::BAD_REQUEST, title, why));
        }
    };
    Ok(Paging {
        limit: Some(limit),
        after: q.get("after").cloned().filter(|a| !a.is_empty()),
    })
}

/// `{words} KEY` when the page continues after the key `after` (escaped), else nothing.
fn after_note(words: &str, after: Option<&str>) -> String {
    after
        .map(|a| format!("{words} {}", esc(a)))
        .unwrap_or_default()
}

/// A link (`id="next-page"`) to the page of `path` after the key `next`, keeping the rest of
/// the query `q` (filters, `limit`); nothing when no page follows.
fn next_link(path: &str, q: &Fields, next: Option<String>, label: &str) -> String {
    let Some(next) = next else {
        return String::new();
    };
    let mut params: Vec<(&str, &str)> = q
        .iter()
        .filter(|(k, _)| k.as_str() != "after")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    params.push(("after", &next));
    let href = esc(&with_query(path, params));
    format!(r#"<p><a id="next-page" href="{href}">{label}</a></p>"#)
}

/// VMs the admin's list shows on one page unless `limit` says otherwise.
const VM_PAGE: i64 = 500;

/// Audit records the admin's trail shows on one page unless `limit` says otherwise.
const AUDIT_PAGE: i64 = 200;

/// `/admin/vms?after=OWNER/NAME&limit=N`: every owner's VMs by owner and name, a page at a
/// time, with a link to the next page while more follow.
pub async fn vms(State(st): State<AppState>, v: Visitor, Query(q): Query<Fields>) -> Response {
    let _ = admin_or_return!(v);
    let paging = match paging_of(&v, "All VMs", &q, VM_PAGE) {
        Ok(p) => p,
        Err(page) => return page,
    };
    let page = st
        .services
        .vms_in(None, basphere_service::VmOrder::Name, &paging)
        .await;
    let (list, next) = match api(page) {
        Ok(p) => (p.items, p.next_after),
        Err(e) => return error_page(&v, e.status, "All VMs", &e.message),
    };
    let mut rows = String::new();
    for vm in &list {
        let name = vm.name.as_str();
        let owner = vm.owner.as_str();
        let _ = write!(
            rows,
            r#"<tr data-vm="{n}"><th scope="row" data-label="Name"><a href="/vms/{nu}?owner={ou}">{n}</a></th><td data-label="Owner">{o}</td><td data-label="Status">{st}</td><td data-label="IP">{ip}</td><td data-label="Spec">{spec} · {vcpus} vCPU · {mem}</td><td data-label="OS">{os}</td><td data-label="Created">{created}</td></tr>"#,
            n = esc(name),
            nu = url(name),
            ou = url(owner),
            o = esc(owner),
            st = badge(vm.status.as_str()),
            ip = ip(vm.ip_address),
            spec = esc(&vm.spec),
            vcpus = vm.vcpus,
            mem = gib(vm.memory_mib),
            os = esc(&vm.os),
            created = esc(&vm.created_at),
        );
    }
    let from = after_note(" after", paging.after.as_deref());
    let more = next_link("/admin/vms", &q, next, "Next page →");
    let body = if list.is_empty() && paging.after.is_none() {
        r#"<p id="no-vms">No VMs exist.</p>"#.to_string()
    } else {
        format!(
            r#"<p id="vm-count">{} VM(s){from}, by owner and name.</p><table class="vms"><thead><tr><th scope="col">Name</th><th scope="col">Owner</th><th scope="col">Status</th><th scope="col">IP</th><th scope="col">Spec</th><th scope="col">OS</th><th scope="col">Created</th></tr></thead><tbody>{rows}</tbody></table>{more}"#,
            list.len()
        )
    };
    v.page(StatusCode::OK, "All VMs", &body)
}

pub async fn audit(State(st): State<AppState>, v: Visitor, Query(q): Query<Fields>) -> Response {
    let _ = admin_or_return!(v);
    let pick = |k: &str| {
        q.get(k)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let paging = match paging_of(&v, "Audit trail", &q, AUDIT_PAGE) {
        Ok(p) => p,
        Err(page) => return page,
    };
    let r = st
        .services
        .audit(pick("actor"), pick("action"), pick("target"), &paging)
        .await;
    let (recs, next) = match api(r) {
        Ok(p) => (p.items, p.next_after),
        Err(e) => return error_page(&v, e.status, "Audit trail", &e.message),
    };
    let older = next_link("/admin/audit", &q, next, "Older records →");
    let from = after_note(", older than record", paging.after.as_deref());
    let mut rows = String::new();
    for a in &recs {
        let _ = write!(
            rows,
            r#"<tr><td data-label="When">{w}</td><td data-label="Who">{actor}</td><td data-label="From" class="muted">{src}</td><td data-label="Action">{act}</td><td data-label="Target">{tgt}</td><td data-label="Result">{res}</td><td data-label="Detail">{det}</td></tr>"#,
            w = when(a.at),
            actor = esc(&a.actor),
            src = esc(&a.source),
            act = esc(&a.action),
            tgt = esc(&a.target),
            res = esc(&a.result),
            det = a.detail.as_deref().map(esc).unwrap_or_default(),
        );
    }
    let val = |k: &str| esc(&pick(k).unwrap_or_default());
    let body = format!(
        r#"<form method="get" action="/admin/audit" class="card filters">
<div class="field"><label for="f-actor">Who</label><input id="f-actor" name="actor" value="{a}"></div>
<div class="field"><label for="f-action">Action starts with</label><input id="f-action" name="action" value="{b}" placeholder="vm."></div>
<div class="field"><label for="f-target">Target</label><input id="f-target" name="target" value="{c}"></div>
<button type="submit">Filter</button>
</form>
<p id="record-count">{n} record(s){from}, newest first.</p>
<table class="vms audit" id="audit-table"><thead><tr><th scope="col">When</th><th scope="col">Who</th><th scope="col">From</th><th scope="col">Action</th><th scope="col">Target</th><th scope="col">Result</th><th scope="col">Detail</th></tr></thead><tbody>{rows}</tbody></table>{older}"#,
        a = val("actor"),
        b = val("action"),
        c = val("target"),
        n = recs.len(),
    );
    v.page(StatusCode::OK, "Audit trail", &body)
}
