//! `GET /api-docs`: the `/api/v1` operations as the OpenAPI document lists them, rendered on the
//! server (no script, nothing from another origin), with a link to the document itself.

use crate::html::esc;
use crate::session::Visitor;
use axum::http::StatusCode;
use axum::response::Response;
use basphere_api::openapi::{OperationInfo, operations};
use std::collections::BTreeSet;
use std::fmt::Write;

pub async fn page(v: Visitor) -> Response {
    v.page(StatusCode::OK, "API", &body(&operations()))
}

/// Who may call an operation, in words.
fn auth(o: &OperationInfo) -> &'static str {
    if o.anonymous && o.statuses.iter().any(|s| s == "401") {
        "optional token"
    } else if o.anonymous {
        "none"
    } else {
        "token"
    }
}

fn body(ops: &[OperationInfo]) -> String {
    let mut out = String::from(
        r#"<p>Basphere's HTTP API is <code>/api/v1</code>. Every JSON answer is the envelope <code>{success, message, data, errors}</code>; over TCP send <code>Authorization: Bearer &lt;token&gt;</code> (make a token with <code>basphere token create</code>). The machine-readable description is the <a href="/api/v1/openapi.json">OpenAPI 3.1 document</a>.</p>"#,
    );
    let tags: BTreeSet<&str> = ops.iter().map(|o| o.tag.as_str()).collect();
    let _ = write!(
        out,
        r#"<nav aria-label="API sections" class="toc">{}</nav>"#,
        tags.iter()
            .map(|t| format!(r##"<a href="#api-{t}">{t}</a>"##, t = esc(t)))
            .collect::<Vec<_>>()
            .join(" · ")
    );
    for tag in tags {
        let rows: String = ops
            .iter()
            .filter(|o| o.tag == tag)
            .map(|o| {
                format!(
                    r#"<tr><th scope="row" data-label="Operation"><code>{m} {p}</code></th><td data-label="What">{s}</td><td data-label="Auth">{a}</td><td data-label="Answers">{st}</td></tr>"#,
                    m = o.method,
                    p = esc(&o.path),
                    s = esc(&o.summary),
                    a = auth(o),
                    st = esc(&o.statuses.join(" ")),
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<section id="api-{t}" class="card"><h2>{t}</h2><table class="vms api"><thead><tr><th scope="col">Operation</th><th scope="col">What</th><th scope="col">Auth</th><th scope="col">Answers</th></tr></thead><tbody>{rows}</tbody></table></section>"#,
            t = esc(tag),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_operation_of_the_document_escaped() {
        let ops = operations();
        let html = body(&ops);
        for o in &ops {
            let line = format!("<code>{} {}</code>", o.method, esc(&o.path));
            assert!(html.contains(&line), "{line} missing");
        }
        assert!(html.contains(r#"<a href="/api/v1/openapi.json">"#));
        assert!(!html.contains("<script"));
        let evil = OperationInfo {
            method: "GET",
            path: "/x/<script>".into(),
            summary: "a & b".into(),
            tag: "x\"y".into(),
            anonymous: true,
            statuses: vec!["200".into()],
        };
        let html = body(&[evil]);
        assert!(html.contains("/x/&lt;script&gt;") && html.contains("a &amp; b"));
        assert!(!html.contains("<script>") && !html.contains("x\"y") && html.contains("x&quot;y"));
    }

    #[test]
    fn auth_in_words() {
        let by_path = |m: &str, p: &str| {
            operations()
                .into_iter()
                .find(|o| o.method == m && o.path == p)
                .unwrap()
        };
        assert_eq!(auth(&by_path("GET", "/api/v1/health")), "none");
        assert_eq!(auth(&by_path("POST", "/api/v1/register")), "optional token");
        assert_eq!(auth(&by_path("GET", "/api/v1/vms")), "token");
    }
}
