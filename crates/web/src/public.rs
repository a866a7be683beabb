//! Pages anyone can open: home, registration, the SSH guide, sign-in, enrollment, sign-out.

use crate::html::{Input, captcha, esc, form_alert};
use crate::session::{SESSION_HOURS, Visitor};
use crate::{api, body_of};
use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use basphere_api::limits;
use basphere_api::{AppState, Caller};
use basphere_core::FieldError;
use basphere_service::CAPTCHA_FIELD;
use basphere_store::Actor;
use basphere_wire::{EnrollRequest, RegisterRequest};
use std::collections::HashMap;

type Fields = HashMap<String, String>;

pub async fn home(v: Visitor) -> Response {
    if v.caller.is_some() {
        return v.redirect("/dashboard", None);
    }
    v.page(
        StatusCode::OK,
        "Virtual machines, self-service",
        r#"<p class="lead">Basphere gives you virtual machines within your team's quota, at addresses of your own, reachable by SSH.</p>
<ol class="steps-intro">
<li><a href="/ssh-guide">Make an SSH key</a> if you have none.</li>
<li><a href="/register">Register</a> with your username, email, team and public key.</li>
<li>When an admin has approved you, <a href="/signin">sign in</a> with the enrollment code or a token.</li>
</ol>"#,
    )
}

fn register_body(
    st: &AppState,
    v: &Visitor,
    f: &Fields,
    errs: &[FieldError],
    alert: Option<&str>,
) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    format!(
        r#"<p>Ask for an account. An admin reviews every registration; you can then sign in and create VMs. New to SSH keys? Read the <a href="/ssh-guide">SSH guide</a> first.</p>
{alert}
<form method="post" action="/register" class="card form" novalidate>
{csrf}
{u}
{e}
{t}
{k}
{captcha}
<button type="submit">Register</button>
</form>"#,
        alert = form_alert(alert),
        captcha = captcha(st.services.captcha_site_key(), errs),
        csrf = v.csrf_field(),
        u = Input::text("username", "Username", g("username"))
            .hint("3 to 20 characters: lowercase letters, digits and hyphens. On the bastion this is your login name.")
            .attrs(r#"autocomplete="username" autocapitalize="none" spellcheck="false" required"#)
            .render("r-", errs),
        e = Input::text("email", "Email", g("email"))
            .kind("email")
            .attrs(r#"autocomplete="email" required"#)
            .render("r-", errs),
        t = Input::text("team", "Team (optional)", g("team"))
            .hint("The team you work in, e.g. payments.")
            .render("r-", errs),
        k = Input::text("public_key", "SSH public key", g("public_key"))
            .kind("textarea")
            .hint("The one line in ~/.ssh/id_ed25519.pub, starting with ssh-ed25519.")
            .attrs(r#"spellcheck="false" required"#)
            .render("r-", errs),
    )
}

pub async fn register_form(State(st): State<AppState>, v: Visitor) -> Response {
    let body = register_body(&st, &v, &Fields::new(), &[], None);
    v.page(StatusCode::OK, "Register", &body)
}

pub async fn register(State(st): State<AppState>, v: Visitor, Form(f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let req = RegisterRequest::read(&body_of(&f, &["username", "email", "public_key"]));
    let registered = match limits::admit_registration(&st).await {
        Ok(()) => match api(st
            .services
            .verify_captcha(f.get(CAPTCHA_FIELD).map(String::as_str), None)
            .await)
        {
            Ok(()) => api(st
                .services
                .register(&v.anonymous().actor(), None, &req)
                .await),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match registered {
        Ok(_) => {
            let u = f.get("username").map(|s| s.trim()).unwrap_or("");
            v.redirect(&format!("/success?u={}", crate::html::url(u)), None)
        }
        Err(e) => {
            let mut fields = e.fields.clone();
            let mut alert = None;
            if e.status == StatusCode::CONFLICT {
                // A pending registration with this email, or the name taken.
                let field = if e.message.contains("with email") {
                    "email"
                } else {
                    "username"
                };
                fields.push(FieldError {
                    field: field.into(),
                    message: e.message.clone(),
                });
            } else if fields.is_empty() {
                alert = Some(e.message.as_str());
            } else {
                alert = Some("Registration not sent: please correct the fields marked below.");
            }
            if fields.iter().any(|e| e.field == CAPTCHA_FIELD) {
                alert = Some("Registration not sent: please complete the reCAPTCHA.");
            }
            let body = register_body(&st, &v, &f, &fields, alert);
            v.page(e.status, "Register", &body)
        }
    }
}

pub async fn success(v: Visitor, Query(q): Query<Fields>) -> Response {
    let who = q
        .get("u")
        .map(|u| format!(", <strong>{}</strong>", esc(u)))
        .unwrap_or_default();
    let body = format!(
        r#"<p id="registered">Thank you{who}. Your registration was received and waits for an admin's review.</p>
<h2>What happens next</h2>
<ol>
<li>An admin approves your registration (or tells you why not).</li>
<li>You get an enrollment code from the admin, or — on the bastion — your Unix account.</li>
<li><a href="/signin">Sign in</a> with the code; you then see your dashboard and can create VMs.</li>
</ol>
<p>Meanwhile, set up SSH as the <a href="/ssh-guide">SSH guide</a> shows.</p>"#
    );
    v.page(StatusCode::OK, "Registration received", &body)
}

pub async fn ssh_guide(State(st): State<AppState>, v: Visitor) -> Response {
    let host = esc(&st.config.bastion.host);
    let user = v
        .caller
        .as_ref()
        .and_then(|c| c.user.as_ref())
        .map(|u| esc(u.username.as_str()))
        .unwrap_or_else(|| "YOUR-USERNAME".into());
    let net = st.config.network.cidr.to_string();
    let pattern = esc(&net_pattern(&net));
    let body = format!(
        r##"<p>You reach your VMs with SSH through the bastion <code>{host}</code>. You need one key pair; its public half goes into your <a href="/register">registration</a> (or a <a href="/key-change">key change</a>).</p>
<nav aria-label="Operating systems" class="toc"><a href="#linux">Linux</a> · <a href="#macos">macOS</a> · <a href="#windows">Windows</a> · <a href="#config">SSH config</a></nav>
<section id="linux" class="card"><h2>Linux</h2>
<p>Make an ed25519 key (press Enter for the default file, and choose a passphrase):</p>
<pre><code>ssh-keygen -t ed25519 -C "you@example.org"
cat ~/.ssh/id_ed25519.pub</code></pre>
<p>Copy the one line that <code>cat</code> prints into the registration form. Your SSH config is <code>~/.ssh/config</code>.</p></section>
<section id="macos" class="card"><h2>macOS</h2>
<p>In Terminal:</p>
<pre><code>ssh-keygen -t ed25519 -C "you@example.org"
pbcopy &lt; ~/.ssh/id_ed25519.pub</code></pre>
<p>The public key is now on the clipboard. To keep the passphrase in the Keychain, add <code>UseKeychain yes</code> and <code>AddKeysToAgent yes</code> under <code>Host *</code> in <code>~/.ssh/config</code>.</p></section>
<section id="windows" class="card"><h2>Windows 10 and 11</h2>
<p>In PowerShell (OpenSSH is built in):</p>
<pre><code>ssh-keygen -t ed25519 -C "you@example.org"
Get-Content $env:USERPROFILE\.ssh\id_ed25519.pub | Set-Clipboard</code></pre>
<p>Your SSH config is <code>%USERPROFILE%\.ssh\config</code> (make the file if it is missing; no extension).</p></section>
<section id="config" class="card"><h2>SSH config entry</h2>
<p>With this entry, <code>ssh basphere</code> reaches the bastion and <code>ssh LOGIN@IP</code> reaches a VM through it (the dashboard shows each VM's command):</p>
<pre><code id="ssh-config">Host basphere
    HostName {host}
    User {user}
    IdentityFile ~/.ssh/id_ed25519

Host {pattern}
    ProxyJump basphere
    IdentityFile ~/.ssh/id_ed25519</code></pre>
<p>On Windows write <code>IdentityFile ~/.ssh/id_ed25519</code> the same way; OpenSSH for Windows understands <code>~</code>.</p></section>"##
    );
    v.page(StatusCode::OK, "SSH guide", &body)
}

/// `10.254.0.0/21` → `10.254.*` style host pattern for the SSH config.
fn net_pattern(cidr: &str) -> String {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let len: u32 = len.parse().unwrap_or(32);
    let octets: Vec<&str> = addr.split('.').collect();
    let keep = (len / 8) as usize;
    if keep >= 4 || octets.len() != 4 {
        return addr.to_string();
    }
    let mut parts: Vec<String> = octets[..keep.max(1)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    parts.push("*".into());
    parts.join(".")
}

fn signin_body(
    v: &Visitor,
    tok_errs: &[FieldError],
    enr: &Fields,
    enr_errs: &[FieldError],
) -> String {
    let g = |k: &str| enr.get(k).map(String::as_str).unwrap_or("");
    format!(
        r#"<div class="grid2">
<section class="card" aria-labelledby="tok-h"><h2 id="tok-h">With a token</h2>
<p>Paste an API token, made on the bastion with <code>basphere token create</code>.</p>
<form method="post" action="/signin" class="form">
{csrf}
{tok}
<button type="submit">Sign in</button>
</form></section>
<section class="card" aria-labelledby="enr-h"><h2 id="enr-h">First time: enrollment code</h2>
<p>After approval your admin gives you a one-time code. It signs you in and shows you an API token for the CLI.</p>
<form method="post" action="/enroll" class="form">
{csrf}
{u}
{c}
<button type="submit">Enroll and sign in</button>
</form></section>
</div>
<p>No account yet? <a href="/register">Register</a>.</p>"#,
        csrf = v.csrf_field(),
        tok = Input::text("token", "API token", "")
            .kind("password")
            .attrs(r#"autocomplete="off" spellcheck="false" required"#)
            .render("s-", tok_errs),
        u = Input::text("username", "Username", g("username"))
            .attrs(r#"autocomplete="username" autocapitalize="none" spellcheck="false" required"#)
            .render("e-", enr_errs),
        c = Input::text("code", "Enrollment code", g("code"))
            .attrs(r#"autocomplete="one-time-code" spellcheck="false" required"#)
            .render("e-", enr_errs),
    )
}

pub async fn signin_form(v: Visitor) -> Response {
    if v.caller.is_some() {
        return v.redirect("/dashboard", None);
    }
    let body = signin_body(&v, &[], &Fields::new(), &[]);
    v.page(StatusCode::OK, "Sign in", &body)
}

fn field(f: &str, m: impl Into<String>) -> Vec<FieldError> {
    vec![FieldError {
        field: f.into(),
        message: m.into(),
    }]
}

/// Mints the session token for `caller` and answers with `resp` carrying its cookie.
async fn open_session(
    st: &AppState,
    v: Visitor,
    caller: &Caller,
    resp: impl FnOnce(&Visitor) -> Response,
) -> Response {
    let Some(user) = caller.user.as_ref() else {
        return v.page(StatusCode::UNAUTHORIZED, "Sign in", "<p>No account.</p>");
    };
    match st
        .services
        .session_token(
            &user.username,
            SESSION_HOURS * 3_600_000,
            &Actor::new(user.username.as_str(), format!("web:{}", v.source)),
        )
        .await
    {
        Ok((token_id, secret)) => {
            // The answer already shows the visitor signed in (navigation, sign-out form).
            let v = v.into_session(caller.clone(), token_id, secret.clone());
            v.start_session(resp(&v), &secret)
        }
        Err(e) => v.page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sign in",
            &format!("<p>Cannot start a session: {}</p>", esc(&e.to_string())),
        ),
    }
}

pub async fn signin(State(st): State<AppState>, v: Visitor, Form(f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let token = f.get("token").map(|s| s.trim()).unwrap_or("");
    let caller = if token.is_empty() {
        None
    } else {
        match Caller::from_session(&st, token, &v.source).await {
            Ok(c) => c,
            Err(e) => return v.page(e.status, "Sign in", &format!("<p>{}</p>", esc(&e.message))),
        }
    };
    let errs = match &caller {
        None if token.is_empty() => field("token", "is required"),
        None => field(
            "token",
            "is not valid (wrong, revoked or expired); make a new one with basphere token create",
        ),
        Some(c) => match c.active() {
            Ok(_) => vec![],
            Err(e) => field("token", e.message),
        },
    };
    if !errs.is_empty() {
        let body = signin_body(&v, &errs, &Fields::new(), &[]);
        return v.page(StatusCode::UNAUTHORIZED, "Sign in", &body);
    }
    let caller = caller.expect("checked");
    let name = caller.name.clone();
    open_session(&st, v, &caller, |v| {
        v.redirect("/dashboard", Some(("ok", &format!("Signed in as {name}."))))
    })
    .await
}

pub async fn enroll(State(st): State<AppState>, v: Visitor, Form(f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    let req = EnrollRequest::read(&body_of(&f, &["username", "code"]));
    let enrolled = st
        .services
        .enroll(&v.anonymous().actor(), &v.client.to_string(), &req)
        .await;
    let secret = match api(enrolled) {
        Ok(d) => d.data.token,
        Err(e) => {
            let errs = if e.fields.is_empty() {
                field("code", e.message)
            } else {
                e.fields
            };
            let body = signin_body(&v, &[], &f, &errs);
            return v.page(e.status, "Sign in", &body);
        }
    };
    let caller = match Caller::from_session(&st, &secret, &v.source).await {
        Ok(Some(c)) => c,
        _ => {
            return v.page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Sign in",
                "<p>Enrollment token not found.</p>",
            );
        }
    };
    let user = esc(&caller.name);
    let page = format!(
        r#"<p>You are signed in as <strong>{user}</strong>. This is your API token for the command line; it is shown <strong>only this once</strong>:</p>
<div class="copyline"><code id="api-token">{tok}</code> <button type="button" class="copy" data-copy="api-token">Copy</button></div>
<p>Save it where the CLI finds it:</p>
<pre><code>mkdir -p ~/.config/basphere
echo '{tok}' &gt; ~/.config/basphere/token
chmod 600 ~/.config/basphere/token</code></pre>
<p><a class="button" href="/dashboard">Go to your dashboard</a></p>"#,
        tok = esc(&secret)
    );
    open_session(&st, v, &caller, |v| {
        v.page(StatusCode::OK, "Enrolled", &page)
    })
    .await
}

pub async fn signout(State(st): State<AppState>, v: Visitor, Form(f): Form<Fields>) -> Response {
    if let Err(r) = v.check_csrf(&f) {
        return r;
    }
    if let (Some(c), Some(id)) = (&v.caller, &v.token_id) {
        let _ = st.services.revoke_token(&c.name, id, &c.actor()).await;
    }
    v.end_session(v.redirect("/signin", Some(("ok", "Signed out."))))
}

fn key_change_unsigned_body(
    st: &AppState,
    v: &Visitor,
    f: &Fields,
    errs: &[FieldError],
    alert: Option<&str>,
) -> String {
    let g = |k: &str| f.get(k).map(String::as_str).unwrap_or("");
    format!(
        r#"<p>Lost your SSH key, or want another? Ask for a new one here with your username and the email you registered with. An admin reviews every request. Signed in already? <a href="/signin">Sign in</a> and change it from your account instead.</p>
{alert}
<form method="post" action="/key-change" class="card form" novalidate>
{csrf}
{u}
{e}
{k}
{r}
{captcha}
<button type="submit">Ask for the new key</button>
</form>"#,
        alert = form_alert(alert),
        csrf = v.csrf_field(),
        u = Input::text("username", "Username", g("username"))
            .attrs(r#"autocomplete="username" autocapitalize="none" spellcheck="false" required"#)
            .render("kc-", errs),
        e = Input::text("email", "Registered email", g("email"))
            .kind("email")
            .hint("The email you registered with.")
            .attrs(r#"autocomplete="email" required"#)
            .render("kc-", errs),
        k = Input::text("new_public_key", "New SSH public key", g("new_public_key"))
            .kind("textarea")
            .hint("The one line in ~/.ssh/id_ed25519.pub, starting with ssh-ed25519.")
            .attrs(r#"spellcheck="false" required"#)
            .render("kc-", errs),
        r = Input::text("reason", "Reason (optional)", g("reason"))
            .hint("E.g. lost laptop, key rotation.")
            .render("kc-", errs),
        captcha = captcha(st.services.captcha_site_key(), errs),
    )
}

/// The key-change form for a visitor who is not signed in.
pub(crate) fn key_change_unsigned_page(
    st: &AppState,
    v: &Visitor,
    status: StatusCode,
    f: &Fields,
    errs: &[FieldError],
    alert: Option<&str>,
) -> Response {
    let body = key_change_unsigned_body(st, v, f, errs, alert);
    v.page(status, "Ask for a new SSH key", &body)
}

/// `POST /key-change` from a visitor who is not signed in (CSRF checked by the caller): the
/// same service as the anonymous JSON route; then `/key-change-success`.
pub(crate) async fn key_change_unsigned(st: &AppState, v: &Visitor, f: &Fields) -> Response {
    let req = basphere_wire::KeyChangeRequest::read(&body_of(
        f,
        &["username", "email", "new_public_key"],
    ));
    let done = match api(st
        .services
        .verify_captcha(f.get(CAPTCHA_FIELD).map(String::as_str), None)
        .await)
    {
        Ok(()) => api(st
            .services
            .request_key_change_unsigned(&v.anonymous().actor(), &req)
            .await),
        Err(e) => Err(e),
    };
    match done {
        Ok(d) => v.redirect(
            &format!(
                "/key-change-success?u={}",
                crate::html::url(&d.data.username)
            ),
            None,
        ),
        Err(e) => {
            let alert = if e.fields.iter().any(|x| x.field == CAPTCHA_FIELD) {
                "Request not sent: please complete the reCAPTCHA."
            } else if e.fields.is_empty() {
                e.message.as_str()
            } else {
                "Request not sent: please correct the fields marked below."
            };
            key_change_unsigned_page(st, v, e.status, f, &e.fields, Some(alert))
        }
    }
}

/// `GET /key-change-success`: the request was received.
pub async fn key_change_success(v: Visitor, Query(q): Query<Fields>) -> Response {
    let who = q
        .get("u")
        .map(|u| format!(", <strong>{}</strong>", esc(u)))
        .unwrap_or_default();
    let body = format!(
        r#"<p id="key-change-received">Thank you{who}. Your request for a new SSH key was received and waits for an admin's review.</p>
<p>Once an admin approves it, your account's key is the new one: the bastion accepts it, and VMs you create from then on get it. Until then your old key (if you still have it) keeps working.</p>
<p><a href="/ssh-guide">SSH guide</a></p>"#
    );
    v.page(StatusCode::OK, "Key change requested", &body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ssh_config_host_pattern_from_cidr() {
        assert_eq!(super::net_pattern("10.254.0.0/21"), "10.254.*");
        assert_eq!(super::net_pattern("10.0.0.0/8"), "10.*");
        assert_eq!(super::net_pattern("192.168.7.0/24"), "192.168.7.*");
    }
}
