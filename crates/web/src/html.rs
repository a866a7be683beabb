//! HTML building blocks: escaping, the page layout, form fields with inline errors.
//!
//! Invariant: every value that did not come from this file passes through [`esc`] before it is
//! written into a page.

use crate::session::Visitor;
use basphere_core::FieldError;
use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A whole page: head, skip link, navigation for who is signed in, notices, then `body`.
pub fn layout(v: &Visitor, title: &str, body: &str) -> String {
    let mut nav = String::new();
    let link = |nav: &mut String, href: &str, text: &str| {
        let _ = write!(nav, r#"<li><a href="{href}">{text}</a></li>"#);
    };
    match v.caller.as_ref().and_then(|c| c.user.as_ref()) {
        Some(u) => {
            link(&mut nav, "/dashboard", "Dashboard");
            link(&mut nav, "/key-change", "SSH key");
            link(&mut nav, "/ssh-guide", "SSH guide");
            link(&mut nav, "/api-docs", "API");
            if v.is_admin() {
                link(&mut nav, "/admin", "Approvals");
                link(&mut nav, "/admin/users", "Users");
                link(&mut nav, "/admin/vms", "All VMs");
                link(&mut nav, "/admin/audit", "Audit");
            }
            let _ = write!(
                nav,
                r#"<li class="who"><span>{}</span><form method="post" action="/signout">{}<button type="submit" class="link">Sign out</button></form></li>"#,
                esc(u.username.as_str()),
                v.csrf_field()
            );
        }
        None => {
            link(&mut nav, "/register", "Register");
            link(&mut nav, "/ssh-guide", "SSH guide");
            link(&mut nav, "/api-docs", "API");
            link(&mut nav, "/signin", "Sign in");
        }
    }
    let notices = v
        .flash
        .as_ref()
        .map(|(kind, text)| {
            let (kind, role) = if kind == "error" {
                ("error", "alert")
            } else {
                ("ok", "status")
            };
            format!(
                r#"<div class="notice {kind}" role="{role}" id="flash">{}</div>"#,
                esc(text)
            )
        })
        .unwrap_or_default();
    format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Basphere</title>
<link rel="icon" href="/static/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<a class="brand" href="/">Basphere</a>
<nav aria-label="Main"><ul>{nav}</ul></nav>
</header>
<main id="main" tabindex="-1">
{notices}
<h1>{title}</h1>
{body}
</main>
<footer>Basphere · self-service VMs · <a href="/ssh-guide">SSH guide</a></footer>
</body>
</html>
"##,
        title = esc(title),
    )
}

/// The messages for `field` among `errs`.
pub fn field_errors<'a>(errs: &'a [FieldError], field: &str) -> Vec<&'a str> {
    errs.iter()
        .filter(|e| e.field == field)
        .map(|e| e.message.as_str())
        .collect()
}

/// What a text input looks like.
pub struct Input<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub value: &'a str,
    pub hint: &'a str,
    pub kind: &'a str,
    pub attrs: &'a str,
}

impl<'a> Input<'a> {
    pub fn text(name: &'a str, label: &'a str, value: &'a str) -> Self {
        Self {
            name,
            label,
            value,
            hint: "",
            kind: "text",
            attrs: "",
        }
    }
    pub fn hint(mut self, hint: &'a str) -> Self {
        self.hint = hint;
        self
    }
    pub fn kind(mut self, kind: &'a str) -> Self {
        self.kind = kind;
        self
    }
    pub fn attrs(mut self, attrs: &'a str) -> Self {
        self.attrs = attrs;
        self
    }

    /// A labelled field with its hint and inline errors (tied with aria-describedby), in a form
    /// whose fields are prefixed `prefix` (ids must be unique on the page).
    pub fn render(&self, prefix: &str, errs: &[FieldError]) -> String {
        let id = format!("{prefix}{}", self.name);
        let mine = field_errors(errs, self.name);
        let mut described = vec![];
        let mut extra = String::new();
        if !self.hint.is_empty() {
            described.push(format!("{id}-hint"));
            let _ = write!(
                extra,
                r#"<p class="hint" id="{id}-hint">{}</p>"#,
                esc(self.hint)
            );
        }
        if !mine.is_empty() {
            described.push(format!("{id}-error"));
            let _ = write!(
                extra,
                r#"<p class="field-error" id="{id}-error" data-field="{}">{}</p>"#,
                esc(self.name),
                mine.iter().map(|m| esc(m)).collect::<Vec<_>>().join("<br>")
            );
        }
        let aria = if described.is_empty() {
            String::new()
        } else {
            format!(r#" aria-describedby="{}""#, described.join(" "))
        };
        let invalid = if mine.is_empty() {
            ""
        } else {
            r#" aria-invalid="true""#
        };
        let control = if self.kind == "textarea" {
            format!(
                r#"<textarea id="{id}" name="{n}" rows="4"{aria}{invalid} {a}>{v}</textarea>"#,
                n = esc(self.name),
                a = self.attrs,
                v = esc(self.value)
            )
        } else {
            format!(
                r#"<input id="{id}" name="{n}" type="{k}" value="{v}"{aria}{invalid} {a}>"#,
                n = esc(self.name),
                k = self.kind,
                a = self.attrs,
                v = esc(self.value)
            )
        };
        format!(
            r#"<div class="field{cls}"><label for="{id}">{l}</label>{control}{extra}</div>"#,
            cls = if mine.is_empty() { "" } else { " has-error" },
            l = esc(self.label)
        )
    }
}

/// A `<select>` with a label; `options` are (value, text).
pub fn select(
    prefix: &str,
    name: &str,
    label: &str,
    options: &[(String, String)],
    selected: &str,
    errs: &[FieldError],
) -> String {
    let id = format!("{prefix}{name}");
    let mine = field_errors(errs, name);
    let opts: String = options
        .iter()
        .map(|(v, t)| {
            format!(
                r#"<option value="{}"{}>{}</option>"#,
                esc(v),
                if v == selected { " selected" } else { "" },
                esc(t)
            )
        })
        .collect();
    let (aria, err) = if mine.is_empty() {
        (String::new(), String::new())
    } else {
        (
            format!(r#" aria-invalid="true" aria-describedby="{id}-error""#),
            format!(
                r#"<p class="field-error" id="{id}-error" data-field="{}">{}</p>"#,
                esc(name),
                mine.iter().map(|m| esc(m)).collect::<Vec<_>>().join("<br>")
            ),
        )
    };
    format!(
        r#"<div class="field{cls}"><label for="{id}">{l}</label><select id="{id}" name="{n}"{aria}>{opts}</select>{err}</div>"#,
        cls = if mine.is_empty() { "" } else { " has-error" },
        l = esc(label),
        n = esc(name),
    )
}

/// A group of checkboxes for a list field: box `v` is named `{name}.{v}` (see
/// [`fold_checked`]); `checked` are the values ticked.
pub fn checkboxes(
    prefix: &str,
    name: &str,
    label: &str,
    options: &[String],
    checked: &[&str],
    errs: &[FieldError],
) -> String {
    let mine = field_errors(errs, name);
    let boxes: String = options
        .iter()
        .map(|v| {
            format!(
                r#"<label class="check"><input type="checkbox" id="{prefix}{n}-{v}" name="{n}.{v}" value="on"{c}> {v}</label>"#,
                n = esc(name),
                v = esc(v),
                c = if checked.contains(&v.as_str()) { " checked" } else { "" },
            )
        })
        .collect();
    let err = if mine.is_empty() {
        String::new()
    } else {
        format!(
            r#"<p class="field-error" id="{prefix}{n}-error" data-field="{n}">{}</p>"#,
            mine.iter().map(|m| esc(m)).collect::<Vec<_>>().join("<br>"),
            n = esc(name),
        )
    };
    format!(
        r#"<fieldset class="field{cls}" id="{prefix}{n}"><legend>{l}</legend>{boxes}{err}</fieldset>"#,
        cls = if mine.is_empty() { "" } else { " has-error" },
        n = esc(name),
        l = esc(label),
    )
}

/// Folds the ticked boxes of [`checkboxes`] group `name` into one comma-separated field
/// `name`, as a list field reads from a form.
pub fn fold_checked(form: &mut std::collections::HashMap<String, String>, name: &str) {
    let prefix = format!("{name}.");
    let mut ticked: Vec<String> = form
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    if ticked.is_empty() {
        return;
    }
    form.retain(|k, _| !k.starts_with(&prefix));
    ticked.sort();
    form.insert(name.to_string(), ticked.join(","));
}

/// An alert listing errors that belong to no field of the form.
pub fn form_alert(message: Option<&str>) -> String {
    match message {
        Some(m) => format!(
            r#"<div class="notice error" role="alert" id="form-error">{}</div>"#,
            esc(m)
        ),
        None => String::new(),
    }
}

/// The reCAPTCHA v2 widget of a form (nothing when reCAPTCHA is off), with the error of its
/// answer, if any.
pub fn captcha(site_key: Option<&str>, errs: &[basphere_core::FieldError]) -> String {
    let Some(key) = site_key else {
        return String::new();
    };
    let err = errs
        .iter()
        .find(|e| e.field == basphere_service::CAPTCHA_FIELD)
        .map(|e| {
            format!(
                r#"<p class="field-error" id="captcha-error">reCAPTCHA {}</p>"#,
                esc(&e.message)
            )
        })
        .unwrap_or_default();
    format!(
        r#"<div class="field"><div class="g-recaptcha" data-sitekey="{k}"></div>{err}</div>
<script src="https://www.google.com/recaptcha/api.js" async defer></script>"#,
        k = esc(key)
    )
}

/// A time in Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn when(ms: i64) -> String {
    when_rfc3339(&basphere_store::format_ms(ms))
}

/// RFC 3339 `2026-01-02T03:04:05.678Z` → readable.
pub fn when_rfc3339(s: &str) -> String {
    match s.split_once('T') {
        Some((d, t)) => format!("{d} {} UTC", t.get(..8).unwrap_or(t)),
        None => s.to_string(),
    }
}

/// A status word as a badge.
pub fn badge(status: &str) -> String {
    format!(r#"<span class="badge s-{s}">{s}</span>"#, s = esc(status))
}

/// An address, or `—` when there is none.
pub fn ip(ip: Option<std::net::Ipv4Addr>) -> String {
    ip.map(|i| esc(&i.to_string()))
        .unwrap_or_else(|| "—".into())
}

/// Memory in MiB as GiB text.
pub fn gib(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn url_encodes_all_but_unreserved() {
        assert_eq!(url("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
        assert_eq!(url("web-1_x.y~"), "web-1_x.y~");
    }

    #[test]
    fn inline_error_is_tied_to_its_field() {
        let errs = vec![FieldError {
            field: "email".into(),
            message: "must look like <x>".into(),
        }];
        let h = Input::text("email", "Email", "a\"b").render("r-", &errs);
        assert!(h.contains(r#"<label for="r-email">Email</label>"#));
        assert!(h.contains(r#"aria-invalid="true""#));
        assert!(h.contains(r#"aria-describedby="r-email-error""#));
        assert!(h.contains("must look like &lt;x&gt;"));
        assert!(h.contains(r#"value="a&quot;b""#));
        let ok = Input::text("team", "Team", "").render("r-", &errs);
        assert!(!ok.contains("aria-invalid"));
    }

    #[test]
    fn memory_as_gib() {
        assert_eq!(gib(8192), "8 GiB");
        assert_eq!(gib(1536), "1.5 GiB");
    }
}
